"""The report table and the Struct stored in the manifest."""

from __future__ import annotations

import msgspec

from bento_like.builders.optimize.gate import Fidelity
from bento_like.builders.optimize.report import (
    Measurement,
    OptimizationReport,
    Step,
    Variant,
    human_size,
    render_table,
)


def _measurement(items: float, size: int) -> Measurement:
    return Measurement(size_bytes=size, size_gz_bytes=size // 2, latency_ms_b1=1.5, latency_ms_b32=32000 / items,
                       items_per_s=items, device="cpu", threads=2)


def _fidelity(value: float, passed: bool) -> Fidelity:
    return Fidelity(metric="cosine-mean", value=value, bound="min", threshold=0.99, passed=passed, rows=64,
                    cosine_mean=value, cosine_min=value - 0.01, max_abs=0.1)


def test_table_shows_every_step_speedup_fidelity_and_variants() -> None:
    report = OptimizationReport(source_tag="enc:1", source_digest="sha256:x", passes=[], gate={}, validation="calib.npz")
    report.steps.append(Step(name="source", framework="torch", digest="a", measurement=_measurement(100, 90 * 2**20)))
    report.steps.append(Step(
        name="quantize(int8, auto)", framework="onnx", digest="b", measurement=_measurement(250, 23 * 2**20),
        fidelity=_fidelity(0.993, True), cached=True,
        variants=[Variant(name="dynamic, per-channel", items_per_s=250, fidelity=_fidelity(0.993, True), chosen=True),
                  Variant(name="dynamic, per-tensor", items_per_s=260, fidelity=_fidelity(0.967, False))],
    ))
    table = render_table(report)
    assert "quantize(int8, auto) (cached)" in table and "2.50x" in table and "23.0 MiB" in table
    assert "pass cosine-mean=0.993" in table and "FAIL cosine-mean=0.967" in table and "<- kept" in table
    assert "validation: calib.npz" in table


def test_report_round_trips_through_manifest_metadata() -> None:
    report = OptimizationReport(source_tag="enc:1", source_digest="sha256:x", passes=[{"pass": "export"}], gate={"metric": "cosine"}, validation="v")
    report.steps.append(Step(name="source", framework="torch", digest="a", measurement=_measurement(10, 10)))
    metadata = msgspec.json.decode(msgspec.json.encode({"optimization": report.to_builtins()}))
    assert OptimizationReport.from_metadata(metadata) == report
    assert OptimizationReport.from_metadata({}) is None
    assert human_size(512) == "512 B" and human_size(1536) == "1.5 KiB"
