"""A GPU service with two APIs: a batched embedding and a plain health-style lookup."""

import numpy as np

import bento_like as bl


@bl.service(name="embedder", resources={"gpu": 1, "gpu_type": "NVIDIA-A100-SXM4-80GB", "cpu": "4", "memory": "16Gi"},
            traffic={"timeout": 30})
class Embedder:
    weights = bl.model("embedder-weights:latest")

    @bl.api(batchable=True, max_batch_size=64, max_latency_ms=50)
    def embed(self, x: np.ndarray) -> np.ndarray:
        return x * self.weights["scale"]

    @bl.api
    def dimensions(self) -> dict:
        return {"dimensions": 384}
