"""Batchable services whose model records every batch it runs, for tests of the dispatcher."""

from __future__ import annotations

import os
import threading
import time
from typing import Annotated

import numpy as np

import bento_like as bl

ROW = Annotated[np.ndarray, bl.Shape(-1, 2), bl.DType("float32")]
DELAY = float(os.environ.get("BATCH_DELAY", "0.05"))
PER_ITEM = float(os.environ.get("ITEM_DELAY", "0"))


@bl.service(traffic={"max_queue": int(os.environ.get("MAX_QUEUE", "64")), "timeout": 10})
class Batched:
    def __init__(self) -> None:
        self.batches: list[list[float]] = []
        self.threads: set[str] = set()  # the threads batches ran on
        self.direct: list[tuple[float, str]] = []  # each double_direct call that ran: x[0, 0], its thread
        self.running = 0  # batches of double running now
        self.overlaps = 0  # times a batch started while another ran on this instance

    @bl.api(batchable=True, max_batch_size=8, max_latency_ms=float(os.environ.get("MAX_LATENCY_MS", "1000")),
            warmup=True)
    def double(self, x: ROW) -> np.ndarray:
        """Doubles each row; a row holding -1 makes the whole batch fail (a poisoned input)."""
        self.running += 1
        self.overlaps += self.running > 1
        try:
            time.sleep(DELAY + PER_ITEM * len(x))
        finally:
            self.running -= 1
        self.batches.append(x[:, 0].tolist())
        self.threads.add(threading.current_thread().name)
        if (x == -1).any():
            raise ValueError("poisoned row")
        return x * 2

    @bl.api(warmup=True)
    def double_direct(self, x: ROW) -> np.ndarray:
        time.sleep(DELAY)
        self.direct.append((float(x[0, 0]), threading.current_thread().name))
        return x * 2

    @bl.api
    def direct_seen(self) -> list:
        return list(self.direct)

    @bl.api
    def batch_threads(self) -> list:
        return sorted(self.threads)

    @bl.api
    def batch_overlaps(self) -> int:
        return self.overlaps

    @bl.api
    def batches_seen(self, reset: bool = False) -> list:
        seen = list(self.batches)
        if reset:
            self.batches.clear()
        return seen


@bl.service(traffic={"max_queue": 64, "timeout": 10})
class TwoBatched:
    """Two batchable APIs on the same instance, which runs one batch at a time whichever API it is for."""

    def __init__(self) -> None:
        self.order: list[tuple[str, list[float]]] = []  # every batch that ran: the API, its rows' first values

    @bl.api(batchable=True, max_batch_size=8, max_latency_ms=1000, warmup=True)
    def double(self, x: ROW) -> np.ndarray:
        time.sleep(DELAY)
        self.order.append(("double", x[:, 0].tolist()))
        return x * 2

    @bl.api(batchable=True, max_batch_size=8, max_latency_ms=1000, warmup=True)
    def negate(self, x: ROW) -> np.ndarray:
        time.sleep(DELAY)
        self.order.append(("negate", x[:, 0].tolist()))
        return -x

    @bl.api
    def batches_seen(self) -> list:
        return list(self.order)
