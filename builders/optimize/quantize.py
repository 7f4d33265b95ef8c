"""quantize(...): INT8 (ONNX Runtime, dynamic or static), FP16, and weight-only INT8/INT4 for PyTorch.

ONNX models: `dynamic` stores int8 weights and quantizes activations per call (no calibration);
`static` inserts QuantizeLinear/DequantizeLinear pairs with activation ranges calibrated (MinMax) on the
calibration inputs, which also makes the Q/DQ model TensorRT's explicit-quantization input. Per-channel
weight scales are the default: on MiniLM here per-tensor scales ran as fast but moved the embeddings to mean
cosine 0.967, per-channel kept 0.993. `fp16` converts the graph to float16 and keeps float32 inputs and
outputs; it is meant for GPU targets (ONNX Runtime's CPU kernels mostly lack float16).

`auto=True` tries the int8 variants (per-channel and per-tensor, dynamic and static, and dynamic with the
layers most sensitive to quantization left in float) and keeps the fastest that passes the gate. Sensitivity
is estimated from the weights alone: the relative error int8 rounding makes in each MatMul/Gemm weight (a
weight with outliers loses the most). That is a cheap proxy, not a measurement of each layer's effect.

PyTorch models: `weight_only` replaces every nn.Linear with `bento_like.kernels.int8_weight_only
.WeightOnlyLinear` (INT8 per channel or INT4 per group), which runs a Triton kernel on CUDA and its PyTorch
reference elsewhere; `fp16` halves the module (its float inputs must then be float16). INT8 dynamic or
static quantization of a PyTorch model is done in ONNX Runtime: export it first.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import platform
from collections.abc import Iterator
from pathlib import Path
from typing import Any
import numpy as np

from bento_like.models import Model
from bento_like.sdk.opt import Quantize

from ._context import PassContext, PassOutput
from ._errors import PassError, PassUnavailableError, QualityGateError
from .gate import describe

STATIC_OPS = ["MatMul", "Gemm", "Conv"]
"""Static quantization covers the compute-heavy ops only: calibrating every op (softmax inputs, attention
masks holding -3.4e38) ruined MiniLM here (mean cosine 0.40 against 0.94 for these ops alone)."""
SENSITIVE_SHARE = 0.1
"""auto: the share of MatMul/Gemm layers (at least one) left in float by the exclusion variants."""


def describe_spec(spec: Quantize) -> str:
    parts = [spec.dtype]
    if spec.dtype == "int8" and not spec.auto:
        parts.append(spec.method.replace("_", "-"))
        if spec.method != "weight_only":
            parts.append("per-channel" if spec.per_channel else "per-tensor")
    if spec.auto:
        parts.append("auto")
    if spec.exclude:
        parts.append(f"{len(spec.exclude)} excluded")
    return f"quantize({', '.join(parts)})"


def cache_options(spec: Quantize, ctx: PassContext) -> Any:
    """What the result depends on besides the input model: the options, the calibration file's content,
    and for static and auto also the validation inputs (calibration data) and the gate (auto's choice)."""
    options: list[Any] = [spec]
    if spec.dtype == "int8" and spec.method != "weight_only":  # None means: decided by this machine's CPU
        options.append(("reduce_range", effective_reduce_range(spec)))
    if spec.calibration is not None:
        path = Path(spec.calibration)
        options.append(ctx.base_dir / path if not path.is_absolute() and ctx.base_dir is not None else path)
    if spec.auto or spec.method == "static":
        options += [ctx.inputs, ctx.gate]
    return options


def run(model: Model, spec: Quantize, ctx: PassContext) -> PassOutput:
    framework = model.info.framework
    if framework == "torch":
        return _run_torch(model, spec, ctx)
    if framework != "onnx":
        raise PassError(f"quantize: {model.tag} is a {framework} model; quantize takes PyTorch or ONNX models")
    if spec.method == "weight_only":
        raise PassError(
            "quantize: weight-only quantization is for PyTorch models on GPU; for ONNX use method='dynamic' or "
            "'static', or put this pass before export"
        )
    if spec.auto:
        return _auto(model, spec, ctx)
    path = ctx.workdir / "model.onnx"
    notes = _quantize_onnx(model, spec, path, ctx)
    return PassOutput(obj=path, framework="onnx", notes=notes)


# --- ONNX ---------------------------------------------------------------------------------------------------


@functools.cache
def cpu_has_vnni() -> bool | None:
    """Whether this x86 CPU has VNNI (AVX512_VNNI or AVX_VNNI); None when it is not x86 or cannot tell."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "i386"):
        return None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = line.split(":", 1)[1].split()
                    return "avx512_vnni" in flags or "avx_vnni" in flags
    except OSError:
        return None
    return None


def effective_reduce_range(spec: Quantize) -> bool:
    """``spec.reduce_range``, or, when None, whether this is an x86 CPU known to lack VNNI (measured on an AVX2
    EPYC: MLP per-channel dynamic int8 at cosine 0.980 with 8-bit weights, above 0.999 with 7-bit)."""
    if spec.reduce_range is not None:
        return spec.reduce_range
    return cpu_has_vnni() is False


def _quantize_onnx(model: Model, spec: Quantize, out: Path, ctx: PassContext) -> list[str]:
    try:
        import onnxruntime.quantization as q
    except ImportError as exc:
        raise PassUnavailableError(f"quantize: ONNX quantization needs onnxruntime ({exc})") from exc
    source = str(model.path / "model.onnx")
    if spec.dtype == "fp16":
        return _to_fp16(source, out)
    exclude = list(spec.exclude)
    reduce = effective_reduce_range(spec)
    with _quiet():
        if spec.method == "dynamic":
            q.quantize_dynamic(
                source, str(out), per_channel=spec.per_channel, weight_type=q.QuantType.QInt8, reduce_range=reduce,
                nodes_to_exclude=exclude,
            )
        else:
            calibration = _calibration_inputs(spec, ctx)
            q.quantize_static(
                source, str(out), _Reader(calibration), quant_format=q.QuantFormat.QDQ,
                per_channel=spec.per_channel, activation_type=q.QuantType.QUInt8, weight_type=q.QuantType.QInt8, reduce_range=reduce,
                calibrate_method=q.CalibrationMethod.MinMax, nodes_to_exclude=exclude,
                op_types_to_quantize=STATIC_OPS,
            )
    granularity = "per-channel" if spec.per_channel else "per-tensor"
    notes = [f"onnxruntime int8 {spec.method}, {granularity} weights"]
    if reduce:
        why = "asked for" if spec.reduce_range else "this CPU has no VNNI"
        notes.append(f"7-bit weight range (reduce_range: {why})")
    if exclude:
        notes.append(f"left in float: {', '.join(exclude)}")
    return notes


def _to_fp16(source: str, out: Path) -> list[str]:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    with _quiet():
        converted = convert_float_to_float16(onnx.load(source), keep_io_types=True)
    onnx.save_model(converted, str(out))
    return ["float16 graph, float32 inputs and outputs kept (for GPU targets)"]


class _Reader:
    """onnxruntime's CalibrationDataReader protocol over in-memory inputs, 8 rows at a time."""

    def __init__(self, inputs: dict[str, np.ndarray], batch: int = 8) -> None:
        rows = len(next(iter(inputs.values())))
        self._batches = iter([{k: v[i : i + batch] for k, v in inputs.items()} for i in range(0, rows, batch)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)

    def __len__(self) -> int:  # some onnxruntime versions ask
        return 0


def _calibration_inputs(spec: Quantize, ctx: PassContext) -> dict[str, np.ndarray]:
    if spec.calibration is None:
        return ctx.inputs
    from .gate import load_npz

    path = Path(spec.calibration)
    if not path.is_absolute() and ctx.base_dir is not None:
        path = ctx.base_dir / path
    return load_npz(path, list(ctx.inputs))


def _sensitive_nodes(model: Model, share: float, per_channel: bool) -> list[str]:
    """MatMul/Gemm nodes whose constant weight loses the most to symmetric int8 rounding."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(model.path / "model.onnx"))
    weights = {init.name: init for init in proto.graph.initializer}
    errors = []
    for node in proto.graph.node:
        if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2 or node.input[1] not in weights:
            continue
        w = numpy_helper.to_array(weights[node.input[1]]).astype(np.float64)
        if w.ndim != 2 or not w.size:
            continue
        scale = np.abs(w).max(axis=0, keepdims=True) if per_channel else np.abs(w).max()
        scale = np.where(scale == 0, 1.0, scale) / 127
        error = np.linalg.norm(w - np.round(w / scale) * scale) / max(np.linalg.norm(w), 1e-12)
        errors.append((error, node.name))
    errors.sort(reverse=True)
    count = max(1, round(share * len(errors))) if errors else 0
    return [name for _, name in errors[:count]]


def variants(model: Model, spec: Quantize) -> list[tuple[str, Quantize]]:
    """The int8 candidates auto tries, named for the report."""
    candidates = []
    for method in ("dynamic", "static"):
        for per_channel in (True, False):
            name = f"{method}, {'per-channel' if per_channel else 'per-tensor'}"
            candidates.append((name, Quantize(method=method, per_channel=per_channel, exclude=spec.exclude, calibration=spec.calibration)))
    for per_channel in (True, False):
        sensitive = _sensitive_nodes(model, SENSITIVE_SHARE, per_channel)
        if sensitive:
            name = f"dynamic, {'per-channel' if per_channel else 'per-tensor'}, {len(sensitive)} sensitive in float"
            exclude = tuple(dict.fromkeys([*spec.exclude, *sensitive]))
            candidates.append((name, Quantize(method="dynamic", per_channel=per_channel, exclude=exclude)))
    return candidates


def _auto(model: Model, spec: Quantize, ctx: PassContext) -> PassOutput:
    from .report import Variant

    tried: list[tuple[Variant, Model | None]] = []
    for name, candidate in variants(model, spec):
        ctx.log(f"  quantize auto: trying {name}")

        def produce(workdir: Path, candidate: Quantize = candidate) -> PassOutput:
            out = workdir / "model.onnx"
            return PassOutput(obj=out, framework="onnx", notes=_quantize_onnx(model, candidate, out, ctx))

        try:
            stored = ctx.materialize("quantize-variant", candidate, model, produce)
            items_per_s, fidelity = ctx.evaluate(stored)
        except (PassError, OSError, RuntimeError, ValueError) as exc:  # one variant failing is not the search failing
            from .gate import Fidelity

            empty = Fidelity(metric="-", value=float("nan"), bound="min", threshold=0.0, passed=False, rows=0)
            tried.append((Variant(name=name, items_per_s=0.0, fidelity=empty, error=str(exc).splitlines()[0][:120]), None))
            continue
        tried.append((Variant(name=name, items_per_s=items_per_s, fidelity=fidelity), stored))
    passing = [(v, m) for v, m in tried if m is not None and v.fidelity.passed]
    if not passing:
        lines = [f"  {v.name}: " + (v.error or describe(v.fidelity)) for v, _ in tried]
        raise QualityGateError("quantize(int8, auto): no variant passes the gate:\n" + "\n".join(lines))
    best, best_model = max(passing, key=lambda pair: pair[0].items_per_s)
    best.chosen = True
    return PassOutput(
        obj=best_model.path / "model.onnx", framework="onnx",
        notes=[f"auto: kept {best.name}, the fastest of {len(passing)} passing variant(s) of {len(tried)}"],
        extra={"chosen": best.name},
        variants=[v for v, _ in tried],
    )


# --- PyTorch ------------------------------------------------------------------------------------------------


def _run_torch(model: Model, spec: Quantize, ctx: PassContext) -> PassOutput:
    if spec.auto or spec.method in ("dynamic", "static") and spec.dtype == "int8":
        raise PassError(
            "quantize: int8 dynamic/static quantization runs in ONNX Runtime: put export('onnx') before it; "
            "for a PyTorch model on GPU use quantize('int8', method='weight_only') or quantize('int4')"
        )
    module = model.load("cpu")
    if spec.dtype == "fp16":
        return PassOutput(obj=module.half(), framework="torch", notes=["float16 weights; float inputs must be float16"])
    from bento_like.kernels.int8_weight_only import WeightOnlyLinear, triton_available
    import torch

    bits = 4 if spec.dtype == "int4" else 8
    replaced, skipped = [], []
    for name, child in list(module.named_modules()):
        if not isinstance(child, torch.nn.Linear) or name in spec.exclude:
            continue
        if bits == 4 and child.in_features % spec.group_size:
            skipped.append(name)
            continue
        layer = WeightOnlyLinear.from_linear(child, bits=bits, group_size=spec.group_size)
        parent_name, _, attr = name.rpartition(".")
        setattr(module.get_submodule(parent_name) if parent_name else module, attr, layer)
        replaced.append(name)
    if not replaced:
        raise PassError(f"quantize: {model.tag} has no nn.Linear layer to quantize weight-only")
    notes = [f"int{bits} weight-only on {len(replaced)} Linear layer(s); Triton kernel on CUDA, PyTorch reference on CPU"]
    if skipped:
        notes.append(f"left in float (in_features not a multiple of group_size {spec.group_size}): {', '.join(skipped)}")
    if not triton_available():
        notes.append("triton is not installed here: CUDA would also run the reference")
    return PassOutput(obj=module, framework="torch", notes=notes, extra={"layers": replaced, "bits": bits})


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """onnxruntime.quantization logs advice at WARNING on the root logger for every call."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)
