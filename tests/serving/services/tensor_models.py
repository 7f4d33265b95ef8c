"""Tensor-shaped APIs (and one that is not) for the Open Inference Protocol tests."""

from __future__ import annotations

import os
import time
from typing import Annotated, NamedTuple

import numpy as np

import bento_like as bl

Floats = Annotated[np.ndarray, bl.DType("float32")]


class MinMax(NamedTuple):
    low: Annotated[np.ndarray, bl.DType("int32")]
    high: Annotated[np.ndarray, bl.DType("int32")]
    mean: Annotated[np.ndarray, bl.DType("float64")]


@bl.service(name="tensor_models")
class TensorModels:
    def __init__(self) -> None:
        time.sleep(float(os.environ.get("TENSOR_MODELS_START_DELAY", "0")))
        self.batch_sizes: list[int] = []

    @bl.api
    def scale(self, x: Annotated[np.ndarray, bl.Shape(-1, 3), bl.DType("float32")], k: np.ndarray) -> Floats:
        return x * k

    @bl.api(batchable=True, max_batch_size=16, max_latency_ms=2000)
    def square(
        self, x: Annotated[np.ndarray, bl.Shape(-1, 2), bl.DType("float32")]
    ) -> Annotated[np.ndarray, bl.Shape(-1, 2), bl.DType("float32")]:
        time.sleep(0.05)
        self.batch_sizes.append(len(x))
        return x * x

    @bl.api
    def sizes(self) -> list:
        return self.batch_sizes

    @bl.api
    def minmax(self, x: Annotated[np.ndarray, bl.DType("int32")]) -> MinMax:
        return MinMax(x.min(axis=-1), x.max(axis=-1), x.mean(axis=-1))

    @bl.api
    def shout(self, text: str, times: Annotated[np.ndarray, bl.DType("int64")]) -> Annotated[np.ndarray, bl.DType("object")]:
        return np.array([text.upper()] * int(times.reshape(-1)[0]), dtype=object)

    @bl.api
    def slow(self, x: np.ndarray) -> np.ndarray:
        time.sleep(1.0)
        return x

    @bl.api
    def label(self, text: str) -> dict:
        return {"text": text}
