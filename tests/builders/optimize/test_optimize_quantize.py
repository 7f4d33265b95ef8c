"""quantize: ONNX Runtime int8 dynamic/static, fp16, the auto search, and weight-only int8/int4 for PyTorch."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import bento_like.models as models
import bento_like.sdk.opt as opt
from bento_like.builders.optimize import PassError, QualityGateError, optimize_model
from bento_like.builders.optimize.quantize import cpu_has_vnni, effective_reduce_range
from bento_like.kernels.int8_weight_only import WeightOnlyLinear
from optimize_testlib import BENCH, outlier_mlp, save_mlp


def _ops(tag: str) -> set[str]:
    return {node.op_type for node in onnx.load(str(models.get(tag).path / "model.onnx")).graph.node}


def test_int8_dynamic_and_static_shrink_the_model_within_the_gate(mlp_tag: str) -> None:
    dynamic = optimize_model(mlp_tag, ["onnx", opt.quantize("int8")], 0.99, bench_budget_s=BENCH, log=None)
    source, exported, quantized = dynamic.report.steps
    assert quantized.measurement.size_bytes < exported.measurement.size_bytes / 2  # small layers: scales and graph weigh in
    assert quantized.fidelity.passed and "DynamicQuantizeLinear" in _ops(dynamic.tag)
    static = optimize_model(mlp_tag, ["onnx", opt.quantize("int8", method="static")], 0.98, bench_budget_s=BENCH, log=None)
    assert {"QuantizeLinear", "DequantizeLinear"} <= _ops(static.tag)
    assert static.report.steps[-1].notes[0] == "onnxruntime int8 static, per-channel weights"


def test_weights_get_7_bits_on_cpus_without_vnni_or_when_asked(mlp_tag: str) -> None:
    # 8-bit weights saturate ONNX Runtime's int8 sums on x86 without VNNI: on an AVX2 EPYC this MLP fell to
    # cosine 0.98 under dynamic per-channel quantization, and passes 0.99 with 7-bit weights.
    assert effective_reduce_range(opt.Quantize()) is (cpu_has_vnni() is False)
    assert effective_reduce_range(opt.Quantize(reduce_range=False)) is False
    result = optimize_model(mlp_tag, ["onnx", opt.quantize("int8", reduce_range=True)], 0.99, bench_budget_s=BENCH, log=None)
    assert "7-bit weight range (reduce_range: asked for)" in result.report.steps[-1].notes
    default = optimize_model(mlp_tag, ["onnx", opt.quantize("int8")], 0.99, bench_budget_s=BENCH, log=None)
    assert any("reduce_range" in note for note in default.report.steps[-1].notes) is (cpu_has_vnni() is False)


def test_fp16_onnx_keeps_float32_inputs(mlp_tag: str) -> None:
    result = optimize_model(mlp_tag, ["onnx", opt.quantize("fp16")], 0.999, bench_budget_s=BENCH, log=None)
    session = models.get(result.tag).load()
    assert session.get_inputs()[0].type == "tensor(float)"
    assert result.report.steps[-1].fidelity.cosine_min > 0.999


def test_per_tensor_scales_fail_a_tight_gate_that_per_channel_passes(home) -> None:
    tag = save_mlp("outlier", model=outlier_mlp())
    gate = opt.Gate(metric="cosine", min=0.999)
    with pytest.raises(QualityGateError, match=r"cosine-mean 0\.\d+ < min 0\.999 \(short by"):
        optimize_model(tag, ["onnx", opt.quantize("int8", per_channel=False)], gate, bench_budget_s=BENCH, log=None)
    assert optimize_model(tag, ["onnx", opt.quantize("int8")], gate, bench_budget_s=BENCH, log=None).tag


def test_auto_keeps_the_fastest_variant_that_passes(home) -> None:
    tag = save_mlp("outlier", model=outlier_mlp())
    result = optimize_model(tag, ["onnx", opt.quantize("int8", auto=True)], opt.Gate(min=0.999), bench_budget_s=BENCH, log=None)
    step = result.report.steps[-1]
    names = [v.name for v in step.variants]
    assert names[:4] == ["dynamic, per-channel", "dynamic, per-tensor", "static, per-channel", "static, per-tensor"]
    assert any("sensitive in float" in name for name in names)
    (chosen,) = [v for v in step.variants if v.chosen]
    passing = [v for v in step.variants if v.fidelity.passed]
    assert chosen.items_per_s == max(v.items_per_s for v in passing)
    assert not next(v for v in step.variants if v.name == "dynamic, per-tensor").fidelity.passed
    assert step.extra["chosen"] == chosen.name and step.fidelity.passed


def test_auto_with_no_passing_variant_fails_listing_each(mlp_tag: str) -> None:
    with pytest.raises(QualityGateError) as caught:
        optimize_model(mlp_tag, ["onnx", opt.quantize("int8", auto=True)], opt.Gate(metric="max_abs", max=1e-9), bench_budget_s=BENCH, log=None)
    message = str(caught.value)
    assert message.startswith("quantize(int8, auto): no variant passes the gate:")
    assert "dynamic, per-channel: max_abs" in message and "(over by" in message
    assert caught.value.report is not None and [m.tag for m in models.list()] == [mlp_tag]


@pytest.mark.parametrize(("dtype", "bits"), [("int8", 8), ("int4", 4)])
def test_weight_only_replaces_linear_layers(mlp_tag: str, dtype: str, bits: int) -> None:
    spec = opt.quantize(dtype, method="weight_only", group_size=32)
    result = optimize_model(mlp_tag, [spec], 0.95, bench_budget_s=BENCH, log=None)
    module = models.get(result.tag).load()
    layers = [m for m in module.modules() if isinstance(m, WeightOnlyLinear)]
    assert len(layers) == 3 and {layer.bits for layer in layers} == {bits}
    assert result.report.steps[-1].measurement.size_bytes < result.report.steps[0].measurement.size_bytes
    x = np.random.default_rng(0).standard_normal((4, 32)).astype(np.float32)
    import torch

    assert module(torch.from_numpy(x)).shape == (4, 10)


def test_torch_int8_dynamic_points_to_export(mlp_tag: str) -> None:
    with pytest.raises(PassError, match=r"runs in ONNX Runtime: put export\('onnx'\) before it"):
        optimize_model(mlp_tag, [opt.quantize("int8")], bench_budget_s=BENCH, log=None)
    with pytest.raises(PassError, match="weight-only quantization is for PyTorch models"):
        optimize_model(mlp_tag, ["onnx", opt.quantize("int8", method="weight_only")], bench_budget_s=BENCH, log=None)
