"""Per-request deadlines enforced by one watchdog task instead of a timer per request.

A timer per request (``asyncio.timeout``) costs a heap push and pop on the hot path; a watchdog that wakes every
``interval`` seconds and cancels the requests past their deadline costs a dict insert and delete. Deadlines are
therefore honoured to within ``interval`` (50 ms), which is far below any sensible API timeout.
"""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable


class Watchdog:
    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self._deadlines: dict[asyncio.Task[Any], float] = {}
        self._expired: set[asyncio.Task[Any]] = set()
        self._runner: asyncio.Task[None] | None = None
        self.lag = 0.0
        """How late the loop runs a timer (an EWMA, seconds): what a request also waits, once to be read and
        once to be answered, when the loop is busy."""

    def start(self) -> None:
        self._runner = asyncio.get_running_loop().create_task(self._run())

    def stop(self) -> None:
        if self._runner is not None:
            self._runner.cancel()

    async def run(self, awaitable: Awaitable[Any], timeout: float) -> Any:
        """Await ``awaitable``; raise TimeoutError if it is still running ``timeout`` seconds from now.

        The deadline is registered only while this await is pending, so a cancellation can never land on
        code after it (the loop is single-threaded: the watchdog runs only while this task is suspended here).
        """
        task = asyncio.current_task()
        assert task is not None
        self._deadlines[task] = asyncio.get_running_loop().time() + timeout
        try:
            return await awaitable
        except asyncio.CancelledError:
            if task in self._expired:
                raise TimeoutError from None
            raise
        finally:
            self._deadlines.pop(task, None)
            if task in self._expired:
                self._expired.discard(task)
                uncancel = getattr(task, "uncancel", None)
                if uncancel is not None:
                    uncancel()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            expected = loop.time() + self.interval
            await asyncio.sleep(self.interval)
            late = max(0.0, loop.time() - expected)
            self.lag += 0.3 * (late - self.lag)
            if not self._deadlines:
                continue
            now = loop.time()
            for task, deadline in list(self._deadlines.items()):
                if deadline <= now:
                    del self._deadlines[task]
                    self._expired.add(task)
                    task.cancel()
