"""Small models for the model store tests, importable by name so that pickles refer to them by reference
(as a user's own package would be); subprocesses find them through PYTHONPATH."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


class TinyNet(nn.Module):
    def __init__(self, features: int = 8, hidden: int = 16, classes: int = 3) -> None:
        super().__init__()
        self.hidden = nn.Linear(features, hidden)
        self.out = nn.Linear(hidden, classes)
        self.register_buffer("scale", torch.linspace(0.5, 1.5, classes))
        self.register_buffer("offset", torch.full((classes,), 0.25), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.hidden(x))) * self.scale + self.offset

    def describe(self) -> str:
        return f"TinyNet({self.hidden.in_features})"


class TiedNet(nn.Module):
    """Input embedding and output projection share one weight."""

    def __init__(self, vocab: int = 11, dim: int = 6) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(tokens))


class DataDependentNet(nn.Module):
    """Branches on a tensor's value, which torch.export cannot trace."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.linear(x)
        return -self.linear(x)


class NearestCentroid:
    """A scikit-learn-like estimator: fit, then predict."""

    def fit(self, x: np.ndarray, y: np.ndarray) -> NearestCentroid:
        self.classes_ = np.unique(y)
        self.centroids_ = np.stack([x[y == c].mean(axis=0) for c in self.classes_])
        return self

    def predict(self, x: np.ndarray) -> np.ndarray:
        distances = ((x[:, None, :] - self.centroids_[None, :, :]) ** 2).sum(axis=-1)
        return self.classes_[distances.argmin(axis=1)]
