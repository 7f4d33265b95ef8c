"""The process model of ``pkg serve``: one server process, N supervised workers sharing the port, or a reloader.

With ``--workers N`` the parent binds the port once, starts N worker processes that all accept on it, and
watches them: a worker that dies is restarted (with back-off if it keeps dying), and meanwhile every worker's
``/readyz`` answers 503 naming the missing worker. GPUs are split among workers through CUDA_VISIBLE_DEVICES.

Graceful stop, the same in one process and in each worker: on SIGTERM ``/readyz`` answers 503 at once;
requests are still served for ``drain_s``; then the listening socket takes no new connection (new SYNs are
dropped, so a client is refused, never reset), those the kernel already accepted are taken and served, and
the socket closes; in-flight requests finish (up to ``graceful_timeout``), the ``@on_shutdown`` hooks run and
the process exits 0. The parent forwards SIGTERM to every worker, closes its own copy of the socket (else the
kernel would go on accepting connections nobody takes), waits for them and exits 0.

Rolling reload, under a supervisor (``--workers N`` with N > 1, or ``--follow``): on SIGHUP (or a new version
of the followed bento) the supervisor starts a new generation of N workers on the same socket, each taking
connections only once ready; when all are ready it retires the old generation (SIGUSR1: close its own copy of
the socket, turn its kept-open connections over, finish what it holds, exit 0). A new worker that exits or is
not ready within ``reload_timeout_s`` aborts the reload: the new generation is stopped, the old one serves on.

Dependencies that run as their own servers (``bl.depends`` of a service that declares resources, workers or
instances) are started by ``serve`` before the caller and stopped after it: serving/dependencies.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import errno
import logging
import math
import multiprocessing
import os
import shutil
import signal
import socket
import struct
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from ..models._store import MODEL_STORE_ENV
from ..sdk.api import ServiceDefinitionError
from ..sdk.loader import load_service
from ..sdk.service import ServiceSpec, separate_services
from .app import ServeOptions, create_app, run_deployment_hooks
from .dependencies import DependencyProcesses
from .tuning import Tuning, UpdateTuning, from_reloader, hand_to_reloaded, knob

if TYPE_CHECKING:
    from ..bentos import Bento

log = logging.getLogger("bento_like.serving")


class ServeError(Exception):
    """The server cannot start (its port is taken, say); the message says why, for one ``Error:`` line."""


def serve(
    target: str,
    *,
    host: str = "127.0.0.1",
    port: int = 3000,
    workers: int | None = None,
    reload: bool = False,
    log_level: str = "info",
    access_log: bool = False,
    working_dir: str | None = None,
    graceful_timeout: float = 30.0,
    options: ServeOptions | None = None,
    drain_delay: float | None = None,
    models: str | None = None,
    admin: bool | None = None,
    admin_token_file: str | None = None,
    watch_models: bool | None = None,
    swap_mode: str | None = None,
    follow: bool = False,
) -> None:
    working_dir = str(Path(working_dir or os.getcwd()).resolve())
    # The runtime's settings are read from the environment here, once, and sent to every worker.
    options = options or ServeOptions()
    tuning = options.tuning or Tuning.from_env()
    if drain_delay is not None:  # --drain-delay wins over BENTO_LIKE_DRAIN_S
        tuning = msgspec.structs.replace(tuning, http=msgspec.structs.replace(tuning.http, drain_s=float(drain_delay)))
    if models is not None:  # --models wins over BENTO_LIKE_MODELS_DIR
        tuning = msgspec.structs.replace(tuning, models_dir=models)
    tuning = _model_updates(tuning, admin, admin_token_file, watch_models, swap_mode)
    options = dataclasses.replace(options, tuning=tuning)
    _configure_logging(log_level)
    followed = _followed(target) if follow else None
    if followed is not None:
        if reload:
            raise ServeError("--follow moves to each new version of a bento, --reload restarts on a source change: "
                             "choose one")
        where, not_a_bento = _latest(followed, tuning), None
        os.environ[MODEL_STORE_ENV] = str(where.model_store)  # this process's and its dependencies' model store
    else:
        where, not_a_bento = _resolve_bento(target, working_dir, tuning)
    try:
        spec = _load(where)
    except ServiceDefinitionError as exc:
        if not_a_bento is None or "no such module" not in str(exc):
            raise
        # `name:version` was meant as a bento more often than as module:Class: say what both lookups found
        raise ServiceDefinitionError(f"{target!r} is neither a bento ({not_a_bento}) nor a module ({exc})") from None
    server_args = _server_args(log_level, access_log, graceful_timeout, options.tuning)
    # Each separately-run dependency's port is bound now, so that every process is told every address.
    dependencies = DependencyProcesses(spec, where, log_level, server_args, graceful_timeout)
    options = dataclasses.replace(options, dependencies=dependencies.addresses)
    app = create_app(spec, options)  # fails fast, in the parent, on an API that cannot be served
    try:
        run_deployment_hooks(spec)
    except Exception as exc:
        log.error("the deployment hook of %s failed", spec.name, exc_info=True)
        raise ServeError(f"an @on_deployment hook of {spec.name} failed: {type(exc).__name__}: {exc}") from None
    workers = workers or spec.workers
    dependencies.start(options)
    try:
        _serve_caller(spec, where, app, options, host, port, workers, reload, server_args, graceful_timeout,
                      followed)
    finally:
        dependencies.stop()
    if dependencies.failure:
        raise ServeError(dependencies.failure)


WATCH_DEFAULT_S = 2.0


def _model_updates(tuning: Tuning, admin: bool | None, token_file: str | None, watch: bool | None,
                   swap_mode: str | None) -> Tuning:
    """The flags of model updates over their environment variables (flags win)."""
    updates = tuning.updates
    token = updates.admin_token
    if token_file is not None:
        try:
            token = Path(token_file).read_text().strip()
        except OSError as exc:
            raise ServeError(f"cannot read --admin-token-file {token_file}: {exc.strerror}") from None
    try:
        updates = UpdateTuning(
            admin=updates.admin if admin is None else admin,
            admin_token=token,
            watch_s=(updates.watch_s or WATCH_DEFAULT_S) if watch else updates.watch_s,
            swap_mode=swap_mode or updates.swap_mode,
        )
    except ValueError as exc:
        raise ServeError(f"--admin: {exc}".replace("admin needs", "it needs")) from None
    return msgspec.structs.replace(tuning, updates=updates)


def _server_args(log_level: str, access_log: bool, graceful_timeout: float, tuning: Tuning) -> dict[str, Any]:
    return dict(
        log_level=log_level,
        access_log=access_log,
        timeout_graceful_shutdown=graceful_timeout,
        timeout_keep_alive=tuning.http.keep_alive_s,
        log_config=None,
        server_header=False,
        ws="none",  # no API is a WebSocket; an upgraded connection would leave the protocol's deadlines behind
    )


def _serve_caller(spec: ServiceSpec, where: Target, app: Any, options: ServeOptions, host: str, port: int,
                  workers: int, reload: bool, server_args: dict[str, Any], graceful_timeout: float,
                  followed: str | None) -> None:
    if reload:
        _bind(host, port).close()  # a port in use is one error line here, not uvicorn's exit 3
        _serve_with_reload(where, options, host, port, server_args)
    elif workers > 1 or followed is not None:
        Supervisor(spec, where, options, workers, host, port, server_args, graceful_timeout, follow=followed).run()
    else:
        sock = _bind(host, port)
        log.info("serving %s on http://%s:%d", spec.name, *sock.getsockname()[:2])
        _server(app, server_args).run(sockets=[sock])


class Target(msgspec.Struct, frozen=True):
    """What a server process loads: a service target in a working directory, and the bento it comes from."""

    target: str
    working_dir: str
    bento_dir: str | None = None
    service: str | None = None  # a dependency of the target's service to serve instead (serving/dependencies.py)
    # a bento's models: the model store of the workers that serve it (a reload may move to another bento's)
    model_store: str | None = None


def _resolve_bento(target: str, working_dir: str, tuning: Tuning) -> tuple[Target, str | None]:
    """A bento (its directory, or name:version in the bento store) is served from its src/ with its own models
    (or those in ``tuning.models_dir``), exactly as its image serves it; anything else is a service target left
    as it is, with why it is no bento."""
    from ..bentos import MANIFEST_FILE, BentoError, BentoStore

    directory = Path(working_dir) / target
    if (directory / MANIFEST_FILE).is_file():
        bento = BentoStore().get(str(directory))
    elif target.endswith(".py") or ".py:" in target:
        bento = None
    else:
        try:
            bento = BentoStore().get(target)
        except BentoError as exc:
            if tuning.models_dir:
                raise ServeError(f"{target!r} is no bento ({exc}); --models ({knob('models_dir')}) names where "
                                 "a bento's models are") from None
            return Target(target, working_dir), str(exc)  # module or module:Class
    if bento is None:
        if tuning.models_dir:
            raise ServeError(f"--models ({knob('models_dir')}) names where a bento's models are: serve a bento "
                             f"with it, not {target!r} (whose models come from the model store)")
        return Target(target, working_dir), None
    where = _bento_target(bento, tuning)
    os.environ[MODEL_STORE_ENV] = str(where.model_store)  # this process's and its dependencies' model store
    return where, None


def _bento_target(bento: Bento, tuning: Tuning) -> Target:
    log.info("serving bento %s from %s", bento.tag, bento.path)
    models = bento.path / "models"
    if tuning.models_dir:
        models = _models_dir(bento, Path(tuning.models_dir).absolute(), tuning.models_wait_s)
    return Target(bento.info.service, str(bento.path / "src"), str(bento.path), model_store=str(models))


def _followed(target: str) -> str:
    """The bento name that ``--follow`` follows: TARGET is NAME or NAME:latest."""
    name, _, version = target.partition(":")
    if version not in ("", "latest") or not name or "/" in name or name.endswith(".py"):
        raise ServeError(f"--follow serves NAME:latest from the bento store and moves to each new version of it: "
                         f"give a bento name (NAME or NAME:latest), not {target!r}")
    return name


def _latest(name: str, tuning: Tuning) -> Target:
    """What NAME:latest of the bento store is now, to serve."""
    from ..bentos import BentoError, BentoStore

    try:
        return _bento_target(BentoStore().get(f"{name}:latest"), tuning)
    except BentoError as exc:
        raise ServeError(str(exc)) from None


def _models_dir(bento: Bento, directory: Path, wait_s: float) -> Path:
    """`directory` once it exists (a KServe modelcar links it beside this server, maybe just after it starts),
    holding exactly the models the bento's manifest names: anything else stops the server, naming the model."""
    from ..bentos import BentoError

    deadline = time.monotonic() + wait_s
    if not directory.is_dir() and wait_s > 0:
        log.info("waiting up to %.0f s for the models directory %s (%s)", wait_s, directory, knob("models_wait_s"))
        while not directory.is_dir() and time.monotonic() < deadline:
            time.sleep(0.1)
    if not directory.is_dir():
        raise ServeError(f"the models directory {directory} of bento {bento.tag} does not exist (waited "
                         f"{wait_s:g} s, {knob('models_wait_s')})")
    try:
        bento.verify_models(directory)
    except BentoError as exc:
        raise ServeError(str(exc)) from None
    log.info("serving the models of %s from %s", bento.tag, directory)
    return directory


def _load(where: Target) -> ServiceSpec:
    """load_service, and when serving a bento, each model reference bound to the exact model the build put in
    it for that attribute (an optimized version where the build optimized it), whatever tag the code names."""
    spec = load_service(where.target, where.working_dir)
    if where.bento_dir:
        from ..bentos import BentoStore

        packaged = {entry.attr: entry.tag for entry in BentoStore().get(where.bento_dir).info.models}
        for attr, ref in spec.model_refs().items():
            if attr in packaged:
                ref.tag = packaged[attr]
    if where.service is not None:
        services = separate_services(spec)
        if where.service not in services:
            raise ServiceDefinitionError(f"{where.target!r} has no separately-run dependency {where.service!r}")
        spec = services[where.service]
    return spec


class _ReloadSettings(msgspec.Struct):
    where: Target
    options: ServeOptions
    log_level: str


def _serve_with_reload(
    where: Target, options: ServeOptions, host: str, port: int, server_args: dict[str, Any]
) -> None:
    import uvicorn

    from .protocol import HttpProtocol

    hand_to_reloaded(msgspec.json.encode(_ReloadSettings(where, options, server_args["log_level"])))
    uvicorn.run(
        "bento_like.serving.workers:app_from_env",
        factory=True,
        reload=True,
        reload_dirs=[where.working_dir],
        reload_includes=["*.py"],
        host=host,
        port=port,
        http=HttpProtocol,  # the reloader pickles its config: the default protocol, not one made per server
        **server_args,
    )


def app_from_env():  # type: ignore[no-untyped-def]
    """Factory the reloaded process calls to build its app."""
    settings = msgspec.json.decode(from_reloader(), type=_ReloadSettings)
    _configure_logging(settings.log_level)
    return create_app(_load(settings.where), settings.options)


class Supervisor:
    """Starts N workers on one listening socket and keeps N of them alive until SIGTERM/SIGINT; on SIGHUP (or a
    new version of the bento it follows) replaces them with a new generation, one generation at a time."""

    def __init__(
        self,
        spec: ServiceSpec,
        where: Target,
        options: ServeOptions,
        workers: int,
        host: str,
        port: int,
        server_args: dict[str, Any],
        graceful_timeout: float,
        sock: socket.socket | None = None,
        follow: str | None = None,
    ) -> None:
        self.options = options
        self.tuning = options.tuning or Tuning.from_env()
        self.workers = workers
        self.server_args = server_args
        self.graceful_timeout = graceful_timeout
        self.ctx = multiprocessing.get_context("spawn")
        # 1 = ready, 0 = starting or gone; shared with every worker so each /readyz sees its generation. Two
        # generations at most run at once (during a reload), each in its own N slots.
        self.status = self.ctx.Array("b", 2 * workers, lock=False)
        self.gpus = _split_gpus(spec, workers)
        self.sock = sock or _bind(host, port)  # a dependency's is bound by pkg serve's parent
        self.current = _Generation(0, 0, where, workers)
        self.reloads = 0  # reloads tried: each new generation's number
        self.incoming: _Generation | None = None  # a reload's generation, until it is ready or given up
        self.leaving: list[tuple[Any, float]] = []  # retired or given-up workers not yet exited, and when to kill
        self.left = ""  # what to log once they have exited
        self.follow = follow  # the bento name whose latest version is served
        self.refused: str | None = None  # a followed bento dir whose generation failed: not tried again
        self.reload_asked = False  # SIGHUP, handled by the loop (a signal handler should not log or fork)
        self.told_queued = False
        self.next_poll = 0.0
        self.stopping = False

    def run(self) -> None:
        log.info("supervisor %d: %d workers on %s", os.getpid(), self.workers, self.sock.getsockname())
        previous = {sig: signal.signal(sig, self._stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, self._ask_reload)
        metrics_dir = tempfile.mkdtemp(prefix=f"bento_like-metrics-{os.getpid()}-")
        control_dir = tempfile.mkdtemp(prefix=f"bento_like-control-{os.getpid()}-")  # mode 0700
        self.options = dataclasses.replace(self.options, metrics_dir=metrics_dir, control_dir=control_dir)
        try:
            for i in range(self.workers):
                self._start(self.current, i)
            while not self.stopping:
                time.sleep(0.2)
                self._watch()
                self._reload_step()
        finally:
            self._shutdown()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.sock.close()
            shutil.rmtree(metrics_dir, ignore_errors=True)
            shutil.rmtree(control_dir, ignore_errors=True)

    def _stop(self, signum: int, frame: Any) -> None:
        self.stopping = True
        for proc in self._processes():  # at once: each worker's /readyz turns 503 now
            if proc.is_alive():
                os.kill(proc.pid, signal.SIGTERM)

    def _ask_reload(self, signum: int, frame: Any) -> None:
        self.reload_asked = True

    def _processes(self) -> list[Any]:
        """Every worker process started and not yet reaped: current, incoming and leaving."""
        gens = [self.current] + ([self.incoming] if self.incoming is not None else [])
        return [p for gen in gens for p in gen.processes()] + [p for p, _ in self.leaving]

    def _start(self, gen: _Generation, i: int) -> None:
        slot = gen.base + i
        self.status[slot] = 0
        settings = {
            "where": gen.where,
            "options": dataclasses.replace(self.options, worker_id=str(i), workers=self.workers,
                                           accept_when_ready=gen is self.incoming),
            "server_args": self.server_args,
            "cuda_visible_devices": self.gpus[i] if self.gpus else None,
        }
        proc = self.ctx.Process(
            target=_worker_main, args=(slot, self.sock, self.status, settings), name=f"bento-worker-{i}", daemon=False
        )
        proc.start()
        gen.procs[i] = proc
        gen.started_at[i] = time.monotonic()

    def _watch(self) -> None:
        now = time.monotonic()
        gen = self.current
        for i, proc in enumerate(gen.procs):
            if proc.is_alive() or self.stopping:
                continue
            self.status[gen.base + i] = 0
            quick = now - gen.started_at[i] < 10
            gen.failures[i] = gen.failures[i] + 1 if quick else 1
            delay = min(10.0, 0.5 * 2 ** (gen.failures[i] - 1)) if quick else 0.0
            log.warning("worker %d (pid %s) exited with code %s; restarting in %.1f s", i, proc.pid, proc.exitcode, delay)
            if delay:
                gen.started_at[i] = now + delay  # don't count the wait as the new worker's life
                gen.procs[i] = _Delayed(now + delay)
            else:
                self._start(gen, i)
        for i, proc in enumerate(gen.procs):
            if isinstance(proc, _Delayed) and proc.due <= now and not self.stopping:
                self._start(gen, i)

    def _reload_step(self) -> None:
        """One reload at a time: a SIGHUP while one runs (until its old or given-up workers have exited) starts
        another once it is over, however many came meanwhile."""
        now = time.monotonic()
        if self.incoming is not None:
            self._check_incoming(now)
        self._reap(now)
        if self.stopping:
            return
        if self.incoming is not None or self.leaving:
            if self.reload_asked and not self.told_queued:
                log.info("SIGHUP during a reload: another reload follows once this one is over")
                self.told_queued = True
            return
        if self.reload_asked:
            self.reload_asked = self.told_queued = False
            self._reload_on_signal()
        elif self.follow is not None and now >= self.next_poll:
            self.next_poll = now + self.tuning.follow_interval_s
            self._poll()

    def _reload_on_signal(self) -> None:
        where = self.current.where
        if self.follow is not None:  # SIGHUP under --follow: NAME:latest again, even a version that failed
            try:
                where = _latest(self.follow, self.tuning)
            except ServeError as exc:
                log.error("SIGHUP: no reload: %s; the current workers serve on", exc)
                return
        log.info("SIGHUP: rolling reload of %s", _label(where))
        self._begin(where)

    def _poll(self) -> None:
        from ..bentos import BentoError, BentoStore

        try:
            bento = BentoStore().get(f"{self.follow}:latest")
        except BentoError as exc:  # deleted meanwhile, say: serve on what runs
            log.debug("following %s: %s", self.follow, exc)
            return
        if str(bento.path) in (self.current.where.bento_dir, self.refused):
            return
        try:
            where = _bento_target(bento, self.tuning)
        except ServeError as exc:
            log.error("following %s: %s is not served: %s", self.follow, bento.tag, exc)
            self.refused = str(bento.path)
            return
        log.info("following %s: %s -> %s", self.follow, _label(self.current.where), bento.tag)
        self._begin(where)

    def _begin(self, where: Target) -> None:
        self.reloads += 1
        gen = _Generation(self.reloads, self.workers - self.current.base, where, self.workers)
        gen.deadline = time.monotonic() + self.tuning.reload_timeout_s
        self.incoming = gen
        for i in range(self.workers):
            self._start(gen, i)
        log.info("reload %d: started workers %s of %s; the current ones serve until all of them are ready",
                 gen.number, _pids(gen), _label(where))

    def _check_incoming(self, now: float) -> None:
        gen = self.incoming
        assert gen is not None
        for i, proc in enumerate(gen.procs):
            if not proc.is_alive():
                self._abort(f"worker {i} of the new generation (pid {proc.pid}) exited with code {proc.exitcode} "
                            "before it was ready (its log is above)", now)
                return
        # Ready is published a moment before uvicorn accepts: what arrives meanwhile waits in the shared backlog.
        if all(self.status[gen.base + i] == 1 for i in range(self.workers)):
            self._promote(now)
        elif now > gen.deadline:
            self._abort(f"the new generation was not ready within {self.tuning.reload_timeout_s:g} s "
                        f"({knob('reload_timeout_s')})", now)

    def _promote(self, now: float) -> None:
        old, new = self.current, self.incoming
        assert new is not None
        self.current, self.incoming = new, None
        log.info("reload %d: workers %s of %s are ready; retiring workers %s", new.number, _pids(new),
                 _label(new.where), _pids(old))
        # A retiring worker serves its kept-open connections for up to keep_alive_s, then drains as on SIGTERM.
        deadline = now + self.tuning.http.keep_alive_s + self.graceful_timeout + 5
        for proc in old.processes():
            if proc.is_alive():
                os.kill(proc.pid, signal.SIGUSR1)
            self.leaving.append((proc, deadline))
        self.left = f"reload {new.number}: done, the workers it replaced have exited"

    def _abort(self, why: str, now: float) -> None:
        gen = self.incoming
        assert gen is not None
        self.incoming = None
        log.error("reload %d of %s aborted: %s; workers %s serve on", gen.number, _label(gen.where), why,
                  _pids(self.current))
        if self.follow is not None:
            self.refused = gen.where.bento_dir
        for proc in gen.processes():
            if proc.is_alive():
                os.kill(proc.pid, signal.SIGTERM)
            self.leaving.append((proc, now + self.graceful_timeout + 5))
        self.left = f"reload {gen.number}: its workers have stopped"

    def _reap(self, now: float) -> None:
        leaving = []
        for proc, deadline in self.leaving:
            if not proc.is_alive():
                log.debug("worker pid %s of a previous generation exited with code %s", proc.pid, proc.exitcode)
                continue
            if now > deadline:
                log.warning("worker pid %s did not stop in time; killing it", proc.pid)
                proc.kill()
            leaving.append((proc, deadline))
        if self.leaving and not leaving:
            log.info("%s", self.left)
        self.leaving = leaving

    def _shutdown(self) -> None:
        procs = self._processes()
        for proc in procs:
            if proc.is_alive():
                os.kill(proc.pid, signal.SIGTERM)
        # The workers hold the socket while they drain it; held here too, it would stay open after they closed
        # theirs, and the kernel would accept connections that nobody takes and that are reset at our exit.
        self.sock.close()
        deadline = time.monotonic() + self.graceful_timeout + 5
        for proc in procs:
            proc.join(max(0.1, deadline - time.monotonic()))
            if proc.is_alive():
                log.warning("worker pid %s did not stop in time; killing it", proc.pid)
                proc.kill()
                proc.join()


class _Generation:
    """The N workers of one version of the code, in status slots ``base`` to ``base + N - 1``; ``number`` is the
    reload that started it (0: the first)."""

    def __init__(self, number: int, base: int, where: Target, workers: int) -> None:
        self.number = number
        self.base = base
        self.where = where
        self.procs: list[Any] = [None] * workers
        self.started_at = [0.0] * workers
        self.failures = [0] * workers
        self.deadline = math.inf  # a reload's: when it gives up waiting for this generation to be ready

    def processes(self) -> list[Any]:
        return [p for p in self.procs if p is not None and not isinstance(p, _Delayed)]


def _pids(gen: _Generation) -> str:
    return ", ".join(str(p.pid) for p in gen.processes())


def _label(where: Target) -> str:
    """What a generation serves, for the log: the bento's tag, or the service target."""
    if where.bento_dir is not None:
        from ..bentos import BentoError, BentoStore

        with contextlib.suppress(BentoError, OSError):
            return BentoStore().get(where.bento_dir).tag
    return where.target


class _Delayed:
    """A worker slot waiting out its restart back-off."""

    def __init__(self, due: float) -> None:
        self.due = due

    def is_alive(self) -> bool:
        return True


def _worker_main(index: int, sock: socket.socket, status: Any, settings: dict[str, Any]) -> None:
    if settings["cuda_visible_devices"] is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = settings["cuda_visible_devices"]
    where = settings["where"]
    if where.model_store is not None:  # not inherited: a reload may serve another bento than the parent's
        os.environ[MODEL_STORE_ENV] = where.model_store
    _configure_logging(settings["server_args"]["log_level"])
    options = settings["options"]
    spec = _load(where)
    app = create_app(spec, options, worker_status=(status, index))
    _server(app, settings["server_args"], supervised=True).run(sockets=[sock])


def _bind(host: str, port: int) -> socket.socket:
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


def _split_gpus(spec: ServiceSpec, workers: int) -> list[str] | None:
    """CUDA_VISIBLE_DEVICES for each worker: the visible GPUs dealt out round-robin (None: leave it alone)."""
    if not spec.resources.gpu:
        return None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        ids = [d.strip() for d in visible.split(",") if d.strip()]
    else:
        from .placement import cuda_count

        ids = [str(i) for i in range(cuda_count())]
    if not ids:
        return None
    if len(ids) >= workers:
        return [",".join(ids[i::workers]) for i in range(workers)]
    return [ids[i % len(ids)] for i in range(workers)]


def _server(app: Any, server_args: dict[str, Any], supervised: bool = False) -> Any:
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


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s [%(process)d] %(message)s",
    )
    logging.getLogger("bento_like").setLevel(level.upper())
    # httpx logs each request at INFO: the probes and calls to separately-run dependencies would flood the log
    logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLogger().level))
