"""The ASGI application for one service: API routes, health, metrics, OpenAPI and docs, and its lifespan.

Instances are built in the background after the server starts listening, so ``/livez`` answers at once and
``/readyz`` turns 200 only when every instance is built and its startup hooks have run. A rolling reload's new
workers (``ServeOptions.accept_when_ready``) listen only once ready instead (serving/workers.py).
"""

from __future__ import annotations

import asyncio
import gc
import importlib.util
import inspect
import logging
import os
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator

import msgspec
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from .. import __version__
from ..description import openapi_document
from ..sdk.service import ServiceSpec, get_spec, set_current_service
from .batching import Batcher, BatchMetrics
from .deadlines import Watchdog
from .dependencies import Dependencies, DependencyAddress
from .errors import HTTPError
from .instances import InstancePool
from .metrics import Registry, publish, published
from .openapi import SWAGGER_HTML
from .placement import BatchPlacement, ServerLoad
from .repository import ModelRepository
from .repository_api import repository_routes
from .routes import APIEndpoint
from .task_store import TaskStore
from .tasks import TaskRoutes
from .tuning import Tuning
from .v2 import v2_routes
from .warmup import WarmupFailed, WarmupPlan

log = logging.getLogger("bento_like.serving")

DEFAULT_MAX_QUEUE = 1024


@dataclass
class ServeOptions:
    """Runtime settings that override the service's declaration (from ``pkg serve`` flags)."""

    timeout: float | None = None
    max_concurrency: int | None = None
    max_body_size: int | None = None
    max_queue: int | None = None
    workers: int = 1
    worker_id: str | None = None
    tuning: Tuning | None = None  # read from the environment once by `pkg serve`, and sent to every worker
    metrics_dir: str | None = None  # set by the supervisor of --workers N: where workers publish their metrics
    control_dir: str | None = None  # made by the supervisor: private to it and its workers, of every generation
    # A rolling reload's new workers take connections off the shared socket only once ready (else they would
    # answer 503 "starting" to requests the old generation could have served).
    accept_when_ready: bool = False
    # by service key: where the separately-run dependencies listen (set by `pkg serve`, serving/dependencies.py)
    dependencies: dict[str, DependencyAddress] = field(default_factory=dict)


class ServerState:
    """What the routes of one server process share: the service, its limits and settings, its instances, its
    metrics and its watchdog, how many requests it holds, and whether it is ready."""

    def __init__(self, spec: ServiceSpec, options: ServeOptions, worker_status: Any = None) -> None:
        traffic = spec.traffic
        self.worker_status = worker_status
        self.spec = spec
        self.tuning = options.tuning or Tuning.from_env()
        self.timeout: float = options.timeout or traffic.timeout
        self.max_concurrency: int | None = options.max_concurrency or traffic.max_concurrency
        self.max_body_size: int = options.max_body_size or traffic.max_body_size
        self.max_queue: int = options.max_queue or traffic.max_queue or DEFAULT_MAX_QUEUE
        self.metrics = Registry({"worker": options.worker_id} if options.worker_id else None)
        self.workers = max(1, options.workers)
        self.dependencies = Dependencies(spec, options.dependencies)
        self.pool = InstancePool(spec, self.tuning, workers=options.workers, remotes=self.dependencies)
        self.watchdog = Watchdog(self.tuning.watchdog_interval_s)
        self.load = ServerLoad()
        self.endpoints: list[APIEndpoint] = []
        self.ready = False
        self.stopping = False  # set on SIGTERM: /readyz and bento_like_ready say not ready from then on
        # set when a rolling reload retires this worker: its successor owns its status slot's twin and its
        # published metrics from then on, so it writes neither
        self.retiring = False
        self.failure: str | None = None
        self.unavailable: str | None = None  # why the APIs answer 503 while ready was true (a model unloaded)
        self.versioned = bool(spec.model_refs())
        self.control_dir = options.control_dir
        self.repository = ModelRepository(self)
        self.api_names = {entry.attr: entry.config.name for entry in spec.apis}
        self.warmups: dict[str, WarmupPlan] = {}  # by API name: the warm-ups the APIs asked for

    async def start(self) -> None:
        failure = await self.dependencies.wait_until_ready()
        if failure is not None:
            self.failure = failure
            log.error("%s; the server will not become ready", failure)
            return
        try:
            await self.pool.start(self.repository.initial_choice())
        except Exception as exc:
            self.failure = f"{type(exc).__name__}: {exc}"
            log.exception("building the instances of %s failed; the server will not become ready", self.spec.name)
            return
        try:
            await self.warm_up()
        except WarmupFailed as exc:
            self.failure = str(exc)
            log.error("%s; the server will not become ready", exc, exc_info=exc.__cause__)
            return
        set_current_service(lambda: self.pool.pick().obj)
        _freeze_heap()
        self.ready = True
        self._publish(1)
        log.info("service %s is ready", self.spec.name)

    def serving_again(self) -> None:
        """A model was loaded after an unload: the APIs take requests again."""
        if self.unavailable is not None:
            self.unavailable = None
            self.ready = True

    def _publish(self, value: int) -> None:
        if self.worker_status is not None and not self.retiring:
            shared, index = self.worker_status
            shared[index] = value

    def missing_workers(self) -> list[int]:
        """Sibling workers that are not ready (starting, or restarting after a crash). During a rolling reload
        two generations share the status array (N slots each): a worker looks at its own generation's only."""
        if self.worker_status is None:
            return []
        shared, index = self.worker_status
        first = index - index % self.workers
        return [i - first for i in range(first, min(first + self.workers, len(shared))) if shared[i] != 1]

    async def warm_up(self) -> None:
        """Run the warm-ups the APIs asked for, then start the batchers. A batchable API without one starts with
        an empty latency model, which learns from its first batches (docs/batching.md)."""
        for ep in self.endpoints:
            plan = self.warmups.get(ep.name)
            if plan is not None:
                await plan.run(self.spec, ep, self.pool)
            elif ep.batcher is not None:
                log.info("API %r is not warmed up (no warmup=...): its batcher learns its latency from the first "
                         "batches", ep.name)
        for ep in self.endpoints:
            if ep.batcher is not None:
                ep.batcher.start()

    def blocked(self) -> str | None:
        """Why an instance cannot run sync calls now (every request thread runs a call its request abandoned),
        or None."""
        for inst in self.pool.instances:
            calls = inst.runner.abandoned()
            if calls and len(calls) >= inst.runner.threads:
                apis = ", ".join(sorted({repr(self.api_names.get(c.name, c.name)) for c in calls}))
                oldest = max(c.seconds for c in calls)
                return (
                    f"all {inst.runner.threads} request threads of instance {inst.index} run calls abandoned past "
                    f"their deadline (API {apis}, the oldest for {oldest:.0f} s); sync APIs wait until one returns"
                )
        return None

    async def watch_threads(self) -> None:
        """Log each call that runs on after its request gave up, and each instance all of whose request threads
        such calls hold (a worker then also tells its siblings it is not ready)."""
        seen: set[int] = set()
        was_blocked = False
        while True:
            await asyncio.sleep(ABANDONED_CHECK_S)
            now_seen: set[int] = set()
            for inst in self.pool.instances:
                for call in inst.runner.abandoned():
                    now_seen.add(call.id)
                    if call.id not in seen:
                        log.warning(
                            "a call of API %r still runs past its deadline, %.1f s after it started, on instance %d; "
                            "it holds one of the instance's %d request threads until it returns",
                            self.api_names.get(call.name, call.name), call.seconds, inst.index, inst.runner.threads,
                        )
            if seen - now_seen:
                log.info("%d abandoned call(s) returned; their threads are free again", len(seen - now_seen))
            seen = now_seen
            reason = self.blocked()
            if reason is not None and not was_blocked:
                log.error("%s: /readyz answers 503 meanwhile", reason)
            elif reason is None and was_blocked:
                log.info("request threads are free again: ready")
            was_blocked = reason is not None
            if self.ready:
                self._publish(0 if was_blocked else 1)

    async def readiness(self, hooks: bool = True) -> tuple[dict[str, Any], int] | None:
        """None when /readyz should answer 200, else its body and status; sets the ``bento_like_ready`` gauge.
        Without ``hooks`` the service's own readiness checks are not asked (a periodic refresh of the gauge)."""
        problem = await self._readiness(hooks)
        self.metrics.ready.set((), 0 if problem else 1)
        return problem

    async def _readiness(self, hooks: bool) -> tuple[dict[str, Any], int] | None:
        if self.stopping:
            return {"ready": False, "state": "stopping", "error": "the server is shutting down"}, 503
        if self.ready:
            blocked = self.blocked() or (await self.not_ready_by_hook() if hooks else None)
            if blocked is not None:
                return {"ready": False, "state": "blocked", "error": blocked}, 503
            dependency = self.dependencies.problem()
            if dependency is not None:
                return {"ready": False, "state": "degraded", "error": dependency}, 503
            missing = self.missing_workers()
            if not missing:
                return None
            return {
                "ready": False,
                "state": "degraded",
                "error": f"worker(s) {', '.join(map(str, missing))} not ready (starting, restarting, or "
                "all request threads held by abandoned calls: see that worker's log)",
            }, 503
        if self.failure:
            return {"ready": False, "state": "failed", "error": f"startup failed: {self.failure}"}, 503
        if self.unavailable:
            return {"ready": False, "state": "unloaded", "error": self.unavailable}, 503
        return {"ready": False, "state": "starting",
                "error": self.dependencies.waiting_message() or "instances are being built"}, 503

    async def not_ready_by_hook(self) -> str | None:
        """Why one of the service's own readiness checks (``@on_ready`` methods, ``__is_ready__``) says it is not
        ready on some instance, or None."""
        for attr in self.spec.ready_hooks:
            for inst in self.pool.instances:
                if inst.obj is None:  # its objects are being replaced (a model swap in replace mode)
                    continue
                hook = getattr(inst.obj, attr)
                what = f"{attr} of instance {inst.index}"
                try:
                    if inspect.iscoroutinefunction(hook):
                        ready = await asyncio.wait_for(hook(), IS_READY_TIMEOUT_S)
                    else:  # it may block (a probe of a remote model): never on the event loop
                        ready = await asyncio.wait_for(asyncio.get_running_loop().run_in_executor(None, hook),
                                                       IS_READY_TIMEOUT_S)
                except asyncio.TimeoutError:
                    return f"{what} did not answer within {IS_READY_TIMEOUT_S:g} s"
                except Exception as exc:
                    log.warning("%s raised", what, exc_info=True)
                    return f"{what} raised {type(exc).__name__}: {exc}"
                if not ready:
                    return f"{what} returned {ready!r}"
        return None

    def stop_batchers(self) -> None:
        for ep in self.endpoints:
            if ep.batcher is not None:
                ep.batcher.stop()


METRICS_PUBLISH_S = 1.0
IS_READY_TIMEOUT_S = 5.0


def run_deployment_hooks(spec: ServiceSpec) -> None:
    """Run the service's ``@on_deployment`` functions (and its in-process dependencies'), once, before any
    worker starts."""
    done: set[type] = set()

    def run(s: ServiceSpec) -> None:
        if s.cls in done:
            return
        done.add(s.cls)
        for dep in s.dependencies.values():
            if dep.url is None:  # a deployment at a URL was deployed by someone else
                run(get_spec(dep.target))
        for attr in s.deployment_hooks:
            log.info("running the deployment hook %s.%s", s.name, attr)
            result = getattr(s.cls, attr)()
            if inspect.isawaitable(result):
                asyncio.run(_awaited(result))

    run(spec)


async def _awaited(value: Any) -> Any:
    return await value
ABANDONED_CHECK_S = 1.0


def _freeze_heap() -> None:
    """Move everything alive after startup (the frameworks, the models, the service's objects: hundreds of
    thousands of objects once torch is imported) out of the cyclic garbage collector's reach. Without it, each
    full collection walks them all: about 100 ms during which no request is answered, a p99 spike every few
    seconds under load. Objects made while serving are collected as usual."""
    gc.collect()
    gc.freeze()


def create_app(spec: ServiceSpec, options: ServeOptions | None = None, worker_status: Any = None) -> Starlette:
    """The app for one process. ``worker_status`` is ``(shared array, my index)`` under a supervisor."""
    options = options or ServeOptions()
    for key, value in spec.envs.items():
        os.environ.setdefault(key, value)
    state = ServerState(spec, options, worker_status)
    endpoints = [APIEndpoint(state, entry.attr, entry.config) for entry in spec.apis]
    state.endpoints = endpoints
    for ep in endpoints:
        if ep.config.batchable:
            placement = BatchPlacement(state.tuning.placement, ep.name, ep.config.max_latency_ms / 1000.0,
                                       state.pool.devices, ep.is_async, state.load)
            ep.batcher = Batcher(ep.config, ep.attr, ep.is_async, state.pool, placement,
                                 BatchMetrics(state.metrics, ep.name), state.max_queue, state.tuning.batching)
        if ep.config.warmup is not False:
            # an input the API cannot take stops the server here, before it listens
            state.warmups[ep.name] = WarmupPlan(ep)
    tasks = _task_routes(state, endpoints)
    openapi = msgspec.json.encode(openapi_document(spec.name, __version__, [ep.codec.description for ep in endpoints]))
    docs_html = SWAGGER_HTML.format(title=spec.name)

    async def livez(request: Request) -> Response:
        if state.failure:  # a process whose instances could not be built will never recover: restart it
            return JSONResponse({"alive": False, "state": "failed", "error": f"startup failed: {state.failure}"}, 503)
        return PlainTextResponse("ok")

    async def readyz(request: Request) -> Response:
        problem = await state.readiness()
        if problem is None:
            return PlainTextResponse("ready")
        body, status = problem
        # a failed start will not get better by asking again soon: no Retry-After
        headers = None if body["state"] == "failed" else {"Retry-After": "1"}
        return JSONResponse(body, status_code=status, headers=headers)

    metrics_dir = options.metrics_dir if options.worker_id is not None else None

    async def metrics(request: Request) -> Response:
        await state.readiness()  # the bento_like_ready gauge, as of this scrape
        others = published(Path(metrics_dir), options.worker_id) if metrics_dir else ()
        return PlainTextResponse(state.metrics.render(others), media_type="text/plain; version=0.0.4")

    async def publish_forever() -> None:
        assert metrics_dir is not None and options.worker_id is not None
        while not state.retiring:
            try:
                await state.readiness(hooks=False)
                publish(state.metrics, Path(metrics_dir), options.worker_id)
            except OSError as exc:  # the directory went away (the supervisor is exiting)
                log.debug("could not publish metrics: %s", exc)
            await asyncio.sleep(METRICS_PUBLISH_S)

    async def openapi_json(request: Request) -> Response:
        return Response(openapi, media_type="application/json")

    async def docs(request: Request) -> Response:
        return HTMLResponse(docs_html)

    async def root(request: Request) -> Response:
        return RedirectResponse("/docs")

    routes: list[Any] = [
        Route("/", root, methods=["GET"]),
        Route("/livez", livez, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/openapi.json", openapi_json, methods=["GET"]),
        Route("/docs", docs, methods=["GET"]),
        Mount("/docs/static", StaticFiles(directory=_swagger_dir()), name="swagger"),
    ]
    routes += [Route(ep.config.route, ep, methods=[ep.config.method]) for ep in endpoints]
    routes += v2_routes(state, endpoints)
    if state.tuning.updates.admin:
        routes += repository_routes(state, state.repository)
    routes += [route for task in tasks for route in task.routes()]
    # A mount at "/" comes last, so that every route of the server's own wins over it.
    for mounted in sorted(spec.asgi_apps, key=lambda m: m.path == "/"):
        routes.append(Mount("" if mounted.path == "/" else mounted.path, app=mounted.app, name=mounted.name))

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        state.watchdog.start()
        starting = asyncio.create_task(state.start())
        watcher = asyncio.create_task(state.watch_threads())
        if tasks:
            tasks[0].store.open()
        sweeper = asyncio.create_task(_sweep_forever(tasks[0].store)) if tasks else None
        if options.accept_when_ready:
            await _until_started(state, starting)
        # A new generation's worker publishes once ready: until then its predecessor of the same number does.
        publisher = asyncio.create_task(publish_forever()) if metrics_dir else None
        updates = []
        if state.repository.versioned and state.repository.control is not None and state.workers > 1:
            updates.append(asyncio.create_task(state.repository.control.follow()))
        # one watcher per server: with several workers, worker 0's loads reach every worker
        if state.repository.versioned and state.tuning.updates.watch_s and options.worker_id in (None, "0"):
            updates.append(asyncio.create_task(state.repository.watch(state.tuning.updates.watch_s)))
        yield
        for task in updates:
            task.cancel()
        if publisher is not None:
            publisher.cancel()
        if sweeper is not None:
            sweeper.cancel()
        for task in tasks:
            task.stop()
        if tasks:
            tasks[0].store.close()
        watcher.cancel()
        if not starting.done():
            starting.cancel()
        state.ready = False
        state._publish(0)
        state.stop_batchers()
        await state.pool.stop()
        await state.dependencies.close()
        state.watchdog.stop()

    app = ServiceApp(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={HTTPException: _http_exception, HTTPError: _http_error},
    )
    app.api_routes = {ep.config.route: ep for ep in endpoints if ep.config.method == "POST"}
    app.state.server = state
    state.metrics.in_flight.collect = lambda: {(ep.name,): ep.in_flight for ep in endpoints}
    state.metrics.loop_lag.collect = lambda: {(): state.watchdog.lag}
    state.metrics.abandoned_calls.collect = lambda: {
        (str(inst.index),): len(inst.runner.abandoned()) for inst in state.pool.instances
    }
    state.metrics.tasks_held.collect = lambda: {
        key: value for task in tasks
        for key, value in (((task.name, "pending"), len(task.pending)), ((task.name, "in_progress"), len(task.running)))
    }
    state.metrics.queue_depth.collect = lambda: {
        (ep.name,): ep.batcher.queued_requests for ep in endpoints if ep.batcher is not None
    }
    return app


async def _until_started(state: ServerState, starting: asyncio.Task[None]) -> None:
    """Wait for the instances and warm-ups before the server listens; a failed start (or a stop meanwhile)
    raises, so that uvicorn never opens the socket and the process exits non-zero (the instances built so far
    run their shutdown hooks first)."""
    while not starting.done() and not state.stopping:
        await asyncio.wait({starting}, timeout=0.1)
    if state.ready:
        return
    starting.cancel()
    await state.pool.stop()
    raise RuntimeError("stopped before it was ready" if state.stopping else f"startup failed: {state.failure}")


def _task_routes(state: ServerState, endpoints: list[APIEndpoint]) -> list[TaskRoutes]:
    """The task routes of the service's ``@task`` APIs, over one store (made only when there is a task)."""
    task_endpoints = [ep for ep in endpoints if ep.config.task]
    if not task_endpoints:
        return []
    settings = state.tuning.tasks
    store = TaskStore(Path(settings.directory(state.spec.name)), settings.result_ttl_s, settings.max_results)
    log.info("tasks of %s are kept in %s", state.spec.name, store.directory)
    return [TaskRoutes(ep, store, settings.timeout_s or state.timeout) for ep in task_endpoints]


async def _sweep_forever(store: TaskStore) -> None:
    """Forget expired and excess task results now and then (a read also forgets an expired one at once)."""
    interval = max(0.5, min(60.0, store.result_ttl / 2))
    while True:
        try:
            forgotten = await asyncio.to_thread(store.sweep)
            if forgotten:
                log.debug("forgot %d finished task(s)", forgotten)
        except OSError as exc:
            log.warning("could not sweep the task store %s: %s", store.directory, exc)
        await asyncio.sleep(interval)


class ServiceApp(Starlette):
    """Starlette, with a dict lookup in front for the API routes: the common request skips the router."""

    api_routes: dict[str, APIEndpoint]

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and not scope.get("root_path"):
            endpoint = self.api_routes.get(scope["path"])
            if endpoint is not None:
                scope["app"] = self
                await endpoint(scope, receive, send)
                return
        await super().__call__(scope, receive, send)


async def _http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    message = {404: f"no route {request.url.path!r}: see /docs for the routes of this service"}.get(exc.status_code)
    if exc.status_code == 405:
        message = f"method {request.method} is not allowed on {request.url.path!r}; allowed: {exc.headers.get('Allow', '') if exc.headers else ''}"
    return JSONResponse(
        {"error": message or exc.detail, "status": exc.status_code}, status_code=exc.status_code, headers=exc.headers
    )


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPError)
    return Response(exc.body(), status_code=exc.status, headers=exc.headers, media_type="application/json")


def _swagger_dir() -> str:
    """swagger-ui-py's static assets, found without importing the package (it imports jinja2 and its handlers)."""
    spec = importlib.util.find_spec("swagger_ui")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("/docs needs the swagger-ui-py package, a dependency of bento_like: reinstall it")
    return str(Path(next(iter(spec.submodule_search_locations))) / "static")
