"""A service served by KServe, its model shipped as a modelcar image."""

import numpy as np

import bento_like as bl


@bl.service(name="ranker", resources={"cpu": "1", "memory": "1Gi"})
class Ranker:
    weights = bl.model("ranker-weights:latest")

    @bl.api
    def rank(self, x: np.ndarray) -> np.ndarray:
        return x * self.weights["scale"]
