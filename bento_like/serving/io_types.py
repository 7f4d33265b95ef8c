"""The rich IO types: ``PIL.Image.Image``, ``pandas.DataFrame``, ``torch.Tensor`` and ``pathlib.Path``.

The input Struct decodes each as what travels (an image or a path as a File, a tensor as a checked np.ndarray,
a DataFrame as JSON or a File), and a converter per such input turns that into the declared type afterwards. An
API that uses none of these types gets no converter and no encoder of this module, so its requests do no extra
work. PIL, pandas and torch are imported when a service declaring them is loaded, pyarrow at the first Arrow or
Parquet body: never at ``import bento_like``.
"""

from __future__ import annotations

import io
import mimetypes
import os
import pathlib
import tempfile
from typing import Any, Callable

import msgspec

from .._rich_values import is_tensor, to_builtins
from ..description import ARROW_STREAM, PARQUET, APIDescription, Parameter
from ..sdk.io import ContentType, DataframeSchema, File, declared
from .errors import HTTPError, validation_error

Converter = Callable[[Any], Any]
ARROW_FILE = "application/vnd.apache.arrow.file"
_JSON = "application/json"
_OCTET = "application/octet-stream"


class RichInputs:
    """The converters of an API's rich inputs, applied to the keyword arguments the input Struct decoded."""

    def __init__(self, params: tuple[Parameter, ...]) -> None:
        makers = {"image": _image_input, "dataframe": _dataframe_input, "tensor": _tensor_input, "path": _path_input}
        self.converters = tuple((p, makers[p.kind](p)) for p in params if p.kind in makers)
        self.paths = tuple(p for p in params if p.kind == "path")  # their files are deleted after the request

    def convert(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        try:
            for p, convert in self.converters:
                value = kwargs[p.name]
                if p.required or value is not p.default:  # a default is the API's own, not the wire's
                    kwargs[p.name] = convert(value)
        except BaseException:
            self.release(kwargs)  # the files written before the input that failed
            raise
        return kwargs

    def release(self, kwargs: dict[str, Any]) -> None:
        """Delete the temporary files of a request's Path inputs (the API may have removed them already)."""
        for p in self.paths:
            path = kwargs.get(p.name)
            if isinstance(path, pathlib.Path) and (p.required or path is not p.default):
                path.unlink(missing_ok=True)


def _field(p: Parameter) -> str:
    return f"$.{p.name}"


def _invalid(p: Parameter, problem: str) -> HTTPError:
    return validation_error(f"{problem} - at `{_field(p)}`")


def _unsupported(p: Parameter, given: str | None, accepted: str, what: str = "has Content-Type") -> HTTPError:
    return HTTPError(
        415, f"input {p.name!r} {what} {given or 'none'!r}; it takes {accepted} (at {_field(p)})", field=_field(p)
    )


def _media(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


def _check_declared_type(p: Parameter, accepted: ContentType | None, file: File) -> None:
    # base64 in JSON carries no content type: only a part or a raw body can be checked
    if accepted is not None and file.content_type is not None and not accepted.matches(file.content_type):
        raise _unsupported(p, _media(file.content_type), repr(accepted.media_type))


# --- inputs ------------------------------------------------------------------------------------------------------


def _image_input(p: Parameter) -> Converter:
    from PIL import Image

    accepted = declared(p.annotation, ContentType)

    def convert(file: File) -> Any:
        if _media(file.content_type) != _OCTET:  # octet-stream says nothing: the decoded format is checked below
            _check_declared_type(p, accepted, file)
        try:
            image = Image.open(io.BytesIO(file.data))
            limit = Image.MAX_IMAGE_PIXELS
            # PIL only warns between its limit and twice it; a server refuses before decoding any pixel
            if limit is not None and image.width * image.height > limit:
                raise Image.DecompressionBombError(f"{image.width * image.height} pixels")
            image.load()
        except Image.DecompressionBombError:
            raise _invalid(p, f"image has more than the server's limit of {limit} pixels") from None
        except Exception as exc:  # PIL raises many types on hostile bytes (OSError, SyntaxError, struct.error...)
            raise _invalid(p, f"not an image PIL can decode ({type(exc).__name__}: {exc})") from None
        if accepted is not None:  # a JPEG sent as image/png is still a JPEG
            actual = image.get_format_mimetype()
            if actual is not None and not accepted.matches(actual):
                raise _unsupported(p, actual, repr(accepted.media_type), what="is an image of type")
        return image

    return convert


def _path_input(p: Parameter) -> Converter:
    accepted = declared(p.annotation, ContentType)

    def convert(file: File) -> pathlib.Path:
        _check_declared_type(p, accepted, file)
        suffix = pathlib.Path(file.filename or "").suffix
        if not suffix:
            media = _media(file.content_type) or (accepted.media_type if accepted else "")
            suffix = (mimetypes.guess_extension(media) or "") if "*" not in media else ""
        fd, name = tempfile.mkstemp(prefix=f"bento_like-{p.name}-", suffix=suffix)
        with os.fdopen(fd, "wb") as out:
            out.write(file.data)
        return pathlib.Path(name)

    return convert


def _tensor_input(p: Parameter) -> Converter:
    import torch

    def convert(array: Any) -> Any:
        try:
            return torch.from_numpy(array)  # shares the array's memory: no copy
        except TypeError as exc:  # a dtype torch has no tensor type for (uint16 before torch 2.3)
            raise _invalid(p, f"cannot make a tensor of it: {exc}") from None

    return convert


def _dataframe_input(p: Parameter) -> Converter:
    import pandas as pd

    schema = declared(p.annotation, DataframeSchema)

    def convert(value: Any) -> Any:
        if isinstance(value, File):
            frame = _dataframe_from_file(p, value)
        else:
            if isinstance(value, str):  # a form field's JSON text
                value = _json(p, value)
            frame = _dataframe_from_json(p, pd, schema, value)
        if schema is not None and schema.columns is not None:
            missing = [c for c in schema.columns if c not in frame.columns]
            if missing:
                names = ", ".join(repr(c) for c in missing)
                raise _invalid(p, f"DataFrame is missing column(s) {names}; it must have {list(schema.columns)}")
            frame = frame[list(schema.columns)]
        return frame

    return convert


def _json(p: Parameter, text: str | bytes) -> Any:
    try:
        return msgspec.json.decode(text)
    except (msgspec.DecodeError, RecursionError) as exc:
        problem = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise HTTPError(400, f"input {p.name!r} must be JSON text: {problem} (at {_field(p)})", field=_field(p)) from None


def _dataframe_from_file(p: Parameter, file: File) -> Any:
    media = _media(file.content_type)
    if media in ("", _OCTET):  # an untyped upload: Parquet says so in its first bytes, else try Arrow
        media = PARQUET if file.data[:4] == b"PAR1" else ARROW_STREAM
    if media == _JSON:
        import pandas as pd

        return _dataframe_from_json(p, pd, declared(p.annotation, DataframeSchema), _json(p, file.data))
    if media not in (ARROW_STREAM, ARROW_FILE, PARQUET):
        raise _unsupported(p, media, f"{ARROW_STREAM}, {ARROW_FILE}, {PARQUET} or {_JSON}")
    import pyarrow as pa

    try:
        if media == PARQUET:
            import pyarrow.parquet as pq

            table = pq.read_table(pa.BufferReader(file.data))
        elif media == ARROW_FILE:
            table = pa.ipc.open_file(pa.BufferReader(file.data)).read_all()
        else:
            table = pa.ipc.open_stream(pa.BufferReader(file.data)).read_all()
        return table.to_pandas()
    except (pa.ArrowException, OSError, ValueError) as exc:
        what = "Parquet" if media == PARQUET else "Arrow IPC"
        raise _invalid(p, f"not a readable {what} {'file' if media != ARROW_STREAM else 'stream'} ({exc})") from None


def _dataframe_from_json(p: Parameter, pd: Any, schema: DataframeSchema | None, value: Any) -> Any:
    # Without a declared schema a list is records and an object is columns; a declared orient is held to.
    orient = schema.orient if schema is not None else ("columns" if isinstance(value, dict) else "records")
    expected = {"records": list, "values": list, "columns": dict, "index": dict, "split": dict}[orient]
    if not isinstance(value, expected):
        shape = "a list" if expected is list else "an object"
        raise _invalid(p, f"expected a DataFrame as {shape} (orient {orient!r}), got {_json_type(value)}")
    try:
        if orient == "records":
            if not all(isinstance(row, dict) for row in value):
                raise _invalid(p, "expected a DataFrame as a list of records: every row an object")
            return pd.DataFrame.from_records(value) if value else pd.DataFrame()
        if orient == "values":
            columns = list(schema.columns) if schema is not None and schema.columns else None
            return pd.DataFrame(value, columns=columns)
        if orient == "index":
            return pd.DataFrame.from_dict(value, orient="index")
        if orient == "split":
            unknown = set(value) - {"data", "columns", "index"}
            if unknown or "data" not in value:
                raise _invalid(p, "expected a DataFrame as {'data': [...], 'columns': [...], 'index': [...]}")
            return pd.DataFrame(**value)
        return pd.DataFrame(value)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise _invalid(p, f"cannot make a DataFrame of it (orient {orient!r}): {exc}") from None


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), type(value).__name__)


# --- outputs -----------------------------------------------------------------------------------------------------


def result_encoder(description: APIDescription, fallback: Callable[[Any], tuple[bytes, str]]) -> Callable[[Any], tuple[bytes, str]]:
    """How an API's result becomes a body and a media type: ``fallback`` unless its output is a rich kind."""
    kind = description.output_kind
    annotation = description.output
    if kind == "image":
        return _image_output(annotation, fallback)
    if kind == "dataframe":
        return _dataframe_output(annotation, fallback)
    if kind == "tensor":
        return lambda value: fallback(to_builtins(value) if is_tensor(value) else value)
    if kind == "path":
        return _path_output(annotation, fallback)
    return fallback


def _image_output(annotation: Any, fallback: Callable[[Any], tuple[bytes, str]]) -> Callable[[Any], tuple[bytes, str]]:
    from PIL import Image

    media = declared(annotation, ContentType)
    media_type = media.media_type if media is not None else "image/png"
    extension = mimetypes.guess_extension(media_type)
    image_format = Image.registered_extensions().get(extension or "")
    if image_format is None or image_format not in Image.SAVE:
        from ..sdk.api import ServiceDefinitionError

        raise ServiceDefinitionError(f"returned images cannot be sent as {media_type!r}: PIL writes no such format")

    def encode(value: Any) -> tuple[bytes, str]:
        if not isinstance(value, Image.Image):
            return fallback(value)
        if image_format == "JPEG" and value.mode not in ("RGB", "L", "CMYK"):
            value = value.convert("RGB")  # JPEG has no alpha channel or palette
        out = io.BytesIO()
        value.save(out, format=image_format)
        return out.getvalue(), media_type

    return encode


def _dataframe_output(annotation: Any, fallback: Callable[[Any], tuple[bytes, str]]) -> Callable[[Any], tuple[bytes, str]]:
    import pandas as pd

    schema = declared(annotation, DataframeSchema) or DataframeSchema()

    def encode(value: Any) -> tuple[bytes, str]:
        if not isinstance(value, pd.DataFrame):
            return fallback(value)
        # pandas writes NaN as null and dates as ISO text, which msgspec would refuse or write as numbers
        return value.to_json(orient=schema.orient, date_format="iso").encode(), _JSON

    return encode


def _path_output(annotation: Any, fallback: Callable[[Any], tuple[bytes, str]]) -> Callable[[Any], tuple[bytes, str]]:
    media = declared(annotation, ContentType)
    declared_type = media.media_type if media is not None and "*" not in media.media_type else None

    def encode(value: Any) -> tuple[bytes, str]:
        if not isinstance(value, pathlib.PurePath):
            return fallback(value)
        data = pathlib.Path(value).read_bytes()
        return data, declared_type or mimetypes.guess_type(value.name)[0] or _OCTET

    return encode
