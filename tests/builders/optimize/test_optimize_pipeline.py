"""optimize_model: the gate stops a bad model, a good one is saved with its lineage and report."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import bento_like.models as models
import bento_like.sdk.opt as opt
from bento_like.builders.optimize import OptimizationReport, OptimizeError, QualityGateError, optimize_model
from bento_like.sdk.model_ref import model as model_ref
from optimize_testlib import BENCH, save_mlp


def test_passing_model_is_saved_as_a_new_version_with_lineage(home: Path) -> None:
    tag = models.save("mlp", __import__("optimize_testlib").MLP().eval(), example_inputs=torch.randn(2, 32),
                      dynamic_shapes=({0: torch.export.Dim("batch")},), metadata={"acc": 0.97}, labels={"team": "a"})
    lines: list[str] = []
    result = optimize_model(tag, ["onnx", "int8"], opt.Gate(metric="cosine", min=0.99), bench_budget_s=BENCH, log=lines.append)
    saved = models.get(result.tag)
    assert saved.name == "mlp-onnx-int8" and models.get("mlp:latest").tag == tag  # the user's tag still means theirs
    assert saved.info.metadata["acc"] == 0.97 and saved.info.labels == {"team": "a"}
    report = OptimizationReport.from_metadata(saved.info.metadata)
    assert report.source_tag == tag and report.source_digest == models.get(tag).info.digest
    assert [step.name for step in report.steps] == ["source", "export(onnx)", "quantize(int8, dynamic, per-channel)"]
    assert report.passes[1] == {"pass": "quantize", "dtype": "int8", "method": "dynamic", "per_channel": True, "auto": False,
                                "exclude": [], "calibration": None, "reduce_range": None, "group_size": 128}
    assert report.gate["metric"] == "cosine" and report.passed
    for step in report.steps:
        m = step.measurement
        assert m.size_bytes > 0 and m.latency_ms_b1 > 0 and m.latency_ms_b32 > 0 and m.items_per_s > 0
    assert lines[0].startswith(f"optimizing {tag} (torch): export(onnx) -> quantize(int8, dynamic, per-channel)")
    assert lines[-1] == f"saved {result.tag}; mlp:latest is unchanged" and "cosine-mean" in result.table()


def test_failing_gate_stops_and_saves_nothing(mlp_tag: str) -> None:
    lines: list[str] = []
    with pytest.raises(QualityGateError) as caught:
        optimize_model(mlp_tag, [opt.prune(0.9)], opt.Gate(metric="argmax", min=0.99), bench_budget_s=BENCH, log=lines.append)
    message = str(caught.value)
    assert message.startswith(f"quality gate failed for {mlp_tag} after prune(90% unstructured): argmax 0.")
    assert "< min 0.99 (short by" in message and message.endswith("on 64 inputs; nothing was saved")
    assert caught.value.report.steps[-1].fidelity.passed is False
    assert any("FAIL argmax=" in line for line in lines)  # the table was printed before the error
    assert [m.tag for m in models.list()] == [mlp_tag]


def test_user_validation_data_and_output_by_name(mlp_tag: str, tmp_path: Path) -> None:
    np.savez(tmp_path / "val.npz", x=np.random.default_rng(1).standard_normal((10, 32)).astype(np.float32))
    gate = opt.Gate(metric="cosine", min=0.99, data="val.npz", output="output_0")
    result = optimize_model(mlp_tag, ["onnx"], gate, bench_budget_s=BENCH, log=None, base_dir=tmp_path)
    assert result.report.validation == "10 rows from val.npz" and result.report.steps[1].fidelity.rows == 10
    direct = optimize_model(mlp_tag, ["onnx"], 0.99, data={"x": np.ones((3, 32), np.float32)}, bench_budget_s=BENCH, log=None)
    assert direct.report.steps[1].fidelity.rows == 3
    with pytest.raises(OptimizeError, match="gate output 'logits': the model's outputs are output_0"):
        optimize_model(mlp_tag, ["onnx"], opt.Gate(output="logits"), bench_budget_s=BENCH, log=None)


def test_model_reference_options_drive_the_build(mlp_tag: str) -> None:
    ref = model_ref(mlp_tag, optimize=[opt.export("onnx"), opt.quantize("int8", auto=True)], quality=opt.Gate(min=0.98))
    result = optimize_model(ref.tag, ref.options["optimize"], ref.options["quality"], bench_budget_s=BENCH, log=None)
    assert result.report.steps[-1].variants and models.get(result.tag).info.framework == "onnx"


def test_without_save_nothing_is_stored(mlp_tag: str) -> None:
    result = optimize_model(mlp_tag, ["onnx"], save=False, bench_budget_s=BENCH, log=None)
    assert result.tag is None and result.model.info.framework == "onnx"
    assert [m.tag for m in models.list()] == [mlp_tag]


def test_torch_results_keep_a_signature_and_load_without_their_class(home: Path) -> None:
    tag = save_mlp()
    result = optimize_model(tag, [opt.prune(0.25, structured=True)], -1.0, bench_budget_s=BENCH, log=None)
    saved = models.get(result.tag)
    assert saved.info.details["forms"] == ["eager", "exported"]
    exported = saved.load(form="exported")
    assert exported(torch.zeros(3, 32)).shape == (3, 10)
