"""A sync API that can hang past its deadline, beside a quick one, for tests of abandoned calls."""

from __future__ import annotations

import time

import bento_like as bl


@bl.service(traffic={"timeout": 1})
class Hung:
    @bl.api
    def hang(self, seconds: float) -> float:
        time.sleep(seconds)
        return seconds

    @bl.api
    def ping(self) -> str:
        return "pong"
