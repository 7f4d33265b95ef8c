"""`bl.depends(Other)` where Other runs as its own server under `pkg serve`: processes, calls, errors, readiness,
failures, stopping, `depends(url=...)`, and the in-process fallback outside the runtime."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

import bento_like as bl
from bento_like.client import APIServerError

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc for process trees")

HERE = Path(__file__).parent
SERVICES = HERE / "services"


def _descendants(pid: int) -> set[int]:
    """Every process below ``pid``, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.fixture(scope="module")
def caller(tmp_path_factory: pytest.TempPathFactory):
    """distributed.py:Caller, its embedder slow to start: what /readyz said meanwhile is kept as `waiting`."""
    from live_server import Server

    tmp = tmp_path_factory.mktemp("distributed")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "EMBEDDER_INIT_DELAY": "1.5",
           "TOKENIZER_STARTED": str(tmp / "tokenizer-started")}
    server = Server("distributed.py:Caller", SERVICES, [], env, tmp / "server.log")
    server.waiting = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            ready = httpx.get(server.url + "/readyz", timeout=1)
        except httpx.TransportError:
            time.sleep(0.05)
            continue
        if ready.status_code == 200:
            break
        server.waiting.append(ready.json()["error"])
        time.sleep(0.05)
    server.wait_ready()
    yield server
    server.stop()


def _post(server, route: str, **body):
    return httpx.post(server.url + route, json=body, timeout=20)


def test_a_dependency_with_its_own_workers_or_resources_runs_in_other_processes(caller) -> None:
    pids = _post(caller, "/pids").json()
    assert pids["embedder"] != pids["caller"] and pids["tokenizer"] != pids["caller"]
    assert pids["tokenizer"] != pids["embedder"]
    # the tokenizer, depended on by both the caller and the embedder, runs once
    assert pids["tokenizer_via_embedder"] == pids["tokenizer"]
    # a service that declares nothing of how it runs is still built in the caller's process
    assert pids["helper"] == pids["caller"]
    embedder_pids = {_post(caller, "/pids").json()["embedder"] for _ in range(20)}
    below = _descendants(caller.proc.pid)
    assert embedder_pids <= below and pids["tokenizer"] in below


def test_sync_and_async_calls_reach_the_dependency(caller) -> None:
    assert _post(caller, "/encode", texts=["a b c", "d"]).json() == [3, 1]
    assert _post(caller, "/aencode", texts=["a b c", "d"]).json() == [3, 1]
    assert _post(caller, "/native_async", texts=["abc", "d"]).json() == [3, 1]


def test_arrays_and_bytes_travel_to_the_dependency(caller) -> None:
    with bl.Client(caller.url) as client:
        assert np.array_equal(client.scale(x=np.arange(4, dtype=np.float32)), np.arange(4, dtype=np.float32) * 3)
        assert client.reverse(data=b"abc\x00") == b"\x00cba"


def test_errors_of_the_dependency_reach_the_callers_client_with_status_and_message(caller) -> None:
    bad = _post(caller, "/bad_input")
    assert bad.status_code == 422
    assert bad.json()["error"].startswith("dependency 'embedder', API 'encode' answered 422: Expected `array`")
    boom = _post(caller, "/boom")
    assert boom.status_code == 500
    assert "dependency 'embedder', API 'boom' answered 500: API 'boom' raised an exception" in boom.json()["error"]
    assert _post(caller, "/caught").json() == 500  # the client's APIServerError, caught by the caller's code
    with bl.Client(caller.url, max_retries=0) as client, pytest.raises(APIServerError, match="dependency 'embedder'"):
        client.boom()


def test_readyz_waits_for_the_dependencies(caller) -> None:
    assert any("waiting for dependenc" in message and "'embedder'" in message for message in caller.waiting), \
        caller.waiting  # the embedder takes 1.5 s in __init__: the caller says so meanwhile


def test_a_dependency_that_dies_is_reported_by_readyz_and_restarted(caller) -> None:
    tokenizer = _post(caller, "/pids").json()["tokenizer"]
    os.kill(tokenizer, signal.SIGKILL)
    seen: list[str] = []  # the embedder, which calls the tokenizer too, may be reported first
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not any("dependency 'tokenizer' is not ready" in e for e in seen):
        ready = httpx.get(caller.url + "/readyz", timeout=5)
        if ready.status_code == 503:
            seen.append(ready.json()["error"])
        time.sleep(0.05)
    assert any("dependency 'tokenizer' is not ready" in e and "tokenizer.log" in e for e in seen), (seen, caller.log())
    caller.wait_ready(30)
    assert _post(caller, "/pids").json()["tokenizer"] != tokenizer
    assert "dependency tokenizer" in caller.log() and "restarting it" in caller.log()


def test_sigterm_stops_the_dependencies_too(start_server) -> None:
    server = start_server("distributed.py:Caller", cwd=SERVICES)
    _post(server, "/pids")
    below = _descendants(server.proc.pid)
    assert len(below) >= 4  # embedder (its supervisor and 2 workers), tokenizer
    assert server.stop() == 0
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(pid) for pid in below):
        time.sleep(0.1)
    assert not [pid for pid in below if _alive(pid)], "dependency processes outlived pkg serve"


def test_a_dependency_that_fails_to_start_fails_the_callers_startup(start_server) -> None:
    server = start_server("distributed.py:BrokenCaller", cwd=SERVICES, ready=False)
    assert server.proc.wait(60) == 1
    log = server.log()
    match = re.search(r"Error: dependency 'broken' failed to start: startup failed: RuntimeError: no weights found; "
                      r"its log: (\S+\.log)", log)
    assert match, log
    assert "no weights found" in Path(match.group(1)).read_text()


def test_a_dependency_that_never_turns_ready_fails_after_its_start_limit(start_server) -> None:
    started = time.monotonic()
    server = start_server("distributed.py:SluggishCaller", cwd=SERVICES, ready=False,
                          env={"BENTO_LIKE_DEPENDENCY_START_S": "3"})
    assert server.proc.wait(60) == 1
    assert time.monotonic() - started < 20  # not the 120 s its __init__ would take, nor a 30 s drain
    log = server.log()
    match = re.search(r"Error: dependency 'sluggish' was not ready 3 s after it started \(its start limit: "
                      r"BENTO_LIKE_DEPENDENCY_START_S\)"
                      r".*; its log: (\S+\.log)", log)
    assert match, log
    assert "never finishes loading" in Path(match.group(1)).read_text()


def test_depends_url_calls_a_server_that_runs_already(start_server) -> None:
    tokenizer = start_server("distributed.py:Tokenizer", cwd=SERVICES)
    server = start_server("distributed.py:UrlCaller", cwd=SERVICES, env={"TOKENIZER_URL": tokenizer.url})
    assert _post(server, "/split", text="a b").json() == ["a", "b"]
    assert _post(server, "/asplit", text="c d").json() == ["c", "d"]
    assert len(_descendants(server.proc.pid)) <= 1  # started no server (a multiprocessing helper at most)


def _services_module():
    from bento_like.sdk.loader import load_service

    return sys.modules[load_service("distributed.py:Caller", SERVICES).cls.__module__]


def test_outside_the_runtime_a_dependency_is_an_in_process_object() -> None:
    services = _services_module()
    caller = services.Caller()
    assert isinstance(caller.embedder, services.Embedder)
    assert caller.pids()["embedder"] == os.getpid()
    assert caller.encode(["a b", "c"]) == [2, 1]
    assert asyncio.run(caller.aencode(["a b"])) == [2]
    assert caller.embedder.to_sync.aencode(texts=["abc"]) == [3]


def test_depends_url_outside_the_runtime_is_a_client(start_server) -> None:
    tokenizer = start_server("distributed.py:Tokenizer", cwd=SERVICES)
    services = _services_module()

    @bl.service
    class Outside:
        remote = bl.depends(url=tokenizer.url)
        typed = bl.depends(services.Tokenizer, url=tokenizer.url).to_async

        @bl.api
        def split(self, text: str) -> list[str]:
            return self.remote.split(text=text)

    obj = Outside()
    assert obj.split("x y") == ["x", "y"]
    assert asyncio.run(obj.typed.split(text="p q")) == ["p", "q"]
    assert repr(Outside.remote) == f"depends(url={tokenizer.url!r})"


def test_sigkill_of_pkg_serve_leaves_no_dependency_behind(start_server) -> None:
    server = start_server("distributed.py:Caller", cwd=SERVICES)
    below = _descendants(server.proc.pid)
    server.proc.kill()  # no chance to stop them: the kernel's parent-death signal does
    server.proc.wait()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(_alive(pid) for pid in below):
        time.sleep(0.1)
    assert not [pid for pid in below if _alive(pid)], "dependency processes outlived a killed pkg serve"


BENTO_SERVICE = '''
import os

import bento_like as bl


@bl.service(name="scorer", resources={"cpu": 1}, workers=2)
class Scorer:
    weights = bl.model("weights:latest")

    @bl.api
    def score(self, x: float) -> dict:
        return {"score": x * self.weights["scale"], "pid": os.getpid()}


@bl.service(name="front")
class Front:
    scorer = bl.depends(Scorer)

    @bl.api
    def predict(self, x: float) -> dict:
        return {**self.scorer.score(x), "front": os.getpid()}
'''


def test_a_bento_packages_and_serves_its_separately_run_dependency(tmp_path: Path, home: Path, start_server) -> None:
    from bento_like.builders.bento import build_bento

    bl.models.save("weights", {"scale": 3.0}, framework="pickle")
    project = tmp_path / "proj"
    project.mkdir()
    (project / "service.py").write_text(BENTO_SERVICE)
    (project / "bentofile.yaml").write_text("service: service.py:Front\n")
    info = build_bento(project).bento.info
    assert [m.attr for m in info.models] == ["scorer.weights"]
    [entry] = info.dependencies
    assert (entry.name, entry.service, entry.workers, entry.resources["cpu"]) == ("scorer", "service:Scorer", 2, 1.0)
    bl.models.delete("weights:latest")  # served from the bento's own copy, by the dependency's process
    server = start_server(info.tag, cwd=tmp_path)
    body = _post(server, "/predict", x=2.0).json()
    assert body["score"] == 6.0 and body["pid"] != body["front"]


def test_the_rule_and_the_declaration_errors() -> None:
    from bento_like.sdk.service import get_spec, runs_on_its_own, separate_services, service_key

    services = _services_module()
    assert runs_on_its_own(get_spec(services.Embedder)) and runs_on_its_own(get_spec(services.Tokenizer))
    assert not runs_on_its_own(get_spec(services.Helper))
    # each once, though both Caller and Embedder depend on Tokenizer; url= dependencies are nobody's to start
    assert list(separate_services(get_spec(services.Caller))) == [
        service_key(services.Embedder), service_key(services.Tokenizer)]
    assert separate_services(get_spec(services.UrlCaller)) == {}
    with pytest.raises(bl.ServiceDefinitionError, match="takes a service class, url=..., or both"):
        bl.depends()
    with pytest.raises(bl.ServiceDefinitionError, match="takes a URL such as"):
        bl.depends(url="localhost:3000")
