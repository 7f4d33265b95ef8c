"""Services for tests/serving/test_distributed.py: a caller whose dependencies run as their own servers."""

from __future__ import annotations

import os
import time

import numpy as np

import bento_like as bl
from bento_like.client import APIServerError


@bl.service(name="tokenizer", resources={"cpu": 1})
class Tokenizer:
    """Runs on its own (it declares resources), with one worker; both Caller and Embedder depend on it."""

    def __init__(self) -> None:
        # A restart (TOKENIZER_STARTED names a file the first start leaves) takes 3 s, as a model load would: a
        # window that a caller checking once a second cannot miss.
        marker = os.environ.get("TOKENIZER_STARTED")
        if marker:
            if os.path.exists(marker):
                time.sleep(3)
            open(marker, "w").close()

    @bl.api
    def pid(self) -> int:
        return os.getpid()

    @bl.api
    def split(self, text: str) -> list[str]:
        return text.split()


@bl.service(name="embedder", workers=2)
class Embedder:
    """Runs on its own with two workers (it declares workers=2)."""

    tokenizer = bl.depends(Tokenizer)

    def __init__(self) -> None:
        time.sleep(float(os.environ.get("EMBEDDER_INIT_DELAY", "0")))

    @bl.api
    def pid(self) -> int:
        return os.getpid()

    @bl.api
    def tokenizer_pid(self) -> int:
        return self.tokenizer.pid()

    @bl.api
    def encode(self, texts: list[str]) -> list[int]:
        return [len(self.tokenizer.split(text)) for text in texts]

    @bl.api
    async def aencode(self, texts: list[str]) -> list[int]:
        return [len(text) for text in texts]

    @bl.api
    def scale(self, x: np.ndarray, factor: float = 2.0) -> np.ndarray:
        return x * factor

    @bl.api
    def reverse(self, data: bytes) -> bytes:
        return data[::-1]

    @bl.api
    def boom(self) -> str:
        raise RuntimeError("the embedder broke")


@bl.service(name="helper")
class Helper:
    """Declares nothing of how it runs: built inside each Caller instance, as before."""

    @bl.api
    def pid(self) -> int:
        return os.getpid()


@bl.service(name="caller")
class Caller:
    embedder = bl.depends(Embedder)
    tokenizer = bl.depends(Tokenizer)
    helper = bl.depends(Helper)

    @bl.api
    def pids(self) -> dict:
        return {
            "caller": os.getpid(),
            "embedder": self.embedder.pid(),
            "tokenizer": self.tokenizer.pid(),
            "tokenizer_via_embedder": self.embedder.tokenizer_pid(),
            "helper": self.helper.pid(),
        }

    @bl.api
    def encode(self, texts: list[str]) -> list[int]:
        return self.embedder.encode(texts)  # positional, sync, from a sync API's thread

    @bl.api
    async def aencode(self, texts: list[str]) -> list[int]:
        return await self.embedder.to_async.encode(texts=texts)

    @bl.api
    async def native_async(self, texts: list[str]) -> list[int]:
        return await self.embedder.aencode(texts=texts)  # an async API of the dependency: awaitable as written

    @bl.api
    def scale(self, x: np.ndarray) -> np.ndarray:
        return self.embedder.scale(x, factor=3.0)

    @bl.api
    def reverse(self, data: bytes) -> bytes:
        return self.embedder.reverse(data)

    @bl.api
    def bad_input(self) -> list[int]:
        return self.embedder.encode(texts=5)

    @bl.api
    def boom(self) -> str:
        return self.embedder.boom()

    @bl.api
    def caught(self) -> int:
        try:
            self.embedder.boom()
        except APIServerError as exc:
            return exc.status
        return 0


@bl.service(name="broken", resources={"cpu": 1})
class Broken:
    def __init__(self) -> None:
        raise RuntimeError("no weights found")

    @bl.api
    def ping(self) -> str:
        return "pong"


@bl.service(name="broken-caller")
class BrokenCaller:
    broken = bl.depends(Broken)

    @bl.api
    def ping(self) -> str:
        return self.broken.ping()


@bl.service(name="sluggish", resources={"cpu": 1})
class Sluggish:
    def __init__(self) -> None:
        print("loading a model that never finishes loading", flush=True)
        time.sleep(120)

    @bl.api
    def ping(self) -> str:
        return "pong"


@bl.service(name="sluggish-caller")
class SluggishCaller:
    sluggish = bl.depends(Sluggish)

    @bl.api
    def ping(self) -> str:
        return self.sluggish.ping()


@bl.service(name="url-caller")
class UrlCaller:
    """Calls a tokenizer that someone else runs, at TOKENIZER_URL."""

    tokenizer = bl.depends(url=os.environ.get("TOKENIZER_URL", "http://127.0.0.1:9"))
    typed = bl.depends(Tokenizer, url=os.environ.get("TOKENIZER_URL", "http://127.0.0.1:9"))

    @bl.api
    def split(self, text: str) -> list[str]:
        return self.tokenizer.split(text=text)

    @bl.api
    async def asplit(self, text: str) -> list[str]:
        return await self.typed.to_async.split(text)
