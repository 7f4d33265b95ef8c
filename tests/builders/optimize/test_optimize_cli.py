"""`pkg optimize`: the same passes from the command line; exit 3 when the gate fails."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from click.testing import CliRunner

import bento_like.models as models
from bento_like.cli.optimize import optimize_command


def _run(*args: str):
    return CliRunner().invoke(optimize_command, [*args, "--bench-seconds", "0.01"], catch_exceptions=False)


def test_export_and_quantize_save_a_new_version(mlp_tag: str, tmp_path: Path) -> None:
    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(0).standard_normal((16, 32)).astype(np.float32))
    result = _run(mlp_tag, "--export", "onnx", "--quantize", "int8", "--gate", "cosine:0.99", "--data", str(tmp_path / "calib.npz"))
    assert result.exit_code == 0, result.output
    assert "quantize(int8, dynamic, per-channel)" in result.output and "items/s" in result.output
    saved = models.list("mlp-onnx-int8")
    assert len(saved) == 1 and f"saved {saved[0].tag}; mlp:latest is unchanged" in result.output
    # what the user's tag means did not change: their service keeps loading the model it was written for
    assert [m.tag for m in models.list("mlp")] == [mlp_tag] and models.get("mlp:latest").info.framework == "torch"
    again = _run(mlp_tag, "--export", "onnx", "--quantize", "int8", "--gate", "cosine:0.99", "--data", str(tmp_path / "calib.npz"))
    assert again.exit_code == 0, again.output  # the same command works twice (it used to find an ONNX mlp:latest)
    named = _run(mlp_tag, "--export", "onnx", "--name", "mlp", "--gate", "cosine:0.99")
    assert named.exit_code == 0 and models.get("mlp:latest").info.framework == "onnx", named.output


def test_gate_failure_exits_3_and_says_by_how_much(mlp_tag: str) -> None:
    result = _run(mlp_tag, "--prune", "0.9", "--gate", "argmax:0.99")
    assert result.exit_code == 3
    assert "Error: quality gate failed for" in result.output and "(short by" in result.output
    assert "FAIL argmax=" in result.output


def test_json_output_and_auto(mlp_tag: str) -> None:
    result = _run(mlp_tag, "--export", "onnx", "--auto", "--gate", "cosine-min:0.9", "-o", "json")
    assert result.exit_code == 0, result.output
    document = json.loads(result.output)
    assert document["passed"] and document["tag"].startswith("mlp-onnx-auto:")
    assert document["report"]["gate"]["reduce"] == "min" and len(document["report"]["steps"][-1]["variants"]) >= 4


def test_usage_errors(mlp_tag: str) -> None:
    assert "give at least one pass" in _run(mlp_tag).output
    bad = _run(mlp_tag, "--export", "onnx", "--gate", "psnr:3")
    assert bad.exit_code == 2 and "unknown metric 'psnr'" in bad.output
    assert "dtype 'int4' takes method weight_only" in _run(mlp_tag, "--quantize", "int4", "--method", "dynamic").output
    unavailable = _run(mlp_tag, "--export", "onnx", "--compile", "tensorrt")
    assert unavailable.exit_code == 1 and "needs an NVIDIA GPU" in unavailable.output
    missing = _run("nope:latest", "--export", "onnx")
    assert missing.exit_code == 1 and "no model 'nope:latest'" in missing.output
