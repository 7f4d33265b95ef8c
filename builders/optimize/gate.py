"""The quality gate: validation inputs, fidelity metrics, and the verdict on an optimized model.

Validation inputs come from the user (a .npz whose keys are the model's input names, or arrays passed to
`optimize_model(data=...)`) or, when none are given, are drawn from the input schema in the source model's
manifest: floats from a standard normal, integers in [0, 100) (inputs named like `*mask` are all ones), -1
dimensions other than the batch set to 16. Real inputs make a far better gate than random ones: a model can
agree with its source on noise and disagree on data.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from bento_like._fidelity import argmax_agreement, cosine, max_abs
from bento_like.models import Model, TensorSpec
from bento_like.sdk.opt import Gate, bound

from ._errors import OptimizeError

SCHEMA_DIM = 16
"""The size given to a variable non-batch dimension when inputs are drawn from the schema."""


class Fidelity(msgspec.Struct, kw_only=True, omit_defaults=True):
    """How close a candidate's outputs are to its source's, and whether that passes the gate."""

    metric: str
    value: float
    bound: str
    """"min" (value must be at least threshold) or "max" (at most)."""
    threshold: float
    passed: bool
    rows: int
    cosine_mean: float | None = None
    cosine_min: float | None = None
    max_abs: float | None = None
    argmax: float | None = None


def metric_name(gate: Gate) -> str:
    metric = gate.metric
    if isinstance(metric, str):
        return f"cosine-{gate.reduce}" if metric == "cosine" else metric
    return getattr(metric, "__name__", type(metric).__name__)


def _resolve_metric(metric: Any) -> Callable[[list[np.ndarray], list[np.ndarray]], float]:
    if callable(metric):
        return metric
    module, _, attr = str(metric).partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise OptimizeError(f"gate metric {metric!r}: cannot import it ({exc})") from exc


def _rows(inputs: dict[str, np.ndarray]) -> int:
    return len(next(iter(inputs.values()))) if inputs else 0


def compare(reference: list[np.ndarray], candidate: list[np.ndarray], gate: Gate, output: int) -> Fidelity:
    """Every built-in metric on output `output`, and the gate's verdict on its own metric."""
    if len(candidate) != len(reference):
        raise OptimizeError(f"the optimized model returns {len(candidate)} outputs, its source {len(reference)}")
    ref, cand = reference[output], candidate[output]
    if ref.shape != cand.shape:
        raise OptimizeError(f"output {output}: the optimized model returns shape {cand.shape}, its source {ref.shape}")
    finite = np.isfinite(cand).all()
    cos = cosine(ref, cand) if finite else np.zeros(len(ref))
    largest = max_abs(ref, cand) if finite else float("inf")
    agreement = argmax_agreement(ref, cand)
    which, threshold = bound(gate)
    metric = gate.metric
    if metric == "cosine":
        value = float(cos.mean() if gate.reduce == "mean" else cos.min())
    elif metric == "max_abs":
        value = largest
    elif metric == "argmax":
        if agreement is None:
            raise OptimizeError(f"gate metric 'argmax' needs an output with a last axis of 2 or more; output {output} has shape {ref.shape}")
        value = agreement
    else:
        value = float(_resolve_metric(metric)(reference, candidate))
    passed = bool(value >= threshold if which == "min" else value <= threshold) and bool(np.isfinite(value))
    return Fidelity(
        metric=metric_name(gate), value=value, bound=which, threshold=threshold, passed=passed, rows=len(ref),
        cosine_mean=float(cos.mean()), cosine_min=float(cos.min()), max_abs=largest, argmax=agreement,
    )


def describe(fidelity: Fidelity) -> str:
    """`cosine-mean 0.9671 < min 0.99 (short by 0.0229) on 64 inputs`."""
    op = (">=" if fidelity.passed else "<") if fidelity.bound == "min" else ("<=" if fidelity.passed else ">")
    text = f"{fidelity.metric} {fidelity.value:.4g} {op} {fidelity.bound} {fidelity.threshold:g}"
    if not fidelity.passed:
        text += f" ({'short' if fidelity.bound == 'min' else 'over'} by {abs(fidelity.value - fidelity.threshold):.4g})"
    return f"{text} on {fidelity.rows} inputs"


def output_index(gate: Gate, names: list[str]) -> int:
    if isinstance(gate.output, int):
        if not -len(names) <= gate.output < len(names):
            raise OptimizeError(f"gate output {gate.output}: the model has {len(names)} outputs")
        return gate.output % len(names)
    if gate.output not in names:
        raise OptimizeError(f"gate output {gate.output!r}: the model's outputs are {', '.join(names)}")
    return names.index(gate.output)


def input_specs(model: Model) -> list[TensorSpec]:
    return list(model.info.signatures[0].inputs) if model.info.signatures else []


def load_npz(path: str | os.PathLike[str], names: list[str]) -> dict[str, np.ndarray]:
    """Arrays keyed by input name; a file with one array feeds a model with one input whatever its key."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except (OSError, ValueError) as exc:
        raise OptimizeError(f"validation data {path}: cannot read it as .npz ({exc})") from exc
    return match_inputs(arrays, names, str(path))


def match_inputs(arrays: Mapping[str, Any], names: list[str], where: str) -> dict[str, np.ndarray]:
    arrays = {key: np.asarray(value) for key, value in arrays.items()}
    if not names:
        return arrays
    if len(arrays) == 1 and len(names) == 1:
        return {names[0]: next(iter(arrays.values()))}
    missing = [name for name in names if name not in arrays]
    if missing:
        raise OptimizeError(
            f"validation data {where}: no array for input(s) {', '.join(missing)}; it holds {', '.join(arrays) or 'nothing'}"
        )
    rows = {len(arrays[name]) for name in names}
    if len(rows) != 1:
        raise OptimizeError(f"validation data {where}: inputs have different row counts {sorted(rows)}")
    return {name: arrays[name] for name in names}


def sample_inputs(specs: list[TensorSpec], rows: int, seed: int) -> dict[str, np.ndarray]:
    """Inputs drawn from the recorded schema: the first dimension is the batch, other -1 dims are 16."""
    rng = np.random.default_rng(seed)
    samples = {}
    for spec in specs:
        shape = [rows] + [SCHEMA_DIM if dim < 0 else dim for dim in spec.shape[1:]]
        dtype = spec.dtype.lower()
        if dtype in ("bool",):
            samples[spec.name] = rng.integers(0, 2, size=shape).astype(bool)
        elif dtype.startswith(("int", "uint")):
            values = np.ones(shape) if spec.name.lower().endswith("mask") else rng.integers(0, 100, size=shape)
            samples[spec.name] = values.astype(dtype)
        elif dtype.startswith(("float", "bfloat")):
            samples[spec.name] = rng.standard_normal(shape).astype(np.float32)
        else:
            raise OptimizeError(
                f"cannot draw validation inputs for {spec.name!r} of dtype {spec.dtype!r}: give the gate data= (.npz)"
            )
    return samples


def validation_inputs(
    model: Model,
    gate: Gate,
    names: list[str],
    *,
    data: Mapping[str, Any] | str | os.PathLike[str] | None = None,
    base_dir: str | os.PathLike[str] | None = None,
) -> tuple[dict[str, np.ndarray], str]:
    """(inputs keyed by name, where they came from). At most `gate.samples` rows are used for drawn data;
    user data is used whole."""
    source = data if data is not None else gate.data
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_absolute() and base_dir is not None:
            path = Path(base_dir) / path
        inputs = load_npz(path, names)
        return inputs, f"{_rows(inputs)} rows from {source}"
    if source is not None:
        inputs = match_inputs(source, names, "data=")
        return inputs, f"{_rows(inputs)} rows given as data="
    specs = input_specs(model)
    if not specs:
        raise OptimizeError(
            f"{model.tag} records no input schema (save it with example_inputs=) and the gate has no data=: "
            "give validation inputs as a .npz"
        )
    return sample_inputs(specs, gate.samples, gate.seed), f"{gate.samples} rows drawn from the input schema"
