"""Process-level behaviour of `pkg serve`: readiness, graceful SIGTERM, overload, workers, reload."""

from __future__ import annotations

import concurrent.futures
import os
import re
import signal
import tempfile
import time
from pathlib import Path

import httpx
import pytest

HERE = Path(__file__).parent
SERVICES = HERE / "services"


def test_readyz_is_503_until_instances_are_built(start_server, tmp_path: Path) -> None:
    server = start_server("full.py:Full", cwd=SERVICES, ready=False, env={"INIT_DELAY": "3"})
    deadline = time.monotonic() + 20
    seen_503 = False
    while time.monotonic() < deadline:
        try:
            live = httpx.get(server.url + "/livez", timeout=1)
        except httpx.TransportError:
            time.sleep(0.05)
            continue
        assert live.status_code == 200
        ready = httpx.get(server.url + "/readyz", timeout=1)
        if ready.status_code == 503:
            seen_503 = True
            api = httpx.post(server.url + "/tag", json={"item": {"text": "early"}}, timeout=1)
            if api.status_code != 200:  # 200 only if it turned ready between the two calls
                assert api.status_code == 503 and api.headers["retry-after"] == "1"
        elif ready.status_code == 200:
            break
        time.sleep(0.1)
    assert seen_503, "readyz never reported not-ready during a 3 s __init__"
    server.wait_ready()


def test_sigterm_finishes_in_flight_requests_runs_shutdown_hooks_and_exits_0(start_server, tmp_path: Path) -> None:
    hooks = tmp_path / "hooks.log"
    server = start_server("full.py:Full", cwd=SERVICES, env={"HOOK_LOG": str(hooks)})
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        # 1.5 s: long enough to be in flight at the signal, well under the service's 2 s deadline (2.0 raced it)
        futures = [pool.submit(httpx.post, server.url + "/slow", json={"seconds": 1.5}, timeout=10) for _ in range(3)]
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # all three in flight (a fixed sleep lost one on a busy machine)
            if 'bento_like_requests_in_flight{api="slow"} 3' in httpx.get(server.url + "/metrics", timeout=5).text:
                break
            time.sleep(0.02)
        server.proc.send_signal(signal.SIGTERM)
        results = [f.result() for f in futures]
    assert [r.status_code for r in results] == [200, 200, 200]
    assert server.proc.wait(15) == 0
    assert hooks.read_text().split() == ["startup", "shutdown"]
    with pytest.raises(httpx.TransportError):
        httpx.get(server.url + "/livez", timeout=1)


def test_max_concurrency_answers_429_with_retry_after_at_once(start_server) -> None:
    server = start_server("limits.py:Limited", cwd=SERVICES)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        slow = [pool.submit(httpx.post, server.url + "/wait", json={"seconds": 1.5}, timeout=10) for _ in range(2)]
        time.sleep(0.3)
        extra = httpx.post(server.url + "/wait", json={"seconds": 0}, timeout=10)
        assert extra.status_code == 429
        assert int(extra.headers["retry-after"]) >= 1
        assert not any(f.done() for f in slow), "refused only once a slot came free, not at once"
        assert [f.result().status_code for f in slow] == [200, 200]
    assert httpx.post(server.url + "/wait", json={"seconds": 0}, timeout=10).status_code == 200
    metrics = httpx.get(server.url + "/metrics").text
    assert 'bento_like_rejections_total{api="wait",reason="overload"} 1' in metrics


def test_workers_share_the_port(start_server) -> None:
    server = start_server("limits.py:Limited", cwd=SERVICES, args=["--workers", "2"])
    pids = set()
    deadline = time.monotonic() + 20
    while len(pids) < 2 and time.monotonic() < deadline:
        # new connections are spread over the processes by the kernel
        with httpx.Client(base_url=server.url) as client:
            r = client.post("/pid", json={})
            if r.status_code == 200:
                pids.add(r.json())
    assert len(pids) == 2
    assert server.stop() == 0


def test_any_worker_answers_metrics_for_all_workers(start_server) -> None:
    server = start_server("limits.py:Limited", cwd=SERVICES, args=["--workers", "2"])
    shared = list(Path(tempfile.gettempdir()).glob(f"bento_like-metrics-{server.proc.pid}-*"))
    assert len(shared) == 1 and shared[0].is_dir()
    assert len(_worker_pids(server.url, 2)) == 2  # both workers served some of the /pid calls
    sent = 0
    for _ in range(30):  # a new connection each time: spread over both workers
        with httpx.Client(base_url=server.url) as client:
            assert client.post("/pid", json={}).status_code == 200
        sent += 1
    time.sleep(1.5)  # each worker publishes its samples about once a second
    pattern = re.compile(r'^bento_like_requests_total\{api="pid",status="200",worker="(\d)"\} (\d+)$', re.M)
    totals = []
    for _ in range(6):  # whichever worker answers, the scrape holds both, with the same totals
        with httpx.Client(base_url=server.url) as client:
            text = client.get("/metrics").text
        found = {worker: int(count) for worker, count in pattern.findall(text)}
        assert set(found) == {"0", "1"}, text
        assert text.count("# TYPE bento_like_requests_total counter") == 1
        totals.append(sum(found.values()))
    assert min(totals) >= sent  # plus the /pid calls that found the workers
    assert sorted(p.name for p in shared[0].iterdir()) == ["worker-0.json", "worker-1.json"]
    assert server.stop() == 0
    assert not shared[0].exists(), "the supervisor removes the workers' metrics directory when it exits"


def _worker_pids(url: str, want: int, timeout: float = 30) -> set[int]:
    pids: set[int] = set()
    deadline = time.monotonic() + timeout
    while len(pids) < want and time.monotonic() < deadline:
        try:
            with httpx.Client(base_url=url) as client:  # a new connection each time: the kernel spreads them
                r = client.post("/pid", json={}, timeout=5)
            if r.status_code == 200:
                pids.add(r.json())
        except httpx.TransportError:
            time.sleep(0.05)
    return pids


def test_a_dead_worker_is_restarted_and_readyz_says_so_meanwhile(start_server) -> None:
    server = start_server("limits.py:Limited", cwd=SERVICES, args=["--workers", "2"])
    before = _worker_pids(server.url, 2)
    assert len(before) == 2
    victim = min(before)
    os.kill(victim, signal.SIGKILL)
    saw_not_ready = False
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            r = httpx.get(server.url + "/readyz", timeout=2)
        except httpx.TransportError:
            continue
        if r.status_code == 503:
            saw_not_ready = True
            assert "not ready" in r.json()["error"]
        elif saw_not_ready:
            break
        time.sleep(0.05)
    assert saw_not_ready, "readyz never reported the missing worker"
    after = _worker_pids(server.url, 2)
    assert len(after) == 2 and victim not in after
    assert "restarting" in server.log()
    assert server.stop() == 0


def test_no_request_hangs_when_a_worker_dies_under_load(start_server) -> None:
    server = start_server("limits.py:Limited", cwd=SERVICES, args=["--workers", "2"])
    pids = _worker_pids(server.url, 2)

    def call() -> str:
        try:
            return str(httpx.post(server.url + "/wait", json={"seconds": 0.5}, timeout=15).status_code)
        except httpx.TransportError as exc:
            return type(exc).__name__

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(call) for _ in range(8)]
        time.sleep(0.2)
        os.kill(min(pids), signal.SIGKILL)
        started = time.monotonic()
        outcomes = [f.result(timeout=20) for f in futures]
    assert time.monotonic() - started < 15
    assert all(o in ("200", "429", "RemoteProtocolError", "ReadError", "ConnectError") for o in outcomes), outcomes
    # The kernel may have handed all 8 connections to the victim; either way the service keeps answering.
    deadline = time.monotonic() + 15
    while "200" not in outcomes and time.monotonic() < deadline:
        outcomes.append(call())
        time.sleep(0.05)
    assert "200" in outcomes, outcomes


def test_reload_restarts_on_source_change(start_server, tmp_path: Path) -> None:
    app_dir = tmp_path / "app"
    app_dir.mkdir()
    source = app_dir / "svc.py"
    source.write_text(
        "import bento_like as bl\n\n@bl.service\nclass S:\n    @bl.api\n    def version(self) -> int:\n        return 1\n"
    )
    server = start_server("svc.py:S", cwd=app_dir, args=["--reload"])
    assert httpx.post(server.url + "/version", json={}).json() == 1
    source.write_text(source.read_text().replace("return 1", "return 2"))
    deadline = time.monotonic() + 30
    value = None
    while time.monotonic() < deadline:
        try:
            r = httpx.post(server.url + "/version", json={}, timeout=2)
            value = r.json() if r.status_code == 200 else value
        except httpx.TransportError:
            pass
        if value == 2:
            break
        time.sleep(0.2)
    assert value == 2


def test_broken_service_fails_with_a_clear_message(tmp_path: Path) -> None:
    import subprocess
    import sys

    (tmp_path / "bad.py").write_text("class NotAService:\n    pass\n")
    r = subprocess.run(
        [sys.executable, "-m", "bento_like", "serve", "bad.py:NotAService", "--port", "1"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )
    assert r.returncode != 0
    assert "decorate the class with @bento_like.service" in r.stderr
    r = subprocess.run(
        [sys.executable, "-m", "bento_like", "serve", "missing.py:X", "--port", "1"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )
    assert r.returncode != 0 and "does not exist" in r.stderr
