"""One API per input kind (and one taking them all at once), for the fuzz suite and the codec tests.

Every API of EveryInput echoes what it was given, so no input the server accepts can make an API fail: any 5xx a
fuzzer finds is the runtime's. NonFinite returns infinities and NaN on purpose, so it is a service of its own.
"""

from __future__ import annotations

from typing import Annotated, Any, Iterator, Optional

import msgspec
import numpy as np

import bento_like as bl

Row3 = Annotated[np.ndarray, bl.Shape(-1, 3), bl.DType("float32")]
Int16 = Annotated[np.ndarray, bl.DType("int16")]
Floats = Annotated[np.ndarray, bl.DType("float64")]


class Item(msgspec.Struct):
    text: str
    lang: str = "en"
    score: float = 0.0


class Order(msgspec.Struct):
    item: Item
    tags: list[str] = []


def _array(x: np.ndarray) -> dict:
    return {"dtype": x.dtype.name, "shape": list(x.shape)}


@bl.service(name="every_input")
class EveryInput:
    @bl.api
    def scalars(self, i: int, f: float, s: str, b: bool) -> dict:
        return {"i": i, "f": f, "s": s, "b": b}

    @bl.api
    def optional(self, n: Optional[int] = None, word: str = "", on: bool = False) -> dict:
        return {"n": n, "word": word, "on": on}

    @bl.api
    def rows(self, x: Row3) -> np.ndarray:
        return x

    @bl.api
    def ints(self, x: Int16) -> dict:
        return _array(x)

    @bl.api
    def any_array(self, x: np.ndarray) -> dict:
        return _array(x)

    @bl.api
    def struct(self, item: Item, count: int = 1) -> dict:
        return {"item": msgspec.to_builtins(item), "count": count}

    @bl.api
    def nested(self, order: Order) -> dict:
        return msgspec.to_builtins(order)

    @bl.api
    def mapping(self, d: dict[str, float]) -> dict:
        return d

    @bl.api
    def listing(self, xs: list[int], names: tuple[str, ...] = ()) -> dict:
        return {"count": len(xs), "names": list(names)}

    @bl.api
    def anything(self, value: Any) -> dict:
        return {"type": type(value).__name__}

    @bl.api
    def upload(self, file: bl.File, note: str = "") -> dict:
        return {"size": len(file.data), "name": file.filename, "note": note}

    @bl.api
    def raw(self, data: bytes) -> dict:
        return {"size": len(data)}

    @bl.api
    def text(self, s: str) -> str:
        return s

    @bl.api
    def pair(self, a: Int16, b: Annotated[np.ndarray, bl.Shape(-1, 2), bl.DType("float64")]) -> tuple[Int16, Floats]:
        return a, b

    @bl.api
    def words(self, s: str, data: bytes) -> Annotated[np.ndarray, bl.DType("object")]:
        return np.array([s, data], dtype=object)

    @bl.api
    def mixed(
        self, file: bl.File, item: Item, x: Annotated[np.ndarray, bl.Shape(2), bl.DType("int32")], flag: bool = False,
        d: dict[str, int] = {},
    ) -> dict:
        return {"size": len(file.data), "item": msgspec.to_builtins(item), "x": x.tolist(), "flag": flag, "d": d}


@bl.service(name="non_finite")
class NonFinite:
    @bl.api
    def ratio(self, a: float, b: float) -> dict:
        return {"ratio": np.float64(a) / np.float64(b)}

    @bl.api
    def scaled(self, x: Row3, k: float) -> np.ndarray:
        return x * np.float32(k)

    @bl.api
    def values(self, x: list[float]) -> list[float]:
        return [v * 1e300 for v in x]

    @bl.api
    def stream(self, x: list[float]) -> Iterator[float]:
        yield from (v * 1e300 for v in x)
