"""The task routes of one ``@task`` API: submit now, poll later (docs/tasks.md).

``POST <route>/submit`` decodes the body as ``POST <route>`` does, records a pending task and answers its id at
once. The task runs in this process, through the API's own ``APIEndpoint.invoke``: the same instances and, for a
batchable task, the same batcher as the API's requests. Each instance runs one task of the API at a time (a
batchable one: a batch's worth), so tasks leave room for requests; the others wait, pending, up to the service's
max_queue. What it answers is written to the task store (task_store.py), which every worker reads, so
``status``, ``get``, ``cancel`` and ``retry`` work whichever worker a request reaches.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import uuid
from collections import deque
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope

from ..sdk.context import Context
from .codecs import JSON, NonFiniteResult, encode_result
from .errors import HTTPError, too_many_requests, unavailable
from .routes import _RESPONSE_TYPES, APIEndpoint, _read_body
from .task_store import CANCELED, COMPLETED, FAILED, FINISHED, TaskRecord, TaskStore, valid_task_id

log = logging.getLogger("bento_like.serving")

RETRY_AFTER_S = 1.0  # how long a task refused by a full batcher queue waits before it asks again


@dataclass(eq=False)
class Job:
    """A task of this process that has not finished: its arguments, and its request for a retry."""

    task_id: str
    kwargs: dict[str, Any]
    request: tuple[str, bytes]  # Content-Type, body
    task: asyncio.Task[None] | None = None
    canceled: bool = False


class TaskRoutes:
    """``<route>/submit``, ``/status``, ``/get``, ``/cancel`` and ``/retry`` of one task API."""

    def __init__(self, endpoint: APIEndpoint, store: TaskStore, timeout: float) -> None:
        self.endpoint = endpoint
        self.store = store
        self.name = endpoint.name
        self.route = endpoint.config.route
        self.timeout = timeout
        config = endpoint.config
        self.limit = len(endpoint.state.pool.instances) * (config.max_batch_size if config.batchable else 1)
        self.pending: deque[Job] = deque()
        self.running: dict[str, Job] = {}
        self.stopping = False

    def routes(self) -> list[Route]:
        return [
            Route(self.route + "/submit", _guarded(self.submit, self.name), methods=["POST"]),
            Route(self.route + "/status", _guarded(self.status, self.name), methods=["GET"]),
            Route(self.route + "/get", _guarded(self.get, self.name), methods=["GET"]),
            Route(self.route + "/cancel", _guarded(self.cancel, self.name), methods=["PUT"]),
            Route(self.route + "/retry", _guarded(self.retry, self.name), methods=["POST"]),
        ]

    # -- routes -----------------------------------------------------------------------------------------------

    async def submit(self, request: Request) -> Response:
        self._admit()
        endpoint = self.endpoint
        content_type, _ = endpoint.read_headers(request.scope)
        body = await _read_body(request.receive, endpoint.state.max_body_size)
        kwargs = await endpoint.decode(request.scope, _replay(body), content_type)
        self._with_context(kwargs, request.scope)
        return await self._enqueue(kwargs, (content_type or JSON, body), None)

    def _with_context(self, kwargs: dict[str, Any], scope: Scope) -> None:
        """A task that takes ``ctx: bl.Context`` gets the submitting request's; what it sets on ``ctx.response``
        is not kept (the result is fetched later, by another request)."""
        if self.endpoint.context is not None:
            kwargs[self.endpoint.context] = Context(Request(scope))

    async def status(self, request: Request) -> Response:
        record = await self._record(request)
        return JSONResponse(record.to_json())

    async def get(self, request: Request) -> Response:
        record = await self._record(request)
        if record.status not in FINISHED:
            raise HTTPError(
                409,
                f"task {record.task_id} of API {self.name!r} is not finished: its status is {record.status}; "
                f"poll GET {self.route}/status?task_id={record.task_id}",
                task_id=record.task_id, task_status=record.status,
            )
        answer = await asyncio.to_thread(self.store.answer, record.task_id)
        if answer is None:  # forgotten between reading the record and its answer
            raise self._unknown(record.task_id)
        return Response(answer, status_code=record.answer_status, media_type=record.answer_type)

    async def cancel(self, request: Request) -> Response:
        task_id = self._task_id(request)
        record = await asyncio.to_thread(self.store.cancel, task_id, self.name)
        if record is None:
            raise self._unknown(task_id)
        if record.status != CANCELED:
            raise HTTPError(
                409, f"task {task_id} of API {self.name!r} already finished ({record.status}): nothing to cancel",
                task_id=task_id, task_status=record.status,
            )
        self._cancel_here(task_id)
        return JSONResponse(record.to_json())

    async def retry(self, request: Request) -> Response:
        """Run a failed task again with the same input, as a new task (BentoML's retry)."""
        record = await self._record(request)
        if record.status != FAILED:
            raise HTTPError(
                409, f"task {record.task_id} of API {self.name!r} is {record.status}: only a failed task can be "
                "retried", task_id=record.task_id, task_status=record.status,
            )
        body = await asyncio.to_thread(self.store.kept_input, record.task_id)
        if body is None or record.input_type is None:
            raise HTTPError(
                409, f"task {record.task_id} of API {self.name!r} kept no input to retry with (its server process "
                "died while it ran): submit it again", task_id=record.task_id,
            )
        self._admit()
        scope: Scope = {"type": "http", "method": "POST", "path": self.route + "/retry", "query_string": b"",
                        "headers": [(b"content-type", record.input_type.encode("latin-1"))]}
        kwargs = await self.endpoint.decode(scope, _replay(body), record.input_type)
        self._with_context(kwargs, request.scope)
        return await self._enqueue(kwargs, (record.input_type, body), record.task_id)

    # -- running ----------------------------------------------------------------------------------------------

    async def _enqueue(self, kwargs: dict[str, Any], request: tuple[str, bytes], retry_of: str | None) -> Response:
        record = await asyncio.to_thread(self.store.create, self.name, retry_of)
        self.pending.append(Job(record.task_id, kwargs, request))
        self._pump()
        log.info("task %s of API %r submitted%s", record.task_id, self.name,
                 f" (a retry of {retry_of})" if retry_of else "")
        return JSONResponse({"task_id": record.task_id, "status": record.status})

    def _pump(self) -> None:
        """Start pending tasks while the API has room for them."""
        loop = asyncio.get_running_loop()
        while self.pending and len(self.running) < self.limit and not self.stopping:
            job = self.pending.popleft()
            if job.canceled:
                continue
            self.running[job.task_id] = job
            job.task = loop.create_task(self._run(job))

    async def _run(self, job: Job) -> None:
        try:
            if not await asyncio.to_thread(self.store.start, job.task_id):
                self._ended(CANCELED)  # while pending, by a request to another worker
                return
            outcome = await self._execute(job)
            if not job.canceled:
                kept = await asyncio.to_thread(self.store.finish, job.task_id, *outcome)
                self._ended(outcome[0] if kept else CANCELED)
                log.info("task %s of API %r %s", job.task_id, self.name, outcome[0] if kept else "was canceled")
        except asyncio.CancelledError:
            if not job.canceled:  # the server is stopping: stop() records the task as interrupted
                raise
        except Exception:  # the store failed (disk full, say): the task cannot be recorded as finished
            log.exception("task %s of API %r: could not record its outcome", job.task_id, self.name)
        finally:
            self.running.pop(job.task_id, None)
            if not self.stopping:
                self._pump()

    async def _execute(self, job: Job) -> tuple[str, int, str, bytes, tuple[str, bytes] | None]:
        """Run the task; how it ended: (status, the HTTP status, Content-Type and body ``get`` answers, the
        request to keep for a retry)."""
        try:
            return await self._outcome(job)
        finally:
            self._release(job)

    async def _outcome(self, job: Job) -> tuple[str, int, str, bytes, tuple[str, bytes] | None]:
        try:
            result = await self._invoke(job.kwargs)
            status, content_type, body = _encode(result)
            return COMPLETED, status, content_type, body, None
        except asyncio.CancelledError:
            raise
        except NonFiniteResult as exc:
            error = self.endpoint._unsendable(exc)
        except HTTPError as exc:  # the run limit passed, say
            error = exc
        except Exception:
            error_id = uuid.uuid4().hex[:12]
            log.exception("error %s in task %s of API %r", error_id, job.task_id, self.name)
            error = HTTPError(
                500,
                f"task {job.task_id} of API {self.name!r} raised an exception (error id {error_id}); the server "
                "log has the traceback", error_id=error_id,
            )
        body = HTTPError(error.status, error.message, task_id=job.task_id, **error.extra).body()
        return FAILED, error.status, JSON, body, job.request

    async def _invoke(self, kwargs: dict[str, Any]) -> Any:
        """Call the API within the task's run limit. A batcher whose queue is full refuses (429) the task as it
        refuses a request; the task waits and asks again, as a client would, until its time is up."""
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                return await self.endpoint.invoke(kwargs, max(deadline - time.monotonic(), 0.001))
            except HTTPError as exc:
                if exc.status != 429 or time.monotonic() + RETRY_AFTER_S >= deadline:
                    raise
            await asyncio.sleep(RETRY_AFTER_S)

    def _release(self, job: Job) -> None:
        """Delete the temporary files of the job's Path inputs and its ctx.temp_dir, once it ran or will never run."""
        rich = self.endpoint.codec.rich
        if rich is not None and rich.paths:
            rich.release(job.kwargs)
        context = self.endpoint.context
        if context is not None:
            job.kwargs[context].cleanup()

    def _cancel_here(self, task_id: str) -> None:
        """Stop a task this process holds: a pending one never starts; a running async call is interrupted; a
        running sync call (or batch) cannot be, so it runs to its end and its result is dropped."""
        for job in self.pending:
            if job.task_id == task_id:
                job.canceled = True
                self.pending.remove(job)
                self._release(job)
                self._ended(CANCELED)
                return
        job = self.running.get(task_id)
        if job is None or job.canceled:
            return
        job.canceled = True
        self._ended(CANCELED)
        if self.endpoint.is_async and self.endpoint.batcher is None and job.task is not None:
            job.task.cancel()

    def stop(self) -> None:
        """The server is stopping: tasks not finished are recorded failed, their inputs kept for a retry."""
        self.stopping = True
        jobs = [job for job in (*self.pending, *self.running.values()) if not job.canceled]
        for job in self.running.values():
            if job.task is not None:
                job.task.cancel()
        if jobs:
            self.store.abandon({job.task_id: job.request for job in jobs}, "the server stopped before it finished")
            log.warning("%d task(s) of API %r did not finish before the server stopped; marked failed (retry them)",
                        len(jobs), self.name)

    # -- helpers ----------------------------------------------------------------------------------------------

    def _ended(self, status: str) -> None:
        self.endpoint.state.metrics.tasks.inc((self.name, status))

    def _admit(self) -> None:
        state = self.endpoint.state
        if not state.ready:
            state.metrics.rejections.inc((self.name, "not_ready"))
            if state.failure:
                raise HTTPError(503, f"service {state.spec.name!r} failed to start: {state.failure}")
            raise unavailable(f"service {state.spec.name!r} is starting: its instances are not ready yet", 1)
        held = len(self.pending) + len(self.running)
        if held >= state.max_queue:
            state.metrics.rejections.inc((self.name, "queue_full"))
            raise too_many_requests(
                f"task API {self.name!r} holds {held} tasks pending or running, its limit (max_queue); "
                "submit again later", RETRY_AFTER_S, "queue_full",
            )

    def _task_id(self, request: Request) -> str:
        task_id = request.query_params.get("task_id")
        if task_id is None:
            raise HTTPError(
                400, f"query parameter 'task_id' is required: {request.method} {request.url.path}?task_id=<the id "
                f"{self.route}/submit answered>", field="task_id",
            )
        if not valid_task_id(task_id):
            raise HTTPError(404, f"no task {task_id!r} of API {self.name!r}: not a task id (32 lowercase hex "
                            "digits, as submit answers)", task_id=task_id)
        return task_id

    async def _record(self, request: Request) -> TaskRecord:
        task_id = self._task_id(request)
        record = await asyncio.to_thread(self.store.read, task_id)
        if record is None or record.api != self.name:
            raise self._unknown(task_id)
        return record

    def _unknown(self, task_id: str) -> HTTPError:
        return HTTPError(
            404,
            f"no task {task_id!r} of API {self.name!r}: never submitted here, or forgotten (finished tasks are kept "
            f"{self.store.result_ttl:g} s)",
            task_id=task_id,
        )


def _encode(result: Any) -> tuple[int, str, bytes]:
    """The status, Content-Type and body ``POST <route>`` would answer ``result`` with."""
    if isinstance(result, _RESPONSE_TYPES):
        body = getattr(result, "body", None)
        if not isinstance(body, bytes):
            raise HTTPError(500, f"a task cannot return a {type(result).__name__}: it has no body to keep")
        return result.status_code, result.headers.get("content-type", "application/octet-stream"), body
    body, content_type = encode_result(result)
    return 200, content_type, body


def _replay(body: bytes) -> Receive:
    """A receive channel that hands over a body already read."""
    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


def _guarded(handler: Callable[[Request], Awaitable[Response]], api: str) -> Callable[[Request], Awaitable[Response]]:
    """A task route: an HTTPError is answered as such (by the app's handler); anything else is a 500 with an
    error id, never Starlette's plain-text one."""

    @functools.wraps(handler)
    async def route(request: Request) -> Response:
        try:
            return await handler(request)
        except HTTPError:
            raise
        except Exception:
            error_id = uuid.uuid4().hex[:12]
            log.exception("error %s in the task route %s of API %r", error_id, request.url.path, api)
            raise HTTPError(500, f"the task route {request.url.path} failed (error id {error_id}); the server log "
                            "has the traceback", error_id=error_id) from None

    return route
