"""Adaptive batching: one queue and one dispatcher per batchable API, over the instances of the service.

The dispatcher learns how long a batch of each size takes (``LatencyModel``, from real executions) and how fast
items arrive (``ArrivalRate``). When an instance is free it either flushes what is queued at once or waits a
little for more, so that the oldest request's queue wait plus the predicted execution stays within
``max_latency_ms``:

- light traffic (fewer than one item expected to arrive during one execution): flush at once, so a lone
  request never waits for company;
- heavy traffic: wait for more items, at most until the batch would stop fitting the latency budget and never
  longer than one execution of the current batch;
- a full batch whose predicted time exceeds the budget is cut to the largest size that fits.

Admission: a request is refused with 429 when the queue already holds ``max_queue`` requests, or when the
model predicts it cannot complete within the budget behind what is already queued; a request that an idle
instance could run at once is always admitted. Admitted requests are not dropped for lateness; only their
deadline (the service timeout, or a shorter one from the client) drops them, before they reach the model.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import math
import time
import uuid
from collections import deque
from time import monotonic as clock
from typing import Any

import numpy as np

from ..sdk.api import APIConfig
from .errors import HTTPError, too_many_requests
from .instances import Instance, InstancePool, inline_ms

log = logging.getLogger("bento_like.serving")


INLINE_BATCH_S = 0.02
"""A lone batch predicted to take at most this long (and a quarter of max_latency_ms) may run on the event
loop's thread (see ``_may_inline``)."""

LONE_QUIET_S = 0.1
"""A request is lone only if the server has held no two requests at once, and the last batch's clients are all
back, for this long."""

LAG_SHARE = 0.25
"""At most this share of max_latency_ms is set aside for the event loop's lag at admission."""


class LatencyModel:
    """Execution seconds by batch size: a shape (seconds per observed size, interpolated linearly between
    sizes) times a load factor that all sizes share.

    Under load only the sizes that run get observed, and they run slower than alone (the machine is busy:
    measured here under 3x overload, batches of 14 took 36 ms against 18 ms alone). A table of sizes alone
    would then predict a small batch as slow as a full one still known from quiet times, and let the cap
    stay at a full batch that now takes twice the budget. So each observation of a known size moves the
    shared factor (quickly: ``alpha``) toward how much slower than the shape it ran (never below 1: a size
    running faster than its shape had its shape learned too slow, and must not make the others look fast),
    and the shape of that size slowly (``shape_alpha``); an unseen size enters the shape divided by the
    factor."""

    def __init__(self, alpha: float = 0.2, shape_alpha: float = 0.05) -> None:
        self.alpha = alpha
        self.shape_alpha = shape_alpha
        self.factor = 1.0
        self.sizes: list[int] = []
        self.seconds: dict[int, float] = {}  # the shape: seconds per size at factor 1
        self.observations = 0  # what was derived from the model is stale once this changed

    def observe(self, size: int, seconds: float) -> None:
        self.observations += 1
        table = self.seconds
        old = table.get(size)
        if old is None:
            bisect.insort(self.sizes, size)
            table[size] = seconds / self.factor
            return
        # One outlier (a pause of the whole process, say) counts as at most 4 times slower than the shape.
        ratio = min(4.0, max(0.25, seconds / old)) if old > 0 else 1.0
        # The factor only stands for slowdowns (see above): a shape learned too slow corrects itself, slowly.
        self.factor += self.alpha * (max(1.0, ratio) - self.factor)
        table[size] = old + self.shape_alpha * (old * ratio / self.factor - old)

    def predict(self, size: int) -> float:
        """Predicted seconds for a batch of ``size``; 0 before anything was observed."""
        return self.factor * self._shape(size) if self.sizes else 0.0

    def _shape(self, size: int) -> float:
        sizes = self.sizes
        exact = self.seconds.get(size)
        if exact is not None:
            return exact
        i = bisect.bisect_left(sizes, size)
        if i == 0:  # smaller than anything seen: a batch never takes longer than a bigger one
            return self.seconds[sizes[0]]
        if i == len(sizes):  # larger than anything seen: extrapolate, per item, from the largest
            largest = sizes[-1]
            if len(sizes) >= 2:
                prev = sizes[-2]
                slope = max(0.0, (self.seconds[largest] - self.seconds[prev]) / (largest - prev))
                return self.seconds[largest] + slope * (size - largest)
            return self.seconds[largest] * size / largest
        lo, hi = sizes[i - 1], sizes[i]
        t_lo, t_hi = self.seconds[lo], self.seconds[hi]
        return t_lo + (t_hi - t_lo) * (size - lo) / (hi - lo)

    def largest_within(self, budget: float, limit: int) -> int:
        """The largest batch size up to ``limit`` predicted to finish within ``budget`` seconds (at least 1)."""
        if self.predict(limit) <= budget:
            return limit
        lo, hi = 1, limit
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.predict(mid) <= budget:
                lo = mid
            else:
                hi = mid - 1
        return lo


class ArrivalRate:
    """Items per second, exponentially decayed with time constant ``tau`` (cheap: two floats per arrival)."""

    def __init__(self, tau: float = 0.25) -> None:
        self.tau = tau
        self.value = 0.0
        self.last = 0.0

    def add(self, items: int, now: float) -> None:
        self.value = self.value * math.exp(-(now - self.last) / self.tau) + items / self.tau
        self.last = now

    def get(self, now: float) -> float:
        return self.value * math.exp(-(now - self.last) / self.tau)


class Pending:
    __slots__ = ("value", "items", "future", "arrival", "deadline", "dead")

    def __init__(self, value: Any, items: int, future: asyncio.Future[Any], arrival: float, deadline: float) -> None:
        self.value = value
        self.items = items
        self.future = future
        self.arrival = arrival
        self.deadline = deadline
        self.dead = False


class Batcher:
    def __init__(self, state: Any, attr: str, config: APIConfig, is_async: bool, max_queue: int) -> None:
        self.state = state
        self.attr = attr
        self.config = config
        self.is_async = is_async
        self.max_batch = config.max_batch_size
        self.budget = config.max_latency_ms / 1000.0
        self.in_dim = config.input_batch_dim
        self.out_dim = config.output_batch_dim
        self.preferred = config.preferred_batch_sizes
        self.max_queue = max_queue
        self.model = LatencyModel()
        self.rate = ArrivalRate()
        self.last_arrival = 0.0
        self.gap: float | None = None  # learned: seconds between arrivals with no batch end in between
        self.last_done = -math.inf  # when a batch last finished (its answers are going out)
        self.last_refusal = -math.inf  # when a request was last refused (429)
        self.echo: float | None = None  # learned: seconds from a batch finishing to the next arrival
        self._awaiting_echo = False
        self.echo_all: float | None = None  # learned: seconds until as many items as the batch held came back
        self._returning = 0  # items of the last finished batch whose clients have not sent again yet
        self.queue: deque[Pending] = deque()
        self.queued_items = 0
        self.queued_requests = 0
        self.busy = 0  # batches of this API running now
        self._finishing: dict[int, float] = {}  # running batch -> when it is predicted to end
        self._cap_at = -1  # model.observations when the cap below was derived
        self._cap = self.max_batch
        self._cap_seconds = 0.0  # predicted execution of a batch of _cap
        self._arrived = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # Only a service with one CPU instance runs lone requests inline (no idle instance kept from work).
        instances = state.pool.instances
        one_cpu = len(instances) == 1 and instances[0].device == "cpu"
        self.inline_max = min(INLINE_BATCH_S, self.budget / 4) if inline_ms() > 0 and one_cpu else 0.0
        self._loop_threads_limited = False
        labels = (config.name,)
        metrics = state.metrics
        self._batch_size = lambda n: metrics.batch_size.observe(labels, n)
        self._queue_wait = lambda s: metrics.queue_wait.observe(labels, s)
        self._execution = lambda s: metrics.execution.observe(labels, s)

    @property
    def pool(self) -> InstancePool:
        return self.state.pool

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._dispatch_forever())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def warm_up(self, example: Any, rounds: int = 3) -> None:
        """Run every instance once, then seed the latency model with batches of 1, 2, 4 ... max_batch_size."""
        sizes = sorted({min(2**i, self.max_batch) for i in range(self.max_batch.bit_length() + 1)} | set(self.preferred))
        for instance in self.pool.instances:
            await self._call(instance, self._slice(example, 0, 1))
        instance = self.pool.instances[0]
        for size in sizes:
            batch = self._concat([example] * size, self.in_dim)
            best = math.inf
            for _ in range(rounds):  # the first runs of a size pay for allocations: keep the best
                _, seconds = await self._call(instance, batch)
                best = min(best, seconds)
            self.model.observe(size, best)
        log.info(
            "API %r warmed up: %s",
            self.config.name,
            ", ".join(f"batch {n}: {self.model.predict(n) * 1000:.2f} ms" for n in sizes),
        )

    def _call(self, instance: Instance, inputs: Any, inline: bool = False) -> Any:
        """Run ``inputs`` on ``instance``; an awaitable of the result and the seconds the call took. ``inline``:
        a sync method runs here, on the event loop's thread (a lone request, see ``_lone_instance``).

        A sync method is otherwise timed where it runs, on its thread: timed from the event loop, a busy loop's
        delay in noticing that the batch ended would be learned as execution time (measured here under 3x
        overload: batches of 5 learned as 85 ms, 7 ms alone), and the admission that follows from it refuses
        nearly everything. The loop's own delays are accounted for apart, by its measured lag."""
        method = getattr(instance.obj, self.attr)
        if self.is_async:
            return _timed_async(method(inputs))
        if not inline:
            return instance.batch_runner.submit(_timed, method, inputs)
        if not self._loop_threads_limited:
            instance.limit_threads()
            self._loop_threads_limited = True
        done = asyncio.get_running_loop().create_future()
        started = time.perf_counter()
        try:
            done.set_result((method(inputs), time.perf_counter() - started))
        finally:
            # Far slower than predicted (an input the model takes much longer on): never again. Merely slow
            # calls (a busy machine) raise the learned time, which stops inlining while it stays high.
            if time.perf_counter() - started > 4 * self.inline_max:
                log.info("API %r: a lone batch took over %g ms; batches run on instance threads from now on",
                         self.config.name, 4 * self.inline_max * 1000)
                self.inline_max = 0.0
        return done

    def _may_inline(self, items: int) -> bool:
        """Whether a request of ``items`` is alone enough to run at once on the event loop's thread: the server
        has no other request in progress (so nothing waits unseen while the loop is busy with it), nothing is
        queued or running for this API, traffic is light (fewer than one item expected to arrive while it
        runs: under steady load a request that happens to find the server empty would hold back the next
        ones, unread, for a whole execution) and the batch is predicted to be short (at most ``inline_max``,
        0 unless the service has one CPU instance).

        Light traffic is judged three ways, because a prediction can be far off (an input the model runs much
        longer on) and a rate is an average: by the arrival rate against the predicted execution; by the
        clients of the last batch, all of whom must be back (or not within 100 ms) before one of them runs
        inline; and by the server's concurrency, which must have stayed at one request for the last 100 ms
        (several clients that happen to leave the server empty for a moment are not a lone one)."""
        state = self.state
        if self.queued_items or self.busy or self.inline_max <= 0 or state.in_flight != 1:
            return False
        model = self.model
        if not model.sizes:
            return False
        now = clock()
        if now - state.concurrent_at < LONE_QUIET_S or (self._returning > 0 and now - self.last_done < LONE_QUIET_S):
            return False
        predicted = model.predict(items)
        return predicted <= self.inline_max and self.rate.get(now) * predicted < 1.0

    async def _lone_instance(self, items: int) -> Instance | None:
        """The instance a lone request runs on at once, inline, without passing through the queue and the
        dispatcher (three event-loop turns and two tasks before the model starts, and two thread wake-ups:
        most of what serving adds to a lone request); None when the request must queue.

        The loop first runs whatever else is ready: requests read in the same turn as this one (a burst) have
        tasks that have not started yet, and this one must see them in progress, not run inline ahead of them
        while they wait."""
        if not self._may_inline(items):
            return None
        await asyncio.sleep(0)
        if not self._may_inline(items):
            return None
        return self.pool.try_acquire()

    async def _run_lone(self, instance: Instance, value: Any, items: int, now: float, deadline: float) -> Any:
        """Run a lone request's batch on ``instance`` now, inline: as if it had been queued and taken at once,
        failures and metrics included."""
        pending = Pending(value, items, asyncio.get_running_loop().create_future(), now, deadline)
        self.busy += 1
        try:
            self._queue_wait(0.0)
            # A sync method runs here, without yielding; an async one in this task, holding the instance.
            await self._execute(instance, [pending], inline=True)
        finally:
            self.busy -= 1
            self.pool.release(instance)
            self._done(items)
        return await pending.future

    # -- requests ---------------------------------------------------------------------------------------

    def count_items(self, value: Any) -> int:
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

    async def submit(self, value: Any, deadline: float) -> Any:
        """Queue one request's input; its result comes back cut from the batch it ran in."""
        items = self.count_items(value)
        now = clock()
        self.admit(items, now)
        self.learn_arrival(items, now)
        if items <= self.max_batch:
            instance = await self._lone_instance(items)
            if instance is not None:
                return await self._run_lone(instance, value, items, now, deadline)
            return await self._enqueue(value, items, now, deadline)
        # Bigger than a batch: cut into full batches and put the answers back together in order.
        chunks = [self._slice(value, s, min(s + self.max_batch, items)) for s in range(0, items, self.max_batch)]
        parts = await asyncio.gather(
            *(self._enqueue(c, self.count_items(c), now, deadline) for c in chunks), return_exceptions=True
        )
        for part in parts:
            if isinstance(part, BaseException):
                raise part
        return self._concat(parts, self.out_dim)

    def learn_arrival(self, items: int, now: float) -> None:
        """Update what the dispatcher knows of the traffic with ``items`` arriving at ``now``: the rate, the
        gap between arrivals that follow each other, and how soon clients send again after a batch ended."""
        self.rate.add(items, now)
        if self.last_arrival > self.last_done:  # both arrived since the last batch ended: a gap within a stream
            gap = now - self.last_arrival
            self.gap = gap if self.gap is None else self.gap + 0.2 * (gap - self.gap)
        self.last_arrival = now
        if self._awaiting_echo:
            self._awaiting_echo = False
            delay = now - self.last_done
            if delay < 0.1:
                self.echo = delay if self.echo is None else self.echo + 0.2 * (delay - self.echo)
        if self._returning > 0:
            self._returning -= items
            delay = now - self.last_done
            if self._returning <= 0 and delay < 0.1:
                self.echo_all = delay if self.echo_all is None else self.echo_all + 0.2 * (delay - self.echo_all)

    def admit(self, items: int, now: float) -> None:
        """Refuse (429) a request of ``items`` the queue cannot take now or cannot answer within the budget.

        The promise is counted from when an instance is free: the batches queued ahead of the request plus its
        own must fit in ``max_latency_ms``. The batch running when it arrives is not counted (refusing because
        of it would turn away a burst that the next batch serves in time), so what a client sees is bounded by
        max_latency_ms plus at most one batch's execution.

        The runtime calls it once before reading the body (with one item), so that refusing costs almost
        nothing under overload, and again with the real item count."""
        name = self.config.name
        if self.queued_requests >= self.max_queue:
            self.last_refusal = now
            raise too_many_requests(
                f"API {name!r} has {self.queued_requests} requests queued, its limit (max_queue)", 1, "queue_full"
            )
        if not self.queued_items and self.busy < len(self.pool.instances):
            return  # an instance is free for it now
        # The loop's own lag is paid twice more outside the queue: before the request is read, after it ran.
        # Capped: refusals themselves raise the lag, and an uncapped term refuses ever more (goodput collapses).
        predicted = self.predicted_wait(items) + min(2.0 * self.state.watchdog.lag, LAG_SHARE * self.budget)
        if predicted > self.budget and predicted > self.model.predict(min(items, self.max_batch)) and self.model.sizes:
            self.last_refusal = now
            raise too_many_requests(
                f"API {name!r} would answer in about {predicted * 1000:.0f} ms behind the queued requests, over its "
                f"max_latency_ms of {self.config.max_latency_ms:g}",
                predicted - self.budget + self._running_left(),
                "latency",
            )

    def predicted_wait(self, items: int) -> float:
        """Seconds from the moment an instance is free until a request of ``items`` arriving now is answered,
        behind what is queued (the batches running now are not counted)."""
        instances = max(1, len(self.pool.instances))
        total = self.queued_items + items
        cap = self.batch_cap()
        full = self._cap_seconds
        batches = math.ceil(total / cap)
        rounds = math.ceil(batches / instances)
        # Its own batch also takes what arrives before it starts: under steady traffic it runs full, and a
        # full batch takes longer than the part of it queued now.
        ahead = (rounds - 1) * full + self._running_left()
        own = min(cap, total - (batches - 1) * cap + self.rate.get(clock()) * ahead)
        return (rounds - 1) * full + self.model.predict(math.ceil(own))

    def _running_left(self) -> float:
        if self.busy >= max(1, len(self.pool.instances)) and self._finishing:
            return max(0.0, min(self._finishing.values()) - clock())
        return 0.0

    async def _enqueue(self, value: Any, items: int, now: float, deadline: float) -> Any:
        pending = Pending(value, items, asyncio.get_running_loop().create_future(), now, deadline)
        self.queue.append(pending)
        self.queued_items += items
        self.queued_requests += 1
        self._arrived.set()
        try:
            return await pending.future
        finally:
            if not pending.dead:  # still queued: its deadline passed or its client went away
                self._forget(pending)
                if not pending.future.done():
                    pending.future.cancel()

    def _forget(self, pending: Pending) -> None:
        pending.dead = True
        self.queued_items -= pending.items
        self.queued_requests -= 1

    # -- dispatch ---------------------------------------------------------------------------------------

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
                self.busy += 1
                asyncio.get_running_loop().create_task(self._run(instance, batch))
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
                head.future.set_exception(
                    HTTPError(
                        504,
                        f"API {self.config.name!r}: the request's deadline passed while it was queued; it never ran",
                        reason="deadline",
                    )
                )
                continue
            return head
        return None

    def batch_cap(self) -> int:
        """The largest batch whose predicted execution fits the latency budget (max_batch_size if all do).

        It depends on the execution time alone, not on how long the queue has waited: shrinking batches
        because requests waited would lower throughput just when the queue is longest, and spiral. It is
        derived again only after the model learned something (once per batch), not per request."""
        model = self.model
        if self._cap_at != model.observations:
            self._cap_at = model.observations
            self._cap = model.largest_within(self.budget, self.max_batch) if model.sizes else self.max_batch
            self._cap_seconds = model.predict(self._cap)
        return self._cap

    def full_batch(self) -> int:
        """The size that goes at once: the cap, or the largest preferred size under it."""
        target = self.batch_cap()
        if self.preferred:
            fitting = [p for p in self.preferred if p <= target]
            target = fitting[-1] if fitting else target
        return target

    def wait_time(self, available: int, waited: float, now: float) -> float:
        """Seconds worth waiting for more items before flushing ``available`` (0: flush now).

        ``waited`` is how long the oldest queued request has waited for an instance (counted from when it
        arrived, or from when the last batch finished if it arrived while that batch ran: the admission
        promise starts there too). Under heavy traffic, keep the batch open while items keep streaming in
        (the time since the last arrival is under twice the learned gap between arrivals that follow each
        other: arrivals come in bursts, and the mean gap over a whole batch cycle, long idle stretch
        included, would hold a batch open long after the burst ended) and, right after a batch
        finished, for the answers just sent to come back as new requests (closed-loop clients: twice the
        learned delay between a batch finishing and the next arrival), but never past the point where the
        oldest request's wait plus the batch's predicted execution would exceed the budget."""
        target = self.full_batch()
        if available >= target or not self.model.sizes:
            return 0.0
        rate = self.rate.get(now)
        run_now = self.model.predict(available)
        if rate * run_now < 1.0:  # light traffic: nobody else is coming soon
            return 0.0
        slack = self.budget - waited - self.model.predict(target)
        gap = min(max(2.0 * self.gap if self.gap is not None else 2.0 / rate, 0.0002), run_now)
        until = self.last_arrival + gap
        if self._awaiting_echo and self.echo is not None:
            until = max(until, self.last_done + min(2.0 * self.echo, run_now))
        if self._returning > 0 and self.echo_all is not None:
            until = max(until, self.last_done + min(1.5 * self.echo_all, run_now))
        return max(0.0, min(slack, until - now))

    async def _form_batch(self) -> list[Pending]:
        loop = asyncio.get_running_loop()
        while True:
            head = self._live_head()
            if head is None:
                return []
            now = clock()
            wait = self.wait_time(self.queued_items, now - max(head.arrival, self.last_done), now)
            if wait <= 0.0001:
                break
            # Until the next arrival or the end of the wait, whichever comes first; then re-evaluate. (A timer
            # setting the event costs far less than asyncio.wait_for, which wraps the wait in a new task.)
            self._arrived.clear()
            timer = loop.call_later(wait, self._arrived.set)
            try:
                await self._arrived.wait()
            finally:
                timer.cancel()
        return self._take(self.batch_cap())

    def _take(self, size: int) -> list[Pending]:
        if self.preferred and self.queued_items < size:
            fitting = [p for p in self.preferred if p <= self.queued_items]
            size = fitting[-1] if fitting else size
        batch: list[Pending] = []
        items = 0
        while self.queue and self._live_head() is not None:
            head = self.queue[0]
            if batch and items + head.items > size:
                break
            self.queue.popleft()
            self._forget(head)
            batch.append(head)
            items += head.items
        return batch

    async def _run(self, instance: Instance, batch: list[Pending]) -> None:
        """Run ``batch`` on ``instance``, then, while a full batch is already queued and no other API waits for
        an instance, the next one on the same instance at once: handing the instance back to the dispatcher
        costs several event-loop turns (milliseconds under load) during which the model would sit idle.

        Under overload (a request was refused in the last second), the next batch is handed to the instance's
        thread shortly before the running one is predicted to end (twice the loop's lag ahead), so that the
        thread starts it as soon as it is free, without waiting for the busy loop to notice: there is always
        more queued than fits, so forming it a little early loses nothing."""
        key = id(instance)
        loop = asyncio.get_running_loop()
        running: asyncio.Task[None] | None = None
        running_items = 0
        try:
            while batch or running is not None:
                if batch:
                    now = clock()
                    for p in batch:
                        self._queue_wait(now - p.arrival)
                    items = sum(p.items for p in batch)
                    start = max(now, self._finishing.get(key, now)) if running is not None else now
                    self._finishing[key] = start + self.model.predict(items)
                    started = loop.create_task(self._execute(instance, batch))
                    if running is not None:  # the new batch waits on the thread behind this one
                        await running
                        self._done(running_items)
                    running, running_items, batch = started, items, []
                if self._may_pipeline():
                    lead = min(2.0 * self.state.watchdog.lag + 0.001, self.budget)
                    await asyncio.wait((running,), timeout=max(0.0, self._finishing[key] - lead - clock()))
                    if not running.done() and not self.pool.others_waiting(self) and self._live_head() is not None:
                        batch = self._take(self.batch_cap())
                        if batch:
                            log.debug("API %r: next batch of %d requests handed on before the running one ended",
                                      self.config.name, len(batch))
                            continue
                await running
                self._done(running_items)
                running = None
                batch = [] if self.pool.others_waiting(self) else self._take_full()
        finally:
            if running is not None and not running.done():
                running.cancel()
            self._finishing.pop(key, None)
            self.busy -= 1
            self.pool.release(instance)
            self._arrived.set()

    def _done(self, items: int) -> None:
        self.last_done = clock()
        self._awaiting_echo = True
        self._returning = items

    def _may_pipeline(self) -> bool:
        """Whether to hand the next batch to the thread before the running one ended: under overload only, and
        only for sync methods (their batches run one after another on the instance's one batch thread)."""
        return not self.is_async and clock() - self.last_refusal < 1.0

    def _take_full(self) -> list[Pending]:
        """The next batch if the queue already holds a full one."""
        target = self.full_batch()
        if self.queued_items < target or self._live_head() is None:
            return []
        return self._take(target)

    async def _execute(self, instance: Instance, batch: list[Pending], inline: bool = False) -> None:
        """Run a batch; if it raises, split it and rerun the halves so only the failing requests fail."""
        live = [p for p in batch if not p.future.done()]
        if not live:
            return
        sizes = [p.items for p in live]
        total = sum(sizes)
        try:
            inputs = live[0].value if len(live) == 1 else self._concat([p.value for p in live], self.in_dim)
            result, elapsed = await self._call(instance, inputs, inline)
            parts = self._split(result, sizes)
        except Exception as exc:
            if len(live) == 1:
                _fail(live[0], exc, self.config.name)
                return
            log.warning("batch of %d requests to %r failed (%s); bisecting", len(live), self.config.name, exc)
            mid = len(live) // 2
            await self._execute(instance, live[:mid], inline)
            await self._execute(instance, live[mid:], inline)
            return
        self.model.observe(total, elapsed)
        self._batch_size(total)
        self._execution(elapsed)
        for p, part in zip(live, parts):
            if not p.future.done():
                p.future.set_result(part)

    def _split(self, result: Any, sizes: list[int]) -> list[Any]:
        if len(sizes) == 1:
            return [result]
        total = sum(sizes)
        if isinstance(result, np.ndarray):
            if result.ndim <= self.out_dim or result.shape[self.out_dim] != total:
                raise ValueError(
                    f"API {self.config.name!r} returned shape {result.shape} for a batch of {total} along dimension "
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
            f"API {self.config.name!r} returned {type(result).__name__} for a batch of {total}; a batchable API "
            "returns an array or list with one result per input item"
        )

    def _slice(self, value: Any, start: int, stop: int) -> Any:
        if isinstance(value, np.ndarray):
            index = [slice(None)] * value.ndim
            index[self.in_dim] = slice(start, stop)
            return value[tuple(index)]
        return value[start:stop]

    @staticmethod
    def _concat(values: list[Any], dim: int) -> Any:
        if isinstance(values[0], np.ndarray):
            return np.concatenate(values, axis=dim)
        out: list[Any] = []
        for v in values:
            out.extend(v)
        return out


def _timed(method: Any, inputs: Any) -> tuple[Any, float]:
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
