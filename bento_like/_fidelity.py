"""How close one model's outputs are to another's on the same inputs: what the build's quality gate and a
served model swap both measure (builders never import serving, so the metrics live here)."""

from __future__ import annotations

import numpy as np


def _flat(array: np.ndarray) -> np.ndarray:
    return np.asarray(array, dtype=np.float64).reshape(len(array), -1)


def cosine(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """Per-row cosine similarity over the flattened output; rows that are zero in both count as 1."""
    a, b = _flat(reference), _flat(candidate)
    dot = (a * b).sum(axis=1)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    both_zero = (np.linalg.norm(a, axis=1) == 0) & (np.linalg.norm(b, axis=1) == 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        result = np.where(norms > 0, dot / np.where(norms > 0, norms, 1), 0.0)
    return np.where(both_zero, 1.0, result)


def argmax_agreement(reference: np.ndarray, candidate: np.ndarray) -> float | None:
    """The share of rows whose argmax over the last axis agrees; None when there is no such axis."""
    if reference.ndim < 2 or reference.shape[-1] < 2:
        return None
    return float((reference.argmax(axis=-1) == candidate.argmax(axis=-1)).mean())


def max_abs(reference: np.ndarray, candidate: np.ndarray) -> float:
    return float(np.abs(reference.astype(np.float64) - candidate.astype(np.float64)).max())
