"""The quickstart service: a tiny linear model and an echo-like API.

    pkg serve examples/quickstart/service.py:Demo
    curl -s -X POST localhost:3000/predict -H 'content-type: application/json' -d '{"x": [[1,2,3,4]]}'
"""

from __future__ import annotations

from typing import Annotated

import msgspec
import numpy as np

import bento_like as bl


class Item(msgspec.Struct):
    text: str
    lang: str = "en"


@bl.service(name="demo", resources={"cpu": 1}, traffic={"timeout": 10, "max_concurrency": 64})
class Demo:
    def __init__(self) -> None:
        self.w = np.ones((4, 2), dtype=np.float32)

    @bl.api
    def predict(self, x: Annotated[np.ndarray, bl.Shape(-1, 4), bl.DType("float32")]) -> np.ndarray:
        """Multiply a batch of 4-feature rows by the weights."""
        return x @ self.w

    @bl.api(route="/tag")
    async def tag(self, item: Item) -> dict:
        """Echo an item back with its language."""
        return {"text": item.text, "lang": item.lang}
