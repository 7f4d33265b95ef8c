"""The Open Inference Protocol (KServe v2) surface, over HTTP and through the official tritonclient."""

from __future__ import annotations

import asyncio
import json
import struct
from pathlib import Path

import httpx
import numpy as np
import pytest

from live_server import Server

SERVICES = Path(__file__).parent / "services"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    import os

    srv = Server("tensors.py:Tensors", SERVICES, [], {**os.environ, "PYTHONUNBUFFERED": "1"},
                 tmp_path_factory.mktemp("oip") / "server.log")
    srv.wait_ready()
    yield srv
    srv.stop()


def test_server_and_model_metadata(server: Server) -> None:
    assert httpx.get(server.url + "/v2/health/live").status_code == 200
    assert httpx.get(server.url + "/v2/health/ready").status_code == 200
    meta = httpx.get(server.url + "/v2").json()
    assert meta["name"] == "tensors" and "binary_tensor_data" in meta["extensions"]
    model = httpx.get(server.url + "/v2/models/scale").json()
    assert model["inputs"][0] == {"name": "x", "datatype": "FP32", "shape": [-1, 3]}
    assert model["outputs"][0]["name"] == "output"
    assert httpx.get(server.url + "/v2/models/square/versions/1").json()["inputs"][0]["shape"] == [-1, 2]
    assert httpx.get(server.url + "/v2/models/scale/ready").status_code == 200
    # an API that is not tensor-shaped is not a v2 model
    r = httpx.get(server.url + "/v2/models/label")
    assert r.status_code == 404 and "scale" in r.json()["error"]
    assert httpx.get(server.url + "/v2/models/scale/versions/2").status_code == 404


def test_json_infer_with_nested_and_flat_data(server: Server) -> None:
    body = {
        "id": "req-1",
        "inputs": [
            {"name": "x", "shape": [2, 3], "datatype": "FP32", "data": [[1, 2, 3], [4, 5, 6]]},
            {"name": "k", "shape": [1], "datatype": "FP32", "data": [2]},
        ],
    }
    r = httpx.post(server.url + "/v2/models/scale/infer", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["id"] == "req-1" and out["model_name"] == "scale"
    assert out["outputs"][0] == {"name": "output", "datatype": "FP32", "shape": [2, 3], "data": [2, 4, 6, 8, 10, 12]}
    body["inputs"][0]["data"] = [1, 2, 3, 4, 5, 6]
    assert httpx.post(server.url + "/v2/models/scale/versions/1/infer", json=body).json()["outputs"][0]["data"][-1] == 12


def test_binary_inputs_and_outputs(server: Server) -> None:
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    k = np.array([3], dtype=np.float32)
    header = json.dumps({
        "inputs": [
            {"name": "x", "shape": [2, 3], "datatype": "FP32", "parameters": {"binary_data_size": x.nbytes}},
            {"name": "k", "shape": [1], "datatype": "FP32", "parameters": {"binary_data_size": k.nbytes}},
        ],
        "outputs": [{"name": "output", "parameters": {"binary_data": True}}],
    }).encode()
    r = httpx.post(server.url + "/v2/models/scale/infer", content=header + x.tobytes() + k.tobytes(),
                   headers={"Inference-Header-Content-Length": str(len(header)), "content-type": "application/octet-stream"})
    assert r.status_code == 200, r.text
    length = int(r.headers["inference-header-content-length"])
    meta = json.loads(r.content[:length])
    size = meta["outputs"][0]["parameters"]["binary_data_size"]
    got = np.frombuffer(r.content[length:length + size], dtype="<f4").reshape(meta["outputs"][0]["shape"])
    np.testing.assert_array_equal(got, x * 3)


@pytest.mark.parametrize(
    "inputs, words",
    [
        ([{"name": "x", "shape": [2, 3], "datatype": "FP32", "data": [1, 2, 3]}], "needs 6 elements, data has 3"),
        ([{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}, {"name": "k", "shape": [1], "datatype": "FP32", "data": [1]}], "input tensor 'x'"),
        ([{"name": "nope", "shape": [1], "datatype": "FP32", "data": [1]}], "'nope' is not an input"),
        ([{"name": "x", "shape": [1, 3], "datatype": "BF16", "data": [1, 2, 3]}], "datatype 'BF16' is not supported"),
        ([{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}], "missing input tensor(s) 'k'"),
    ],
)
def test_bad_tensors_are_400_naming_the_tensor(server: Server, inputs, words) -> None:
    r = httpx.post(server.url + "/v2/models/scale/infer", json={"inputs": inputs})
    assert r.status_code == 400
    assert words in r.json()["error"]


def test_unknown_model_and_malformed_json(server: Server) -> None:
    assert httpx.post(server.url + "/v2/models/nope/infer", json={"inputs": []}).status_code == 404
    r = httpx.post(server.url + "/v2/models/scale/infer", content=b"{bad", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "malformed JSON" in r.json()["error"]


def test_concurrent_v2_requests_are_batched_and_each_gets_its_rows(server: Server) -> None:
    httpx.post(server.url + "/sizes", json={})

    async def one(client: httpx.AsyncClient, i: int) -> list[float]:
        body = {"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [i, i + 1]}]}
        r = await client.post("/v2/models/square/infer", json=body)
        assert r.status_code == 200, r.text
        return r.json()["outputs"][0]["data"]

    async def run() -> list[list[float]]:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            return await asyncio.gather(*(one(client, i) for i in range(24)))

    results = asyncio.run(run())
    assert results == [[float(i * i), float((i + 1) ** 2)] for i in range(24)]
    sizes = httpx.post(server.url + "/sizes", json={}).json()
    assert max(sizes) > 1, sizes
    metrics = httpx.get(server.url + "/metrics").text
    assert 'bento_like_requests_total{api="square",status="200"}' in metrics


@pytest.mark.parametrize("binary", [True, False])
def test_official_tritonclient_round_trip(server: Server, binary: bool) -> None:
    httpclient = pytest.importorskip("tritonclient.http")
    client = httpclient.InferenceServerClient(server.url.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("scale")
    meta = client.get_model_metadata("scale")
    assert [i["name"] for i in meta["inputs"]] == ["x", "k"]
    x = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
    k = np.array([0.5], dtype=np.float32)
    inputs = [httpclient.InferInput("x", list(x.shape), "FP32"), httpclient.InferInput("k", [1], "FP32")]
    inputs[0].set_data_from_numpy(x, binary_data=binary)
    inputs[1].set_data_from_numpy(k, binary_data=binary)
    result = client.infer("scale", inputs, outputs=[httpclient.InferRequestedOutput("output", binary_data=binary)])
    np.testing.assert_allclose(result.as_numpy("output"), x * 0.5, rtol=1e-6)
    client.close()


def test_bytes_tensor_in_binary_form(server: Server) -> None:
    # a BYTES input encodes each element as a 4-byte little-endian length then the bytes
    raw = struct.pack("<I", 2) + b"hi"
    header = json.dumps({"inputs": [{"name": "x", "shape": [1], "datatype": "BYTES",
                                     "parameters": {"binary_data_size": len(raw)}}, {"name": "k", "shape": [1], "datatype": "FP32", "data": [1]}]}).encode()
    r = httpx.post(server.url + "/v2/models/scale/infer", content=header + raw,
                   headers={"Inference-Header-Content-Length": str(len(header))})
    assert r.status_code == 400 and "takes numbers, not BYTES" in r.json()["error"]
