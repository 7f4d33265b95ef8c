"""compile: TensorRT where it can run (its errors elsewhere), and torch.compile."""

from __future__ import annotations

import types

import numpy as np
import onnx
import pytest

import bento_like.models as models
import bento_like.sdk.opt as opt
from bento_like.builders.optimize import PassError, PassUnavailableError, optimize_model
from bento_like.builders.optimize.compile import build_engine, has_qdq, profile_shapes
from bento_like.models._tensorrt import unavailable_reason
from optimize_testlib import BENCH

needs_no_tensorrt = pytest.mark.skipif(unavailable_reason() is None, reason="TensorRT and a GPU are here: see bench/gpu_check.py")


@needs_no_tensorrt
def test_tensorrt_without_a_gpu_fails_saying_exactly_that(mlp_tag: str) -> None:
    with pytest.raises(PassUnavailableError) as caught:
        optimize_model(mlp_tag, ["onnx", opt.compile("tensorrt")], bench_budget_s=BENCH, log=None)
    message = str(caught.value)
    assert message.startswith("compile(backend='tensorrt') cannot run on this machine: TensorRT needs an NVIDIA GPU and the tensorrt Python package:")
    assert "tensorrt Python package is not importable" in message or "no CUDA device" in message


def test_tensorrt_needs_onnx_and_int8_needs_qdq(mlp_tag: str) -> None:
    with pytest.raises(PassError, match=r"builds from an ONNX model .* put export\('onnx'\) before it"):
        optimize_model(mlp_tag, [opt.compile("tensorrt")], bench_budget_s=BENCH, log=None)
    with pytest.raises(PassError, match=r"needs an explicitly quantized \(Q/DQ\) ONNX model"):
        optimize_model(mlp_tag, ["onnx", opt.compile("tensorrt", precision="int8")], bench_budget_s=BENCH, log=None)


def test_profile_and_qdq_detection_on_the_onnx_tensorrt_consumes(encoder_tag: str) -> None:
    exported = optimize_model(encoder_tag, ["onnx"], bench_budget_s=BENCH, log=None)
    proto = onnx.load(str(models.get(exported.tag).path / "model.onnx"))
    inputs = {"input_ids": np.zeros((4, 24), np.int64), "attention_mask": np.ones((4, 24), np.int64)}
    profiles = profile_shapes(proto, inputs, opt.compile("tensorrt", opt_batch=8, max_batch=16))
    assert profiles == {name: ((1, 1), (8, 24), (16, 24)) for name in ("input_ids", "attention_mask")}
    assert not has_qdq(proto)
    static = optimize_model(encoder_tag, ["onnx", opt.quantize("int8", method="static")], 0.9, bench_budget_s=BENCH, log=None)
    assert has_qdq(onnx.load(str(models.get(static.tag).path / "model.onnx")))


class _Recorder:
    """Stands in for the tensorrt module: records the calls build_engine makes, in order."""

    def __init__(self, strongly_typed: bool) -> None:
        self.calls: list[str] = []
        flags = {"STRONGLY_TYPED": 5} if strongly_typed else {}
        self.NetworkDefinitionCreationFlag = types.SimpleNamespace(**flags)
        self.BuilderFlag = types.SimpleNamespace(FP16="FP16", INT8="INT8")
        self.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
        self.Logger = lambda level: "logger"
        self.Logger.WARNING = 2

    def __getattr__(self, name: str):
        recorder = self

        class Obj:
            def __init__(self, *args) -> None:
                recorder.calls.append(f"{name}{args}")

            def __getattr__(self, method: str):
                def call(*args):
                    recorder.calls.append(f"{method}{args}")
                    return {"parse_from_file": True, "build_serialized_network": b"ENGINE"}.get(method, Obj())

                return call

        return Obj


@pytest.mark.parametrize("strongly_typed", [True, False])
def test_build_engine_calls_the_documented_api(tmp_path, strongly_typed: bool) -> None:
    trt = _Recorder(strongly_typed)
    profiles = {"x": ((1, 8), (32, 8), (64, 8))}
    engine = build_engine(trt, tmp_path / "m.onnx", profiles, opt.compile("tensorrt", workspace_mb=1), log=lambda _: None)
    assert engine == b"ENGINE"
    assert f"create_network({1 << 5 if strongly_typed else 0},)" in trt.calls
    assert f"parse_from_file('{tmp_path / 'm.onnx'}',)" in trt.calls
    assert "set_memory_pool_limit('WORKSPACE', 1048576)" in trt.calls
    assert "set_shape('x', (1, 8), (32, 8), (64, 8))" in trt.calls
    assert ("set_flag('FP16',)" in trt.calls) is not strongly_typed  # precision lives in the graph when typed


@pytest.mark.slow
def test_torch_compile_is_validated_measured_and_recorded(mlp_tag: str) -> None:
    result = optimize_model(mlp_tag, [opt.compile("torch")], 0.999, bench_budget_s=BENCH, log=None)
    saved = models.get(result.tag)
    assert saved.info.metadata["torch_compile"] == {"mode": None, "dynamic": True}
    assert result.report.steps[1].fidelity.passed and "compiled in" in result.report.steps[1].notes[0]
