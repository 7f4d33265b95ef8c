"""``--workers N``: the supervisor of N worker processes sharing one listening socket, and its rolling reloads.

It binds the port once (or takes a dependency's socket), starts N workers that all accept on it, and keeps them
alive: a worker that dies is restarted (with back-off if it keeps dying), and meanwhile every worker's ``/readyz``
answers 503 naming the missing worker. GPUs are split among workers through CUDA_VISIBLE_DEVICES. On SIGHUP (or
a new version of the bento it follows) it starts a new generation beside the current one and retires the old
one once every new worker is ready (serving/workers.py's docstring tells the whole sequence)."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import time
from typing import Any

from ..models._store import MODEL_STORE_ENV
from ..sdk.service import ServiceSpec
from .app import ServeOptions, create_app
from .tuning import Tuning, knob
from .server import bind, configure_logging, uvicorn_server
from .targets import ServeError, Target, bento_target, latest_target, load_target

log = logging.getLogger("bento_like.serving")


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
        self.sock = sock or bind(host, port)  # a dependency's is bound by pkg serve's parent
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
                where = latest_target(self.follow, self.tuning)
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
            where = bento_target(bento, self.tuning)
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
    configure_logging(settings["server_args"]["log_level"])
    options = settings["options"]
    spec = load_target(where)
    app = create_app(spec, options, worker_status=(status, index))
    uvicorn_server(app, settings["server_args"], supervised=True).run(sockets=[sock])


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


