"""Adaptive batching, split into deciding and doing: ``policy`` decides from a small state and a clock passed in
(what it learns is in ``estimators``), ``dispatcher`` owns the queue and the tasks and asks it, ``execute``
runs one batch. tests/serving/simulator.py drives the same policy with a virtual clock."""

from .dispatcher import Batcher
from .estimators import LatencyModel, Traffic, anchor_sizes
from .execute import BatchMetrics
from .policy import BatchLimits, BatchPolicy, QueueState, Refusal

__all__ = [
    "BatchLimits",
    "BatchMetrics",
    "BatchPolicy",
    "Batcher",
    "LatencyModel",
    "QueueState",
    "Refusal",
    "Traffic",
    "anchor_sizes",
]
