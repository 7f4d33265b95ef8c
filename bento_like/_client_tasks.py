"""Tasks from the client's side: BentoML's ``Task`` and ``AsyncTask`` handles, and what they share.

``client.<task>.submit(...)`` returns a handle holding the task's id; each method sends one request through the
client that made it (``_task_request``), so the handles carry no connection or schema of their own.
"""

from __future__ import annotations

import asyncio
import datetime
import enum
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

from ._client_core import APIInfo, APITimeoutError, decode_body, unknown_api

if TYPE_CHECKING:
    from .client import AsyncClient, Client


class ResultStatus(str, enum.Enum):
    """Where a task stands, as BentoML names it; a str, so ``status == "completed"`` holds too."""

    PENDING = "pending"
    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELED = "canceled"

    @property
    def finished(self) -> bool:
        return self in (ResultStatus.COMPLETED, ResultStatus.FAILED, ResultStatus.CANCELED)


@dataclass(frozen=True)
class TaskInfo:
    """A task's status and times (UTC), as ``GET <route>/status`` answers them."""

    id: str
    status: ResultStatus
    created_at: datetime.datetime | None
    executed_at: datetime.datetime | None
    completed_at: datetime.datetime | None

    @classmethod
    def from_json(cls, payload: Any) -> TaskInfo:
        def when(key: str) -> datetime.datetime | None:
            value = payload.get(key)
            return datetime.datetime.fromisoformat(value) if isinstance(value, str) else None

        return cls(str(payload["task_id"]), ResultStatus(payload["status"]), when("created_at"),
                   when("executed_at"), when("completed_at"))


TASK_VERBS = {"status": "GET", "get": "GET", "cancel": "PUT", "retry": "POST"}


def task_api(service: str, apis: Mapping[str, APIInfo], name: str) -> APIInfo:
    """The task API ``name``; TypeError for an API that is not a task, AttributeError for no such API."""
    if name not in apis:
        raise unknown_api(service, name, apis)
    api = apis[name]
    if not api.task:
        raise TypeError(f"API {name!r} of service {service!r} is not a task (declared with @api, not @task): "
                        f"call it directly, client.{name}(...)")
    return api


class TaskWait:
    """Polling a task's status until it finishes: how long to pause between polls, and when to give up."""

    def __init__(self, api: str, task_id: str, timeout: float) -> None:
        self.api = api
        self.task_id = task_id
        self.timeout = timeout
        self.deadline = time.monotonic() + timeout
        self.interval = 0.05

    def pause(self, info: TaskInfo) -> float:
        """Seconds to sleep before the next poll; APITimeoutError when the deadline would pass first."""
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise APITimeoutError(
                f"task {self.task_id} of API {self.api!r} did not finish within {self.timeout:g} s "
                f"(status: {info.status.value})"
            )
        interval, self.interval = self.interval, min(self.interval * 2, 1.0)
        return min(interval, left)


class Task:
    """A submitted task (``task = client.render.submit(prompt)``), with BentoML's methods: ``get_status()``,
    ``get()``, ``cancel()``, ``retry()``; and ``status()`` (short for get_status), ``info()`` (status and times),
    ``wait(timeout)``. The handle holds only the id, so it can be rebuilt elsewhere: ``client.get_task(name, id)``.
    """

    def __init__(self, client: Client, api: str, id: str) -> None:
        self._client = client
        self.api = api
        self.id = id

    def get_status(self) -> ResultStatus:
        return self.info().status

    status = get_status

    def info(self) -> TaskInfo:
        """The task's status and when it was created, started and finished."""
        return TaskInfo.from_json(self._client._task_request(self.api, "status", self.id)[1].json())

    def wait(self, timeout: float = 60.0) -> TaskInfo:
        """Poll until the task finishes (completed, failed or canceled); APITimeoutError after ``timeout`` s."""
        wait = TaskWait(self.api, self.id, timeout)
        while not (info := self.info()).status.finished:
            time.sleep(wait.pause(info))
        return info

    def get(self, wait: float | None = None) -> Any:
        """The result, decoded as the API's own answer. A failed task raises the API's error (APIServerError
        with its error_id); a canceled one APIClientError 410; one not finished APIClientError 409, unless
        ``wait`` seconds are given to wait for it first."""
        if wait is not None:
            self.wait(wait)
        api, response = self._client._task_request(self.api, "get", self.id)
        return decode_body(api, response.headers.get("content-type"), response.content)

    def cancel(self) -> TaskInfo:
        """Cancel the task if it has not finished (APIClientError 409 if it has). A running sync call cannot be
        interrupted: it runs to its end and its result is dropped."""
        return TaskInfo.from_json(self._client._task_request(self.api, "cancel", self.id)[1].json())

    def retry(self) -> Task:
        """Run a failed task again with the same input, as a new task."""
        return Task(self._client, self.api, self._client._task_request(self.api, "retry", self.id)[1].json()["task_id"])

    def __repr__(self) -> str:
        return f"<Task {self.id} of API {self.api!r}>"


class AsyncTask:
    """The async twin of `Task`: every method is awaited (``await task.get_status()``)."""

    def __init__(self, client: AsyncClient, api: str, id: str) -> None:
        self._client = client
        self.api = api
        self.id = id

    async def get_status(self) -> ResultStatus:
        return (await self.info()).status

    status = get_status

    async def info(self) -> TaskInfo:
        return TaskInfo.from_json((await self._client._task_request(self.api, "status", self.id))[1].json())

    async def wait(self, timeout: float = 60.0) -> TaskInfo:
        wait = TaskWait(self.api, self.id, timeout)
        while not (info := await self.info()).status.finished:
            await asyncio.sleep(wait.pause(info))
        return info

    async def get(self, wait: float | None = None) -> Any:
        if wait is not None:
            await self.wait(wait)
        api, response = await self._client._task_request(self.api, "get", self.id)
        return decode_body(api, response.headers.get("content-type"), response.content)

    async def cancel(self) -> TaskInfo:
        return TaskInfo.from_json((await self._client._task_request(self.api, "cancel", self.id))[1].json())

    async def retry(self) -> AsyncTask:
        response = (await self._client._task_request(self.api, "retry", self.id))[1]
        return AsyncTask(self._client, self.api, response.json()["task_id"])

    def __repr__(self) -> str:
        return f"<AsyncTask {self.id} of API {self.api!r}>"
