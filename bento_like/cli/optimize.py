"""``pkg optimize TAG``: run optimization passes on a stored model, gate it, save it as a new version."""

from __future__ import annotations

import json

import click

GATE_FAILED_EXIT = 3


class GateFailed(click.ClickException):
    exit_code = GATE_FAILED_EXIT


def parse_gate(value: str | None, data: str | None, samples: int) -> object:
    """`cosine:0.99`, `cosine-min:0.98`, `argmax:0.95` (minimums) or `max_abs:0.01` (a maximum)."""
    from ..sdk import opt

    metric, sep, number = (value or "cosine:0.99").partition(":")
    try:
        threshold = float(number)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not METRIC:NUMBER, e.g. cosine:0.99", param_hint="--gate") from None
    if not sep:
        raise click.BadParameter(f"{value!r} is not METRIC:NUMBER, e.g. cosine:0.99", param_hint="--gate")
    reduce = "mean"
    if metric in ("cosine-min", "cosine-mean"):
        metric, reduce = "cosine", metric.partition("-")[2]
    if metric not in ("cosine", "argmax", "max_abs"):
        raise click.BadParameter(f"unknown metric {metric!r}: cosine, cosine-min, argmax or max_abs", param_hint="--gate")
    bound = {"max": threshold} if metric == "max_abs" else {"min": threshold}
    return opt.Gate(metric=metric, data=data, samples=samples, reduce=reduce, **bound)


@click.command("optimize")
@click.argument("tag")
@click.option("--prune", "prune_amount", type=click.FloatRange(0, 1, min_open=True, max_open=True), help="Share of weights (or, with --structured, hidden units) to remove.")
@click.option("--structured", is_flag=True, help="Prune whole hidden units, shrinking the Linear layers.")
@click.option("--export", "export_format", type=click.Choice(["onnx"]), help="Export the PyTorch model to ONNX.")
@click.option("--quantize", "dtype", type=click.Choice(["int8", "int4", "fp16"]), help="Quantize to this type.")
@click.option("--method", type=click.Choice(["dynamic", "static", "weight_only"]), help="int8 method [dynamic; weight_only for int4].")
@click.option("--per-tensor", is_flag=True, help="One int8 scale per weight tensor instead of per channel.")
@click.option("--auto", is_flag=True, help="Try the int8 variants and keep the fastest that passes the gate.")
@click.option("--exclude", multiple=True, metavar="NODE", help="Node (ONNX) or module (PyTorch) left in float; repeatable.")
@click.option("--calibration", type=click.Path(dir_okay=False, exists=True), help="Calibration inputs (.npz) for static int8 [the gate's data].")
@click.option("--compile", "backend", type=click.Choice(["tensorrt", "torch"]), help="Compile the result (tensorrt needs an NVIDIA GPU).")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8"]), default="fp16", show_default=True, help="TensorRT engine precision.")
@click.option("--gate", "gate_text", metavar="METRIC:BOUND", help="cosine:0.99 (default), cosine-min:0.98, argmax:0.95 or max_abs:0.01.")
@click.option("--data", type=click.Path(dir_okay=False, exists=True), help="Validation inputs (.npz keyed by input name) [drawn from the input schema].")
@click.option("--samples", type=click.IntRange(1), default=64, show_default=True, help="Rows drawn from the schema when no --data.")
@click.option("--device", default="cpu", show_default=True, help="Where models run and are measured (cpu, cuda, cuda:1).")
@click.option("--name", help="Save under this model name [the source's].")
@click.option("--bench-seconds", type=click.FloatRange(min=0), default=1.0, show_default=True, help="Timing per batch size per step.")
@click.option("--no-cache", is_flag=True, help="Run every pass again and keep nothing in the pass cache.")
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table", show_default=True, help="json: the report as one document.")
def optimize_command(tag: str, **o) -> None:  # type: ignore[no-untyped-def]
    """Optimize the stored model TAG and save it as a new version, if it passes the quality gate.

    Passes run in this order: --prune, --export, --quantize, --compile. Exits 3 when the result fails the
    gate (the table shows by how much), 1 on other errors.
    """
    from ..builders.optimize import OptimizeError, QualityGateError, optimize_model, render_table
    from ..models import ModelStoreError
    from ..sdk import opt

    passes = []
    try:
        if o["prune_amount"] is not None:
            passes.append(opt.prune(o["prune_amount"], structured=o["structured"]))
        if o["export_format"]:
            passes.append(opt.export(o["export_format"]))
        if o["dtype"] or o["auto"]:
            passes.append(opt.quantize(
                o["dtype"] or "int8", method=o["method"], per_channel=not o["per_tensor"], auto=o["auto"],
                exclude=o["exclude"], calibration=o["calibration"],
            ))
        if o["backend"]:
            passes.append(opt.compile(o["backend"], precision=o["precision"]))
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    if not passes:
        raise click.UsageError("give at least one pass: --prune, --export, --quantize/--auto or --compile")
    gate = parse_gate(o["gate_text"], o["data"], o["samples"])
    quiet = o["output"] == "json"
    try:
        result = optimize_model(
            tag, passes, gate, name=o["name"], device=o["device"], cache=not o["no_cache"],
            bench_budget_s=o["bench_seconds"], log=None if quiet else click.echo,
        )
    except QualityGateError as exc:
        if quiet and exc.report is not None:
            click.echo(json.dumps({"tag": None, "passed": False, "error": str(exc), "report": exc.report.to_builtins()}))
        raise GateFailed(str(exc)) from None
    except (OptimizeError, ModelStoreError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    if quiet:
        click.echo(json.dumps({"tag": result.tag, "passed": True, "report": result.report.to_builtins()}))
    else:
        click.echo("")
        click.echo(render_table(result.report))
