"""Services for the warm-up tests: APIs the server must not call at startup, APIs that ask for a warm-up in each
form, warm-ups that fail or hang, and a model whose signature gives the warm-up input."""

from __future__ import annotations

import os
import time
from typing import Annotated

import numpy as np

import bento_like as bl

ROW = Annotated[np.ndarray, bl.Shape(-1, 2), bl.DType("float32")]


def _record(event: str) -> None:
    path = os.environ.get("CALL_LOG")
    if path:
        with open(path, "a") as f:
            f.write(event + "\n")


@bl.service
class Unasked:
    """No API asks for a warm-up: nothing may be called before the first request."""

    @bl.api
    def side_effect(self, n: int = 1) -> int:
        _record(f"side_effect {n}")
        return n

    @bl.api
    def slow_default(self, seconds: float = float(os.environ.get("SLOW_DEFAULT", "3"))) -> float:
        _record("slow_default")
        time.sleep(seconds)
        return seconds

    @bl.api
    def typed(self, x: ROW) -> np.ndarray:
        _record("typed")
        return x

    @bl.api(batchable=True, max_batch_size=4)
    def batched(self, x: ROW) -> np.ndarray:
        _record(f"batched {len(x)}")
        return x * 2


@bl.service
class Asked:
    """Each form of warm-up, beside APIs that did not ask for one."""

    @bl.api
    def side_effect(self, n: int = 1) -> int:
        _record(f"side_effect {n}")
        return n

    @bl.api(warmup=True)
    def zeros(self, x: ROW) -> np.ndarray:
        _record(f"zeros {x.shape} {x.dtype} {float(x.sum())}")
        return x

    @bl.api(warmup={"text": "hello"})
    def example(self, text: str, times: int = 2) -> str:
        _record(f"example {text} {times}")
        return text * times

    @bl.api(batchable=True, max_batch_size=4, warmup={"x": [[1.0, 2.0], [3.0, 4.0]]})
    def batched(self, x: ROW) -> np.ndarray:
        _record(f"batched {len(x)} {float(x[0, 0])}")
        return x * 2


@bl.service
class Fails:
    @bl.api(warmup=True)
    def predict(self, x: ROW) -> np.ndarray:
        raise ValueError("this model refuses zeros")


@bl.service(traffic={"timeout": 5})
class Hangs:
    @bl.api(warmup=True, warmup_timeout=1)
    def predict(self, x: ROW) -> np.ndarray:
        time.sleep(float(os.environ.get("HANG_S", "30")))
        return x


@bl.service
class OnnxRun:
    """An ONNX model called the ONNX way: the warm-up input comes from the model's signature."""

    mlp = bl.model("mlp:latest")

    @bl.api(warmup=True)
    def predict(self, x: np.ndarray) -> np.ndarray:
        _record(f"onnx {x.shape} {x.dtype}")
        return self.mlp.run(None, {"x": x})[0]


@bl.service
class TorchStyle:
    """Code written for a torch module, served after `mlp:latest` was replaced by an ONNX model."""

    mlp = bl.model("mlp:latest")

    @bl.api(warmup=True)
    def predict(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self.mlp(x))
