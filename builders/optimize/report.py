"""The optimization report: one row per step (the source, then each pass), as a table and as a Struct.

The Struct is stored in the optimized model's manifest under `metadata["optimization"]` (and a bento carries
it with the model), so what was done to a served model, and what it cost in fidelity, travels with it. It
holds no timestamps: the same build gives the same report, and so the same model version.
"""

from __future__ import annotations

from typing import Any

import msgspec

from .gate import Fidelity

SCHEMA_VERSION = 1
METADATA_KEY = "optimization"


class Measurement(msgspec.Struct, kw_only=True):
    size_bytes: int
    """The files a runtime loads (a PyTorch model's exported program, a second copy, is not counted)."""
    size_gz_bytes: int
    """The same files deflated at gzip's default level: what an image layer carries."""
    latency_ms_b1: float
    latency_ms_b32: float
    items_per_s: float
    """Throughput at batch 32."""
    device: str
    threads: int
    """torch/ONNX Runtime intra-op threads available when measured."""


class Variant(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One candidate that quantize(auto=True) tried."""

    name: str
    items_per_s: float
    fidelity: Fidelity
    chosen: bool = False
    error: str | None = None


class Step(msgspec.Struct, kw_only=True, omit_defaults=True):
    name: str
    """"source", or the pass as declared, e.g. `quantize(int8, dynamic, per-channel)`."""
    framework: str
    digest: str
    measurement: Measurement
    fidelity: Fidelity | None = None
    """Against the source model's outputs on the validation inputs; None for the source itself."""
    cached: bool = False
    pass_seconds: float = 0.0
    """How long the pass took when it ran (on a cache hit: when it first ran)."""
    notes: list[str] = []
    extra: dict[str, Any] = {}
    variants: list[Variant] = []


class OptimizationReport(msgspec.Struct, kw_only=True):
    schema_version: int = SCHEMA_VERSION
    source_tag: str
    source_digest: str
    passes: list[dict[str, Any]]
    """The pass declarations, as a build config would spell them."""
    gate: dict[str, Any]
    validation: str
    """Where the validation inputs came from."""
    steps: list[Step] = []
    passed: bool | None = None

    def to_builtins(self) -> dict[str, Any]:
        return msgspec.to_builtins(self)

    def manifest_document(self) -> dict[str, Any]:
        """What the optimized model's manifest stores: the report less whether each step came from this
        machine's cache, so rebuilding from a warm cache gives the same document (and model version)."""
        document = self.to_builtins()
        for step in document["steps"]:
            step.pop("cached", None)
        return document

    @classmethod
    def from_metadata(cls, metadata: dict[str, Any]) -> OptimizationReport | None:
        """The report stored in a model's manifest metadata, or None when it has none."""
        value = metadata.get(METADATA_KEY)
        return None if value is None else msgspec.convert(value, type=cls)


def human_size(size: int) -> str:
    value, units = float(size), ["B", "KiB", "MiB", "GiB"]
    unit = 0
    while value >= 1024 and unit < len(units) - 1:
        value /= 1024
        unit += 1
    return f"{int(value)} B" if unit == 0 else f"{value:.1f} {units[unit]}"


def _fidelity_cell(fidelity: Fidelity | None) -> str:
    if fidelity is None:
        return "1 / 1"
    return f"{fidelity.cosine_mean:.4f} / {fidelity.cosine_min:.4f}"


def _gate_cell(fidelity: Fidelity | None) -> str:
    if fidelity is None:
        return "-"
    mark = "pass" if fidelity.passed else "FAIL"
    return f"{mark} {fidelity.metric}={fidelity.value:.4g}"


def render_table(report: OptimizationReport) -> str:
    """A plain-text table: one row per step, speedups relative to the source, then any auto variants."""
    if not report.steps:
        return "(no steps measured)"
    base = report.steps[0].measurement
    header = ["step", "framework", "size", "gz size", "b1 ms", "b32 ms", "items/s", "speedup", "cosine mean/min", "gate"]
    rows = [header]
    for step in report.steps:
        m = step.measurement
        rows.append([
            step.name + (" (cached)" if step.cached else ""),
            step.framework,
            human_size(m.size_bytes),
            human_size(m.size_gz_bytes),
            f"{m.latency_ms_b1:.2f}",
            f"{m.latency_ms_b32:.2f}",
            f"{m.items_per_s:,.0f}",
            f"{m.items_per_s / base.items_per_s:.2f}x" if base.items_per_s else "-",
            _fidelity_cell(step.fidelity),
            _gate_cell(step.fidelity),
        ])
    lines = [_format(rows)]
    for step in report.steps:
        if step.variants:
            lines.append(f"\n{step.name}: variants tried")
            variant_rows = [["variant", "items/s", "cosine mean/min", "gate", ""]]
            for v in step.variants:
                variant_rows.append([
                    v.name, f"{v.items_per_s:,.0f}", _fidelity_cell(v.fidelity), _gate_cell(v.fidelity),
                    "<- kept" if v.chosen else (v.error or ""),
                ])
            lines.append(_format(variant_rows))
    m = base
    lines.append(
        f"\nvalidation: {report.validation}; latency medians on {m.device} with {m.threads} threads; "
        f"items/s at batch 32"
    )
    return "\n".join(lines)


def _format(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    rendered = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    rendered.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(rendered)
