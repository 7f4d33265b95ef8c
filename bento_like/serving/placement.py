"""Where every call runs: which device each instance lives on, how many compute threads it gets, and for each
call the event loop's own thread, one of the instance's request threads, or its batch thread.

- ``async def`` methods run on the event loop (in the request's task), batched or not.
- A batch of a sync method runs on the instance's one batch thread (always the same one, so the model's
  buffers and caches stay warm), except a lone batch short enough to run on the loop's thread
  (``BatchPlacement``): the hand-off to the thread and back (two cross-CPU wake-ups) then costs more than it
  saves.
- A call of a non-batched sync method runs on one of the instance's request threads, except when every call of
  the API so far has been well under a millisecond and the instance has nothing else running
  (``DirectPlacement``).

A call on the loop's thread holds every other request unread while it runs, hence the limits: one CPU instance
only (nothing kept from work elsewhere), predicted short, and the server alone with the request.
"""

from __future__ import annotations

import enum
import logging
import math
import os
import time

from ..sdk.service import ServiceSpec
from .tuning import PlacementTuning

log = logging.getLogger("bento_like.serving")


class Where(enum.Enum):
    LOOP = "the event loop's thread"
    REQUEST_THREAD = "a request thread of the instance"
    BATCH_THREAD = "the instance's batch thread"


def plan_devices(spec: ServiceSpec) -> list[str]:
    """One device string per instance: ``cuda:i`` for GPU services when GPUs exist, else ``cpu``."""
    gpus = spec.resources.gpu
    count = spec.instances or max(1, gpus)
    if gpus and cuda_count() > 0:
        visible = cuda_count()
        return [f"cuda:{i % visible}" for i in range(count)]
    return ["cpu"] * count


def compute_threads(tuning: PlacementTuning, devices: list[str], workers: int) -> int:
    """torch's intra-op threads per CPU instance: the setting, else the cores shared among the CPU instances
    of every worker, so that instances don't oversubscribe the machine."""
    cpu_instances = max(1, sum(d == "cpu" for d in devices)) * max(1, workers)
    return tuning.compute_threads or max(1, cores() // cpu_instances)


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def cuda_count() -> int:
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "":
        return 0
    try:
        import torch  # imported only for services that ask for GPUs
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


class ServerLoad:
    """How many requests the server holds now, and when it last held two at once: a call may run on the loop's
    thread only when its request is alone, and has been for a while (several clients that happen to leave the
    server empty for a moment are not a lone one)."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.concurrent_at = -math.inf  # time.monotonic() when a request last arrived with another in progress

    def enter(self) -> None:
        self.in_flight += 1
        if self.in_flight > 1:
            self.concurrent_at = time.monotonic()

    def leave(self) -> None:
        self.in_flight -= 1

    def alone(self, now: float, quiet: float) -> bool:
        return self.in_flight == 1 and now - self.concurrent_at >= quiet


class DirectPlacement:
    """Where a non-batched API's calls run. A sync API whose calls have all taken well under a millisecond
    runs a call on the loop's thread when its instance has nothing else running: the hand-off to a request
    thread and back (two cross-CPU wake-ups) costs more than the call. One call slower than that, on a thread
    or inline, turns this off for good for the API."""

    def __init__(self, tuning: PlacementTuning, is_async: bool) -> None:
        self.is_async = is_async
        self.limit = min(tuning.inline_ms, tuning.direct_inline_max_ms) / 1000.0
        self.after = tuning.inline_after_calls
        self.fast_calls = 0  # calls observed, all within the limit; -1 once one was not

    def where(self, instance_in_flight: int) -> Where:
        if self.is_async:
            return Where.LOOP
        if instance_in_flight == 0 and self.fast_calls >= self.after:
            return Where.LOOP
        return Where.REQUEST_THREAD

    @property
    def timing(self) -> bool:
        """Whether calls are still timed (until one is slow)."""
        return self.fast_calls >= 0

    def observe(self, seconds: float) -> None:
        if self.fast_calls >= 0:
            self.fast_calls = self.fast_calls + 1 if seconds <= self.limit else -1


class BatchPlacement:
    """Where a batchable API's batches run: the instance's batch thread, or for a lone batch of a sync method
    of a service with one CPU instance, the loop's thread, when it is predicted to take at most
    ``inline_batch_ms`` and ``inline_budget_share`` of max_latency_ms (what a request arriving meanwhile waits
    unread) and the request is alone. A lone batch that took ``inline_abort_factor`` times that (an input the
    model is slow on) sends every later one to the thread."""

    def __init__(self, tuning: PlacementTuning, api: str, budget: float, devices: list[str], is_async: bool,
                 load: ServerLoad) -> None:
        self.api = api
        one_cpu = devices == ["cpu"]
        allowed = tuning.inline_ms > 0 and one_cpu and not is_async
        self.limit = min(tuning.inline_batch_ms / 1000.0, budget * tuning.inline_budget_share) if allowed else 0.0
        self.abort = tuning.inline_abort_factor
        self.quiet = tuning.quiet_s
        self.load = load
        self.is_async = is_async

    def lone(self, predicted: float | None, now: float) -> Where:
        """Where a lone batch predicted to take ``predicted`` seconds (None: nothing known yet) runs."""
        if self.is_async:
            return Where.LOOP
        if predicted is not None and 0 < self.limit and predicted <= self.limit and self.load.alone(now, self.quiet):
            return Where.LOOP
        return Where.BATCH_THREAD

    def observe_on_loop(self, seconds: float) -> None:
        if seconds > self.abort * self.limit > 0:
            log.info("API %r: a lone batch took %.0f ms on the event loop's thread, over %g ms; batches run on "
                     "instance threads from now on", self.api, seconds * 1000, self.abort * self.limit * 1000)
            self.limit = 0.0
