"""The HTTP/1.1 protocol `pkg serve` runs (bento_like/serving/protocol.py), checked on a real socket: each
response leaves in one write, and holding the head back breaks none of what HTTP clients rely on."""

from __future__ import annotations

import json
import os
import socket
import struct
import time
from pathlib import Path

import pytest

SERVICES = Path(__file__).parent / "services"
TCP_INFO_DATA_SEGS_IN = 152  # offset of tcpi_data_segs_in (u32) in Linux's struct tcp_info (since 4.6)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    from live_server import Server

    srv = Server("wire.py:Wire", SERVICES, [], dict(os.environ), tmp_path_factory.mktemp("wire") / "server.log")
    srv.wait_ready()
    yield srv
    srv.stop()


def connect(server) -> socket.socket:
    host, port = server.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def request(path: str, body: bytes, extra: str = "") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            f"{extra}\r\n").encode() + body


class Reader:
    """Responses read off a socket, one at a time (Content-Length bodies)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def head(self) -> tuple[int, dict[str, str]]:
        while b"\r\n\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            assert chunk, "the server closed the connection"
            self.buf += chunk
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
        return int(status_line.split()[1]), headers

    def body(self, length: int) -> bytes:
        while len(self.buf) < length:
            chunk = self.sock.recv(65536)
            assert chunk, "the server closed the connection"
            self.buf += chunk
        body, self.buf = self.buf[:length], self.buf[length:]
        return body

    def response(self) -> tuple[int, bytes]:
        status, headers = self.head()
        return status, self.body(int(headers["content-length"]))


def data_segments_in(sock: socket.socket) -> int:
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    if len(info) < TCP_INFO_DATA_SEGS_IN + 4:
        pytest.skip("this kernel's TCP_INFO has no data segment count")
    return struct.unpack_from("I", info, TCP_INFO_DATA_SEGS_IN)[0]


def test_each_response_arrives_in_one_segment(server) -> None:
    # uvicorn's own protocol sends the head and the body with two writes: two segments per response.
    with connect(server) as sock:
        reader = Reader(sock)
        before = data_segments_in(sock)
        for i in range(40):
            sock.sendall(request("/echo", json.dumps({"x": i}).encode()))
            assert reader.response() == (200, str(i).encode())
        segments = data_segments_in(sock) - before
    assert segments == 40, f"{segments} data segments for 40 responses"


def test_100_continue_goes_out_before_the_body_is_sent(server) -> None:
    body = b'{"x": 7}'
    with connect(server) as sock:
        sock.settimeout(5)
        sock.sendall(request("/echo", body, "Expect: 100-continue\r\n")[: -len(body)])
        reader = Reader(sock)
        status, _ = reader.head()  # a held-back 100 would leave the client waiting here until the timeout
        assert status == 100
        sock.sendall(body)
        assert reader.response() == (200, b"7")


def test_pipelined_requests_are_answered_in_order(server) -> None:
    with connect(server) as sock:
        sock.sendall(b"".join(request("/echo", json.dumps({"x": i}).encode()) for i in range(5)))
        reader = Reader(sock)
        assert [reader.response() for _ in range(5)] == [(200, str(i).encode()) for i in range(5)]


def test_an_error_response_is_whole(server) -> None:
    with connect(server) as sock:
        sock.sendall(request("/echo", b'{"x": "seven"}'))
        status, body = Reader(sock).response()
    assert status == 422 and json.loads(body)["field"] == "$.x"


def test_a_stream_starts_before_it_ends(server) -> None:
    # The head waits for the first chunk, not for the end of the stream.
    with connect(server) as sock:
        started = time.monotonic()
        sock.sendall(request("/ticks", b'{"n": 3, "gap": 1.0}'))
        reader = Reader(sock)
        status, headers = reader.head()
        while b"data: 0" not in reader.buf:
            reader.buf += sock.recv(65536)
        first = time.monotonic() - started
        while b"0\r\n\r\n" not in reader.buf:  # the chunked stream's end
            chunk = sock.recv(65536)
            assert chunk
            reader.buf += chunk
        total = time.monotonic() - started
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    assert b"data: 2" in reader.buf
    assert first < 1.0 <= total, (first, total)


def test_the_uvicorn_hooks_the_protocol_overrides_exist() -> None:
    """protocol.py overrides private methods of uvicorn's httptools protocol; a uvicorn that renamed one would
    leave our code silently unused. The import-time check must name the missing hook and the tested range."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    from bento_like.serving import protocol

    protocol.check_hooks(HttpToolsProtocol)  # the installed uvicorn has every hook

    class Renamed(HttpToolsProtocol):
        pass

    Renamed._start_asgi_task = property()  # type: ignore[assignment]  # no longer a method
    with pytest.raises(RuntimeError, match=r"_start_asgi_task.*uvicorn"):
        protocol.check_hooks(Renamed)


def test_uvicorn_is_pinned_to_the_range_the_protocol_was_tested_with() -> None:
    import re

    import uvicorn
    from packaging.version import Version

    from bento_like.serving.protocol import UVICORN_TESTED

    pyproject = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    line = re.search(r'^\s*"uvicorn\[standard\]([^"]*)"', pyproject, re.M)
    assert line, "no uvicorn dependency in pyproject.toml"
    spec = line.group(1).replace(" ", "")
    low, high = UVICORN_TESTED
    assert spec == f">={low},<{high}", f"uvicorn must be pinned to the tested range {low}..{high}, not {spec!r}"
    assert Version(low) <= Version(uvicorn.__version__) < Version(high)
