"""export("onnx"): a PyTorch model to ONNX with torch.onnx's dynamo exporter (PyTorch 2.13's default).

Axes the source's recorded signature marks -1, and always the first (batch) axis, are exported dynamic
(`torch.export.Dim.AUTO`, so inputs sharing a sequence length are inferred to share it), and the result is
checked: an exporter that fixed the batch axis anyway fails the pass instead of shipping a batch-of-2 model.
Weights are stored inside the .onnx file (`external_data=False`), so the store keeps one file; protobuf caps
that at 2 GiB.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from typing import Any

from bento_like.models import Model
from bento_like.sdk.opt import Export

from ._context import PassContext, PassOutput
from ._errors import PassError, PassUnavailableError
from ._runner import torch_input_names


def describe_spec(spec: Export) -> str:
    return f"export({spec.format})"


def dynamic_axes(model: Model, names: list[str], ranks: dict[str, int]) -> dict[str, list[int]]:
    """Input name -> the axes to keep dynamic: the batch axis and every -1 in the recorded signature."""
    recorded = {spec.name: spec.shape for spec in model.info.signatures[0].inputs} if model.info.signatures else {}
    axes = {}
    for name in names:
        shape = recorded.get(name)
        dims = {0} | ({i for i, dim in enumerate(shape) if dim < 0} if shape else set())
        axes[name] = sorted(d for d in dims if d < ranks[name])
    return axes


def run(model: Model, spec: Export, ctx: PassContext) -> PassOutput:
    if model.info.framework != "torch":
        raise PassError(f"export: {model.tag} is a {model.info.framework} model; export converts PyTorch models to ONNX")
    try:
        import onnx
        import onnxscript  # noqa: F401  (the dynamo exporter needs it)
        import torch
    except ImportError as exc:
        raise PassUnavailableError(
            f"export('onnx') needs torch, onnx and onnxscript installed ({exc}); pip install 'bento_like[torch,onnx]'"
        ) from exc

    module = model.load("cpu")
    names = torch_input_names(model, module)
    rows = ctx.example_rows(2)  # two rows: torch.export specializes axes of size 0 and 1
    missing = [name for name in names if name not in rows]
    if missing:
        raise PassError(f"export: the validation inputs lack {', '.join(missing)} (inputs: {', '.join(names)})")
    args = tuple(torch.from_numpy(rows[name].copy()) for name in names)
    axes = dynamic_axes(model, names, {name: rows[name].ndim for name in names})
    dynamic_shapes = tuple({axis: torch.export.Dim.AUTO for axis in axes[name]} for name in names)
    path = ctx.workdir / "model.onnx"
    log_output = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(log_output):
            warnings.simplefilter("ignore")
            logging.getLogger("torch.onnx").setLevel(logging.ERROR)
            torch.onnx.export(
                module, args, str(path), dynamo=True, input_names=names, dynamic_shapes=dynamic_shapes,
                external_data=False, opset_version=spec.opset, verbose=False,
            )
    except Exception as exc:  # the exporter raises many types; name the model and the first line
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise PassError(f"export: torch.onnx.export failed on {model.tag}: {first}") from exc
    fixed = _fixed_batch_inputs(onnx.load(str(path), load_external_data=False), names)
    if fixed:
        raise PassError(
            f"export: the exported graph fixed the batch axis of {', '.join(fixed)}; the model's forward probably "
            "depends on the batch size"
        )
    proto = onnx.load(str(path), load_external_data=False)
    opset = next((entry.version for entry in proto.opset_import if entry.domain in ("", "ai.onnx")), None)
    return PassOutput(
        obj=path, framework="onnx",
        notes=[f"dynamo exporter, opset {opset}, dynamic axes {axes}"],
        extra={"opset": opset, "dynamic_axes": axes},
    )


def _fixed_batch_inputs(proto: Any, names: list[str]) -> list[str]:
    fixed = []
    for value in proto.graph.input:
        if value.name in names:
            dims = value.type.tensor_type.shape.dim
            if dims and dims[0].HasField("dim_value"):
                fixed.append(value.name)
    return fixed
