"""TensorRT adapter: a serialized engine (`model.engine`) in, a `TensorRTSession` out.

An engine is built for one GPU architecture and one TensorRT version (the build records both in `details`),
and loading one needs an NVIDIA GPU and the `tensorrt` Python package; without them load fails with a message
that says which is missing. Engines are executable artifacts (compiled CUDA kernels), so importing an
archive that holds one asks for trust, like a pickle.

Written against TensorRT's documented Python API (10.x and 11.x: named I/O tensors, `execute_async_v3`);
device buffers are torch CUDA tensors. It has not been run here: the development machines have no GPU and
cannot install TensorRT. `bench/gpu_check.py` exercises it on a GPU machine.
"""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._adapters import Adapter, Saved
from ._errors import AdapterError, ModelStoreError
from ._manifest import ModelInfo, Signature

if TYPE_CHECKING:
    from ._store import Model

ENGINE_FILE = "model.engine"
SUFFIXES = (".engine", ".plan", ".trt")


def unavailable_reason(device: str = "cuda") -> str | None:
    """Why a TensorRT engine cannot be built or run here, or None when it can."""
    reasons = []
    try:
        import tensorrt  # noqa: F401
    except Exception as exc:  # ImportError, or the bindings failing to find libnvinfer/libnvonnxparser
        reasons.append(f"the tensorrt Python package is not importable ({type(exc).__name__}: {exc})")
    try:
        import torch

        if not torch.cuda.is_available():
            reasons.append("no CUDA device is visible to torch")
    except ImportError:
        reasons.append("torch (used for the engine's device buffers) is not installed")
    if not device.startswith("cuda"):
        reasons.append(f"device {device!r} is not a CUDA device")
    if not reasons:
        return None
    return "TensorRT needs an NVIDIA GPU and the tensorrt Python package: " + "; ".join(reasons)


class TensorRTSession:
    """Runs an engine: `run(output_names, feed)` like an onnxruntime session (numpy in, numpy out), or
    `infer(**tensors)` with torch CUDA tensors in and out, without host copies. One call at a time."""

    def __init__(self, engine_bytes: bytes, device: str) -> None:
        import tensorrt as trt
        import torch

        self._trt, self._torch = trt, torch
        self.device = torch.device(device)
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        with torch.cuda.device(self.device):
            self.engine = self._runtime.deserialize_cuda_engine(engine_bytes)
            if self.engine is None:
                raise AdapterError(
                    "TensorRT could not deserialize the engine: it was built by another TensorRT version or for "
                    "another GPU architecture; rebuild it on this machine"
                )
            self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {name: self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT for name in names}
        self.input_names = [name for name in names if is_input[name]]
        self.output_names = [name for name in names if not is_input[name]]
        self._dtypes = {name: self._torch_dtype(self.engine.get_tensor_dtype(name)) for name in names}
        self._lock = threading.Lock()

    def _torch_dtype(self, trt_dtype: Any) -> Any:
        import numpy as np

        return self._torch.from_numpy(np.empty(0, dtype=self._trt.nptype(trt_dtype))).dtype

    def infer(self, **inputs: Any) -> dict[str, Any]:
        torch = self._torch
        missing = [name for name in self.input_names if name not in inputs]
        if missing:
            raise ValueError(f"missing engine input(s): {', '.join(missing)}")
        with self._lock, torch.cuda.device(self.device):
            stream = torch.cuda.current_stream(self.device)
            keep = []
            for name in self.input_names:
                tensor = torch.as_tensor(inputs[name]).to(self.device, self._dtypes[name]).contiguous()
                keep.append(tensor)
                self.context.set_input_shape(name, tuple(tensor.shape))
                self.context.set_tensor_address(name, tensor.data_ptr())
            outputs = {}
            for name in self.output_names:
                shape = tuple(self.context.get_tensor_shape(name))
                outputs[name] = torch.empty(shape, dtype=self._dtypes[name], device=self.device)
                self.context.set_tensor_address(name, outputs[name].data_ptr())
            if not self.context.execute_async_v3(stream.cuda_stream):
                raise RuntimeError("TensorRT execute_async_v3 failed (see the TensorRT log)")
            stream.synchronize()
        return outputs

    def run(self, output_names: list[str] | None, feed: dict[str, Any]) -> list[Any]:
        outputs = self.infer(**feed)
        return [outputs[name].cpu().numpy() for name in (output_names or self.output_names)]

    def __call__(self, **inputs: Any) -> dict[str, Any]:
        return self.infer(**inputs)


class TensorRTAdapter(Adapter):
    framework = "tensorrt"
    libraries = ("tensorrt",)

    def can_save(self, obj: Any) -> bool:
        return isinstance(obj, (str, os.PathLike)) and os.fspath(obj).endswith(SUFFIXES)

    def save(
        self,
        obj: str | os.PathLike[str] | bytes,
        dest: Path,
        *,
        signatures: list[Signature] | None = None,
        build: dict[str, Any] | None = None,
    ) -> Saved:
        """obj: a serialized engine (bytes) or a path to one. signatures: the engine's inputs and outputs
        (TensorRT is not needed to save, so they are not read from the engine). build: how it was built
        (TensorRT version, GPU, precision, shape profile), recorded in details."""
        if isinstance(obj, (bytes, bytearray, memoryview)):
            (dest / ENGINE_FILE).write_bytes(bytes(obj))
        elif isinstance(obj, (str, os.PathLike)):
            source = Path(obj)
            if not source.is_file():
                raise ModelStoreError(f"{obj}: no such engine file")
            shutil.copyfile(source, dest / ENGINE_FILE)
        else:
            raise ModelStoreError(f"the tensorrt adapter saves engine bytes or a path, got {type(obj).__qualname__}")
        return Saved(signatures=list(signatures or []), details={"build": build or {}})

    def load(self, model: Model, device: str) -> TensorRTSession:
        reason = unavailable_reason(device)
        if reason:
            raise AdapterError(f"{model.tag}: cannot load a TensorRT engine here: {reason}")
        return TensorRTSession((model.path / ENGINE_FILE).read_bytes(), device)

    def runs_code_on_load(self, info: ModelInfo) -> bool:
        return True
