"""Call a served service from Python: ``Client(url).predict(x=arr)`` and its async twin.

The methods are not generated code: the client reads the server's ``/openapi.json`` once and builds one method
per API from the ``x-bento-api`` extension, so a client never goes stale against the service it talks to.
Both clients share the rules of the wire format in ``_client_core``; they differ only in how they wait.
"""

from __future__ import annotations

import asyncio
import copy
import threading
import time
from typing import Any, AsyncIterator, Generic, Iterator, Mapping, TypeVar

import httpx

from . import __version__
from ._client_core import (
    SSE,
    APIClientError,
    APIConnectionError,
    APIError,
    APIInfo,
    APIMethod,
    APIServerError,
    APIStreamError,
    APITimeoutError,
    EncodedRequest,
    PendingMethod,
    ReadinessWait,
    RetryPolicy,
    SSEParser,
    bind_arguments,
    decode_body,
    decode_event,
    encode_request,
    error_from_response,
    media_type,
    parse_openapi,
    unknown_api,
)
from ._client_tasks import TASK_VERBS, AsyncTask, ResultStatus, Task, TaskInfo, task_api

__all__ = [
    "APIClientError",
    "APIConnectionError",
    "APIError",
    "APIInfo",
    "APIServerError",
    "APIStreamError",
    "APITimeoutError",
    "AsyncClient",
    "AsyncEventStream",
    "AsyncTask",
    "AsyncTextStream",
    "Client",
    "EventStream",
    "ResultStatus",
    "Task",
    "TaskInfo",
    "TextStream",
]

# Users import the errors and APIInfo from here; tracebacks and reprs should say so.
for _public in (APIError, APIClientError, APIServerError, APIStreamError, APIConnectionError, APITimeoutError, APIInfo,
                ResultStatus, TaskInfo):
    _public.__module__ = __name__
del _public

_UNSET: Any = object()

H = TypeVar("H", httpx.Client, httpx.AsyncClient)
C = TypeVar("C", bound="_BaseClient[Any]")


def _checked_timeout(timeout: float | None) -> float | None:
    if timeout is not None and not timeout > 0:
        raise ValueError(f"timeout must be > 0 seconds, or None for no timeout; got {timeout!r}")
    return timeout


def _checked_retries(max_retries: int) -> int:
    if not isinstance(max_retries, int) or max_retries < 0:
        raise ValueError(f"max_retries must be an int >= 0, got {max_retries!r}")
    return max_retries


class _Shared(Generic[H]):
    """What a client shares with the copies ``with_options`` makes: the connection pool and the schema."""

    def __init__(self, http: H) -> None:
        self.http = http
        self.service = ""
        self.apis: dict[str, APIInfo] | None = None
        self.ready_waited = False
        self.lock: Any = None  # a threading.Lock or an asyncio.Lock, by client


class _BaseClient(Generic[H]):
    _shared: _Shared[H]
    _owner: bool

    def __init__(
        self,
        url: str,
        *,
        timeout: float | None,
        max_retries: int,
        backoff: float,
        headers: Mapping[str, str] | None,
        wait_ready: float,
    ) -> None:
        if not backoff >= 0:
            raise ValueError(f"backoff must be >= 0 seconds, got {backoff!r}")
        if not wait_ready >= 0:
            raise ValueError(f"wait_ready must be >= 0 seconds, got {wait_ready!r}")
        self.url = url if "://" in url else "http://" + url
        self.timeout = _checked_timeout(timeout)
        self.max_retries = _checked_retries(max_retries)
        self.backoff = backoff
        self.headers = {"user-agent": f"bento_like-client/{__version__}", **(headers or {})}
        self.wait_ready = wait_ready

    @property
    def apis(self) -> dict[str, APIInfo]:
        """The service's APIs by name, as its schema describes them."""
        return dict(self._loaded_apis())

    def with_options(
        self: C, *, timeout: float | None = _UNSET, max_retries: int | None = None, headers: Mapping[str, str] | None = None
    ) -> C:
        """A client with other settings that shares this one's connections and schema (closing it closes neither).

        ``client.with_options(timeout=300).generate(...)`` sets the timeout of one call even for an API that has an
        input named ``timeout``.
        """
        clone = copy.copy(self)
        clone._owner = False
        if timeout is not _UNSET:
            clone.timeout = _checked_timeout(timeout)
        if max_retries is not None:
            clone.max_retries = _checked_retries(max_retries)
        if headers:
            clone.headers = {**self.headers, **headers}
        return clone

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        apis = self._apis_for_attribute()
        if apis is None:
            return PendingMethod(self, name)
        return APIMethod(self, self._api_info(apis, name))

    def __dir__(self) -> list[str]:
        apis = self._shared.apis or {}
        return sorted(set(super().__dir__()) | {name for name in apis if name.isidentifier()})

    def __repr__(self) -> str:
        apis = self._shared.apis
        described = "schema not loaded" if apis is None else f"APIs: {', '.join(apis) or 'none'}"
        return f"<{type(self).__name__} {self.url} ({described})>"

    def _prepare(
        self, api: APIInfo, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[EncodedRequest, float | None]:
        timeout = self.timeout
        if "timeout" in kwargs and "timeout" not in api.inputs:
            timeout = kwargs.pop("timeout")
        encoded = encode_request(api, bind_arguments(api, args, kwargs))
        return encoded, timeout

    def _api_info(self, apis: dict[str, APIInfo], name: str) -> APIInfo:
        if name not in apis:
            raise unknown_api(self._shared.service, name, apis)
        return apis[name]

    def _build(
        self, method: str, path: str, encoded: EncodedRequest | None, timeout: float | None,
        params: dict[str, str] | None = None,
    ) -> httpx.Request:
        encoded = encoded or EncodedRequest(headers={})
        return self._shared.http.build_request(
            method,
            path,
            params=params if params is not None else encoded.params,
            headers={**self.headers, **encoded.headers},
            content=encoded.content,
            data=encoded.data,
            files=encoded.files,
            timeout=httpx.Timeout(timeout),
        )

    def _unreachable(self, exc: httpx.TransportError, timeout: float | None) -> APIConnectionError:
        if isinstance(exc, httpx.TimeoutException):
            within = f"within {timeout:g} s" if timeout is not None else "in time"
            return APITimeoutError(f"{self.url} did not answer {within} ({type(exc).__name__})")
        return APIConnectionError(f"cannot reach {self.url}: {exc or type(exc).__name__}")

    def _ready_timeout(self) -> float:
        return min(self.timeout or 5.0, 5.0)

    def _loaded_apis(self) -> dict[str, APIInfo]:
        raise NotImplementedError

    def _apis_for_attribute(self) -> dict[str, APIInfo] | None:
        raise NotImplementedError


class Client(_BaseClient[httpx.Client]):
    """A blocking client for one service: ``Client(url).predict(x=arr)``.

    ``timeout`` bounds each network operation of a call (connect, send, each read), in seconds; None waits forever.
    A call refused with 429 or 503, or whose connection fails, is sent again up to ``max_retries`` times, after
    the server's Retry-After and never sooner than ``backoff * 2**attempt`` seconds (with jitter). ``wait_ready``
    > 0 blocks the constructor until the service reports ready, up to that many seconds. The schema is fetched on
    the first use of an API. Thread-safe: one client can serve many threads.
    """

    def __init__(
        self,
        url: str,
        timeout: float | None = 30.0,
        max_retries: int = 3,
        backoff: float = 0.1,
        headers: Mapping[str, str] | None = None,
        wait_ready: float = 0,
    ) -> None:
        super().__init__(
            url, timeout=timeout, max_retries=max_retries, backoff=backoff, headers=headers, wait_ready=wait_ready
        )
        self._shared = _Shared(httpx.Client(base_url=self.url))
        self._owner = True
        self._shared.lock = threading.Lock()
        if wait_ready:
            try:
                self.wait_until_ready(wait_ready)
            except BaseException:
                self.close()
                raise

    def call(self, name: str, /, *args: Any, **kwargs: Any) -> Any:
        """Call an API by name: the same as ``getattr(client, name)(*args, **kwargs)``."""
        api = self._api_info(self._loaded_apis(), name)
        encoded, timeout = self._prepare(api, args, kwargs)
        if api.output == "stream":
            return EventStream(api, self._send(api.method, api.route, encoded, timeout, stream=True, api=api.name))
        if api.output == "text_stream":
            return TextStream(api, self._send(api.method, api.route, encoded, timeout, stream=True, api=api.name))
        response = self._send(api.method, api.route, encoded, timeout, api=api.name)
        return decode_body(api, response.headers.get("content-type"), response.content)

    def submit_task(self, name: str, /, *args: Any, **kwargs: Any) -> Task:
        """Submit a task by name: the same as ``getattr(client, name).submit(*args, **kwargs)``."""
        api = task_api(self._shared.service, self._loaded_apis(), name)
        encoded, timeout = self._prepare(api, args, kwargs)
        response = self._send("POST", api.route + "/submit", encoded, timeout, api=api.name)
        return Task(self, api.name, response.json()["task_id"])

    def get_task(self, name: str, task_id: str) -> Task:
        """A handle on a task submitted before (by this client or another) from its id."""
        return Task(self, name, task_id)

    def _task_request(self, name: str, op: str, task_id: str) -> tuple[APIInfo, httpx.Response]:
        api = task_api(self._shared.service, self._loaded_apis(), name)
        response = self._send(TASK_VERBS[op], f"{api.route}/{op}", None, self.timeout, api=api.name,
                              params={"task_id": task_id})
        return api, response

    def load_schema(self) -> dict[str, APIInfo]:
        """Fetch ``/openapi.json`` again (after the service was redeployed with other APIs); returns the APIs."""
        response = self._send("GET", "/openapi.json", None, self.timeout)
        self._shared.service, self._shared.apis = parse_openapi(response.json())
        return dict(self._shared.apis)

    def is_ready(self) -> bool:
        """Whether the service answers ``/readyz`` with 200 now; False when it is unreachable."""
        try:
            response = self._shared.http.send(self._build("GET", "/readyz", None, self._ready_timeout()))
        except httpx.TransportError:
            return False
        return response.status_code == 200

    def wait_until_ready(self, timeout: float = 30.0) -> None:
        """Block until the service is ready; APITimeoutError after ``timeout`` s, APIServerError if startup failed."""
        wait = ReadinessWait(self.url, timeout)
        while True:
            try:
                response = self._shared.http.send(self._build("GET", "/readyz", None, wait.poll_timeout()))
                if wait.answered(response.status_code, response.headers, response.content):
                    break
            except httpx.TransportError as exc:
                wait.unreachable(exc)
            time.sleep(wait.pause())
        self._shared.ready_waited = True

    def close(self) -> None:
        """Close the connections (a copy made by ``with_options`` leaves them to the original)."""
        if self._owner:
            self._shared.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def _loaded_apis(self) -> dict[str, APIInfo]:
        if self._shared.apis is None:
            with self._shared.lock:
                if self._shared.apis is None:
                    self.load_schema()
        assert self._shared.apis is not None
        return self._shared.apis

    def _apis_for_attribute(self) -> dict[str, APIInfo]:
        return self._loaded_apis()

    def _send(
        self,
        method: str,
        path: str,
        encoded: EncodedRequest | None,
        timeout: float | None,
        *,
        stream: bool = False,
        api: str | None = None,
        params: dict[str, str] | None = None,
    ) -> httpx.Response:
        policy = RetryPolicy(self.max_retries, self.backoff)
        while True:
            try:
                response = self._shared.http.send(self._build(method, path, encoded, timeout, params),
                                                     stream=stream)
            except httpx.ConnectError as exc:
                delay = policy.after_connect_error()
                if delay is None:
                    raise self._unreachable(exc, timeout) from exc
            except httpx.TransportError as exc:
                raise self._unreachable(exc, timeout) from exc
            else:
                if response.status_code < 400:
                    return response
                delay = policy.after_status(response.status_code, response.headers.get("retry-after"))
                if delay is None:
                    body = response.read()
                    response.close()
                    raise error_from_response(response.status_code, response.headers, body, api)
                response.close()
            time.sleep(delay)


class AsyncClient(_BaseClient[httpx.AsyncClient]):
    """The asyncio twin of `Client`: ``await client.predict(x=arr)``, same options and errors.

    The schema is fetched by ``async with`` or the first call. Until then ``client.name`` cannot know whether the
    API exists, so an unknown name raises AttributeError when the call is awaited instead of at attribute access.
    ``wait_ready`` > 0 waits for readiness at ``async with`` or before the first call.
    """

    def __init__(
        self,
        url: str,
        timeout: float | None = 30.0,
        max_retries: int = 3,
        backoff: float = 0.1,
        headers: Mapping[str, str] | None = None,
        wait_ready: float = 0,
    ) -> None:
        super().__init__(
            url, timeout=timeout, max_retries=max_retries, backoff=backoff, headers=headers, wait_ready=wait_ready
        )
        self._shared = _Shared(httpx.AsyncClient(base_url=self.url))
        self._owner = True

    async def call(self, name: str, /, *args: Any, **kwargs: Any) -> Any:
        """Call an API by name: the same as ``await getattr(client, name)(*args, **kwargs)``."""
        api = self._api_info(await self._start(), name)
        encoded, timeout = self._prepare(api, args, kwargs)
        if api.output == "stream":
            return AsyncEventStream(api, await self._send(api.method, api.route, encoded, timeout, stream=True, api=api.name))
        if api.output == "text_stream":
            return AsyncTextStream(api, await self._send(api.method, api.route, encoded, timeout, stream=True, api=api.name))
        response = await self._send(api.method, api.route, encoded, timeout, api=api.name)
        return decode_body(api, response.headers.get("content-type"), response.content)

    async def submit_task(self, name: str, /, *args: Any, **kwargs: Any) -> AsyncTask:
        """Submit a task by name: the same as ``await getattr(client, name).submit(*args, **kwargs)``."""
        api = task_api(self._shared.service, await self._start(), name)
        encoded, timeout = self._prepare(api, args, kwargs)
        response = await self._send("POST", api.route + "/submit", encoded, timeout, api=api.name)
        return AsyncTask(self, api.name, response.json()["task_id"])

    def get_task(self, name: str, task_id: str) -> AsyncTask:
        """A handle on a task submitted before (by this client or another) from its id."""
        return AsyncTask(self, name, task_id)

    async def _task_request(self, name: str, op: str, task_id: str) -> tuple[APIInfo, httpx.Response]:
        api = task_api(self._shared.service, await self._start(), name)
        response = await self._send(TASK_VERBS[op], f"{api.route}/{op}", None, self.timeout, api=api.name,
                                    params={"task_id": task_id})
        return api, response

    async def load_schema(self) -> dict[str, APIInfo]:
        """Fetch ``/openapi.json`` again (after the service was redeployed with other APIs); returns the APIs."""
        response = await self._send("GET", "/openapi.json", None, self.timeout)
        self._shared.service, self._shared.apis = parse_openapi(response.json())
        return dict(self._shared.apis)

    async def is_ready(self) -> bool:
        """Whether the service answers ``/readyz`` with 200 now; False when it is unreachable."""
        try:
            response = await self._shared.http.send(self._build("GET", "/readyz", None, self._ready_timeout()))
        except httpx.TransportError:
            return False
        return response.status_code == 200

    async def wait_until_ready(self, timeout: float = 30.0) -> None:
        """Wait until the service is ready; APITimeoutError after ``timeout`` s, APIServerError if startup failed."""
        wait = ReadinessWait(self.url, timeout)
        while True:
            try:
                response = await self._shared.http.send(self._build("GET", "/readyz", None, wait.poll_timeout()))
                if wait.answered(response.status_code, response.headers, response.content):
                    break
            except httpx.TransportError as exc:
                wait.unreachable(exc)
            await asyncio.sleep(wait.pause())
        self._shared.ready_waited = True

    async def close(self) -> None:
        """Close the connections (a copy made by ``with_options`` leaves them to the original)."""
        if self._owner:
            await self._shared.http.aclose()

    async def __aenter__(self) -> AsyncClient:
        await self._start()
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.close()

    async def _start(self) -> dict[str, APIInfo]:
        shared = self._shared
        if shared.apis is None or (self.wait_ready and not shared.ready_waited):
            if shared.lock is None:
                shared.lock = asyncio.Lock()
            async with shared.lock:
                if self.wait_ready and not shared.ready_waited:
                    await self.wait_until_ready(self.wait_ready)
                if shared.apis is None:
                    await self.load_schema()
        assert shared.apis is not None
        return shared.apis

    def _loaded_apis(self) -> dict[str, APIInfo]:
        if self._shared.apis is None:
            raise RuntimeError("the schema is not loaded yet: use `async with AsyncClient(...)` or `await client.load_schema()`")
        return self._shared.apis

    def _apis_for_attribute(self) -> dict[str, APIInfo] | None:
        return self._shared.apis

    async def _send(
        self,
        method: str,
        path: str,
        encoded: EncodedRequest | None,
        timeout: float | None,
        *,
        stream: bool = False,
        api: str | None = None,
        params: dict[str, str] | None = None,
    ) -> httpx.Response:
        policy = RetryPolicy(self.max_retries, self.backoff)
        while True:
            try:
                response = await self._shared.http.send(self._build(method, path, encoded, timeout, params),
                                                     stream=stream)
            except httpx.ConnectError as exc:
                delay = policy.after_connect_error()
                if delay is None:
                    raise self._unreachable(exc, timeout) from exc
            except httpx.TransportError as exc:
                raise self._unreachable(exc, timeout) from exc
            else:
                if response.status_code < 400:
                    return response
                delay = policy.after_status(response.status_code, response.headers.get("retry-after"))
                if delay is None:
                    body = await response.aread()
                    await response.aclose()
                    raise error_from_response(response.status_code, response.headers, body, api)
                await response.aclose()
            await asyncio.sleep(delay)


class EventStream:
    """The events of a streaming API, decoded (JSON values, else text), as they arrive.

    Iterate it to the end, or close it (``with client.generate(...) as events:``) to free the connection early.
    """

    def __init__(self, api: APIInfo, response: httpx.Response) -> None:
        self.api = api
        self._response = response
        self._events = self._iterate()

    def _iterate(self) -> Iterator[Any]:
        response = self._response
        try:
            if media_type(response.headers.get("content-type")) != SSE:
                yield decode_body(self.api, response.headers.get("content-type"), response.read())
                return
            parser = SSEParser()
            for line in response.iter_lines():
                event = parser.feed(line)
                if event is not None:
                    yield decode_event(self.api.name, event)
        except httpx.TimeoutException as exc:
            raise APITimeoutError(f"the stream of API {self.api.name!r} stalled past the timeout") from exc
        except httpx.TransportError as exc:
            raise APIConnectionError(f"the stream of API {self.api.name!r} broke: {exc}") from exc
        finally:
            response.close()

    def __iter__(self) -> EventStream:
        return self

    def __next__(self) -> Any:
        return next(self._events)

    def close(self) -> None:
        self._events.close()
        self._response.close()

    def __enter__(self) -> EventStream:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


class AsyncEventStream:
    """The async twin of `EventStream`: ``async for event in await client.generate(...)``."""

    def __init__(self, api: APIInfo, response: httpx.Response) -> None:
        self.api = api
        self._response = response
        self._events = self._iterate()

    async def _iterate(self) -> AsyncIterator[Any]:
        response = self._response
        try:
            if media_type(response.headers.get("content-type")) != SSE:
                yield decode_body(self.api, response.headers.get("content-type"), await response.aread())
                return
            parser = SSEParser()
            async for line in response.aiter_lines():
                event = parser.feed(line)
                if event is not None:
                    yield decode_event(self.api.name, event)
        except httpx.TimeoutException as exc:
            raise APITimeoutError(f"the stream of API {self.api.name!r} stalled past the timeout") from exc
        except httpx.TransportError as exc:
            raise APIConnectionError(f"the stream of API {self.api.name!r} broke: {exc}") from exc
        finally:
            await response.aclose()

    def __aiter__(self) -> AsyncEventStream:
        return self

    async def __anext__(self) -> Any:
        return await self._events.__anext__()

    async def close(self) -> None:
        await self._events.aclose()
        await self._response.aclose()

    async def __aenter__(self) -> AsyncEventStream:
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.close()


class TextStream:
    """The text of a streaming API that yields ``str``, as it arrives: iterate it for chunks of text (how the
    network cut them, not necessarily what the API yielded one by one), or ``"".join(stream)`` for the whole."""

    def __init__(self, api: APIInfo, response: httpx.Response) -> None:
        self.api = api
        self._response = response
        self._chunks = self._iterate()

    def _iterate(self) -> Iterator[str]:
        try:
            yield from self._response.iter_text()
        except httpx.TimeoutException as exc:
            raise APITimeoutError(f"the stream of API {self.api.name!r} stalled past the timeout") from exc
        except httpx.TransportError as exc:
            raise APIConnectionError(f"the stream of API {self.api.name!r} broke: {exc}") from exc
        finally:
            self._response.close()

    def __iter__(self) -> TextStream:
        return self

    def __next__(self) -> str:
        return next(self._chunks)

    def close(self) -> None:
        self._chunks.close()
        self._response.close()

    def __enter__(self) -> TextStream:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


class AsyncTextStream:
    """The async twin of `TextStream`: ``async for chunk in await client.generate(...)``."""

    def __init__(self, api: APIInfo, response: httpx.Response) -> None:
        self.api = api
        self._response = response
        self._chunks = self._iterate()

    async def _iterate(self) -> AsyncIterator[str]:
        try:
            async for chunk in self._response.aiter_text():
                yield chunk
        except httpx.TimeoutException as exc:
            raise APITimeoutError(f"the stream of API {self.api.name!r} stalled past the timeout") from exc
        except httpx.TransportError as exc:
            raise APIConnectionError(f"the stream of API {self.api.name!r} broke: {exc}") from exc
        finally:
            await self._response.aclose()

    def __aiter__(self) -> AsyncTextStream:
        return self

    async def __anext__(self) -> str:
        return await self._chunks.__anext__()

    async def close(self) -> None:
        await self._chunks.aclose()
        await self._response.aclose()

    async def __aenter__(self) -> AsyncTextStream:
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.close()
