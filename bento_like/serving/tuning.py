"""Every setting of the serving runtime that the service's declaration does not hold: one frozen, validated
object, read from the environment once per server and handed to each worker with its other settings.

The environment knobs (``BENTO_LIKE_INLINE_MS``, ``BENTO_LIKE_COMPUTE_THREADS``, ``BENTO_LIKE_BATCH_PRIORITY``,
``BENTO_LIKE_SWITCH_INTERVAL_MS``, the connection deadlines and limits of ``HTTPTuning``, the task store's
settings of ``TaskTuning`` and where a bento's models come from, ``BENTO_LIKE_MODELS_DIR``) are read here and
nowhere else in the runtime, as is the little the server's own processes tell each other through the
environment. The other fields are the constants the batching policy and the placement of calls work with; each
is documented where it is declared, and docs/batching.md says which simulated scenario needs it. Tests and the simulator build their own ``Tuning`` to vary them.
"""

from __future__ import annotations

import math
import os
from typing import Any, Mapping

import msgspec

ENV_PREFIX = "BENTO_LIKE_"
RELOAD_ENV = ENV_PREFIX + "SERVE"
STATE_DIR_ENV = ENV_PREFIX + "STATE_DIR"
"""Where a server keeps its state (task results): named in the errors of the task store."""
"""How ``pkg serve --reload`` hands its settings to the process uvicorn's reloader starts."""


KUBERNETES_ENV = "KUBERNETES_SERVICE_HOST"
KUBERNETES_DRAIN_S = 5.0
"""The drain delay in a Kubernetes pod unless set: kube-proxy and ingress controllers take a few seconds to see
that a terminating pod left the Service's endpoints, and route requests to it meanwhile."""


class SettingsError(ValueError):
    """A runtime setting (an environment knob) has a value it cannot take; the message names it."""


def _positive(obj: Any, *fields: str) -> None:
    for f in fields:
        if not getattr(obj, f) > 0:
            raise ValueError(f"{f} must be > 0, got {getattr(obj, f)}")


def _at_least(obj: Any, low: float, *fields: str) -> None:
    for f in fields:
        if not getattr(obj, f) >= low:
            raise ValueError(f"{f} must not be below {low:g}, got {getattr(obj, f)}")


def _fraction(obj: Any, *fields: str) -> None:
    for f in fields:
        if not 0 < getattr(obj, f) <= 1:
            raise ValueError(f"{f} must be in (0, 1], got {getattr(obj, f)}")


class BatchTuning(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The constants of the batching policy (serving/batching/policy.py) and of what it learns from."""

    latency_alpha: float = 0.2
    """How fast the load factor shared by all batch sizes follows a slowdown (EWMA weight per batch)."""
    shape_alpha: float = 0.05
    """How fast one batch size's own time follows its observations (EWMA weight per batch of that size)."""
    traffic_alpha: float = 0.2
    """EWMA weight of the learned delays from a batch's end to its clients' return."""
    echo_wait: float = 2.0
    """The clients of the last batch are awaited up to this many times as long as they took to come back
    before: the first of them, and all of them."""
    echo_horizon_s: float = 0.1
    """A client back later than this after its batch ended is not one of a closed loop: not learned."""
    lone_quiet_s: float = 0.1
    """A request is lone (runs at once, without the dispatcher) only if the last batch's clients are all
    back, or none came back for this long."""

    def __post_init__(self) -> None:
        _positive(self, "echo_horizon_s", "lone_quiet_s")
        _fraction(self, "latency_alpha", "shape_alpha", "traffic_alpha")
        _at_least(self, 0.0, "echo_wait")


class PlacementTuning(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Where calls run (serving/placement.py): the event loop's thread, request threads or a batch thread."""

    inline_ms: float = 1.0
    """``BENTO_LIKE_INLINE_MS``: a non-batched sync call known to take at most this long (capped at
    ``direct_inline_max_ms``) runs on the event loop's thread; 0 keeps every call, batches included, off it."""
    direct_inline_max_ms: float = 1.0
    """The cap on ``inline_ms`` for non-batched calls: a longer call holds every other request unread."""
    inline_after_calls: int = 32
    """Calls of a non-batched API seen on threads, all fast, before its lone calls may run inline."""
    inline_batch_ms: float = 20.0
    """A lone batch predicted to take at most this long (and ``inline_budget_share`` of max_latency_ms)
    may run on the event loop's thread."""
    inline_budget_share: float = 0.25
    """... a request arriving meanwhile waits unread for that long."""
    inline_abort_factor: float = 4.0
    """A lone inline batch that took this many times the limit above (an input the model is slow on) stops
    inlining for the API for good."""
    quiet_s: float = 0.1
    """A batch runs inline only if the server held no two requests at once for this long."""
    compute_threads: int = 0
    """``BENTO_LIKE_COMPUTE_THREADS``: torch's intra-op threads per CPU instance; 0 shares the cores among the
    CPU instances of all workers."""
    request_threads: int = 4
    """Threads per instance for non-batched sync calls (calls beyond them wait for one)."""

    def __post_init__(self) -> None:
        _at_least(self, 0.0, "inline_ms", "direct_inline_max_ms", "inline_batch_ms")
        _fraction(self, "inline_budget_share")
        _at_least(self, 1.0, "inline_abort_factor")
        _positive(self, "quiet_s")
        _at_least(self, 0, "inline_after_calls", "compute_threads")
        _at_least(self, 1, "request_threads")


class HTTPTuning(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The deadlines and limits of the server's connections (serving/protocol.py, serving/workers.py): what a
    slow, idle or abandoned client may hold, and for how long, and how a stop drains."""

    header_timeout_s: float = 10.0
    """``BENTO_LIKE_HEADER_TIMEOUT_S``: a request's headers must arrive whole this long after its first byte
    (or after the connection opened): a total, so a client that sends a header line now and then is cut off
    too. Past it: 408 and the connection closed."""
    body_timeout_s: float = 30.0
    """``BENTO_LIKE_BODY_TIMEOUT_S``: a request's body must arrive whole this long after its headers. The body
    is read before the request reaches its API, so a slow body holds a connection, never a slot of the API."""
    keep_alive_s: float = 5.0
    """``BENTO_LIKE_KEEP_ALIVE_S``: an open connection between requests is closed after this long idle."""
    body_buffer_mib: float = 256.0
    """``BENTO_LIKE_BODY_BUFFER_MIB``: request bodies read ahead of their API, all connections together; past it
    a connection's reading waits for room (its body deadline still runs). A body alone always gets through."""
    max_connections: int = 2048
    """``BENTO_LIKE_MAX_CONNECTIONS``: open connections per process. A connection past it closes the oldest
    one that has no request running (idle, or still sending its request); with none such, it gets 503."""
    drain_s: float = 0.0
    """``BENTO_LIKE_DRAIN_S``: on SIGTERM, /readyz answers 503 at once and requests are still served this
    long (for a load balancer to stop sending any) before the port closes. Unset, it is ``KUBERNETES_DRAIN_S``
    in a Kubernetes pod (where endpoints take seconds to drop a terminating pod) and 0 elsewhere."""

    def __post_init__(self) -> None:
        positive = ("header_timeout_s", "body_timeout_s", "keep_alive_s", "body_buffer_mib")
        _positive(self, *positive)
        _at_least(self, 1, "max_connections")
        _at_least(self, 0.0, "drain_s")
        for f in (*positive, "drain_s"):
            if not math.isfinite(getattr(self, f)):
                raise ValueError(f"{f} must be a finite number, got {getattr(self, f)}")


class TaskTuning(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Where task records and results are kept and for how long (serving/tasks.py, docs/tasks.md)."""

    state_dir: str = ""
    """``BENTO_LIKE_STATE_DIR``: the server's state directory; tasks live in ``<state_dir>/<service>/tasks``.
    Empty: ``$BENTO_LIKE_HOME/state`` (``~/.bento_like/state``)."""
    result_ttl_s: float = 3600.0
    """``BENTO_LIKE_TASK_RESULT_TTL_S``: a finished task (its result or error) is kept this long, then forgotten."""
    max_results: int = 10000
    """``BENTO_LIKE_TASK_MAX_RESULTS``: finished tasks kept per service; past it the oldest are forgotten first."""
    timeout_s: float = 0.0
    """``BENTO_LIKE_TASK_TIMEOUT_S``: how long one task may run; 0: the service's timeout (traffic.timeout)."""

    def __post_init__(self) -> None:
        _positive(self, "result_ttl_s")
        _at_least(self, 1, "max_results")
        _at_least(self, 0.0, "timeout_s")

    def directory(self, service: str) -> str:
        """Where the tasks of ``service`` are kept."""
        root = self.state_dir or os.path.join(os.environ.get("BENTO_LIKE_HOME") or "~/.bento_like", "state")
        return os.path.join(os.path.expanduser(root), service, "tasks")


class UpdateTuning(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """How the models of a running server are changed (serving/repository.py, docs/updates.md)."""

    admin: bool = False
    """``BENTO_LIKE_ADMIN`` (``pkg serve --admin``): serve the repository API (``/v2/repository/...``: load,
    unload, index), which needs ``admin_token``."""
    admin_token: str = ""
    """``BENTO_LIKE_ADMIN_TOKEN``: the bearer token every repository API call must carry (never logged)."""
    watch_s: float = 0.0
    """``BENTO_LIKE_WATCH_MODELS_S`` (``pkg serve --watch-models``): how often the model store is polled for a
    new version of a ``name:latest`` (or other tag) reference, swapped in when found; 0: not watched."""
    swap_mode: str = "beside"
    """``BENTO_LIKE_SWAP_MODE`` (``pkg serve --swap-mode``): ``beside`` loads a new version next to the serving
    one (refused when the device's memory cannot hold both); ``replace`` releases the old one first, a short
    pause in serving on each instance in turn."""

    def __post_init__(self) -> None:
        _at_least(self, 0.0, "watch_s")
        if self.swap_mode not in ("beside", "replace"):
            raise ValueError(f"swap_mode must be 'beside' or 'replace', got {self.swap_mode!r}")
        if self.admin and not self.admin_token:
            raise ValueError("admin needs a token: set BENTO_LIKE_ADMIN_TOKEN (the repository API changes what "
                             "is served; it is never open to anyone who can reach the port)")

    def __repr__(self) -> str:  # the token stays out of logs and tracebacks
        token = "'***'" if self.admin_token else "''"
        return (f"UpdateTuning(admin={self.admin!r}, admin_token={token}, watch_s={self.watch_s!r}, "
                f"swap_mode={self.swap_mode!r})")


class Tuning(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    batching: BatchTuning = msgspec.field(default_factory=BatchTuning)
    placement: PlacementTuning = msgspec.field(default_factory=PlacementTuning)
    http: HTTPTuning = msgspec.field(default_factory=HTTPTuning)
    tasks: TaskTuning = msgspec.field(default_factory=TaskTuning)
    updates: UpdateTuning = msgspec.field(default_factory=UpdateTuning)
    batch_priority: int = 10
    """``BENTO_LIKE_BATCH_PRIORITY``: nice steps batch threads get above the process's other threads (0: off)."""
    switch_interval_ms: float = 1.0
    """``BENTO_LIKE_SWITCH_INTERVAL_MS``: the interpreter's GIL switch interval (0 keeps Python's own)."""
    watchdog_interval_s: float = 0.05
    """How often deadlines and disconnects are checked (they are honoured to within it) and the event loop's
    lag sampled."""
    dependency_start_s: float = 600.0
    """``BENTO_LIKE_DEPENDENCY_START_S``: how long a separately-run dependency may take to turn ready (its models
    loaded, its warm-up run) before ``pkg serve`` gives up on it, naming it and its log."""
    models_dir: str = ""
    """``BENTO_LIKE_MODELS_DIR`` (``pkg serve --models``): a served bento's models are read from this directory
    (the model store's layout, e.g. a KServe modelcar's at /mnt/models), checked against the digests its
    manifest records, instead of from the bento. Empty: the bento's own."""
    models_wait_s: float = 60.0
    """``BENTO_LIKE_MODELS_WAIT_S``: how long ``pkg serve`` waits for ``models_dir`` to appear: KServe's modelcar
    links it beside the server, possibly just after the server starts."""
    reload_timeout_s: float = 300.0
    """``BENTO_LIKE_RELOAD_TIMEOUT_S``: how long a rolling reload (SIGHUP, or a new version under ``--follow``)
    waits for every worker of the new generation to turn ready before it gives up and keeps the old one."""
    follow_interval_s: float = 2.0
    """``BENTO_LIKE_FOLLOW_INTERVAL_S``: how often ``pkg serve --follow NAME`` asks the bento store what
    NAME:latest is."""

    def __post_init__(self) -> None:
        if not 0 <= self.batch_priority <= 39:
            raise ValueError(f"batch_priority must be between 0 and 39 nice steps, got {self.batch_priority}")
        _at_least(self, 0.0, "switch_interval_ms", "models_wait_s")
        _positive(self, "watchdog_interval_s", "dependency_start_s", "reload_timeout_s", "follow_interval_s")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Tuning:
        """The defaults, with the ``BENTO_LIKE_`` knobs set in ``environ`` (``os.environ`` by default); a bad
        value raises ValueError naming the variable and what it takes."""
        env = os.environ if environ is None else environ
        parts: dict[str, dict[str, Any]] = {"placement": {}, "http": {}, "tasks": {}, "updates": {}, "top": {}}
        if env.get(KUBERNETES_ENV):  # every pod has it; the explicit knob below still wins
            parts["http"]["drain_s"] = KUBERNETES_DRAIN_S
        for name, (target, field, parse, what) in _KNOBS.items():
            raw = env.get(ENV_PREFIX + name)
            if raw is None or raw.strip() == "":
                continue
            try:
                value = parse(raw)
            except ValueError:
                raise SettingsError(f"{ENV_PREFIX}{name} must be {what}, got {raw!r}") from None
            parts[target][field] = value
        try:
            placement, http = PlacementTuning(**parts["placement"]), HTTPTuning(**parts["http"])
            return cls(placement=placement, http=http, tasks=TaskTuning(**parts["tasks"]),
                       updates=UpdateTuning(**parts["updates"]), **parts["top"])
        except ValueError as exc:
            names = {field: ENV_PREFIX + name for name, (_, field, _, _) in _KNOBS.items()}
            message = str(exc)
            for field, env_name in names.items():
                if message.startswith(field + " "):
                    message = env_name + message[len(field):]
            raise SettingsError(message) from None


def _flag(raw: str) -> bool:
    value = raw.strip().lower()
    if value not in ("1", "0", "true", "false", "yes", "no"):
        raise ValueError(raw)
    return value in ("1", "true", "yes")


def _finite(raw: str) -> float:
    value = float(raw)
    if not math.isfinite(value):  # an infinite deadline or drain would never end
        raise ValueError(raw)
    return value


_KNOBS: dict[str, tuple[str, str, Any, str]] = {
    "INLINE_MS": ("placement", "inline_ms", float, "a number of milliseconds"),
    "COMPUTE_THREADS": ("placement", "compute_threads", int, "an integer number of threads"),
    "BATCH_PRIORITY": ("top", "batch_priority", int, "an integer number of nice steps"),
    "SWITCH_INTERVAL_MS": ("top", "switch_interval_ms", float, "a number of milliseconds"),
    "HEADER_TIMEOUT_S": ("http", "header_timeout_s", _finite, "a number of seconds"),
    "BODY_TIMEOUT_S": ("http", "body_timeout_s", _finite, "a number of seconds"),
    "KEEP_ALIVE_S": ("http", "keep_alive_s", _finite, "a number of seconds"),
    "BODY_BUFFER_MIB": ("http", "body_buffer_mib", _finite, "a number of MiB"),
    "MAX_CONNECTIONS": ("http", "max_connections", int, "an integer number of connections"),
    "DRAIN_S": ("http", "drain_s", _finite, "a number of seconds"),
    "STATE_DIR": ("tasks", "state_dir", str, "a directory"),
    "TASK_RESULT_TTL_S": ("tasks", "result_ttl_s", _finite, "a number of seconds"),
    "TASK_MAX_RESULTS": ("tasks", "max_results", int, "an integer number of tasks"),
    "TASK_TIMEOUT_S": ("tasks", "timeout_s", _finite, "a number of seconds"),
    "DEPENDENCY_START_S": ("top", "dependency_start_s", _finite, "a number of seconds"),
    "MODELS_DIR": ("top", "models_dir", str, "a directory"),
    "MODELS_WAIT_S": ("top", "models_wait_s", _finite, "a number of seconds"),
    "ADMIN": ("updates", "admin", _flag, "1 or 0"),
    "ADMIN_TOKEN": ("updates", "admin_token", str, "a token"),
    "WATCH_MODELS_S": ("updates", "watch_s", _finite, "a number of seconds"),
    "SWAP_MODE": ("updates", "swap_mode", str, "beside or replace"),
    "RELOAD_TIMEOUT_S": ("top", "reload_timeout_s", _finite, "a number of seconds"),
    "FOLLOW_INTERVAL_S": ("top", "follow_interval_s", _finite, "a number of seconds"),
}


def knob(field: str) -> str:
    """The environment variable that sets ``field`` (for messages that tell how to change it)."""
    return next(ENV_PREFIX + name for name, (_, f, _, _) in _KNOBS.items() if f == field)


def hand_to_reloaded(settings: bytes) -> None:
    """Leave ``settings`` for the process the reloader starts (it inherits the environment)."""
    os.environ[RELOAD_ENV] = settings.decode()


def from_reloader() -> bytes:
    """The settings ``hand_to_reloaded`` left, in the process the reloader started."""
    return os.environ[RELOAD_ENV].encode()
