"""`ctx: bl.Context`: what an API sees of the HTTP request it serves, and what it says of the response.

An API asks for it by annotating a parameter with ``bl.Context`` (any name; BentoML writes ``ctx``). It is not an
input: it is not in the request body, the OpenAPI schema or the client's signature. The runtime makes one per
request, so ``ctx.state`` never leaks between requests. Nothing here imports a web framework: the runtime puts
its request object in ``ctx.request``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, MutableMapping


@dataclass
class Cookie:
    """A cookie to set on the response (the attributes of ``Set-Cookie``)."""

    key: str
    value: str = ""
    max_age: int | None = None
    expires: str | int | None = None
    path: str | None = "/"
    domain: str | None = None
    secure: bool = False
    httponly: bool = False
    samesite: str | None = "lax"

    def header(self) -> str:
        """The ``Set-Cookie`` header's value."""
        from http.cookies import SimpleCookie

        cookie: SimpleCookie = SimpleCookie()
        cookie[self.key] = self.value
        morsel = cookie[self.key]
        for name, value in (("max-age", self.max_age), ("expires", self.expires), ("path", self.path),
                            ("domain", self.domain), ("samesite", self.samesite)):
            if value is not None:
                morsel[name] = value
        if self.secure:
            morsel["secure"] = True
        if self.httponly:
            morsel["httponly"] = True
        return morsel.OutputString()


class Headers(MutableMapping[str, str]):
    """Response headers, by case-insensitive name."""

    def __init__(self) -> None:
        self._items: dict[str, tuple[str, str]] = {}

    def __getitem__(self, key: str) -> str:
        return self._items[key.lower()][1]

    def __setitem__(self, key: str, value: str) -> None:
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"response headers are str -> str, got {key!r}: {value!r}")
        if any(c in key + value for c in "\r\n"):
            raise ValueError(f"response header {key!r} holds a line break")
        self._items[key.lower()] = (key, value)

    def __delitem__(self, key: str) -> None:
        del self._items[key.lower()]

    def __iter__(self) -> Iterator[str]:
        return (name for name, _ in self._items.values())

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Headers({dict(self._items.values())!r})"


class ResponseContext:
    """What the API sets on its response: status code, headers, cookies."""

    def __init__(self) -> None:
        self.status_code = 200
        self.headers = Headers()
        self.cookies: list[Cookie] = []

    def set_cookie(self, key: str, value: str = "", **attributes: Any) -> None:
        """Add a cookie: ``ctx.response.set_cookie("session", "abc", httponly=True, max_age=3600)``."""
        self.cookies.append(Cookie(key, value, **attributes))


class Context:
    """One request's context: ``ctx.request`` (the HTTP request: headers, cookies, query_params, client, url),
    ``ctx.response`` (status_code, headers, cookies), ``ctx.state`` (a dict for this request only), ``ctx.temp_dir``
    (a directory deleted after the response)."""

    def __init__(self, request: Any = None) -> None:
        self.request = request
        self.response = ResponseContext()
        self.state: dict[str, Any] = {}
        self._temp_dir: str | None = None

    @property
    def temp_dir(self) -> str:
        """A directory of this request's own (made on first use), deleted once the response is sent: the place
        for a file the API returns as a Path."""
        if self._temp_dir is None:
            import tempfile

            self._temp_dir = tempfile.mkdtemp(prefix="bento_like-request-")
        return self._temp_dir

    def cleanup(self) -> None:
        """Delete ``temp_dir`` if the request made one (the runtime calls this after the response)."""
        if self._temp_dir is not None:
            import shutil

            shutil.rmtree(self._temp_dir, ignore_errors=True)
            self._temp_dir = None


def is_context_annotation(annotation: Any) -> bool:
    """Whether a parameter's annotation asks for the request context: the class, or its name as a string (an
    annotation under ``from __future__ import annotations``, before it is resolved)."""
    if annotation is Context:
        return True
    if isinstance(annotation, str):
        return annotation == "Context" or annotation.endswith(".Context")
    return False
