"""One description per served API, derived once from its declaration; every surface of the API reads it.

The runtime's codec decodes requests with the input Struct described here and the Open Inference Protocol takes
its tensors from it; the OpenAPI document (with the ``x-bento-api`` extension the client builds its methods from)
and the bento manifest's API entries are written from it. It imports no web framework and nothing of the runtime
or the builders, so ``pkg build`` describes a service without the server that will run it.
"""

from __future__ import annotations

import collections.abc
import inspect
import re
import typing
from dataclasses import dataclass
from typing import Any, Callable

import msgspec
import msgspec.inspect
import numpy as np

from ._constraints import (
    NeedsPydantic,
    field_default,
    for_msgspec,
    is_field_info,
    is_pydantic_model,
    pydantic,
    pydantic_schema,
)
from .sdk.api import APIConfig, ServiceDefinitionError
from .sdk.io import ArraySpec, ContentType, DataframeSchema, File, array_spec, declared, rich_kind
from .sdk.service import ServiceSpec

API_EXTENSION = "x-bento-api"
"""The OpenAPI operation extension that says how an API's inputs and output travel (the client reads it)."""


@dataclass(frozen=True)
class Parameter:
    """One input of an API and how it travels."""

    name: str
    annotation: Any
    kind: str  # "json", "ndarray", "bytes", "file", "str", or a rich kind: "image", "dataframe", "tensor", "path"
    array: ArraySpec | None  # set for array inputs: the dtype and shape they must have
    required: bool
    default: Any = None  # the default of an input that is not required
    decoded_as: Any = None  # the type msgspec decodes it as, when not the annotation (constraints rewritten)
    pydantic: bool = False  # validated by Pydantic after decoding (msgspec decodes it as any JSON value)

    @property
    def field_type(self) -> Any:
        """The type the input Struct decodes it as: an array (or tensor) as np.ndarray, checked against ``array``
        after; an image or path as a File and a DataFrame as any JSON value, which the runtime converts after."""
        if self.array is not None:
            return np.ndarray
        if self.pydantic:
            return Any
        if self.kind in _RICH_FIELD_TYPES:
            return _RICH_FIELD_TYPES[self.kind]
        return self.annotation if self.decoded_as is None else self.decoded_as

    @property
    def json_in_form(self) -> bool:
        """Whether a multipart form carries this input as JSON text: arrays, Structs, dicts, lists and the like,
        which a form field's plain text cannot hold. Text, numbers and booleans travel as their own text."""
        if self.pydantic:
            return _pydantic_container(self.annotation)
        return self.array is not None or (self.kind == "json" and _is_container(self.field_type))


_RICH_FIELD_TYPES: dict[str, Any] = {"image": File, "path": File, "dataframe": Any}
RAW_KINDS = ("bytes", "file", "image", "path", "dataframe")
"""The kinds a lone input of an API may also arrive as: the whole request body."""
ARROW_STREAM = "application/vnd.apache.arrow.stream"
PARQUET = "application/vnd.apache.parquet"


@dataclass(frozen=True)
class OutputPart:
    """One part of a result whose annotation declares parts: the array itself, or an item of a fixed tuple,
    NamedTuple or TypedDict (the Open Inference Protocol makes each an output tensor when it is an array)."""

    name: str | None  # the field or key; None for the result itself and the items of a plain tuple
    array: ArraySpec | None  # None when this part is not declared as an array


@dataclass(frozen=True)
class APIDescription:
    """Everything the served surfaces need of one API, taken from its signature and ``@api`` options."""

    config: APIConfig
    params: tuple[Parameter, ...]
    input_struct: type[msgspec.Struct]  # a JSON body (or form) decodes into it, validated in one pass
    output: Any  # the return annotation; Any when there is none
    output_kind: str  # "json", "ndarray", "bytes", "file", "str", a rich kind (Parameter.kind); "stream" (events)
    # or "text_stream" (of str) for a generator
    output_form: str | None  # "array", "tuple" or "dict" when the annotation declares its parts, else None
    output_parts: tuple[OutputPart, ...]  # in the order the result holds them
    summary: str | None  # the first sentence of the docstring

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def route(self) -> str:
        return self.config.route

    @property
    def raw_input(self) -> Parameter | None:
        """The one bytes/File/image/path/DataFrame input of an API that takes only that: it may also arrive as the
        whole body."""
        if len(self.params) == 1 and self.params[0].kind in RAW_KINDS:
            return self.params[0]
        return None

    def extension(self) -> dict[str, Any]:
        """The ``x-bento-api`` value of the API's OpenAPI operation."""
        return {
            "name": self.name,
            "inputs": {p.name: p.kind for p in self.params},
            "required": [p.name for p in self.params if p.required],
            "output": self.output_kind,
            "batchable": self.config.batchable,
            **({"method": self.config.method} if self.config.method != "POST" else {}),
            "max_batch_size": self.config.max_batch_size,
            "max_latency_ms": self.config.max_latency_ms,
            "task": self.config.task,
        }


def describe(spec: ServiceSpec) -> list[APIDescription]:
    """The description of every API of a service, in declaration order; raises ServiceDefinitionError for an
    API that cannot be served."""
    return [describe_api(getattr(spec.cls, entry.attr), entry.config) for entry in spec.apis]


def describe_api(func: Callable[..., Any], config: APIConfig) -> APIDescription:
    """Describe the API ``config`` declares on ``func``.

    A type that cannot be decoded or described, or an annotation that does not resolve, fails here, at load,
    rather than on the first request."""
    try:
        hints = typing.get_type_hints(func, include_extras=True)
    except Exception as exc:  # an unresolvable forward reference, named by the exception
        raise ServiceDefinitionError(f"API {config.name!r}: cannot resolve its type annotations: {exc}") from exc
    signature = inspect.signature(func)
    params = [_parameter(config.name, name, hints.get(name, Any), signature.parameters[name].default)
              for name in config.params]
    if config.method == "GET":
        _check_query_inputs(config.name, params)
    rich = [p for p in params if p.kind in _RICH_TYPE_NAMES]
    if config.batchable and rich:
        # the batcher concatenates and splits np.ndarrays and lists; it does not know these types
        raise ServiceDefinitionError(
            f"batchable API {config.name!r}: its input {rich[0].name!r} is a {_RICH_TYPE_NAMES[rich[0].kind]}, which "
            "the batcher cannot merge; declare it as np.ndarray (torch.from_numpy(x) makes a tensor of it without "
            "a copy) or set batchable=False"
        )
    output = hints.get("return", Any)
    streams = inspect.isgeneratorfunction(func) or inspect.isasyncgenfunction(func)
    form, parts = _output_parts(output)
    return APIDescription(
        config=config,
        params=tuple(params),
        input_struct=_input_struct(config.name, params),
        output=output,
        output_kind=("text_stream" if _yields_text(output) else "stream") if streams else _kind(output, array_spec(output)),
        output_form=form,
        output_parts=parts,
        summary=_summary(func.__doc__),
    )


_CONTAINER_TYPES = (
    msgspec.inspect.StructType, msgspec.inspect.DataclassType, msgspec.inspect.TypedDictType,
    msgspec.inspect.NamedTupleType, msgspec.inspect.DictType, msgspec.inspect.ListType, msgspec.inspect.TupleType,
    msgspec.inspect.VarTupleType, msgspec.inspect.SetType, msgspec.inspect.FrozenSetType,
)
_TEXT_TYPES = (msgspec.inspect.StrType, msgspec.inspect.LiteralType, msgspec.inspect.EnumType, msgspec.inspect.AnyType)


def _is_container(annotation: Any) -> bool:
    """A type whose values are JSON objects or arrays, and never text (a union with ``str`` may be either)."""
    try:
        info = msgspec.inspect.type_info(annotation)
    except (TypeError, ValueError):
        return False
    if isinstance(info, msgspec.inspect.Metadata):
        info = info.type
    members = info.types if isinstance(info, msgspec.inspect.UnionType) else (info,)
    members = tuple(m.type if isinstance(m, msgspec.inspect.Metadata) else m for m in members)
    containers = any(isinstance(m, _CONTAINER_TYPES) for m in members)
    return containers and not any(isinstance(m, _TEXT_TYPES) for m in members)


def _parameter(api_name: str, name: str, annotation: Any, default: Any) -> Parameter:
    """One input, with its constraints made enforceable: by msgspec where it can, else by Pydantic."""
    if is_field_info(default):  # `x: float = pydantic.Field(1.0, le=2)`
        info, default, required = field_default(default)
        annotation = typing.Annotated[annotation, info]
    else:
        required = default is inspect.Parameter.empty
        default = None if required else default
    spec = array_spec(annotation)
    kind = _kind(annotation, spec)
    if spec is not None:
        return Parameter(name, annotation, kind, spec, required, default)
    try:
        decoded_as = for_msgspec(annotation)
    except NeedsPydantic as why:
        if pydantic() is None:
            raise ServiceDefinitionError(
                f"API {api_name!r}: input {name!r} declares {why}, which only Pydantic validates, and pydantic is "
                "not installed: pip install pydantic, or write the constraint as msgspec.Meta(...)"
            ) from None
        return Parameter(name, annotation, kind, None, required, default, pydantic=True)
    return Parameter(name, annotation, kind, None, required, default, None if decoded_as is annotation else decoded_as)


_QUERY_TYPES = (msgspec.inspect.StrType, msgspec.inspect.IntType, msgspec.inspect.FloatType, msgspec.inspect.BoolType,
                msgspec.inspect.LiteralType, msgspec.inspect.EnumType, msgspec.inspect.NoneType)


def _check_query_inputs(api_name: str, params: list[Parameter]) -> None:
    """A GET API's inputs arrive as query parameters, which hold text: each must be a scalar."""
    for p in params:
        try:
            info = msgspec.inspect.type_info(Any if p.pydantic else p.field_type)
        except (TypeError, ValueError):
            info = None
        if isinstance(info, msgspec.inspect.Metadata):
            info = info.type
        members = info.types if isinstance(info, msgspec.inspect.UnionType) else (info,)
        if p.pydantic or p.array is not None or not all(isinstance(m, _QUERY_TYPES) for m in members):
            raise ServiceDefinitionError(
                f"GET API {api_name!r}: input {p.name!r} is not a scalar (str, int, float, bool, a Literal or an "
                "Enum), and a query parameter holds only text; use method='POST' for structured inputs"
            )


def _pydantic_container(annotation: Any) -> bool:
    """Whether a Pydantic-validated input's values are JSON objects or arrays (a model, a list...)."""
    while typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    if is_pydantic_model(annotation):
        return True
    return typing.get_origin(annotation) in (list, dict, tuple, set, frozenset) or _is_container(annotation)


_ITERATORS = (
    collections.abc.Generator, collections.abc.Iterator, collections.abc.Iterable,
    collections.abc.AsyncGenerator, collections.abc.AsyncIterator, collections.abc.AsyncIterable,
)


def _yields_text(annotation: Any) -> bool:
    """A generator annotated to yield ``str`` streams plain text chunks; any other item type streams events."""
    args = typing.get_args(annotation)
    return typing.get_origin(annotation) in _ITERATORS and bool(args) and args[0] is str


def _kind(annotation: Any, spec: ArraySpec | None) -> str:
    rich = rich_kind(annotation)
    if rich is not None:
        return rich
    if spec is not None:
        return "ndarray"
    if annotation is bytes:
        return "bytes"
    if annotation is File:
        return "file"
    if annotation is str:
        return "str"
    return "json"


def _summary(doc: str | None) -> str | None:
    """The docstring's first sentence (its first paragraph, where that has no sentence end)."""
    paragraph = " ".join(line.strip() for line in inspect.cleandoc(doc or "").split("\n\n", 1)[0].splitlines())
    match = re.match(r"(.+?[.!?])(?:\s|$)", paragraph)
    return (match.group(1) if match else paragraph) or None


_RICH_TYPE_NAMES = {"image": "PIL.Image.Image", "dataframe": "pandas.DataFrame", "tensor": "torch.Tensor",
                    "path": "pathlib.Path"}


def _nested_rich(annotation: Any) -> str | None:
    """The rich kind of a type nested in a union or a container (``Image.Image | None``, ``list[Path]``)."""
    for arg in typing.get_args(annotation):
        found = rich_kind(arg) or _nested_rich(arg)
        if found is not None:
            return found
    return None


def _input_struct(api_name: str, params: list[Parameter]) -> type[msgspec.Struct]:
    for p in params:
        nested = _nested_rich(p.annotation) if p.kind == "json" else None
        if nested is not None:
            raise ServiceDefinitionError(
                f"API {api_name!r}: input {p.name!r} holds a {_RICH_TYPE_NAMES[nested]} inside a union or container "
                f"({p.annotation!r}); an image, DataFrame, tensor or Path input is declared alone, "
                "without Optional or a default of None"
            )
    fields = [(p.name, p.field_type) if p.required else (p.name, p.field_type, _struct_default(p)) for p in params]
    struct = msgspec.defstruct(f"{api_name}_input", fields, forbid_unknown_fields=True, kw_only=True, module=__name__)
    try:  # msgspec describes exactly the types it can decode
        msgspec.json.schema_components([struct], schema_hook=_schema_hook)
    except (TypeError, NotImplementedError) as exc:
        # msgspec's message explains schema hooks over several lines; its last line names the type
        what = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise ServiceDefinitionError(
            f"API {api_name!r}: an input type cannot be served ({what}); use builtins, msgspec Structs, "
            "dataclasses, np.ndarray, torch.Tensor, PIL.Image.Image, pandas.DataFrame, pathlib.Path, bytes or "
            "bento_like.File"
        ) from None
    return struct


def _struct_default(p: Parameter) -> Any:
    """The input Struct's default for ``p``: a Pydantic-validated input's default (a model instance, say) is given
    as it is, through a factory, since msgspec could not write it into the schema."""
    if p.pydantic and not isinstance(p.default, type(msgspec.field())):
        default = p.default
        return msgspec.field(default_factory=lambda: default)
    return p.default


def _output_parts(annotation: Any) -> tuple[str | None, tuple[OutputPart, ...]]:
    """How a result declared as ``annotation`` holds its parts: one array, a fixed tuple or NamedTuple, or a
    TypedDict. (None, ()) for anything else, and for parts whose own annotations do not resolve."""
    spec = array_spec(annotation)
    if spec is not None:
        return "array", (OutputPart(None, spec),)
    try:
        if isinstance(annotation, type) and issubclass(annotation, tuple) and hasattr(annotation, "_fields"):
            hints = typing.get_type_hints(annotation, include_extras=True)
            return "tuple", tuple(OutputPart(f, array_spec(hints.get(f))) for f in annotation._fields)
        if typing.is_typeddict(annotation):
            hints = typing.get_type_hints(annotation, include_extras=True)
            return "dict", tuple(OutputPart(k, array_spec(t)) for k, t in hints.items())
    except (NameError, TypeError):
        return None, ()
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is tuple and args and Ellipsis not in args:
        return "tuple", tuple(OutputPart(None, array_spec(t)) for t in args)
    return None, ()


# --- the OpenAPI 3.1 document -----------------------------------------------------------------------------------

_ERROR_STATUSES = {
    "400": "Malformed body (bad JSON)",
    "413": "Body larger than the server's limit",
    "415": "Unsupported Content-Type",
    "422": "A field is missing or has the wrong type; `field` names its path",
    "429": "Too many concurrent requests; retry after Retry-After seconds",
    "500": "The API raised; `error_id` matches the traceback in the server log",
    "503": "Not ready yet; retry after Retry-After seconds",
    "504": "The API did not finish within the service's timeout",
}


def openapi_document(service_name: str, version: str, descriptions: list[APIDescription]) -> dict[str, Any]:
    """The OpenAPI 3.1 document a server of these APIs publishes at ``/openapi.json``, and a bento carries."""
    schemas_for, components = _components([d.input_struct for d in descriptions], [d.output for d in descriptions])
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
    for i, d in enumerate(descriptions):
        input_schema = schemas_for[i]
        for p in d.params:
            if p.array is not None and (p.array.shape or p.array.dtype):
                components[d.input_struct.__name__]["properties"][p.name] = _array_schema(p.array)
            elif p.pydantic:
                schema, defs = pydantic_schema(p.annotation)
                components[d.input_struct.__name__]["properties"][p.name] = schema
                components.update(defs)
            elif p.kind == "dataframe":
                components[d.input_struct.__name__]["properties"][p.name] = _dataframe_schema(p.annotation)
        if _validated_by_pydantic(d.output):
            schemas_for[len(descriptions) + i], defs = pydantic_schema(d.output)
            components.update(defs)
        content: dict[str, Any] = {"application/json": {"schema": input_schema}}
        if d.params:
            content["multipart/form-data"] = {"schema": input_schema}
            as_json = {p.name: {"contentType": "application/json"} for p in d.params if p.json_in_form}
            as_json.update({p.name: {"contentType": t[0]} for p in d.params if (t := _declared_types(p.annotation))})
            if as_json:
                content["multipart/form-data"]["encoding"] = as_json
        if d.raw_input is not None:
            for media in _raw_media_types(d.raw_input):
                content[media] = {"schema": {"type": "string", "format": "binary"}}
        operation: dict[str, Any] = {"operationId": d.name}
        if d.summary is not None:
            operation["summary"] = d.summary
        if d.config.method == "GET":
            properties = components[d.input_struct.__name__].get("properties", {})
            operation["parameters"] = [
                {"name": p.name, "in": "query", "required": p.required, "schema": properties.get(p.name, {})}
                for p in d.params
            ]
        else:
            operation["requestBody"] = {"required": any(p.required for p in d.params), "content": content}
        output_schema = schemas_for[len(descriptions) + i]
        operation["responses"] = {
            "200": {"description": "Result", "content": _output_content(d.output_kind, output_schema, d.output)},
            **{status: _error_response(text) for status, text in _ERROR_STATUSES.items()},
        }
        operation[API_EXTENSION] = d.extension()
        paths[d.route] = {d.config.method.lower(): operation}
        if d.config.task:
            paths.update(_task_paths(d, operation))
    for path, summary in (("/livez", "Alive"), ("/readyz", "Ready to serve"), ("/metrics", "Prometheus metrics")):
        paths[path] = {"get": {"summary": summary, "responses": {"200": {"description": "OK"}}}}
    if any(d.config.task for d in descriptions):
        components["TaskStatus"] = _TASK_STATUS_SCHEMA
    return {
        "openapi": "3.1.0",
        "info": {"title": service_name, "version": version},
        "paths": paths,
        "components": {"schemas": components},
    }


def _validated_by_pydantic(tp: Any) -> bool:
    """Whether only Pydantic can describe ``tp`` (a model, or a type holding one)."""
    try:
        for_msgspec(tp)
    except NeedsPydantic:
        return pydantic() is not None
    except ServiceDefinitionError:
        return False
    return False
_TASK_STATUS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "task_id": {"type": "string"},
        "status": {"type": "string", "enum": ["pending", "in_progress", "completed", "failed", "canceled"]},
        "created_at": {"type": "string", "format": "date-time"},
        "executed_at": {"anyOf": [{"type": "string", "format": "date-time"}, {"type": "null"}]},
        "completed_at": {"anyOf": [{"type": "string", "format": "date-time"}, {"type": "null"}]},
    },
    "required": ["task_id", "status"],
}


def _task_paths(d: APIDescription, operation: dict[str, Any]) -> dict[str, Any]:
    """The routes of a task (docs/tasks.md): submit takes the API's body; the others take ``?task_id=``."""
    task_id = [{"name": "task_id", "in": "query", "required": True,
                "schema": {"type": "string", "pattern": "^[0-9a-f]{32}$"}}]
    status = {"description": "The task's status", "content": {"application/json": {
        "schema": {"$ref": "#/components/schemas/TaskStatus"}}}}
    unknown = _error_response("No such task (never submitted, or forgotten past the result TTL)")
    submitted = {"200": status, **{k: v for k, v in operation["responses"].items() if k in ("400", "413", "415",
                                                                                             "422", "429", "503")}}
    base = {"x-bento-task": d.name}
    return {
        f"{d.route}/submit": {"post": {
            **base, "operationId": f"{d.name}_submit", "summary": f"Submit a task of {d.name}",
            "requestBody": operation["requestBody"], "responses": submitted}},
        f"{d.route}/status": {"get": {
            **base, "operationId": f"{d.name}_status", "summary": f"The status of a task of {d.name}",
            "parameters": task_id, "responses": {"200": status, "404": unknown}}},
        f"{d.route}/get": {"get": {
            **base, "operationId": f"{d.name}_get", "summary": f"The result of a finished task of {d.name}",
            "parameters": task_id, "responses": {
                "200": operation["responses"]["200"], "404": unknown,
                "409": _error_response("The task is not finished yet"),
                "410": _error_response("The task was canceled: it has no result"),
                "500": _error_response("The task failed; `error_id` matches the traceback in the server log"),
                "504": _error_response("The task did not finish within its run limit"),
            }}},
        f"{d.route}/cancel": {"put": {
            **base, "operationId": f"{d.name}_cancel", "summary": f"Cancel a pending or running task of {d.name}",
            "parameters": task_id, "responses": {
                "200": status, "404": unknown, "409": _error_response("The task had already finished")}}},
        f"{d.route}/retry": {"post": {
            **base, "operationId": f"{d.name}_retry", "summary": f"Run a failed task of {d.name} again, as a new task",
            "parameters": task_id, "responses": {
                "200": status, "404": unknown, "409": _error_response("The task did not fail, or kept no input"),
                "429": operation["responses"]["429"]}}},
    }


def _error_response(text: str) -> dict[str, Any]:
    return {"description": text, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}


def _schema_hook(tp: Any) -> dict[str, Any]:
    if tp is np.ndarray:
        return {"type": "array", "items": {}, "description": "a (nested) list of numbers: an n-dimensional array"}
    if tp is File:
        return {"type": "string", "format": "binary"}
    raise NotImplementedError(f"no JSON schema for {tp!r}")


def _array_schema(spec: ArraySpec) -> dict[str, Any]:
    kind = np.dtype(spec.dtype).kind if spec.dtype else "f"
    leaf: dict[str, Any] = {"type": "integer" if kind in "iu" else "boolean" if kind == "b" else "number"}
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


def _components(structs: list[Any], outputs: list[Any]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The schemas of the inputs, then of the outputs, and the components they refer to.

    An output type msgspec cannot describe (a Response, an iterator, a custom class) is described as anything,
    on its own: the other APIs keep their schemas."""
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


def _declared_types(annotation: Any) -> tuple[str, ...]:
    """The media type an image or path input declares with ContentType, as a 1-tuple; () when it declares none."""
    declared_type = declared(annotation, ContentType)
    return (declared_type.media_type,) if declared_type is not None else ()


def _raw_media_types(p: Parameter) -> tuple[str, ...]:
    """The Content-Types a lone input arrives with as the whole body, as the document lists them."""
    if p.kind == "image":
        return _declared_types(p.annotation) or ("image/png", "image/jpeg")
    if p.kind == "path":
        return _declared_types(p.annotation) or ("application/octet-stream",)
    if p.kind == "dataframe":
        return (ARROW_STREAM, PARQUET)
    return ("application/octet-stream",)


def _dataframe_schema(annotation: Any) -> dict[str, Any]:
    """A DataFrame as JSON in its declared orient (records unless DataframeSchema says otherwise)."""
    schema = declared(annotation, DataframeSchema) or DataframeSchema()
    columns = list(schema.columns) if schema.columns else None
    if schema.orient == "records":
        row: dict[str, Any] = {"type": "object"}
        if columns:
            row["properties"] = {c: {} for c in columns}
            row["required"] = columns
        return {"type": "array", "items": row, "description": "a DataFrame as a list of records (rows)"}
    if schema.orient == "values":
        return {"type": "array", "items": {"type": "array"}, "description": "a DataFrame as a list of rows"}
    return {"type": "object", "description": f"a DataFrame as JSON in pandas' {schema.orient!r} orient"}


def _output_content(kind: str, schema: dict[str, Any], annotation: Any = None) -> dict[str, Any]:
    if kind == "text_stream":
        return {"text/plain": {"schema": {"type": "string"}}}
    binary = {"schema": {"type": "string", "format": "binary"}}
    if kind == "image":
        return {media: binary for media in _declared_types(annotation) or ("image/png",)}
    if kind == "path":
        return {media: binary for media in _declared_types(annotation) or ("application/octet-stream",)}
    if kind == "dataframe":
        return {"application/json": {"schema": _dataframe_schema(annotation)}}
    if kind == "tensor":
        spec = array_spec(annotation)
        return {"application/json": {"schema": _array_schema(spec) if spec else {"type": "array", "items": {}}}}
    if kind == "stream":
        return {"text/event-stream": {"schema": {"type": "string"}}}
    if kind in ("bytes", "file"):
        return {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}
    if kind == "str":
        return {"text/plain": {"schema": {"type": "string"}}}
    return {"application/json": {"schema": schema}}
