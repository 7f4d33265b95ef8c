"""The model bench/batching.py serves: a 784-4096-4096-10 float32 MLP (about 20M parameters).

``BENCH_MAX_LATENCY_MS`` sets the API's max_latency_ms (60 by default). ``BENCH_TYPED=0`` declares the input as
a plain ``np.ndarray`` (no shape or dtype: the server cannot make up an example, so it serves without a warm-up);
by default it is ``Annotated[np.ndarray, bl.Shape(-1, 784), bl.DType("float32")]``, warmed up with zeros. Only
``bl.service``, ``bl.api``, ``bl.Shape`` and ``bl.DType`` are used, so that older checkouts of bento_like serve it
too (``bench/batching.py --compare``; before ``warmup=`` existed, typed inputs were warmed up without asking)."""

from __future__ import annotations

import os
import inspect
from typing import Annotated

import numpy as np

import bento_like as bl

MAX_LATENCY_MS = float(os.environ.get("BENCH_MAX_LATENCY_MS", "60"))
TYPED = os.environ.get("BENCH_TYPED", "1") != "0"
Input = Annotated[np.ndarray, bl.Shape(-1, 784), bl.DType("float32")] if TYPED else np.ndarray
WARMUP = {"warmup": True} if TYPED and "warmup" in inspect.signature(bl.api).parameters else {}


def build_mlp():  # type: ignore[no-untyped-def]
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(784, 4096), torch.nn.ReLU(), torch.nn.Linear(4096, 4096), torch.nn.ReLU(), torch.nn.Linear(4096, 10)
    ).eval()


@bl.service(name="mlp", traffic={"timeout": 30, "max_queue": 4096})
class MLP:
    def __init__(self) -> None:
        import torch

        self.torch = torch
        self.model = build_mlp()

    @bl.api(batchable=True, max_batch_size=64, max_latency_ms=MAX_LATENCY_MS, **WARMUP)
    def predict(self, x: Input) -> np.ndarray:
        with self.torch.inference_mode():  # untyped, the JSON rows decode as float64
            return self.model(self.torch.from_numpy(np.asarray(x, dtype=np.float32))).numpy()
