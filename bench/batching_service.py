"""The model bench/batching.py serves: a 784-4096-4096-10 float32 MLP (about 20M parameters)."""

from __future__ import annotations

import os
from typing import Annotated

import numpy as np

import bento_like as bl

MAX_LATENCY_MS = float(os.environ.get("BENCH_MAX_LATENCY_MS", "60"))


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

    @bl.api(batchable=True, max_batch_size=64, max_latency_ms=MAX_LATENCY_MS)
    def predict(self, x: Annotated[np.ndarray, bl.Shape(-1, 784), bl.DType("float32")]) -> np.ndarray:
        with self.torch.inference_mode():
            return self.model(self.torch.from_numpy(x)).numpy()
