"""The ASGI application for one service: API routes, health, metrics, OpenAPI and docs, and its lifespan.

Instances are built in the background after the server starts listening, so ``/livez`` answers at once and
``/readyz`` turns 200 only when every instance is built and its startup hooks have run.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
from contextlib import asynccontextmanager
from dataclasses import dataclass
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
from ..sdk.service import ServiceSpec
from .batching import Batcher, BatchMetrics
from .deadlines import Watchdog
from .errors import HTTPError
from .instances import InstancePool
from .metrics import Registry, publish, published
from .openapi import SWAGGER_HTML
from .placement import BatchPlacement, ServerLoad
from .routes import APIEndpoint
from .tuning import Tuning
from .v2 import v2_routes

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
        self.pool = InstancePool(spec, self.tuning, workers=options.workers)
        self.watchdog = Watchdog(self.tuning.watchdog_interval_s)
        self.load = ServerLoad()
        self.endpoints: list[APIEndpoint] = []
        self.ready = False
        self.failure: str | None = None

    async def start(self) -> None:
        try:
            await self.pool.start()
            await self.warm_up()
        except Exception as exc:
            self.failure = f"{type(exc).__name__}: {exc}"
            log.exception("building the instances of %s failed; the server will not become ready", self.spec.name)
            return
        _freeze_heap()
        self.ready = True
        self._publish(1)
        log.info("service %s is ready", self.spec.name)

    def _publish(self, value: int) -> None:
        if self.worker_status is not None:
            shared, index = self.worker_status
            shared[index] = value

    def missing_workers(self) -> list[int]:
        """Sibling workers that are not ready (starting, or restarting after a crash)."""
        if self.worker_status is None:
            return []
        shared, _ = self.worker_status
        return [i for i in range(len(shared)) if shared[i] != 1]

    async def warm_up(self) -> None:
        """Run each API whose inputs can be made up (arrays of declared shape) before turning ready.

        A warm-up that fails (a model that refuses zeros, say) is logged and skipped: the latency model
        then learns from the first real batches instead."""
        for ep in self.endpoints:
            try:
                await self._warm_up(ep)
            except Exception as exc:
                log.warning("warm-up of API %r failed (%s: %s); serving without it", ep.name, type(exc).__name__, exc)
            if ep.batcher is not None:
                ep.batcher.start()

    async def _warm_up(self, ep: APIEndpoint) -> None:
        if ep.batcher is not None:
            example = ep.codec.example(1, ep.config.input_batch_dim)
            if example is not None:
                await ep.batcher.warm_up(example[ep.config.params[0]])
            return
        example = ep.codec.example(1)
        if example is None or ep.is_gen or ep.is_async_gen:
            return
        for inst in self.pool.instances:
            method = getattr(inst.obj, ep.attr)
            await (method(**example) if ep.is_async else inst.runner.submit(method, **example))

    def stop_batchers(self) -> None:
        for ep in self.endpoints:
            if ep.batcher is not None:
                ep.batcher.stop()


METRICS_PUBLISH_S = 1.0


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
    openapi = msgspec.json.encode(openapi_document(spec.name, __version__, [ep.codec.description for ep in endpoints]))
    docs_html = SWAGGER_HTML.format(title=spec.name)

    async def livez(request: Request) -> Response:
        if state.failure:  # a process whose instances could not be built will never recover: restart it
            return JSONResponse({"alive": False, "state": "failed", "error": f"startup failed: {state.failure}"}, 503)
        return PlainTextResponse("ok")

    async def readyz(request: Request) -> Response:
        if state.ready:
            missing = state.missing_workers()
            if not missing:
                return PlainTextResponse("ready")
            return JSONResponse(
                {
                    "ready": False,
                    "state": "degraded",
                    "error": f"worker(s) {', '.join(map(str, missing))} not ready (starting or restarting)",
                },
                status_code=503,
                headers={"Retry-After": "1"},
            )
        if state.failure:
            return JSONResponse(
                {"ready": False, "state": "failed", "error": f"startup failed: {state.failure}"}, status_code=503
            )
        return JSONResponse(
            {"ready": False, "state": "starting", "error": "instances are being built"},
            status_code=503,
            headers={"Retry-After": "1"},
        )

    metrics_dir = options.metrics_dir if options.worker_id is not None else None

    async def metrics(request: Request) -> Response:
        others = published(Path(metrics_dir), options.worker_id) if metrics_dir else ()
        return PlainTextResponse(state.metrics.render(others), media_type="text/plain; version=0.0.4")

    async def publish_forever() -> None:
        assert metrics_dir is not None and options.worker_id is not None
        while True:
            try:
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
    routes += [Route(ep.config.route, ep, methods=["POST"]) for ep in endpoints]
    routes += v2_routes(state, endpoints)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        state.watchdog.start()
        starting = asyncio.create_task(state.start())
        publisher = asyncio.create_task(publish_forever()) if metrics_dir else None
        yield
        if publisher is not None:
            publisher.cancel()
        if not starting.done():
            starting.cancel()
        state.ready = False
        state._publish(0)
        state.stop_batchers()
        await state.pool.stop()
        state.watchdog.stop()

    app = ServiceApp(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={HTTPException: _http_exception, HTTPError: _http_error},
    )
    app.api_routes = {ep.config.route: ep for ep in endpoints}
    app.state.server = state
    state.metrics.in_flight.collect = lambda: {(ep.name,): ep.in_flight for ep in endpoints}
    state.metrics.loop_lag.collect = lambda: {(): state.watchdog.lag}
    state.metrics.queue_depth.collect = lambda: {
        (ep.name,): ep.batcher.queued_requests for ep in endpoints if ep.batcher is not None
    }
    return app


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
    import swagger_ui_bundle

    return str(swagger_ui_bundle.swagger_ui_path)
