"""BentoML 1.4's request context, Pydantic IO, enforced constraints, GET APIs, ASGI mounts, readiness and deployment
hooks and plain-text streams, over a real `pkg serve` process (raw HTTP and the client)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

import bento_like as bl
from live_server import Server

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("parity")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PARITY_NOT_READY_FILE": str(tmp / "not-ready"),
           "PARITY_DEPLOY_LOG": str(tmp / "deploy.log")}
    srv = Server("parity.py:Parity", HERE / "services", [], env, tmp / "server.log")
    srv.tmp = tmp
    srv.wait_ready()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def http(server: Server):
    with httpx.Client(base_url=server.url, timeout=10) as client:
        yield client


def test_context_carries_the_request_in_and_status_headers_cookies_out(http: httpx.Client) -> None:
    r = http.post("/echo_context?lang=fr", json={"text": "hi"}, headers={"X-User": "ada", "Cookie": "flavour=oat"})
    assert r.status_code == 201, r.text
    assert r.json() == {"user": "ada", "cookie": "oat", "query": "fr", "client": "127.0.0.1", "state": {"seen": "hi"}}
    assert r.headers["x-echo"] == "HI"
    assert "session=s-hi" in r.headers["set-cookie"] and "HttpOnly" in r.headers["set-cookie"]
    # per request: the next one starts with an empty state
    assert http.post("/echo_context", json={"text": "yo"}).json()["state"] == {"seen": "yo"}


def test_context_is_not_an_input(http: httpx.Client) -> None:
    doc = http.get("/openapi.json").json()
    schema = doc["components"]["schemas"]["echo_context_input"]
    assert set(schema["properties"]) == {"text"}
    r = http.post("/echo_context", json={"text": "a", "ctx": {}})
    assert r.status_code == 422 and "ctx" in r.json()["error"]


def test_pydantic_models_in_and_out(http: httpx.Client) -> None:
    body = {"chat": {"messages": [{"role": "user", "content": "hello there"}], "temperature": 0.5}}
    r = http.post("/chat", json=body)
    assert r.status_code == 200, r.text
    assert r.json() == {"text": "hello there (t=0.5)", "tokens": 2}


@pytest.mark.parametrize(
    ("body", "field", "words"),
    [
        ({"chat": {"messages": [{"role": "robot", "content": "x"}]}}, "$.chat.messages[0].role", "pattern"),
        ({"chat": {"messages": [{"role": "user", "content": ""}]}}, "$.chat.messages[0].content", "at least 1"),
        ({"chat": {"messages": [], "temperature": 3}}, "$.chat.temperature", "less than or equal to 2"),
        ({"chat": {"messages": "no"}}, "$.chat.messages", "list"),
        ({"chat": {}}, "$.chat.messages", "required"),
    ],
)
def test_pydantic_errors_are_422_naming_the_field(http: httpx.Client, body: dict, field: str, words: str) -> None:
    r = http.post("/chat", json=body)
    assert r.status_code == 422, r.text
    assert r.json()["field"] == field and words in r.json()["error"], r.json()


def test_pydantic_schemas_reach_openapi(http: httpx.Client) -> None:
    doc = http.get("/openapi.json").json()
    schemas = doc["components"]["schemas"]
    assert schemas["chat_input"]["properties"]["chat"] == {"$ref": "#/components/schemas/Chat"}
    assert schemas["Chat"]["properties"]["temperature"]["maximum"] == 2
    assert "Message" in schemas
    output = doc["paths"]["/chat"]["post"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert output == {"$ref": "#/components/schemas/Reply"}


def test_field_defaults_and_annotated_types_are_enforced(http: httpx.Client) -> None:
    assert http.post("/sample", json={"prompt": "p"}).json() == {"prompt": "p", "temperature": 1.0, "top_k": 10}
    ok = http.post("/sample", json={"prompt": "p", "temperature": 0.2, "top_k": 100})
    assert ok.json() == {"prompt": "p", "temperature": 0.2, "top_k": 100}
    for body, field in (({"prompt": "p", "temperature": 5}, "$.temperature"), ({"prompt": "p", "top_k": 0}, "$.top_k"),
                        ({"prompt": "p", "top_k": 101}, "$.top_k")):
        r = http.post("/sample", json=body)
        assert r.status_code == 422 and r.json()["field"] == field, (body, r.text)
    r = http.post("/bounded", json={"score": 5})
    assert r.status_code == 422 and r.json()["field"] == "$.score" and "< 2" in r.json()["error"]
    r = http.post("/bounded", json={"score": 1, "tags": ["a", "b", "c"]})
    assert r.status_code == 422 and r.json()["field"] == "$.tags"
    assert http.post("/bounded", json={"score": 1.5}).json() == 1.5


def test_get_api_takes_query_parameters(http: httpx.Client) -> None:
    r = http.get("/greet", params={"name": "ada", "times": "2", "shout": "true"})
    assert r.status_code == 200 and r.text == "HELLO ADA HELLO ADA"
    assert http.get("/greet?name=bob").text == "hello bob"
    r = http.get("/greet", params={"name": "ada", "times": "two"})
    assert r.status_code == 422 and r.json()["field"] == "$.times"
    r = http.get("/greet")
    assert r.status_code == 422 and "name" in r.json()["error"]
    r = http.get("/greet", params={"name": "a", "color": "red"})
    assert r.status_code == 422 and "color" in r.json()["error"]
    assert http.get("/greet?name=a&name=b").status_code == 400
    assert http.post("/greet", json={"name": "a"}).status_code == 405
    assert "get" in http.get("/openapi.json").json()["paths"]["/greet"]


def test_mounted_asgi_app_reaches_the_service(http: httpx.Client) -> None:
    r = http.get("/extra/whoami")
    assert r.status_code == 200 and r.json() == {"service": "Parity", "greeting": "hello asgi"}
    assert http.get("/extra/nothing").status_code == 404


def test_str_generators_stream_plain_text_and_others_events(http: httpx.Client) -> None:
    with http.stream("POST", "/tokens", json={"n": 3}) as r:
        assert r.headers["content-type"] == "text/plain; charset=utf-8"
        assert "".join(r.iter_text()) == "t0 t1 t2 "
    with http.stream("POST", "/atokens", json={"n": 2}) as r:
        assert r.headers["x-count"] == "2"
        assert "".join(r.iter_text()) == "a0 a1 "
    with http.stream("POST", "/events", json={"n": 2}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")


def _ready_gauge(http: httpx.Client) -> str:
    return next(line for line in http.get("/metrics").text.splitlines() if line.startswith("bento_like_ready "))


def test_readiness_hooks_and_deployment_hook(server: Server, http: httpx.Client) -> None:
    """``__is_ready__`` and an ``@on_ready`` method each hold /readyz, the v2 readiness and the bento_like_ready
    gauge at "not ready" while they say so."""
    assert http.get("/readyz").status_code == 200 and _ready_gauge(http) == "bento_like_ready 1"
    for flag, named in ((server.tmp / "not-ready", "__is_ready__ of instance 0 returned False"),
                        (server.tmp / "cache-cold", "cache_is_warm of instance 0 raised RuntimeError: the cache is cold")):
        flag.write_text("x")
        try:
            r = http.get("/readyz")
            assert r.status_code == 503 and r.json()["error"] == named, r.text
            assert http.get("/v2/health/ready").status_code == 503
            assert _ready_gauge(http) == "bento_like_ready 0"
        finally:
            flag.unlink()
        assert http.get("/readyz").status_code == 200 and _ready_gauge(http) == "bento_like_ready 1"
    assert http.get("/v2/health/ready").status_code == 200
    log = (server.tmp / "deploy.log").read_text().splitlines()
    assert len(log) == 1 and log[0] == f"deployed by {server.proc.pid}"  # once, in the server's main process


def test_client_with_bentoml_names(server: Server) -> None:
    with bl.SyncHTTPClient(server.url) as client:
        assert client.greet(name="ada", times=2) == "hello ada hello ada"
        reply = client.chat(chat={"messages": [{"role": "user", "content": "a b c"}]})
        assert reply == {"text": "a b c (t=1.0)", "tokens": 3}
        assert "".join(client.tokens(n=2)) == "t0 t1 "
        with pytest.raises(bl.client.APIClientError) as info:
            client.sample(prompt="p", temperature=9)
        assert info.value.status == 422 and info.value.field == "$.temperature"


def test_async_client_with_bentoml_names(server: Server) -> None:
    import asyncio

    async def main() -> tuple:
        async with bl.AsyncHTTPClient(server.url) as client:
            greeting = await client.greet(name="x")
            chunks = [c async for c in await client.atokens(n=3)]
            return greeting, "".join(chunks)

    assert asyncio.run(main()) == ("hello x", "a0 a1 a2 ")


def test_client_sends_pydantic_models(server: Server) -> None:
    sys.path.insert(0, str(HERE / "services"))
    try:
        from parity import Chat, Message
    finally:
        sys.path.remove(str(HERE / "services"))
    with bl.Client(server.url) as client:
        chat = Chat(messages=[Message(role="user", content="hey")], temperature=0.1)
        assert client.chat(chat=chat) == {"text": "hey (t=0.1)", "tokens": 1}


def _load_error(tmp_path: Path, source: str) -> str:
    (tmp_path / "svc.py").write_text(source)
    code = ("import bento_like.serving.targets as t; from bento_like.description import describe; "
            "describe(t.load_target(t.Target('svc.py:S', '.')))")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    return r.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ("    @bl.api(batchable=True)\n    def f(self, x: list[int], ctx: bl.Context) -> list[int]:\n        return x\n",
         "batch serves many requests"),
        ("    @bl.api(method='GET')\n    def f(self, x: list[int]) -> int:\n        return 1\n", "not a scalar"),
        ("    @bl.api(method='PUT')\n    def f(self, x: int) -> int:\n        return 1\n", "'POST' or 'GET'"),
        ("    @bl.api\n    def f(self, p: P) -> int:\n        return 1\n", "msgspec.Meta"),
    ],
)
def test_declarations_refused_with_a_reason(tmp_path: Path, body: str, words: str) -> None:
    source = ("from typing import Annotated\nimport annotated_types as at\nimport msgspec\nimport bento_like as bl\n\n"
              "class P(msgspec.Struct):\n    v: Annotated[int, at.Gt(0)]\n\n@bl.service\nclass S:\n" + body)
    assert words in _load_error(tmp_path, source)


def test_light_import_and_names() -> None:
    code = ("import sys, bento_like as bl; bl.validators.Shape; bl.models.BentoModel; bl.Context;"
            "print(sorted(m for m in ('pydantic', 'PIL', 'pandas', 'torch', 'starlette') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


def _probe(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-X", "importtime", "-m", "bento_like", "probe", *args],
                          capture_output=True, text=True, timeout=30, env={**os.environ, **(env or {})})


def test_exec_probe_answers_by_exit_code_with_the_stdlib_only(server: Server) -> None:
    ready = _probe(server.url + "/readyz")
    assert ready.returncode == 0 and ready.stdout.strip() == f"{server.url}/readyz: 200"
    loaded = {line.rsplit("|", 1)[-1].strip() for line in ready.stderr.splitlines() if "|" in line}
    assert not loaded & {"click", "httpx", "msgspec", "starlette", "numpy"}, loaded  # fast enough for every period
    port = server.url.rsplit(":", 1)[1]
    assert _probe("/livez", env={"BENTO_LIKE_PORT": port}).returncode == 0
    flag = server.tmp / "not-ready"
    flag.write_text("x")
    try:
        not_ready = _probe(server.url + "/readyz", "--timeout", "10")
    finally:
        flag.unlink()
    assert not_ready.returncode == 1 and "503" in not_ready.stderr and "__is_ready__" in not_ready.stderr
    gone = _probe("http://127.0.0.1:1/readyz")
    assert gone.returncode == 1 and "unreachable" in gone.stderr
    for bad in (["ftp://x"], ["--timeout", "0"], ["a", "b"]):
        assert _probe(*bad).returncode == 2, bad
