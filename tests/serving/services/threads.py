"""Which thread runs a sync API: the event loop's (inline) or an instance thread."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Annotated

import numpy as np

import bento_like as bl


@bl.service(name="threads")
class Threads:
    @bl.api
    def where(self, sleep_ms: float = 0.0) -> str:
        if sleep_ms:
            time.sleep(sleep_ms / 1000)
        return threading.current_thread().name

    @bl.api
    async def blocks_loop(self, ms: float) -> str:
        """A mistake the loop-lag gauge shows: blocking work in an async method holds the event loop."""
        time.sleep(ms / 1000)
        return "done"

    @bl.api(batchable=True, max_batch_size=8, max_latency_ms=200, warmup=True)
    def where_batched(self, x: Annotated[np.ndarray, bl.Shape(-1, 1), bl.DType("float32")]) -> list:
        """Sleeps the largest x in ms; a negative x fails the batch."""
        if float(x.min()) < 0:
            raise ValueError("negative input")
        if float(x.max()) > 0:
            time.sleep(float(x.max()) / 1000)
        return [threading.current_thread().name] * len(x)

    @bl.api(batchable=True, max_batch_size=8, max_latency_ms=200, warmup=True)
    async def tripled(self, x: Annotated[np.ndarray, bl.Shape(-1, 1), bl.DType("float32")]) -> np.ndarray:
        await asyncio.sleep(0.002)
        return x * 3
