"""Errors of the optimization builder; each message says which pass or gate failed and why."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .report import OptimizationReport


class OptimizeError(Exception):
    """Base class: catch this to handle every optimization failure."""


class PassError(OptimizeError):
    """A pass cannot apply to this model (wrong framework, bad options) or failed while running."""


class PassUnavailableError(PassError):
    """A pass needs something this machine lacks (an NVIDIA GPU, the tensorrt or triton package)."""


class QualityGateError(OptimizeError):
    """The optimized model's outputs moved past the gate's bound; nothing was saved.

    `report` holds every step measured up to the failure, so the caller can print the table."""

    def __init__(self, message: str, report: OptimizationReport | None = None) -> None:
        super().__init__(message)
        self.report = report
