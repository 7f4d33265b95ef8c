"""Request decoding and response encoding for one API, from its description.

The input of an API is the msgspec Struct its description (bento_like.description) derives from its parameters,
so a JSON body is decoded and validated in one pass and every error names the field path. Arrays are decoded by
numpy and checked against the declared dtype and shape; files come from multipart parts, a raw body, or base64 in
JSON. Images, DataFrames, tensors and paths are converted from those after decoding (serving/io_types.py).
"""

from __future__ import annotations

import base64
import dataclasses
import itertools
import math
import struct
from typing import Any

import msgspec
import numpy as np

try:
    import simdjson as _simdjson
except ImportError:  # optional speed-up: without it float arrays decode through msgspec
    _simdjson = None

from .._constraints import PydanticCheck, is_pydantic_model
from .._rich_values import to_builtins
from ..description import APIDescription, Parameter
from ..sdk.io import ArraySpec, File
from .errors import HTTPError, bad_request, validation_error
from .io_types import RichInputs

JSON = "application/json"
OCTET = "application/octet-stream"
MULTIPART = "multipart/form-data"
SSE = "text/event-stream"


def _dec_hook(tp: Any, obj: Any) -> Any:
    if tp is np.ndarray:
        if isinstance(obj, str):  # an array as JSON text, as a form field carries it
            try:
                obj = msgspec.json.decode(obj)
            except (msgspec.DecodeError, RecursionError):
                raise ValueError("expected an array, got text that is not a JSON array") from None
        arr = np.asarray(obj)
        if arr.dtype.kind in "OUS":
            raise ValueError(f"expected an array of numbers, got {arr.dtype.kind == 'O' and 'a ragged or mixed list' or 'strings'}")
        return arr
    if tp is File:
        if isinstance(obj, File):
            return obj
        if isinstance(obj, str):
            try:
                return File(base64.b64decode(obj, validate=True))
            except ValueError:
                raise ValueError("expected a file as base64 text") from None
        raise TypeError(f"expected a file, got {type(obj).__name__}")
    raise NotImplementedError(f"cannot decode {tp!r}")


def _enc_hook(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, File):
        return base64.b64encode(obj.data).decode()
    if is_pydantic_model(type(obj)):
        return obj.model_dump(mode="json")
    return to_builtins(obj)  # a tensor or DataFrame inside a JSON result; NotImplementedError for anything else


json_encoder = msgspec.json.Encoder(enc_hook=_enc_hook)


class InputCodec:
    """Turns a request body into keyword arguments for the API method."""

    def __init__(self, description: APIDescription) -> None:
        self.description = description
        self.params = description.params
        self.struct = description.input_struct
        params = self.params
        self._decoder = msgspec.json.Decoder(self.struct, dec_hook=_dec_hook)
        self._arrays = tuple(p for p in params if p.array is not None and (p.array.dtype or p.array.shape))
        # Float arrays of declared rank decode faster as typed nested lists (msgspec checks every element is
        # a number) turned into the declared dtype in one step, than as generic JSON that numpy must inspect
        # and then cast. Anything this path does not accept as it is goes through the general one, which
        # gives the precise error.
        self._float_arrays = tuple(
            (p, len(p.array.shape), np.dtype(p.array.dtype), _PACK_CODES.get(np.dtype(p.array.dtype).name))
            for p in params
            if p.required and p.array is not None and p.array.shape is not None
            and p.array.dtype is not None and np.dtype(p.array.dtype).kind == "f"
        )
        fast_names = {f[0].name for f in self._float_arrays}
        self._other_arrays = tuple(p for p in self._arrays if p.name not in fast_names)
        # An API whose inputs are all such arrays (the usual tensor API) skips building Python floats at all:
        # simdjson parses the body and copies each array's numbers out as one buffer.
        self._simd = _simdjson is not None and bool(self._float_arrays) and len(self._float_arrays) == len(params)
        self._parser = _simdjson.Parser() if self._simd else None
        self._fast_decoder = None
        if self._float_arrays:
            typed = {p.name: _nested_list(float, depth) for p, depth, _, _ in self._float_arrays}
            fast_fields = [
                (p.name, typed.get(p.name, p.field_type), *(() if p.required else (p.default,))) for p in params
            ]
            fast = msgspec.defstruct(
                f"{description.name}_input_fast", fast_fields, forbid_unknown_fields=True, kw_only=True,
                module=__name__,
            )
            self._fast_decoder = msgspec.json.Decoder(fast, dec_hook=_dec_hook)
        # A single bytes/File input may arrive as the raw body.
        self.raw_param = description.raw_input
        # Inputs only Pydantic validates (models, pydantic.Field constraints): checked after msgspec decoded them.
        self._checks = tuple((p, PydanticCheck(p.name, p.annotation)) for p in params if p.pydantic)
        if self._checks:  # the fast paths know nothing of these checks
            self._simd = False
            self._fast_decoder = None
        # Images, DataFrames, tensors and paths are converted after decoding; None keeps other APIs' path as it is.
        rich = RichInputs(params)
        self.rich = rich if rich.converters else None

    def decode_query(self, query: list[tuple[str, str]]) -> dict[str, Any]:
        """A GET API's inputs from its query parameters (text, converted to each input's scalar type)."""
        values: dict[str, Any] = {}
        for key, value in query:
            if key in values:
                raise HTTPError(400, f"query parameter {key!r} is given more than once", field=f"$.{key}")
            values[key] = value
        try:
            value = msgspec.convert(values, self.struct, strict=False, dec_hook=_dec_hook)
        except msgspec.ValidationError as exc:
            raise validation_error(str(exc)) from None
        return self._finish(value)

    def decode_json(self, body: bytes) -> dict[str, Any]:
        try:
            kwargs = self._decode_json(body)
        except RecursionError:  # msgspec parses nested values by recursion, under Python's recursion limit
            raise bad_request(TOO_DEEP) from None
        return kwargs if self.rich is None else self.rich.convert(kwargs)

    def _decode_json(self, body: bytes) -> dict[str, Any]:
        if not body.strip():
            if any(p.required for p in self.params):
                raise HTTPError(
                    400, f"empty body: API {self.description.name!r} takes a JSON object with " + _describe(self.params)
                )
            body = b"{}"
        if self._simd:
            fast = self._decode_simd(body)
            if fast is not None:
                return fast
        elif self._fast_decoder is not None:
            fast = self._decode_fast(body)
            if fast is not None:
                return fast
        try:
            value = self._decoder.decode(body)
        except msgspec.ValidationError as exc:
            # msgspec validates while it parses: a type error can surface before a syntax error further on.
            try:
                msgspec.json.decode(body)
            except msgspec.DecodeError as syntax:
                raise bad_request(f"malformed JSON: {syntax}") from None
            raise validation_error(str(exc)) from None
        except msgspec.DecodeError as exc:
            raise bad_request(f"malformed JSON: {exc}") from None
        return self._finish(value)

    def _decode_fast(self, body: bytes) -> dict[str, Any] | None:
        """The fast path for float arrays of declared rank; None when the body needs the general path."""
        assert self._fast_decoder is not None
        try:
            value = self._fast_decoder.decode(body)
        except msgspec.DecodeError:  # includes validation errors: the general path words them
            return None
        kwargs = {f: getattr(value, f) for f in value.__struct_fields__}
        for p, depth, dtype, code in self._float_arrays:
            arr = _float_array(kwargs[p.name], depth, dtype, code)
            if arr is None:
                return None
            assert p.array is not None
            kwargs[p.name] = _check_shape(p, p.array, arr)
        for p in self._other_arrays:
            kwargs[p.name] = _check_array(p, kwargs[p.name])
        return kwargs

    def _decode_simd(self, body: bytes) -> dict[str, Any] | None:
        """The fastest path, for APIs whose inputs are all float arrays of declared rank; None when the body
        needs the general path (which words every problem)."""
        assert _simdjson is not None and self._parser is not None
        try:
            doc = self._parser.parse(body)
        except RuntimeError:  # a document of this parser is still referenced (an error kept it): use a new one
            self._parser = _simdjson.Parser()
            return None
        except ValueError:  # malformed
            return None
        if not isinstance(doc, _simdjson.Object) or len(doc) != len(self._float_arrays):
            return None  # not an object, a field missing or unknown, or a field twice
        kwargs: dict[str, Any] = {}
        brackets = 0
        for p, depth, dtype, _ in self._float_arrays:
            value = doc.get(p.name)
            if not isinstance(value, _simdjson.Array):
                return None
            shape = _rectangular_shape(value, depth)
            if shape is None:
                return None
            try:
                flat = np.frombuffer(value.as_buffer(of_type="d"), dtype=np.float64)
            except (TypeError, ValueError, RuntimeError):  # a value that is not a number, or a huge integer
                return None
            if flat.size != math.prod(shape):
                return None
            # Narrower than the parsed doubles: a value beyond the dtype's range (it would become inf) takes the
            # general path, which words it. Checked on the doubles, so the cast never overflows: two reductions
            # cost less than a cast under np.errstate plus an isfinite pass (right after a model run evicted
            # the caches: 104 against 147 us for 784 floats).
            limit = _NARROW_LIMITS.get(dtype)
            if limit is not None and (_max(flat) > limit or _min(flat) < -limit):
                return None
            arr = flat.astype(dtype).reshape(shape)  # a copy: the input is the model's to write into
            assert p.array is not None
            kwargs[p.name] = _check_shape(p, p.array, arr)
            # One "[" per array at each level above the numbers: [[1, 2], [3, 4]] has 3. The numbers' buffer
            # flattens any nesting, so a value nested deeper than its rank ([[1, [2]]]) shows only here.
            level = 1
            for d in shape[:-1]:
                brackets += level
                level *= d
            brackets += level
        if body.count(b"[") != brackets:
            return None
        return kwargs

    def decode_raw(self, body: bytes, content_type: str | None) -> dict[str, Any]:
        assert self.raw_param is not None
        value: Any = body if self.raw_param.kind == "bytes" else File(body, content_type=content_type)
        kwargs = {self.raw_param.name: value}
        return kwargs if self.rich is None else self.rich.convert(kwargs)

    def decode_form(self, form: dict[str, Any]) -> dict[str, Any]:
        for p in self.params:
            value = form.get(p.name)
            if p.kind == "bytes" and isinstance(value, File):  # msgspec converts to bytes natively, not by the hook
                form[p.name] = value.data
            elif p.json_in_form and isinstance(value, (str, File)):  # a field or a file part holding JSON text
                form[p.name] = _form_json(p.name, value.data if isinstance(value, File) else value)
        try:
            value = msgspec.convert(form, self.struct, strict=False, dec_hook=_dec_hook)
        except msgspec.ValidationError as exc:
            raise validation_error(str(exc)) from None
        except RecursionError:
            raise bad_request(TOO_DEEP) from None
        kwargs = self._finish(value)
        return kwargs if self.rich is None else self.rich.convert(kwargs)

    def _finish(self, value: Any) -> dict[str, Any]:
        kwargs = {f: getattr(value, f) for f in value.__struct_fields__}
        for p in self._arrays:
            kwargs[p.name] = _check_array(p, kwargs[p.name])
        for p, check in self._checks:
            if p.required or kwargs[p.name] is not p.default:
                try:
                    kwargs[p.name] = check(kwargs[p.name])
                except ValueError as exc:
                    raise validation_error(str(exc)) from None
        return kwargs


TOO_DEEP = "malformed JSON: arrays and objects are nested too deeply"


def _form_json(name: str, text: str | bytes) -> Any:
    try:
        return msgspec.json.decode(text)
    except (msgspec.DecodeError, RecursionError) as exc:
        problem = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise HTTPError(
            400, f"form field {name!r} must be JSON text: {problem} (at $.{name})", field=f"$.{name}"
        ) from None


def _check_array(p: Parameter, arr: Any) -> Any:
    spec = p.array
    assert spec is not None
    if arr is None:
        return arr
    if spec.dtype is not None and arr.dtype != spec.dtype:
        target = np.dtype(spec.dtype)
        problem = _cast_problem(arr, target)
        if problem is None:
            with np.errstate(over="raise", invalid="raise"):
                try:
                    return _check_shape(p, spec, arr.astype(target))
                except FloatingPointError:  # a float too large for a narrower float type
                    problem = f"got values beyond its largest finite value {float(np.finfo(target).max):.6g}"
        raise validation_error(f"Expected an array of {spec.dtype}, {problem} - at `$.{p.name}`")
    return _check_shape(p, spec, arr)


def _check_shape(p: Parameter, spec: ArraySpec, arr: Any) -> Any:
    if spec.shape is not None:
        ok = arr.ndim == len(spec.shape) and all(d == -1 or d == s for d, s in zip(spec.shape, arr.shape))
        if not ok:
            want = "(" + ", ".join("*" if d == -1 else str(d) for d in spec.shape) + ")"
            raise validation_error(f"Expected an array of shape {want}, got shape {tuple(arr.shape)} - at `$.{p.name}`")
    return arr


def _cast_problem(arr: Any, target: Any) -> str | None:
    """Why `arr` cannot become `target` without changing a value (None: it can). Integers must fit the
    target's range (uint8 never wraps 300 to 44), floats become integers only when they are whole numbers,
    and booleans take only 0 and 1; float to float (float64 to float32) rounds, as a model expects."""
    source = arr.dtype
    if source.kind not in "biuf" or target.kind not in "biuf":
        return None if np.can_cast(source, target, casting="same_kind") else f"got {source}"
    if target.kind == "f" or arr.size == 0:
        return None  # a float that does not fit a narrower float raises FloatingPointError in the cast
    if source.kind == "f":
        if not np.all(np.isfinite(arr)) or np.any(arr != np.floor(arr)):
            return f"got {source} values that are not whole numbers"
    if target.kind == "b":
        if source.kind != "b" and np.any((arr != 0) & (arr != 1)):
            return "got values other than 0 and 1"
        return None
    if source.kind == "b":
        return None
    info = np.iinfo(target)
    low, high = arr.min(), arr.max()
    if low < info.min or high > info.max:
        bad = low if low < info.min else high
        return f"got {bad.item()!r} outside its range [{info.min}, {info.max}]"
    return None


_PACK_CODES = {"float16": "e", "float32": "f", "float64": "d"}
_PACK_MAX = 8192
"""Up to this many values, struct packs a flat list into the array about twice as fast as numpy converts it;
beyond, numpy's own conversion is faster."""


def _float_array(value: list[Any], depth: int, dtype: np.dtype, code: str | None) -> np.ndarray | None:
    """Nested lists of floats, ``depth`` deep, as an array of ``dtype`` (whose struct format character is
    ``code``); None if empty, ragged or beyond the dtype's range."""
    shape = []
    flat = value
    for level in range(depth):
        if level:
            widths = set(map(len, flat))
            if len(widths) != 1:
                return None
            width = widths.pop()
            flat = list(itertools.chain.from_iterable(flat)) if len(flat) > 1 else flat[0]
            shape.append(width)
        else:
            shape.append(len(flat))
        if not flat:
            return None  # empty: the general path words what is wrong with it, if anything
    try:
        if code is not None and len(flat) <= _PACK_MAX:
            arr = np.empty(shape, dtype=dtype)
            struct.pack_into(f"={len(flat)}{code}", arr, 0, *flat)
            return arr
        with np.errstate(over="ignore"):
            arr = np.array(value, dtype=dtype)
    except (OverflowError, ValueError, struct.error):
        return None
    return arr if np.isfinite(arr).all() else None  # JSON has no inf: a value beyond the dtype's range


_max, _min = np.maximum.reduce, np.minimum.reduce
_NARROW_LIMITS = {np.dtype(t): float(np.finfo(t).max) for t in ("float16", "float32")}
"""The largest value of each float dtype narrower than the doubles JSON parses to."""


def _rectangular_shape(value: Any, depth: int) -> list[int] | None:
    """The shape of a simdjson array ``depth`` deep whose arrays at each level all have the same length (and
    none is empty); None otherwise."""
    shape = [len(value)]
    level = [value]
    for _ in range(depth - 1):
        level = [item for array in level for item in array]
        if not all(isinstance(item, _simdjson.Array) for item in level):
            return None
        widths = {len(item) for item in level}
        if len(widths) != 1:
            return None
        shape.append(widths.pop())
    return shape if all(shape) else None


def _nested_list(leaf: Any, depth: int) -> Any:
    tp = leaf
    for _ in range(depth):
        tp = list[tp]
    return tp


def _describe(params: tuple[Parameter, ...]) -> str:
    return "fields " + ", ".join(f"{p.name!r}" + ("" if p.required else " (optional)") for p in params)


class NonFiniteResult(ValueError):
    """A result holds a float that JSON has no number for (inf, -inf or NaN): refused rather than sent as null."""

    def __init__(self, value: float, path: str) -> None:
        super().__init__(f"{value} at {path}, which JSON cannot carry (it has no inf or NaN)")


def encode_result(value: Any) -> tuple[bytes, str]:
    """Body and media type for an API's return value."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value), OCTET
    if isinstance(value, File):
        return value.data, value.content_type or OCTET
    if isinstance(value, str):
        return value.encode(), "text/plain; charset=utf-8"
    return encode_json(value), JSON


def encode_json(value: Any) -> bytes:
    """A value as JSON; NonFiniteResult where it holds inf or NaN, which msgspec would write as null."""
    try:
        body = json_encoder.encode(value)
    except (TypeError, NotImplementedError) as exc:
        raise TypeError(f"the API returned a value that cannot be sent as JSON: {exc}") from exc
    if b"null" in body:  # msgspec writes inf and NaN as null: only then is the (slower) walk worth doing
        found = _non_finite(value)
        if found is not None:
            raise NonFiniteResult(*found)
    return body


def _non_finite(value: Any) -> tuple[float, str] | None:
    """The first float in ``value`` that is not finite, and its path (``$.scores[2]``); None if there is none."""
    stack: list[tuple[str, Any]] = [("$", value)]
    while stack:
        path, v = stack.pop()
        if isinstance(v, (float, np.floating)):
            if not math.isfinite(v):
                return float(v), path
        elif isinstance(v, np.ndarray):
            if v.dtype.kind == "f":
                bad = np.argwhere(~np.isfinite(v))
                if len(bad):
                    index = tuple(bad[0])
                    return float(v[index]), path + "".join(f"[{i}]" for i in index)
            elif v.dtype.kind == "O":
                stack.extend((f"{path}[{i}]", item) for i, item in reversed(list(enumerate(v.reshape(-1)))))
        elif isinstance(v, dict):
            stack.extend((_member(path, k), item) for k, item in reversed(list(v.items())))
        elif isinstance(v, (list, tuple, set, frozenset)):
            stack.extend((f"{path}[{i}]", item) for i, item in reversed(list(enumerate(v))))
        elif isinstance(v, msgspec.Struct) or dataclasses.is_dataclass(v):
            names = v.__struct_fields__ if isinstance(v, msgspec.Struct) else [f.name for f in dataclasses.fields(v)]
            stack.extend((_member(path, n), getattr(v, n)) for n in reversed(names))
    return None


def _member(path: str, key: Any) -> str:
    return f"{path}.{key}" if isinstance(key, str) and key.isidentifier() else f"{path}[{key!r}]"


def sse_event(value: Any) -> bytes:
    """One server-sent event holding the item as JSON (strings too, so "42" and 42 stay apart)."""
    return b"data: " + encode_json(value) + b"\n\n"


def media_type(content_type: str | None) -> str:
    if not content_type:
        return ""
    return content_type.split(";", 1)[0].strip().lower()
