"""A service for the client tests: every input and output kind, plus APIs that refuse, fail or dawdle."""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass
from typing import AsyncIterator, Iterator

import msgspec
import numpy as np
from starlette.responses import JSONResponse

import bento_like as bl


class Item(msgspec.Struct):
    text: str
    lang: str = "en"


@dataclass
class Point:
    x: float
    y: float


@bl.service(name="clienttest", traffic={"timeout": 10})
class ClientTest:
    # How many times each key was refused so far: the server runs one process, so a class attribute counts.
    refusals: dict[str, int] = {}

    def __init__(self) -> None:
        self.w = np.ones((4, 2), dtype=np.float32)
        time.sleep(float(os.environ.get("INIT_DELAY", "0")))
        if os.environ.get("INIT_FAIL"):
            raise RuntimeError("the model would not load")

    @bl.api
    def predict(self, x: np.ndarray) -> np.ndarray:
        """Multiply rows of 4 features by ones."""
        return x @ self.w

    @bl.api
    async def tag(self, item: Item, count: int = 1) -> dict:
        return {"text": item.text, "lang": item.lang, "count": count}

    @bl.api
    def norm(self, p: Point, scale: float = 1.0) -> float:
        return float(np.hypot(p.x, p.y)) * scale

    @bl.api
    def greet(self, name: str) -> str:
        return f"hello, {name}"

    @bl.api
    def raw(self, data: bytes) -> bytes:
        return data[::-1]

    @bl.api
    def upload(self, file: bl.File, note: str = "", times: int = 1) -> dict:
        return {"name": file.filename, "size": len(file.data), "type": file.content_type, "note": note * times}

    @bl.api
    def inspect_file(self, file: bl.File) -> dict:
        return {"name": file.filename, "size": len(file.data), "type": file.content_type}

    @bl.api
    def upload_with_meta(self, file: bl.File, meta: dict) -> dict:
        return {"name": file.filename, "size": len(file.data), "meta": meta}

    @bl.api
    def echo_file(self, file: bl.File) -> bl.File:
        return bl.File(file.data.upper(), content_type="image/x-test")

    @bl.api
    def flaky(self, key: str, failures: int) -> dict:
        """Refuse with 429 and Retry-After: 1 for the first `failures` calls with this key, then succeed."""
        seen = ClientTest.refusals.get(key, 0)
        if seen < failures:
            ClientTest.refusals[key] = seen + 1
            return JSONResponse(
                {"error": "busy, come back later", "status": 429}, status_code=429, headers={"Retry-After": "1"}
            )
        return {"key": key, "refusals": seen}

    @bl.api
    def unavailable(self, key: str, failures: int) -> dict:
        """Answer 503 without Retry-After for the first `failures` calls with this key."""
        seen = ClientTest.refusals.get(key, 0)
        if seen < failures:
            ClientTest.refusals[key] = seen + 1
            return JSONResponse({"error": "warming up", "status": 503}, status_code=503)
        return {"key": key, "refusals": seen}

    @bl.api
    def boom(self, x: int) -> int:
        raise RuntimeError("user code failed on purpose")

    @bl.api
    async def slow(self, seconds: float) -> float:
        await asyncio.sleep(seconds)
        return seconds

    @bl.api
    def count(self, n: int) -> Iterator[dict]:
        for i in range(n):
            yield {"i": i}

    @bl.api
    async def tokens(self, n: int) -> AsyncIterator[str]:
        for i in range(n):
            await asyncio.sleep(0)
            yield f"token {i}\nline two"

    @bl.api
    def broken_stream(self, n: int) -> Iterator[int]:
        for i in range(n):
            yield i
        raise RuntimeError("the stream failed on purpose")
