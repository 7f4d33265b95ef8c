"""What the HTTP protocol must get right on the wire: fast answers, a slow stream, an API that takes a body."""

from __future__ import annotations

import time
from typing import Iterator

import bento_like as bl


@bl.service(name="wire")
class Wire:
    @bl.api
    def echo(self, x: int) -> int:
        return x

    @bl.api
    def ticks(self, n: int, gap: float) -> Iterator[int]:
        for i in range(n):
            if i:
                time.sleep(gap)
            yield i
