"""ONNX adapter: an onnx.ModelProto or a path to a .onnx file in, an ONNX Runtime session out."""

from __future__ import annotations

import logging
import os
import shutil
import sys
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from ._adapters import Adapter, Saved
from ._errors import ModelStoreError
from ._manifest import ModelInfo, Signature, TensorSpec

if TYPE_CHECKING:
    import onnx

    from ._store import Model

logger = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"


def choose_providers(device: str, available: list[str]) -> list[Any]:
    """CUDA (on the device's index) then CPU when a CUDA device is asked for and ONNX Runtime has CUDA;
    CPU alone otherwise."""
    if device.startswith("cuda") and "CUDAExecutionProvider" in available:
        index = int(device.partition(":")[2] or 0)
        return [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def _specs(values: Any, skip: set[str]) -> list[TensorSpec]:
    from onnx import helper

    specs = []
    for value in values:
        if value.name in skip or not value.type.HasField("tensor_type"):
            continue
        tensor_type = value.type.tensor_type
        dtype = helper.tensor_dtype_to_np_dtype(tensor_type.elem_type).name if tensor_type.elem_type else "unknown"
        shape = [dim.dim_value if dim.HasField("dim_value") else -1 for dim in tensor_type.shape.dim]
        specs.append(TensorSpec(name=value.name, dtype=dtype, shape=shape))
    return specs


def _signature(proto: onnx.ModelProto) -> Signature:
    initializers = {init.name for init in proto.graph.initializer}
    return Signature(
        name="run", inputs=_specs(proto.graph.input, initializers), outputs=_specs(proto.graph.output, set())
    )


def _external_files(proto: onnx.ModelProto) -> list[str]:
    """Relative locations of the external data files a model refers to, checked to stay beside it."""
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    locations = set()
    for tensor in _get_all_tensors(proto):
        if uses_external_data(tensor):
            location = next(entry.value for entry in tensor.external_data if entry.key == "location")
            parts = PurePosixPath(location.replace("\\", "/")).parts
            if not parts or PurePosixPath(location).is_absolute() or ".." in parts or location == MODEL_FILE:
                raise ModelStoreError(f"external data location {location!r} does not stay beside the model")
            locations.add(location)
    return sorted(locations)


class OnnxAdapter(Adapter):
    framework = "onnx"
    libraries = ("onnx", "onnxruntime")

    def can_save(self, obj: Any) -> bool:
        onnx = sys.modules.get("onnx")
        if onnx is not None and isinstance(obj, onnx.ModelProto):
            return True
        return isinstance(obj, (str, os.PathLike)) and os.fspath(obj).endswith(".onnx")

    def save(self, obj: onnx.ModelProto | str | os.PathLike[str], dest: Path) -> Saved:
        """A path is copied byte for byte, with the external data files it refers to; a ModelProto is
        serialized as one file (protobuf caps that at 2 GiB: save larger models to a path first)."""
        import onnx

        if isinstance(obj, (str, os.PathLike)):
            source = Path(obj)
            proto = onnx.load(source, load_external_data=False)
            shutil.copyfile(source, dest / MODEL_FILE)
            for location in _external_files(proto):
                (dest / location).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source.parent / location, dest / location)
        elif isinstance(obj, onnx.ModelProto):
            proto = obj
            onnx.save_model(proto, dest / MODEL_FILE)
        else:
            raise ModelStoreError(
                f"the onnx adapter saves onnx.ModelProto or a .onnx path, got {type(obj).__qualname__}"
            )
        opsets = {entry.domain or "ai.onnx": entry.version for entry in proto.opset_import}
        return Saved(signatures=[_signature(proto)], details={"opsets": opsets})

    def load(
        self,
        model: Model,
        device: str,
        *,
        providers: list[Any] | None = None,
        session_options: Any = None,
    ) -> Any:
        """Returns an onnxruntime.InferenceSession; providers overrides the choice made from device."""
        import onnxruntime

        chosen = providers or choose_providers(device, onnxruntime.get_available_providers())
        if device.startswith("cuda") and providers is None and len(chosen) == 1:
            logger.warning("%s: ONNX Runtime here has no CUDA provider; running on CPU", model.tag)
        session = onnxruntime.InferenceSession(
            str(model.path / MODEL_FILE), sess_options=session_options, providers=chosen
        )
        if len(chosen) > 1 and "CUDAExecutionProvider" not in session.get_providers():
            logger.warning("%s: the CUDA provider failed to load; ONNX Runtime fell back to CPU", model.tag)
        return session

    def runs_code_on_load(self, info: ModelInfo) -> bool:
        return False

    def check_files(self, info: ModelInfo, root: Path) -> None:
        """ONNX Runtime reads external data from each tensor's `location`, relative to the model: an archive
        must not point it at a file outside the model (`../../etc/hostname`) or one the model does not hold."""
        try:
            import onnx
            from google.protobuf.message import DecodeError
        except ImportError:
            raise ModelStoreError(f"{info.tag}: checking an ONNX model needs the onnx package") from None
        try:
            proto = onnx.load(root / MODEL_FILE, load_external_data=False)
        except (DecodeError, OSError, ValueError) as exc:
            raise ModelStoreError(f"{info.tag}: {MODEL_FILE} is not a readable ONNX model: {exc}") from None
        held = {entry.path for entry in info.files}
        for location in _external_files(proto):
            if PurePosixPath(location.replace("\\", "/")).as_posix() not in held:
                raise ModelStoreError(
                    f"{info.tag}: {MODEL_FILE} refers to external data {location!r}, which is not one of its files"
                )
