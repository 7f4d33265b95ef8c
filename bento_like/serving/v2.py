"""Open Inference Protocol (KServe v2) REST routes, next to the native ones, for APIs that take and give tensors.

An API is a v2 model when its inputs are arrays (or ``bytes``/``str``, each one BYTES element) and its output is
an array, or a fixed tuple, NamedTuple or TypedDict of arrays. A model's tensors (names, datatypes, shapes) come
from the API's description (bento_like.description), like the native codec and the OpenAPI schema. Inference
runs through the API's own endpoint (``APIEndpoint.serve`` and ``invoke``), so admission, batching, body limits,
deadlines and metrics are those of the native route.
"""

from __future__ import annotations

import dataclasses
import math
import struct
import zlib
from typing import TYPE_CHECKING, Any

import msgspec
import numpy as np
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from .. import __version__
from ..description import APIDescription
from ..sdk.io import ArraySpec
from .codecs import TOO_DEEP
from .errors import HTTPError

if TYPE_CHECKING:
    from .app import ServerState
    from .routes import APIEndpoint

VERSION = "1"
PLATFORM = "bento_like"
SINGLE_OUTPUT = "output"
HEADER_LENGTH = b"inference-header-content-length"

DATATYPES: dict[str, np.dtype] = {
    name: np.dtype(t)
    for name, t in [
        ("BOOL", np.bool_), ("UINT8", np.uint8), ("UINT16", np.uint16), ("UINT32", np.uint32),
        ("UINT64", np.uint64), ("INT8", np.int8), ("INT16", np.int16), ("INT32", np.int32), ("INT64", np.int64),
        ("FP16", np.float16), ("FP32", np.float32), ("FP64", np.float64), ("BYTES", np.object_),
    ]
}
_BY_KIND_AND_SIZE = {(dt.kind, dt.itemsize): name for name, dt in DATATYPES.items() if name != "BYTES"}
# Which numpy kinds JSON data may decode to for a datatype's kind: JSON integers fill float tensors too.
_JSON_KINDS = {"b": "b", "i": "iu", "u": "iu", "f": "iuf"}
_KIND_NAMES = {"b": "booleans", "i": "integers", "u": "integers", "f": "floating-point numbers", "U": "strings"}


def datatype_of(dtype: Any) -> str | None:
    """The protocol's datatype for a numpy dtype (any byte order), or None when it has none (complex, dates)."""
    dtype = np.dtype(dtype)
    if dtype.kind in "OSU":
        return "BYTES"
    return _BY_KIND_AND_SIZE.get((dtype.kind, dtype.itemsize))


class _TensorIn(msgspec.Struct):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] = {}
    data: Any = None


class _RequestedOutput(msgspec.Struct):
    name: str
    parameters: dict[str, Any] = {}


class InferRequest(msgspec.Struct):
    inputs: list[_TensorIn]
    id: str | None = None
    parameters: dict[str, Any] = {}
    outputs: list[_RequestedOutput] | None = None


_decode_request = msgspec.json.Decoder(InferRequest)


@dataclasses.dataclass(frozen=True)
class Tensor:
    """One input or output of a model. ``dtype``/``shape`` are None where the API declares none (any is taken)."""

    name: str
    datatype: str
    dtype: np.dtype | None
    shape: tuple[int, ...] | None
    kind: str = "ndarray"  # inputs: ndarray, or bytes/str (one BYTES element)
    required: bool = True

    def metadata(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": [-1] if self.shape is None else list(self.shape)}


class Model:
    """An API seen as a v2 model: its tensors, and the conversions between protocol tensors and its arguments."""

    def __init__(self, endpoint: APIEndpoint, inputs: list[Tensor], outputs: list[Tensor], form: str) -> None:
        self.endpoint = endpoint
        self.name: str = endpoint.name
        self.inputs = {t.name: t for t in inputs}
        self.outputs = {t.name: t for t in outputs}
        self.form = form  # how the API returns its outputs: array, tuple or dict

    def metadata(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "versions": [VERSION],
            "platform": PLATFORM,
            "inputs": [t.metadata() for t in self.inputs.values()],
            "outputs": [t.metadata() for t in self.outputs.values()],
        }

    def decode_inputs(self, request: InferRequest, binary: memoryview) -> dict[str, Any]:
        """Keyword arguments for the API from the request's tensors; a bad tensor is a 400 that names it."""
        kwargs: dict[str, Any] = {}
        offset = 0
        for given in request.inputs:
            spec = self.inputs.get(given.name)
            if spec is None:
                raise HTTPError(
                    400, f"input tensor {given.name!r} is not an input of model {self.name!r} ({', '.join(self.inputs)})"
                )
            if given.name in kwargs:
                raise HTTPError(400, f"input tensor {given.name!r} appears twice")
            kwargs[given.name], used = self._decode_tensor(spec, given, binary, offset)
            offset += used
        if offset != len(binary):
            raise HTTPError(400, f"{len(binary) - offset} bytes of binary data follow the JSON but no input claims them")
        missing = [name for name, t in self.inputs.items() if t.required and name not in kwargs]
        if missing:
            raise HTTPError(400, f"missing input tensor(s) {', '.join(map(repr, missing))} for model {self.name!r}")
        return kwargs

    def check_requested(self, request: InferRequest) -> None:
        """Refuse unknown requested outputs and bad flags before the model runs, not after."""
        every_binary = _flag(request.parameters, "binary_data_output", "request")
        for out in request.outputs or ():
            if out.name not in self.outputs:
                raise HTTPError(
                    400, f"model {self.name!r} has no output {out.name!r} (its outputs: {', '.join(self.outputs)})"
                )
            _flag(out.parameters, "binary_data", f"output {out.name!r}", every_binary)

    def encode_outputs(self, request: InferRequest, result: Any) -> tuple[bytes, bytes]:
        """The response's JSON and the binary data that follows it (empty when every output travels as JSON)."""
        arrays = self._output_arrays(result)
        every_binary = _flag(request.parameters, "binary_data_output", "request")
        requested = request.outputs or [_RequestedOutput(name) for name in self.outputs]
        outputs, tail = [], []
        for out in requested:
            array, datatype = arrays[out.name]
            entry: dict[str, Any] = {"name": out.name, "datatype": datatype, "shape": list(array.shape)}
            if _flag(out.parameters, "binary_data", f"output {out.name!r}", every_binary):
                raw = _to_binary(array, datatype)
                entry["parameters"] = {"binary_data_size": len(raw)}
                tail.append(raw)
            else:
                entry["data"] = _to_json(array, datatype, out.name)
            outputs.append(entry)
        payload: dict[str, Any] = {"model_name": self.name, "model_version": VERSION, "outputs": outputs}
        if request.id is not None:
            payload["id"] = request.id
        return msgspec.json.encode(payload), b"".join(tail)

    def _decode_tensor(self, spec: Tensor, given: _TensorIn, binary: memoryview, offset: int) -> tuple[Any, int]:
        name, datatype = given.name, given.datatype
        dtype = DATATYPES.get(datatype)
        if dtype is None:
            raise HTTPError(
                400, f"input tensor {name!r}: datatype {datatype!r} is not supported ({', '.join(DATATYPES)})"
            )
        if spec.kind != "ndarray" and datatype != "BYTES":
            raise HTTPError(400, f"input tensor {name!r}: model {self.name!r} takes one BYTES element, not {datatype}")
        if spec.kind == "ndarray" and datatype == "BYTES":
            raise HTTPError(400, f"input tensor {name!r}: model {self.name!r} takes numbers, not BYTES")
        if spec.dtype is not None and datatype != spec.datatype:
            raise HTTPError(
                400, f"input tensor {name!r}: datatype {datatype} does not match the model's {spec.datatype}"
            )
        if any(d < 0 for d in given.shape):
            raise HTTPError(400, f"input tensor {name!r}: shape {given.shape} must be non-negative integers")
        count = math.prod(given.shape)
        size = given.parameters.get("binary_data_size")
        if size is not None:
            if type(size) is not int or size < 0:
                raise HTTPError(400, f"input tensor {name!r}: parameters.binary_data_size must be a byte count")
            if offset + size > len(binary):
                raise HTTPError(
                    400, f"input tensor {name!r}: binary_data_size {size} runs past the {len(binary) - offset} "
                         "bytes left after the JSON (is Inference-Header-Content-Length right?)"
                )
            flat = _from_binary(binary[offset : offset + size], dtype, given, count)
        elif given.data is None:
            raise HTTPError(400, f"input tensor {name!r} has neither data nor parameters.binary_data_size")
        else:
            size = 0
            flat = _from_json(given.data, dtype, given)
        if flat.size != count:
            raise HTTPError(400, f"input tensor {name!r}: shape {given.shape} needs {count} elements, data has {flat.size}")
        if spec.kind != "ndarray":
            return _one_element(spec, given, flat), size
        try:
            array = flat.reshape(given.shape)
        except (ValueError, OverflowError):  # a dimension past int64, its bytes past memory, over 64 dimensions
            raise HTTPError(400, f"input tensor {name!r}: shape {given.shape} is too large for an array") from None
        if spec.shape is not None and not _fits(array.shape, spec.shape):
            raise HTTPError(400, f"input tensor {name!r}: shape {given.shape} does not match the model's {list(spec.shape)}")
        return array, size

    def _output_arrays(self, result: Any) -> dict[str, tuple[np.ndarray, str]]:
        """The API's result as named arrays of their declared dtypes; a result that breaks its declaration is a 500."""
        if self.form == "array":
            values = [result]
        elif self.form == "tuple":
            if not isinstance(result, (tuple, list)) or len(result) != len(self.outputs):
                raise TypeError(f"API {self.name!r} returned {type(result).__name__}, not {len(self.outputs)} arrays")
            values = list(result)
        else:
            if not isinstance(result, dict) or set(result) != set(self.outputs):
                raise TypeError(f"API {self.name!r} returned no dict with keys {', '.join(self.outputs)}")
            values = [result[name] for name in self.outputs]
        arrays = {}
        for spec, value in zip(self.outputs.values(), values):
            array = np.asarray(value)
            datatype = datatype_of(array.dtype)
            if spec.dtype is not None and datatype != spec.datatype:
                if spec.datatype == "BYTES" or not np.can_cast(array.dtype, spec.dtype, "same_kind"):
                    raise TypeError(f"API {self.name!r} returned {array.dtype} for output {spec.name!r}, declared {spec.dtype}")
                array, datatype = array.astype(spec.dtype), spec.datatype
            if datatype is None:
                raise TypeError(f"output {spec.name!r} of API {self.name!r} is {array.dtype}: no protocol datatype has it")
            arrays[spec.name] = (array, datatype)
        return arrays


def model_of(endpoint: APIEndpoint) -> Model | None:
    """The v2 model an API is, or None when it is not tensor-shaped."""
    description = endpoint.codec.description
    config = description.config
    if not description.params or description.output_kind in ("stream", "text_stream"):
        return None
    inputs = []
    for p in description.params:
        if p.kind == "ndarray":
            tensor = _array_tensor(p.name, p.array, config.input_batch_dim if config.batchable else None)
            if tensor is None:
                return None
            inputs.append(dataclasses.replace(tensor, required=p.required))
        elif p.kind in ("bytes", "str") and not config.batchable:
            inputs.append(Tensor(p.name, "BYTES", None, (1,), p.kind, p.required))
        else:
            return None
    found = _outputs(description)
    if found is None:
        return None
    outputs, form = found
    return Model(endpoint, inputs, outputs, form)


def _outputs(description: APIDescription) -> tuple[list[Tensor], str] | None:
    """The output tensors of an API whose return annotation declares arrays, and how the API returns them.

    A batchable API returns one array: the batcher cuts one per request out of a batch's result, not tuples."""
    form = description.output_form
    batchable = description.config.batchable
    if form is None or (batchable and form != "array"):
        return None
    batch_dim = description.config.output_batch_dim if batchable else None
    tensors = []
    for i, part in enumerate(description.output_parts):
        name = part.name or (SINGLE_OUTPUT if form == "array" else f"{SINGLE_OUTPUT}__{i}")
        tensor = _array_tensor(name, part.array, batch_dim, output=True) if part.array is not None else None
        if tensor is None:
            return None
        tensors.append(tensor)
    return tensors, form


def _array_tensor(name: str, spec: ArraySpec | None, batch_dim: int | None, output: bool = False) -> Tensor | None:
    """A tensor for an array declaration; None if its dtype has no protocol datatype (so the API is no model).

    Only outputs may be BYTES (a declared ``object`` or ``str`` dtype): array inputs are numbers."""
    dtype = np.dtype(spec.dtype) if spec is not None and spec.dtype else None
    datatype = datatype_of(dtype) if dtype is not None else "FP32"
    if datatype is None or (datatype == "BYTES" and not output):
        return None
    shape = list(spec.shape) if spec is not None and spec.shape is not None else None
    if shape is not None and batch_dim is not None and batch_dim < len(shape):
        shape[batch_dim] = -1
    return Tensor(name, datatype, dtype, tuple(shape) if shape is not None else None)


def v2_routes(state: ServerState, endpoints: list[APIEndpoint]) -> list[Route]:
    """The protocol's routes for a server's tensor-shaped APIs; the others are simply not models."""
    models = {ep.name: model for ep in endpoints if (model := model_of(ep)) is not None}

    async def ready() -> bool:
        return await state.readiness() is None  # the same truth as /readyz

    async def server_metadata(request: Request) -> Response:
        return JSONResponse({"name": state.spec.name, "version": __version__, "extensions": ["binary_tensor_data"]})

    async def server_live(request: Request) -> Response:
        return Response(status_code=503 if state.failure else 200)

    async def server_ready(request: Request) -> Response:
        return Response(status_code=200 if await ready() else 503)

    async def model_metadata(request: Request) -> Response:
        return JSONResponse(_find(models, request.path_params).metadata())

    async def model_ready(request: Request) -> Response:
        name, version = request.path_params["model"], request.path_params.get("version")
        slot = state.repository.slots.get(name)
        if name not in models and slot is not None:  # a stored model the service uses: ready per version
            serving = state.repository.serving(slot)
            fine = state.repository.version_ready(name, version) if version is not None else slot.state == "READY"
            status = 200 if fine and await ready() else 503
            return JSONResponse({"name": name, "version": version or (serving[0] if serving else ""),
                                 "state": slot.state, "serving": serving, "ready": status == 200}, status)
        _find(models, request.path_params)
        return Response(status_code=200 if await ready() else 503)

    infer = _Infer(models)
    return [
        Route("/v2", server_metadata, methods=["GET"]),
        Route("/v2/health/live", server_live, methods=["GET"]),
        Route("/v2/health/ready", server_ready, methods=["GET"]),
        Route("/v2/models/{model}", model_metadata, methods=["GET"]),
        Route("/v2/models/{model}/versions/{version}", model_metadata, methods=["GET"]),
        Route("/v2/models/{model}/ready", model_ready, methods=["GET"]),
        Route("/v2/models/{model}/versions/{version}/ready", model_ready, methods=["GET"]),
        Route("/v2/models/{model}/infer", infer, methods=["POST"]),
        Route("/v2/models/{model}/versions/{version}/infer", infer, methods=["POST"]),
    ]


def _find(models: dict[str, Model], path_params: dict[str, Any]) -> Model:
    name, version = path_params["model"], path_params.get("version", VERSION)
    model = models.get(name)
    if model is None or version != VERSION:
        known = ", ".join(sorted(models)) or "none"
        raise HTTPError(404, f"no model {name!r} version {version!r} (models: {known}; every version is {VERSION!r})")
    return model


class _Infer:
    """ASGI app for ``POST .../infer``: decode tensors, run through the API's endpoint, encode tensors."""

    def __init__(self, models: dict[str, Model]) -> None:
        self.models = models

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        model = _find(self.models, scope["path_params"])
        endpoint = model.endpoint

        async def handler(scope: Scope, receive: Receive, send: Send) -> int:
            endpoint.admit()
            _, timeout = endpoint.read_headers(scope)
            body = _decompress(await endpoint.read_body(receive), scope, endpoint.state.max_body_size)
            request, binary = _split_body(body, scope)
            model.check_requested(request)
            kwargs = model.decode_inputs(request, binary)
            result = await endpoint.invoke(kwargs, timeout, receive)
            header, tail = model.encode_outputs(request, result)
            headers = [(b"content-length", str(len(header) + len(tail)).encode())]
            if tail:
                headers += [(b"content-type", b"application/octet-stream"), (HEADER_LENGTH, str(len(header)).encode())]
            else:
                headers.append((b"content-type", b"application/json"))
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": header + tail if tail else header})
            return 200

        await endpoint.serve(scope, receive, send, handler)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


def _decompress(body: bytes, scope: Scope, limit: int) -> bytes:
    """Undo ``Content-Encoding: gzip|deflate`` (tritonclient's request compression), within the body size limit."""
    encoding = (_header(scope, b"content-encoding") or "identity").strip().lower()
    if encoding == "identity":
        return body
    if encoding not in ("gzip", "deflate"):
        raise HTTPError(415, f"unsupported Content-Encoding {encoding!r}; send gzip, deflate or none")
    inflater = zlib.decompressobj(zlib.MAX_WBITS | (16 if encoding == "gzip" else 0))
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise HTTPError(400, f"the {encoding} request body does not decompress: {exc}") from None
    if len(out) > limit:
        raise HTTPError(413, f"request body is larger than the limit of {limit} bytes once decompressed", limit=limit)
    if not inflater.eof:
        raise HTTPError(400, f"the {encoding} request body is truncated")
    return out


def _split_body(body: bytes, scope: Scope) -> tuple[InferRequest, memoryview]:
    """The JSON part of the body, decoded, and the binary tensor data after it."""
    value = _header(scope, HEADER_LENGTH)
    length = len(body)
    if value is not None:
        try:
            length = int(value)
        except ValueError:
            raise HTTPError(400, "Inference-Header-Content-Length is not a number") from None
        if not 0 <= length <= len(body):
            raise HTTPError(400, f"Inference-Header-Content-Length {length} is outside the body of {len(body)} bytes")
    view = memoryview(body)
    try:
        request = _decode_request.decode(view[:length])
    except RecursionError:
        raise HTTPError(400, f"{TOO_DEEP} in the inference request") from None
    except msgspec.ValidationError as exc:
        raise HTTPError(400, f"invalid inference request: {exc}") from None
    except msgspec.DecodeError as exc:
        hint = "" if value is not None else " (binary tensor data needs the Inference-Header-Content-Length header)"
        raise HTTPError(400, f"malformed JSON in the inference request: {exc}{hint}") from None
    return request, view[length:]


def _from_binary(raw: memoryview, dtype: np.dtype, given: _TensorIn, count: int) -> np.ndarray:
    if given.datatype == "BYTES":
        return _unpack_bytes(raw, given.name)
    if len(raw) != count * dtype.itemsize:
        raise HTTPError(
            400, f"input tensor {given.name!r}: {len(raw)} bytes do not hold shape {given.shape} of {given.datatype} "
                 f"({count * dtype.itemsize} bytes)"
        )
    # A writable copy in native byte order: APIs may modify their inputs, as they can on the native route.
    return np.frombuffer(raw, dtype=dtype.newbyteorder("<")).astype(dtype)


def _from_json(data: Any, dtype: np.dtype, given: _TensorIn) -> np.ndarray:
    name, datatype = given.name, given.datatype
    if datatype == "BYTES":
        items = _flatten(data)
        if not all(isinstance(v, str) for v in items):
            raise HTTPError(400, f"input tensor {name!r}: BYTES data in JSON must be strings")
        flat = np.empty(len(items), dtype=object)
        flat[:] = [v.encode() for v in items]
        return flat
    try:
        array = np.asarray(data)
    except ValueError as exc:
        raise HTTPError(400, f"input tensor {name!r}: data is not a regular (nested) list: {exc}") from None
    if array.size:
        if array.dtype.kind not in _JSON_KINDS[dtype.kind]:
            found = _KIND_NAMES.get(array.dtype.kind, "mixed values")
            raise HTTPError(400, f"input tensor {name!r}: data is not {datatype}: it holds {found}")
        if dtype.kind in "iu":
            info = np.iinfo(dtype)
            if int(array.min()) < info.min or int(array.max()) > info.max:
                raise HTTPError(400, f"input tensor {name!r}: data is out of the range of {datatype}")
    return array.astype(dtype).reshape(-1)


def _flatten(data: Any) -> list[Any]:
    """The leaves of nested lists in order; without recursion, which JSON nested deeply enough would exhaust."""
    out: list[Any] = []
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(reversed(item))
        else:
            out.append(item)
    return out


def _unpack_bytes(raw: memoryview, name: str) -> np.ndarray:
    """BYTES in binary form: each element is a 4-byte little-endian length, then that many bytes."""
    items, i = [], 0
    while i < len(raw):
        if i + 4 > len(raw):
            raise HTTPError(400, f"input tensor {name!r}: truncated BYTES element length")
        (length,) = struct.unpack_from("<I", raw, i)
        if i + 4 + length > len(raw):
            raise HTTPError(400, f"input tensor {name!r}: BYTES element of {length} bytes runs past its data")
        items.append(bytes(raw[i + 4 : i + 4 + length]))
        i += 4 + length
    flat = np.empty(len(items), dtype=object)
    flat[:] = items
    return flat


def _one_element(spec: Tensor, given: _TensorIn, flat: np.ndarray) -> bytes | str:
    if flat.size != 1:
        raise HTTPError(400, f"input tensor {given.name!r}: the model takes one BYTES element, got shape {given.shape}")
    value = flat[0]
    if spec.kind == "bytes":
        return value
    try:
        return value.decode()
    except UnicodeDecodeError:
        raise HTTPError(400, f"input tensor {given.name!r}: the model takes text, and these bytes are not UTF-8") from None


def _fits(shape: tuple[int, ...], declared: tuple[int, ...]) -> bool:
    return len(shape) == len(declared) and all(d == -1 or d == s for d, s in zip(declared, shape))


def _flag(parameters: dict[str, Any], key: str, where: str, default: bool = False) -> bool:
    value = parameters.get(key, default)
    if not isinstance(value, bool):
        raise HTTPError(400, f"{where} parameters.{key} must be true or false, got {value!r}")
    return value


def _to_binary(array: np.ndarray, datatype: str) -> bytes:
    if datatype == "BYTES":
        return b"".join(struct.pack("<I", len(b)) + b for b in map(_as_bytes, array.reshape(-1)))
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()


def _to_json(array: np.ndarray, datatype: str, name: str) -> list[Any]:
    if datatype != "BYTES":
        flat = array.reshape(-1)
        if flat.dtype.kind == "f" and not np.isfinite(flat).all():
            index = int(np.argmin(np.isfinite(flat)))
            raise HTTPError(
                400, f"output {name!r} holds {flat[index]} at flat index {index}, which JSON cannot carry (it has no "
                     "inf or NaN); request it with parameters.binary_data: true"
            )
        return flat.tolist()
    try:
        return [b.decode() for b in map(_as_bytes, array.reshape(-1))]
    except UnicodeDecodeError:
        raise HTTPError(
            400, f"output {name!r} holds bytes that are not UTF-8, which JSON cannot carry; request it with "
                 "parameters.binary_data: true"
        ) from None


def _as_bytes(value: Any) -> bytes:
    return bytes(value) if isinstance(value, (bytes, bytearray)) else str(value).encode()
