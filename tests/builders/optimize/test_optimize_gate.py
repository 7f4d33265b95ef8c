"""Fidelity metrics, the gate's verdict, and where validation inputs come from."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import bento_like.models as models
import bento_like.sdk.opt as opt
from bento_like.builders.optimize import OptimizeError
from bento_like.builders.optimize.gate import compare, cosine, describe, load_npz, sample_inputs, validation_inputs


def test_metrics_on_known_values() -> None:
    reference = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]])
    candidate = np.array([[1.0, 0.0], [2.0, 0.0], [3.0, 4.5]])
    cos = cosine(reference, candidate)
    assert cos[0] == pytest.approx(1.0) and cos[1] == pytest.approx(0.0)
    fid = compare([reference], [candidate], opt.Gate(metric="argmax", min=0.5), 0)
    assert fid.argmax == pytest.approx(2 / 3) and fid.max_abs == pytest.approx(2.0)
    assert fid.passed and fid.value == pytest.approx(2 / 3)
    worst = compare([reference], [candidate], opt.Gate(metric="cosine", reduce="min", min=0.5), 0)
    assert worst.value == pytest.approx(0.0) and not worst.passed
    assert cosine(np.zeros((1, 3)), np.zeros((1, 3)))[0] == 1.0  # both zero: identical


def test_failure_says_what_failed_and_by_how_much() -> None:
    reference = np.ones((4, 8))
    fid = compare([reference], [reference + 0.5], opt.Gate(metric="max_abs", max=0.1), 0)
    assert not fid.passed
    assert describe(fid) == "max_abs 0.5 > max 0.1 (over by 0.4) on 4 inputs"
    nan = compare([reference], [reference * np.nan], opt.Gate(), 0)
    assert not nan.passed and nan.value == 0.0


def test_user_metric_function_and_import_path() -> None:
    def mean_shift(reference: list[np.ndarray], candidate: list[np.ndarray]) -> float:
        return float(np.abs(reference[0].mean() - candidate[0].mean()))

    fid = compare([np.ones((2, 2))], [np.ones((2, 2)) * 1.2], opt.Gate(metric=mean_shift, max=0.1), 0)
    assert fid.metric == "mean_shift" and not fid.passed and fid.value == pytest.approx(0.2)
    by_path = compare([np.ones((2, 2))], [np.ones((2, 2)) * 3], opt.Gate(metric="optimize_testlib:mean_abs_diff", max=1), 0)
    assert by_path.metric == "optimize_testlib:mean_abs_diff" and by_path.value == 2.0 and not by_path.passed


def test_validation_inputs_from_npz_keyed_by_input_name(tmp_path: Path, encoder_tag: str) -> None:
    model = models.get(encoder_tag)
    ids = np.random.default_rng(0).integers(0, 100, (5, 7))
    np.savez(tmp_path / "val.npz", input_ids=ids, attention_mask=np.ones_like(ids))
    inputs, where = validation_inputs(model, opt.Gate(data="val.npz"), ["input_ids", "attention_mask"], base_dir=tmp_path)
    assert where == "5 rows from val.npz" and inputs["input_ids"].shape == (5, 7)
    np.savez(tmp_path / "bad.npz", input_ids=ids)
    with pytest.raises(OptimizeError, match="no array for input\\(s\\) attention_mask; it holds input_ids"):
        load_npz(tmp_path / "bad.npz", ["input_ids", "attention_mask"])


def test_validation_inputs_drawn_from_the_recorded_schema(encoder_tag: str) -> None:
    model = models.get(encoder_tag)
    inputs, where = validation_inputs(model, opt.Gate(samples=12), ["input_ids", "attention_mask"])
    assert where == "12 rows drawn from the input schema"
    assert inputs["input_ids"].shape == (12, 16) and inputs["input_ids"].dtype == np.int64
    assert (inputs["attention_mask"] == 1).all()
    specs = model.info.signatures[0].inputs
    assert np.array_equal(sample_inputs(specs, 3, seed=1)["input_ids"], sample_inputs(specs, 3, seed=1)["input_ids"])


def test_no_schema_and_no_data_is_an_error(home: Path) -> None:
    from optimize_testlib import MLP

    tag = models.save("bare", MLP().eval())
    with pytest.raises(OptimizeError, match="records no input schema .* give validation inputs as a .npz"):
        validation_inputs(models.get(tag), opt.Gate(), ["x"])
