"""The quickstart service: an iris classifier trained when each instance starts, and an echo-like API.

    pkg serve examples/quickstart/service.py:Demo
    curl -s -X POST localhost:3000/predict -H 'content-type: application/json' -d '{"x": [[5.1, 3.5, 1.4, 0.2]]}'

The model is a softmax regression fitted with NumPy on the 150 flowers of Fisher's iris data set (iris.csv,
next to this file): four measurements in centimetres in, the probabilities of the three species out.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import msgspec
import numpy as np

import bento_like as bl

DATA = Path(__file__).resolve().parent / "iris.csv"
SPECIES = ("setosa", "versicolor", "virginica")


class Item(msgspec.Struct):
    text: str
    lang: str = "en"


class IrisModel:
    """Multinomial logistic regression on standardized features, fitted by full-batch gradient descent."""

    def __init__(self, features: np.ndarray, labels: np.ndarray, steps: int = 500, lr: float = 0.5) -> None:
        self.mean, self.std = features.mean(0), features.std(0)
        z = (features - self.mean) / self.std
        onehot = np.eye(len(SPECIES), dtype=np.float64)[labels]
        self.w = np.zeros((z.shape[1], len(SPECIES)))
        self.b = np.zeros(len(SPECIES))
        for _ in range(steps):
            grad = self._softmax(z @ self.w + self.b) - onehot
            self.w -= lr * z.T @ grad / len(z)
            self.b -= lr * grad.mean(0)

    @staticmethod
    def _softmax(logits: np.ndarray) -> np.ndarray:
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        return self._softmax(((x - self.mean) / self.std) @ self.w + self.b).astype(np.float32)


def load_iris() -> tuple[np.ndarray, np.ndarray]:
    rows = [line.split(",") for line in DATA.read_text().splitlines()[1:] if line]
    return np.array([r[:4] for r in rows], dtype=np.float64), np.array([SPECIES.index(r[4]) for r in rows])


@bl.service(name="demo", resources={"cpu": 1}, traffic={"timeout": 10, "max_concurrency": 64})
class Demo:
    def __init__(self) -> None:
        self.model = IrisModel(*load_iris())

    @bl.api
    def predict(self, x: Annotated[np.ndarray, bl.Shape(-1, 4), bl.DType("float32")]) -> np.ndarray:
        """Species probabilities (setosa, versicolor, virginica) for rows of sepal length, sepal width,
        petal length and petal width, in cm."""
        return self.model.predict_proba(x)

    @bl.api(route="/tag")
    async def tag(self, item: Item) -> dict:
        """Echo an item back with its language."""
        return {"text": item.text, "lang": item.lang}
