"""What ``self.other`` is for a ``bl.depends(Other)``: a client with Other's API methods, or Other's own object.

``RemoteService`` wraps the sync and async clients (which read the other server's ``/openapi.json`` and build one
method per API): ``self.other.encode(texts=[...])`` calls API ``encode`` the way Other wrote it (blocking for a
``def``, awaitable for an ``async def``, as a method call in one process would be), ``self.other.to_async`` and
``self.other.to_sync`` force one kind, as BentoML's ``RemoteProxy`` does. An object built in this process gets the
same ``to_async`` / ``to_sync`` views (``local_object``), so code written against a separately-run dependency also
runs where it is built in-process: in a unit test, a notebook, or after its resources are removed.
"""

from __future__ import annotations

import asyncio
import inspect
from typing import Any, Callable

from .sdk.service import get_spec

# (error raised by the client, the dependency's name, the API's name) -> the exception to raise in the caller
ErrorHook = Callable[[Exception, str, str], Exception]


def _is_async(method: Any) -> bool:
    return inspect.iscoroutinefunction(method) or inspect.isasyncgenfunction(method)


class RemoteService:
    """Another service, reached over HTTP at ``url``, with its API methods by attribute name."""

    def __init__(
        self, url: str, service: type | None = None, *, timeout: float | None = None, errors: ErrorHook | None = None
    ) -> None:
        from .client import AsyncClient, Client

        spec = get_spec(service) if service is not None else None
        self.url = url
        self.name = spec.name if spec is not None else url
        # attribute -> (API name, whether Other wrote it async); unknown without the class: all sync, by name
        self._apis = (
            {e.attr: (e.config.name, _is_async(getattr(service, e.attr))) for e in spec.apis} if spec is not None else None
        )
        # the other service's own deadline, plus a margin so that its 504 arrives before our timeout
        timeout = timeout or (spec.traffic.timeout * 1.01 if spec is not None else 60.0)
        self._errors = errors
        self._sync = Client(url, timeout=timeout)
        self._async = AsyncClient(url, timeout=timeout)
        self.to_sync = _Methods(self, self._sync, is_async=False)
        self.to_async = _Methods(self, self._async, is_async=True)

    def api(self, attr: str) -> tuple[str, bool]:
        """The API name behind ``attr`` and whether it is async; AttributeError naming the APIs if none is."""
        if self._apis is None:
            return attr, False
        if attr not in self._apis:
            raise AttributeError(
                f"service {self.name!r} runs as its own server at {self.url}: only its APIs can be called through "
                f"this dependency ({', '.join(self._apis)}); {attr!r} is not one"
            )
        return self._apis[attr]

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        _, is_async = self.api(name)
        return getattr(self.to_async if is_async else self.to_sync, name)

    def translate(self, exc: Exception, api: str) -> Exception:
        return exc if self._errors is None else self._errors(exc, self.name, api)

    def close(self) -> None:
        self._sync.close()

    async def aclose(self) -> None:
        self._sync.close()
        await self._async.close()

    def __repr__(self) -> str:
        return f"<RemoteService {self.name!r} at {self.url}>"


class _Methods:
    """The API methods of a ``RemoteService``, all blocking or all awaitable."""

    def __init__(self, remote: RemoteService, client: Any, *, is_async: bool) -> None:
        self._remote = remote
        self._client = client
        self._is_async = is_async

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        from .client import APIConnectionError, APIError

        api, _ = self._remote.api(name)
        client, remote = self._client, self._remote
        if self._is_async:

            async def call(*args: Any, **kwargs: Any) -> Any:
                try:
                    return await client.call(api, *args, **kwargs)
                except (APIError, APIConnectionError) as exc:
                    raise remote.translate(exc, api) from exc

        else:

            def call(*args: Any, **kwargs: Any) -> Any:  # type: ignore[misc]
                try:
                    return client.call(api, *args, **kwargs)
                except (APIError, APIConnectionError) as exc:
                    raise remote.translate(exc, api) from exc

        call.__name__ = call.__qualname__ = name
        return call

    def __repr__(self) -> str:
        return f"<{'async' if self._is_async else 'sync'} methods of {self._remote!r}>"


def local_object(obj: Any) -> Any:
    """``obj`` (a service built in this process) with ``to_async`` / ``to_sync`` views, unless its class has its own."""
    for name, view in (("to_async", _LocalAsync), ("to_sync", _LocalSync)):
        if not hasattr(type(obj), name):
            obj.__dict__[name] = view(obj)
    return obj


class _LocalAsync:
    """Every method of an in-process object awaitable: a sync one runs on a thread, as the runtime runs sync APIs."""

    def __init__(self, obj: Any) -> None:
        self._obj = obj

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._obj, name)
        if not callable(method) or _is_async(method):
            return method

        async def call(*args: Any, **kwargs: Any) -> Any:
            return await asyncio.to_thread(method, *args, **kwargs)

        call.__name__ = call.__qualname__ = name
        return call


class _LocalSync:
    """Every method of an in-process object blocking: an async one runs to completion in an event loop of its own
    (so, from a thread that runs no loop, such as a sync API's)."""

    def __init__(self, obj: Any) -> None:
        self._obj = obj

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._obj, name)
        if not inspect.iscoroutinefunction(method):
            return method

        def call(*args: Any, **kwargs: Any) -> Any:
            return asyncio.run(method(*args, **kwargs))

        call.__name__ = call.__qualname__ = name
        return call
