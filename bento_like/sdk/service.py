"""`@service`: declares a class as a servable unit with its resources, traffic limits and dependencies.

The decorator validates the declaration at once (unknown keys, duplicate routes) and attaches a
``ServiceSpec`` to the class as ``__bento_service__``. It never instantiates the class: building instances,
placing them on devices and serving them is the runtime's job.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, field
from typing import Any, Callable, TypeVar

from .api import APIConfig, ServiceDefinitionError, get_api_config

T = TypeVar("T", bound=type)

SERVICE_ATTR = "__bento_service__"
HOOK_ATTR = "__bento_hook__"

RESOURCE_KEYS = {"cpu", "memory", "gpu", "gpu_type"}
TRAFFIC_KEYS = {"timeout", "max_concurrency", "max_queue", "max_body_size"}


@dataclass(frozen=True)
class Resources:
    cpu: float | None = None
    memory: str | None = None
    gpu: int = 0
    gpu_type: str | None = None


@dataclass(frozen=True)
class Traffic:
    timeout: float = 60.0
    max_concurrency: int | None = None
    max_queue: int | None = None
    max_body_size: int = 64 * 1024 * 1024


@dataclass(frozen=True)
class APIEntry:
    """One served method: its declaration plus the attribute it lives under."""

    attr: str
    config: APIConfig


@dataclass(frozen=True)
class ServiceSpec:
    cls: type
    name: str
    resources: Resources
    traffic: Traffic
    workers: int
    instances: int | None
    envs: dict[str, str]
    apis: tuple[APIEntry, ...]
    startup_hooks: tuple[str, ...] = ()
    shutdown_hooks: tuple[str, ...] = ()
    dependencies: dict[str, "Dependency"] = field(default_factory=dict)
    deployment_hooks: tuple[str, ...] = ()
    ready_hooks: tuple[str, ...] = ()
    asgi_apps: tuple["MountedApp", ...] = ()

    def api(self, name: str) -> APIEntry:
        for entry in self.apis:
            if entry.config.name == name:
                return entry
        raise KeyError(name)

    def model_refs(self) -> dict[str, Any]:
        """Model references of this service and of the services it depends on, keyed by dotted attribute."""
        from .model_ref import model_refs

        refs = dict(model_refs(self.cls))
        for attr, dep in self.dependencies.items():
            if dep.url is not None:  # another deployment's models: not this bento's
                continue
            for sub, ref in get_spec(dep.target).model_refs().items():
                refs[f"{attr}.{sub}"] = ref
        return refs


def runs_on_its_own(spec: ServiceSpec) -> bool:
    """Whether a depended-on service runs as its own server (its own processes) under ``pkg serve``.

    A service that declares how it runs (resources, ``workers`` > 1, ``instances``) asked to be scaled on its
    own terms, which it cannot be inside its caller's process; one that declares nothing is a plain helper and
    is built inside each instance of its caller, as a method call costs nothing there."""
    return spec.resources != Resources() or spec.workers > 1 or spec.instances is not None


class Dependency:
    """``self.other`` inside a service: another service, built in this process or called over HTTP.

    Under ``pkg serve`` the runtime sets the attribute on each instance: the other service's object when it runs
    in this process, or a client with its API methods when it runs on its own (``runs_on_its_own``) or lives at
    ``url``. Outside the runtime (a notebook, a unit test) the first access builds the object here, or a client
    for ``url``.
    """

    def __init__(self, on: type | None = None, *, url: str | None = None, mode: str | None = None) -> None:
        if on is None and url is None:
            raise ServiceDefinitionError("depends() takes a service class, url=..., or both")
        if on is not None and get_spec_or_none(on) is None:
            raise ServiceDefinitionError(
                f"depends() takes a class decorated with @bento_like.service; {on!r} is not one"
            )
        if url is not None and (not isinstance(url, str) or "://" not in url):
            raise ServiceDefinitionError(f"depends(url=...) takes a URL such as 'http://10.0.0.5:3000', got {url!r}")
        self.target = on
        self.url = url
        self.mode = mode  # None: the methods as the service wrote them; "async" / "sync": all awaitable / all blocking
        self.attr: str | None = None

    @property
    def remote(self) -> bool:
        """Whether the runtime calls this dependency over HTTP instead of building it in the caller's process."""
        return self.url is not None or runs_on_its_own(get_spec(self.target))

    @property
    def to_async(self) -> "Dependency":
        """``other = bl.depends(Other).to_async``: every API method of ``self.other`` is awaitable."""
        return Dependency(self.target, url=self.url, mode="async")

    @property
    def to_sync(self) -> "Dependency":
        """``other = bl.depends(Other).to_sync``: every API method of ``self.other`` blocks and returns its value."""
        return Dependency(self.target, url=self.url, mode="sync")

    def __set_name__(self, owner: type, name: str) -> None:
        self.attr = name

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            return self
        from .._remote import RemoteService, local_object

        # Outside the runtime, build the dependency on first use (a URL is the only way to reach a deployment).
        if self.url is not None:
            value: Any = RemoteService(self.url, self.target)
        else:
            value = local_object(self.target())
        if self.mode is not None:
            value = getattr(value, f"to_{self.mode}")
        obj.__dict__[self.attr] = value
        return value

    def __repr__(self) -> str:
        on = self.target.__name__ if self.target is not None else None
        return f"depends({on or ''}{', ' if on and self.url else ''}{f'url={self.url!r}' if self.url else ''})"


def service_key(cls: type) -> str:
    """A dependency's identity in every process: they all import the service's modules the same way."""
    return f"{cls.__module__}:{cls.__qualname__}"


def separate_services(spec: ServiceSpec) -> dict[str, ServiceSpec]:
    """Every service ``spec`` depends on, at any depth, that runs as its own server: each once."""
    found: dict[str, ServiceSpec] = {}
    seen = {service_key(spec.cls)}  # every service walked: two services may depend on each other

    def walk(s: ServiceSpec) -> None:
        for dep in s.dependencies.values():
            if dep.target is None or dep.url is not None:
                continue  # another deployment's business
            key = service_key(dep.target)
            if key in seen:
                continue
            seen.add(key)
            target = get_spec(dep.target)
            if dep.remote:
                found[key] = target
            walk(target)

    walk(spec)
    return found


def depends(on: type | None = None, *, url: str | None = None) -> Any:
    """Compose services: ``embedder = bl.depends(Embedder)`` as a class attribute gives each instance an Embedder.

    The Embedder runs in the caller's process, or as its own server when it declares its own resources, workers
    or instances (docs/distributed.md). ``bl.depends(url="http://host:3000")`` calls a service already running
    there; ``bl.depends(Embedder, url=...)`` does too, with Embedder's method names and kinds (sync or async).
    """
    return Dependency(on, url=url)


@dataclass(frozen=True)
class MountedApp:
    """An ASGI app (FastAPI, Starlette...) served beside the APIs under ``path``."""

    app: Any
    path: str
    name: str | None = None


_MOUNTS_ATTR = "__bento_asgi_apps__"


def mount_asgi_app(app: Any, *, path: str = "/", name: str | None = None) -> Callable[[T], T]:
    """Serve an ASGI app beside the service's APIs: ``@bl.mount_asgi_app(fastapi_app, path="/v1")`` above
    ``@bl.service``. Its routes can reach the service with ``bl.get_current_service()``."""
    if not callable(app):
        raise ServiceDefinitionError(f"mount_asgi_app takes an ASGI app (a FastAPI or Starlette app), got {app!r}")
    if not isinstance(path, str) or not path.startswith("/") or " " in path:
        raise ServiceDefinitionError(f"mount_asgi_app: path must start with '/' and hold no spaces, got {path!r}")

    def decorate(cls: T) -> T:
        mounts = (*cls.__dict__.get(_MOUNTS_ATTR, ()), MountedApp(app, path.rstrip("/") or "/", name))
        setattr(cls, _MOUNTS_ATTR, mounts)
        spec = get_spec_or_none(cls)
        if spec is not None:  # the decorator sits above @service: the spec exists already
            setattr(cls, SERVICE_ATTR, _with_mounts(spec, mounts))
        return cls

    return decorate


asgi_app = mount_asgi_app  # BentoML 1.4's name for the same decorator


def _with_mounts(spec: ServiceSpec, mounts: tuple[MountedApp, ...]) -> ServiceSpec:
    import dataclasses

    _check_mounts(spec.name, spec.apis, mounts)
    return dataclasses.replace(spec, asgi_apps=mounts)


def _check_mounts(svc_name: str, apis: tuple[APIEntry, ...], mounts: tuple[MountedApp, ...]) -> None:
    seen: set[str] = set()
    for mount in mounts:
        if mount.path in seen:
            raise ServiceDefinitionError(f"service {svc_name!r}: two ASGI apps are mounted at {mount.path!r}")
        seen.add(mount.path)
        if mount.path == "/":
            continue  # served last: every route of the service's own wins over it
        if mount.path in RESERVED_ROUTES or any(mount.path.startswith(r + "/") for r in ("/v2", "/docs")):
            raise ServiceDefinitionError(
                f"service {svc_name!r}: an ASGI app cannot be mounted at {mount.path!r}, a route of the server")
        for entry in apis:
            route = entry.config.route
            if route == mount.path or route.startswith(mount.path + "/"):
                raise ServiceDefinitionError(
                    f"service {svc_name!r}: API {entry.config.name!r} ({route}) lies under the ASGI app mounted at "
                    f"{mount.path!r}; move one of them"
                )


_current_service: Callable[[], Any] | None = None


def get_current_service() -> Any:
    """The service instance serving in this process, for code that runs beside the APIs (a mounted ASGI app's
    routes). With several instances, the one with the fewest requests in flight."""
    if _current_service is None:
        raise RuntimeError(
            "get_current_service() is called outside a running server (no service instance is built yet)"
        )
    return _current_service()


def set_current_service(getter: Callable[[], Any] | None) -> None:
    """Called by the runtime once its instances are built."""
    global _current_service
    _current_service = getter


def on_deployment(func: Callable[..., Any]) -> Callable[..., Any]:
    """Run this function once per deployment, before any worker starts (a download, a migration): declared in
    the class without ``self`` (or as a staticmethod); it gets no instance."""
    target = func.__func__ if isinstance(func, staticmethod) else func
    setattr(target, HOOK_ATTR, "deployment")
    return func


def on_startup(func: Callable[..., Any]) -> Callable[..., Any]:
    """Run this method (sync or async) once per instance after ``__init__``, before the server is ready."""
    setattr(func, HOOK_ATTR, "startup")
    return func


def on_ready(func: Callable[..., Any]) -> Callable[..., Any]:
    """A readiness check of this service's own (a remote model reachable, a cache warm), sync or async, asked on
    every ``/readyz`` of every instance: until each returns a true value, ``/readyz`` answers 503 with what it
    returned or raised. It must answer fast (5 s at most): an orchestrator probes every few seconds."""
    setattr(func, HOOK_ATTR, "ready")
    return func


def on_shutdown(func: Callable[..., Any]) -> Callable[..., Any]:
    """Run this method (sync or async) once per instance when the server stops, after in-flight requests end."""
    setattr(func, HOOK_ATTR, "shutdown")
    return func


def service(
    cls: type | None = None,
    *,
    name: str | None = None,
    resources: dict[str, Any] | None = None,
    traffic: dict[str, Any] | None = None,
    workers: int = 1,
    instances: int | None = None,
    envs: dict[str, str] | list[dict[str, str]] | None = None,
) -> Any:
    """Declare a service class. Used bare (``@service``) or with options (``@service(name="demo", ...)``)."""

    def decorate(c: type) -> type:
        if not inspect.isclass(c):
            raise ServiceDefinitionError("@service decorates a class")
        svc_name = name or c.__name__
        if not svc_name.replace("-", "_").replace(".", "_").isidentifier():
            raise ServiceDefinitionError(f"service name {svc_name!r}: use letters, digits, '_', '-' or '.'")
        spec = ServiceSpec(
            cls=c,
            name=svc_name,
            resources=_resources(svc_name, resources or {}),
            traffic=_traffic(svc_name, traffic or {}),
            workers=_positive_int(svc_name, "workers", workers),
            instances=None if instances is None else _positive_int(svc_name, "instances", instances),
            envs=_envs(svc_name, envs),
            apis=_collect_apis(c, svc_name),
            startup_hooks=_collect_hooks(c, "startup"),
            shutdown_hooks=_collect_hooks(c, "shutdown"),
            dependencies={k: v for k, v in _members(c) if isinstance(v, Dependency)},
            deployment_hooks=_collect_hooks(c, "deployment"),
            ready_hooks=_ready_hooks(c),
            asgi_apps=tuple(c.__dict__.get(_MOUNTS_ATTR, ())),
        )
        _check_mounts(svc_name, spec.apis, spec.asgi_apps)
        setattr(c, SERVICE_ATTR, spec)
        return c

    if cls is not None:
        return decorate(cls)
    return decorate


def get_spec_or_none(cls: Any) -> ServiceSpec | None:
    spec = getattr(cls, SERVICE_ATTR, None)
    # A subclass of a service inherits the attribute; only the decorated class itself owns it.
    return spec if isinstance(spec, ServiceSpec) and spec.cls is cls else None


def get_spec(cls: Any) -> ServiceSpec:
    spec = get_spec_or_none(cls)
    if spec is None:
        raise ServiceDefinitionError(f"{cls!r} is not a service: decorate the class with @bento_like.service")
    return spec


def _members(c: type) -> list[tuple[str, Any]]:
    seen: dict[str, Any] = {}
    for klass in reversed(c.__mro__[:-1]):
        seen.update(vars(klass))
    return list(seen.items())


def _collect_apis(c: type, svc_name: str) -> tuple[APIEntry, ...]:
    entries: list[APIEntry] = []
    routes: dict[str, str] = {}
    names: dict[str, str] = {}
    for attr, value in _members(c):
        config = get_api_config(value)
        if config is None:
            continue
        if config.route in routes:
            raise ServiceDefinitionError(
                f"service {svc_name!r}: route {config.route!r} is declared by both {routes[config.route]!r} and "
                f"{attr!r}; give one of them another route=..."
            )
        if config.name in names:
            raise ServiceDefinitionError(
                f"service {svc_name!r}: API name {config.name!r} is used by both {names[config.name]!r} and {attr!r}"
            )
        if config.route in RESERVED_ROUTES or config.route.startswith(("/v2/", "/docs/")):
            raise ServiceDefinitionError(
                f"service {svc_name!r}: route {config.route!r} of {attr!r} is reserved by the server; pick another"
            )
        routes[config.route] = attr
        names[config.name] = attr
        entries.append(APIEntry(attr=attr, config=config))
    for entry in entries:  # a task's own routes (/<route>/submit, ...) must not shadow another API's
        if entry.config.task:
            for sub in TASK_ROUTES:
                clash = routes.get(entry.config.route + "/" + sub)
                if clash is not None:
                    raise ServiceDefinitionError(
                        f"service {svc_name!r}: route {entry.config.route}/{sub!s} of {clash!r} is taken by the task "
                        f"{entry.attr!r} (its {sub} route); give one of them another route=..."
                    )
    if not entries:
        raise ServiceDefinitionError(f"service {svc_name!r} declares no API: decorate at least one method with @api or @task")
    return tuple(entries)


TASK_ROUTES = ("submit", "status", "get", "cancel", "retry")
"""What a task's route is followed by for its task routes (docs/tasks.md)."""

RESERVED_ROUTES = {"/", "/livez", "/readyz", "/metrics", "/openapi.json", "/docs", "/v2"}


def _ready_hooks(c: type) -> tuple[str, ...]:
    """The ``@on_ready`` methods, and ``__is_ready__`` (BentoML's name for the same check)."""
    hooks = _collect_hooks(c, "ready")
    if callable(getattr(c, "__is_ready__", None)) and "__is_ready__" not in hooks:
        hooks += ("__is_ready__",)
    return hooks


def _collect_hooks(c: type, kind: str) -> tuple[str, ...]:
    def hook(value: Any) -> Any:
        return value.__func__ if isinstance(value, staticmethod) else value

    return tuple(attr for attr, value in _members(c) if getattr(hook(value), HOOK_ATTR, None) == kind)


def _unknown(svc_name: str, what: str, given: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(given) - allowed)
    if unknown:
        raise ServiceDefinitionError(
            f"service {svc_name!r}: unknown {what} key(s) {', '.join(map(repr, unknown))}; "
            f"allowed: {', '.join(sorted(allowed))}"
        )


# Kubernetes quantities, as resources are written in manifests (and in BentoML services): "200m", "2Gi", "1e9".
_CPU = re.compile(r"(?P<number>\d+(?:\.\d+)?|\.\d+)(?P<milli>m?)")
_MEMORY = re.compile(r"(?:\d+(?:\.\d+)?|\.\d+)(?:[eE]\d+|[KMGTPE]i|[kMGTPE]|m)?")


def _resources(svc_name: str, given: dict[str, Any]) -> Resources:
    _unknown(svc_name, "resources", given, RESOURCE_KEYS)
    gpu = given.get("gpu", 0)
    if isinstance(gpu, str) and gpu.strip().isdigit():
        gpu = int(gpu)
    if not isinstance(gpu, int) or isinstance(gpu, bool) or gpu < 0:
        raise ServiceDefinitionError(
            f"service {svc_name!r}: resources.gpu must be a whole number of GPUs >= 0 (1 or \"1\"), got {gpu!r}")
    cpu = given.get("cpu")
    if isinstance(cpu, str):
        match = _CPU.fullmatch(cpu.strip())
        if match is None:
            raise ServiceDefinitionError(
                f"service {svc_name!r}: resources.cpu must be a number of cores or a quantity such as \"500m\" "
                f"or \"2\", got {cpu!r}")
        cpu = float(match["number"]) / (1000 if match["milli"] else 1)
    if cpu is not None and (not isinstance(cpu, (int, float)) or isinstance(cpu, bool) or cpu <= 0):
        raise ServiceDefinitionError(f"service {svc_name!r}: resources.cpu must be a number > 0, got {cpu!r}")
    memory = given.get("memory")
    if isinstance(memory, int) and not isinstance(memory, bool) and memory > 0:
        memory = str(memory)  # bytes, as Kubernetes reads a bare number
    if memory is not None and (not isinstance(memory, str) or not _MEMORY.fullmatch(memory.strip())):
        raise ServiceDefinitionError(
            f"service {svc_name!r}: resources.memory must be bytes or a quantity such as \"512Mi\" or \"2Gi\", "
            f"got {memory!r}")
    return Resources(cpu=cpu, memory=memory.strip() if memory else None, gpu=gpu, gpu_type=given.get("gpu_type"))


def _traffic(svc_name: str, given: dict[str, Any]) -> Traffic:
    _unknown(svc_name, "traffic", given, TRAFFIC_KEYS)
    timeout = given.get("timeout", Traffic.timeout)
    if not isinstance(timeout, (int, float)) or timeout <= 0:
        raise ServiceDefinitionError(f"service {svc_name!r}: traffic.timeout must be seconds > 0, got {timeout!r}")
    values: dict[str, Any] = {"timeout": float(timeout)}
    for key in ("max_concurrency", "max_queue", "max_body_size"):
        if given.get(key) is not None:
            values[key] = _positive_int(svc_name, f"traffic.{key}", given[key])
    return Traffic(**values)


def _positive_int(svc_name: str, key: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ServiceDefinitionError(f"service {svc_name!r}: {key} must be an int >= 1, got {value!r}")
    return value


def _envs(svc_name: str, envs: dict[str, str] | list[dict[str, str]] | None) -> dict[str, str]:
    if envs is None:
        return {}
    if isinstance(envs, dict):
        items = list(envs.items())
    else:
        try:
            items = [(e["name"], e.get("value", "")) for e in envs]
        except (TypeError, KeyError):
            raise ServiceDefinitionError(
                f"service {svc_name!r}: envs is a dict or a list of {{'name': ..., 'value': ...}}"
            ) from None
    return {str(k): str(v) for k, v in items}
