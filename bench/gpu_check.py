"""One-shot check of the GPU-only parts of the optimization builder; run it on a machine with an NVIDIA GPU.

    pip install -e '.[torch,onnx]' triton tensorrt-cu12      # tensorrt from NVIDIA's package index
    python bench/gpu_check.py [--skip-tensorrt] [--hidden 4096]

1. The weight-only INT8/INT4 Triton kernels on CUDA against their PyTorch references (max error), and their
   speed against an FP16 nn.Linear at batch 1, 16 and 256 (weight-only pays where matmuls are memory-bound).
2. WeightOnlyLinear inside a model, through quantize(method="weight_only") on device cuda.
3. TensorRT: export -> compile(tensorrt, fp16) of a small MLP under a cosine 0.99 gate, then the stored engine
   loaded through the model store's tensorrt adapter, run, and compared with the PyTorch model.
4. compile(backend="torch") on CUDA.

Prints one table; exits 2 at once, saying so, on a machine without a CUDA GPU; exits 1 if any check failed.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

ROWS: list[tuple[str, str, str]] = []


def check(name: str) -> Callable[[Callable[..., str]], Callable[..., None]]:
    def wrap(fn: Callable[..., str]) -> Callable[..., None]:
        def run(*args: Any) -> None:
            started = time.perf_counter()
            try:
                detail = fn(*args)
                ROWS.append((name, "ok", f"{detail} ({time.perf_counter() - started:.1f} s)"))
            except Exception as exc:  # a check failing must not stop the others
                traceback.print_exc()
                ROWS.append((name, "FAILED", f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"))

        return run

    return wrap


def _time_cuda(fn: Callable[[], Any], repeats: int = 50) -> float:
    import torch

    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats * 1000


@check("triton int8/int4 kernels vs reference")
def kernels(hidden: int) -> str:
    import torch

    from bento_like.kernels import int8_weight_only as k

    if not k.triton_available():
        raise RuntimeError("triton is not installed")
    torch.manual_seed(0)
    weight = torch.randn(hidden, hidden, device="cuda") / hidden**0.5
    q8, s8 = k.quantize_int8(weight)
    q4, s4 = k.quantize_int4(weight, 128)
    parts = []
    for m in (1, 16, 256):
        x = torch.randn(m, hidden, device="cuda", dtype=torch.float16)
        err8 = (k.int8_weight_only_linear(x, q8, s8).float() - k.reference_int8(x, q8, s8).float()).abs().max().item()
        err4 = (k.int4_weight_only_linear(x, q4, s4, 128).float() - k.reference_int4(x, q4, s4, 128).float()).abs().max().item()
        if max(err8, err4) > 0.05:
            raise AssertionError(f"batch {m}: kernel differs from reference by {max(err8, err4):.3g}")
        w16 = weight.half()
        t16 = _time_cuda(lambda: torch.nn.functional.linear(x, w16))
        t8 = _time_cuda(lambda: k.int8_weight_only_linear(x, q8, s8))
        t4 = _time_cuda(lambda: k.int4_weight_only_linear(x, q4, s4, 128))
        parts.append(f"b{m}: fp16 {t16:.3f} ms, int8 {t8:.3f} ms, int4 {t4:.3f} ms, max err {max(err8, err4):.2g}")
    return "; ".join(parts)


def _mlp_tag(hidden: int) -> str:
    import torch

    import bento_like.models as models

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(256, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, 256)).eval()
    return models.save("gpu-mlp", net, example_inputs=torch.randn(2, 256), dynamic_shapes=({0: torch.export.Dim("batch")},))


@check("quantize(int8/int4, weight_only) on cuda")
def weight_only(hidden: int) -> str:
    import bento_like.sdk.opt as opt
    from bento_like.builders.optimize import optimize_model

    tag = _mlp_tag(hidden)
    parts = []
    for dtype in ("int8", "int4"):
        result = optimize_model(tag, [opt.quantize(dtype, method="weight_only")], opt.Gate(min=0.98), device="cuda", log=None)
        step = result.report.steps[-1]
        parts.append(f"{dtype}: {step.measurement.items_per_s:,.0f} items/s vs {result.report.steps[0].measurement.items_per_s:,.0f}, "
                     f"cosine {step.fidelity.cosine_mean:.4f}")
    return "; ".join(parts)


@check("TensorRT fp16 engine: build, store, load, run")
def tensorrt(hidden: int) -> str:
    import numpy as np
    import torch

    import bento_like.models as models
    import bento_like.sdk.opt as opt
    from bento_like.builders.optimize import optimize_model, render_table

    tag = _mlp_tag(hidden)
    result = optimize_model(tag, [opt.export("onnx"), opt.compile("tensorrt", precision="fp16")], opt.Gate(min=0.99), device="cuda", log=print)
    print(render_table(result.report))
    session = models.get(result.tag).load("cuda")
    x = np.random.default_rng(0).standard_normal((7, 256)).astype(np.float32)
    (out,) = session.run(None, {session.input_names[0]: x})
    with torch.no_grad():
        ref = models.get(tag).load("cpu")(torch.from_numpy(x)).numpy()
    cos = float(((out * ref).sum(1) / np.linalg.norm(out, axis=1) / np.linalg.norm(ref, axis=1)).mean())
    step = result.report.steps[-1]
    return f"{step.notes[0]}; {step.measurement.items_per_s:,.0f} items/s; reloaded engine cosine {cos:.4f} on batch 7"


@check("compile(backend='torch') on cuda")
def torch_compile(hidden: int) -> str:
    import bento_like.sdk.opt as opt
    from bento_like.builders.optimize import optimize_model

    result = optimize_model(_mlp_tag(hidden), [opt.compile("torch")], opt.Gate(min=0.999), device="cuda", log=None)
    source, compiled = result.report.steps
    return f"{compiled.notes[0]}; {compiled.measurement.items_per_s:,.0f} vs {source.measurement.items_per_s:,.0f} items/s"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--skip-tensorrt", action="store_true")
    args = parser.parse_args()
    try:
        import torch
    except ImportError:
        print("gpu_check: torch is not installed; nothing to check", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU is visible (torch.cuda.is_available() is False): these checks need an NVIDIA GPU. "
              "Run this script on a GPU machine.", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as home:
        os.environ["BENTO_LIKE_HOME"] = home
        print(f"GPU: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
        kernels(args.hidden)
        weight_only(args.hidden)
        if not args.skip_tensorrt:
            tensorrt(args.hidden)
        torch_compile(args.hidden)
    width = max(len(name) for name, _, _ in ROWS)
    print()
    for name, status, detail in ROWS:
        print(f"{name.ljust(width)}  {status:6}  {detail}")
    return 1 if any(status != "ok" for _, status, _ in ROWS) else 0


if __name__ == "__main__":
    sys.exit(main())
