"""The queue of one batchable API and the tasks that move it: admission when a request comes, the lone path,
a dispatcher that forms batches for free instances, and a feeder per busy instance that hands full batches
on. Every decision is the policy's (policy.py); this module does what it says, with asyncio."""

from __future__ import annotations

import asyncio
import logging
import math
from collections import deque
from time import monotonic as clock
from typing import Any

from ...sdk.api import APIConfig
from ..errors import HTTPError, too_many_requests
from ..instances import Instance, InstancePool, record_version
from ..placement import BatchPlacement, Where
from ..tuning import BatchTuning
from .estimators import anchor_sizes
from .execute import BatchMetrics, BatchRunner, Lane, Pending, concat
from .policy import BatchLimits, BatchPolicy, QueueState

log = logging.getLogger("bento_like.serving")


class Batcher:
    def __init__(self, config: APIConfig, attr: str, is_async: bool, pool: InstancePool, placement: BatchPlacement,
                 metrics: BatchMetrics, max_queue: int, tuning: BatchTuning | None = None) -> None:
        self.config = config
        self.is_async = is_async
        self.pool = pool
        self.placement = placement
        self.metrics = metrics
        limits = BatchLimits(config.name, config.max_batch_size, config.max_latency_ms / 1000.0, max_queue,
                             tuple(config.preferred_batch_sizes), len(pool.instances))
        self.policy = BatchPolicy(limits, tuning)
        self.runner = BatchRunner(config, attr, is_async, metrics, self._executed)
        self.q = QueueState()
        self.queue: deque[Pending] = deque()
        self._lanes: list[Lane] = []  # of the instances this API holds
        self._feeders: deque[tuple[Lane, asyncio.Future[None]]] = deque()  # feeders waiting to hand a batch on
        self._arrived = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def queued_requests(self) -> int:
        return self.q.queued_requests

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._dispatch_forever())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def warm_up(self, example: Any, rounds: int = 3) -> None:
        """Run every instance once, then teach the latency model each anchor size (1, 2, 4 ... max_batch_size
        and the preferred sizes), the best of ``rounds`` runs: the first runs of a size pay for allocations.
        ``example`` is the API's input; its first item makes every batch."""
        runner = self.runner
        example = runner.slice(example, 0, 1)
        for instance in self.pool.instances:
            await runner.call(instance, example)
        instance = self.pool.instances[0]
        sizes = anchor_sizes(self.config.max_batch_size, self.config.preferred_batch_sizes)
        for size in sizes:
            batch = concat([example] * size, self.config.input_batch_dim)
            best = math.inf
            for _ in range(rounds):
                _, seconds = await runner.call(instance, batch)
                best = min(best, seconds)
            self.policy.executed(size, best)
        log.info("API %r warmed up: %s", self.config.name,
                 ", ".join(f"batch {n}: {self.policy.latency.predict(n) * 1000:.2f} ms" for n in sizes))

    # -- requests -------------------------------------------------------------------------------------------

    def admit(self, items: int, now: float) -> None:
        """Refuse (429) a request the policy does not admit. The runtime asks once before reading the body
        (one item), so that refusing costs little, and again with the real count."""
        refusal = self.policy.admit(items, self._state(), now)
        if refusal is not None:
            raise too_many_requests(refusal.message, refusal.retry_after, refusal.reason)

    async def submit(self, value: Any, deadline: float) -> Any:
        """Queue one request's input; its result comes back cut from the batch it ran in."""
        runner = self.runner
        items = runner.count_items(value)
        now = clock()
        self.admit(items, now)
        self.policy.arrived(items, now)
        if items <= self.config.max_batch_size:
            if self.policy.run_at_once(items, self._state(), now):
                # Requests read in the same loop turn (a burst) have tasks that have not run yet: let them show
                # up first, so that this one does not run alone ahead of them.
                await asyncio.sleep(0)
                if self.policy.run_at_once(items, self._state(), clock()):
                    instance = self.pool.try_acquire()
                    if instance is not None:
                        return await self._run_lone(instance, value, items, now, deadline)
            return await self._enqueue(value, items, now, deadline)
        # Bigger than a batch: cut into full batches and put the answers back together in order.
        step = self.config.max_batch_size
        chunks = [runner.slice(value, s, min(s + step, items)) for s in range(0, items, step)]
        parts = await asyncio.gather(*(self._enqueue(c, runner.count_items(c), now, deadline) for c in chunks),
                                     return_exceptions=True)
        for part in parts:
            if isinstance(part, BaseException):
                raise part
        return concat(parts, self.config.output_batch_dim)

    def _state(self) -> QueueState:
        """The queue state, with what only the pool and the batch threads know brought up to date (admission
        and the lone path read it; waiting, sizing and handing on need only the queue's own counts)."""
        q = self.q
        q.free = self.pool.has_idle()
        q.handed_items = sum(lane.waiting_items() for lane in self._lanes)
        return q

    async def _run_lone(self, instance: Instance, value: Any, items: int, arrival: float, deadline: float) -> Any:
        """Run a lone request's batch on ``instance`` now, without the queue and the dispatcher (three event-loop
        turns and two tasks before the model starts): as if queued and taken at once, failures and metrics
        included. On the loop's thread when placement allows it, which also saves two thread wake-ups."""
        pending = Pending(value, items, asyncio.get_running_loop().create_future(), arrival, deadline)
        latency = self.policy.latency
        where = self.placement.lone(latency.predict(items) if latency.sizes else None, clock())
        self.q.running += 1
        try:
            self.metrics.queue_wait(0.0)
            await self.runner.execute(instance, [pending], on_loop=where is Where.LOOP)
        finally:
            self.q.running -= 1
            self.pool.release(instance)
            self.policy.answered(items, clock())
            self._arrived.set()
        result = await pending.future
        record_version(pending.version)
        return result

    async def _enqueue(self, value: Any, items: int, arrival: float, deadline: float) -> Any:
        pending = Pending(value, items, asyncio.get_running_loop().create_future(), arrival, deadline)
        self.queue.append(pending)
        self.q.queued_items += items
        self.q.queued_requests += 1
        self._arrived.set()
        if self._feeders and self.q.queued_items >= self.policy.full_batch():
            self._wake_feeder()
        try:
            result = await pending.future
            record_version(pending.version)
            return result
        finally:
            if not pending.dead:  # still queued: its deadline passed or its client went away
                self._forget(pending)
                if not pending.future.done():
                    pending.future.cancel()

    def _wake_feeder(self) -> None:
        """A full batch is queued: wake a feeder whose instance's thread has room for it (a thread takes the
        batch waiting on it the moment the running one ends, so room comes without the loop hearing of it)."""
        full = self.policy.full_batch()
        for entry in self._feeders:
            lane, waiter = entry
            if not waiter.done() and lane.waiting_items() < full:
                waiter.set_result(None)
                self._feeders.remove(entry)
                return

    def _forget(self, pending: Pending) -> None:
        pending.dead = True
        self.q.queued_items -= pending.items
        self.q.queued_requests -= 1

    def _executed(self, items: int, seconds: float, on_loop: bool) -> None:
        self.policy.executed(items, seconds)
        if on_loop:
            self.placement.observe_on_loop(seconds)

    # -- dispatch -------------------------------------------------------------------------------------------

    async def _dispatch_forever(self) -> None:
        while True:
            try:
                while not self._live_head():
                    self._arrived.clear()
                    await self._arrived.wait()
                instance = await self.pool.acquire(self)
                try:
                    batch = await self._form_batch()
                except BaseException:
                    self.pool.release(instance)
                    raise
                if not batch:
                    self.pool.release(instance)
                    continue
                asyncio.get_running_loop().create_task(self._feed(instance, batch))
            except asyncio.CancelledError:
                raise
            except Exception:  # the dispatcher must outlive any one bad batch
                log.exception("batch dispatcher of %r failed; continuing", self.config.name)

    def _live_head(self) -> Pending | None:
        """Drop dead and expired requests from the front of the queue; return the first live one."""
        queue = self.queue
        now = clock()
        while queue:
            head = queue[0]
            if head.dead or head.future.done():
                queue.popleft()
                if not head.dead:
                    self._forget(head)
                continue
            if head.deadline <= now:
                queue.popleft()
                self._forget(head)
                message = f"API {self.config.name!r}: the request's deadline passed while it was queued; it never ran"
                head.future.set_exception(HTTPError(504, message, reason="deadline"))
                continue
            return head
        return None

    async def _form_batch(self) -> list[Pending]:
        """Keep the batch open as long as the policy says (until the next arrival or the end of the wait,
        whichever comes first, then ask again), then take it."""
        loop = asyncio.get_running_loop()
        while True:
            head = self._live_head()
            if head is None:
                return []
            wait = self.policy.wait(self.q, head.arrival, clock())
            if wait <= 0.0001:
                break
            # A timer setting the event costs far less than asyncio.wait_for, which wraps the wait in a task.
            self._arrived.clear()
            timer = loop.call_later(wait, self._arrived.set)
            try:
                await self._arrived.wait()
            finally:
                timer.cancel()
        return self._take(self.policy.batch_size(self.q))

    def _take(self, size: int) -> list[Pending]:
        batch: list[Pending] = []
        items = 0
        while self._live_head() is not None:
            head = self.queue[0]
            if batch and items + head.items > size:
                break
            self.queue.popleft()
            self._forget(head)
            batch.append(head)
            items += head.items
        return batch

    async def _feed(self, instance: Instance, batch: list[Pending]) -> None:
        """Run batches on ``instance`` while this API has full ones for it. A full batch queued while one runs is
        handed to the instance's thread at once, to start the moment the running one ends: the thread never
        waits for a busy loop to hear that a batch ended (under overload that took 15-35 ms a batch). An async
        method's batches run one at a time. The instance goes back to the pool when another API waits for it
        or no full batch is queued, so that a busy API cannot starve a quiet one."""
        lane = Lane()
        self._lanes.append(lane)
        loop = asyncio.get_running_loop()
        try:
            while True:
                if batch:
                    self._hand(instance, lane, batch)
                    batch = []
                if self._may_hand_on(lane):
                    batch = self._take(self.policy.full_batch())
                    continue
                if not lane.batches:
                    return
                oldest = lane.batches[0][2]
                if self.is_async:
                    await asyncio.wait((oldest,))
                else:  # until the oldest batch ends, or a full batch is queued while the thread has room for it
                    waiter = loop.create_future()
                    wake = lambda _: waiter.done() or waiter.set_result(None)  # noqa: E731
                    oldest.add_done_callback(wake)
                    self._feeders.append((lane, waiter))
                    try:
                        await waiter
                    finally:
                        oldest.remove_done_callback(wake)
                        if (lane, waiter) in self._feeders:
                            self._feeders.remove((lane, waiter))
                while lane.batches and lane.batches[0][2].done():
                    _, items, _ = lane.batches.pop(0)
                    self.q.running -= 1
                    self.policy.answered(items, clock())
        finally:
            for _, _, task in lane.batches:
                task.cancel()
            self.q.running -= len(lane.batches)
            self._lanes.remove(lane)
            self.pool.release(instance)
            self._arrived.set()

    def _may_hand_on(self, lane: Lane) -> bool:
        if lane.batches and self.is_async:  # an async method's batches run one at a time
            return False
        return self.policy.hand_on(self.q, lane.waiting_items()) and not self.pool.others_waiting(self)

    def _hand(self, instance: Instance, lane: Lane, batch: list[Pending]) -> None:
        now = clock()
        for p in batch:
            self.metrics.queue_wait(now - p.arrival)
        number = lane.handed
        lane.handed += 1
        task = asyncio.get_running_loop().create_task(self.runner.execute(instance, batch, lane=lane, number=number))
        lane.batches.append((number, sum(p.items for p in batch), task))
        self.q.running += 1
