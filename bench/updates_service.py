"""The service bench/model_updates.py serves: a stored 784-1024-10 MLP behind a batchable API."""

from __future__ import annotations

from typing import Annotated

import numpy as np

import bento_like as bl


@bl.service(name="updates", traffic={"timeout": 30})
class Updates:
    model = bl.model("bench-mlp:latest")

    @bl.api(batchable=True, max_batch_size=32, max_latency_ms=20, warmup=True)
    def predict(self, x: Annotated[np.ndarray, bl.Shape(-1, 784), bl.DType("float32")]) -> np.ndarray:
        import torch

        with torch.inference_mode():
            return self.model(torch.from_numpy(x)).numpy()
