"""OpenAPI 3.1 document derived from the APIs' signatures: the same description the codecs decode with.

Each operation also carries ``x-bento-api``: the API name, how each input and the output travel (json,
ndarray, bytes, file, str, stream) and its batching options. The client builds its methods from it.
"""

from __future__ import annotations

import typing
from typing import Any

import msgspec
import numpy as np

from ..sdk.io import ArraySpec
from .codecs import InputCodec, _schema_hook, output_kind


def array_schema(spec: ArraySpec) -> dict[str, Any]:
    kind = np.dtype(spec.dtype).kind if spec.dtype else "f"
    leaf: dict[str, Any] = {"type": "integer"} if kind in "iu" else {"type": "boolean"} if kind == "b" else {"type": "number"}
    if spec.shape is None:
        return {"type": "array", "items": {}, "x-dtype": spec.dtype}
    schema = leaf
    for dim in reversed(spec.shape):
        schema = {"type": "array", "items": schema}
        if dim != -1:
            schema["minItems"] = schema["maxItems"] = dim
    if spec.dtype:
        schema["x-dtype"] = spec.dtype
    schema["x-shape"] = list(spec.shape)
    return schema


ERROR_STATUSES = {
    "400": "Malformed body (bad JSON)",
    "413": "Body larger than the server's limit",
    "415": "Unsupported Content-Type",
    "422": "A field is missing or has the wrong type; `field` names its path",
    "429": "Too many concurrent requests; retry after Retry-After seconds",
    "500": "The API raised; `error_id` matches the traceback in the server log",
    "503": "Not ready yet; retry after Retry-After seconds",
    "504": "The API did not finish within the service's timeout",
}


def build_openapi(service_name: str, version: str, endpoints: list[Any]) -> dict[str, Any]:
    codecs = [ep.codec for ep in endpoints]
    structs = [c.struct for c in codecs]
    outputs = []
    for ep in endpoints:
        func = getattr(ep.state.spec.cls, ep.attr)
        try:
            outputs.append(typing.get_type_hints(func, include_extras=True).get("return", Any))
        except Exception:
            outputs.append(Any)
    schemas_for, components = _components(structs, outputs)
    components["Error"] = {
        "type": "object",
        "properties": {
            "error": {"type": "string"},
            "status": {"type": "integer"},
            "field": {"type": "string"},
            "error_id": {"type": "string"},
        },
        "required": ["error", "status"],
    }
    paths: dict[str, Any] = {}
    for i, ep in enumerate(endpoints):
        codec: InputCodec = ep.codec
        input_schema = schemas_for[i]
        for p in codec.params:
            if p.array is not None and (p.array.shape or p.array.dtype):
                components[codec.struct.__name__]["properties"][p.name] = array_schema(p.array)
        content: dict[str, Any] = {"application/json": {"schema": input_schema}}
        if codec.params:
            content["multipart/form-data"] = {"schema": input_schema}
        if codec.raw_param is not None:
            content["application/octet-stream"] = {"schema": {"type": "string", "format": "binary"}}
        out_kind = output_kind(getattr(ep.state.spec.cls, ep.attr))
        paths[ep.config.route] = {
            "post": {
                "operationId": ep.config.name,
                "summary": (getattr(ep.state.spec.cls, ep.attr).__doc__ or "").strip().split("\n")[0] or None,
                "requestBody": {"required": any(p.required for p in codec.params), "content": content},
                "responses": {
                    "200": {"description": "Result", "content": _output_content(out_kind, schemas_for[len(endpoints) + i])},
                    **{
                        s: {"description": d, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
                        for s, d in ERROR_STATUSES.items()
                    },
                },
                "x-bento-api": {
                    "name": ep.config.name,
                    "inputs": {p.name: p.kind for p in codec.params},
                    "required": [p.name for p in codec.params if p.required],
                    "output": out_kind,
                    "batchable": ep.config.batchable,
                    "max_batch_size": ep.config.max_batch_size,
                    "max_latency_ms": ep.config.max_latency_ms,
                },
            }
        }
        if paths[ep.config.route]["post"]["summary"] is None:
            del paths[ep.config.route]["post"]["summary"]
    for path, summary in (("/livez", "Alive"), ("/readyz", "Ready to serve"), ("/metrics", "Prometheus metrics")):
        paths[path] = {"get": {"summary": summary, "responses": {"200": {"description": "OK"}}}}
    return {
        "openapi": "3.1.0",
        "info": {"title": service_name, "version": version},
        "paths": paths,
        "components": {"schemas": components},
    }


def _components(structs: list[Any], outputs: list[Any]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    # An output type msgspec can't describe (a Response, an iterator, a custom class) is described as
    # anything, on its own: the other APIs keep their schemas.
    describable = [t for t in outputs if _describable(t)]
    schemas, components = msgspec.json.schema_components(
        list(structs) + describable, schema_hook=_schema_hook, ref_template="#/components/schemas/{name}"
    )
    found = iter(schemas[len(structs):])
    return list(schemas[: len(structs)]) + [next(found) if _describable(t) else {} for t in outputs], dict(components)


def _describable(tp: Any) -> bool:
    try:
        msgspec.json.schema(tp, schema_hook=_schema_hook)
        return True
    except (TypeError, NotImplementedError, ValueError):
        return False


def _output_content(kind: str, schema: dict[str, Any]) -> dict[str, Any]:
    if kind == "stream":
        return {"text/event-stream": {"schema": {"type": "string"}}}
    if kind in ("bytes", "file"):
        return {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}
    if kind == "str":
        return {"text/plain": {"schema": {"type": "string"}}}
    return {"application/json": {"schema": schema}}


SWAGGER_HTML = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title} - API docs</title>
<link rel="stylesheet" href="/docs/static/swagger-ui.css">
</head>
<body>
<div id="swagger-ui"></div>
<script src="/docs/static/swagger-ui-bundle.js"></script>
<script>
window.ui = SwaggerUIBundle({{url: "/openapi.json", dom_id: "#swagger-ui", deepLinking: true}});
</script>
</body>
</html>
"""
