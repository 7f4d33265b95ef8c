"""A service exercising every IO kind, hook and failure mode the runtime must handle."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Annotated, AsyncIterator, Iterator

import msgspec
import numpy as np

import bento_like as bl


class Item(msgspec.Struct):
    text: str
    lang: str = "en"


class Doubler:
    pass


@bl.service(name="helper")
class Helper:
    def __init__(self) -> None:
        self.factor = 2

    @bl.api
    def double(self, x: int) -> int:
        return x * self.factor


def _mark(event: str) -> None:
    path = os.environ.get("HOOK_LOG")
    if path:
        with open(path, "a") as f:
            f.write(event + "\n")


@bl.service(name="full", traffic={"timeout": 2, "max_body_size": 4096})
class Full:
    helper = bl.depends(Helper)

    def __init__(self) -> None:
        self.w = np.ones((4, 2), dtype=np.float32)
        self.started = False
        time.sleep(float(os.environ.get("INIT_DELAY", "0")))

    @bl.on_startup
    async def warm(self) -> None:
        self.started = True
        _mark("startup")

    @bl.on_shutdown
    def bye(self) -> None:
        _mark("shutdown")

    @bl.api
    def predict(self, x: Annotated[np.ndarray, bl.Shape(-1, 4), bl.DType("float32")]) -> np.ndarray:
        return x @ self.w

    @bl.api(route="/tag")
    async def tag(self, item: Item, count: int = 1) -> dict:
        return {"text": item.text, "lang": item.lang, "count": count, "started": self.started}

    @bl.api
    def upload(self, file: bl.File, note: str = "") -> dict:
        return {"name": file.filename, "size": len(file.data), "note": note, "type": file.content_type}

    @bl.api
    def raw(self, data: bytes) -> bytes:
        return data[::-1]

    @bl.api
    def boom(self, x: int) -> int:
        raise RuntimeError("user code failed on purpose")

    @bl.api
    async def slow(self, seconds: float) -> float:
        await asyncio.sleep(seconds)
        return seconds

    @bl.api
    def slow_sync(self, seconds: float) -> float:
        time.sleep(seconds)
        return seconds

    @bl.api
    def composed(self, x: int) -> int:
        return self.helper.double(x)

    @bl.api
    def count(self, n: int) -> Iterator[dict]:
        for i in range(n):
            yield {"i": i}

    @bl.api
    async def acount(self, n: int) -> AsyncIterator[str]:
        for i in range(n):
            await asyncio.sleep(0)
            yield f"token-{i}"


@bl.service(name="uploads")
class Uploads:
    @bl.api
    def size(self, blob: bytes, label: str = "") -> dict:
        return {"size": len(blob), "label": label}
