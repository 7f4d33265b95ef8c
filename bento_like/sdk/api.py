"""`@api` and `@task`: mark a service method as an HTTP endpoint and declare how requests reach it.

The decorator only records a declaration on the function (``func.__bento_api__``) and returns the
function unchanged, so a service method stays an ordinary method that code and tests can call directly.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, TypeVar, Union, overload

from .context import is_context_annotation

F = TypeVar("F", bound=Callable[..., Any])

API_ATTR = "__bento_api__"

DEFAULT_WARMUP_TIMEOUT = 60.0
"""Seconds one API's warm-up may take, on all instances together, before the server gives up starting."""

Warmup = Union[bool, Mapping[str, Any], None]
"""What ``@api(warmup=...)`` takes: True (zeros of the declared shapes, or of the model's signature), an example
input as a request's JSON object would hold it, or False/None (no warm-up)."""


class ServiceDefinitionError(TypeError):
    """A service or API declaration is wrong; the message says what to change."""


@dataclass(frozen=True)
class APIConfig:
    name: str
    route: str
    batchable: bool = False
    max_batch_size: int = 64
    max_latency_ms: float = 1000.0
    batch_dim: int | tuple[int, int] = 0
    preferred_batch_sizes: tuple[int, ...] = ()
    params: tuple[str, ...] = field(default=())
    warmup: bool | dict[str, Any] = field(default=False, hash=False)
    warmup_timeout: float = DEFAULT_WARMUP_TIMEOUT
    context: str | None = None  # the parameter annotated bl.Context, which the runtime fills per request
    method: str = "POST"  # GET: inputs arrive as query parameters
    task: bool = False  # also served as a task: submitted, then polled (docs/tasks.md)

    @property
    def input_batch_dim(self) -> int:
        return self.batch_dim[0] if isinstance(self.batch_dim, tuple) else self.batch_dim

    @property
    def output_batch_dim(self) -> int:
        return self.batch_dim[1] if isinstance(self.batch_dim, tuple) else self.batch_dim


@overload
def api(func: F) -> F: ...


@overload
def api(
    *,
    route: str | None = None,
    name: str | None = None,
    batchable: bool = False,
    max_batch_size: int = 64,
    max_latency_ms: float = 1000.0,
    batch_dim: int | tuple[int, int] = 0,
    preferred_batch_sizes: list[int] | tuple[int, ...] | None = None,
    warmup: Warmup = False,
    warmup_timeout: float = DEFAULT_WARMUP_TIMEOUT,
    method: str = "POST",
) -> Callable[[F], F]: ...


def api(
    func: Callable[..., Any] | None = None,
    *,
    route: str | None = None,
    name: str | None = None,
    batchable: bool = False,
    max_batch_size: int = 64,
    max_latency_ms: float = 1000.0,
    batch_dim: int | tuple[int, int] = 0,
    preferred_batch_sizes: list[int] | tuple[int, ...] | None = None,
    warmup: Warmup = False,
    warmup_timeout: float = DEFAULT_WARMUP_TIMEOUT,
    method: str = "POST",
) -> Any:
    """Expose a service method as ``POST /<route>`` (``GET``, with query parameters, for ``method="GET"``).

    Used bare (``@api``) or with options (``@api(route="/v1/predict", batchable=True)``). Arguments arrive as a
    JSON object keyed by parameter name. A batchable API takes exactly one input; the runtime may merge several
    requests along ``batch_dim`` (at most ``max_batch_size`` items) and hold a request at most
    ``max_latency_ms`` before it runs.

    Nothing is called before the first request unless ``warmup`` asks: ``warmup=True`` calls the API once per
    instance with zeros (one item of each input's declared ``Shape``, or of the service's model's signature),
    ``warmup={"text": "hello"}`` with that input. It must end within ``warmup_timeout`` seconds; one that
    fails or runs longer keeps the server from turning ready. A batchable API's warm-up also seeds its
    batcher's latency model.
    """
    return _declare(
        func, False, route=route, name=name, batchable=batchable, max_batch_size=max_batch_size,
        max_latency_ms=max_latency_ms, batch_dim=batch_dim, preferred_batch_sizes=preferred_batch_sizes,
        warmup=warmup, warmup_timeout=warmup_timeout, method=method,
    )


@overload
def task(func: F) -> F: ...


@overload
def task(
    *,
    route: str | None = None,
    name: str | None = None,
    batchable: bool = False,
    max_batch_size: int = 64,
    max_latency_ms: float = 1000.0,
    batch_dim: int | tuple[int, int] = 0,
    preferred_batch_sizes: list[int] | tuple[int, ...] | None = None,
    warmup: Warmup = False,
    warmup_timeout: float = DEFAULT_WARMUP_TIMEOUT,
) -> Callable[[F], F]: ...


def task(
    func: Callable[..., Any] | None = None,
    *,
    route: str | None = None,
    name: str | None = None,
    batchable: bool = False,
    max_batch_size: int = 64,
    max_latency_ms: float = 1000.0,
    batch_dim: int | tuple[int, int] = 0,
    preferred_batch_sizes: list[int] | tuple[int, ...] | None = None,
    warmup: Warmup = False,
    warmup_timeout: float = DEFAULT_WARMUP_TIMEOUT,
) -> Any:
    """Expose a service method as a task: ``POST /<route>/submit`` answers at once with a task id, and
    ``GET /<route>/status``, ``GET /<route>/get``, ``PUT /<route>/cancel`` and ``POST /<route>/retry`` follow it
    (docs/tasks.md). ``POST /<route>`` still calls it and waits, as for an ``@api``.

    Takes the options of ``@api``: a batchable task runs through the API's batcher with the requests of its
    route. A task cannot stream (a generator has no single result to keep).
    """
    return _declare(
        func, True, route=route, name=name, batchable=batchable, max_batch_size=max_batch_size,
        max_latency_ms=max_latency_ms, batch_dim=batch_dim, preferred_batch_sizes=preferred_batch_sizes,
        warmup=warmup, warmup_timeout=warmup_timeout,
    )


def _declare(
    func: Callable[..., Any] | None,
    is_task: bool,
    *,
    route: str | None,
    name: str | None,
    batchable: bool,
    max_batch_size: int,
    max_latency_ms: float,
    batch_dim: int | tuple[int, int],
    preferred_batch_sizes: list[int] | tuple[int, ...] | None,
    warmup: Warmup,
    warmup_timeout: float,
    method: str = "POST",
) -> Any:
    """The one implementation behind ``@api`` and ``@task``: checks the options, records the APIConfig."""
    kind = "task" if is_task else "api"

    def decorate(f: Callable[..., Any]) -> Callable[..., Any]:
        if not callable(f) or isinstance(f, (staticmethod, classmethod)):
            raise ServiceDefinitionError(f"@{kind} decorates a plain method of a service class (def or async def)")
        api_name = name or f.__name__
        if is_task and (inspect.isgeneratorfunction(f) or inspect.isasyncgenfunction(f)):
            raise ServiceDefinitionError(
                f"task {api_name!r} is a generator: a task keeps one result to fetch later, so it cannot stream; "
                "return the whole result, or make it an @api"
            )
        params, context = _api_params(f, api_name)
        if context is not None and batchable:
            raise ServiceDefinitionError(
                f"batchable API {api_name!r} takes a request context ({context!r}), but a batch serves many "
                "requests at once: drop the context parameter, or set batchable=False"
            )
        http_method = _http_method(api_name, method, batchable, f)
        if batchable and len(params) != 1:
            raise ServiceDefinitionError(
                f"batchable API {api_name!r} takes {len(params)} parameters ({', '.join(params) or 'none'}); "
                "a batchable API takes exactly one input that the runtime cuts along batch_dim: "
                "merge the inputs into one array or Struct, or set batchable=False"
            )
        if batchable and (inspect.isgeneratorfunction(f) or inspect.isasyncgenfunction(f)):
            raise ServiceDefinitionError(f"API {api_name!r} streams (it is a generator) and cannot be batchable")
        if not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ServiceDefinitionError(f"API {api_name!r}: max_batch_size must be an int >= 1, got {max_batch_size!r}")
        if not isinstance(max_latency_ms, (int, float)) or max_latency_ms <= 0:
            raise ServiceDefinitionError(f"API {api_name!r}: max_latency_ms must be > 0, got {max_latency_ms!r}")
        dims = batch_dim if isinstance(batch_dim, tuple) else (batch_dim,)
        if len(dims) not in (1, 2) or not all(isinstance(d, int) and d >= 0 for d in dims):
            raise ServiceDefinitionError(
                f"API {api_name!r}: batch_dim must be an int >= 0 or a pair (input_dim, output_dim), got {batch_dim!r}"
            )
        preferred = tuple(sorted(set(preferred_batch_sizes or ())))
        if any(not isinstance(s, int) or s < 1 or s > max_batch_size for s in preferred):
            raise ServiceDefinitionError(
                f"API {api_name!r}: preferred_batch_sizes must be ints between 1 and max_batch_size ({max_batch_size})"
            )
        example = _warmup(api_name, f, params, warmup, warmup_timeout)
        api_route = route if route is not None else "/" + api_name
        if not api_route.startswith("/") or " " in api_route:
            raise ServiceDefinitionError(f"API {api_name!r}: route must start with '/' and hold no spaces, got {api_route!r}")
        setattr(
            f,
            API_ATTR,
            APIConfig(
                name=api_name,
                route=api_route.rstrip("/") or "/",
                batchable=batchable,
                max_batch_size=max_batch_size,
                max_latency_ms=float(max_latency_ms),
                batch_dim=batch_dim,
                preferred_batch_sizes=preferred,
                params=params,
                warmup=example,
                warmup_timeout=float(warmup_timeout),
                context=context,
                method=http_method,
                task=is_task,
            ),
        )
        return f

    if func is not None:
        return decorate(func)
    return decorate


def _api_params(f: Callable[..., Any], api_name: str) -> tuple[tuple[str, ...], str | None]:
    """The names of the API's inputs, and of its request-context parameter if it has one."""
    params = list(inspect.signature(f).parameters.values())
    if not params or params[0].name != "self":
        raise ServiceDefinitionError(f"API {api_name!r} must be a method whose first parameter is self")
    names = []
    context = None
    for p in params[1:]:
        if is_context_annotation(p.annotation):
            if context is not None:
                raise ServiceDefinitionError(
                    f"API {api_name!r} takes two request contexts ({context!r} and {p.name!r}); one is enough"
                )
            context = p.name
            continue
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            raise ServiceDefinitionError(
                f"API {api_name!r}: *{p.name} / **{p.name} cannot be served; name every input as a parameter"
            )
        if p.kind is p.POSITIONAL_ONLY:
            raise ServiceDefinitionError(f"API {api_name!r}: parameter {p.name!r} is positional-only; inputs travel by name")
        names.append(p.name)
    return tuple(names), context


_METHODS = ("POST", "GET")


def _http_method(api_name: str, method: Any, batchable: bool, f: Callable[..., Any]) -> str:
    upper = method.upper() if isinstance(method, str) else method
    if upper not in _METHODS:
        raise ServiceDefinitionError(f"API {api_name!r}: method must be 'POST' or 'GET', got {method!r}")
    if upper == "GET" and batchable:
        raise ServiceDefinitionError(f"API {api_name!r}: a GET API cannot be batchable; use method='POST'")
    return upper


def _warmup(api_name: str, f: Callable[..., Any], params: tuple[str, ...], warmup: Warmup,
            timeout: Any) -> bool | dict[str, Any]:
    """The warm-up asked for, checked: what the declaration alone can tell (the values are checked against the
    API's input types when the server loads the service)."""
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ServiceDefinitionError(f"API {api_name!r}: warmup_timeout must be seconds > 0, got {timeout!r}")
    if warmup is None or warmup is False:
        return False
    if inspect.isgeneratorfunction(f) or inspect.isasyncgenfunction(f):
        raise ServiceDefinitionError(f"API {api_name!r} streams (it is a generator) and cannot be warmed up")
    if warmup is True:
        return True
    if not isinstance(warmup, Mapping) or not all(isinstance(k, str) for k in warmup):
        raise ServiceDefinitionError(
            f"API {api_name!r}: warmup must be True, False or an example input (a dict of parameter name to value, "
            f"as a request's JSON object holds it), got {type(warmup).__name__}"
        )
    unknown = [k for k in warmup if k not in params]
    if unknown:
        raise ServiceDefinitionError(
            f"API {api_name!r}: warmup names {', '.join(map(repr, unknown))}, which is not a parameter; "
            f"its parameters: {', '.join(params) or 'none'}"
        )
    signature = inspect.signature(f).parameters
    missing = [p for p in params if signature[p].default is inspect.Parameter.empty and p not in warmup]
    if missing:
        raise ServiceDefinitionError(
            f"API {api_name!r}: warmup lacks the required input(s) {', '.join(map(repr, missing))}"
        )
    return dict(warmup)


def get_api_config(obj: Any) -> APIConfig | None:
    return getattr(obj, API_ATTR, None)
