"""The Open Inference Protocol (KServe v2) routes of a real `pkg serve` process, over HTTP and through tritonclient."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import struct
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from live_server import Server

SERVICES = Path(__file__).parent / "services"
TARGET = "tensor_models.py:TensorModels"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    srv = Server(TARGET, SERVICES, [], {**os.environ, "PYTHONUNBUFFERED": "1"},
                 tmp_path_factory.mktemp("v2") / "server.log")
    srv.wait_ready()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def http(server: Server):
    with httpx.Client(base_url=server.url, timeout=10) as client:
        yield client


def infer(http: httpx.Client, model: str, inputs: list[dict], **extra) -> httpx.Response:
    return http.post(f"/v2/models/{model}/infer", json={"inputs": inputs, **extra})


def binary_request(header: dict, *tails: bytes) -> tuple[bytes, dict[str, str]]:
    head = json.dumps(header).encode()
    return head + b"".join(tails), {"Inference-Header-Content-Length": str(len(head))}


def split_binary_response(r: httpx.Response) -> tuple[dict, dict[str, bytes]]:
    """The response's JSON and each binary output's bytes, by name."""
    length = int(r.headers["inference-header-content-length"])
    meta, offset, raw = json.loads(r.content[:length]), length, {}
    for out in meta["outputs"]:
        size = out.get("parameters", {}).get("binary_data_size")
        if size is not None:
            raw[out["name"]] = r.content[offset : offset + size]
            offset += size
    assert offset == len(r.content)
    return meta, raw


def test_server_metadata_and_health(http: httpx.Client) -> None:
    assert http.get("/v2/health/live").status_code == 200
    assert http.get("/v2/health/ready").status_code == 200
    meta = http.get("/v2").json()
    assert meta["name"] == "tensor_models" and meta["extensions"] == ["binary_tensor_data"] and meta["version"]


def test_model_metadata_derives_from_the_signature(http: httpx.Client) -> None:
    assert http.get("/v2/models/scale").json() == {
        "name": "scale",
        "versions": ["1"],
        "platform": "bento_like",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 3]}, {"name": "k", "datatype": "FP32", "shape": [-1]}],
        "outputs": [{"name": "output", "datatype": "FP32", "shape": [-1]}],
    }
    square = http.get("/v2/models/square/versions/1").json()  # batchable: the batch dimension is -1
    assert square["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 2]}]
    assert square["outputs"] == [{"name": "output", "datatype": "FP32", "shape": [-1, 2]}]
    minmax = http.get("/v2/models/minmax").json()
    assert [(o["name"], o["datatype"]) for o in minmax["outputs"]] == [("low", "INT32"), ("high", "INT32"), ("mean", "FP64")]
    shout = http.get("/v2/models/shout").json()
    assert shout["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [1]}, {"name": "times", "datatype": "INT64", "shape": [-1]}]
    assert shout["outputs"][0]["datatype"] == "BYTES"
    assert http.get("/v2/models/scale/ready").status_code == 200
    assert http.get("/v2/models/scale/versions/1/ready").status_code == 200


def test_apis_that_are_not_tensor_shaped_are_not_models(http: httpx.Client) -> None:
    for path in ("/v2/models/label", "/v2/models/sizes", "/v2/models/label/ready", "/v2/models/scale/versions/2"):
        r = http.get(path)
        assert r.status_code == 404, path
        assert "scale" in r.json()["error"]  # the error lists the models there are
    assert http.post("/v2/models/label/infer", json={"inputs": []}).status_code == 404


def test_json_infer_with_nested_and_flat_data(http: httpx.Client) -> None:
    x = {"name": "x", "shape": [2, 3], "datatype": "FP32", "data": [[1, 2, 3], [4, 5, 6]]}
    k = {"name": "k", "shape": [1], "datatype": "FP32", "data": [2]}
    r = infer(http, "scale", [x, k], id="req-1")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/json"
    assert r.json() == {
        "model_name": "scale",
        "model_version": "1",
        "id": "req-1",
        "outputs": [{"name": "output", "datatype": "FP32", "shape": [2, 3], "data": [2, 4, 6, 8, 10, 12]}],
    }
    flat = http.post("/v2/models/scale/versions/1/infer", json={"inputs": [{**x, "data": [1, 2, 3, 4, 5, 6]}, k]})
    assert flat.json()["outputs"] == r.json()["outputs"] and "id" not in flat.json()


def test_binary_inputs_and_outputs(http: httpx.Client) -> None:
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    k = np.array([3], dtype=np.float32)
    body, headers = binary_request(
        {
            "inputs": [
                {"name": "x", "shape": [2, 3], "datatype": "FP32", "parameters": {"binary_data_size": x.nbytes}},
                {"name": "k", "shape": [1], "datatype": "FP32", "parameters": {"binary_data_size": k.nbytes}},
            ],
            "outputs": [{"name": "output", "parameters": {"binary_data": True}}],
        },
        x.astype("<f4").tobytes(),
        k.astype("<f4").tobytes(),
    )
    r = http.post("/v2/models/scale/infer", content=body, headers=headers)
    assert r.status_code == 200, r.text
    meta, raw = split_binary_response(r)
    assert meta["outputs"][0]["parameters"] == {"binary_data_size": 24} and "data" not in meta["outputs"][0]
    np.testing.assert_array_equal(np.frombuffer(raw["output"], "<f4").reshape(meta["outputs"][0]["shape"]), x * 3)


def test_request_level_binary_output_and_a_json_exception(http: httpx.Client) -> None:
    x = np.array([[3, -1, 7], [0, 2, 2]], dtype=np.int32)
    body, headers = binary_request(
        {
            "parameters": {"binary_data_output": True},
            "inputs": [{"name": "x", "shape": [2, 3], "datatype": "INT32", "parameters": {"binary_data_size": x.nbytes}}],
            "outputs": [{"name": "mean", "parameters": {"binary_data": False}}, {"name": "high"}],
        },
        x.astype("<i4").tobytes(),
    )
    r = http.post("/v2/models/minmax/infer", content=body, headers=headers)
    assert r.status_code == 200, r.text
    meta, raw = split_binary_response(r)
    assert [o["name"] for o in meta["outputs"]] == ["mean", "high"]  # only the requested outputs, in that order
    assert meta["outputs"][0]["data"] == [3.0, 4 / 3] and meta["outputs"][0]["datatype"] == "FP64"
    np.testing.assert_array_equal(np.frombuffer(raw["high"], "<i4"), [7, 2])


def test_bytes_tensors_in_json_and_binary_form(http: httpx.Client) -> None:
    times = {"name": "times", "shape": [1], "datatype": "INT64", "data": [2]}
    r = infer(http, "shout", [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["héllo"]}, times])
    assert r.status_code == 200, r.text
    assert r.json()["outputs"] == [{"name": "output", "datatype": "BYTES", "shape": [2], "data": ["HÉLLO", "HÉLLO"]}]
    word = "añb".encode()
    element = struct.pack("<I", len(word)) + word  # BYTES: a 4-byte little-endian length, then the bytes
    body, headers = binary_request(
        {
            "inputs": [
                {"name": "text", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": len(element)}},
                times,
            ],
            "parameters": {"binary_data_output": True},
        },
        element,
    )
    r = http.post("/v2/models/shout/infer", content=body, headers=headers)
    assert r.status_code == 200, r.text
    _, raw = split_binary_response(r)
    upper = "AÑB".encode()
    assert raw["output"] == (struct.pack("<I", len(upper)) + upper) * 2


@pytest.mark.parametrize(
    "model, inputs, words",
    [
        ("scale", [{"name": "x", "shape": [2, 3], "datatype": "FP32", "data": [1, 2, 3]}],
         "input tensor 'x': shape [2, 3] needs 6 elements, data has 3"),
        ("scale", [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]},
                   {"name": "k", "shape": [1], "datatype": "FP32", "data": [1]}],
         "input tensor 'x': shape [1, 4] does not match the model's [-1, 3]"),
        ("scale", [{"name": "x", "shape": [1, 3], "datatype": "FP64", "data": [1, 2, 3]}],
         "input tensor 'x': datatype FP64 does not match the model's FP32"),
        ("scale", [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}],
         "missing input tensor(s) 'k'"),
        ("scale", [{"name": "nope", "shape": [1], "datatype": "FP32", "data": [1]}], "input tensor 'nope' is not an input"),
        ("scale", [{"name": "x", "shape": [1, 3], "datatype": "BF16", "data": [1, 2, 3]}],
         "input tensor 'x': datatype 'BF16' is not supported"),
        ("scale", [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": ["a", "b", "c"]}],
         "input tensor 'x': data is not FP32: it holds strings"),
        ("minmax", [{"name": "x", "shape": [2], "datatype": "INT32", "data": [1.5, 2]}],
         "input tensor 'x': data is not INT32: it holds floating-point numbers"),
        ("slow", [{"name": "x", "shape": [2], "datatype": "UINT8", "data": [300, 2]}],
         "input tensor 'x': data is out of the range of UINT8"),
        ("slow", [{"name": "x", "shape": [1], "datatype": "BYTES", "data": ["a"]}],
         "input tensor 'x': model 'slow' takes numbers, not BYTES"),
        ("shout", [{"name": "text", "shape": [2], "datatype": "BYTES", "data": ["a", "b"]}],
         "input tensor 'text': the model takes one BYTES element, got shape [2]"),
        ("slow", [{"name": "x", "shape": [1], "datatype": "FP32", "parameters": {"binary_data_size": 4}}],
         "input tensor 'x': binary_data_size 4 runs past"),
    ],
)
def test_bad_tensors_are_400_naming_the_tensor(http: httpx.Client, model: str, inputs: list, words: str) -> None:
    r = infer(http, model, inputs)
    assert r.status_code == 400, r.text
    assert words in r.json()["error"]


def test_binary_data_that_does_not_fit_its_shape_is_400(http: httpx.Client) -> None:
    body, headers = binary_request(
        {"inputs": [{"name": "x", "shape": [3], "datatype": "FP32", "parameters": {"binary_data_size": 8}}]}, b"\0" * 8
    )
    r = http.post("/v2/models/slow/infer", content=body, headers=headers)
    assert r.status_code == 400 and "input tensor 'x': 8 bytes do not hold shape [3] of FP32" in r.json()["error"]
    body, headers = binary_request({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}]}, b"\0" * 4)
    r = http.post("/v2/models/slow/infer", content=body, headers=headers)
    assert r.status_code == 400 and "4 bytes of binary data follow the JSON but no input claims them" in r.json()["error"]


@pytest.mark.parametrize(
    "model, inputs, words",
    [
        ("slow", [{"name": "x", "shape": [0, 2**62], "datatype": "FP32", "data": []}],
         "input tensor 'x': shape [0, 4611686018427387904] is too large for an array"),
        ("slow", [{"name": "x", "shape": [0, 2**64 - 1], "datatype": "FP32", "data": []}],
         "input tensor 'x': shape [0, 18446744073709551615] is too large for an array"),
        ("slow", [{"name": "x", "shape": [1] * 65, "datatype": "FP32", "data": [1]}],
         "input tensor 'x': shape [1, 1, 1, 1"),
    ],
    ids=["zero-by-huge", "beyond-int64", "65-dimensions"],
)
def test_shapes_no_array_can_have_are_400_without_a_traceback(
    server: Server, http: httpx.Client, model: str, inputs: list, words: str
) -> None:
    before = server.log().count("Traceback")
    r = infer(http, model, inputs)
    assert r.status_code == 400, r.text
    assert words in r.json()["error"]
    assert server.log().count("Traceback") == before


def test_data_nested_too_deeply_is_400_without_a_traceback(server: Server, http: httpx.Client) -> None:
    before = server.log().count("Traceback")
    for depth in (950, 5000):
        for datatype, model in (("FP32", "slow"), ("BYTES", "shout")):
            data = "[" * depth + ('"a"' if datatype == "BYTES" else "1") + "]" * depth
            body = '{"inputs": [{"name": "%s", "shape": [1], "datatype": "%s", "data": %s}]}' % (
                "text" if model == "shout" else "x", datatype, data)
            r = http.post(f"/v2/models/{model}/infer", content=body, headers={"content-type": "application/json"})
            assert r.status_code == 400, (depth, datatype, r.text)
    assert server.log().count("Traceback") == before


def test_an_output_json_cannot_carry_is_an_error_naming_it_and_travels_as_binary_data(http: httpx.Client) -> None:
    x = {"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1e38, 1, 2]}
    k = {"name": "k", "shape": [1], "datatype": "FP32", "data": [1e10]}
    r = infer(http, "scale", [x, k])
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert "output 'output'" in error and "inf" in error and "binary_data" in error, error
    r = infer(http, "scale", [x, k], outputs=[{"name": "output", "parameters": {"binary_data": True}}])
    assert r.status_code == 200, r.text
    _, raw = split_binary_response(r)
    assert np.frombuffer(raw["output"], dtype="<f4").tolist() == [float("inf"), 1e10, 2e10]


def test_bad_requests(http: httpx.Client) -> None:
    assert infer(http, "nope", []).status_code == 404
    r = http.post("/v2/models/slow/infer", content=b"{bad", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "malformed JSON" in r.json()["error"]
    r = http.post("/v2/models/slow/infer", json={"inputs": [{"name": "x", "shape": [1, "a"], "datatype": "FP32"}]})
    assert r.status_code == 400 and "$.inputs[0].shape[1]" in r.json()["error"]
    x = {"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}
    r = infer(http, "slow", [x], outputs=[{"name": "nope"}])  # refused before the model runs
    assert r.status_code == 400 and "model 'slow' has no output 'nope'" in r.json()["error"]
    r = infer(http, "slow", [x], parameters={"binary_data_output": "yes"})
    assert r.status_code == 400 and "binary_data_output must be true or false" in r.json()["error"]


@pytest.mark.parametrize(
    ("values", "words"),
    [
        ([1, 2**40], "got 1099511627776 outside its range [-2147483648, 2147483647]"),
        ([1.5, 2], "got float64 values that are not whole numbers"),
    ],
)
def test_native_route_refuses_casts_that_change_values(http: httpx.Client, values: list, words: str) -> None:
    r = http.post("/minmax", json={"x": values})
    assert r.status_code == 422, r.text
    assert words in r.text and "$.x" in r.text
    ok = http.post("/minmax", json={"x": [3.0, -7]})  # whole floats and in-range ints are the same numbers
    assert ok.status_code == 200, ok.text
    assert ok.json() == [-7, 3, -2.0]  # MinMax(low, high, mean)


def test_native_route_refuses_floats_beyond_float32(http: httpx.Client) -> None:
    r = http.post("/scale", json={"x": [[1e300, 1, 2]], "k": [1.0]})
    assert r.status_code == 422, r.text
    assert "Expected an array of float32, got values beyond its largest finite value 3.40282e+38" in r.text
    assert r.json()["field"] == "$.x"


def test_deadline_is_the_native_routes(http: httpx.Client) -> None:
    r = http.post("/v2/models/slow/infer", json={"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}]},
                  headers={"X-Request-Timeout": "0.2"})
    assert r.status_code == 504 and "deadline of 0.2 s" in r.json()["error"]


def test_concurrent_v2_requests_are_batched_and_each_gets_its_rows(server: Server, http: httpx.Client) -> None:
    before = len(http.post("/sizes", json={}).json())

    async def one(client: httpx.AsyncClient, i: int) -> list[float]:
        rows = [[i, i + 1], [-i, 0.5]] if i % 3 == 0 else [[i, i + 1]]  # requests of 1 and 2 rows
        body = {"inputs": [{"name": "x", "shape": [len(rows), 2], "datatype": "FP32", "data": rows}]}
        r = await client.post("/v2/models/square/infer", json=body)
        assert r.status_code == 200, r.text
        out = r.json()["outputs"][0]
        assert out["shape"] == [len(rows), 2]
        return out["data"]

    async def run() -> list[list[float]]:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            return await asyncio.gather(*(one(client, i) for i in range(24)))

    results = asyncio.run(run())
    for i, data in enumerate(results):
        rows = [[i, i + 1], [-i, 0.5]] if i % 3 == 0 else [[i, i + 1]]
        assert data == (np.square(rows).reshape(-1)).tolist()
    sizes = http.post("/sizes", json={}).json()[before:]
    assert sum(sizes) == 24 + 8 and max(sizes) > 2, sizes
    assert 'bento_like_requests_total{api="square",status="200"}' in http.get("/metrics").text


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_official_tritonclient(server: Server, binary: bool) -> None:
    httpclient = pytest.importorskip("tritonclient.http")
    client = httpclient.InferenceServerClient(server.url.removeprefix("http://"))
    try:
        assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("scale")
        assert not client.is_model_ready("label")
        meta = client.get_model_metadata("scale")
        assert [(i["name"], i["datatype"]) for i in meta["inputs"]] == [("x", "FP32"), ("k", "FP32")]

        x = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
        k = np.array([0.5], dtype=np.float32)
        inputs = [httpclient.InferInput("x", list(x.shape), "FP32"), httpclient.InferInput("k", [1], "FP32")]
        inputs[0].set_data_from_numpy(x, binary_data=binary)
        inputs[1].set_data_from_numpy(k, binary_data=binary)
        outputs = [httpclient.InferRequestedOutput("output", binary_data=binary)]
        result = client.infer("scale", inputs, outputs=outputs, request_id="r-7")
        np.testing.assert_array_equal(result.as_numpy("output"), x * k)
        assert result.get_response()["id"] == "r-7"
        compressed = client.infer("scale", inputs, outputs=outputs, request_compression_algorithm="gzip")
        np.testing.assert_array_equal(compressed.as_numpy("output"), x * k)

        ints = np.array([[5, 1, 9], [2, 2, 8]], dtype=np.int32)
        tensor = httpclient.InferInput("x", list(ints.shape), "INT32")
        tensor.set_data_from_numpy(ints, binary_data=binary)
        names = ("low", "high", "mean")
        result = client.infer("minmax", [tensor], outputs=[httpclient.InferRequestedOutput(n, binary_data=binary) for n in names])
        np.testing.assert_array_equal(result.as_numpy("low"), ints.min(axis=-1))
        np.testing.assert_array_equal(result.as_numpy("high"), ints.max(axis=-1))
        np.testing.assert_allclose(result.as_numpy("mean"), ints.mean(axis=-1))

        text = httpclient.InferInput("text", [1], "BYTES")
        text.set_data_from_numpy(np.array([b"hey"], dtype=object), binary_data=binary)
        times = httpclient.InferInput("times", [1], "INT64")
        times.set_data_from_numpy(np.array([3], dtype=np.int64), binary_data=binary)
        result = client.infer("shout", [text, times], outputs=[httpclient.InferRequestedOutput("output", binary_data=binary)])
        assert list(result.as_numpy("output")) == [b"HEY" if binary else "HEY"] * 3  # tritonclient decodes JSON text

        with pytest.raises(Exception, match="datatype FP64 does not match the model's FP32"):
            wrong = httpclient.InferInput("x", [1, 3], "FP64")
            wrong.set_data_from_numpy(np.ones((1, 3)), binary_data=binary)
            client.infer("scale", [wrong, inputs[1]])
    finally:
        client.close()


def test_limits_and_readiness_are_the_native_routes(start_server) -> None:
    server = start_server(TARGET, cwd=SERVICES, ready=False, args=["--max-body-size", "2KB", "--max-queue", "1"],
                          env={"TENSOR_MODELS_START_DELAY": "1.5"})
    x = {"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}
    deadline = time.monotonic() + 20
    while True:  # listening while the instance is still being built
        try:
            if httpx.get(server.url + "/v2/health/live", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.05)
    assert httpx.get(server.url + "/v2/health/ready").status_code == 503
    assert httpx.get(server.url + "/v2/models/slow/ready").status_code == 503
    r = httpx.post(server.url + "/v2/models/slow/infer", json={"inputs": [x]})
    assert r.status_code == 503 and r.headers["retry-after"] == "1" and "starting" in r.json()["error"]
    server.wait_ready()
    assert httpx.get(server.url + "/v2/models/slow/ready").status_code == 200

    big = {"name": "x", "shape": [1000], "datatype": "FP32", "data": [0.5] * 1000}
    r = httpx.post(server.url + "/v2/models/slow/infer", json={"inputs": [big]})
    assert r.status_code == 413 and "limit of 2000 bytes" in r.json()["error"]

    def call(_: int) -> httpx.Response:
        return httpx.post(server.url + "/v2/models/slow/infer", json={"inputs": [x]}, timeout=10)

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        statuses = sorted(r.status_code for r in pool.map(call, range(3)))
    assert statuses[0] == 200 and statuses[-1] == 429, statuses
    assert 'bento_like_rejections_total{api="slow",reason="queue_full"}' in httpx.get(server.url + "/metrics").text
