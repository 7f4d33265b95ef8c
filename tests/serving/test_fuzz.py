"""Fuzzing a real server: no request, valid or not, gets a 5xx or leaves a traceback in the log.

Schemathesis generates requests from the server's own /openapi.json (bodies that fit each API's schema, and bodies
that break it: wrong types, missing and unknown fields, other content types) for a service with one API per input
kind; hypothesis generates Open Inference Protocol requests, which the document does not describe. Generation is
derandomized, so CI sees the same requests on every run, and bounded so the module takes about a minute on two
cores.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator

import httpx
import msgspec
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from live_server import Server

SERVICES = Path(__file__).parent / "services"
EXAMPLES = int(os.environ.get("BENTO_LIKE_FUZZ_EXAMPLES", "25"))
"""Requests per operation and generation mode; raise it to fuzz longer (the CI bound is the default)."""
IO_EXAMPLES = max(1, EXAMPLES // 3)
"""Fewer per operation for the rich IO types: their decoders (PIL, pandas, pyarrow) are what is fuzzed there."""


class LoggedServer:
    """A server whose log is checked for tracebacks since the last look."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.seen = 0

    def new_tracebacks(self) -> str | None:
        log = self.server.log()
        new, self.seen = log[self.seen :], len(log)
        return new if "Traceback" in new else None


def _start(target: str, tmp: Path) -> Server:
    server = Server(target, SERVICES, [], {**os.environ, "PYTHONUNBUFFERED": "1"}, tmp / "server.log")
    server.wait_ready()
    return server


@pytest.fixture(scope="module")
def every_input(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoggedServer]:
    server = _start("every_input.py:EveryInput", tmp_path_factory.mktemp("fuzz"))
    yield LoggedServer(server)
    server.stop()


@pytest.fixture(scope="module")
def served_schema(every_input: LoggedServer) -> Any:
    schema = schemathesis.openapi.from_url(every_input.server.url + "/openapi.json")
    schema.config.generation.update(
        modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE], max_examples=EXAMPLES, deterministic=True
    )
    return schema


schema = schemathesis.pytest.from_fixture("served_schema")


@pytest.fixture(scope="module")
def io_types(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoggedServer]:
    server = _start("io_types.py:IOTypes", tmp_path_factory.mktemp("fuzz_io"))
    yield LoggedServer(server)
    server.stop()


@pytest.fixture(scope="module")
def io_types_schema(io_types: LoggedServer) -> Any:
    """The rich IO types' APIs: images, DataFrames, tensors and paths as files, base64, JSON or raw bodies."""
    schema = schemathesis.openapi.from_url(io_types.server.url + "/openapi.json")
    schema.config.generation.update(
        modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE], max_examples=IO_EXAMPLES, deterministic=True
    )
    return schema


io_schema = schemathesis.pytest.from_fixture("io_types_schema")


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
def test_no_request_from_the_openapi_document_gets_a_5xx(case: Any, every_input: LoggedServer) -> None:
    response = case.call(timeout=30)
    assert response.status_code < 500, f"{case.method} {case.path}: {response.status_code} {response.text[:500]}"
    if response.status_code >= 400 and case.path not in ("/livez", "/readyz", "/metrics"):
        assert "error" in response.json(), response.text
    tracebacks = every_input.new_tracebacks()
    assert tracebacks is None, tracebacks


@io_schema.parametrize()
@settings(max_examples=IO_EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
def test_no_request_for_the_rich_io_types_gets_a_5xx(case: Any, io_types: LoggedServer) -> None:
    response = case.call(timeout=30)
    assert response.status_code < 500, f"{case.method} {case.path}: {response.status_code} {response.text[:500]}"
    if response.status_code >= 400 and case.path not in ("/livez", "/readyz", "/metrics"):
        assert "error" in response.json(), response.text
    tracebacks = io_types.new_tracebacks()
    assert tracebacks is None, tracebacks


# --- the Open Inference Protocol: requests built from the models' own metadata, then bent -----------------------

DATATYPES = ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64",
             "BYTES", "BF16", "fp32", ""]
_LEAVES = {
    "BOOL": st.booleans(),
    "BYTES": st.text(max_size=8),
    "FP": st.floats(width=64, allow_nan=False, allow_infinity=False) | st.integers(-10**6, 10**6),
    "INT": st.integers(-2**64, 2**64),
}
_ANY_LEAF = st.one_of(*_LEAVES.values(), st.none(), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))


def _leaf(datatype: str) -> st.SearchStrategy[Any]:
    family = "FP" if datatype.startswith("FP") else "INT" if "INT" in datatype else datatype
    return _LEAVES.get(family, _ANY_LEAF)


@st.composite
def _tensor(draw: st.DrawFn, name: str, datatype: str, shape: list[int]) -> tuple[dict[str, Any], bytes]:
    """One input tensor: mostly well-formed for the metadata, then with one thing bent (or several)."""
    datatype = draw(st.sampled_from([datatype] * 4 + DATATYPES))
    dims = [draw(st.integers(0, 3)) if d == -1 else d for d in shape]
    dims = draw(st.sampled_from([dims] * 4 + [
        [draw(st.integers(-2, 4)) for _ in range(draw(st.integers(0, 4)))],
        [0, 2**62], [2**63 - 1], [1] * 70, [2**32, 2**32],
    ]))
    count = 1
    for d in dims:
        count *= max(d, 0)
    count = min(count, 64)
    tensor: dict[str, Any] = {"name": draw(st.sampled_from([name] * 8 + ["", "other"])), "shape": dims,
                              "datatype": datatype}
    leaves = draw(st.lists(_leaf(datatype) if draw(st.booleans()) else _ANY_LEAF, min_size=count, max_size=count)
                  | st.lists(_ANY_LEAF, max_size=3))
    binary = b""
    how = draw(st.sampled_from(["flat", "flat", "nested", "binary", "none"]))
    if how == "binary":
        binary = draw(st.binary(max_size=80))
        tensor["parameters"] = {"binary_data_size": draw(st.sampled_from([len(binary)] * 4 + [-1, 0, 10**9, "8"]))}
    elif how == "nested" and len(dims) > 1 and dims[-1] > 0 and len(leaves) % dims[-1] == 0:
        tensor["data"] = [leaves[i : i + dims[-1]] for i in range(0, len(leaves), dims[-1])]
    elif how != "none":
        tensor["data"] = leaves
    return tensor, binary


@st.composite
def _infer_request(draw: st.DrawFn, metadata: dict[str, Any]) -> tuple[bytes, dict[str, str]]:
    """An inference request body and its headers, for a model described by ``metadata``."""
    inputs = [t for t in metadata["inputs"] if draw(st.integers(0, 9))]  # sometimes one goes missing
    tensors, tails = [], []
    for t in inputs + draw(st.lists(st.sampled_from(metadata["inputs"]), max_size=1)):  # or comes twice
        tensor, binary = draw(_tensor(t["name"], t["datatype"], t["shape"]))
        tensors.append(tensor)
        tails.append(binary)
    request: dict[str, Any] = {"inputs": tensors}
    if draw(st.booleans()):
        names = [o["name"] for o in metadata["outputs"]] + ["nope"]
        request["outputs"] = [
            {"name": draw(st.sampled_from(names)),
             "parameters": {"binary_data": draw(st.sampled_from([True, False, "yes"]))}}
            for _ in range(draw(st.integers(0, 2)))
        ]
    if draw(st.booleans()):
        request["parameters"] = {"binary_data_output": draw(st.sampled_from([True, False, 1]))}
    if draw(st.booleans()):
        request["id"] = draw(st.text(max_size=5))
    head = msgspec.json.encode(request)
    tail = b"".join(tails) + draw(st.sampled_from([b""] * 6 + [b"\0" * 4]))
    headers = {"content-type": "application/json"}
    if tail or draw(st.booleans()):
        length = draw(st.sampled_from([len(head)] * 6 + [len(head) + 3, -1, 0, "x"]))
        headers["inference-header-content-length"] = str(length)
    return head + tail, headers


def _well_formed(metadata: dict[str, Any]) -> dict[str, Any]:
    """The request the metadata describes, with every variable dimension 1."""
    tensors = []
    for t in metadata["inputs"]:
        shape = [1 if d == -1 else d for d in t["shape"]]
        count = 1
        for d in shape:
            count *= d
        leaf = {"BYTES": "a", "BOOL": False}.get(t["datatype"], 0)
        tensors.append({"name": t["name"], "shape": shape, "datatype": t["datatype"], "data": [leaf] * count})
    return {"inputs": tensors}


def test_no_inference_request_gets_a_5xx(every_input: LoggedServer) -> None:
    url = every_input.server.url
    with httpx.Client(base_url=url, timeout=30) as http:
        models = [http.get(f"/v2/models/{name}").json() for name in ("rows", "pair", "words")]
        for metadata in models:  # the path to each model works before it is bent
            r = http.post(f"/v2/models/{metadata['name']}/infer", json=_well_formed(metadata))
            assert r.status_code == 200, (metadata["name"], r.text)
        statuses: dict[int, int] = {}

        @settings(max_examples=EXAMPLES * 6, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(data=st.data())
        def send(data: st.DataObject) -> None:
            metadata = data.draw(st.sampled_from(models))
            body, headers = data.draw(_infer_request(metadata))
            r = http.post(f"/v2/models/{metadata['name']}/infer", content=body, headers=headers)
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            assert r.status_code < 500, f"{body[:300]!r} {headers}: {r.status_code} {r.text[:500]}"
            assert r.status_code == 200 or "error" in r.json(), r.text
            tracebacks = every_input.new_tracebacks()
            assert tracebacks is None, tracebacks

        send()
    # The bent requests must reach the models, not only their refusals: some are answered, some refused. How many
    # are answered varies with the whole run: Hypothesis mixes constants from every loaded module into its draws.
    assert statuses.get(200, 0) >= 1 and statuses.get(400, 0) >= EXAMPLES // 4, statuses


def test_the_fuzzing_reached_every_api_both_accepted_and_refused(every_input: LoggedServer) -> None:
    """Schemathesis' requests got 200s and 4xx from every API: it explored past the first refusal."""
    metrics = httpx.get(every_input.server.url + "/metrics", timeout=10).text
    seen: dict[str, set[str]] = {}
    for line in metrics.splitlines():
        if line.startswith("bento_like_requests_total{"):
            labels = dict(part.split("=", 1) for part in line[line.index("{") + 1 : line.index("}")].split(","))
            seen.setdefault(labels["api"].strip('"'), set()).add(labels["status"].strip('"')[0])
    apis = httpx.get(every_input.server.url + "/openapi.json", timeout=10).json()["paths"]
    for path, operations in apis.items():
        if "post" in operations:
            assert {"2", "4"} <= seen.get(operations["post"]["operationId"], set()), (path, seen)
