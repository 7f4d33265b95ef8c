"""bento_like.sdk.opt: pass declarations are data, validated where they are written."""

from __future__ import annotations

import sys

import pytest

import bento_like.sdk.opt as opt


def test_declarations_are_frozen_data_and_import_no_framework() -> None:
    spec = opt.quantize("int8", auto=True)
    assert spec == opt.Quantize(dtype="int8", method="dynamic", auto=True)
    with pytest.raises(AttributeError):
        spec.auto = False  # type: ignore[misc]
    assert opt.quantize("int4").method == "weight_only"
    import subprocess

    code = "import bento_like.sdk.opt, sys; print(any(m in sys.modules for m in ('torch', 'onnx', 'onnxruntime')))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: opt.quantize("int4", method="dynamic"), "dtype 'int4' takes method weight_only"),
        (lambda: opt.quantize("fp16", auto=True), "auto=True searches int8"),
        (lambda: opt.prune(1.5), r"in \(0, 1\)"),
        (lambda: opt.compile(opt_batch=128, max_batch=64), "opt_batch <= max_batch"),
        (lambda: opt.distill(None), "give data="),
    ],
)
def test_bad_combinations_are_refused_with_the_reason(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()


def test_passes_from_config_mappings_and_shorthands() -> None:
    specs = opt.passes(["onnx", {"pass": "quantize", "dtype": "int8", "auto": True}, opt.prune(0.3)])
    assert specs == [opt.Export(), opt.Quantize(auto=True), opt.Prune(amount=0.3)]
    assert opt.passes(opt.export()) == [opt.Export()]
    with pytest.raises(ValueError, match=r"optimize\[0\]: unknown pass 'int3'"):
        opt.passes(["int3"])
    with pytest.raises(ValueError, match=r"optimize\[0\]: Expected `bool`, got `str` - at `\$.auto`"):
        opt.passes([{"pass": "quantize", "auto": "yes"}])
    with pytest.raises(ValueError, match=r"Invalid enum value 'jpeg' - at `\$.format`"):
        opt.passes([{"pass": "export", "format": "jpeg"}])


def test_gate_from_number_mapping_and_defaults() -> None:
    assert opt.gate(0.98) == opt.Gate(metric="cosine", min=0.98)
    assert opt.gate({"metric": "max_abs", "max": 0.1, "data": "calib.npz"}).data == "calib.npz"
    assert opt.bound(opt.Gate()) == ("min", 0.99)
    assert opt.bound(opt.Gate(metric="max_abs")) == ("max", 0.01)
    with pytest.raises(ValueError, match="needs min= or max="):
        opt.gate(opt.Gate(metric=lambda a, b: 1.0))
    with pytest.raises(ValueError, match="not one of cosine"):
        opt.gate({"metric": "psnr"})
    assert opt.gate({"metric": "mypkg.metrics:score", "min": 3}).metric == "mypkg.metrics:score"
