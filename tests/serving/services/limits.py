"""A service with a small concurrency limit and a slow API, for overload tests."""

import asyncio

import bento_like as bl


@bl.service(traffic={"max_concurrency": 2, "timeout": 10})
class Limited:
    @bl.api
    async def wait(self, seconds: float) -> float:
        await asyncio.sleep(seconds)
        return seconds

    @bl.api
    def pid(self) -> int:
        import os

        return os.getpid()
