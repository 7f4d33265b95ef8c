"""The client against real `pkg serve` processes: schema-derived methods, every IO kind, errors, retries, timeouts."""

from __future__ import annotations

import asyncio
import email.utils
import inspect
import io
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import msgspec
import numpy as np
import pytest

import bento_like
from bento_like import AsyncClient, Client, File
from bento_like._client_core import MAX_RETRY_AFTER, RetryPolicy, SSEParser, parse_retry_after
from bento_like.client import (
    APIClientError,
    APIConnectionError,
    APIError,
    APIServerError,
    APIStreamError,
    APITimeoutError,
    EventStream,
    TextStream,
)
SERVICES = Path(__file__).parent / "client_services"


class Item(msgspec.Struct):
    """The client's own copy of the quickstart's Item: only the JSON shape has to match."""

    text: str
    lang: str = "en"


@dataclass
class Point:
    x: float
    y: float


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    """One `pkg serve` of the test service for the module (start_server starts one per test)."""
    log_path = tmp_path_factory.mktemp("client") / "server.log"
    port = _free_port()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bento_like", "serve", "svc.py:ClientTest", "--port", str(port)],
            cwd=SERVICES,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        Client(url, wait_ready=60).close()
    except (APIError, APIConnectionError) as exc:
        proc.kill()
        raise RuntimeError(f"{exc}\n{log_path.read_text()}") from exc
    yield url
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def client(server: str):
    with Client(server, backoff=0.01) as c:
        yield c


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _key() -> str:
    return uuid.uuid4().hex


def _requests_to(client: Client, api: str) -> float:
    text = client._shared.http.get("/metrics").text
    pattern = re.compile(r'^bento_like_requests_total\{[^}]*api="' + api + r'"[^}]*\} (\S+)$', re.M)
    return sum(float(v) for v in pattern.findall(text))


# --- the quickstart, as the docs use it -------------------------------------------------------------------------


def test_quickstart_predict_returns_an_ndarray_and_tag_round_trips(start_server) -> None:
    srv = start_server("examples/quickstart/service.py:Demo")
    x = np.array([[5.1, 3.5, 1.4, 0.2], [5.9, 3.0, 4.2, 1.5], [6.7, 3.0, 5.2, 2.3]], dtype=np.float32)
    with bento_like.Client(srv.url) as client:
        result = client.predict(x=x)
        assert isinstance(result, np.ndarray) and result.shape == (3, 3)
        np.testing.assert_allclose(result.sum(axis=1), 1.0, rtol=1e-5)  # probabilities of the three species
        assert list(result.argmax(axis=1)) == [0, 1, 2]  # setosa, versicolor, virginica
        np.testing.assert_allclose(client.predict(x), result)  # positional, by the order of the inputs
        assert client.tag(item=Item("bonjour", lang="fr")) == {"text": "bonjour", "lang": "fr"}
        assert client.tag({"text": "hi"}) == {"text": "hi", "lang": "en"}
        assert client.call("tag", item=Item("x")) == {"text": "x", "lang": "en"}


# --- methods from the schema ------------------------------------------------------------------------------------


def test_methods_come_from_the_schema(client: Client) -> None:
    assert {"predict", "tag", "upload", "count"} <= set(client.apis)
    assert client.apis["upload"].inputs == {"file": "file", "note": "str", "times": "json"}
    assert client.apis["count"].output == "stream"
    assert "predict" in dir(client)
    sig = inspect.signature(client.upload)
    assert list(sig.parameters) == ["file", "note", "times", "timeout"]
    assert sig.parameters["timeout"].kind is inspect.Parameter.KEYWORD_ONLY
    assert "Multiply rows" in client.predict.__doc__


def test_unknown_api_name_lists_the_apis(client: Client) -> None:
    with pytest.raises(AttributeError, match=r"no API 'nope'; its APIs: .*predict.*tag"):
        client.nope
    with pytest.raises(AttributeError, match="no API 'nope'"):
        client.call("nope")
    assert not hasattr(client, "_private")


def test_argument_errors_raise_before_any_request(client: Client) -> None:
    before = _requests_to(client, "norm")
    with pytest.raises(TypeError, match=r"missing 1 required argument\(s\): 'p'"):
        client.norm()
    with pytest.raises(TypeError, match="unexpected keyword argument 'z'; its inputs: p, scale"):
        client.norm(Point(1, 1), z=1)
    with pytest.raises(TypeError, match="takes 2 positional argument"):
        client.norm(Point(1, 1), 2, 3)
    with pytest.raises(TypeError, match="multiple values for argument 'p'"):
        client.norm(Point(1, 1), p=Point(1, 1))
    with pytest.raises(TypeError, match="takes bytes, a bento_like.File"):
        client.raw("text is not bytes")
    with pytest.raises(TypeError, match="cannot send an object of type object"):
        client.norm(object())
    assert _requests_to(client, "norm") == before


def test_dataclasses_and_numpy_scalars_travel_as_json(client: Client) -> None:
    assert client.norm(Point(3, 4), scale=np.float32(2)) == 10.0
    assert client.norm({"x": 0, "y": 1}) == 1.0


# --- errors -----------------------------------------------------------------------------------------------------


def test_422_surfaces_as_api_error_with_the_field(client: Client) -> None:
    with pytest.raises(APIClientError) as info:
        client.tag(item={"text": 1})
    err = info.value
    assert isinstance(err, APIError)
    assert err.status == 422 and err.field == "$.item.text" and err.api == "tag"
    assert "Expected `str`, got `int`" in err.message and "422" in str(err)


def test_500_raises_at_once_with_its_error_id(server: str) -> None:
    with Client(server, backoff=5) as client:  # a retry would show as a 5 s pause
        started = time.monotonic()
        with pytest.raises(APIServerError) as info:
            client.boom(1)
        assert time.monotonic() - started < 2
    assert info.value.status == 500
    assert re.fullmatch(r"[0-9a-f]{12}", info.value.error_id)


# --- retries ----------------------------------------------------------------------------------------------------


def test_429_is_retried_after_retry_after(client: Client) -> None:
    key = _key()
    started = time.monotonic()
    assert client.flaky(key=key, failures=2) == {"key": key, "refusals": 2}
    elapsed = time.monotonic() - started
    assert 2.0 <= elapsed < 4.0  # two refusals, each with Retry-After: 1; backoff alone would be ~0.03 s


def test_retries_exhausted_raise_the_last_error(server: str) -> None:
    key = _key()
    with Client(server, max_retries=2, backoff=0.01) as client:
        with pytest.raises(APIServerError) as info:
            client.unavailable(key, failures=10)
        assert info.value.status == 503
        assert client.unavailable(key, failures=0)["refusals"] == 3  # the first try and two retries


def test_no_retries_raises_429_at_once_with_retry_after(server: str) -> None:
    with Client(server, max_retries=0) as client:
        started = time.monotonic()
        with pytest.raises(APIClientError) as info:
            client.flaky(_key(), 1)
        assert time.monotonic() - started < 0.9
    assert info.value.status == 429 and info.value.retry_after == 1.0


def test_connection_refused_is_retried_then_raised() -> None:
    with Client(f"127.0.0.1:{_free_port()}", max_retries=2, backoff=0.05) as client:
        started = time.monotonic()
        with pytest.raises(APIConnectionError, match="cannot reach"):
            client.predict(x=[1])
        assert time.monotonic() - started >= 0.07  # two backoffs of 0.05 and 0.1 s, jittered by +-50%


def test_retry_policy_waits_for_retry_after_and_backs_off() -> None:
    policy = RetryPolicy(max_retries=3, backoff=0.1)
    assert policy.after_status(500, None) is None
    assert policy.after_status(429, "2") == 2.0
    assert 0.1 <= policy.after_status(503, None) <= 0.3  # attempt 1: 0.2 s +-50%
    assert 0.2 <= policy.after_connect_error() <= 0.6
    assert policy.after_status(429, "1") is None  # exhausted
    assert RetryPolicy(3, 0.1).after_status(503, str(MAX_RETRY_AFTER + 1)) is None


def test_retry_after_takes_seconds_or_an_http_date() -> None:
    assert parse_retry_after("1.5") == 1.5
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    later = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 28 <= parse_retry_after(later) <= 31


# --- timeouts and readiness -------------------------------------------------------------------------------------


def test_timeout_raises_quickly(client: Client, server: str) -> None:
    started = time.monotonic()
    with pytest.raises(APITimeoutError, match="within 0.3 s"):
        client.slow(1.5, timeout=0.3)
    with pytest.raises(TimeoutError):
        client.with_options(timeout=0.3).slow(1.5)
    with Client(server, timeout=0.3) as short:
        with pytest.raises(APITimeoutError):
            short.slow(seconds=1.5)
    assert time.monotonic() - started < 2.5


def test_wait_ready_blocks_until_the_service_is_ready(start_server) -> None:
    srv = start_server("svc.py:ClientTest", cwd=SERVICES, ready=False, env={"INIT_DELAY": "1.5"})
    probe = Client(srv.url)
    assert probe.is_ready() is False
    with pytest.raises(APITimeoutError, match="not ready after 0.2 s"):
        probe.wait_until_ready(timeout=0.2)
    with Client(srv.url, wait_ready=30) as client:
        assert client.is_ready()
        assert client.greet("ready") == "hello, ready"
    probe.close()


def test_wait_ready_fails_fast_when_startup_failed(start_server) -> None:
    srv = start_server("svc.py:ClientTest", cwd=SERVICES, ready=False, env={"INIT_FAIL": "1"})
    started = time.monotonic()
    with pytest.raises(APIServerError, match="will not become ready: startup failed: RuntimeError: the model"):
        Client(srv.url, wait_ready=30)
    assert time.monotonic() - started < 10


# --- bytes, files, text -----------------------------------------------------------------------------------------


def test_bytes_round_trip_as_a_raw_body(client: Client) -> None:
    data = bytes(range(256)) * 4
    assert client.raw(data) == data[::-1]
    assert client.raw(data=bytearray(b"abc")) == b"cba"


def test_a_lone_file_travels_raw_unless_it_has_a_filename(client: Client) -> None:
    raw = client.inspect_file(File(b"\x89PNG", content_type="image/png"))
    assert raw == {"name": None, "size": 4, "type": "image/png"}  # the raw body keeps the content type
    named = client.inspect_file(File(b"\x89PNG", filename="a.png", content_type="image/png"))
    assert named == {"name": "a.png", "size": 4, "type": "image/png"}  # multipart keeps the filename too


def test_file_upload_with_other_inputs_is_multipart(client: Client, tmp_path: Path) -> None:
    file = File(b"hello", filename="a.txt", content_type="text/plain")
    assert client.upload(file, note="ab", times=2) == {"name": "a.txt", "size": 5, "type": "text/plain", "note": "abab"}
    path = tmp_path / "data.json"
    path.write_bytes(b"{}")
    assert client.upload(path)["name"] == "data.json" and client.upload(path)["type"] == "application/json"
    with open(path, "rb") as f:
        assert client.upload(f, note="x")["name"] == "data.json"
    assert client.upload(io.BytesIO(b"12345"))["size"] == 5


def test_a_file_with_structured_inputs_travels_as_json(client: Client) -> None:
    assert client.upload_with_meta(b"123", {"tags": [1, 2]}) == {"name": None, "size": 3, "meta": {"tags": [1, 2]}}


def test_str_and_file_outputs(client: Client) -> None:
    assert client.greet("ana") == "hello, ana"
    out = client.echo_file(File(b"abc"))
    assert isinstance(out, File) and out.data == b"ABC" and out.content_type == "image/x-test"


# --- streams ----------------------------------------------------------------------------------------------------


def test_stream_yields_decoded_events(client: Client) -> None:
    events = client.count(n=3)
    assert isinstance(events, EventStream)
    assert list(events) == [{"i": 0}, {"i": 1}, {"i": 2}]
    # str items stream as plain text: chunks as the network cut them, the same text once joined
    tokens = client.tokens(2)
    assert isinstance(tokens, TextStream)
    assert "".join(tokens) == "token 0\nline twotoken 1\nline two"


def test_stream_closed_early_and_failing_stream(client: Client) -> None:
    with client.count(1000) as events:
        assert next(events) == {"i": 0}
    seen = []
    with pytest.raises(APIStreamError) as info:
        for event in client.broken_stream(2):
            seen.append(event)
    assert seen == [0, 1] and info.value.error_id
    with pytest.raises(APIClientError) as err:  # a bad request fails at the call, before any iteration
        client.count(n="x")
    assert err.value.field == "$.n"


def test_sse_parser_follows_the_spec() -> None:
    parser = SSEParser()
    lines = [": a comment", "event: error", "data: {\"a\":", "data:1}", "", "", "data: plain", "id: 7", ""]
    events = [e for e in map(parser.feed, lines) if e is not None]
    assert [(e.event, e.data) for e in events] == [("error", '{"a":\n1}'), ("message", "plain")]


# --- lifecycle --------------------------------------------------------------------------------------------------


def test_close_context_manager_and_with_options(server: str) -> None:
    client = Client(server)
    derived = client.with_options(timeout=5, headers={"x-trace": "1"})
    assert derived.greet("a") == "hello, a"
    derived.close()  # leaves the shared connections open
    assert client.greet("b") == "hello, b"
    client.close()
    with pytest.raises(RuntimeError):
        client.greet("c")
    with pytest.raises(ValueError):
        Client(server, max_retries=-1)


# --- AsyncClient ------------------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_async_predict_tag_and_schema(server: str) -> None:
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    async with AsyncClient(server) as client:
        result = await client.predict(x)
        assert isinstance(result, np.ndarray)
        np.testing.assert_array_equal(result, x @ np.ones((4, 2)))
        assert await client.tag(item=Item("hi"), count=2) == {"text": "hi", "lang": "en", "count": 2}
        assert await client.call("greet", name="b") == "hello, b"
        with pytest.raises(AttributeError, match="no API 'nope'"):
            client.nope
    lazy = AsyncClient(server)
    with pytest.raises(AttributeError, match="no API 'nope'"):  # before the schema: known once awaited
        await lazy.nope()
    await lazy.close()


@pytest.mark.anyio
async def test_async_errors_and_argument_checks(server: str) -> None:
    async with AsyncClient(server) as client:
        with pytest.raises(APIClientError) as info:
            await client.tag(item={"text": 1})
        assert info.value.status == 422 and info.value.field == "$.item.text"
        with pytest.raises(TypeError, match="missing 1 required"):
            await client.predict()
        with pytest.raises(APIServerError):
            await client.boom(1)


@pytest.mark.anyio
async def test_async_retry_honors_retry_after(server: str) -> None:
    async with AsyncClient(server, backoff=0.01) as client:
        started = time.monotonic()
        result = await client.flaky(_key(), 1)
        assert result["refusals"] == 1 and time.monotonic() - started >= 1.0


@pytest.mark.anyio
async def test_async_timeout_and_concurrent_calls(server: str) -> None:
    async with AsyncClient(server, timeout=0.3) as client:
        started = time.monotonic()
        with pytest.raises(APITimeoutError):
            await client.slow(1.5)
        results = await asyncio.gather(*(client.slow(0.2, timeout=5) for _ in range(5)))
        assert results == [0.2] * 5 and time.monotonic() - started < 2


@pytest.mark.anyio
async def test_async_stream_bytes_and_files(server: str) -> None:
    async with AsyncClient(server) as client:
        assert [e async for e in await client.count(3)] == [{"i": 0}, {"i": 1}, {"i": 2}]
        async with await client.tokens(100) as events:
            assert (await events.__anext__()).startswith("token 0\nline two")  # plain text: closed early
        with pytest.raises(APIStreamError):
            async for _ in await client.broken_stream(1):
                pass
        assert await client.raw(b"xyz") == b"zyx"
        upload = await client.upload(File(b"hello", filename="a.txt"), note="n")
        assert upload["name"] == "a.txt" and upload["note"] == "n"
