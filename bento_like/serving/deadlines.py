"""Per-request deadlines and disconnect watches, kept by one watchdog task instead of work per request.

A timer per request (``asyncio.timeout``) costs a heap push and pop on the hot path; a watchdog that wakes every
``interval`` seconds and cancels the requests past their deadline costs a dict insert and delete. Deadlines are
therefore honoured to within ``interval`` (50 ms), which is far below any sensible API timeout.

A client that goes away while its request waits is noticed by a task that awaits the ASGI ``receive`` (the
only way ASGI tells). Starting one for every request would cost more than many whole requests take under load
(a task created, run and cancelled), so the watchdog starts it only for requests still waiting after one
interval: a client that leaves is noticed within two intervals, and quick requests pay nothing for it.
"""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable


class ClientGone(Exception):
    """The client disconnected while its request waited: there is nobody to answer."""


class Watchdog:
    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self._deadlines: dict[asyncio.Task[Any], float] = {}
        self._expired: set[asyncio.Task[Any]] = set()
        self._receives: dict[asyncio.Task[Any], tuple[Callable[[], Awaitable[Any]], float]] = {}
        self._watchers: dict[asyncio.Task[Any], asyncio.Task[None]] = {}
        self._gone: set[asyncio.Task[Any]] = set()
        self._runner: asyncio.Task[None] | None = None
        self.lag = 0.0
        """How late the loop runs a timer (an EWMA, seconds): what a request also waits, once to be read and
        once to be answered, when the loop is busy."""

    def start(self) -> None:
        self._runner = asyncio.get_running_loop().create_task(self._run())

    def stop(self) -> None:
        if self._runner is not None:
            self._runner.cancel()

    async def run(
        self, awaitable: Awaitable[Any], timeout: float, receive: Callable[[], Awaitable[Any]] | None = None
    ) -> Any:
        """Await ``awaitable``; raise TimeoutError if it is still running ``timeout`` seconds from now, and
        ClientGone if ``receive`` (the request's ASGI receive, its body already read) reports a disconnect.

        Both are registered only while this await is pending, so a cancellation can never land on code after
        it (the loop is single-threaded: the watchdog runs only while this task is suspended here).
        """
        task = asyncio.current_task()
        assert task is not None
        now = asyncio.get_running_loop().time()
        self._deadlines[task] = now + timeout
        if receive is not None:
            self._receives[task] = (receive, now)
        try:
            return await awaitable
        except asyncio.CancelledError:
            if task in self._expired:
                raise TimeoutError from None
            if task in self._gone:
                raise ClientGone from None
            raise
        finally:
            self._deadlines.pop(task, None)
            if receive is not None:
                del self._receives[task]
                watcher = self._watchers.pop(task, None)
                if watcher is not None:
                    watcher.cancel()
            if task in self._expired or task in self._gone:
                self._expired.discard(task)
                self._gone.discard(task)
                uncancel = getattr(task, "uncancel", None)
                if uncancel is not None:
                    uncancel()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            expected = loop.time() + self.interval
            await asyncio.sleep(self.interval)
            now = loop.time()
            self.lag += 0.3 * (max(0.0, now - expected) - self.lag)
            for task, deadline in list(self._deadlines.items()):
                if deadline <= now:
                    del self._deadlines[task]
                    self._expired.add(task)
                    task.cancel()
            started = now - self.interval
            for task, (receive, since) in list(self._receives.items()):
                if since <= started and task not in self._watchers and task not in self._expired:
                    self._watchers[task] = loop.create_task(self._watch(task, receive))

    async def _watch(self, task: asyncio.Task[Any], receive: Callable[[], Awaitable[Any]]) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        if task in self._receives:  # still waiting: stop it
            self._gone.add(task)
            task.cancel()
