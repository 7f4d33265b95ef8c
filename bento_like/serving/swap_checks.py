"""What a model swap checks before a new version serves: an input to call each API with, the answers' structure
compared with the serving version's, a quality metric when asked, and whether memory holds both versions."""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import _fidelity

if TYPE_CHECKING:
    from ..models import Model
    from .app import ServerState
    from .instances import Generation
    from .routes import APIEndpoint

log = logging.getLogger("bento_like.serving")


class LoadFailed(Exception):
    """A load or unload that did not happen; ``status`` is the HTTP answer, the message its reason."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Check:
    """What a load verifies before the swap: each API's output against the serving version's, and a metric."""

    metric: str | None = None  # cosine, max_abs or argmax
    min: float | None = None
    max: float | None = None

    @classmethod
    def parse(cls, raw: Any) -> Check | None:
        if raw is None:
            return None
        if not isinstance(raw, dict) or set(raw) - {"metric", "min", "max"}:
            raise LoadFailed("parameters.quality must be an object with metric and min or max, e.g. "
                             '{"metric": "cosine", "min": 0.99}')
        metric = raw.get("metric", "cosine")
        if metric not in ("cosine", "max_abs", "argmax"):
            raise LoadFailed(f"parameters.quality.metric must be cosine, max_abs or argmax, got {metric!r}")
        low, high = raw.get("min"), raw.get("max")
        for key, value in (("min", low), ("max", high)):
            if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)):
                raise LoadFailed(f"parameters.quality.{key} must be a number, got {value!r}")
        if (low is None) == (high is None):
            if low is None and high is None:
                low, high = (None, 1e-2) if metric == "max_abs" else (0.99, None)
            else:
                raise LoadFailed("parameters.quality takes min or max, not both")
        return cls(metric, low, high)


def example_input(state: ServerState, ep: APIEndpoint) -> dict[str, Any] | None:
    """An input to call ``ep`` with before a new version serves: its warm-up input when it declares one (or one
    made from the model's signature), else the last input it served."""
    plan = state.warmups.get(ep.name)
    if plan is not None:
        try:
            kwargs = plan.complete(state.spec, ep)
            if plan.made_up and ep.codec.rich is not None:
                kwargs = ep.codec.rich.convert(dict(kwargs))
            return kwargs
        except Exception:  # noqa: BLE001 - fall back to a served input
            log.debug("no warm-up input for %r", ep.name, exc_info=True)
    if ep.context is not None or (ep.codec.rich is not None and ep.codec.rich.paths):
        return None  # its request context and its uploaded files were released with its response
    return ep.last_input


async def call_on(ep: APIEndpoint, inst: Any, gen: Generation, kwargs: dict[str, Any]) -> Any:
    method = getattr(gen.obj, ep.attr)
    if ep.config.batchable:
        value = kwargs[ep.config.params[0]]
        return await (method(value) if ep.is_async else inst.runner.submit(method, value))
    return await (method(**kwargs) if ep.is_async else inst.runner.submit(method, **kwargs))


def structure(value: Any) -> tuple[Any, ...]:
    """What must not change between versions: types, array shapes and dtypes, keys, a tuple's items. A list's
    length may (how many detections an image holds is the model's answer, not its shape): its items' may not."""
    if isinstance(value, np.ndarray):
        return ("array", value.shape, value.dtype.str)
    if hasattr(value, "shape") and hasattr(value, "dtype"):  # a framework tensor
        return ("tensor", type(value).__name__, tuple(value.shape), str(value.dtype))
    if isinstance(value, dict):
        return ("dict", tuple((k, structure(v)) for k, v in value.items()))
    if isinstance(value, tuple):
        return ("tuple", tuple(structure(v) for v in value))
    if isinstance(value, list):
        return ("list", structure(value[0]) if value else None)
    return ("value", type(value).__name__)


def same_structure(was: tuple[Any, ...], now: tuple[Any, ...]) -> bool:
    """Whether two ``structure`` results agree; an empty list agrees with any list (nothing to compare)."""
    if was[0] != now[0]:
        return False
    kind = was[0]
    if kind == "list":
        return was[1] is None or now[1] is None or same_structure(was[1], now[1])
    if kind == "dict":
        return [k for k, _ in was[1]] == [k for k, _ in now[1]] and all(
            same_structure(a, b) for (_, a), (_, b) in zip(was[1], now[1]))
    if kind == "tuple":
        return len(was[1]) == len(now[1]) and all(same_structure(a, b) for a, b in zip(was[1], now[1]))
    return was == now


def show(s: tuple[Any, ...]) -> str:
    if s[0] == "array":
        return f"an array of shape {s[1]} ({np.dtype(s[2]).name})"
    if s[0] == "tensor":
        return f"a {s[1]} of shape {s[2]} ({s[3]})"
    if s[0] == "value":
        return f"a {s[1]}"
    return repr(s)


def check_quality(api: str, check: Check, old: Any, new: Any) -> None:
    ref, cand = _first_array(old), _first_array(new)
    if ref is None or cand is None:
        raise LoadFailed(f"parameters.quality: API {api!r} returns no array to compare")
    ref, cand = _rows(ref), _rows(cand)
    if check.metric == "cosine":
        value = float(_fidelity.cosine(ref, cand).mean())
    elif check.metric == "max_abs":
        value = _fidelity.max_abs(ref, cand)
    else:
        agreement = _fidelity.argmax_agreement(ref, cand)
        if agreement is None:
            raise LoadFailed(f"parameters.quality: argmax needs an output with a last axis of 2 or more ({api!r})")
        value = agreement
    passed = (check.min is None or value >= check.min) and (check.max is None or value <= check.max)
    if not passed or not np.isfinite(value):
        bound = f">= {check.min}" if check.min is not None else f"<= {check.max}"
        raise LoadFailed(f"quality check failed on API {api!r}: {check.metric} {value:.6g}, must be {bound}")


def _rows(array: np.ndarray) -> np.ndarray:
    """One row per input item, whatever the output's other dimensions."""
    return array.reshape(len(array), -1) if array.ndim else array.reshape(1, 1)


def _first_array(value: Any) -> np.ndarray | None:
    if isinstance(value, np.ndarray):
        return value.astype(np.float64) if value.dtype.kind in "biuf" else None
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)) and value:
        if isinstance(value[0], np.ndarray):
            return _first_array(value[0])
        try:
            return np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError):
            return None
    return None


def load_failure(stored: Model | None, exc: BaseException) -> str:
    if isinstance(exc, LoadFailed):
        return str(exc)
    what = stored.tag if stored is not None else "the model"
    return f"cannot load {what}: {type(exc).__name__}: {exc}"


def tensors(tensors: list[tuple[str, str, list[int]]]) -> str:
    return ", ".join(f"{name} {dtype}{shape}" for name, dtype, shape in tensors) or "none"


def free_memory(device: str) -> int | None:
    """Bytes free for a new model on ``device``: a GPU's free memory, else the host's available memory
    (bounded by the cgroup's limit, in a container); None when it cannot be told."""
    if device.startswith("cuda"):
        torch = sys.modules.get("torch")
        if torch is None:
            return None
        index = int(device.partition(":")[2] or 0)
        return int(torch.cuda.mem_get_info(index)[0])
    available = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except OSError:
        return None
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
        if limit != "max" and available is not None:
            available = min(available, int(limit) - used)
    except (OSError, ValueError):
        pass
    return available


