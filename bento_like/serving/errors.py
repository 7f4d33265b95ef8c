"""HTTP errors the runtime answers with, all as ``{"error": ..., ...}`` JSON bodies."""

from __future__ import annotations

from typing import Any

import msgspec


class HTTPError(Exception):
    """An error that becomes a response: status, message, and optional extra fields and headers."""

    def __init__(
        self, status: int, message: str, *, headers: dict[str, str] | None = None, reason: str | None = None, **extra: Any
    ) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason  # why a request was refused, for the rejections metric; not sent
        self.message = message
        self.headers = headers or {}
        self.extra = extra

    def body(self) -> bytes:
        return msgspec.json.encode({"error": self.message, "status": self.status, **self.extra})


def bad_request(message: str) -> HTTPError:
    return HTTPError(400, message)


def validation_error(message: str) -> HTTPError:
    """422 with the field path msgspec reports (``... - at `$.item.text```) split out as ``field``."""
    field = "$"
    marker = " - at `"
    if marker in message and message.endswith("`"):
        message, _, path = message.rpartition(marker)
        field = path[:-1]
    elif message.startswith("Object missing required field `"):
        field = "$." + message.split("`")[1]
    elif message.startswith("Object contains unknown field `"):
        field = "$." + message.split("`")[1]
    return HTTPError(422, f"{message} (at {field})", field=field)


def too_many_requests(message: str, retry_after: float, reason: str = "overload") -> HTTPError:
    return HTTPError(429, message, headers={"Retry-After": _seconds(retry_after)}, reason=reason)


def unavailable(message: str, retry_after: float) -> HTTPError:
    return HTTPError(503, message, headers={"Retry-After": _seconds(retry_after)})


def _seconds(value: float) -> str:
    return str(max(1, int(value + 0.999)))
