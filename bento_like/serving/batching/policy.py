"""The batching policy: every decision about one batchable API's queue, made from a small state and a clock
passed in. It imports no asyncio, no instance pool and no metrics, so that tests/serving/simulator.py drives
this very code with a virtual clock; the dispatcher does the same with the real one.

The rules (docs/batching.md names the simulated scenario each one is there for):

- **Batch cap**: the largest batch whose execution on an unloaded machine fits ``max_latency_ms``. It does
  not shrink while the machine is merely slower: smaller batches serve less exactly when the queue is
  longest, and the refusals that follow slow the machine further (a feedback loop).
- **Admission**: a request that fits the batches the instances run next is always admitted (so under any
  overload every next batch runs full). Beyond that, it is admitted while the rounds of full batches ahead
  of it, its own included, are predicted at today's speed to end within ``max_latency_ms``. What a client
  waits is then at most that plus the batch running when it arrived. The event loop's lag is not counted:
  refusing because the loop is busy refusing is the storm this design avoids.
- **Keep the batch open or flush**: flush at once when a full batch is queued or nobody is known to be on
  the way (a lone request never waits for company); otherwise wait for the last batch's clients that have
  not sent again (closed-loop clients come back once answered) while they are due, never past the budget.
- **Hand on**: a full batch queued while an instance runs one goes to that instance at once, to run right
  after it, so that the model never waits for a busy event loop to notice that a batch ended; one batch
  waiting on the instance's thread, no more.
- **Run at once**: a request that finds nothing queued or running, an instance free and the last batch's
  clients all back skips the queue and the dispatcher.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..tuning import BatchTuning
from .estimators import LatencyModel, Traffic, anchor_sizes


@dataclass(frozen=True)
class BatchLimits:
    """What the service declares for one batchable API, and how many instances serve it."""

    name: str
    max_batch: int
    budget: float  # max_latency_ms, in seconds
    max_queue: int
    preferred: tuple[int, ...] = ()
    instances: int = 1


@dataclass
class QueueState:
    """What the dispatcher holds now. It keeps this current; the policy only reads it."""

    queued_items: int = 0
    queued_requests: int = 0
    handed_items: int = 0  # items in batches handed to an instance behind the batch it runs
    running: int = 0  # batches of this API on instances (running or handed on)
    free: bool = True  # an instance is free now


@dataclass(frozen=True)
class Refusal:
    """Why a request is refused (429): the metric's reason, a message naming the limit, when to retry."""

    reason: str
    message: str
    retry_after: float


class BatchPolicy:
    def __init__(self, limits: BatchLimits, tuning: BatchTuning | None = None) -> None:
        self.limits = limits
        self.tuning = tuning or BatchTuning()
        self.latency = LatencyModel(anchor_sizes(limits.max_batch, limits.preferred), self.tuning)
        self.traffic = Traffic(self.tuning)
        self._cap_at = -1  # latency.observations when the cap was derived
        self._cap = limits.max_batch
        self._full = limits.max_batch

    # -- what happened --------------------------------------------------------------------------------------

    def arrived(self, items: int, now: float) -> None:
        self.traffic.arrived(items, now)

    def executed(self, items: int, seconds: float) -> None:
        """A batch of ``items`` ran in ``seconds`` (timed where it ran)."""
        self.latency.observe(items, seconds)

    def answered(self, items: int, now: float) -> None:
        """A batch's answers are going out: its clients may send again from now on."""
        self.traffic.batch_done(items, now)

    # -- decisions ------------------------------------------------------------------------------------------

    def batch_cap(self) -> int:
        """The largest batch whose execution on an unloaded machine fits the latency budget (max_batch_size if
        all do); derived again only after the latency model learned something."""
        model = self.latency
        if self._cap_at != model.observations:
            self._cap_at = model.observations
            limits = self.limits
            cap = model.largest_within(limits.budget, limits.max_batch, loaded=False) if model.sizes else limits.max_batch
            self._cap = cap
            fitting = [p for p in limits.preferred if p <= cap]
            self._full = fitting[-1] if fitting else cap
        return self._cap

    def full_batch(self) -> int:
        """The size that goes at once: the cap, or the largest preferred size under it."""
        self.batch_cap()
        return self._full

    def admit(self, items: int, q: QueueState, now: float) -> Refusal | None:
        """None to admit a request of ``items`` arriving at ``now``, else why not."""
        limits = self.limits
        if q.queued_requests >= limits.max_queue:
            return Refusal(
                "queue_full", f"API {limits.name!r} has {q.queued_requests} requests queued, its limit (max_queue)", 1.0
            )
        cap = self.batch_cap()
        if (not q.queued_items and q.free) or not self.latency.sizes or cap > self.latency.sizes[-1]:
            # An instance is free for it now, or no batch as large as the cap ran yet: before the first ones
            # a guess per item from small batches would refuse the first burst.
            return None
        rounds = math.ceil((q.queued_items + q.handed_items + items) / (cap * limits.instances))
        if rounds <= 1:
            return None
        predicted = rounds * self.latency.predict(cap)
        if predicted <= limits.budget:
            return None
        return Refusal(
            "latency",
            f"API {limits.name!r} would answer in about {predicted * 1000:.0f} ms behind the {rounds - 1} full "
            f"batch(es) ahead of it, over its max_latency_ms of {limits.budget * 1000:g}",
            predicted - limits.budget,
        )

    def run_at_once(self, items: int, q: QueueState, now: float) -> bool:
        """Whether a request of ``items`` may skip the queue: nothing queued or running for the API, an instance
        free, and every client of the last batch back (or none for ``lone_quiet_s``), so that the first client
        back from a batch does not run alone ahead of the others. (Through the queue it would be flushed at
        once too: this saves the dispatcher's turns.)"""
        if q.queued_items or q.running or not q.free or items > self.limits.max_batch:
            return False
        traffic = self.traffic
        return traffic.returning <= 0 or now - traffic.last_done >= self.tuning.lone_quiet_s

    def wait(self, q: QueueState, oldest_arrival: float, now: float) -> float:
        """Seconds worth keeping the batch open for more items (0: flush now).

        Flush at once when a full batch is queued, when every client of the last batch has sent again (a lone
        request never waits for company), or when the oldest request could no longer be answered within the
        budget after a full batch (its wait counts from when it arrived, or from when the last batch ended if
        it arrived while that one ran: the admission promise starts there too). Otherwise the batch stays
        open for the last batch's clients still out (closed-loop clients send again once answered) while they
        are due: up to ``echo_wait`` times the learned delays after which the first, and all, of a batch's
        clients were back."""
        target = self.full_batch()
        available = q.queued_items
        model = self.latency
        traffic = self.traffic
        if available >= target or traffic.returning <= 0 or not model.sizes:
            return 0.0
        slack = self.limits.budget - (now - max(oldest_arrival, traffic.last_done)) - model.predict(target)
        echo_wait = self.tuning.echo_wait
        until = -math.inf
        if traffic.awaiting_echo and traffic.echo is not None:
            until = traffic.last_done + echo_wait * traffic.echo
        if traffic.echo_all is not None:
            until = max(until, traffic.last_done + echo_wait * traffic.echo_all)
        return max(0.0, min(slack, until - now))

    def batch_size(self, q: QueueState) -> int:
        """How many items to take now: the cap, or with fewer queued, the largest preferred size they fill."""
        size = self.batch_cap()
        preferred = self.limits.preferred
        if preferred and q.queued_items < size:
            fitting = [p for p in preferred if p <= q.queued_items]
            size = fitting[-1] if fitting else size
        return size

    def hand_on(self, q: QueueState, waiting_items: int) -> bool:
        """Whether an instance of this API should take the next batch now, behind the one it runs: a full
        batch is queued (waiting adds nothing to it) and less than one waits on the instance's thread already
        (``waiting_items``, as the thread counts them: it begins the next batch the moment one ends, and the
        loop reads that at once instead of hearing it a lag late). One batch waiting keeps the model busy
        through the loop's delays; more would make another API's batch wait behind a flood."""
        full = self.full_batch()
        return q.queued_items >= full and waiting_items < full
