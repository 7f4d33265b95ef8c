"""distill(data, student=..., train_step=...): a training hook the builder runs, recording the student's metrics.

The teacher is the source model (before any pass) unless one is given; the student is the model so far
(fine-tuning a pruned model back toward its source) unless one is given. The builder owns the loop: for each
epoch it iterates the data, calls `train_step(ctx, batch)`, and collects the losses it returns; then
`evaluate(student)` (if given) adds the user's own metrics. The default step fits the student's first output to
the teacher's with mean squared error, which is what recovery after pruning needs.

Functions and objects may be given directly or as import paths ("package.module:name"), so a build config
written in YAML can name them.
"""

from __future__ import annotations

import copy
import importlib
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bento_like.models import Model
from bento_like.sdk.opt import Distill

from ._context import PassContext, PassOutput
from ._errors import PassError


@dataclass
class DistillContext:
    """What a train step gets besides the batch."""

    student: Any
    teacher: Callable[..., Any]
    optimizer: Any
    device: str
    epoch: int = 0
    step: int = 0


def describe_spec(spec: Distill) -> str:
    student = "model so far" if spec.student is None else _name(spec.student)
    return f"distill({student}, {spec.epochs} epoch{'s' if spec.epochs != 1 else ''})"


def _name(obj: Any) -> str:
    if isinstance(obj, str):
        return obj
    return getattr(obj, "__qualname__", type(obj).__qualname__)


def resolve(value: Any) -> Any:
    """An import path "module:attr" to the object it names; anything else as it is."""
    if isinstance(value, str) and ":" in value and not value.endswith(".npz"):
        module, _, attr = value.partition(":")
        try:
            target = importlib.import_module(module)
            for part in attr.split("."):
                target = getattr(target, part)
        except (ImportError, AttributeError) as exc:
            raise PassError(f"distill: cannot import {value!r} ({exc})") from exc
        return target
    return value


def cache_options(spec: Distill, ctx: PassContext) -> Any:
    """What the cache key covers: every field, with a .npz data path replaced by the file's content."""
    data = spec.data
    if isinstance(data, str) and data.endswith(".npz"):
        data = _path(data, ctx)
    return [spec.student, spec.train_step, spec.teacher, spec.evaluate, spec.optimizer, spec.epochs, spec.batch_size, data]


def _path(value: str, ctx: PassContext) -> Path:
    path = Path(value)
    return ctx.base_dir / path if not path.is_absolute() and ctx.base_dir is not None else path


def default_step(ctx: DistillContext, batch: Any) -> float:
    """Mean squared error between the student's first output and the teacher's, one optimizer step."""
    import torch
    import torch.nn.functional as F

    args = as_args(batch, ctx.device)
    with torch.no_grad():
        target = first_tensor(ctx.teacher(*args))
    output = first_tensor(ctx.student(*args))
    loss = F.mse_loss(output.float(), target.float())
    ctx.optimizer.zero_grad()
    loss.backward()
    ctx.optimizer.step()
    return float(loss.item())


def as_args(batch: Any, device: str) -> tuple[Any, ...]:
    import numpy as np
    import torch

    items = batch if isinstance(batch, (list, tuple)) else [batch]
    args = []
    for item in items:
        if isinstance(item, np.ndarray):
            item = torch.from_numpy(item)
        args.append(item.to(device) if isinstance(item, torch.Tensor) else item)
    return tuple(args)


def first_tensor(result: Any) -> Any:
    if hasattr(result, "to_tuple"):
        result = result.to_tuple()
    if isinstance(result, dict):
        result = list(result.values())
    while isinstance(result, (list, tuple)):
        result = result[0]
    return result


def _batches(spec: Distill, ctx: PassContext, names: list[str]) -> Callable[[], Iterable[Any]]:
    """A function returning the batches of one epoch."""
    data = resolve(spec.data)
    if isinstance(data, (str, Path)):
        from .gate import load_npz

        arrays = load_npz(_path(str(data), ctx), names)
        rows = len(next(iter(arrays.values())))
        batches = [tuple(arrays[n][i : i + spec.batch_size] for n in names) for i in range(0, rows, spec.batch_size)]
        return lambda: batches
    if callable(data) and not hasattr(data, "__iter__"):
        return data
    if iter(data) is data:  # a one-shot iterator: keep its batches for later epochs
        batches = list(data)
        return lambda: batches
    return lambda: data


def _teacher(spec: Distill, ctx: PassContext) -> Callable[..., Any]:
    teacher = resolve(spec.teacher)
    if teacher is not None:
        return teacher
    if ctx.source.info.framework == "torch":
        module = ctx.source.load(ctx.device)
        module.requires_grad_(False)
        return module
    from ._runner import Runner

    runner = Runner(ctx.source, ctx.device)

    def run_source(*args: Any) -> Any:
        import torch

        outputs = runner({name: arg.cpu().numpy() for name, arg in zip(runner.input_names, args, strict=True)})
        return torch.from_numpy(outputs[0]).to(ctx.device)

    return run_source


def run(model: Model, spec: Distill, ctx: PassContext) -> PassOutput:
    import torch

    current = model.load(ctx.device) if model.info.framework == "torch" else None
    student = resolve(spec.student)
    if student is None:
        if current is None:
            raise PassError(f"distill: {model.tag} is a {model.info.framework} model; without student= distill trains the model so far, which must be PyTorch (put distill before export)")
        student = current
    elif not isinstance(student, torch.nn.Module) and callable(student):
        student = student(current)
    elif isinstance(student, torch.nn.Module):
        student = copy.deepcopy(student)
    if not isinstance(student, torch.nn.Module):
        raise PassError(f"distill: the student must be an nn.Module (or build one), got {type(student).__qualname__}")
    student = student.to(ctx.device).train()
    for parameter in student.parameters():
        parameter.requires_grad_(parameter.is_floating_point())
    parameters = [p for p in student.parameters() if p.requires_grad]
    make_optimizer = resolve(spec.optimizer)
    optimizer = make_optimizer(parameters) if make_optimizer else torch.optim.Adam(parameters, lr=1e-3)
    step_fn = resolve(spec.train_step) or default_step
    dctx = DistillContext(student=student, teacher=_teacher(spec, ctx), optimizer=optimizer, device=ctx.device)
    epochs = _batches(spec, ctx, list(ctx.inputs))
    epoch_losses: list[float] = []
    extra_metrics: dict[str, float] = {}
    for epoch in range(spec.epochs):
        dctx.epoch = epoch
        losses = []
        for batch in epochs():
            result = step_fn(dctx, batch)
            dctx.step += 1
            if isinstance(result, dict):
                losses.append(float(result.get("loss", math.nan)))
                extra_metrics.update({k: float(v) for k, v in result.items() if k != "loss"})
            elif result is not None:
                losses.append(float(result))
        if dctx.step == 0:
            raise PassError("distill: the data yielded no batch")
        epoch_losses.append(sum(losses) / len(losses) if losses else math.nan)
        ctx.log(f"  distill: epoch {epoch + 1}/{spec.epochs}, mean loss {epoch_losses[-1]:.6g}")
    student.eval()
    student.requires_grad_(False)
    evaluate = resolve(spec.evaluate)
    metrics = {k: float(v) for k, v in (evaluate(student) or {}).items()} if evaluate else {}
    extra = {"epochs": spec.epochs, "steps": dctx.step, "epoch_loss": epoch_losses, "metrics": {**extra_metrics, **metrics}}
    notes = [f"{dctx.step} steps; mean loss by epoch " + ", ".join(f"{loss:.4g}" for loss in epoch_losses)]
    if metrics:
        notes.append("student: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
    return PassOutput(obj=student.cpu(), framework="torch", notes=notes, extra=extra)
