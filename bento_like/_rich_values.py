"""Values of the rich IO types (PIL images, DataFrames, torch tensors, files on disk) as they travel, for the
runtime's JSON encoder and the client.

Types are recognised by their class's module and name, and each library is imported inside the function that
needs it: a value of theirs exists only where the library is already imported, and nothing here imports one at
``import bento_like``."""

from __future__ import annotations

import importlib.util
import io
import mimetypes
import os
import pathlib
import tempfile
from typing import Any

import msgspec
import numpy as np

from .description import ARROW_STREAM
from .sdk.io import File


def is_tensor(value: Any) -> bool:
    return any(c.__name__ == "Tensor" and c.__module__ == "torch" for c in type(value).__mro__)


def is_dataframe(value: Any) -> bool:
    return any(c.__name__ == "DataFrame" and c.__module__.split(".")[0] == "pandas" for c in type(value).__mro__)


def is_image(value: Any) -> bool:
    return any(c.__name__ == "Image" and c.__module__ == "PIL.Image" for c in type(value).__mro__)


def tensor_to_numpy(value: Any) -> Any:
    """A tensor's values as an np.ndarray on the CPU, out of the autograd graph."""
    tensor = value.detach().cpu()
    if str(tensor.dtype) == "torch.bfloat16":  # numpy has no bfloat16
        tensor = tensor.float()
    return tensor.numpy()


def to_builtins(value: Any) -> Any:
    """A tensor as an np.ndarray, a DataFrame as its records (a list of objects), for a msgspec ``enc_hook``;
    NotImplementedError for any other type, as msgspec expects."""
    if is_tensor(value):
        return tensor_to_numpy(value)
    if is_dataframe(value):
        # pandas writes NaN as null and dates as ISO text, which msgspec would refuse or write as numbers
        return msgspec.json.decode(value.to_json(orient="records", date_format="iso"))
    raise NotImplementedError(f"cannot encode objects of type {type(value).__name__} as JSON")


# --- the client ---------------------------------------------------------------------------------------------------


def as_upload(kind: str, value: Any) -> File | None:
    """A PIL image as PNG, a DataFrame as an Arrow IPC stream (when pyarrow is installed); None for other values:
    bytes, paths and file objects are sent as they are, a DataFrame without pyarrow and records as JSON."""
    if kind == "image" and is_image(value):
        out = io.BytesIO()
        value.save(out, format="PNG")
        return File(out.getvalue(), content_type="image/png")
    if kind == "dataframe" and is_dataframe(value) and importlib.util.find_spec("pyarrow") is not None:
        import pyarrow as pa

        table = pa.Table.from_pandas(value, preserve_index=False)
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        return File(sink.getvalue().to_pybytes(), content_type=ARROW_STREAM)
    return None


def from_json(kind: str, value: Any) -> Any:
    """A JSON result as the API's output kind says: a tensor or a DataFrame; anything else as JSON decoded it."""
    if kind == "tensor":
        import torch

        return torch.from_numpy(np.asarray(value))
    if kind == "dataframe":
        import pandas as pd

        return pd.DataFrame(value)  # records (a list of objects) or columns (an object of lists) alike
    return value


def image_from_body(body: bytes) -> Any:
    from PIL import Image

    image = Image.open(io.BytesIO(body))
    image.load()
    return image


def path_from_body(body: bytes, media: str) -> pathlib.Path:
    """A returned file written to a temporary file, as BentoML's client does; the caller owns (and deletes) it."""
    suffix = (mimetypes.guess_extension(media) or "") if media else ""
    fd, name = tempfile.mkstemp(prefix="bento_like-", suffix=suffix)
    with os.fdopen(fd, "wb") as out:
        out.write(body)
    return pathlib.Path(name)
