"""One server process: uvicorn on our protocol, listening on a socket bound here, draining before it closes it."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import logging
import signal
import socket
import struct
import sys
import threading
import time
from typing import Any

from .targets import ServeError

log = logging.getLogger("bento_like.serving")


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        reason = {errno.EADDRINUSE: "the address is already in use", errno.EACCES: "permission denied",
                  errno.EADDRNOTAVAIL: "no interface has this address"}.get(exc.errno or 0, exc.strerror or str(exc))
        raise ServeError(f"cannot listen on {host}:{port}: {reason}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def uvicorn_server(app: Any, server_args: dict[str, Any], supervised: bool = False) -> Any:
    """uvicorn's server for ``app`` on our protocol (serving/protocol.py), stopping as the module says; a
    ``supervised`` worker also retires on SIGUSR1 (a rolling reload replaced it)."""
    import uvicorn

    from .protocol import protocol_class

    state = app.state.server
    http = state.tuning.http
    protocol = protocol_class(http, state.max_body_size)
    config = uvicorn.Config(app, http=protocol, **server_args)

    class Server(uvicorn.Server):
        """uvicorn's server, except that it drains before it closes the port, and that a SIGTERM/SIGINT it
        handled gracefully ends the process with 0.

        uvicorn re-raises the signal after its graceful shutdown, so the process dies "by signal"; an
        orchestrator (and a user's shell) should see a clean exit when every request was answered.
        """

        retiring = False
        hangup = False

        @contextlib.contextmanager
        def capture_signals(self):  # type: ignore[no-untyped-def]
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            handlers: dict[int, Any] = {signal.SIGINT: self.handle_exit, signal.SIGTERM: self.handle_exit}
            if supervised:  # SIGHUP is the supervisor's to handle; a terminal's hangup reaching a worker is ignored
                handlers.update({signal.SIGUSR1: self.handle_retire, signal.SIGHUP: signal.SIG_IGN})
            else:
                handlers[signal.SIGHUP] = self.handle_hangup
            previous = {sig: signal.signal(sig, handler) for sig, handler in handlers.items()}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

        def handle_exit(self, sig: int, frame: Any) -> None:
            protocol.registry.stopping = True  # no connection is kept alive from here on
            state.stopping = True  # /readyz answers 503 from the next request on
            super().handle_exit(sig, frame)

        def handle_retire(self, sig: int, frame: Any) -> None:
            protocol.registry.stopping = True
            state.stopping = True
            state.retiring = True  # its successor owns its metrics and status from here on
            self.retiring = self.should_exit = True

        def handle_hangup(self, sig: int, frame: Any) -> None:
            self.hangup = True  # logged by the loop: a signal handler should not take the logging lock

        async def on_tick(self, counter: int) -> bool:
            if self.hangup:
                self.hangup = False
                log.warning("SIGHUP ignored: a rolling reload needs a supervisor to start new workers beside this "
                            "process (pkg serve --workers N with N > 1, or --follow); serving on")
            return await super().on_tick(counter)

        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            if self.retiring:
                await self._retire()
                await super().shutdown(sockets)
                return
            if http.drain_s and not self.force_exit:
                log.info("stopping: /readyz answers 503; serving on for %g s before closing the port", http.drain_s)
                await asyncio.sleep(http.drain_s)
            listeners = [sock for server in self.servers for sock in server.sockets]
            await _drain_listeners(listeners)
            await super().shutdown(sockets)

        async def _retire(self) -> None:
            """Close this process's copy of the shared socket at once (the new generation, ready, accepts on it,
            and takes what the kernel queued: nothing is refused or reset; the drop-all filter of a stop would
            act on the shared socket and stop the new generation too). Then serve the kept-open connections
            for up to keep_alive_s: each gets ``Connection: close`` on its next response, and one idle that
            long closes as it would anyway, so no client meets a close it would not meet without a reload."""
            for server in self.servers:
                server.close()
            log.info("retiring (a rolling reload replaced this worker): serving the %d open connection(s) for up "
                     "to %g s", len(self.server_state.connections), http.keep_alive_s)
            deadline = time.monotonic() + http.keep_alive_s
            while self.server_state.connections and time.monotonic() < deadline and not self.force_exit:
                await asyncio.sleep(0.05)

    return Server(config)


_SO_ATTACH_FILTER = 26  # Linux's <asm-generic/socket.h>
_TCPI_UNACKED = 24  # offset of tcpi_unacked in struct tcp_info: a listening socket's accept queue length
_DRAIN_LIMIT_S = 2.0  # the queue is taken in a loop turn or two; this only bounds a stuck loop


async def _drain_listeners(listeners: list[Any]) -> None:
    """Stop new connections at the kernel while the event loop takes those it already accepted.

    Closing a listening socket resets every connection in its accept queue: clients that connected and sent a
    request. A socket filter that drops everything first makes the kernel answer no new SYN (the client
    retries, and is refused once the socket is closed); then the queue is emptied by the server's own accept
    loop. Elsewhere than Linux the socket is closed as it is."""
    if not sys.platform.startswith("linux") or not listeners:
        return
    drop_all = (ctypes.c_ubyte * 8).from_buffer_copy(struct.pack("HBBI", 0x06, 0, 0, 0))  # BPF_RET|BPF_K 0
    program = struct.pack("@HP", 1, ctypes.addressof(drop_all))
    try:
        for sock in listeners:
            sock.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_FILTER, program)
    except OSError as exc:
        log.warning("could not stop new connections before closing the port (%s); closing it as it is", exc)
        return
    deadline = time.monotonic() + _DRAIN_LIMIT_S
    while time.monotonic() < deadline:
        queued = sum(_accept_queue(sock) for sock in listeners)
        if not queued:
            return
        await asyncio.sleep(0.005)
    log.warning("connections were still queued on the port %g s after it stopped taking new ones", _DRAIN_LIMIT_S)


def _accept_queue(sock: Any) -> int:
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCPI_UNACKED + 4)
    except OSError:
        return 0
    return struct.unpack_from("I", info, _TCPI_UNACKED)[0] if len(info) >= _TCPI_UNACKED + 4 else 0


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s [%(process)d] %(message)s",
    )
    logging.getLogger("bento_like").setLevel(level.upper())
    # httpx logs each request at INFO: the probes and calls to separately-run dependencies would flood the log
    logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLogger().level))
