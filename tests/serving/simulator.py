"""A discrete-event simulator of one batchable API, driven by the real batching policy with a virtual clock.

What it models, and why (the figures are this project's measurements on 2-vCPU VMs, see docs/batching.md):

- **The event loop** is one FIFO server. Every request costs it time to be read and admitted, then to be
  decoded and queued (or refused: a 429 written), and again to be answered; the dispatcher costs it time
  per decision. A request waits for the loop like any other work, so a loop kept busy by refusals delays
  everything else: the reads, the answers and the news that a batch ended. That delay is the loop's lag.
- **Instances** run batches one at a time on their own thread, in the order they were handed on; a batch
  handed on behind a running one starts the moment that one ends, without the loop. A batch of n costs
  ``fixed + per_item * n`` seconds, times log-normal noise, times any slowdown in force (a step change), times
  ``1 + contention * (share of the last 50 ms the loop was busy)``: the model shares the machine with the
  loop (with two torch threads on two cores, one of them is preempted whenever the loop runs).
- **Clients** on the other side of a network delay: closed loops (send, wait for the answer, think, send
  again), open-loop Poisson streams, either one retrying a 429 at once (the storm) or after Retry-After, or
  giving up. Populations change by phase, so overload can start and end.

The dispatcher's mechanics mirror bento_like/serving/batching/dispatcher.py: admission and the lone path
when a request is queued, a batch formed for a free instance after the policy's wait, a full batch handed on
to a busy instance, the instance kept while full batches are queued. The dispatcher reads how far an
instance's thread has got at once (the thread counts the batches it started), not when the loop hears that a
batch ended.

Deterministic by seed. Times are seconds of virtual time.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from bento_like.serving.batching.estimators import anchor_sizes
from bento_like.serving.batching.policy import BatchLimits, BatchPolicy, QueueState
from bento_like.serving.tuning import BatchTuning, PlacementTuning

PLACEMENT = PlacementTuning()


@dataclass
class Model:
    """What a batch costs: linear in its size (``fixed + per_item * n``), or interpolated in ``table``
    (size -> seconds), such as a model measured at a few sizes."""

    fixed: float = 0.005
    per_item: float = 0.0006
    table: dict[int, float] | None = None
    noise: float = 0.1  # sigma of the log-normal factor on every batch
    slowdowns: tuple[tuple[float, float, float], ...] = ()  # (from, until, factor): the model runs slower
    contention: float = 0.0

    def cost(self, n: int) -> float:
        if self.table is None:
            return self.fixed + self.per_item * n
        sizes = sorted(self.table)
        if n <= sizes[0]:
            return self.table[sizes[0]]
        for lo, hi in zip(sizes, sizes[1:]):
            if n <= hi:
                return self.table[lo] + (self.table[hi] - self.table[lo]) * (n - lo) / (hi - lo)
        lo, hi = sizes[-2], sizes[-1]
        return self.table[hi] + (self.table[hi] - self.table[lo]) * (n - hi) / (hi - lo)

    def slowdown(self, t: float) -> float:
        return math.prod(f for start, end, f in self.slowdowns if start <= t < end)


MLP_ON_AVX2 = {1: 0.0050, 8: 0.023, 32: 0.039, 64: 0.0536}
"""bench/batching.py's MLP with one MKL thread on a 2-vCPU AVX2 VM: far from linear in the batch size."""


@dataclass
class LoopCosts:
    head: float = 60e-6  # read a request's head and admit it (or not)
    body: float = 90e-6  # read and decode an admitted request's body, queue it
    refuse: float = 40e-6  # write a 429
    respond: float = 120e-6  # encode and write one answer
    dispatch: float = 30e-6  # one decision of the dispatcher, or handing on a batch
    done: float = 20e-6  # hear that a batch ended
    handoff: float = 60e-6  # wake a thread: the batch thread for a batch, the loop for its end
    net: float = 100e-6  # one way between a client and the server

    @classmethod
    def free(cls) -> LoopCosts:
        """A loop that costs nothing: what is measured is the policy alone."""
        return cls(0, 0, 0, 0, 0, 0, 0, 50e-6)


@dataclass
class Request:
    id: int
    client: int
    sent: float  # by the client (the first try's, for a retried request)
    arrived: float = math.nan  # it reached the server (the last try)
    read: float = math.nan  # the loop started on it
    queued: float = math.nan
    answered: float = math.nan  # the loop wrote the answer
    status: int = 0
    batch: int = -1
    retry_after: float = 0.0
    answer: Callable[[Request, float], None] | None = field(default=None, repr=False)


@dataclass
class Batch:
    id: int
    instance: int
    requests: list[Request]
    handed: float  # given to the instance
    start: float = math.nan
    end: float = math.nan
    noise: float = 1.0  # the factor the model's noise put on this batch's cost

    @property
    def size(self) -> int:
        return len(self.requests)


@dataclass
class Instance:
    index: int
    thread: deque[Batch] = field(default_factory=deque)  # on its thread: the running one, then those handed on
    in_flight: deque[Batch] = field(default_factory=deque)  # as the loop sees it: handed on, not yet answered
    held: bool = False  # taken by the dispatcher


class Simulation:
    def __init__(self, limits: BatchLimits, model: Model | None = None, costs: LoopCosts | None = None,
                 seed: int = 0, tuning: BatchTuning | None = None,
                 warm_sizes: tuple[int, ...] | None = None, warm_slowdown: float = 1.0, inline: bool = True) -> None:
        self.limits = limits
        self.model = model or Model()
        self.costs = costs or LoopCosts()
        self.rng = random.Random(seed)
        self.policy = BatchPolicy(limits, tuning)
        self.q = QueueState()
        self.inline = inline  # a lone request's batch may run on the event loop's thread (placement.py's rule)
        self.inlined = 0
        self.held_requests = 0  # requests arrived and not yet answered (ServerLoad)
        self.concurrent_at = -math.inf  # when the server last held two at once
        self.now = 0.0
        self._events: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._ids = itertools.count()
        self.loop_free = 0.0
        self._ready: deque[Callable[[], float]] = deque()
        self._looping = False
        self.loop_busy: deque[tuple[float, float]] = deque()  # recent (start, end) of loop work
        self.queue: deque[Request] = deque()
        self.instances = [Instance(i) for i in range(limits.instances)]
        self.requests: list[Request] = []
        self.batches: list[Batch] = []
        self.refusals: list[tuple[float, int]] = []  # (when the 429 was written, request id)
        self._timer_at = math.inf  # when the dispatcher's pending timer fires
        self._forming: Instance | None = None  # the instance the dispatcher holds while it keeps a batch open
        self.clients: list[Callable[[Request, float], None]] = []
        sizes = warm_sizes if warm_sizes is not None else anchor_sizes(limits.max_batch, limits.preferred)
        for n in sizes:  # the server's warm-up: each size alone (on a machine that slowed it down, or not)
            self.policy.executed(n, self.model.cost(n) * warm_slowdown)

    # -- the clock --------------------------------------------------------------------------------------------

    def at(self, t: float, action: Callable[[], None]) -> None:
        heapq.heappush(self._events, (t, next(self._seq), action))

    def run(self, until: float) -> None:
        events = self._events
        while events and events[0][0] <= until:
            t, _, action = heapq.heappop(events)
            self.now = t
            action()
        self.now = until

    def on_loop(self, action: Callable[[], float]) -> None:
        """Queue ``action`` on the event loop now; it runs when the loop gets to it (FIFO) and returns how
        long it kept the loop busy."""
        self._ready.append(action)
        if not self._looping:
            self._looping = True
            self.at(max(self.now, self.loop_free), self._loop_step)

    def _loop_step(self) -> None:
        cost = self._ready.popleft()()
        self.loop_free = self.now + cost
        if cost:
            self.loop_busy.append((self.now, self.loop_free))
        if self._ready:
            self.at(self.loop_free, self._loop_step)
        else:
            self._looping = False

    def loop_share(self, t: float, window: float = 0.05) -> float:
        """Share of the ``window`` before ``t`` the loop was busy."""
        busy = self.loop_busy
        while busy and busy[0][1] < t - window:
            busy.popleft()
        used = sum(min(e, t) - max(s, t - window) for s, e in busy if s < t)
        return max(0.0, min(1.0, used / window))

    # -- requests ---------------------------------------------------------------------------------------------

    def send(self, client: int, t: float, answer: Callable[[Request, float], None],
             request: Request | None = None) -> Request:
        """A client sends (or sends again) a request at ``t``; ``answer(request, received_at)`` is called when
        the answer reaches it."""
        if request is None:
            request = Request(next(self._ids), client, t, answer=answer)
            self.requests.append(request)
        self.at(t + self.costs.net, lambda: self._arrive(request))
        return request

    def _arrive(self, request: Request) -> None:
        """A request reaches the server. It counts as held from now: whatever arrived while the loop was busy is
        read in its next turn, and the lone path lets those tasks start before it decides (asyncio.sleep(0))."""
        request.arrived = self.now
        self.held_requests += 1
        if self.held_requests > 1:
            self.concurrent_at = self.now
        self.on_loop(lambda: self._read(request))

    def _read(self, request: Request) -> float:
        """The loop reads a request: its head, admission, then its body and the queue, or a 429."""
        costs = self.costs
        now = request.read = self.now
        self.q.free = any(not i.held for i in self.instances)
        refusal = self.policy.admit(1, self.q, now)
        if refusal is not None:
            request.status = 429
            request.retry_after = refusal.retry_after
            written = now + costs.head + costs.refuse
            self.refusals.append((written, request.id))
            self.held_requests -= 1
            self.at(written + costs.net, lambda: request.answer(request, self.now))
            return costs.head + costs.refuse
        request.status = 0
        request.queued = now
        self.policy.arrived(1, now)
        self.q.free = any(not i.held for i in self.instances)
        if self.policy.run_at_once(1, self.q, now):
            instance = next(i for i in self.instances if not i.held)
            if self.inline and self.held_requests == 1 and now - self.concurrent_at >= PLACEMENT.quiet_s:
                return costs.head + costs.body + self._run_inline(instance, request)
            instance.held = True
            self.q.running += 1
            self._hand(instance, [request])
            return costs.head + costs.body
        self.queue.append(request)
        self.q.queued_items += 1
        self.q.queued_requests += 1
        self.on_loop(self._dispatch)
        full = self.policy.full_batch()
        if self.q.queued_items >= full:  # a feeder whose thread has room for a full batch wakes
            for instance in self.instances:
                if instance.held and instance.in_flight and self._waiting(instance) < full:
                    self.on_loop(lambda i=instance: self._feed(i))
                    break
        return costs.head + costs.body

    # -- the dispatcher ---------------------------------------------------------------------------------------

    def _dispatch(self) -> float:
        """Take a free instance (and keep it while the batch is kept open), then form a batch for it."""
        cost = self.costs.dispatch
        if not self.queue:
            return cost
        instance = self._forming
        if instance is None:
            instance = next((i for i in self.instances if not i.held), None)
            if instance is None:
                return cost
            instance.held = True
            self._forming = instance
        wait = self.policy.wait(self.q, self.queue[0].queued, self.now)
        if wait > 0.0001:
            due = self.now + wait
            if due < self._timer_at:
                self._timer_at = due
                self.at(due, self._timer)
            return cost
        self._forming = None
        self.q.running += 1
        self._hand(instance, self._take(self.policy.batch_size(self.q)))
        return cost

    def _timer(self) -> None:
        self._timer_at = math.inf
        self.on_loop(self._dispatch)

    def _take(self, size: int) -> list[Request]:
        batch: list[Request] = []
        while self.queue and len(batch) < size:
            batch.append(self.queue.popleft())
        self.q.queued_items -= len(batch)
        self.q.queued_requests -= len(batch)
        return batch

    def _hand(self, instance: Instance, requests: list[Request]) -> None:
        batch = Batch(len(self.batches), instance.index, requests, self.now)
        self.batches.append(batch)
        for r in requests:
            r.batch = batch.id
        instance.in_flight.append(batch)
        instance.thread.append(batch)
        if len(instance.thread) == 1:
            self._start(instance, self.now + self.costs.handoff)
        else:
            self.q.handed_items += batch.size

    def _waiting(self, instance: Instance) -> int:
        """Items handed to the instance's thread that it has not begun (what its thread counts)."""
        return sum(b.size for b in list(instance.thread)[1:])

    def _start(self, instance: Instance, t: float) -> None:
        batch = instance.thread[0]
        batch.start = t
        batch.end = t + self._execution(batch, t)
        self.at(batch.end, lambda: self._ended(instance))

    def _execution(self, batch: Batch, t: float) -> float:
        model = self.model
        batch.noise = math.exp(self.rng.gauss(0.0, model.noise))
        seconds = model.cost(batch.size) * batch.noise * model.slowdown(t)
        if model.contention:
            seconds *= 1.0 + model.contention * self.loop_share(t)
        return seconds

    def _run_inline(self, instance: Instance, request: Request) -> float:
        """A lone request's batch on the loop's thread: no thread to wake, but the loop is busy meanwhile."""
        now = self.now + self.costs.head + self.costs.body
        batch = Batch(len(self.batches), instance.index, [request], now, start=now)
        self.batches.append(batch)
        request.batch = batch.id
        batch.end = now + self._execution(batch, now)
        self.inlined += 1
        self.policy.executed(1, batch.end - batch.start)
        request.answered = batch.end + self.costs.respond
        request.status = 200
        self.held_requests -= 1
        self.at(request.answered + self.costs.net, lambda: request.answer(request, self.now))
        self.policy.answered(1, batch.end)
        return batch.end - self.now + self.costs.respond

    def _ended(self, instance: Instance) -> None:
        """On the instance's thread: the batch ended, the next one handed on starts now, and the loop hears of
        it when it gets to it."""
        batch = instance.thread.popleft()
        if instance.thread:  # the thread counts what it started, for the dispatcher to read at once
            self.q.handed_items -= instance.thread[0].size
            self._start(instance, self.now)
        self.at(self.now + self.costs.handoff, lambda: self.on_loop(lambda: self._answer(instance, batch)))

    def _answer(self, instance: Instance, batch: Batch) -> float:
        """The loop hears that a batch ended: the answers go out, one write each."""
        now = self.now
        self.policy.executed(batch.size, batch.end - batch.start)
        t = now + self.costs.done
        for r in batch.requests:
            t += self.costs.respond
            r.answered = t
            r.status = 200
            self.held_requests -= 1
            self.at(t + self.costs.net, lambda r=r: r.answer(r, self.now))
        self.policy.answered(batch.size, now)
        assert instance.in_flight.popleft() is batch, "batches end in the order they were handed on"
        self.q.running -= 1
        return t - now + self._feed(instance)

    def _feed(self, instance: Instance) -> float:
        """The instance's feeder: hand on a full batch while there is room, else give the instance back."""
        if not instance.held:
            return 0.0
        if self.policy.hand_on(self.q, self._waiting(instance)):
            self.q.running += 1
            self._hand(instance, self._take(self.policy.full_batch()))
            return self.costs.dispatch
        if not instance.in_flight:
            instance.held = False
            self.on_loop(self._dispatch)
        return 0.0

    # -- results ----------------------------------------------------------------------------------------------

    def capacity(self) -> float:
        """Items per second the model serves in full batches back to back, with no slowdown."""
        cap = self.policy.batch_cap()
        return cap * self.limits.instances / self.model.cost(cap)

    def ceiling(self, size: int, start: float, end: float) -> float:
        """Items per second batches of ``size`` back to back would serve, at the noise the model really had
        between ``start`` and ``end`` (the policy can't help that)."""
        noise = [b.noise for b in self.batches if start <= b.start < end] or [1.0]
        return size / (self.model.cost(size) * sum(noise) / len(noise))

    def served(self, start: float, end: float) -> int:
        return sum(1 for r in self.requests if r.status == 200 and start <= r.answered < end)

    def refused(self, start: float, end: float) -> int:
        return sum(1 for t, _ in self.refusals if start <= t < end)


# -- client populations ---------------------------------------------------------------------------------------


class ClosedLoop:
    """``n`` clients, each sending again ``think()`` seconds after an answer. On a 429: at once
    (``on_refusal="retry"``: hey, most load generators, an impatient user), after Retry-After
    (``"honour"``), or never (``"drop"``, then it thinks and sends a new one). ``active(t)``: how many of the n
    take part at time t (phases)."""

    def __init__(self, sim: Simulation, n: int, think: Callable[[float], float] | float = 0.0,
                 on_refusal: str = "retry", active: Callable[[float], int] | None = None, start: float = 0.0,
                 stagger: float = 0.0) -> None:
        self.sim = sim
        self.think = think if callable(think) else (lambda t, z=think: z)
        self.on_refusal = on_refusal
        self.active = active or (lambda t: n)
        for c in range(n):
            sim.at(start + sim.rng.random() * stagger, lambda c=c: self._next(c))

    def _next(self, client: int) -> None:
        sim = self.sim
        if client >= self.active(sim.now):
            sim.at(sim.now + 0.05, lambda: self._next(client))  # not taking part now: look again later
            return
        sim.send(client, sim.now, self._answer)

    def _answer(self, request: Request, t: float) -> None:
        sim = self.sim
        if request.status == 429:
            if self.on_refusal == "retry":
                sim.send(request.client, t, self._answer, request)
                return
            if self.on_refusal == "honour":
                delay = max(1.0, math.ceil(request.retry_after))  # type: ignore[attr-defined]
                sim.at(t + delay, lambda: sim.send(request.client, sim.now, self._answer, request))
                return
        think = self.think(t)
        sim.at(t + (sim.rng.expovariate(1.0 / think) if think > 0 else 0.0), lambda: self._next(request.client))


class OpenLoop:
    """Poisson arrivals at ``rate`` requests per second from ``start`` to ``end``; a refused request is given up
    (an open loop's clients do not wait for each other: more retrying would only add to the load)."""

    def __init__(self, sim: Simulation, rate: float, end: float, start: float = 0.0) -> None:
        self.sim = sim
        self.rate = rate
        self.end = end
        self._ids = itertools.count()
        sim.at(start, self._arrive)

    def _arrive(self) -> None:
        sim = self.sim
        sim.send(next(self._ids), sim.now, lambda request, t: None)
        nxt = sim.now + sim.rng.expovariate(self.rate)
        if nxt < self.end:
            sim.at(nxt, self._arrive)
