"""Build-time model optimization with a quality gate: `optimize_model(tag, passes, gate)`.

Each pass (export, quantize, prune, distill, compile) is a function from a stored model to a new one plus a
report, cached by the digest of its input and options. The pipeline measures every step (size, latency at
batch 1 and 32, throughput, fidelity to the source model), refuses a result whose outputs moved past the
gate, and saves the one that passes as a new version of the model with its lineage and report.

Importing this package imports no framework; each pass imports torch, onnx, onnxruntime or tensorrt when it
runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._errors import OptimizeError, PassError, PassUnavailableError, QualityGateError

__all__ = [
    "OptimizeError",
    "OptimizeResult",
    "OptimizationReport",
    "PassCache",
    "PassError",
    "PassUnavailableError",
    "QualityGateError",
    "optimize_model",
    "render_table",
]

if TYPE_CHECKING:
    from .cache import PassCache
    from .pipeline import OptimizeResult, optimize_model
    from .report import OptimizationReport, render_table

_LAZY = {
    "OptimizeResult": "pipeline",
    "optimize_model": "pipeline",
    "PassCache": "cache",
    "OptimizationReport": "report",
    "render_table": "report",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    globals()[name] = value
    return value
