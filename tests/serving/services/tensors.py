"""Tensor-shaped APIs for the Open Inference Protocol tests."""

from __future__ import annotations

import os
import time
from typing import Annotated

import numpy as np

import bento_like as bl


@bl.service(name="tensors")
class Tensors:
    def __init__(self) -> None:
        self.batch_sizes: list[int] = []

    @bl.api
    def scale(self, x: Annotated[np.ndarray, bl.Shape(-1, 3), bl.DType("float32")], k: np.ndarray) -> np.ndarray:
        return x * k

    @bl.api(batchable=True, max_batch_size=16, max_latency_ms=2000)
    def square(self, x: Annotated[np.ndarray, bl.Shape(-1, 2), bl.DType("float32")]) -> np.ndarray:
        time.sleep(float(os.environ.get("SQUARE_DELAY", "0.05")))
        self.batch_sizes.append(len(x))
        return x * x

    @bl.api
    def sizes(self) -> list:
        return self.batch_sizes

    @bl.api
    def label(self, text: str) -> dict:
        return {"text": text}
