"""Warm-up runs only where an API asks for it (``@bl.api(warmup=...)``), within a time limit; a warm-up that
fails or runs past its limit keeps the server from turning ready and says why."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated, Iterator

import httpx
import numpy as np
import pytest

import bento_like as bl

SERVICES = Path(__file__).parent / "services"
ROW = Annotated[np.ndarray, bl.Shape(-1, 2), bl.DType("float32")]


def calls(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def wait_failed(server, timeout: float = 60.0) -> httpx.Response:
    """The /readyz answer once the server has given up starting (it never turns ready)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            r = httpx.get(server.url + "/readyz", timeout=2)
        except httpx.TransportError:
            time.sleep(0.1)
            continue
        assert r.status_code == 503, r.text
        if r.json()["state"] == "failed":
            return r
        time.sleep(0.1)
    raise AssertionError(f"the server never reported a failed start:\n{server.log()}")


def test_no_api_is_called_at_startup_unless_it_asks(start_server, tmp_path: Path) -> None:
    log = tmp_path / "calls.log"
    server = start_server("warmup.py:Unasked", cwd=SERVICES, env={"CALL_LOG": str(log)})
    assert calls(log) == []  # not the defaults-only APIs, not the typed ones, not the batchable one
    r = httpx.post(server.url + "/batched", json={"x": [[1, 2]]}, timeout=30)
    assert r.status_code == 200 and r.json() == [[2.0, 4.0]]  # an un-warmed batchable API serves
    assert calls(log) == ["batched 1"]


def test_each_form_of_warm_up_runs_once_with_its_input(start_server, tmp_path: Path) -> None:
    log = tmp_path / "calls.log"
    server = start_server("warmup.py:Asked", cwd=SERVICES, env={"CALL_LOG": str(log)})
    seen = calls(log)
    assert "zeros (1, 2) float32 0.0" in seen and "example hello 2" in seen
    assert not any(line.startswith("side_effect") for line in seen)
    # the batchable API: each instance once, then every anchor size (1, 2, 4) best of 3, from the example's
    # first item
    assert [line for line in seen if line.startswith("batched")] == (
        ["batched 1 1.0"] * 4 + ["batched 2 1.0"] * 3 + ["batched 4 1.0"] * 3
    )
    assert "API 'batched' warmed up: batch 1:" in server.log()
    assert httpx.post(server.url + "/example", json={"text": "a"}, timeout=10).text == "aa"


def test_a_failed_warm_up_keeps_the_server_unready_with_the_reason(start_server) -> None:
    server = start_server("warmup.py:Fails", cwd=SERVICES, ready=False)
    r = wait_failed(server)
    error = r.json()["error"]
    assert "warm-up of API 'predict' failed" in error and "ValueError: this model refuses zeros" in error
    api = httpx.post(server.url + "/predict", json={"x": [[1, 2]]}, timeout=10)
    assert api.status_code == 503 and "this model refuses zeros" in api.json()["error"]
    assert "warm-up of API 'predict' failed" in server.log()


def test_a_warm_up_past_its_time_limit_keeps_the_server_unready(start_server) -> None:
    server = start_server("warmup.py:Hangs", cwd=SERVICES, ready=False)
    r = wait_failed(server)
    assert "warm-up of API 'predict' did not finish within its warmup_timeout of 1 s" in r.json()["error"]


def _save_onnx_mlp() -> None:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    bl.models.save("mlp", model)


@pytest.fixture
def onnx_home(home: Path) -> Iterator[Path]:
    _save_onnx_mlp()
    yield home


def test_warm_up_input_from_the_model_signature(start_server, onnx_home: Path, tmp_path: Path) -> None:
    log = tmp_path / "calls.log"
    start_server("warmup.py:OnnxRun", cwd=SERVICES, env={"CALL_LOG": str(log)})
    assert calls(log) == ["onnx (1, 4) float32"]


def test_a_model_replaced_by_one_the_code_cannot_call_fails_the_warm_up(start_server, onnx_home: Path) -> None:
    # `pkg optimize` replaced mlp:latest (a torch module) with an ONNX model: the server must not say ready
    # and then fail every request.
    server = start_server("warmup.py:TorchStyle", cwd=SERVICES, ready=False)
    error = wait_failed(server).json()["error"]
    assert "warm-up of API 'predict' failed: TypeError" in error and "InferenceSession" in error


def test_warm_up_declarations_are_checked() -> None:
    def f(self, text: str, n: int = 1) -> str: ...

    def stream(self, n: int = 1) -> Iterator[int]:
        yield n

    with pytest.raises(bl.ServiceDefinitionError, match=r"API 'f': warmup names 'txt', which is not a parameter"):
        bl.api(warmup={"txt": "a"})(f)
    with pytest.raises(bl.ServiceDefinitionError, match=r"API 'f': warmup lacks the required input\(s\) 'text'"):
        bl.api(warmup={"n": 2})(f)
    with pytest.raises(bl.ServiceDefinitionError, match="API 'f': warmup must be True, False or an example input"):
        bl.api(warmup="yes")(f)
    with pytest.raises(bl.ServiceDefinitionError, match=r"API 'f': warmup_timeout must be seconds > 0, got 0"):
        bl.api(warmup=True, warmup_timeout=0)(f)
    with pytest.raises(bl.ServiceDefinitionError, match="API 'stream' streams .* cannot be warmed up"):
        bl.api(warmup=True)(stream)
    assert bl.api(warmup={"text": "a"})(f).__bento_api__.warmup == {"text": "a"}
    assert bl.api(f).__bento_api__.warmup is False  # nothing is called unless asked


def test_a_warm_up_input_the_api_cannot_take_stops_serve_with_one_line(tmp_path: Path) -> None:
    (tmp_path / "bad.py").write_text(
        "from typing import Annotated\nimport numpy as np\nimport bento_like as bl\n\n"
        "@bl.service\nclass S:\n"
        "    @bl.api(warmup={'x': 'abc'})\n"
        "    def f(self, x: Annotated[np.ndarray, bl.Shape(-1, 2)]) -> int:\n        return 1\n\n"
        "@bl.service\nclass T:\n"
        "    @bl.api(warmup=True)\n"
        "    def g(self, text: str) -> str:\n        return text\n"
    )
    for target, expected in [
        ("bad.py:S", "Error: API 'f': its warmup input is not one it accepts: "),
        ("bad.py:T", "Error: API 'g': warmup=True cannot make up input 'text'"),
    ]:
        r = subprocess.run([sys.executable, "-m", "bento_like", "serve", target, "--port", "1"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert r.returncode != 0
        assert "Traceback" not in r.stderr
        lines = [line for line in r.stderr.splitlines() if line.startswith("Error: ")]
        assert len(lines) == 1 and lines[0].startswith(expected), r.stderr
