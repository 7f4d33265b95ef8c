"""Every setting of the serving runtime that the service's declaration does not hold: one frozen, validated
object, read from the environment once per server and handed to each worker with its other settings.

The environment knobs (``BENTO_LIKE_INLINE_MS``, ``BENTO_LIKE_COMPUTE_THREADS``, ``BENTO_LIKE_BATCH_PRIORITY``,
``BENTO_LIKE_SWITCH_INTERVAL_MS``) are read here and nowhere else in the runtime, as is the little the server's
own processes tell each other through the environment. The other fields are the constants the batching
policy and the placement of calls work with; each is documented where it is declared, and docs/batching.md
says which simulated scenario needs it. Tests and the simulator build their own ``Tuning`` to vary them.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import msgspec

ENV_PREFIX = "BENTO_LIKE_"
RELOAD_ENV = ENV_PREFIX + "SERVE"
"""How ``pkg serve --reload`` hands its settings to the process uvicorn's reloader starts."""


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


class Tuning(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    batching: BatchTuning = msgspec.field(default_factory=BatchTuning)
    placement: PlacementTuning = msgspec.field(default_factory=PlacementTuning)
    batch_priority: int = 10
    """``BENTO_LIKE_BATCH_PRIORITY``: nice steps batch threads get above the process's other threads (0: off)."""
    switch_interval_ms: float = 1.0
    """``BENTO_LIKE_SWITCH_INTERVAL_MS``: the interpreter's GIL switch interval (0 keeps Python's own)."""
    watchdog_interval_s: float = 0.05
    """How often deadlines and disconnects are checked (they are honoured to within it) and the event loop's
    lag sampled."""

    def __post_init__(self) -> None:
        if not 0 <= self.batch_priority <= 39:
            raise ValueError(f"batch_priority must be between 0 and 39 nice steps, got {self.batch_priority}")
        _at_least(self, 0.0, "switch_interval_ms")
        _positive(self, "watchdog_interval_s")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Tuning:
        """The defaults, with the ``BENTO_LIKE_`` knobs set in ``environ`` (``os.environ`` by default); a bad
        value raises ValueError naming the variable and what it takes."""
        env = os.environ if environ is None else environ
        placement: dict[str, Any] = {}
        top: dict[str, Any] = {}
        for name, (target, field, parse, what) in _KNOBS.items():
            raw = env.get(ENV_PREFIX + name)
            if raw is None or raw.strip() == "":
                continue
            try:
                value = parse(raw)
            except ValueError:
                raise SettingsError(f"{ENV_PREFIX}{name} must be {what}, got {raw!r}") from None
            (placement if target == "placement" else top)[field] = value
        try:
            return cls(placement=PlacementTuning(**placement), **top)
        except ValueError as exc:
            names = {field: ENV_PREFIX + name for name, (_, field, _, _) in _KNOBS.items()}
            message = str(exc)
            for field, env_name in names.items():
                if message.startswith(field + " "):
                    message = env_name + message[len(field):]
            raise SettingsError(message) from None


_KNOBS: dict[str, tuple[str, str, Any, str]] = {
    "INLINE_MS": ("placement", "inline_ms", float, "a number of milliseconds"),
    "COMPUTE_THREADS": ("placement", "compute_threads", int, "an integer number of threads"),
    "BATCH_PRIORITY": ("top", "batch_priority", int, "an integer number of nice steps"),
    "SWITCH_INTERVAL_MS": ("top", "switch_interval_ms", float, "a number of milliseconds"),
}


def hand_to_reloaded(settings: bytes) -> None:
    """Leave ``settings`` for the process the reloader starts (it inherits the environment)."""
    os.environ[RELOAD_ENV] = settings.decode()


def from_reloader() -> bytes:
    """The settings ``hand_to_reloaded`` left, in the process the reloader started."""
    return os.environ[RELOAD_ENV].encode()
