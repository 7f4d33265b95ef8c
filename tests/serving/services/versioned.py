"""A batchable service over one stored torch model, for the model update tests.

Each stored version is an nn.Linear whose output is its version number k (zero weights, bias k), so a response
tells which version computed it; the API appends the number of the batch it ran in and the worker's pid (test-only
outputs), so the tests can check that no batch mixed versions. ``alive`` counts the model objects not yet
collected in the worker that answers."""

import gc
import itertools
import os
import weakref

import numpy as np
import torch

import bento_like as bl

_batches = itertools.count()
_alive: "weakref.WeakSet[torch.nn.Module]" = weakref.WeakSet()


@bl.service
class Versioned:
    model = bl.model("scorer:latest")

    def __init__(self) -> None:
        _alive.add(self.model)

    @bl.api(batchable=True, max_batch_size=16, max_latency_ms=50)
    def score(self, x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            out = self.model(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))).numpy()
        batch = np.full((len(x), 1), next(_batches), dtype=np.float64)
        pid = np.full((len(x), 1), os.getpid(), dtype=np.float64)
        return np.concatenate([out, batch, pid], axis=1)

    @bl.api
    def predict(self, x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return self.model(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))).numpy()

    @bl.api
    def alive(self) -> int:
        gc.collect()
        return len(_alive)
