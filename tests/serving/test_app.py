"""The served HTTP API of a real `pkg serve` process: every status code, IO kind, hook and endpoint."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import httpx
import pytest

from live_server import Server

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("full")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HOOK_LOG": str(tmp / "hooks.log")}
    srv = Server("full.py:Full", HERE / "services", [], env, tmp / "server.log")
    srv.hook_log = tmp / "hooks.log"
    srv.wait_ready()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def http(server: Server):
    with httpx.Client(base_url=server.url, timeout=10) as client:
        yield client


def test_predict_returns_the_product(http: httpx.Client) -> None:
    r = http.post("/predict", json={"x": [[1, 2, 3, 4], [0, 0, 0, 1]]})
    assert r.status_code == 200
    assert r.json() == [[10.0, 10.0], [1.0, 1.0]]


def test_struct_input_with_defaults_and_startup_hook(http: httpx.Client) -> None:
    r = http.post("/tag", json={"item": {"text": "hi"}})
    assert r.json() == {"text": "hi", "lang": "en", "count": 1, "started": True}
    r = http.post("/tag", json={"item": {"text": "salut", "lang": "fr"}, "count": 3})
    assert r.json()["lang"] == "fr" and r.json()["count"] == 3


def test_malformed_json_is_400(http: httpx.Client) -> None:
    for body in (b'{"item": {"text": "hi"', b"{bad", b'{"item": {"text": 1}'):
        r = http.post("/tag", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400, body
        assert "malformed JSON" in r.json()["error"]


def test_empty_body_names_the_missing_fields(http: httpx.Client) -> None:
    r = http.post("/tag", content=b"", headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert "'item'" in r.json()["error"]


@pytest.mark.parametrize(
    "body, field, words",
    [
        ({"item": {"text": 1}}, "$.item.text", "Expected `str`, got `int`"),
        ({}, "$.item", "missing required field `item`"),
        ({"item": {"text": "a"}, "count": "x"}, "$.count", "Expected `int`"),
        ({"item": {"text": "a"}, "extra": 1}, "$.extra", "unknown field `extra`"),
        ({"item": []}, "$.item", "Expected `object`, got `array`"),
    ],
)
def test_wrong_type_or_missing_field_is_422_with_the_path(http: httpx.Client, body, field, words) -> None:
    r = http.post("/tag", json=body)
    assert r.status_code == 422
    assert r.json()["field"] == field
    assert words in r.json()["error"]


@pytest.mark.parametrize(
    "x, words",
    [
        ([[1, 2, 3]], "shape (*, 4), got shape (1, 3)"),
        ([1, 2, 3, 4], "shape (*, 4), got shape (4,)"),
        ([[1, 2], [3]], "inhomogeneous"),
        ([["a", "b", "c", "d"]], "array of numbers"),
    ],
)
def test_array_shape_and_dtype_are_validated(http: httpx.Client, x, words) -> None:
    r = http.post("/predict", json={"x": x})
    assert r.status_code == 422
    assert r.json()["field"] == "$.x"
    assert words in r.json()["error"]


def test_array_is_cast_to_the_declared_dtype(http: httpx.Client) -> None:
    r = http.post("/predict", json={"x": [[1, 1, 1, 1]]})
    assert r.json() == [[4.0, 4.0]]


def test_unsupported_content_type_is_415(http: httpx.Client) -> None:
    r = http.post("/tag", content=b"text=hi", headers={"content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 415
    assert "application/json" in r.json()["error"]
    r = http.post("/tag", content=b"hi", headers={"content-type": "text/plain"})
    assert r.status_code == 415


def test_body_over_the_limit_is_413(http: httpx.Client) -> None:
    r = http.post("/raw", content=b"x" * 5000, headers={"content-type": "application/octet-stream"})
    assert r.status_code == 413
    assert "4096" in r.json()["error"]

    def chunks():
        for _ in range(10):
            yield b"y" * 1000

    r = http.post("/raw", content=chunks(), headers={"content-type": "application/octet-stream"})
    assert r.status_code == 413
    # the server keeps serving after refusing
    assert http.post("/raw", content=b"abc", headers={"content-type": "application/octet-stream"}).content == b"cba"


def test_unknown_route_is_404_and_wrong_method_405(http: httpx.Client) -> None:
    r = http.post("/nope", json={})
    assert r.status_code == 404 and "/nope" in r.json()["error"]
    r = http.get("/predict")
    assert r.status_code == 405
    assert r.headers["allow"] == "POST"
    assert "GET" in r.json()["error"]


def test_user_exception_is_500_with_error_id_in_body_and_log(server: Server, http: httpx.Client) -> None:
    r = http.post("/boom", json={"x": 1})
    assert r.status_code == 500
    error_id = r.json()["error_id"]
    assert re.fullmatch(r"[0-9a-f]{12}", error_id)
    assert "user code failed" not in r.text  # no internals leak to the client
    log = server.log()
    assert error_id in log and "RuntimeError: user code failed on purpose" in log
    assert http.post("/tag", json={"item": {"text": "still here"}}).status_code == 200


def test_timeout_is_504_and_server_keeps_serving(http: httpx.Client) -> None:
    r = http.post("/slow", json={"seconds": 5})
    assert r.status_code == 504
    assert "2 s" in r.json()["error"]
    r = http.post("/slow_sync", json={"seconds": 3})
    assert r.status_code == 504
    assert http.post("/slow", json={"seconds": 0.01}).json() == 0.01


def test_raw_bytes_body(http: httpx.Client) -> None:
    r = http.post("/raw", content=b"hello", headers={"content-type": "application/octet-stream"})
    assert r.status_code == 200
    assert r.content == b"olleh"
    assert r.headers["content-type"] == "application/octet-stream"
    # the same API also takes JSON with base64 bytes
    r = http.post("/raw", json={"data": "aGVsbG8="})
    assert r.content == b"olleh"


def test_multipart_file_upload(http: httpx.Client) -> None:
    r = http.post("/upload", files={"file": ("a.txt", b"12345", "text/plain")}, data={"note": "n1"})
    assert r.status_code == 200
    assert r.json() == {"name": "a.txt", "size": 5, "note": "n1", "type": "text/plain"}
    r = http.post("/upload", data={"note": "no file"}, files={"other": ("b", b"1")})
    assert r.status_code == 422


def test_composition_with_depends(http: httpx.Client) -> None:
    assert http.post("/composed", json={"x": 21}).json() == 42


def test_sync_and_async_generators_stream_server_sent_events(http: httpx.Client) -> None:
    with http.stream("POST", "/count", json={"n": 3}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    assert events == [{"i": 0}, {"i": 1}, {"i": 2}]
    # A generator annotated to yield str streams plain text, as BentoML does; other items stay events.
    with http.stream("POST", "/acount", json={"n": 2}) as r:
        assert r.headers["content-type"] == "text/plain; charset=utf-8"
        text = "".join(r.iter_text())
    assert text == "token-0token-1"


def test_health_metrics_and_docs(http: httpx.Client) -> None:
    assert http.get("/livez").status_code == 200
    assert http.get("/readyz").status_code == 200
    http.post("/tag", json={"item": {"text": "m"}})
    metrics = http.get("/metrics").text
    assert re.search(r'bento_like_requests_total\{api="tag",status="200"\} \d+', metrics)
    assert 'bento_like_request_duration_seconds_bucket{api="tag",status="200",le="+Inf"}' in metrics
    assert "bento_like_requests_in_flight" in metrics
    spec = http.get("/openapi.json").json()
    op = spec["paths"]["/predict"]["post"]
    assert op["x-bento-api"]["inputs"] == {"x": "ndarray"}
    x_schema = spec["components"]["schemas"]["predict_input"]["properties"]["x"]
    assert x_schema["x-dtype"] == "float32" and x_schema["x-shape"] == [-1, 4]
    assert "/tag" in spec["paths"] and "422" in spec["paths"]["/tag"]["post"]["responses"]
    html = http.get("/docs").text
    assert "/docs/static/swagger-ui-bundle.js" in html and "http" not in html.split("<script")[1].split("src=")[1][:5]
    assert http.get("/docs/static/swagger-ui-bundle.js").status_code == 200


def test_bytes_parameter_takes_a_multipart_file_part(start_server) -> None:
    server = start_server("full.py:Uploads", cwd=HERE / "services")
    r = httpx.post(server.url + "/size", files={"blob": ("b.bin", b"123456")}, data={"label": "six"})
    assert r.status_code == 200
    assert r.json() == {"size": 6, "label": "six"}


def test_an_input_type_that_cannot_be_served_fails_at_load_naming_the_api(tmp_path: Path) -> None:
    import subprocess
    import sys

    (tmp_path / "odd.py").write_text(
        "import bento_like as bl\n\nclass Thing:\n    pass\n\n"
        "@bl.service\nclass S:\n    @bl.api\n    def f(self, t: Thing) -> int:\n        return 1\n"
    )
    r = subprocess.run([sys.executable, "-m", "bento_like", "serve", "odd.py:S", "--port", "1", "--workers", "2"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert "API 'f': an input type cannot be served" in r.stderr
