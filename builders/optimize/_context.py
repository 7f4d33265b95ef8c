"""What a pass receives (PassContext) and returns (PassOutput); the pipeline does the rest."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bento_like.models import Model
from bento_like.sdk.opt import Gate

if TYPE_CHECKING:
    from .cache import PassCache
    from .report import Variant


@dataclass
class PassOutput:
    """The new artifact, as the model store's adapter for `framework` saves it (an nn.Module, a path to a
    .onnx or .engine file), plus what the pass wants recorded."""

    obj: Any
    framework: str
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    """JSON values for the report (pruned shapes, distillation metrics, ...)."""
    metadata: dict[str, Any] = field(default_factory=dict)
    """Recorded in the artifact's manifest and carried to the final model (e.g. runtime hints)."""
    variants: list[Variant] = field(default_factory=list)
    save_options: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments for the adapter's save (e.g. a TensorRT engine's signatures)."""


@dataclass
class PassContext:
    source: Model
    """The model the whole optimization started from (the teacher, the reference)."""
    inputs: dict[str, np.ndarray]
    """Validation inputs, by input name."""
    gate: Gate
    device: str
    workdir: Path
    """Scratch space for this pass; removed when it returns."""
    cache: PassCache
    evaluate: Callable[[Model], tuple[float, Any]]
    """(items/s at batch 32, Fidelity against the source) for a candidate: what auto searches use."""
    materialize: Callable[[str, Any, Model, Callable[[Path], PassOutput]], Model]
    """materialize(label, options, input_model, produce) -> stored candidate, cached by (label, options, input)."""
    log: Callable[[str], None]
    base_dir: Path | None = None

    def example_rows(self, count: int = 2) -> dict[str, np.ndarray]:
        from ._runner import rows_of

        return rows_of(self.inputs, count)
