"""Refusals answered by the HTTP protocol before the app (bento_like.serving.gate), over raw sockets: the
responses are whole and in order, keep-alive and Connection: close are honoured, bodies of refused requests
are skipped, and the refusals are counted like any other."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import time
from pathlib import Path

import httpx
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from bento_like.sdk.loader import load_service
from bento_like.serving.app import ServeOptions, create_app
from bento_like.serving.gate import find_gate

SERVICES = Path(__file__).parent / "services"


def _request(body: bytes, close: bool = False) -> bytes:
    head = (
        "POST /double HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n" + ("Connection: close\r\n" if close else "") + "\r\n"
    )
    return head.encode() + body


def _read_responses(sock: socket.socket, count: int, timeout: float = 10.0) -> tuple[list[tuple[int, dict, bytes]], bool]:
    """Read ``count`` responses (status, headers, body); and whether the server closed the connection after."""
    sock.settimeout(timeout)
    data = b""
    responses: list[tuple[int, dict, bytes]] = []
    closed = False
    while len(responses) < count or not closed:
        while b"\r\n\r\n" in data and len(responses) < count:
            head, rest = data.split(b"\r\n\r\n", 1)
            lines = head.decode("latin-1").split("\r\n")
            headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
            length = int(headers["content-length"])
            if len(rest) < length:
                break
            responses.append((int(lines[0].split()[1]), headers, rest[:length]))
            data = rest[length:]
        if len(responses) == count:
            sock.settimeout(0.2)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            break  # still open
        if not chunk:
            closed = True
            break
        data += chunk
    assert not data, f"bytes after the last response: {data[:200]!r}"
    return responses, closed


def test_refusals_before_the_app_are_whole_ordered_and_keep_the_connection(start_server) -> None:
    # One request runs (2 s), one waits in the queue (max_queue 1): every other is refused at once.
    server = start_server("batched.py:Batched", cwd=SERVICES, env={"MAX_QUEUE": "1", "BATCH_DELAY": "2", "MAX_LATENCY_MS": "10000"})
    port = int(server.url.rsplit(":", 1)[1])

    async def fill() -> list[int]:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            running = asyncio.create_task(client.post("/double", json={"x": [[1, 1]] * 8}))
            await asyncio.sleep(0.1)
            queued = asyncio.create_task(client.post("/double", json={"x": [[2, 2]]}))
            await asyncio.sleep(0.1)
            with socket.create_connection(("127.0.0.1", port)) as sock:
                # Two refused requests in one write (pipelined), the first with a large body that must be
                # skipped, then one that asks to close the connection.
                big = json.dumps({"x": [[3.0, 3.0]] * 2000}).encode()
                sock.sendall(_request(big) + _request(b'{"x": [[4, 4]]}'))
                refused, closed = _read_responses(sock, 2)
                assert not closed
                sock.sendall(_request(b'{"x": [[5, 5]]}', close=True))
                last, closed = _read_responses(sock, 1)
            assert closed, "Connection: close was not honoured"
            for status, headers, body in refused + last:
                assert status == 429, (status, body)
                assert int(headers["retry-after"]) >= 1
                assert headers["content-type"] == "application/json"
                error = json.loads(body)
                assert error["status"] == 429 and "max_queue" in error["error"]
            assert last[0][1].get("connection") == "close"
            return [(await running).status_code, (await queued).status_code]

    started = time.perf_counter()
    assert asyncio.run(fill()) == [200, 200]  # nothing accepted was lost
    assert time.perf_counter() - started < 8
    # The same connection-less client sees the server as usual afterwards.
    r = httpx.post(server.url + "/double", json={"x": [[6, 6]]})
    assert r.status_code == 200 and r.json() == [[12.0, 12.0]]
    metrics = httpx.get(server.url + "/metrics").text
    assert re.search(r'bento_like_rejections_total\{api="double",reason="queue_full"\} 3\b', metrics), metrics
    assert re.search(r'bento_like_requests_total\{api="double",status="429"\} 3\b', metrics)
    assert re.search(r'bento_like_request_duration_seconds_count\{api="double",status="429"\} 3\b', metrics)


def test_the_gate_is_found_under_uvicorns_wrappers() -> None:
    app = create_app(load_service("batched.py:Batched", str(SERVICES)), ServeOptions())
    gate = find_gate(ProxyHeadersMiddleware(app))
    assert gate is not None and gate.__self__ is app
    assert find_gate(object()) is None


def test_pkg_serve_uses_the_gate_protocol() -> None:
    from bento_like.serving.workers import _http_protocol

    assert _http_protocol() == "bento_like.serving.gate:GateProtocol"  # the uvicorn installed has the hook
