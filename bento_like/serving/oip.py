"""Open Inference Protocol (KServe v2) REST routes, next to the native ones, for APIs that take and give tensors.

Each API whose inputs are all arrays (or bytes/str, as BYTES tensors) and whose output is an array is a v2
model named after the API, version "1"; its input tensors are named after the parameters and its output is
``output``. Inference goes through the same endpoint as the native route (``APIEndpoint.serve`` and
``invoke``), so batching, limits, deadlines and metrics are the same. JSON tensors and the binary tensor data
extension are both supported.
"""

from __future__ import annotations

import struct
from typing import Any

import msgspec
import numpy as np
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from .. import __version__
from .codecs import _check_array
from .errors import HTTPError

HEADER_LENGTH = "inference-header-content-length"
OUTPUT = "output"

DATATYPES = {
    "BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
    "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
    "FP16": np.float16, "FP32": np.float32, "FP64": np.float64, "BYTES": np.object_,
}
_BY_DTYPE = {np.dtype(v).str: k for k, v in DATATYPES.items() if k != "BYTES"}


def datatype_of(dtype: Any) -> str:
    dtype = np.dtype(dtype)
    if dtype.kind in "OSU":
        return "BYTES"
    try:
        return _BY_DTYPE[dtype.str]
    except KeyError:
        raise HTTPError(500, f"no Open Inference Protocol datatype for numpy dtype {dtype}") from None


class TensorInput(msgspec.Struct):
    name: str
    shape: list[int]
    datatype: str
    data: Any = None
    parameters: dict[str, Any] = {}


class RequestedOutput(msgspec.Struct):
    name: str
    parameters: dict[str, Any] = {}


class InferRequest(msgspec.Struct):
    inputs: list[TensorInput]
    id: str | None = None
    parameters: dict[str, Any] = {}
    outputs: list[RequestedOutput] | None = None


_decode_request = msgspec.json.Decoder(InferRequest)


def is_tensor_api(endpoint: Any) -> bool:
    params = endpoint.codec.params
    return bool(params) and endpoint.output == "ndarray" and all(p.kind in ("ndarray", "bytes", "str") for p in params)


def metadata(endpoint: Any) -> dict[str, Any]:
    inputs = []
    for p in endpoint.codec.params:
        if p.kind == "ndarray":
            spec = p.array
            shape = list(spec.shape) if spec and spec.shape else [-1]
            datatype = datatype_of(spec.dtype) if spec and spec.dtype else "FP32"
        else:
            shape, datatype = [-1], "BYTES"
        if endpoint.config.batchable and shape:
            shape[endpoint.config.input_batch_dim] = -1
        inputs.append({"name": p.name, "datatype": datatype, "shape": shape})
    return {
        "name": endpoint.name,
        "versions": ["1"],
        "platform": "bento_like",
        "inputs": inputs,
        "outputs": [{"name": OUTPUT, "datatype": "FP32", "shape": [-1]}],
    }


def oip_routes(state: Any, endpoints: list[Any]) -> list[Route]:
    models = {ep.name: ep for ep in endpoints if is_tensor_api(ep)}

    def model_of(request: Request) -> Any:
        name = request.path_params["model"]
        version = request.path_params.get("version", "1")
        if name not in models or version != "1":
            known = ", ".join(sorted(models)) or "none"
            raise HTTPError(404, f"no model {name!r} version {version!r} (models: {known}; every version is '1')")
        return models[name]

    async def server_metadata(request: Request) -> Response:
        return JSONResponse({"name": state.spec.name, "version": __version__, "extensions": ["binary_tensor_data"]})

    async def live(request: Request) -> Response:
        return Response(status_code=503 if state.failure else 200)

    async def ready(request: Request) -> Response:
        return Response(status_code=200 if state.ready and not state.missing_workers() else 503)

    async def model_metadata(request: Request) -> Response:
        return JSONResponse(metadata(model_of(request)))

    async def model_ready(request: Request) -> Response:
        model_of(request)
        return Response(status_code=200 if state.ready else 503)

    class Infer:
        """ASGI app for ``POST .../infer``: decode tensors, run through the API's endpoint, encode tensors."""

        async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
            name = scope["path_params"]["model"]
            version = scope["path_params"].get("version", "1")
            endpoint = models.get(name) if version == "1" else None
            if endpoint is None:
                known = ", ".join(sorted(models)) or "none"
                raise HTTPError(404, f"no model {name!r} version {version!r} (models: {known}; every version is '1')")

            async def handler(scope: Scope, receive: Receive, send: Send) -> int:
                endpoint.admit()
                _, timeout = endpoint.read_headers(scope)
                body = await endpoint.read_body(receive)
                header_length = _header_length(scope, len(body))
                request = _decode(body[:header_length] if header_length is not None else body)
                binary = body[header_length:] if header_length is not None else b""
                kwargs = _inputs(endpoint, request, binary)
                result = np.asarray(await endpoint.invoke(kwargs, timeout, receive))
                return await _respond(send, endpoint, request, result)

            await endpoint.serve(scope, receive, send, handler)

    infer = Infer()
    return [
        Route("/v2", server_metadata, methods=["GET"]),
        Route("/v2/health/live", live, methods=["GET"]),
        Route("/v2/health/ready", ready, methods=["GET"]),
        Route("/v2/models/{model}", model_metadata, methods=["GET"]),
        Route("/v2/models/{model}/versions/{version}", model_metadata, methods=["GET"]),
        Route("/v2/models/{model}/ready", model_ready, methods=["GET"]),
        Route("/v2/models/{model}/versions/{version}/ready", model_ready, methods=["GET"]),
        Route("/v2/models/{model}/infer", infer, methods=["POST"]),
        Route("/v2/models/{model}/versions/{version}/infer", infer, methods=["POST"]),
    ]


def _header_length(scope: Scope, body_size: int) -> int | None:
    for key, value in scope["headers"]:
        if key == HEADER_LENGTH.encode():
            try:
                length = int(value)
            except ValueError:
                raise HTTPError(400, "Inference-Header-Content-Length is not a number") from None
            if not 0 <= length <= body_size:
                raise HTTPError(400, f"Inference-Header-Content-Length {length} is outside the body of {body_size} bytes")
            return length
    return None


def _decode(header: bytes) -> InferRequest:
    try:
        return _decode_request.decode(header)
    except msgspec.ValidationError as exc:
        raise HTTPError(400, f"invalid inference request: {exc}") from None
    except msgspec.DecodeError as exc:
        raise HTTPError(400, f"malformed JSON in the inference request: {exc}") from None


def _inputs(endpoint: Any, request: InferRequest, binary: bytes) -> dict[str, Any]:
    params = {p.name: p for p in endpoint.codec.params}
    kwargs: dict[str, Any] = {}
    offset = 0
    for tensor in request.inputs:
        param = params.get(tensor.name)
        if param is None:
            raise HTTPError(400, f"input tensor {tensor.name!r} is not an input of model {endpoint.name!r} ({', '.join(params)})")
        if tensor.name in kwargs:
            raise HTTPError(400, f"input tensor {tensor.name!r} appears twice")
        array, used = _tensor(tensor, binary, offset)
        offset += used
        if param.kind == "ndarray":
            if array.dtype == object:
                raise HTTPError(400, f"input tensor {tensor.name!r}: model {endpoint.name!r} takes numbers, not BYTES")
            if param.array is not None and (param.array.dtype or param.array.shape):
                try:
                    array = _check_array(param, array)
                except HTTPError as exc:
                    raise HTTPError(400, f"input tensor {tensor.name!r}: {exc.message}") from None
            kwargs[tensor.name] = array
        else:
            values = list(array.reshape(-1))
            value = values[0] if len(values) == 1 else values
            kwargs[tensor.name] = value.decode() if param.kind == "str" and isinstance(value, bytes) else value
    if offset != len(binary):
        raise HTTPError(400, f"{len(binary) - offset} bytes of binary data follow the JSON but no input claims them")
    missing = [p.name for p in params.values() if p.required and p.name not in kwargs]
    if missing:
        raise HTTPError(400, f"missing input tensor(s) {', '.join(map(repr, missing))} for model {endpoint.name!r}")
    return kwargs


def _tensor(tensor: TensorInput, binary: bytes, offset: int) -> tuple[np.ndarray, int]:
    dtype = DATATYPES.get(tensor.datatype)
    if dtype is None:
        raise HTTPError(400, f"input tensor {tensor.name!r}: datatype {tensor.datatype!r} is not supported "
                             f"({', '.join(DATATYPES)})")
    if any(not isinstance(d, int) or d < 0 for d in tensor.shape):
        raise HTTPError(400, f"input tensor {tensor.name!r}: shape {tensor.shape} must be non-negative integers")
    count = int(np.prod(tensor.shape)) if tensor.shape else 1
    size = tensor.parameters.get("binary_data_size")
    if size is not None:
        raw = binary[offset : offset + size]
        if len(raw) != size:
            raise HTTPError(400, f"input tensor {tensor.name!r}: binary_data_size {size} runs past the body")
        if tensor.datatype == "BYTES":
            flat = _unpack_bytes(raw, tensor.name)
        else:
            if size != count * np.dtype(dtype).itemsize:
                raise HTTPError(400, f"input tensor {tensor.name!r}: {size} bytes do not hold shape {tensor.shape} "
                                     f"of {tensor.datatype}")
            flat = np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<"))
        used = size
    else:
        if tensor.data is None:
            raise HTTPError(400, f"input tensor {tensor.name!r} has neither data nor binary_data_size")
        try:
            if tensor.datatype == "BYTES":
                flat = np.array([v.encode() if isinstance(v, str) else v for v in np.asarray(tensor.data, dtype=object).reshape(-1)], dtype=object)
            else:
                flat = np.asarray(tensor.data, dtype=dtype).reshape(-1)
        except (ValueError, TypeError) as exc:
            raise HTTPError(400, f"input tensor {tensor.name!r}: data is not {tensor.datatype}: {exc}") from None
        used = 0
    if flat.size != count:
        raise HTTPError(400, f"input tensor {tensor.name!r}: shape {tensor.shape} needs {count} elements, data has {flat.size}")
    return flat.reshape(tensor.shape), used


def _unpack_bytes(raw: bytes, name: str) -> np.ndarray:
    items, i = [], 0
    while i < len(raw):
        if i + 4 > len(raw):
            raise HTTPError(400, f"input tensor {name!r}: truncated BYTES element")
        (length,) = struct.unpack_from("<I", raw, i)
        items.append(raw[i + 4 : i + 4 + length])
        i += 4 + length
    return np.array(items, dtype=object)


async def _respond(send: Send, endpoint: Any, request: InferRequest, result: np.ndarray) -> int:
    binary_all = bool(request.parameters.get("binary_data_output", False))
    wants_binary = binary_all
    if request.outputs:
        for out in request.outputs:
            if out.name != OUTPUT:
                raise HTTPError(400, f"model {endpoint.name!r} has no output {out.name!r}; its output is {OUTPUT!r}")
            wants_binary = bool(out.parameters.get("binary_data", binary_all))
    datatype = datatype_of(result.dtype)
    output: dict[str, Any] = {"name": OUTPUT, "datatype": datatype, "shape": list(result.shape)}
    tail = b""
    if wants_binary:
        if datatype == "BYTES":
            tail = b"".join(struct.pack("<I", len(b)) + b for b in (_as_bytes(v) for v in result.reshape(-1)))
        else:
            tail = np.ascontiguousarray(result, dtype=result.dtype.newbyteorder("<")).tobytes()
        output["parameters"] = {"binary_data_size": len(tail)}
    else:
        output["data"] = [_as_text(v) for v in result.reshape(-1)] if datatype == "BYTES" else result.reshape(-1).tolist()
    payload: dict[str, Any] = {"model_name": endpoint.name, "model_version": "1", "outputs": [output]}
    if request.id is not None:
        payload["id"] = request.id
    header = msgspec.json.encode(payload)
    headers = [(b"content-length", str(len(header) + len(tail)).encode())]
    if tail:
        headers += [(b"content-type", b"application/octet-stream"), (HEADER_LENGTH.encode(), str(len(header)).encode())]
    else:
        headers.append((b"content-type", b"application/json"))
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": header + tail})
    return 200


def _as_bytes(value: Any) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


def _as_text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)
