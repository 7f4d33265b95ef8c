"""Tensors and DataFrames as the plain values JSON carries, for the runtime's and the client's encoders.

Recognised by their class's module and name, so nothing here imports torch or pandas: a value of theirs exists
only where they are already imported."""

from __future__ import annotations

from typing import Any

import msgspec


def is_tensor(value: Any) -> bool:
    return any(c.__name__ == "Tensor" and c.__module__ == "torch" for c in type(value).__mro__)


def is_dataframe(value: Any) -> bool:
    return any(c.__name__ == "DataFrame" and c.__module__.split(".")[0] == "pandas" for c in type(value).__mro__)


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
