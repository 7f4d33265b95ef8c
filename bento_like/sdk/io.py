"""Type helpers for API signatures: arrays with a declared dtype/shape, uploaded files, and the rich IO types.

``Annotated[np.ndarray, Shape(-1, 4), DType("float32")]`` declares what an array input must look like; the
runtime converts the JSON value and rejects a mismatch with a 422 that names the field. ``numpy.typing.NDArray``
with a dtype works too. ``torch.Tensor`` takes the same Shape and DType. ``PIL.Image.Image``, ``pandas.DataFrame``
and ``pathlib.Path`` travel as files, narrowed by ``ContentType`` and ``DataframeSchema`` (BentoML's names).
Nothing here imports numpy, PIL, pandas or torch: their types are recognised by module and name.
"""

from __future__ import annotations

import pathlib
import typing
from dataclasses import dataclass
from typing import Any, Literal


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
class ContentType:
    """The media type a file-like input must have, or an output is sent as: ``"image/png"``, or a wildcard such
    as ``"image/*"`` (for inputs)."""

    media_type: str

    def __post_init__(self) -> None:
        kind, slash, sub = self.media_type.partition("/")
        if not slash or not kind or not sub or kind == "*":
            raise TypeError(f"ContentType takes a media type such as 'image/png' or 'image/*', got {self.media_type!r}")
        object.__setattr__(self, "media_type", self.media_type.strip().lower())

    def matches(self, media_type: str | None) -> bool:
        """Whether ``media_type`` (parameters such as ``; charset=`` ignored) is this one, or within its wildcard."""
        given = (media_type or "").split(";", 1)[0].strip().lower()
        if self.media_type.endswith("/*"):
            return given.startswith(self.media_type[:-1]) and len(given) > len(self.media_type) - 1
        return given == self.media_type


DataframeOrient = Literal["records", "columns", "index", "split", "values"]


@dataclass(frozen=True)
class DataframeSchema:
    """How a DataFrame travels as JSON (``orient``, as pandas names it) and the columns it must have."""

    orient: DataframeOrient = "records"
    columns: tuple[str, ...] | None = None

    def __init__(self, orient: DataframeOrient = "records", columns: typing.Sequence[str] | None = None) -> None:
        if orient not in typing.get_args(DataframeOrient):
            raise TypeError(f"DataframeSchema orient is one of {typing.get_args(DataframeOrient)}, got {orient!r}")
        if isinstance(columns, str):
            raise TypeError("DataframeSchema columns is a list of column names, not one string")
        object.__setattr__(self, "orient", orient)
        object.__setattr__(self, "columns", None if columns is None else tuple(columns))


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


def is_tensor_type(tp: Any) -> bool:
    return isinstance(tp, type) and tp.__name__ == "Tensor" and tp.__module__ == "torch"


def is_image_type(tp: Any) -> bool:
    return isinstance(tp, type) and tp.__name__ == "Image" and tp.__module__ == "PIL.Image"


def is_dataframe_type(tp: Any) -> bool:
    # pandas 2 says pandas.core.frame, pandas 3 says pandas
    return isinstance(tp, type) and tp.__name__ == "DataFrame" and tp.__module__.split(".")[0] == "pandas"


def is_path_type(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, pathlib.PurePath)


def base_type(annotation: Any) -> Any:
    """The type an ``Annotated[...]`` annotation annotates (the annotation itself otherwise)."""
    if typing.get_origin(annotation) is typing.Annotated:
        return typing.get_args(annotation)[0]
    return annotation


def rich_kind(annotation: Any) -> str | None:
    """The rich IO kind, "image", "dataframe", "tensor" or "path", of an annotation of one of those types (Annotated or not);
    None for every other type."""
    tp = base_type(annotation)
    if is_image_type(tp):
        return "image"
    if is_dataframe_type(tp):
        return "dataframe"
    if is_tensor_type(tp):
        return "tensor"
    if is_path_type(tp):
        return "path"
    return None


def declared(annotation: Any, cls: type) -> Any:
    """The last ``cls`` instance among an Annotated annotation's metadata (a ContentType, a DataframeSchema), or None."""
    if typing.get_origin(annotation) is not typing.Annotated:
        return None
    found = [extra for extra in typing.get_args(annotation)[1:] if isinstance(extra, cls)]
    return found[-1] if found else None


def array_spec(annotation: Any) -> ArraySpec | None:
    """The ArraySpec an annotation declares, or None when it is not an array type."""
    if is_ndarray_type(annotation) or is_tensor_type(annotation):
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
