"""The client's core, free of I/O: what `Client` and `AsyncClient` share.

Everything here works on plain values (the OpenAPI document, arguments, status codes, headers, bodies), so the
sync and async clients differ only in how they send a request and sleep between attempts. The rules of the
wire format live in one place: how arguments become a body, how a body becomes a value, which failures are worth
another attempt and how long to wait before it.
"""

from __future__ import annotations

import base64
import email.utils
import inspect
import mimetypes
import os
import random
import time
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import msgspec
import numpy as np

from ._rich_values import as_upload, from_json, image_from_body, path_from_body, to_builtins
from .description import API_EXTENSION, RAW_KINDS
from .sdk.io import File

JSON = "application/json"
OCTET = "application/octet-stream"
SSE = "text/event-stream"

RETRY_STATUSES = frozenset({429, 503})
# A server that asks for a longer pause than this is down for a while: the caller hears it at once.
MAX_RETRY_AFTER = 60.0
MAX_BACKOFF = 10.0

_BINARY_KINDS = RAW_KINDS  # inputs that travel as files (a DataFrame only when pyarrow can write it)


class APIError(Exception):
    """The server answered with an error status; ``field`` names the bad input on a 422."""

    def __init__(
        self,
        status: int,
        message: str,
        field: str | None = None,
        error_id: str | None = None,
        *,
        retry_after: float | None = None,
        api: str | None = None,
    ) -> None:
        super().__init__(status, message, field, error_id)
        self.status = status
        self.message = message
        self.field = field
        self.error_id = error_id
        self.retry_after = retry_after
        self.api = api

    def __str__(self) -> str:
        where = f"API {self.api!r} answered " if self.api else ""
        return f"{where}{self.status}: {self.message}"


class APIClientError(APIError):
    """A 4xx: the request is wrong (bad input, body too large, too many requests); resending it as is won't help."""


class APIServerError(APIError):
    """A 5xx: the service failed, timed out or is not ready."""


class APIStreamError(APIServerError):
    """A streaming API failed after its stream had started (an ``event: error`` in the stream)."""


class APIConnectionError(Exception):
    """No HTTP answer: the server could not be reached or the connection broke."""


class APITimeoutError(APIConnectionError, TimeoutError):
    """The server did not answer within the timeout."""


@dataclass(frozen=True)
class APIInfo:
    """One API as the server describes it in the ``x-bento-api`` extension of its OpenAPI document."""

    name: str
    route: str
    inputs: Mapping[str, str]
    required: tuple[str, ...]
    output: str
    summary: str | None = None
    batchable: bool = False
    method: str = "POST"
    task: bool = False  # also served as a task: ``client.<name>.submit(...)``

    @property
    def raw_input(self) -> str | None:
        """The one bytes/File parameter the server also takes as a raw body, if the API has exactly that."""
        if len(self.inputs) == 1:
            ((name, kind),) = self.inputs.items()
            if kind in _BINARY_KINDS:
                return name
        return None


def parse_openapi(doc: Any) -> tuple[str, dict[str, APIInfo]]:
    """The service name and its APIs, by name, from ``/openapi.json``."""
    if not isinstance(doc, dict) or not isinstance(doc.get("paths"), dict):
        raise ValueError("the server's /openapi.json has no 'paths': is it a bento_like service?")
    service = str((doc.get("info") or {}).get("title") or "service")
    apis: dict[str, APIInfo] = {}
    for route, operations in doc["paths"].items():
        post = None
        for method in ("post", "get"):
            operation = operations.get(method) if isinstance(operations, dict) else None
            if isinstance(operation, dict) and isinstance(operation.get(API_EXTENSION), dict):
                post = operation
                break
        if post is None:
            continue
        ext = post[API_EXTENSION]
        apis[ext["name"]] = APIInfo(
            name=ext["name"],
            route=route,
            inputs=dict(ext.get("inputs") or {}),
            required=tuple(ext.get("required") or ()),
            output=ext.get("output") or "json",
            summary=post.get("summary"),
            batchable=bool(ext.get("batchable", False)),
            method=str(ext.get("method") or "POST").upper(),
            task=bool(ext.get("task", False)),
        )
    return service, apis


def unknown_api(service: str, name: str, apis: Iterable[str]) -> AttributeError:
    names = ", ".join(sorted(apis)) or "none"
    return AttributeError(f"service {service!r} has no API {name!r}; its APIs: {names}")


def bind_arguments(api: APIInfo, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """Map positional arguments by the order of the API's inputs, check names; raise TypeError before sending."""
    names = list(api.inputs)
    if len(args) > len(names):
        raise TypeError(f"{api.name}() takes {len(names)} positional argument(s) ({', '.join(names)}) but {len(args)} were given")
    bound = dict(zip(names, args))
    for key, value in kwargs.items():
        if key not in api.inputs:
            raise TypeError(
                f"{api.name}() got an unexpected keyword argument {key!r}; its inputs: {', '.join(names) or 'none'}"
            )
        if key in bound:
            raise TypeError(f"{api.name}() got multiple values for argument {key!r}")
        bound[key] = value
    missing = [name for name in api.required if name not in bound]
    if missing:
        raise TypeError(
            f"{api.name}() missing {len(missing)} required argument(s): {', '.join(repr(m) for m in missing)}"
        )
    return bound


def api_signature(api: APIInfo, *, timeout_option: bool) -> inspect.Signature:
    """A signature for ``help()`` and editors: required inputs first in order, optional ones default to the server's."""
    params = []
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    for name in api.inputs:
        if name in api.required:
            default: Any = inspect.Parameter.empty
        else:
            default = SERVER_DEFAULT
        if default is inspect.Parameter.empty and params and params[-1].default is not inspect.Parameter.empty:
            kind = inspect.Parameter.KEYWORD_ONLY
        params.append(inspect.Parameter(name, kind, default=default))
    if timeout_option:
        params.append(inspect.Parameter("timeout", inspect.Parameter.KEYWORD_ONLY, default=None))
    return inspect.Signature(params)


class _ServerDefault:
    def __repr__(self) -> str:
        return "<server default>"


SERVER_DEFAULT = _ServerDefault()


def _enc_hook(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, File):
        return base64.b64encode(obj.data).decode()
    dump = getattr(obj, "model_dump", None)  # a Pydantic model, sent as its JSON form
    if callable(dump) and hasattr(type(obj), "model_fields"):
        return dump(mode="json")
    try:
        return to_builtins(obj)  # a tensor or a DataFrame
    except NotImplementedError:
        raise NotImplementedError(f"cannot send an object of type {type(obj).__name__} as JSON") from None


_json_encoder = msgspec.json.Encoder(enc_hook=_enc_hook)


def encode_json(value: Any) -> bytes:
    try:
        return _json_encoder.encode(value)
    except (TypeError, NotImplementedError) as exc:
        raise TypeError(str(exc)) from None


@dataclass(frozen=True)
class EncodedRequest:
    """The body of one API call, in the shape httpx takes it: ``content`` or ``data`` + ``files``."""

    headers: dict[str, str]
    content: bytes | None = None
    data: dict[str, str] | None = None
    files: dict[str, tuple[str, bytes, str]] | None = None
    params: dict[str, str] | None = None  # a GET API's inputs, as query parameters


def encode_request(api: APIInfo, arguments: dict[str, Any]) -> EncodedRequest:
    """A raw body for a lone bytes/File input, multipart when files travel with form values, JSON otherwise;
    query parameters for a GET API."""
    if api.method == "GET":
        params = {}
        for name, value in arguments.items():
            text = _form_value(api.inputs[name], value)
            if text is None:
                raise TypeError(f"{api.name}(): {name!r} is sent as a query parameter and must be a scalar, "
                                f"not {type(value).__name__}")
            params[name] = text
        return EncodedRequest(headers={}, params=params)
    binaries = {}
    for name, value in arguments.items():
        kind = api.inputs[name]
        if kind in _BINARY_KINDS:
            file = as_upload(kind, value)
            if file is None and kind != "dataframe":
                file = _as_file(api.name, name, value)
            if file is not None:
                binaries[name] = file
    raw = api.raw_input
    if raw is not None and raw in binaries:
        file = binaries[raw]
        ctype = file.content_type or OCTET
        # The raw body loses the filename, and the server refuses text/* raw bodies: multipart keeps both.
        if file.filename is None and not ctype.startswith(("text/", "application/x-www")):
            return EncodedRequest(headers={"content-type": ctype}, content=file.data)
    if binaries:
        form = {}
        for name, value in arguments.items():
            if name not in binaries:
                text = _form_value(api.inputs[name], value)
                if text is None:  # a structured value a form cannot carry: everything goes as JSON, files as base64
                    return EncodedRequest(headers={"content-type": JSON}, content=encode_json({**arguments, **binaries}))
                form[name] = text
        files = {
            name: (file.filename or name, file.data, file.content_type or OCTET) for name, file in binaries.items()
        }
        return EncodedRequest(headers={}, data=form, files=files)
    return EncodedRequest(headers={"content-type": JSON}, content=encode_json(arguments))


def _as_file(api: str, name: str, value: Any) -> File:
    if isinstance(value, File):
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        return File(bytes(value))
    if isinstance(value, os.PathLike):
        path = os.fspath(value)
        with open(path, "rb") as f:
            data = f.read()
        return File(data, filename=os.path.basename(path), content_type=mimetypes.guess_type(path)[0])
    if hasattr(value, "read"):
        data = value.read()
        if not isinstance(data, bytes):
            raise TypeError(f"{api}(): {name!r} is a file opened in text mode; open it with 'rb'")
        filename = getattr(value, "name", None)
        filename = os.path.basename(filename) if isinstance(filename, str) else None
        return File(data, filename=filename, content_type=mimetypes.guess_type(filename)[0] if filename else None)
    raise TypeError(
        f"{api}(): {name!r} takes bytes, a bento_like.File, a path or a binary file object, not {type(value).__name__}"
    )


def _form_value(kind: str, value: Any) -> str | None:
    """A form field's text that the server converts back to the declared type, or None when it cannot."""
    if kind in ("ndarray", "tensor", "dataframe"):
        return encode_json(value).decode()
    if isinstance(value, str):
        return value
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bool) or value is None:
        return encode_json(value).decode()
    if isinstance(value, (int, float)):
        return repr(value)
    return None


def decode_body(api: APIInfo, content_type: str | None, body: bytes) -> Any:
    """The value of a successful answer: the Content-Type says how it travelled, the API's output kind what it is."""
    mtype = media_type(content_type)
    if mtype == JSON or mtype.endswith("+json"):
        value = msgspec.json.decode(body)
        if api.output == "ndarray":
            return np.asarray(value)
        return from_json(api.output, value)
    if mtype.startswith("text/") and api.output != "path":
        return body.decode(_charset(content_type))
    if api.output == "file":
        return File(body, content_type=mtype or None)
    if api.output == "image":
        return image_from_body(body)
    if api.output == "path":
        return path_from_body(body, mtype)
    if api.output == "str":
        return body.decode(_charset(content_type))
    return body


def error_from_response(
    status: int, headers: Mapping[str, str], body: bytes, api: str | None = None
) -> APIError:
    """The APIError for an error answer, from the server's ``{"error", "status", "field"?, "error_id"?}`` body."""
    message = field = error_id = None
    if media_type(headers.get("content-type")) == JSON:
        try:
            payload = msgspec.json.decode(body)
        except msgspec.DecodeError:
            payload = None
        if isinstance(payload, dict):
            message, field, error_id = payload.get("error"), payload.get("field"), payload.get("error_id")
    if not isinstance(message, str):
        message = body.decode("utf-8", "replace").strip()[:500] or f"HTTP {status} with an empty body"
    cls = APIClientError if 400 <= status < 500 else APIServerError
    return cls(status, message, field, error_id, retry_after=parse_retry_after(headers.get("retry-after")), api=api)


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header: a number of seconds or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class RetryPolicy:
    """Decides, attempt by attempt, whether to send again and after how long.

    Only what cannot have reached the API is retried: a 429 or 503 answer (the server refused before running
    anything) and a failed connection. The pause is the server's Retry-After when it gives one, and never less
    than an exponential backoff with jitter, so that many clients refused together do not return together.
    """

    def __init__(self, max_retries: int, backoff: float) -> None:
        self.max_retries = max_retries
        self.backoff = backoff
        self.attempt = 0

    def after_status(self, status: int, retry_after: str | None) -> float | None:
        if status not in RETRY_STATUSES:
            return None
        wait = parse_retry_after(retry_after)
        if wait is not None and wait > MAX_RETRY_AFTER:
            return None
        return self._next(wait or 0.0)

    def after_connect_error(self) -> float | None:
        return self._next(0.0)

    def _next(self, floor: float) -> float | None:
        if self.attempt >= self.max_retries:
            return None
        delay = max(floor, min(MAX_BACKOFF, self.backoff * 2**self.attempt) * random.uniform(0.5, 1.5))
        self.attempt += 1
        return delay


def media_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


def _charset(content_type: str | None) -> str:
    for part in (content_type or "").split(";")[1:]:
        key, _, value = part.strip().partition("=")
        if key.lower() == "charset" and value:
            return value.strip('"')
    return "utf-8"


@dataclass(frozen=True)
class ServerSentEvent:
    event: str
    data: str


class SSEParser:
    """Server-sent events from lines, per the HTML spec: ``data:`` lines join with newlines, a blank line ends one."""

    def __init__(self) -> None:
        self._event = ""
        self._data: list[str] = []

    def feed(self, line: str) -> ServerSentEvent | None:
        if not line:
            if not self._data:
                self._event = ""
                return None
            event = ServerSentEvent(self._event or "message", "\n".join(self._data))
            self._event, self._data = "", []
            return event
        if line.startswith(":"):
            return None
        key, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if key == "data":
            self._data.append(value)
        elif key == "event":
            self._event = value
        return None


def decode_event(api: str, event: ServerSentEvent) -> Any:
    """An event's value: JSON when it parses as JSON, else its text; an ``error`` event raises APIStreamError."""
    try:
        value = msgspec.json.decode(event.data)
    except msgspec.DecodeError:
        value = event.data
    if event.event == "error":
        if isinstance(value, dict):
            raise APIStreamError(500, str(value.get("error", "stream failed")), None, value.get("error_id"), api=api)
        raise APIStreamError(500, str(value), api=api)
    return value




class ReadinessWait:
    """Polling ``/readyz`` until it answers 200: what each answer means, and how long to pause before the next.

    A service whose startup failed stays unready, so that answer raises at once instead of at the deadline.
    """

    def __init__(self, url: str, timeout: float) -> None:
        self.url = url
        self.timeout = timeout
        self.deadline = time.monotonic() + timeout
        self.interval = 0.05
        self.detail = "no answer yet"

    def answered(self, status: int, headers: Mapping[str, str], body: bytes) -> bool:
        if status == 200:
            return True
        error = error_from_response(status, headers, body)
        self.detail = f"{status}: {error.message}"
        if status == 503 and error.message.startswith("startup failed"):
            raise APIServerError(503, f"{self.url} will not become ready: {error.message}")
        return False

    def unreachable(self, exc: Exception) -> None:
        self.detail = f"unreachable: {exc or type(exc).__name__}"

    def poll_timeout(self) -> float:
        """How long one poll may take: what is left of the wait, within [0.1, 5] s."""
        return min(5.0, max(0.1, self.deadline - time.monotonic()))

    def pause(self) -> float:
        """Seconds to sleep before the next poll; APITimeoutError when the deadline would pass first."""
        if time.monotonic() + self.interval > self.deadline:
            raise APITimeoutError(f"{self.url} was not ready after {self.timeout:g} s (last answer: {self.detail})")
        interval, self.interval = self.interval, min(self.interval * 2, 0.5)
        return interval


class APIMethod:
    """``client.<api>``: calls the API; its signature and docstring come from the schema."""

    def __init__(self, client: Any, api: APIInfo) -> None:
        self._client = client
        self.api = api
        self.__name__ = self.__qualname__ = api.name
        self.__signature__ = api_signature(api, timeout_option="timeout" not in api.inputs)
        inputs = ", ".join(f"{name} ({kind})" for name, kind in api.inputs.items()) or "none"
        self.__doc__ = f"{api.summary or ''}\n\n{api.method} {api.route}; inputs: {inputs}; returns: {api.output}.".lstrip()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._client.call(self.api.name, *args, **kwargs)

    # BentoML's task methods: by task id, on the API. A handle from submit() has the same without the id.
    def submit(self, *args: Any, **kwargs: Any) -> Any:
        """Submit a task of this API: returns a Task handle at once (awaitable with AsyncClient)."""
        return self._client.submit_task(self.api.name, *args, **kwargs)

    def get_status(self, task_id: str) -> Any:
        return self._client.get_task(self.api.name, task_id).get_status()

    def get(self, task_id: str, wait: float | None = None) -> Any:
        return self._client.get_task(self.api.name, task_id).get(wait=wait)

    def cancel(self, task_id: str) -> Any:
        return self._client.get_task(self.api.name, task_id).cancel()

    def retry(self, task_id: str) -> Any:
        return self._client.get_task(self.api.name, task_id).retry()

    def __repr__(self) -> str:
        return f"<API {self.api.name}{self.__signature__} at {self._client.url}>"


class PendingMethod:
    """``async_client.<name>`` before the schema is loaded: whether the API exists is known once awaited."""

    def __init__(self, client: Any, name: str) -> None:
        self._client = client
        self.__name__ = self.__qualname__ = name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._client.call(self.__name__, *args, **kwargs)

    def submit(self, *args: Any, **kwargs: Any) -> Any:
        return self._client.submit_task(self.__name__, *args, **kwargs)

    def get_status(self, task_id: str) -> Any:
        return self._client.get_task(self.__name__, task_id).get_status()

    def get(self, task_id: str, wait: float | None = None) -> Any:
        return self._client.get_task(self.__name__, task_id).get(wait=wait)

    def cancel(self, task_id: str) -> Any:
        return self._client.get_task(self.__name__, task_id).cancel()

    def retry(self, task_id: str) -> Any:
        return self._client.get_task(self.__name__, task_id).retry()

    def __repr__(self) -> str:
        return f"<API {self.__name__} at {self._client.url} (schema not loaded yet)>"
