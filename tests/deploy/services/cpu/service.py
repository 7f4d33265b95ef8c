"""A CPU service with a model: what most teams deploy first."""

import numpy as np

import bento_like as bl


@bl.service(name="fraud_scorer", resources={"cpu": "2", "memory": "2Gi"}, traffic={"timeout": 10, "max_concurrency": 64})
class FraudScorer:
    weights = bl.model("fraud-weights:latest")

    @bl.api(batchable=True, max_batch_size=32, max_latency_ms=20)
    def score(self, x: np.ndarray) -> np.ndarray:
        return x * self.weights["scale"]
