"""Slow and idle clients against a real `pkg serve` on 127.0.0.1: a connection that sends its headers or its
body slowly, or nothing at all, is closed within its deadline, and none of them holds a slot of an API.

The server runs with small deadlines (the BENTO_LIKE_ knobs) so each test takes seconds; docs/serving.md
gives the defaults."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

SERVICES = Path(__file__).parent / "services"
SMALL = {
    "BENTO_LIKE_HEADER_TIMEOUT_S": "1.5",
    "BENTO_LIKE_BODY_TIMEOUT_S": "2",
    "BENTO_LIKE_KEEP_ALIVE_S": "1",
}


def _open(server, count: int) -> list[socket.socket]:
    socks = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        socks.append(sock)
    return socks


def _closed_by_server(sock: socket.socket, within: float) -> bytes | None:
    """What the server sent before closing, or None if it kept the connection open ``within`` seconds."""
    sock.settimeout(within)
    received = b""
    try:
        while True:
            chunk = sock.recv(4096)
            if not chunk:
                return received
            received += chunk
    except ConnectionResetError:
        return received
    except socket.timeout:
        return None


def _outcomes(socks: list[socket.socket], within: float) -> list[bytes | None]:
    """``_closed_by_server`` for each socket, all within one deadline."""
    deadline = time.monotonic() + within
    return [_closed_by_server(s, max(0.01, deadline - time.monotonic())) for s in socks]


def test_idle_connections_are_closed_after_the_header_timeout(start_server) -> None:
    server = start_server("limits.py:Limited", cwd=SERVICES, env=SMALL)
    socks = _open(server, 50)
    started = time.monotonic()
    try:
        outcomes = _outcomes(socks, 10)
        assert all(o is not None for o in outcomes), "an idle connection outlived its deadline"
        assert time.monotonic() - started < 10
    finally:
        for s in socks:
            s.close()


def test_slow_headers_get_408_and_are_closed(start_server) -> None:
    server = start_server("limits.py:Limited", cwd=SERVICES, env=SMALL)
    socks = _open(server, 20)
    try:
        for s in socks:
            s.sendall(b"POST /wait HTTP/1.1\r\nHost: t\r\n")
        deadline = time.monotonic() + 10
        for i in range(20):  # a header line now and then: each keeps a per-read timeout from ever firing
            if time.monotonic() > deadline:
                break
            for s in socks:
                try:
                    s.sendall(f"X-Drip-{i}: 1\r\n".encode())
                except OSError:
                    pass
            time.sleep(0.25)
        outcomes = _outcomes(socks, 10)
        assert all(o is not None and o.startswith(b"HTTP/1.1 408") for o in outcomes), outcomes[:3]
    finally:
        for s in socks:
            s.close()


def test_slow_bodies_hold_no_slot_of_the_api_and_time_out(start_server) -> None:
    # max_queue 4: before, 5 connections that sent their headers and then dripped their bodies took every
    # slot of the API, and a whole request got 429 for as long as they dripped.
    server = start_server("limits.py:Limited", cwd=SERVICES, env=SMALL,
                          args=["--max-queue", "4", "--max-concurrency", "1000"])
    socks = _open(server, 8)
    try:
        for s in socks:
            s.sendall(b"POST /wait HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 40\r\n\r\n{")
        time.sleep(0.3)
        r = httpx.post(server.url + "/wait", json={"seconds": 0}, timeout=10)
        assert r.status_code == 200, r.text
        for s in socks:
            s.sendall(b" ")
        outcomes = _outcomes(socks, 10)
        assert all(o is not None and o.startswith(b"HTTP/1.1 408") for o in outcomes), outcomes[:3]
        assert b"body" in outcomes[0]
    finally:
        for s in socks:
            s.close()


def test_a_keep_alive_connection_is_closed_after_the_idle_timeout(start_server) -> None:
    server = start_server("limits.py:Limited", cwd=SERVICES, env=SMALL)
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        body = b'{"seconds": 0}'
        sock.sendall(b"POST /wait HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        started = time.monotonic()
        received = _closed_by_server(sock, 10)
        assert received is not None and received.startswith(b"HTTP/1.1 200")
        assert time.monotonic() - started < 4  # BENTO_LIKE_KEEP_ALIVE_S=1 (uvicorn alone: 5 s)


def test_at_the_connection_cap_slow_connections_make_room_for_new_ones(start_server) -> None:
    env = {**SMALL, "BENTO_LIKE_HEADER_TIMEOUT_S": "60", "BENTO_LIKE_MAX_CONNECTIONS": "30"}
    server = start_server("limits.py:Limited", cwd=SERVICES, env=env)
    socks = _open(server, 40)  # more than the cap, and none of them finishes its headers
    try:
        for s in socks:
            s.sendall(b"POST /wait HTTP/1.1\r\n")
        time.sleep(0.3)
        for _ in range(5):
            r = httpx.post(server.url + "/wait", json={"seconds": 0}, timeout=10)
            assert r.status_code == 200, r.text
        evicted = _outcomes(socks, 2)
        assert sum(o is not None for o in evicted) >= 10  # the oldest incomplete requests were closed
    finally:
        for s in socks:
            s.close()


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_bodies_read_ahead_of_their_api_stay_within_the_buffer_budget(start_server) -> None:
    # 24 clients each send 8 MB of a 16 MB body and stall: without a budget the server holds all 192 MB.
    env = {**SMALL, "BENTO_LIKE_BODY_TIMEOUT_S": "8", "BENTO_LIKE_BODY_BUFFER_MIB": "8"}
    server = start_server("limits.py:Limited", cwd=SERVICES, env=env, args=["--max-concurrency", "1000"])
    before = _rss_mib(server.proc.pid)
    socks: list[socket.socket] = []
    chunk = b"0" * (1 << 20)
    try:
        for _ in range(24):
            s = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            socks.append(s)
            s.sendall(b"POST /wait HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 16000000\r\n\r\n")
            s.settimeout(0.2)
            try:
                for _ in range(8):
                    s.sendall(chunk)
            except socket.timeout:
                pass  # the server stopped reading this one: its bytes wait in the kernel's buffers
        time.sleep(1.0)
        grown = _rss_mib(server.proc.pid) - before
        assert grown < 80, f"the server's memory grew {grown:.0f} MiB with an 8 MiB budget"
        r = httpx.post(server.url + "/wait", json={"seconds": 0}, timeout=10)
        assert r.status_code == 200, r.text  # a small request still gets through
    finally:
        for s in socks:
            s.close()


def test_a_bad_setting_stops_the_server_with_one_error_line(tmp_path: Path) -> None:
    from live_server import free_port

    r = subprocess.run(
        [sys.executable, "-m", "bento_like", "serve", "limits.py:Limited", "--port", str(free_port())],
        cwd=SERVICES, capture_output=True, text=True, timeout=30,
        env={**os.environ, "BENTO_LIKE_HEADER_TIMEOUT_S": "0"},
    )
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == ["Error: BENTO_LIKE_HEADER_TIMEOUT_S must be > 0, got 0.0"]


@pytest.mark.parametrize("value", ["-1", "soon", "inf"])
def test_settings_are_validated(value: str) -> None:
    from bento_like.serving.tuning import SettingsError, Tuning

    with pytest.raises(SettingsError, match="BENTO_LIKE_BODY_TIMEOUT_S"):
        Tuning.from_env({"BENTO_LIKE_BODY_TIMEOUT_S": value})
