"""Run any stored artifact (torch, onnx, tensorrt) on numpy inputs, and time it.

The builder measures every step the same way, whatever its framework: inputs by name in, outputs as a list
of float arrays out. ONNX models run in ONNX Runtime with its default session options, as the model store loads
them for serving, on the CPU unless the device is a CUDA one. (Basic graph optimizations alone ran MiniLM FP32
up to 10-15% faster here, but left static Q/DQ models unfused and about 4x slower.)
"""

from __future__ import annotations

import inspect
import statistics
import time
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np

from bento_like.models import Model

from ._errors import PassError

TORCH_COMPILE_KEY = "torch_compile"
"""Manifest metadata key of the compile(backend="torch") hint: the runtime applies torch.compile with it."""


def torch_input_names(model: Model, module: Any) -> list[str]:
    if model.info.signatures:
        return [spec.name for spec in model.info.signatures[0].inputs]
    parameters = inspect.signature(module.forward).parameters.values()
    return [p.name for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


class Runner:
    """`runner(inputs) -> list[np.ndarray]`; `input_names` and `output_names` as the model declares them."""

    def __init__(self, model: Model, device: str = "cpu") -> None:
        self.model = model
        self.device = device
        framework = model.info.framework
        if framework == "torch":
            self._init_torch()
        elif framework == "onnx":
            self._init_onnx()
        elif framework == "tensorrt":
            self._session = model.load(device if device.startswith("cuda") else "cuda")
            self.input_names = list(self._session.input_names)
            self.output_names = list(self._session.output_names)
            self._call = lambda feed: self._session.run(None, feed)
        else:
            raise PassError(f"{model.tag}: cannot run a {framework!r} model in the optimization builder")

    def _init_torch(self) -> None:
        import torch

        module = self.model.load(self.device)
        self.input_names = torch_input_names(self.model, module)
        hint = self.model.info.metadata.get(TORCH_COMPILE_KEY)
        if hint is not None:
            module = torch.compile(module, mode=hint.get("mode"), dynamic=True)
        parameters = list(module.parameters()) if hasattr(module, "parameters") else []
        float_dtype = next((p.dtype for p in parameters if p.is_floating_point()), torch.float32)
        self.output_names = [spec.name for spec in self.model.info.signatures[0].outputs] if self.model.info.signatures else []

        def call(feed: dict[str, np.ndarray]) -> list[np.ndarray]:
            args = []
            for name in self.input_names:
                tensor = torch.from_numpy(np.ascontiguousarray(feed[name])).to(self.device)
                args.append(tensor.to(float_dtype) if tensor.is_floating_point() else tensor)
            with torch.inference_mode():
                result = module(*args)
            return _flatten_torch(result)

        self._call = call

    def _init_onnx(self) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()  # ONNX Runtime's defaults (all graph optimizations), as served
        options.log_severity_level = 3
        self._session = self.model.load(self.device, session_options=options)
        self.input_names = [i.name for i in self._session.get_inputs()]
        self.output_names = [o.name for o in self._session.get_outputs()]
        types = {i.name: _ONNX_NUMPY.get(i.type, None) for i in self._session.get_inputs()}

        def call(feed: dict[str, np.ndarray]) -> list[np.ndarray]:
            cast = {name: _as(feed[name], types[name]) for name in self.input_names}
            return [np.asarray(out) for out in self._session.run(None, cast)]

        self._call = call

    def __call__(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        missing = [name for name in self.input_names if name not in inputs]
        if missing:
            raise PassError(
                f"{self.model.tag} takes inputs {', '.join(self.input_names)}; the validation data lacks {', '.join(missing)}"
            )
        return [np.asarray(out, dtype=np.float32) if np.issubdtype(out.dtype, np.floating) else out
                for out in self._call(inputs)]

    def run_rows(self, inputs: dict[str, np.ndarray], batch: int = 32) -> list[np.ndarray]:
        """All rows, `batch` at a time, outputs concatenated: bounded memory for large validation sets."""
        rows = len(next(iter(inputs.values())))
        chunks = [self({k: v[i : i + batch] for k, v in inputs.items()}) for i in range(0, rows, batch)]
        return [np.concatenate([chunk[j] for chunk in chunks]) for j in range(len(chunks[0]))]


_ONNX_NUMPY = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8, "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


def _as(array: np.ndarray, dtype: Any) -> np.ndarray:
    return array if dtype is None or array.dtype == dtype else array.astype(dtype)


def _flatten_torch(result: Any) -> list[np.ndarray]:
    import torch

    if isinstance(result, torch.Tensor):
        return [result.detach().float().cpu().numpy() if result.is_floating_point() else result.detach().cpu().numpy()]
    if isinstance(result, dict):
        result = list(result.values())
    if hasattr(result, "to_tuple"):  # transformers' ModelOutput
        result = result.to_tuple()
    if isinstance(result, (list, tuple)):
        return [array for item in result for array in _flatten_torch(item)]
    raise PassError(f"cannot compare a model output of type {type(result).__qualname__}")


def rows_of(inputs: dict[str, np.ndarray], count: int) -> dict[str, np.ndarray]:
    """`count` rows taken from the front of inputs, repeated if there are fewer."""
    rows = len(next(iter(inputs.values())))
    index = np.arange(count) % rows
    return {name: array[index] for name, array in inputs.items()}


def latency_ms(call: Callable[[], Any], budget_s: float, *, min_runs: int = 5, warmup: int = 2) -> float:
    """Median wall time of call() in ms: after warmup, runs until budget_s has passed (at least min_runs)."""
    for _ in range(warmup):
        call()
    times: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(times) < min_runs or time.perf_counter() < deadline:
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
        if len(times) >= 1000:
            break
    return statistics.median(times) * 1000


def runtime_files(model: Model) -> list:
    """The files a runtime loads: a torch model's exported program (`program.pt2`, a second copy of the
    weights kept for loading without the class) is left out while the eager form is there, so sizes
    compare like with like across steps."""
    forms = model.info.details.get("forms", [])
    if model.info.framework == "torch" and "eager" in forms:
        return [entry for entry in model.info.files if entry.path != "program.pt2"]
    return list(model.info.files)


def model_size(model: Model) -> int:
    return sum(entry.size for entry in runtime_files(model))


def gzip_size(model: Model) -> int:
    """Bytes of the model's files after deflate at gzip's default level: what an image layer carries."""
    total = 0
    for entry in runtime_files(model):
        compressor = zlib.compressobj(6)
        with open(model.path / entry.path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                total += len(compressor.compress(block))
        total += len(compressor.flush())
    return total
