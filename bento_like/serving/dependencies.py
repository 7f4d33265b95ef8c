"""Dependencies that run as their own servers: starting them, waiting for them, calling them, reporting them.

``pkg serve svc.py:Caller`` starts every service that ``Caller`` depends on, directly or through other
dependencies, and that runs on its own (``runs_on_its_own``: it declares resources, workers > 1 or instances),
once each, as a server on 127.0.0.1. The parent binds each one's port (an ephemeral one) before anything starts,
so every address is known up front and no port can be taken by someone else meanwhile; it hands the addresses to
every process it starts (``ServeOptions.dependencies``), and each process builds its clients from them.

Each dependency process sits in a process group of its own (Ctrl-C at a terminal reaches the caller, which drains
first; the parent then stops the dependencies), and gets SIGTERM from the kernel if the parent dies without
stopping it. A dependency that exits before it was ever ready, or whose startup failed, stops ``pkg serve`` with
an error naming it and its log; one that exits later is restarted with back-off, and meanwhile the caller's
``/readyz`` answers 503 naming it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import msgspec

from .._client_core import APIClientError, APIConnectionError, APIError, APIServerError, APITimeoutError
from .._remote import RemoteService
from ..sdk.service import Dependency, ServiceSpec, get_spec, separate_services, service_key
from .errors import HTTPError
from .tuning import knob

log = logging.getLogger("bento_like.serving")

READY_POLL_S = 0.2  # while waiting for a dependency to start
WATCH_S = 1.0  # once ready: how often each process checks its dependencies for /readyz


class DependencyAddress(msgspec.Struct, frozen=True):
    """Where a separately-run dependency listens, and where its log is (for messages that name it)."""

    name: str
    url: str
    log: str


def called_remotely(spec: ServiceSpec, _seen: frozenset[str] = frozenset()) -> list[str]:
    """The separately-run services that this process's instances call (through in-process dependencies too)."""
    keys: list[str] = []
    for dep in spec.dependencies.values():
        if dep.target is None or dep.url is not None:
            continue
        key = service_key(dep.target)
        if dep.remote:
            if key not in keys:
                keys.append(key)
        elif key not in _seen:
            keys += [k for k in called_remotely(get_spec(dep.target), _seen | {key}) if k not in keys]
    return keys


# Errors of a dependency's client that also answer the caller's request with the dependency's status and message,
# and remain the client's APIError classes for code that catches them.
class _DependencyHTTPError(HTTPError):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        Exception.__init__(self, *args)  # the client error's own __init__ sets its fields; _as_response the rest

    def _as_response(self, status: int, message: str, retry_after: float | None, service: str) -> None:
        self.status = status
        self.message = message
        self.reason = None
        self.headers = {"Retry-After": str(max(1, int(retry_after + 0.999)))} if retry_after is not None else {}
        self.extra = {"dependency": service}

    def __str__(self) -> str:
        return self.message


class DependencyClientError(APIClientError, _DependencyHTTPError):
    """A dependency answered 4xx."""


class DependencyServerError(APIServerError, _DependencyHTTPError):
    """A dependency answered 5xx."""


class DependencyUnreachable(APIConnectionError, _DependencyHTTPError):
    """A dependency could not be reached (its process is gone, restarting, or its address is wrong)."""


class DependencyTimeout(APITimeoutError, _DependencyHTTPError):
    """A dependency did not answer in time."""


def dependency_error(exc: Exception, service: str, api: str) -> Exception:
    """The exception a caller's code sees for a failed call to a dependency (``RemoteService``'s error hook): the
    client's error class, which, left uncaught, answers the caller's request with the dependency's status."""
    new: Any
    if isinstance(exc, APIError):
        cls = DependencyClientError if isinstance(exc, APIClientError) else DependencyServerError
        message = f"dependency {service!r}, API {api!r} answered {exc.status}: {exc.message}"
        new = cls(exc.status, message, exc.field, exc.error_id, retry_after=exc.retry_after, api=exc.api)
        new._as_response(exc.status, message, exc.retry_after, service)
        if exc.field:
            new.extra["field"] = exc.field
    elif isinstance(exc, APITimeoutError):
        message = f"dependency {service!r}, API {api!r}: {exc}"
        new = DependencyTimeout(message)
        new._as_response(504, message, None, service)
    else:
        message = f"dependency {service!r}, API {api!r}: {exc}"
        new = DependencyUnreachable(message)
        new._as_response(503, message, 1.0, service)
    return new


class Dependencies:
    """This process's view of its separately-run dependencies: their clients, and whether they are ready."""

    def __init__(self, spec: ServiceSpec, addresses: dict[str, DependencyAddress] | None) -> None:
        self.spec = spec
        self.addresses = addresses or {}
        self.waited = [self.addresses[k] for k in called_remotely(spec) if k in self.addresses]
        self.waiting: list[str] = []  # names not ready yet, while starting
        self.down: dict[str, str] = {}  # name -> why, once started
        self._clients: dict[tuple[str, Any], RemoteService] = {}
        self._watch: asyncio.Task[None] | None = None

    def client(self, dep: Dependency) -> RemoteService | None:
        """The client for ``dep``, shared by the instances of this process; None: build it in this process."""
        if dep.url is not None:
            url = dep.url
        elif dep.target is not None and dep.remote:
            address = self.addresses.get(service_key(dep.target))
            if address is None:  # served by create_app alone (a test, an embedding app): nobody started it
                log.info("%s runs in this process: no server was started for it (pkg serve starts one)",
                         get_spec(dep.target).name)
                return None
            url = address.url
        else:
            return None
        key = (url, dep.target)
        if key not in self._clients:
            self._clients[key] = RemoteService(url, dep.target, errors=dependency_error)
        return self._clients[key]

    async def wait_until_ready(self) -> str | None:
        """Wait until every dependency this process calls is ready; the reason if one failed to start."""
        import httpx

        pending = list(self.waited)
        async with httpx.AsyncClient(timeout=1.0) as http:
            while pending:
                self.waiting = [a.name for a in pending]
                for address in list(pending):
                    ready, failure, _ = await _probe(http, address)
                    if failure is not None:
                        return f"dependency {address.name!r} failed to start: {failure}; its log: {address.log}"
                    if ready:
                        log.info("dependency %s is ready at %s", address.name, address.url)
                        pending.remove(address)
                if pending:
                    await asyncio.sleep(READY_POLL_S)
        self.waiting = []
        if self.waited:
            self._watch = asyncio.create_task(self._watch_forever())
        return None

    def waiting_message(self) -> str | None:
        if not self.waiting:
            return None
        return f"waiting for dependenc{'ies' if len(self.waiting) > 1 else 'y'} {', '.join(map(repr, self.waiting))} to be ready"

    def problem(self) -> str | None:
        """Why a dependency cannot take calls now, or None."""
        if not self.down:
            return None
        return "; ".join(f"dependency {name!r} is not ready ({why})" for name, why in self.down.items())

    async def _watch_forever(self) -> None:
        import httpx

        async with httpx.AsyncClient(timeout=1.0) as http:
            while True:
                await asyncio.sleep(WATCH_S)
                for address in self.waited:
                    ready, _, why = await _probe(http, address)
                    was_down = address.name in self.down
                    if ready:
                        if was_down:
                            log.info("dependency %s is ready again", address.name)
                        self.down.pop(address.name, None)
                        continue
                    self.down[address.name] = f"{why}; its log: {address.log}"
                    if not was_down:
                        log.error("dependency %s at %s is not ready: /readyz answers 503 meanwhile (its log: %s)",
                                  address.name, address.url, address.log)

    async def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
        for client in self._clients.values():
            await client.aclose()


async def _probe(http: Any, address: DependencyAddress) -> tuple[bool, str | None, str]:
    """(ready, why its startup failed, why it is not ready) from one ``/readyz``. Unreachable is no startup
    failure: it may be starting, or restarting."""
    import httpx

    try:
        response = await http.get(address.url + "/readyz")
    except httpx.TransportError as exc:
        return False, None, f"/readyz unreachable: {type(exc).__name__}"
    ready = response.status_code == 200
    return ready, _startup_failure(response.status_code, response.content), _not_ready(response)


def _not_ready(response: Any) -> str:
    try:
        error = msgspec.json.decode(response.content).get("error")
    except (msgspec.DecodeError, AttributeError):
        error = None
    return f"/readyz answers {response.status_code}" + (f": {error}" if error else "")


def _startup_failure(status: int, body: bytes) -> str | None:
    if status != 503:
        return None
    try:
        payload = msgspec.json.decode(body)
    except msgspec.DecodeError:
        return None
    if isinstance(payload, dict) and payload.get("state") == "failed":
        return str(payload.get("error"))
    return None


@dataclasses.dataclass
class _Child:
    key: str
    spec: ServiceSpec
    sock: socket.socket
    address: DependencyAddress
    proc: Any = None
    ready: bool = False
    started_at: float = 0.0
    failures: int = 0
    due: float | None = None  # when a restart waiting out its back-off is due


class DependencyProcesses:
    """The separately-run dependencies of the served service, as processes of ``pkg serve`` (its parent)."""

    def __init__(self, spec: ServiceSpec, where: Any, log_level: str, server_args: dict[str, Any],
                 graceful_timeout: float) -> None:
        self.where = where
        self.log_level = log_level
        self.server_args = server_args
        self.graceful_timeout = graceful_timeout
        self.failure: str | None = None
        self.stopping = False
        self.children: list[_Child] = []
        self.log_dir: Path | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        services = separate_services(spec)
        if not services:
            return
        from .server import bind

        self.log_dir = Path(tempfile.mkdtemp(prefix=f"bento_like-deps-{os.getpid()}-"))
        for key, dep in services.items():
            sock = bind("127.0.0.1", 0)  # bound here and kept: the address is known and stays ours
            url = "http://127.0.0.1:%d" % sock.getsockname()[1]
            log_path = self.log_dir / f"{dep.name}.log"
            self.children.append(_Child(key, dep, sock, DependencyAddress(dep.name, url, str(log_path))))

    @property
    def addresses(self) -> dict[str, DependencyAddress]:
        return {child.key: child.address for child in self.children}

    def start(self, options: Any) -> None:
        """Start every dependency process, and a thread that watches them; returns at once."""
        if not self.children:
            return
        import multiprocessing

        from .app import ServeOptions

        self._ctx = multiprocessing.get_context("spawn")
        # A dependency takes its own declaration's limits, not the flags given for the caller.
        self._options = ServeOptions(tuning=options.tuning, dependencies=self.addresses)
        for child in self.children:
            self._start(child)
            log.info("dependency %s: pid %d on %s (workers: %d; log: %s)", child.spec.name, child.proc.pid,
                     child.address.url, child.spec.workers, child.address.log)
        self._thread = threading.Thread(target=self._watch, name="dependencies", daemon=True)
        self._thread.start()

    def _start(self, child: _Child) -> None:
        where = msgspec.structs.replace(self.where, service=child.key)
        child.proc = self._ctx.Process(
            target=_dependency_main,
            args=(where, child.sock, self._options, self.server_args, self.graceful_timeout, self.log_level,
                  child.address.log, os.getpid()),
            name=f"bento-dependency-{child.spec.name}",
            daemon=False,
        )
        child.proc.start()
        child.started_at = time.monotonic()
        child.due = None

    def _watch(self) -> None:
        import httpx

        with httpx.Client(timeout=1.0) as http:
            while not self.stopping:
                time.sleep(READY_POLL_S)
                with self._lock:
                    if self.stopping:
                        return
                    for child in self.children:
                        self._check(child, http)

    def _check(self, child: _Child, http: Any) -> None:
        import httpx

        now = time.monotonic()
        if child.due is not None:
            if now >= child.due:
                self._start(child)
            return
        if child.proc.is_alive():
            limit = self._options.tuning.dependency_start_s
            if not child.ready and now - child.started_at > limit:
                self._fail(f"dependency {child.spec.name!r} was not ready {limit:g} s after it started (its start "
                           f"limit: {START_LIMIT_SETTING}){_last_line(child.address.log)}; its log: {child.address.log}")
                return
            if not child.ready:
                try:
                    response = http.get(child.address.url + "/readyz")
                except httpx.TransportError as exc:  # still starting
                    log.debug("dependency %s not answering yet: %s", child.spec.name, exc)
                    return
                failure = _startup_failure(response.status_code, response.content)
                if failure is not None:
                    self._fail(f"dependency {child.spec.name!r} failed to start: {failure}; its log: {child.address.log}")
                elif response.status_code == 200:
                    child.ready = True
                    child.failures = 0
            return
        code = child.proc.exitcode
        if not child.ready:
            self._fail(f"dependency {child.spec.name!r} exited with code {code} before it was ready"
                       f"{_last_line(child.address.log)}; its log: {child.address.log}")
            return
        child.ready = False
        quick = now - child.started_at < 10
        child.failures = child.failures + 1 if quick else 1
        delay = min(10.0, 0.5 * 2 ** (child.failures - 1)) if quick else 0.0
        log.error("dependency %s (pid %s) exited with code %s; restarting it in %.1f s (its log: %s)",
                  child.spec.name, child.proc.pid, code, delay, child.address.log)
        child.due = now + delay

    def _fail(self, message: str) -> None:
        """Stop ``pkg serve``: its parent (this process) gets SIGTERM, and ``serve`` raises ``message`` at the end."""
        if self.failure is None:
            self.failure = message
            log.error("%s; stopping", message)
            # the server installs its SIGTERM handler as it starts: before that, SIGTERM would kill us mid-word
            deadline = time.monotonic() + 30
            while signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None) and time.monotonic() < deadline:
                time.sleep(0.05)
            os.kill(os.getpid(), signal.SIGTERM)

    def stop(self) -> None:
        """SIGTERM every dependency, wait for them to drain and exit (killing those that overstay)."""
        with self._lock:
            self.stopping = True
        procs = [c.proc for c in self.children if c.proc is not None]
        if procs:
            log.info("stopping %d dependenc%s", len(procs), "ies" if len(procs) > 1 else "y")
        for proc in procs:
            if proc.is_alive():
                os.kill(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.graceful_timeout + 5
        # one that never turned ready serves nobody: it gets a short grace, not the drain of a serving one
        starting = {c.proc.pid for c in self.children if c.proc is not None and not c.ready}
        for proc in procs:
            limit = min(deadline, time.monotonic() + STARTING_GRACE_S) if proc.pid in starting else deadline
            proc.join(max(0.1, limit - time.monotonic()))
            if proc.is_alive():
                log.warning("dependency pid %s did not stop in time; killing it", proc.pid)
                proc.kill()
                proc.join()
        for child in self.children:
            child.sock.close()
        if self.log_dir is not None and self.failure is None:
            shutil.rmtree(self.log_dir, ignore_errors=True)  # kept when a dependency failed: its log says why


STARTING_GRACE_S = 3.0
START_LIMIT_SETTING = knob("dependency_start_s")


def _last_line(path: str) -> str:
    try:
        lines = [line for line in Path(path).read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return f" ({lines[-1].strip()[:300]})" if lines else ""


def _die_with_parent(parent: int) -> None:
    """Have the kernel send SIGTERM to this process when ``pkg serve`` dies, even by SIGKILL: no orphans."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None).prctl(1, signal.SIGTERM, 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:  # the parent died before the line above
        os._exit(1)


def _dependency_main(where: Any, sock: socket.socket, options: Any, server_args: dict[str, Any],
                     graceful_timeout: float, log_level: str, log_path: str, parent: int) -> None:
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    os.setpgid(0, 0)  # Ctrl-C in a terminal goes to the caller; the parent stops this process after it
    _die_with_parent(parent)
    from .app import create_app
    from .server import configure_logging, uvicorn_server
    from .supervisor import Supervisor
    from .targets import load_target

    configure_logging(log_level)
    spec = load_target(where)
    if spec.workers > 1:
        Supervisor(spec, where, options, spec.workers, "127.0.0.1", 0, server_args, graceful_timeout, sock=sock).run()
    else:
        log.info("serving dependency %s on http://127.0.0.1:%d", spec.name, sock.getsockname()[1])
        uvicorn_server(create_app(spec, options), server_args).run(sockets=[sock])
