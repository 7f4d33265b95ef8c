"""export("onnx"): the dynamo exporter, a dynamic batch axis, and what it refuses."""

from __future__ import annotations

import numpy as np
import pytest

import bento_like.models as models
import bento_like.sdk.opt as opt
from bento_like.builders.optimize import PassError, optimize_model
from optimize_testlib import BENCH


def test_mlp_exports_with_a_dynamic_batch_axis(mlp_tag: str) -> None:
    result = optimize_model(mlp_tag, [opt.export("onnx")], opt.Gate(metric="max_abs", max=1e-4), bench_budget_s=BENCH, log=None)
    saved = models.get(result.tag)
    assert saved.info.framework == "onnx" and saved.name == "mlp-onnx"
    assert saved.info.signatures[0].inputs[0].shape == [-1, 32]
    session = saved.load()
    for batch in (1, 5, 33):
        (out,) = session.run(None, {"x": np.zeros((batch, 32), np.float32)})
        assert out.shape == (batch, 10)
    step = result.report.steps[1]
    assert step.fidelity.max_abs < 1e-4 and step.extra["dynamic_axes"] == {"x": [0]}


def test_inputs_sharing_a_sequence_axis_keep_both_axes_dynamic(encoder_tag: str) -> None:
    result = optimize_model(encoder_tag, ["onnx"], 0.999, bench_budget_s=BENCH, log=None)
    session = models.get(result.tag).load()
    assert [i.shape[:2] for i in session.get_inputs()][0][0] != 2  # not fixed to the example's batch
    for batch, seq in ((1, 3), (4, 20)):
        ids = np.random.default_rng(0).integers(0, 100, (batch, seq))
        (out,) = session.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids)})
        assert out.shape == (batch, 32)


def test_export_refuses_a_model_that_is_not_pytorch(mlp_tag: str) -> None:
    onnx_tag = optimize_model(mlp_tag, ["onnx"], bench_budget_s=BENCH, log=None).tag
    with pytest.raises(PassError, match="is a onnx model; export converts PyTorch models to ONNX"):
        optimize_model(onnx_tag, ["onnx"], bench_budget_s=BENCH, log=None)
