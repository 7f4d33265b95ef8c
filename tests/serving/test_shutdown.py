"""SIGTERM under load, one process and ``--workers 2``: readiness turns 503 at once, and every connection the
server accepted gets its answer. A client may find the port closed (connection refused: nothing was sent, it
can go elsewhere); it must never be reset or left without a response once connected."""

from __future__ import annotations

import http.client
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

SERVICES = Path(__file__).parent / "services"
CLIENTS = 16


def _request(port: int, method: str, path: str, body: bytes = b"") -> int:
    """One request on a new connection (http.client: light enough that 16 client threads leave the test's
    own thread its turn)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    try:
        conn.request(method, path, body, {"Content-Type": "application/json"} if body else {})
        return conn.getresponse().status
    finally:
        conn.close()


def _load(port: int, outcomes: list[str], refused_at: list[float]) -> None:
    """One client, a new connection per request (the case a kept-open listener resets), until the port closes."""
    while True:
        try:
            outcomes.append(str(_request(port, "POST", "/wait", b'{"seconds": 0.05}')))
        except ConnectionRefusedError:
            outcomes.append("refused")
            refused_at.append(time.monotonic())
            return  # the listener is closed: this client would go to another replica now
        except (OSError, http.client.HTTPException) as exc:
            outcomes.append(f"lost: {type(exc).__name__}: {exc}")


def _stop_under_load(server, watch_readiness: bool, drain_s: float = 0.0) -> tuple[list[str], list[tuple[int, float]]]:
    """SIGTERM once every client has had an answer; each request's outcome, and /readyz's answers after it.
    No connection is refused before ``drain_s`` has passed since the signal."""
    per_client: list[list[str]] = [[] for _ in range(CLIENTS)]
    refused_at: list[float] = []
    threads = [threading.Thread(target=_load, args=(server.port, out, refused_at), daemon=True) for out in per_client]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 20
    while not all("200" in out for out in per_client) and time.monotonic() < deadline:
        time.sleep(0.05)  # every client is under way: the signal lands in the middle of the load
    server.proc.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    ready = []
    while watch_readiness and time.monotonic() - signalled < 10:
        try:
            ready.append((_request(server.port, "GET", "/readyz"), time.monotonic() - signalled))
        except OSError:
            break
        time.sleep(0.02)
    for t in threads:
        t.join(30)
    assert server.proc.wait(30) == 0
    assert all("200" in out for out in per_client) and not any(t.is_alive() for t in threads)
    outcomes = [o for out in per_client for o in out]
    lost = [o for o in outcomes if o not in ("200", "refused")]
    assert not lost, f"{len(lost)} of {len(outcomes)} requests lost: {lost[:5]}"
    early = [round(t - signalled, 2) for t in refused_at if t - signalled < drain_s]
    assert not early, f"connections refused {early} s after SIGTERM, inside the {drain_s} s drain delay"
    print(f"{outcomes.count('200')} answered, {outcomes.count('refused')} refused, 0 lost")
    return outcomes, ready


@pytest.mark.parametrize(
    ("args", "env"),
    [([], {"BENTO_LIKE_DRAIN_S": "2"}), (["--workers", "2", "--drain-delay", "2"], {"BENTO_LIKE_DRAIN_S": "0"})],
    ids=["one-process-env", "two-workers-flag"],
)
def test_sigterm_under_load_loses_no_accepted_request(start_server, args: list[str], env: dict[str, str]) -> None:
    """With a drain delay (a load balancer's time to notice /readyz): served on, then closed with no reset. The
    delay comes from BENTO_LIKE_DRAIN_S or from --drain-delay, which wins over it."""
    server = start_server("limits.py:Limited", cwd=SERVICES, args=[*args, "--max-concurrency", "1000"], env=env)
    outcomes, ready = _stop_under_load(server, watch_readiness=True, drain_s=2.0)
    # readiness turned 503 at once (a first answer may come before the signal is handled) and stayed so while
    # the server went on serving
    first = next((i for i, (status, _) in enumerate(ready) if status == 503), None)
    assert first is not None and ready[first][1] < 1.5, ready
    assert {status for status, _ in ready[first:]} == {503} and ready[-1][1] > 1.0, ready


@pytest.mark.parametrize("args", [[], ["--workers", "2"]], ids=["one-process", "two-workers"])
def test_sigterm_under_load_without_a_drain_delay_resets_no_connection(start_server, args: list[str]) -> None:
    """The default: the port closes as soon as the connections the kernel already accepted are taken."""
    server = start_server("limits.py:Limited", cwd=SERVICES, args=[*args, "--max-concurrency", "1000"])
    _stop_under_load(server, watch_readiness=False)


def test_a_port_in_use_is_one_error_line_and_exit_1(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        for extra in ([], ["--workers", "2"]):
            r = subprocess.run(
                [sys.executable, "-m", "bento_like", "serve", "limits.py:Limited", "--port", str(port), *extra],
                cwd=SERVICES, capture_output=True, text=True, timeout=60,
            )
            assert r.returncode == 1, r.stderr
            errors = [line for line in r.stderr.splitlines() if "Error" in line or "Traceback" in line]
            assert errors == [f"Error: cannot listen on 127.0.0.1:{port}: the address is already in use"], r.stderr


def test_the_drain_delay_defaults_to_5_s_in_a_kubernetes_pod_and_the_knob_wins() -> None:
    from bento_like.serving.tuning import Tuning

    assert Tuning.from_env({}).http.drain_s == 0.0  # locally: Ctrl-C stops at once
    in_pod = {"KUBERNETES_SERVICE_HOST": "10.96.0.1"}
    assert Tuning.from_env(in_pod).http.drain_s == 5.0
    assert Tuning.from_env({**in_pod, "BENTO_LIKE_DRAIN_S": "0"}).http.drain_s == 0.0
    assert Tuning.from_env({**in_pod, "BENTO_LIKE_DRAIN_S": "12"}).http.drain_s == 12.0
