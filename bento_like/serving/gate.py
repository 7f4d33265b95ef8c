"""Refusals answered in the HTTP protocol itself, before any ASGI machinery runs.

Under overload most requests are refused (429), and what a refusal costs the event loop decides how much of
the machine is left to the model and to the requests that are accepted. Through the ASGI app a refusal costs
a task, the middleware and routing, two ``send`` calls and two socket writes (about 110 us of loop time per
request measured at 3x overload). ``GateProtocol`` is uvicorn's httptools protocol, except that once a
request's headers are parsed it asks the service app (``ServiceApp.early_refusal``) whether the API's
admission refuses it; if so it writes the whole response in one write and starts no task. The request's body,
if any, is read and discarded by the parser as usual, and the connection stays open for the next request.
What is admitted is marked in its scope so the endpoint does not admit it twice.

uvicorn's ``_start_asgi_task`` is the hook; with a uvicorn that lacks it, or without httptools, serving uses
uvicorn's own protocol and every refusal goes through the app as before.
"""

from __future__ import annotations

from typing import Any, Callable

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

Gate = Callable[[dict[str, Any]], "tuple[int, list[tuple[bytes, bytes]], bytes] | None"]

_NO_GATE = object()


def find_gate(app: Any) -> Gate | None:
    """The ``early_refusal`` of the service app under uvicorn's wrappers (each keeps the next in ``.app``)."""
    for _ in range(16):
        gate = getattr(app, "early_refusal", None)
        if gate is not None:
            return gate  # type: ignore[no-any-return]
        app = getattr(app, "app", None)
        if app is None:
            break
    return None


class GateProtocol(HttpToolsProtocol):
    def __init__(self, config: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        gate = getattr(config, "_bento_like_gate", _NO_GATE)
        if gate is _NO_GATE:
            gate = config._bento_like_gate = find_gate(self.app)
        self._gate = gate

    def _start_asgi_task(self, cycle: Any, app: Any) -> None:
        if self._gate is not None and app is self.app:
            refusal = self._gate(cycle.scope)
            if refusal is not None:
                self._answer(cycle, *refusal)
                return
        super()._start_asgi_task(cycle, app)

    def _answer(self, cycle: Any, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        """Write a complete response for ``cycle`` and finish it as the app would have."""
        content = [STATUS_LINE[status]]
        for name, value in cycle.default_headers:
            content += [name, b": ", value, b"\r\n"]
        for name, value in headers:
            content += [name, b": ", value, b"\r\n"]
        if not cycle.keep_alive:
            content.append(b"connection: close\r\n")
        content += [b"\r\n", body]
        cycle.response_started = True
        cycle.waiting_for_100_continue = False
        if not cycle.disconnected:
            self.transport.write(b"".join(content))
        cycle.response_complete = True
        cycle.message_event.set()
        if not cycle.keep_alive:
            self.transport.close()
        self.on_response_complete()


def protocol() -> str:
    """The ``http`` setting for uvicorn: this protocol where uvicorn has the hook, else uvicorn's choice."""
    if hasattr(HttpToolsProtocol, "_start_asgi_task"):
        return f"{__name__}:GateProtocol"
    return "auto"
