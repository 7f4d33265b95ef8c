"""Running one batch: its requests' inputs concatenated, the method called where placement says, the result
split back by each request's item count; a batch that raises is bisected so only the failing requests fail."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any, Awaitable, Callable

import numpy as np

from ...sdk.api import APIConfig
from ..errors import HTTPError
from ..instances import Generation, Instance
from ..metrics import Registry

log = logging.getLogger("bento_like.serving")


class Pending:
    """One queued request: its input, its item count, the future its answer goes to."""

    __slots__ = ("value", "items", "future", "arrival", "deadline", "dead", "version")

    def __init__(self, value: Any, items: int, future: asyncio.Future[Any], arrival: float, deadline: float) -> None:
        self.value = value
        self.items = items
        self.future = future
        self.arrival = arrival
        self.deadline = deadline
        self.dead = False  # taken off the queue's books (run, expired or abandoned)
        self.version = ""  # the model version of the batch it ran in


class Lane:
    """The batches one instance runs for an API, in the order they were handed to its batch thread. The thread
    records how many it started (``started``, a plain int the loop reads at once), so the dispatcher knows
    what still waits on the thread without waiting for the busy loop to hear that a batch ended."""

    def __init__(self) -> None:
        self.handed = 0  # batches handed to the thread so far
        self.started = 0  # of those, how many the thread began (written by the thread)
        self.batches: list[tuple[int, int, asyncio.Task[None]]] = []  # (number, items, task), not yet heard done

    def waiting_items(self) -> int:
        """Items in batches handed to the thread that it has not begun."""
        started = self.started
        return sum(items for number, items, _ in self.batches if number >= started)


class BatchMetrics:
    """The batching histograms of one API."""

    def __init__(self, registry: Registry, api: str) -> None:
        labels = (api,)
        self._size = lambda n: registry.batch_size.observe(labels, n)
        self._wait = lambda s: registry.queue_wait.observe(labels, s)
        self._run = lambda s: registry.execution.observe(labels, s)

    def queue_wait(self, seconds: float) -> None:
        self._wait(seconds)

    def executed(self, items: int, seconds: float) -> None:
        self._size(items)
        self._run(seconds)


class BatchRunner:
    """Runs batches of one API on instances. ``observe(items, seconds, on_loop)`` hears every successful
    execution, timed where it ran (on a busy event loop, timing from the loop would count the loop's delay in
    noticing that the batch ended as execution)."""

    def __init__(self, config: APIConfig, attr: str, is_async: bool, metrics: BatchMetrics,
                 observe: Callable[[int, float, bool], None]) -> None:
        self.config = config
        self.attr = attr
        self.is_async = is_async
        self.metrics = metrics
        self.observe = observe
        self.in_dim = config.input_batch_dim
        self.out_dim = config.output_batch_dim
        self._loop_threads_limited = False

    async def execute(self, instance: Instance, batch: list[Pending], on_loop: bool = False,
                      lane: Lane | None = None, number: int = 0) -> None:
        """Run ``batch`` on ``instance``: on the event loop's thread (``on_loop``, a sync method), else a sync
        method on the instance's batch thread (as batch ``number`` of ``lane``), an async one here."""
        live = [p for p in batch if not p.future.done()]
        if not live:  # every request of it expired or left: it never reaches the thread
            if lane is not None:
                lane.started = max(lane.started, number + 1)
            return
        sizes = [p.items for p in live]
        total = sum(sizes)
        # The objects this batch runs on, bound now: a model swap from here on changes the next batch, not this one.
        gen = instance.generation
        if gen is None or instance.obj is None:  # a replace-mode swap holds the instance
            gen = await instance.serving()
        gen.enter()
        try:
            inputs = live[0].value if len(live) == 1 else concat([p.value for p in live], self.in_dim)
            result, seconds = await self.call(instance, inputs, on_loop, lane, number, gen)
            parts = self.split(result, sizes)
        except Exception as exc:
            if len(live) == 1:
                _fail(live[0], exc, self.config.name)
                return
            log.warning("batch of %d requests to %r failed (%s); bisecting", len(live), self.config.name, exc)
            mid = len(live) // 2
            await self.execute(instance, live[:mid], on_loop)
            await self.execute(instance, live[mid:], on_loop)
            return
        finally:
            gen.leave()
        self.observe(total, seconds, on_loop)
        self.metrics.executed(total, seconds)
        label = gen.label
        for p, part in zip(live, parts):
            if not p.future.done():
                p.version = label
                p.future.set_result(part)

    def call(self, instance: Instance, inputs: Any, on_loop: bool = False, lane: Lane | None = None,
             number: int = 0, generation: Generation | None = None) -> Awaitable[tuple[Any, float]]:
        """The result of the method (of ``generation``'s object, by default the one serving) on ``inputs`` and
        the seconds it took, as an awaitable."""
        method = getattr(generation.obj if generation is not None else instance.obj, self.attr)
        if self.is_async:
            if lane is not None:  # it runs here and now: nothing of it waits on a thread
                lane.started = max(lane.started, number + 1)
            return _timed_async(method(inputs))
        if not on_loop:
            return instance.batch_runner.submit(_timed, method, inputs, lane, number)
        if not self._loop_threads_limited:
            instance.limit_threads()  # torch's intra-op threads, for calls made from the loop's thread
            self._loop_threads_limited = True
        done = asyncio.get_running_loop().create_future()
        done.set_result(_timed(method, inputs))
        return done

    def split(self, result: Any, sizes: list[int]) -> list[Any]:
        """One part of ``result`` per request, ``sizes[i]`` items each, along the output's batch dimension."""
        if len(sizes) == 1:
            return [result]
        total = sum(sizes)
        name = self.config.name
        if isinstance(result, np.ndarray):
            if result.ndim <= self.out_dim or result.shape[self.out_dim] != total:
                raise ValueError(
                    f"API {name!r} returned shape {result.shape} for a batch of {total} along dimension "
                    f"{self.out_dim}; a batchable API returns one result per input item"
                )
            return np.split(result, np.cumsum(sizes)[:-1], axis=self.out_dim)
        if isinstance(result, (list, tuple)) and len(result) == total:
            out, start = [], 0
            for n in sizes:
                out.append(list(result[start : start + n]))
                start += n
            return out
        raise ValueError(
            f"API {name!r} returned {type(result).__name__} for a batch of {total}; a batchable API returns an "
            "array or list with one result per input item"
        )

    def count_items(self, value: Any) -> int:
        """How many items a request's input holds along the batch dimension."""
        if isinstance(value, np.ndarray):
            if value.ndim <= self.in_dim:
                raise HTTPError(
                    422,
                    f"API {self.config.name!r} batches along dimension {self.in_dim}, but the input has only "
                    f"{value.ndim} dimension(s) (shape {value.shape}); send a batch, e.g. [[...]] for one item",
                    field=f"$.{self.config.params[0]}",
                )
            return int(value.shape[self.in_dim])
        if isinstance(value, (list, tuple)):
            return len(value)
        raise HTTPError(500, f"batchable API {self.config.name!r} got a {type(value).__name__}; batch inputs are arrays or lists")

    def slice(self, value: Any, start: int, stop: int) -> Any:
        if isinstance(value, np.ndarray):
            index = [slice(None)] * value.ndim
            index[self.in_dim] = slice(start, stop)
            return value[tuple(index)]
        return value[start:stop]


def concat(values: list[Any], dim: int) -> Any:
    if isinstance(values[0], np.ndarray):
        return np.concatenate(values, axis=dim)
    out: list[Any] = []
    for v in values:
        out.extend(v)
    return out


def _timed(method: Any, inputs: Any, lane: Lane | None = None, number: int = 0) -> tuple[Any, float]:
    if lane is not None:
        lane.started = max(lane.started, number + 1)  # read by the loop: this batch left the thread's queue
    started = time.perf_counter()
    result = method(inputs)
    return result, time.perf_counter() - started


async def _timed_async(call: Any) -> tuple[Any, float]:
    started = time.perf_counter()
    result = await call
    return result, time.perf_counter() - started


def _fail(pending: Pending, exc: Exception, api: str) -> None:
    if pending.future.done():
        return
    if isinstance(exc, HTTPError):
        pending.future.set_exception(exc)
        return
    error_id = uuid.uuid4().hex[:12]
    log.error("error %s in API %r", error_id, api, exc_info=exc)
    pending.future.set_exception(
        HTTPError(
            500,
            f"API {api!r} raised an exception on this input (error id {error_id}); the server log has the traceback",
            error_id=error_id,
        )
    )
