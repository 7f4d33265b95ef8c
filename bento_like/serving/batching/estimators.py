"""What the batching policy learns: how long a batch of each size takes, and when a batch's clients come back.

Pure: every method takes the time it happens at, so the simulator and the server feed them the same way.
"""

from __future__ import annotations

import bisect
import math
from typing import Iterable

from ..tuning import BatchTuning


class LatencyModel:
    """Execution seconds by batch size: a shape (seconds at a few anchor sizes, linear in between) times a
    load factor that all sizes share.

    Under load only the sizes that run get observed, and they run slower than alone (the machine is busy:
    measured under 3x overload on 2 vCPUs, batches of 14 took 36 ms against 18 ms alone). So each observation
    moves the shared factor quickly toward how much slower than the shape it ran (never below 1: a size
    running faster than its shape had its shape learned too slow, and must not make the others look fast),
    and the shape slowly. The shape is the model's speed on an unloaded machine, the factor how much slower
    it runs now.

    The shape is kept at anchors (the sizes the warm-up runs: powers of two, the largest batch, preferred
    sizes), and an observation between two anchors moves both, in proportion to how near it is to each. A
    shape learned per observed size instead is noisy in the sizes that happen to run (each seen a few times),
    and biased: the sizes that run absorb the factor's noise, the others don't, so the sizes a server runs
    look a few percent faster than their neighbours and it keeps running them (in the simulator, 64 closed-
    loop clients settled into batches of 62, two clients always a batch late)."""

    def __init__(self, anchors: Iterable[int], tuning: BatchTuning | None = None) -> None:
        tuning = tuning or BatchTuning()
        self.alpha = tuning.latency_alpha
        self.shape_alpha = tuning.shape_alpha
        self.anchors = sorted(set(anchors))
        if not self.anchors or self.anchors[0] < 1:
            raise ValueError(f"anchor sizes must be >= 1, got {self.anchors}")
        self.factor = 1.0
        self.sizes: list[int] = []  # the anchors known so far
        self.seconds: dict[int, float] = {}  # the shape: seconds per known anchor at factor 1
        self.confirmed: set[int] = set()  # anchors a real batch near their size has been observed at
        self.observations = 0  # what was derived from the model is stale once this changed

    def observe(self, size: int, seconds: float) -> None:
        self.observations += 1
        around = self._around(size)
        if any(a not in self.seconds for a, _ in around):
            self._enter(size, seconds / self.factor, around)
            return
        old = self.shape(size)
        ratio = seconds / old if old > 0 else 1.0
        self.factor += self.alpha * (max(1.0, ratio) - self.factor)
        weights = dict(around)
        for anchor in self.sizes:
            # Anchors no batch near their size confirmed yet (set by the warm-up, or guessed) move with
            # every observation: a warm-up run on a busy machine must not leave a size that never runs (the
            # cap keeps it from running) predicted as slow as it was then.
            weight = weights.get(anchor, 0.0 if anchor in self.confirmed else 1.0)
            if weight:
                shape = self.seconds[anchor]
                self.seconds[anchor] = shape + self.shape_alpha * weight * (shape * ratio / self.factor - shape)
        self.confirmed.update(anchor for anchor, weight in around if weight >= 0.5)

    def _around(self, size: int) -> list[tuple[int, float]]:
        """The anchors an observation of ``size`` teaches, with their weights (the nearer, the more)."""
        anchors = self.anchors
        i = bisect.bisect_left(anchors, size)
        if i < len(anchors) and anchors[i] == size:
            return [(size, 1.0)]
        if i == 0:
            return [(anchors[0], 1.0)]
        if i == len(anchors):
            return [(anchors[-1], 1.0)]
        lo, hi = anchors[i - 1], anchors[i]
        return [(lo, (hi - size) / (hi - lo)), (hi, (size - lo) / (hi - lo))]

    def _enter(self, size: int, seconds: float, around: list[tuple[int, float]]) -> None:
        """First observations near anchors not known yet: they take the time this one implies for them, by
        the line through it and the nearest known anchor (or per item, for a larger one, when none is known)."""
        for anchor, _ in around:
            if anchor in self.seconds:
                continue
            known = min(self.sizes, key=lambda k: abs(k - anchor)) if self.sizes else None
            if known is not None and known != size:
                slope = max(0.0, (seconds - self.seconds[known]) / (size - known))
                value = seconds + slope * (anchor - size)
            else:
                value = seconds * max(1.0, anchor / size)
            self.seconds[anchor] = max(value, 1e-9)
            bisect.insort(self.sizes, anchor)

    def predict(self, size: int) -> float:
        """Predicted seconds for a batch of ``size`` now; 0 before anything was observed."""
        return self.factor * self.shape(size) if self.sizes else 0.0

    def shape(self, size: int) -> float:
        """Seconds for a batch of ``size`` on an unloaded machine; 0 before anything was observed."""
        sizes = self.sizes
        if not sizes:
            return 0.0
        exact = self.seconds.get(size)
        if exact is not None:
            return exact
        i = bisect.bisect_left(sizes, size)
        if i == 0:  # smaller than anything known: a batch never takes longer than a bigger one
            return self.seconds[sizes[0]]
        if i == len(sizes):  # larger than anything known: extrapolate, per item, from the largest
            largest = sizes[-1]
            if len(sizes) >= 2:
                prev = sizes[-2]
                slope = max(0.0, (self.seconds[largest] - self.seconds[prev]) / (largest - prev))
                return self.seconds[largest] + slope * (size - largest)
            return self.seconds[largest] * size / largest
        lo, hi = sizes[i - 1], sizes[i]
        t_lo, t_hi = self.seconds[lo], self.seconds[hi]
        return t_lo + (t_hi - t_lo) * (size - lo) / (hi - lo)

    def largest_within(self, budget: float, limit: int, loaded: bool = True) -> int:
        """The largest batch size up to ``limit`` predicted to finish within ``budget`` seconds (at least 1):
        at today's load factor (``loaded``), or on an unloaded machine."""
        time_of = self.predict if loaded else self.shape
        if time_of(limit) <= budget:
            return limit
        lo, hi = 1, limit
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if time_of(mid) <= budget:
                lo = mid
            else:
                hi = mid - 1
        return lo


def anchor_sizes(max_batch: int, preferred: Iterable[int] = ()) -> list[int]:
    """The sizes the latency model keeps its shape at, and the warm-up runs: 1, 2, 4 ... max_batch, and the
    preferred sizes."""
    return sorted({min(2**i, max_batch) for i in range(max_batch.bit_length() + 1)} | set(preferred))


class Traffic:
    """How requests arrive, as the decision to keep a batch open needs it. Traffic comes in bursts: closed-
    loop clients send back everything a batch answered within a few ms, then nothing until the next batch
    ends, so what matters is when a batch's clients come back.

    - ``echo``: seconds from a batch's end to the first arrival after it; ``echo_all``: until as many items
      as the batch held came back; ``returning``: items of the last batch whose clients have not sent again
      (closed-loop clients send their next request once answered).
    """

    def __init__(self, tuning: BatchTuning | None = None) -> None:
        tuning = tuning or BatchTuning()
        self.alpha = tuning.traffic_alpha
        self.horizon = tuning.echo_horizon_s
        self.last_done = -math.inf  # when a batch last finished (its answers going out)
        self.echo: float | None = None
        self.echo_all: float | None = None
        self.awaiting_echo = False
        self.returning = 0

    def arrived(self, items: int, now: float) -> None:
        delay = now - self.last_done
        if self.awaiting_echo:
            self.awaiting_echo = False
            if delay < self.horizon:
                self.echo = self._learn(self.echo, delay)
        if self.returning > 0:
            self.returning -= items
            if self.returning <= 0 and delay < self.horizon:
                self.echo_all = self._learn(self.echo_all, delay)

    def batch_done(self, items: int, now: float) -> None:
        self.last_done = now
        self.awaiting_echo = True
        self.returning = items

    def _learn(self, old: float | None, sample: float) -> float:
        return sample if old is None else old + self.alpha * (sample - old)
