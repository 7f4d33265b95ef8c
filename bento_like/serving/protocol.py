"""The HTTP/1.1 protocol `pkg serve` runs: uvicorn's httptools protocol, sending each response in one write,
with deadlines on what a client sends and a cap on open connections.

uvicorn writes a response's status line and headers as soon as the app sends ``http.response.start``, and its
body with the next message: two ``send`` calls, two TCP segments and two wake-ups of the client per response.
On loopback and on a pod's network the kernel does the receiving side's work inside each send, so under load
the second write is a large share of what the event loop spends per request (a third of the loop's samples
were in those two writes, measured with py-spy at 64 clients). Here the head is held until the first body
chunk and both go out together; nothing else changes.

The head is held only when it is the first write of a request's cycle and not an informational (1xx) answer:
``100 Continue`` must reach a client that waits for it before it sends its body. Anything held is sent before
the connection closes and when the response completes, whichever comes first, so no write can be lost.

Slow and idle clients (``HTTPTuning``): a request's headers must arrive whole within ``header_timeout_s`` of its
first byte (of the connection's opening, for its first request), and its body within ``body_timeout_s`` of its
headers; past either the client gets 408 and the connection is closed. A request reaches the app only once its
body is read, so a client that drips its body holds a connection, never a slot of an API (``max_queue``); the
bodies so read ahead are bounded together (``body_buffer_mib``: past it a connection's reading waits for room). At
``max_connections`` a new connection closes the oldest one with no request running, or gets 503 if all have one.

This subclasses uvicorn's protocol and overrides some of its private methods: ``check_hooks`` runs at import
and fails loudly on a uvicorn that lacks one, and pyproject.toml pins uvicorn to ``UVICORN_TESTED``.
"""

from __future__ import annotations

import asyncio
import inspect
import json
from typing import Any, Callable

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .tuning import HTTPTuning

UVICORN_TESTED = ("0.55", "0.56")
"""The uvicorn versions (from, up to excluded) whose private methods below this module was tested with."""
_HOOKS = ("connection_made", "connection_lost", "_start_asgi_task", "on_message_begin", "on_headers_complete",
          "on_body", "on_message_complete", "on_response_complete", "shutdown")
_SPARE_FILES = 128  # files a process keeps open besides connections: models, logs, the metrics directory
_STOP_GRACE_S = 1.0  # on a stop, a connection with no request running gets this long to send one (no reset)

_HEAD = b"HTTP/1.1 "
_INFORMATIONAL = b"HTTP/1.1 1"
_COPY_LIMIT = 64 * 1024  # above this a body goes out with writelines (one writev), not copied behind the head


class CoalescingTransport:
    """A transport whose next response head waits for the first body chunk, to be sent with it."""

    __slots__ = ("_transport", "_held", "expect_head")

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._held: bytes | None = None
        self.expect_head = False  # set when a request's cycle starts: its first write is the head

    def write(self, data: bytes) -> None:
        held = self._held
        if held is not None:
            self._held = None
            if len(data) <= _COPY_LIMIT:
                self._transport.write(held + data)
            else:
                self._transport.writelines((held, data))
            return
        if self.expect_head and data.startswith(_HEAD) and not data.startswith(_INFORMATIONAL):
            self.expect_head = False
            self._held = data
            return
        self._transport.write(data)

    def flush(self) -> None:
        held = self._held
        if held is not None:
            self._held = None
            self._transport.write(held)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def __getattr__(self, name: str) -> Any:  # everything else is the transport's own
        return getattr(self._transport, name)


def check_hooks(base: type) -> None:
    """Raise if uvicorn's protocol no longer has a method this module overrides: the override would be dead
    code and its deadlines silently gone."""
    missing = [name for name in _HOOKS if not inspect.isfunction(inspect.getattr_static(base, name, None))]
    if missing:
        import uvicorn

        low, high = UVICORN_TESTED
        raise RuntimeError(
            f"uvicorn {uvicorn.__version__} lacks {', '.join(missing)} of its httptools protocol, which "
            f"bento_like's serving/protocol.py overrides; install uvicorn>={low},<{high}"
        )


check_hooks(HttpToolsProtocol)


_RETRY = "retry-after: 1\r\n"


def _error(status: str, message: str, extra: str = "") -> bytes:
    body = json.dumps({"error": message, "status": int(status.split()[0])}).encode()
    return (f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n{extra}"
            "connection: close\r\n\r\n").encode() + body


class Connections:
    """The open connections of one server process, oldest first; the bytes of bodies read ahead of their API
    and the connections waiting for room to read more; and whether the server is stopping."""

    def __init__(self, limit: int, body_budget: int) -> None:
        self.limit = limit
        self.open: dict[HttpProtocol, None] = {}  # insertion-ordered: oldest first
        self.body_budget = body_budget
        self.buffered = 0
        self.waiting: dict[HttpProtocol, None] = {}
        self.stopping = False

    def release(self, conn: HttpProtocol) -> None:
        """``conn``'s body is the app's now (or gone): its bytes leave the budget, and waiting readers resume."""
        self.buffered -= conn.read_ahead
        conn.read_ahead = 0
        self.waiting.pop(conn, None)
        while self.waiting and self.buffered < self.body_budget:
            resumed = next(iter(self.waiting))
            del self.waiting[resumed]
            resumed.flow.resume_reading()

    def make_room(self) -> bool:
        """Close the oldest connection with no request running; False if every one has a request running."""
        for conn in self.open:
            if not conn.busy:
                del self.open[conn]  # gone now, though the transport tells us a loop turn later
                conn.refuse("503 Service Unavailable", "the server is at its limit of open connections", _RETRY)
                return True
        return False


class HttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol over a ``CoalescingTransport``, with the deadlines and the connection cap
    of ``HTTPTuning``. ``protocol_class`` makes one per server process, bound to its settings."""

    settings: HTTPTuning = HTTPTuning()
    body_limit: int = 64 * 1024 * 1024
    registry: Connections = Connections(settings.max_connections, int(settings.body_buffer_mib * 1024 * 1024))

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.busy = False  # a request was handed to the app and its response is not complete
        self.read_ahead = 0  # bytes of the body being read before the app has the request
        self._began = False  # some of a request arrived that the app has not been handed yet
        self._in_headers = False  # ... and its headers are not whole yet
        self._deadline: asyncio.TimerHandle | None = None
        self._deadline_for = ""  # what the deadline waits for: "headers", "body", or "stop"
        self._deferred: tuple[Any, Any] | None = None  # (cycle, app) whose body is still being read

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(CoalescingTransport(transport))  # type: ignore[arg-type]
        registry = self.registry
        if len(registry.open) >= registry.limit and not registry.make_room():
            self.transport.write(_error("503 Service Unavailable", "the server is at its limit of open connections",
                                        _RETRY))
            self.transport.close()
            return
        registry.open[self] = None
        self._arm("headers")

    def connection_lost(self, exc: Exception | None) -> None:
        self.registry.open.pop(self, None)
        self.registry.release(self)
        self._disarm()
        self._deferred = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._arm_for_pending()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._began = self._in_headers = True

    def on_headers_complete(self) -> None:
        self._in_headers = False
        if self._deadline_for == "headers":
            self._disarm()
        super().on_headers_complete()
        if self.registry.stopping and self.cycle is not None:
            self.cycle.keep_alive = False

    def _start_asgi_task(self, cycle: Any, app: Any) -> None:
        """Start the app on a request only once its body is read (unless it is too large: the app refuses it
        at once). A client waiting for ``100 Continue`` gets it from here, while the body is read."""
        if cycle.more_body and not self._over_limit(cycle):
            self._deferred = (cycle, app)
            if cycle.waiting_for_100_continue:
                cycle.waiting_for_100_continue = False
                self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            return
        self._deferred = None
        self._began = False
        self._disarm()
        if self.read_ahead:
            self.registry.release(self)
        self.busy = True
        self.transport.expect_head = True  # type: ignore[attr-defined]
        super()._start_asgi_task(cycle, app)

    def _over_limit(self, cycle: Any) -> bool:
        if len(cycle.body) > self.body_limit:
            return True
        for name, value in cycle.scope["headers"]:
            if name == b"content-length":
                return value.isdigit() and int(value) > self.body_limit
        return False

    def on_body(self, body: bytes) -> None:
        deferred = self._deferred
        if deferred is None or deferred[0] is not self.cycle:
            super().on_body(body)
            return
        cycle = self.cycle
        cycle.body += body  # read on without uvicorn's pause at 64 KiB: the app is not there yet to take it
        registry = self.registry
        self.read_ahead += len(body)
        registry.buffered += len(body)
        if len(cycle.body) > self.body_limit:
            self._start_asgi_task(*deferred)
        elif registry.buffered > registry.body_budget and registry.buffered > self.read_ahead:
            self.flow.pause_reading()  # others' bodies fill the budget: wait for room, under the body deadline
            registry.waiting[self] = None

    def on_message_complete(self) -> None:
        super().on_message_complete()
        deferred = self._deferred
        if deferred is not None and deferred[0] is self.cycle:
            self._start_asgi_task(*deferred)

    def on_response_complete(self) -> None:
        self.busy = False
        self.transport.flush()  # type: ignore[attr-defined]
        super().on_response_complete()
        self._arm_for_pending()  # a next request may have begun while this one ran

    def shutdown(self) -> None:
        """A stop lets a connection with no request running send one for ``_STOP_GRACE_S`` (a client that has
        just connected, or is sending on a kept-open connection, would otherwise lose it); that request is the
        connection's last."""
        if self.busy or self._began:
            if self.cycle is not None:
                self.cycle.keep_alive = False
            return
        self._unset_keepalive_if_required()
        self._arm("stop")

    def _arm_for_pending(self) -> None:
        """Time what is still to come of a request the app does not have yet. Armed only once a read left it
        incomplete: most requests arrive whole, and cost no timer. A first request's headers keep the timer
        armed when the connection opened."""
        if self.busy:
            return
        if self._in_headers:
            want = "headers"
        elif self._deferred is not None:
            want = "body"
        else:
            return
        if self._deadline_for != want:
            self._arm(want)

    def _arm(self, what: str) -> None:
        self._disarm()
        seconds = {"headers": self.settings.header_timeout_s, "body": self.settings.body_timeout_s}.get(
            what, _STOP_GRACE_S)
        self._deadline = self.loop.call_later(seconds, self._expired, seconds)
        self._deadline_for = what

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self._deadline_for = ""

    def _expired(self, seconds: float) -> None:
        what = self._deadline_for
        self._deadline = None
        self._deadline_for = ""
        if self.busy or self.transport.is_closing():  # on_response_complete re-arms it for a next request
            return
        if not self._began:  # an idle connection (or one a stop closes): nothing to answer
            self.transport.close()
            return
        self.refuse("408 Request Timeout", f"the client did not send its request {what} within {seconds:g} s")

    def refuse(self, status: str, message: str, extra: str = "") -> None:
        """Answer a request the app has not seen (if one began) and close the connection."""
        self._deferred = None
        if self._began and not self.busy:
            self.transport.write(_error(status, message, extra))
        self.transport.close()


def protocol_class(settings: HTTPTuning, body_limit: int) -> Callable[..., HttpProtocol]:
    """The protocol of one server process: its settings, its largest body, its own registry of connections.

    The connection cap stays under the process's open-file limit: past that, accept() fails and the server
    can't even refuse."""
    limit = settings.max_connections
    try:
        import resource

        files = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if files != resource.RLIM_INFINITY:
            limit = max(1, min(limit, files - _SPARE_FILES))
    except (ImportError, ValueError, OSError):
        pass
    registry = Connections(limit, int(settings.body_buffer_mib * 1024 * 1024))
    return type("HttpProtocol", (HttpProtocol,), {"settings": settings, "body_limit": body_limit,
                                                  "registry": registry})
