"""Type helpers for API signatures: arrays with a declared dtype/shape, and uploaded files.

``Annotated[np.ndarray, Shape(-1, 4), DType("float32")]`` declares what an array input must look like; the
runtime converts the JSON value and rejects a mismatch with a 422 that names the field. ``numpy.typing.NDArray``
with a dtype works too. Nothing here imports numpy: arrays are recognised by their type's module and name.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Shape:
    """Expected array shape; ``-1`` (or ``None``) marks a dimension of any size."""

    dims: tuple[int, ...]

    def __init__(self, *dims: int | None | tuple[int | None, ...]) -> None:
        if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
            dims = tuple(dims[0])
        clean = []
        for d in dims:
            if d is None:
                d = -1
            if not isinstance(d, int) or d < -1:
                raise TypeError(f"Shape dimensions are ints >= 0, or -1/None for any size; got {d!r}")
            clean.append(d)
        object.__setattr__(self, "dims", tuple(clean))


@dataclass(frozen=True)
class DType:
    """Expected array dtype, as numpy spells it (``"float32"``, ``"int64"``...)."""

    name: str


@dataclass(frozen=True)
class ArraySpec:
    dtype: str | None = None
    shape: tuple[int, ...] | None = None


class File:
    """An uploaded file: a multipart part, a raw body, or base64 in JSON."""

    __slots__ = ("filename", "content_type", "data")

    def __init__(self, data: bytes, filename: str | None = None, content_type: str | None = None) -> None:
        self.data = data
        self.filename = filename
        self.content_type = content_type

    def read(self) -> bytes:
        return self.data

    def __len__(self) -> int:
        return len(self.data)

    def __repr__(self) -> str:
        return f"File(filename={self.filename!r}, content_type={self.content_type!r}, size={len(self.data)})"


def is_ndarray_type(tp: Any) -> bool:
    return isinstance(tp, type) and tp.__name__ == "ndarray" and tp.__module__ == "numpy"


def array_spec(annotation: Any) -> ArraySpec | None:
    """The ArraySpec an annotation declares, or None when it is not an array type."""
    if is_ndarray_type(annotation):
        return ArraySpec()
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        base, *extras = typing.get_args(annotation)
        spec = array_spec(base)
        if spec is None:
            return None
        dtype, shape = spec.dtype, spec.shape
        for extra in extras:
            if isinstance(extra, Shape):
                shape = extra.dims
            elif isinstance(extra, DType):
                dtype = extra.name
        return ArraySpec(dtype=dtype, shape=shape)
    if is_ndarray_type(origin):
        # numpy.typing.NDArray[np.float32] is ndarray[Any, dtype[float32]]
        args = typing.get_args(annotation)
        if len(args) == 2:
            dtype_args = typing.get_args(args[1])
            if dtype_args and isinstance(dtype_args[0], type) and dtype_args[0].__module__ == "numpy":
                return ArraySpec(dtype=dtype_args[0].__name__)
        return ArraySpec()
    return None
