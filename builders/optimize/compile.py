"""compile(backend=...): an ONNX model into a TensorRT engine, or a PyTorch model under torch.compile.

TensorRT: the engine is built with the tensorrt Python API from the ONNX model. The network is strongly
typed (the only mode TensorRT 11 has; opted into on 10.12+), so precision lives in the graph: fp16 converts
the ONNX graph to float16 first (float32 inputs and outputs kept), int8 needs a Q/DQ graph, which
`quantize("int8", method="static")` produces. On TensorRT older than 10.12 the builder flags are set instead.
Dynamic axes get one optimization profile: the batch axis from 1 to `max_batch` (tuned for `opt_batch`),
other dynamic axes from 1 to their size in the validation inputs. This needs an NVIDIA GPU and the tensorrt
package; elsewhere the pass fails saying so. The engine build is unverified on the development machines
(no GPU, TensorRT not installable): `bench/gpu_check.py` runs it on a GPU.

torch: the module is compiled and run here (so a model torch.compile cannot handle fails the build, not the
first request) and measured compiled; a compiled module cannot be serialized, so the stored model is the
same module with a `torch_compile` entry in its metadata, which tells the runtime to compile it at load.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from bento_like.models import Model
from bento_like.sdk.opt import Compile

from ._context import PassContext, PassOutput
from ._errors import PassError, PassUnavailableError
from ._runner import TORCH_COMPILE_KEY

Profile = dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]


def describe_spec(spec: Compile) -> str:
    if spec.backend == "torch":
        return f"compile(torch{', ' + spec.mode if spec.mode else ''})"
    return f"compile(tensorrt, {spec.precision})"


def run(model: Model, spec: Compile, ctx: PassContext) -> PassOutput:
    if spec.backend == "torch":
        return _torch_compile(model, spec, ctx)
    return _tensorrt(model, spec, ctx)


# --- TensorRT -----------------------------------------------------------------------------------------------


def profile_shapes(proto: Any, inputs: dict[str, np.ndarray], spec: Compile) -> Profile:
    """(min, opt, max) shape per graph input: fixed axes as they are, the batch axis 1..max_batch, other
    dynamic axes 1..their size in the validation inputs."""
    initializers = {init.name for init in proto.graph.initializer}
    profiles: Profile = {}
    for value in proto.graph.input:
        if value.name in initializers:
            continue
        dims = value.type.tensor_type.shape.dim
        axes = []
        for axis, dim in enumerate(dims):
            if dim.HasField("dim_value") and dim.dim_value > 0:
                axes.append((dim.dim_value, dim.dim_value, dim.dim_value))
            elif axis == 0:
                axes.append((1, spec.opt_batch, spec.max_batch))
            elif value.name in inputs:
                size = int(inputs[value.name].shape[axis])
                axes.append((1, size, size))
            else:
                raise PassError(f"compile: no validation input for {value.name!r} to size its dynamic axis {axis}")
        low, opt, high = (tuple(bounds[i] for bounds in axes) for i in range(3))
        profiles[value.name] = (low, opt, high)
    return profiles


def has_qdq(proto: Any) -> bool:
    return any(node.op_type in ("QuantizeLinear", "DequantizeLinear") for node in proto.graph.node)


def build_engine(trt: Any, onnx_path: Path, profiles: Profile, spec: Compile, log: Any = print) -> bytes:
    """The serialized engine for onnx_path, through the documented tensorrt Python API."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    flags = 1 << int(strongly_typed) if strongly_typed is not None else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise PassError("compile(tensorrt): the ONNX parser refused the model:\n  " + "\n  ".join(errors))
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, spec.workspace_mb << 20)
    if strongly_typed is None:  # TensorRT < 10.12: weak typing, precision by builder flag
        if spec.precision in ("fp16", "int8"):
            config.set_flag(trt.BuilderFlag.FP16)
        if spec.precision == "int8":
            config.set_flag(trt.BuilderFlag.INT8)
    profile = builder.create_optimization_profile()
    for name, (low, opt, high) in profiles.items():
        profile.set_shape(name, low, opt, high)
    config.add_optimization_profile(profile)
    started = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise PassError("compile(tensorrt): TensorRT could not build an engine (its log above says why)")
    log(f"  tensorrt: engine built in {time.perf_counter() - started:.1f} s")
    return bytes(serialized)


def _tensorrt(model: Model, spec: Compile, ctx: PassContext) -> PassOutput:
    from bento_like.models._tensorrt import unavailable_reason

    if model.info.framework != "onnx":
        raise PassError(
            f"compile(backend='tensorrt') builds from an ONNX model and {model.tag} is {model.info.framework}: "
            "put export('onnx') before it"
        )
    import onnx

    onnx_path = model.path / "model.onnx"
    proto = onnx.load(str(onnx_path), load_external_data=False)
    if spec.precision == "int8" and not has_qdq(proto):
        raise PassError(
            "compile(tensorrt, int8) needs an explicitly quantized (Q/DQ) ONNX model: put "
            "quantize('int8', method='static') before it"
        )
    reason = unavailable_reason(ctx.device if ctx.device.startswith("cuda") else "cuda")
    if reason:
        raise PassUnavailableError(
            f"compile(backend='tensorrt') cannot run on this machine: {reason}. Build the engine on a machine "
            "with an NVIDIA GPU and TensorRT (bench/gpu_check.py checks one)"
        )
    import tensorrt as trt
    if spec.precision == "fp16":
        from onnxruntime.transformers.float16 import convert_float_to_float16

        onnx_path = ctx.workdir / "model_fp16.onnx"
        onnx.save_model(convert_float_to_float16(onnx.load(str(model.path / "model.onnx")), keep_io_types=True), str(onnx_path))
    profiles = profile_shapes(proto, ctx.inputs, spec)
    engine = build_engine(trt, onnx_path, profiles, spec, ctx.log)
    path = ctx.workdir / "model.engine"
    path.write_bytes(engine)
    import torch

    device = ctx.device if ctx.device.startswith("cuda") else "cuda"
    build = {
        "tensorrt": trt.__version__, "gpu": torch.cuda.get_device_name(torch.device(device)),
        "precision": spec.precision, "profiles": {k: [list(s) for s in v] for k, v in profiles.items()},
    }
    return PassOutput(
        obj=path, framework="tensorrt",
        notes=[f"TensorRT {trt.__version__} {spec.precision} engine for {build['gpu']}; batch 1..{spec.max_batch}"],
        extra={"build": build}, save_options={"signatures": list(model.info.signatures), "build": build},
    )


# --- torch.compile ------------------------------------------------------------------------------------------


def _torch_compile(model: Model, spec: Compile, ctx: PassContext) -> PassOutput:
    if model.info.framework != "torch":
        raise PassError(f"compile(backend='torch') compiles PyTorch models and {model.tag} is {model.info.framework}")
    import torch

    from ._runner import Runner, rows_of

    module = model.load(ctx.device)
    compiled = torch.compile(module, mode=spec.mode, dynamic=True)
    runner = Runner(model, ctx.device)
    started = time.perf_counter()
    try:
        for rows in (2, 32):
            batch = rows_of(ctx.inputs, rows)
            args = [torch.from_numpy(np.ascontiguousarray(batch[name])).to(ctx.device) for name in runner.input_names]
            with torch.inference_mode():
                compiled(*args)
    except Exception as exc:  # dynamo/inductor raise many types; the first line says what failed
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise PassError(f"compile(backend='torch'): torch.compile failed on {model.tag}: {first}") from exc
    seconds = time.perf_counter() - started
    hint = {"mode": spec.mode, "dynamic": True}
    return PassOutput(
        obj=module, framework="torch", metadata={TORCH_COMPILE_KEY: hint},
        notes=[f"torch.compile(mode={spec.mode!r}) compiled in {seconds:.1f} s here; the runtime compiles at load"],
        extra={"compile_seconds": round(seconds, 2)},
    )
