"""A sync call that runs past its request's deadline keeps its thread until it returns: the server counts such
abandoned calls, logs them, and stops saying ready while they hold every request thread of an instance."""

from __future__ import annotations

import concurrent.futures
import re
import time
from pathlib import Path

import httpx

SERVICES = Path(__file__).parent / "services"
THREADS = 4  # request threads per instance (PlacementTuning.request_threads)


def abandoned(url: str) -> int:
    found = re.search(r'bento_like_abandoned_calls\{instance="0"\} (\d+)', httpx.get(url + "/metrics").text)
    return int(found.group(1)) if found else 0


def test_abandoned_calls_holding_every_thread_make_readyz_fail_until_they_return(start_server) -> None:
    server = start_server("hung.py:Hung", cwd=SERVICES)
    hang = {"seconds": 12.0}  # long enough to outlast the checks below on a busy machine
    with concurrent.futures.ThreadPoolExecutor(THREADS) as pool:
        first = httpx.post(server.url + "/hang", json=hang, timeout=30)
        assert first.status_code == 504
        # one thread held: the instance still serves, and the metric tells
        assert abandoned(server.url) == 1
        assert httpx.get(server.url + "/readyz", timeout=5).status_code == 200
        assert httpx.post(server.url + "/ping", timeout=30).status_code == 200
        rest = [pool.submit(httpx.post, server.url + "/hang", json=hang, timeout=30) for _ in range(THREADS - 1)]
        assert [f.result().status_code for f in rest] == [504] * (THREADS - 1)
    assert abandoned(server.url) == THREADS
    ready = httpx.get(server.url + "/readyz", timeout=5)
    assert ready.status_code == 503, ready.text
    body = ready.json()
    assert body["state"] == "blocked"
    assert f"all {THREADS} request threads of instance 0 run calls abandoned past their deadline" in body["error"]
    assert "'hang'" in body["error"]
    assert httpx.get(server.url + "/v2/health/ready", timeout=5).status_code == 503  # the protocol's probe agrees
    deadline = time.monotonic() + 10  # the server looks at its threads once a second
    while "/readyz answers 503" not in server.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "a call of API 'hang' still runs past its deadline" in server.log()
    assert "all 4 request threads of instance 0 run calls abandoned" in server.log()
    # the calls return: the threads are free and the server is ready again
    deadline = time.monotonic() + 60
    while abandoned(server.url):
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.2)
    assert httpx.get(server.url + "/readyz", timeout=5).status_code == 200
    assert httpx.get(server.url + "/v2/health/ready", timeout=5).status_code == 200
    assert httpx.post(server.url + "/ping", timeout=30).text == "pong"


def test_a_blocked_worker_makes_every_workers_readyz_fail(start_server) -> None:
    # 8 hung calls over 2 workers of 4 request threads: whichever way the kernel spreads the connections, one
    # worker gets at least 4 of them
    server = start_server("hung.py:Hung", cwd=SERVICES, args=["--workers", "2"])
    calls = 2 * THREADS

    def hang() -> int:
        with httpx.Client(timeout=30) as client:  # a connection of its own, so the kernel picks a worker for it
            return client.post(server.url + "/hang", json={"seconds": 12.0}).status_code

    with concurrent.futures.ThreadPoolExecutor(calls) as pool:
        assert list(pool.map(lambda _: hang(), range(calls))) == [504] * calls
    time.sleep(2.5)  # each worker looks at its threads once a second, and tells its siblings
    answers = []
    for _ in range(8):
        with httpx.Client(timeout=5) as client:
            answers.append(client.get(server.url + "/readyz"))
    assert all(r.status_code == 503 for r in answers), [r.text for r in answers]
    assert all(r.json()["state"] in ("blocked", "degraded") for r in answers)
    deadline = time.monotonic() + 60
    while httpx.get(server.url + "/readyz", timeout=5).status_code != 200:
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.2)
