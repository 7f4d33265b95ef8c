"""BentoML's adaptive-batching example: sentence embeddings as a batchable API over arrays checked by
bentoml.validators. Ported from BentoML 1.4 by changing the import line only."""

from __future__ import annotations

import time
from typing import Annotated

import numpy as np

import bento_like as bentoml
from bento_like.validators import DType, Shape


@bentoml.service(resources={"cpu": "1", "memory": "1Gi"}, traffic={"timeout": 30, "max_concurrency": 64})
class SentenceEmbedding:
    def __init__(self) -> None:
        rng = np.random.default_rng(0)
        self.projection = rng.standard_normal((8, 4)).astype(np.float32)
        self.batch_sizes: list[int] = []

    @bentoml.api(batchable=True, max_batch_size=32, max_latency_ms=200)
    def encode(self, features: Annotated[np.ndarray, Shape((-1, 8)), DType("float32")]) -> np.ndarray:
        self.batch_sizes.append(len(features))
        time.sleep(0.02)  # a real model's cost per call: what makes merging requests pay
        return features @ self.projection

    @bentoml.api
    def batch_sizes_seen(self) -> list[int]:
        return self.batch_sizes
