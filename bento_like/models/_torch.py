"""PyTorch nn.Module adapter.

Every torch model is stored in its eager form: `module.pkl`, the module pickled with cloudpickle but with
every state-dict tensor replaced by an empty placeholder, and `weights.pt`, the state dict, which load maps
from disk (`torch.load(mmap=True, weights_only=True)`) and assigns into the module, so the weights are never
copied on the way in. Unpickling needs the module's class importable (classes defined in `__main__` travel by
value). When `example_inputs` are given, `torch.export` also writes `program.pt2`, a self-contained program
that loads without the class; load falls back to it when the class cannot be imported.
"""

from __future__ import annotations

import inspect
import itertools
import logging
import pickle
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._adapters import Adapter, Saved
from ._errors import ModelStoreError
from ._manifest import Signature, TensorSpec

if TYPE_CHECKING:
    import torch

    from ._store import Model

logger = logging.getLogger(__name__)

MODULE_FILE = "module.pkl"
WEIGHTS_FILE = "weights.pt"
PROGRAM_FILE = "program.pt2"
FORMS = ("auto", "eager", "exported")


class ClassNotImportableError(ModelStoreError):
    """The pickled module names a class (or function) that cannot be imported here."""


def _meta_tensor(shape: tuple[int, ...], dtype: torch.dtype, is_parameter: bool, requires_grad: bool) -> Any:
    """Rebuilds a placeholder in place of a state-dict tensor; the real weights are assigned after."""
    import torch

    tensor = torch.empty(shape, dtype=dtype, device="meta")
    return torch.nn.Parameter(tensor, requires_grad=requires_grad) if is_parameter else tensor


def _save_structure(module: torch.nn.Module, path: Path) -> None:
    import cloudpickle
    import torch

    placeholders = {id(tensor) for tensor in module.state_dict(keep_vars=True).values()}

    class StructurePickler(cloudpickle.CloudPickler):
        def reducer_override(self, obj: Any) -> Any:
            if id(obj) in placeholders and isinstance(obj, torch.Tensor):
                is_parameter = isinstance(obj, torch.nn.Parameter)
                return _meta_tensor, (tuple(obj.shape), obj.dtype, is_parameter, obj.requires_grad)
            return super().reducer_override(obj)

    with open(path, "wb") as f:
        StructurePickler(f, protocol=pickle.HIGHEST_PROTOCOL).dump(module)


def _save_weights(module: torch.nn.Module, path: Path) -> None:
    import torch

    state = {name: tensor.detach().cpu() for name, tensor in module.state_dict().items()}
    # The store's sha256 covers every byte; zip's crc32 would only add a second, weaker pass over the weights.
    crc32 = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        torch.save(state, path)
    finally:
        torch.serialization.set_crc32_options(crc32)


def _tensor_spec(name: str, value: Any) -> TensorSpec:
    import torch

    if isinstance(value, torch.Tensor):
        shape = [dim if isinstance(dim, int) else -1 for dim in value.shape]
        return TensorSpec(name=name, dtype=str(value.dtype).removeprefix("torch."), shape=shape)
    return TensorSpec(name=name, dtype=type(value).__name__, shape=[])


def _program_signature(program: Any) -> Signature:
    nodes = {node.name: node for node in program.graph.nodes}
    signature = program.graph_signature
    inputs = [_tensor_spec(name, nodes[name].meta.get("val")) for name in signature.user_inputs]
    outputs = [
        _tensor_spec(f"output_{i}", nodes[name].meta.get("val") if name in nodes else None)
        for i, name in enumerate(signature.user_outputs)
    ]
    return Signature(name="forward", inputs=inputs, outputs=outputs)


def _eager_signature(module: torch.nn.Module, args: tuple[Any, ...]) -> Signature:
    """Shapes as seen on the example (no dimension is known to vary): used when export failed."""
    import torch

    names = [p.name for p in inspect.signature(module.forward).parameters.values()]
    inputs = [_tensor_spec(names[i] if i < len(names) else f"input_{i}", arg) for i, arg in enumerate(args)]
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            result = module(*args)
    finally:
        module.train(was_training)
    results = result if isinstance(result, (tuple, list)) else (result,)
    outputs = [_tensor_spec(f"output_{i}", r) for i, r in enumerate(results)]
    return Signature(name="forward", inputs=inputs, outputs=outputs)


def _export(module: torch.nn.Module, args: tuple[Any, ...], dynamic_shapes: Any) -> Any:
    """torch.export in eval mode (the store serves inference), moved to CPU; None when it cannot export."""
    import torch
    from torch.export.passes import move_to_device_pass

    was_training = module.training
    module.eval()
    try:
        program = torch.export.export(module, args, dynamic_shapes=dynamic_shapes)
    except Exception as exc:  # torch.export signals untraceable code with many exception types
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        warnings.warn(
            f"torch.export could not export {type(module).__qualname__} ({first_line}); saved the eager form "
            "only, which needs the module's class importable where it is loaded",
            stacklevel=4,
        )
        return None
    finally:
        module.train(was_training)
    return move_to_device_pass(program, "cpu")


def _assign_weights(module: torch.nn.Module, state: dict[str, Any]) -> None:
    """Assign the loaded tensors in place of the placeholders, keeping tied weights tied."""
    first_name: dict[int, str] = {}
    tied = []
    named = itertools.chain(
        module.named_parameters(remove_duplicate=False), module.named_buffers(remove_duplicate=False)
    )
    for name, tensor in named:
        first = first_name.setdefault(id(tensor), name)
        if first != name:
            tied.append((name, first))
    module.load_state_dict(state, strict=True, assign=True)
    for name, first in tied:
        owner, _, attr = name.rpartition(".")
        source_owner, _, source_attr = first.rpartition(".")
        setattr(module.get_submodule(owner), attr, getattr(module.get_submodule(source_owner), source_attr))


def _load_eager(model: Model, device: str) -> Any:
    import torch

    try:
        with open(model.path / MODULE_FILE, "rb") as f:
            module = pickle.load(f)
    except (ImportError, AttributeError) as exc:
        raise ClassNotImportableError(
            f"{model.tag}: cannot rebuild {model.info.details.get('module_class', 'the module')}: {exc}"
        ) from exc
    state = torch.load(model.path / WEIGHTS_FILE, map_location="cpu", mmap=True, weights_only=True)
    _assign_weights(module, state)
    return module.to(device).eval()


def _load_exported(model: Model, device: str) -> Any:
    import torch
    from torch.export.passes import move_to_device_pass

    program = torch.export.load(model.path / PROGRAM_FILE)
    if device != "cpu":
        program = move_to_device_pass(program, device)
    # An exported program was traced in eval mode and has no train/eval switch of its own.
    return program.module()


class TorchAdapter(Adapter):
    framework = "torch"
    libraries = ("torch", "cloudpickle")

    def can_save(self, obj: Any) -> bool:
        torch = sys.modules.get("torch")
        return torch is not None and isinstance(obj, torch.nn.Module)

    def save(
        self,
        module: torch.nn.Module,
        dest: Path,
        *,
        example_inputs: Any = None,
        dynamic_shapes: Any = None,
    ) -> Saved:
        """example_inputs: a tensor or a tuple of positional arguments for forward; with them the model is
        also exported (and its signature recorded). dynamic_shapes: passed to torch.export, e.g.
        `({0: torch.export.Dim("batch")},)` for a variable batch axis."""
        import torch

        if not isinstance(module, torch.nn.Module):
            raise ModelStoreError(f"the torch adapter saves torch.nn.Module, got {type(module).__qualname__}")
        forms = ["eager"]
        signatures: list[Signature] = []
        if example_inputs is not None:
            args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
            program = _export(module, args, dynamic_shapes)
            if program is not None:
                torch.export.save(program, dest / PROGRAM_FILE)
                forms.append("exported")
                signatures = [_program_signature(program)]
            else:
                signatures = [_eager_signature(module, args)]
        _save_weights(module, dest / WEIGHTS_FILE)
        _save_structure(module, dest / MODULE_FILE)
        module_class = f"{type(module).__module__}.{type(module).__qualname__}"
        return Saved(signatures=signatures, details={"module_class": module_class, "forms": forms})

    def load(self, model: Model, device: str, *, form: str = "auto") -> Any:
        """form: "eager" (your class, needs it importable), "exported" (the torch.export program), or
        "auto": eager, falling back to the exported program when the class cannot be imported."""
        if form not in FORMS:
            raise ValueError(f"form must be one of {', '.join(FORMS)}, got {form!r}")
        forms = model.info.details.get("forms", ["eager"])
        if form == "exported" or (form == "auto" and "eager" not in forms):
            if "exported" not in forms:
                raise ModelStoreError(f"{model.tag} has no exported program: it was saved without example_inputs")
            return _load_exported(model, device)
        try:
            return _load_eager(model, device)
        except ClassNotImportableError as exc:
            if form == "eager" or "exported" not in forms:
                raise ClassNotImportableError(
                    f"{exc}; make that class importable here, or save the model with example_inputs= so it "
                    "is also stored as an exported program that needs no class"
                ) from exc.__cause__
            logger.warning("%s; loading the exported program instead", exc)
            return _load_exported(model, device)
