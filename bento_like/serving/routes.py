"""The HTTP endpoint of one API, written against ASGI directly: it is the hot path of every request.

Order of work for a request: readiness and concurrency gates (cheap refusals first), body read under the size
limit, decode and validate, run on an instance under the deadline, encode. Every outcome is counted.
"""

from __future__ import annotations

import inspect
import logging
import time
import uuid
from urllib.parse import parse_qsl
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from starlette.requests import Request
from starlette.types import Receive, Scope, Send

from ..description import describe_api
from ..sdk.api import APIConfig
from ..sdk.context import Context
from ..sdk.io import File
from .codecs import (
    JSON,
    MULTIPART,
    OCTET,
    SSE,
    InputCodec,
    NonFiniteResult,
    encode_result,
    media_type,
    sse_event,
)
from .deadlines import ClientGone
from .errors import HTTPError, too_many_requests, unavailable
from .instances import record_version, served_version
from .io_types import result_encoder
from .placement import DirectPlacement, Where

if TYPE_CHECKING:
    from .app import ServerState
    from .batching import Batcher

log = logging.getLogger("bento_like.serving")

Handler = Callable[[Scope, Receive, Send], Awaitable[int]]
VERSION_HEADER = b"x-model-version"

class APIEndpoint:
    """ASGI app for ``POST <route>`` of one API."""

    def __init__(self, state: ServerState, attr: str, config: APIConfig) -> None:
        self.state = state
        self.attr = attr
        self.config = config
        func = getattr(state.spec.cls, attr)
        self.codec = InputCodec(describe_api(func, config))
        self.output = self.codec.description.output_kind
        self.encode_result = result_encoder(self.codec.description, encode_result)
        self.is_async = inspect.iscoroutinefunction(func)
        self.is_async_gen = inspect.isasyncgenfunction(func)
        self.is_gen = inspect.isgeneratorfunction(func)
        self.name = config.name
        self.context = config.context  # the parameter that takes the request's bl.Context, if any
        self.batcher: Batcher | None = None  # set by the app for batchable APIs
        self.placement = DirectPlacement(state.tuning.placement, self.is_async)
        self.in_flight = 0
        self._status_labels: dict[int | tuple[int, str], tuple[str, str, str]] = {}
        self.versioned = state.versioned  # the service has models: responses say which version answered
        self.last_input: dict[str, Any] | None = None  # a served input: what a model swap checks a new version on

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.serve(scope, receive, send, self._handle)

    async def serve(self, scope: Scope, receive: Receive, send: Send, handler: Handler) -> None:
        """Run ``handler`` for one request of this API: errors become responses, and every outcome is counted.

        The native route and the Open Inference Protocol route share this, so both are measured and
        limited the same way."""
        state = self.state
        started = time.perf_counter()
        status = 500
        version = None
        if self.versioned:
            version = [""]
            served_version.set(version)  # this request's own context (each ASGI request runs in its task)
            send = _with_version(send, version)
        state.load.enter()
        self.in_flight += 1
        try:
            status = await handler(scope, receive, send)
        except ClientGone:
            status = 499  # nginx's "client closed request": nobody is left to answer
            state.metrics.rejections.inc((self.name, "disconnected"))
        except HTTPError as exc:
            status = exc.status
            if status in _REFUSALS:
                state.metrics.rejections.inc((self.name, exc.reason or _REFUSALS[status]))
            await _send_error(send, exc)
        except Exception:
            status = 500
            error_id = uuid.uuid4().hex[:12]
            log.exception("error %s in API %r", error_id, self.name)
            await _send_error(
                send,
                HTTPError(
                    500,
                    f"API {self.name!r} raised an exception (error id {error_id}); the server log has the traceback",
                    error_id=error_id,
                ),
            )
        finally:
            state.load.leave()
            self.in_flight -= 1
            # a service without models keys its labels by status alone: no tuple made per request
            key = status if version is None else (status, version[0])
            labels = self._status_labels.get(key)
            if labels is None:
                labels = self._status_labels[key] = (self.name, str(status), "" if version is None else version[0])
            state.metrics.requests.inc(labels)
            state.metrics.latency.observe(labels, time.perf_counter() - started)

    def admit(self) -> None:
        """Refuse at once what cannot be taken now: not ready, or over the concurrency or queue limits."""
        state = self.state
        if not state.ready:
            if state.unavailable:
                raise unavailable(state.unavailable, 5)
            if state.failure:
                raise HTTPError(503, f"service {state.spec.name!r} failed to start: {state.failure}")
            raise unavailable(f"service {state.spec.name!r} is starting: its instances are not ready yet", 1)
        if state.max_concurrency is not None and state.load.in_flight > state.max_concurrency:
            raise too_many_requests(
                f"service {state.spec.name!r} is at its limit of {state.max_concurrency} concurrent requests", 1
            )
        if self.batcher is not None:
            self.batcher.admit(1, time.monotonic())
        elif self.in_flight > state.max_queue:
            raise too_many_requests(
                f"API {self.name!r} has {self.in_flight - 1} requests in progress, its limit (max_queue)", 1, "queue_full"
            )

    def read_headers(self, scope: Scope) -> tuple[str | None, float]:
        """The request's Content-Type and its timeout (the service's, or a shorter X-Request-Timeout)."""
        content_type = content_length = None
        timeout = self.state.timeout
        for key, value in scope["headers"]:
            if key == b"content-type":
                content_type = value.decode("latin-1")
            elif key == b"content-length":
                content_length = value
            elif key == b"x-request-timeout":
                timeout = min(timeout, _parse_timeout(value))
        limit = self.state.max_body_size
        if content_length is not None:
            try:
                declared = int(content_length)
            except ValueError:
                raise HTTPError(400, "the Content-Length header is not a number") from None
            if declared > limit:
                raise _too_large(limit)
        return content_type, timeout

    async def read_body(self, receive: Receive) -> bytes:
        return await _read_body(receive, self.state.max_body_size)

    async def _handle(self, scope: Scope, receive: Receive, send: Send) -> int:
        self.admit()
        content_type, timeout = self.read_headers(scope)
        kwargs = await self.decode(scope, receive, content_type)
        ctx = None
        if self.context is not None:
            ctx = kwargs[self.context] = Context(Request(scope))
        rich = self.codec.rich
        if ctx is not None or (rich is not None and rich.paths):
            try:
                return await self._run(scope, receive, send, kwargs, timeout, ctx)
            finally:  # the files of Path inputs and ctx.temp_dir live until the response is sent
                if rich is not None and rich.paths:
                    rich.release(kwargs)
                if ctx is not None:
                    ctx.cleanup()
        return await self._run(scope, receive, send, kwargs, timeout, ctx)

    async def _run(self, scope: Scope, receive: Receive, send: Send, kwargs: dict[str, Any], timeout: float,
                   ctx: Context | None) -> int:
        if self.is_gen or self.is_async_gen:
            instance = self.state.pool.pick()
            gen = await instance.serving()
            record_version(gen.label)
            gen.enter()
            try:
                return await self._stream(send, instance, getattr(gen.obj, self.attr), kwargs, ctx)
            finally:
                gen.leave()
        result = await self.invoke(kwargs, timeout, receive)
        return await self._respond(scope, receive, send, result, ctx)

    async def decode(self, scope: Scope, receive: Receive, content_type: str | None) -> dict[str, Any]:
        """The API's arguments from the request: its query (GET), or its body by Content-Type."""
        codec = self.codec
        if scope["method"] == "GET":
            return codec.decode_query(parse_qsl(scope["query_string"].decode("latin-1"), keep_blank_values=True))
        limit = self.state.max_body_size
        mtype = media_type(content_type)
        if mtype == JSON or mtype == "" or mtype.endswith("+json"):
            kwargs = codec.decode_json(await _read_body(receive, limit))
        elif mtype == MULTIPART and codec.params:
            kwargs = codec.decode_form(await _read_form(scope, _limited(receive, limit)))
        elif codec.raw_param is not None and (mtype == OCTET or not mtype.startswith(("text/", "application/x-www"))):
            kwargs = codec.decode_raw(await _read_body(receive, limit), content_type)
        else:
            accepted = [JSON] + ([MULTIPART] if codec.params else []) + ([OCTET] if codec.raw_param else [])
            raise HTTPError(
                415, f"unsupported Content-Type {mtype!r} for API {self.name!r}; send one of: {', '.join(accepted)}"
            )
        return kwargs

    async def invoke(self, kwargs: dict[str, Any], timeout: float, receive: Receive | None = None) -> Any:
        """Run the API on decoded arguments: through its batcher, or on an instance directly."""
        self.last_input = kwargs
        if self.batcher is not None:
            return await self._batched(receive, kwargs, timeout)
        state = self.state
        instance = state.pool.pick()
        gen = instance.generation
        if instance.obj is None or gen is None:  # a replace-mode model swap holds the instance
            gen = await instance.serving()
        method = getattr(gen.obj, self.attr)
        if self.versioned:
            record_version(gen.label)
        placement = self.placement
        where = placement.where(instance.in_flight)
        if where is Where.LOOP and not self.is_async:
            instance.in_flight += 1
            try:
                return self._timed(method, kwargs)
            finally:
                instance.in_flight -= 1
        if self.is_async:
            call = method(**kwargs)
        elif placement.timing:
            call = instance.runner.submit(self._timed, method, kwargs)
        else:
            call = instance.runner.submit(method, **kwargs)
        instance.in_flight += 1
        gen.enter()
        try:
            return await state.watchdog.run(call, timeout, receive)
        except TimeoutError:
            raise _timed_out(self.name, timeout) from None
        finally:
            instance.in_flight -= 1
            gen.leave()

    def _timed(self, method: Callable[..., Any], kwargs: dict[str, Any]) -> Any:
        """Run a sync call (inline, or on an instance thread), timing the call itself, not any hand-off."""
        started = time.perf_counter()
        try:
            return method(**kwargs)
        finally:
            self.placement.observe(time.perf_counter() - started)

    async def _batched(self, receive: Receive | None, kwargs: dict[str, Any], timeout: float) -> Any:
        """Queue the input in the API's batcher; stop waiting if the deadline passes or the client goes away."""
        assert self.batcher is not None
        deadline = time.monotonic() + timeout  # the batcher's clock
        try:
            return await self.state.watchdog.run(
                self.batcher.submit(kwargs[self.config.params[0]], deadline), timeout, receive
            )
        except TimeoutError:
            raise _timed_out(self.name, timeout) from None

    async def _respond(self, scope: Scope, receive: Receive, send: Send, result: Any, ctx: Context | None = None) -> int:
        if isinstance(result, _RESPONSE_TYPES):
            await result(scope, receive, send)
            return result.status_code
        try:
            body, ctype = self.encode_result(result)
        except NonFiniteResult as exc:
            raise self._unsendable(exc) from None
        headers = [(b"content-type", ctype.encode()), (b"content-length", str(len(body)).encode())]
        status = 200
        if ctx is not None:
            status, headers = _from_context(self.name, ctx, headers)
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        return status

    def _unsendable(self, exc: NonFiniteResult) -> HTTPError:
        """The error for a result JSON cannot carry: the API's own doing, so a 500, logged in one line."""
        message = f"API {self.name!r} returned {exc}"
        log.warning("%s", message)
        return HTTPError(500, message)

    async def _stream(self, send: Send, instance: Any, method: Callable[..., Any], kwargs: dict[str, Any],
                      ctx: Context | None = None) -> int:
        if self.is_async_gen:
            agen = method(**kwargs)

            async def next_item() -> Any:
                try:
                    return await agen.__anext__()
                except StopAsyncIteration:
                    return _END
        else:
            gen = method(**kwargs)
            next_item = lambda: instance.runner.submit(next, gen, _END)  # noqa: E731
        text = self.output == "text_stream"
        headers = [(b"content-type", TEXT_STREAM if text else SSE.encode()), (b"cache-control", b"no-cache")]
        status = 200
        # The first item is computed before the response starts: what the generator sets on ctx.response before
        # its first yield reaches the head, and an error before it is an ordinary error response.
        item = await next_item()
        if ctx is not None:
            status, headers = _from_context(self.name, ctx, headers)
        await send({"type": "http.response.start", "status": status, "headers": headers})
        try:
            while item is not _END:
                chunk = _text_chunk(item) if text else sse_event(item)
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                item = await next_item()
        except NonFiniteResult as exc:
            error = self._unsendable(exc)
            event = b"event: error\n" + sse_event({"error": error.message})
            await send({"type": "http.response.body", "body": event, "more_body": True})
        except Exception:
            error_id = uuid.uuid4().hex[:12]
            log.exception("error %s in streaming API %r", error_id, self.name)
            if text:  # plain text has no events: the stream is cut short, and the log says why
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                return status
            event = b"event: error\n" + sse_event({"error": f"stream failed (error id {error_id})", "error_id": error_id})
            await send({"type": "http.response.body", "body": event, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
        return status


def _with_version(send: Send, version: list[str]) -> Send:
    """``send`` with the ``x-model-version`` header added to the response's start, once a call recorded it."""

    async def sending(message: Any) -> None:
        if message["type"] == "http.response.start" and version[0]:
            message["headers"] = [*message.get("headers", ()), (VERSION_HEADER, version[0].encode())]
        await send(message)

    return sending


_REFUSALS = {429: "overload", 503: "not_ready", 504: "timeout"}
_END = object()
TEXT_STREAM = b"text/plain; charset=utf-8"


def _text_chunk(item: Any) -> bytes:
    if isinstance(item, str):
        return item.encode()
    raise TypeError(f"a stream annotated to yield str yielded {type(item).__name__}")


def _from_context(api: str, ctx: Context, headers: list[tuple[bytes, bytes]]) -> tuple[int, list[tuple[bytes, bytes]]]:
    """The status and headers of a response, with what the API set on ``ctx.response``."""
    response = ctx.response
    status = response.status_code
    if not isinstance(status, int) or isinstance(status, bool) or not 200 <= status <= 599:
        raise TypeError(f"API {api!r} set ctx.response.status_code to {status!r}; it must be an int in 200..599")
    if response.headers:
        # the API's headers replace the defaults of the same name (content-length stays the server's)
        own = {k.lower() for k in response.headers if k.lower() != "content-length"}
        headers = [(k, v) for k, v in headers if k.decode() not in own]
        headers += [(k.lower().encode(), v.encode("latin-1")) for k, v in response.headers.items()
                    if k.lower() != "content-length"]
    headers += [(b"set-cookie", cookie.header().encode("latin-1")) for cookie in response.cookies]
    return status, headers


def _timed_out(api: str, timeout: float) -> HTTPError:
    return HTTPError(504, f"API {api!r} did not answer within the request's deadline of {timeout:g} s")


def _parse_timeout(value: bytes) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise HTTPError(400, f"header X-Request-Timeout must be seconds as a number, got {value.decode('latin-1')!r}") from None
    if not seconds > 0:
        raise HTTPError(400, "header X-Request-Timeout must be > 0 seconds")
    return seconds


def _too_large(limit: int) -> HTTPError:
    return HTTPError(413, f"request body is larger than the limit of {limit} bytes", limit=limit)


async def _read_body(receive: Receive, limit: int) -> bytes:
    message = await receive()
    body = message.get("body", b"")
    if not message.get("more_body", False):
        if len(body) > limit:
            raise _too_large(limit)
        return body
    chunks = [body]
    size = len(body)
    while message.get("more_body", False):
        message = await receive()
        if message["type"] == "http.disconnect":
            raise HTTPError(400, "the client disconnected before sending the whole body")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _limited(receive: Receive, limit: int) -> Receive:
    seen = 0

    async def wrapped() -> Any:
        nonlocal seen
        message = await receive()
        seen += len(message.get("body", b""))
        if seen > limit:
            raise _too_large(limit)
        return message

    return wrapped


async def _read_form(scope: Scope, receive: Receive) -> dict[str, Any]:
    request = Request(scope, receive)
    try:
        form = await request.form()
    except HTTPError:
        raise
    except Exception as exc:
        raise HTTPError(400, f"malformed multipart body: {exc}") from None
    values: dict[str, Any] = {}
    try:
        for key, value in form.multi_items():
            if hasattr(value, "read"):
                values[key] = File(await value.read(), filename=value.filename, content_type=value.content_type)
            else:
                values[key] = value
    finally:
        await form.close()
    return values


async def _send_error(send: Send, exc: HTTPError) -> None:
    body = exc.body()
    headers = [(b"content-type", JSON.encode()), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in exc.headers.items()]
    try:
        await send({"type": "http.response.start", "status": exc.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
    except Exception:  # the response had already started (a failing stream) or the client is gone
        log.debug("could not send error response", exc_info=True)


def _response_types() -> tuple[type, ...]:
    from starlette.responses import Response

    return (Response,)


_RESPONSE_TYPES = _response_types()
