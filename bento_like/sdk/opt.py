"""`bl.opt`: what a build should do to a model to make it smaller and faster, and how far it may drift.

    model = bl.model("encoder:latest",
                     optimize=[bl.opt.export("onnx"), bl.opt.quantize("int8", auto=True)],
                     quality=bl.opt.Gate(metric="cosine", min=0.99, data="calib.npz"))

Everything here is data: frozen msgspec Structs that name a pass and its options. Nothing runs and no
framework is imported; `bento_like.builders.optimize` interprets them. The same declarations come from a
build config as plain mappings (`{"pass": "quantize", "dtype": "int8", "auto": true}`), which `passes()`
and `gate()` turn into these Structs, validating them with errors that name the field at fault.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal, Union

import msgspec

__all__ = [
    "Compile",
    "Distill",
    "Export",
    "Gate",
    "Pass",
    "Prune",
    "Quantize",
    "compile",
    "distill",
    "export",
    "gate",
    "passes",
    "prune",
    "quantize",
]

Metric = Literal["cosine", "max_abs", "argmax"]


class Export(msgspec.Struct, frozen=True, kw_only=True, tag_field="pass", tag="export"):
    """PyTorch to ONNX with torch.onnx's dynamo exporter; every axis the model's signature marks -1 (the
    batch axis always) stays dynamic."""

    format: Literal["onnx"] = "onnx"
    opset: int | None = None
    """None: the exporter's default (20 with torch 2.13)."""


class Quantize(msgspec.Struct, frozen=True, kw_only=True, tag_field="pass", tag="quantize"):
    """Lower precision. dtype/method pairs:

    - int8 dynamic|static: ONNX Runtime (weights int8; activations quantized per call, or from calibration).
    - int8|int4 weight_only: PyTorch Linear layers with int8/int4 weights and float activations (a Triton
      kernel on CUDA, its PyTorch reference elsewhere).
    - fp16: ONNX (float inputs and outputs kept) or PyTorch; for GPU targets.
    """

    dtype: Literal["int8", "int4", "fp16"] = "int8"
    method: Literal["dynamic", "static", "weight_only"] = "dynamic"
    per_channel: bool = True
    """Per output channel weight scales (int8 dynamic/static); False: one scale per tensor."""
    auto: bool = False
    """Try per-channel, per-tensor, static and sensitive-layer exclusion variants; keep the fastest that
    passes the gate."""
    exclude: tuple[str, ...] = ()
    """Node names (ONNX) or module names (PyTorch) left in full precision."""
    calibration: str | None = None
    """A .npz of calibration inputs for static quantization; the gate's validation data when None."""
    reduce_range: bool | None = None
    """int8 dynamic/static: 7-bit weights. ONNX Runtime's int8 kernels on x86 CPUs without VNNI (AVX2, or
    AVX-512 without VNNI) can saturate intermediate sums with 8-bit weights and lose accuracy; None: on when
    the building machine is such a CPU. Set True when the serving machines may lack VNNI."""
    group_size: int = 128
    """int4 weight_only: input features sharing one scale."""


class Prune(msgspec.Struct, frozen=True, kw_only=True, tag_field="pass", tag="prune"):
    """Remove the smallest weights of PyTorch Linear layers.

    unstructured: zero `amount` of each layer's weights by magnitude (same shapes: smaller compressed, not
    faster). structured: remove `amount` of the hidden units between consecutive Linear layers, shrinking
    both layers, so the model does less work."""

    amount: float = 0.5
    structured: bool = False
    layers: tuple[str, ...] = ()
    """Module names to prune; empty: every eligible Linear layer."""


class Distill(msgspec.Struct, frozen=True, kw_only=True, tag_field="pass", tag="distill"):
    """A training hook: the builder runs `train_step` over `data` for `epochs` and keeps the student.

    student: an nn.Module, a callable `(model) -> nn.Module` given the model so far, an import path
    "module:attr" to either, or None to train the model so far itself (recovery after pruning).
    train_step: `(ctx, batch) -> float | dict` (ctx has student, teacher, optimizer, epoch, step), an
    import path, or None for the default: mean squared error between student and teacher outputs.
    data: batches (an iterable, a callable returning one, an import path, or a .npz path).
    teacher: the model before the optimization passes, unless given.
    evaluate: optional `(student) -> dict[str, float]`; its result is recorded in the report."""

    data: Any = None
    student: Any = None
    train_step: Any = None
    teacher: Any = None
    evaluate: Any = None
    optimizer: Any = None
    """`(parameters) -> torch.optim.Optimizer`; Adam at lr 1e-3 when None."""
    epochs: int = 1
    batch_size: int = 64
    """Rows per batch when data is a .npz file."""


class Compile(msgspec.Struct, frozen=True, kw_only=True, tag_field="pass", tag="compile"):
    """backend="tensorrt": an ONNX model into a serialized TensorRT engine (NVIDIA GPU and the tensorrt
    package needed); precision fp16 converts the ONNX graph to float16 first, int8 needs a Q/DQ model (from
    quantize(method="static")). backend="torch": torch.compile, recorded for the runtime to apply."""

    backend: Literal["tensorrt", "torch"] = "tensorrt"
    precision: Literal["fp32", "fp16", "int8"] = "fp16"
    max_batch: int = 64
    opt_batch: int = 32
    workspace_mb: int = 4096
    mode: str | None = None
    """torch.compile mode ("default", "reduce-overhead", "max-autotune")."""


Pass = Union[Export, Quantize, Prune, Distill, Compile]


class Gate(msgspec.Struct, frozen=True, kw_only=True):
    """How far an optimized model's outputs may move from its source's, and on which inputs.

    metric: "cosine" (per input row, over the flattened output), "max_abs" (largest absolute difference),
    "argmax" (share of rows whose argmax over the last axis agrees), or a callable
    `(reference: list[ndarray], candidate: list[ndarray]) -> float`. min/max: the bound the value must keep;
    by default cosine >= 0.99, argmax >= 0.99, max_abs <= 1e-2 (a callable needs one of them).
    reduce: for cosine, whether the mean over rows or the worst row is gated.
    data: a .npz of validation inputs (keys are the model's input names); without it, `samples` rows are
    drawn from the input schema recorded in the model's manifest."""

    metric: Any = "cosine"
    min: float | None = None
    max: float | None = None
    data: str | None = None
    samples: int = 64
    output: int | str = 0
    """Which output is compared (index or name) for the built-in metrics."""
    reduce: Literal["mean", "min"] = "mean"
    seed: int = 0


_DEFAULT_BOUNDS: dict[str, tuple[str, float]] = {"cosine": ("min", 0.99), "argmax": ("min", 0.99), "max_abs": ("max", 1e-2)}


def bound(g: Gate) -> tuple[str, float]:
    """("min", x) or ("max", x): the one bound this gate enforces."""
    if g.min is not None and g.max is not None:
        raise ValueError("a Gate takes min or max, not both")
    if g.min is not None:
        return "min", float(g.min)
    if g.max is not None:
        return "max", float(g.max)
    if isinstance(g.metric, str) and g.metric in _DEFAULT_BOUNDS:
        return _DEFAULT_BOUNDS[g.metric]
    raise ValueError(f"Gate(metric={g.metric!r}) needs min= or max=")


def export(format: Literal["onnx"] = "onnx", *, opset: int | None = None) -> Export:
    return Export(format=format, opset=opset)


def quantize(
    dtype: Literal["int8", "int4", "fp16"] = "int8",
    *,
    method: Literal["dynamic", "static", "weight_only"] | None = None,
    per_channel: bool = True,
    auto: bool = False,
    exclude: Sequence[str] = (),
    calibration: str | None = None,
    group_size: int = 128,
    reduce_range: bool | None = None,
) -> Quantize:
    """method defaults to "weight_only" for int4 and "dynamic" otherwise."""
    chosen = method or ("weight_only" if dtype == "int4" else "dynamic")
    return _checked(
        Quantize(
            dtype=dtype, method=chosen, per_channel=per_channel, auto=auto, exclude=tuple(exclude),
            calibration=calibration, group_size=group_size, reduce_range=reduce_range,
        )
    )


def prune(amount: float = 0.5, *, structured: bool = False, layers: Sequence[str] = ()) -> Prune:
    return _checked(Prune(amount=amount, structured=structured, layers=tuple(layers)))


def distill(
    data: Any,
    *,
    student: Any = None,
    train_step: Callable[..., Any] | str | None = None,
    teacher: Any = None,
    evaluate: Callable[..., Any] | str | None = None,
    optimizer: Callable[..., Any] | str | None = None,
    epochs: int = 1,
    batch_size: int = 64,
) -> Distill:
    return _checked(
        Distill(
            data=data, student=student, train_step=train_step, teacher=teacher, evaluate=evaluate,
            optimizer=optimizer, epochs=epochs, batch_size=batch_size,
        )
    )


def compile(
    backend: Literal["tensorrt", "torch"] = "tensorrt",
    *,
    precision: Literal["fp32", "fp16", "int8"] = "fp16",
    max_batch: int = 64,
    opt_batch: int = 32,
    workspace_mb: int = 4096,
    mode: str | None = None,
) -> Compile:
    return _checked(
        Compile(
            backend=backend, precision=precision, max_batch=max_batch, opt_batch=opt_batch,
            workspace_mb=workspace_mb, mode=mode,
        )
    )


def _checked(spec: Pass) -> Pass:
    """Validate field types and the combinations the Structs alone cannot express."""
    try:
        msgspec.convert(msgspec.to_builtins(spec, enc_hook=_opaque), type=Pass)
    except msgspec.ValidationError as exc:
        raise ValueError(f"{type(spec).__name__.lower()}: {exc}") from None
    if isinstance(spec, Quantize):
        allowed = {"int8": {"dynamic", "static", "weight_only"}, "int4": {"weight_only"}, "fp16": {"dynamic"}}
        if spec.method not in allowed[spec.dtype]:
            raise ValueError(
                f"quantize: dtype {spec.dtype!r} takes method {' or '.join(sorted(allowed[spec.dtype]))}, "
                f"not {spec.method!r}"
            )
        if spec.auto and spec.dtype != "int8":
            raise ValueError("quantize: auto=True searches int8 variants; use dtype='int8'")
        if spec.dtype == "int4" and spec.group_size % 2:
            raise ValueError("quantize: int4 group_size must be even")
    if isinstance(spec, Prune) and not 0 < spec.amount < 1:
        raise ValueError(f"prune: amount is the share of weights removed, in (0, 1); got {spec.amount}")
    if isinstance(spec, Distill) and (spec.data is None or spec.epochs < 1):
        raise ValueError("distill: give data= and epochs >= 1")
    if isinstance(spec, Compile) and not 1 <= spec.opt_batch <= spec.max_batch:
        raise ValueError("compile: need 1 <= opt_batch <= max_batch")
    return spec


def _opaque(obj: Any) -> Any:
    """Callables and objects given to distill travel as they are; only their presence is validated."""
    return None


# Shorthands accepted where a pass is expected: `optimize=["onnx", "int8"]`.
_SHORTHANDS: dict[str, Pass] = {
    "onnx": Export(),
    "int8": Quantize(),
    "int8-static": Quantize(method="static"),
    "int8-auto": Quantize(auto=True),
    "fp16": Quantize(dtype="fp16"),
    "int8-weight-only": Quantize(method="weight_only"),
    "int4-weight-only": Quantize(dtype="int4", method="weight_only"),
    "prune": Prune(),
    "prune-structured": Prune(structured=True),
    "tensorrt": Compile(),
    "torch-compile": Compile(backend="torch"),
}


def passes(value: Any) -> list[Pass]:
    """A list of pass declarations from Structs, build-config mappings (`{"pass": "quantize", ...}`) or
    shorthand strings ("onnx", "int8", "fp16", "int4-weight-only", "prune-structured", "tensorrt", ...)."""
    if value is None:
        return []
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    result: list[Pass] = []
    for i, item in enumerate(items):
        if isinstance(item, (Export, Quantize, Prune, Distill, Compile)):
            result.append(_checked(item))
        elif isinstance(item, str):
            if item not in _SHORTHANDS:
                raise ValueError(f"optimize[{i}]: unknown pass {item!r}; one of {', '.join(_SHORTHANDS)}")
            result.append(_SHORTHANDS[item])
        elif isinstance(item, dict):
            try:
                spec = msgspec.convert(item, type=Pass, str_keys=True)
            except msgspec.ValidationError as exc:
                raise ValueError(f"optimize[{i}]: {exc}") from None
            result.append(_checked(spec))
        else:
            raise ValueError(f"optimize[{i}]: expected a bl.opt pass, a mapping or a name, got {type(item).__name__}")
    return result


def gate(value: Any) -> Gate | None:
    """A Gate from a Gate, a build-config mapping, or a number (a cosine minimum: `quality=0.99`)."""
    if value is None or isinstance(value, Gate):
        result = value
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        result = Gate(metric="cosine", min=float(value))
    elif isinstance(value, dict):
        try:
            result = msgspec.convert(value, type=Gate)
        except msgspec.ValidationError as exc:
            raise ValueError(f"quality: {exc}") from None
    else:
        raise ValueError(f"quality: expected a bl.opt.Gate, a mapping or a number, got {type(value).__name__}")
    if result is not None:
        if isinstance(result.metric, str) and result.metric not in _DEFAULT_BOUNDS and ":" not in result.metric:
            raise ValueError(f"quality: metric {result.metric!r} is not one of cosine, max_abs, argmax or a callable")
        bound(result)
    return result
