"""A service of tasks, for tests of the task routes: sync, async, batchable, slow and failing ones."""

from __future__ import annotations

import asyncio
import os
import time

import msgspec

import bento_like as bl

SLOW_S = float(os.environ.get("SLOW_S", "1.0"))


class Item(msgspec.Struct):
    text: str
    times: int = 1


@bl.service(traffic={"max_queue": int(os.environ.get("MAX_QUEUE", "4")), "timeout": 10})
class Tasks:
    def __init__(self) -> None:
        self.batch_sizes: list[int] = []
        self.slow_runs: list[str] = []

    @bl.task
    def repeat(self, item: Item) -> str:
        """Repeats a text."""
        return item.text * item.times

    @bl.task
    async def add(self, a: int, b: int = 1) -> dict:
        await asyncio.sleep(0.05)
        return {"sum": a + b}

    # Warmed up so that the batcher knows a batch of 4 costs what a batch of 1 does (a cold one guesses per item).
    @bl.task(batchable=True, max_batch_size=4, max_latency_ms=1000, warmup={"xs": [1.0]})
    def square(self, xs: list[float]) -> list[float]:
        self.batch_sizes.append(len(xs))
        time.sleep(0.1)
        return [x * x for x in xs]

    @bl.task
    def slow(self, label: str) -> str:
        time.sleep(SLOW_S)
        self.slow_runs.append(label)
        return label

    @bl.task
    async def aslow(self, label: str) -> str:
        await asyncio.sleep(SLOW_S)
        self.slow_runs.append(label)
        return label

    @bl.task
    def fail(self, message: str) -> str:
        raise RuntimeError(f"task failed on purpose: {message}")

    @bl.task
    def blob(self, data: bytes) -> bytes:
        return data[::-1]

    @bl.api
    def seen(self) -> dict:
        """What the tasks recorded: batch sizes, slow labels that ran, the process id."""
        return {"batch_sizes": self.batch_sizes, "slow_runs": self.slow_runs, "pid": os.getpid()}
