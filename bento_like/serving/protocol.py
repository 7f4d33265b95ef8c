"""The HTTP/1.1 protocol `pkg serve` runs: uvicorn's httptools protocol, sending each response in one write.

uvicorn writes a response's status line and headers as soon as the app sends ``http.response.start``, and its
body with the next message: two ``send`` calls, two TCP segments and two wake-ups of the client per response.
On loopback and on a pod's network the kernel does the receiving side's work inside each send, so under load
the second write is a large share of what the event loop spends per request (a third of the loop's samples
were in those two writes, measured with py-spy at 64 clients). Here the head is held until the first body
chunk and both go out together; nothing else changes.

The head is held only when it is the first write of a request's cycle and not an informational (1xx) answer:
``100 Continue`` must reach a client that waits for it before it sends its body. Anything held is sent before
the connection closes and when the response completes, whichever comes first, so no write can be lost.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

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


class HttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol over a ``CoalescingTransport``."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(CoalescingTransport(transport))  # type: ignore[arg-type]

    def _start_asgi_task(self, cycle: Any, app: Any) -> None:
        self.transport.expect_head = True  # type: ignore[attr-defined]
        super()._start_asgi_task(cycle, app)

    def on_response_complete(self) -> None:
        self.transport.flush()  # type: ignore[attr-defined]
        super().on_response_complete()
