"""`optimize_model(tag, passes, gate)`: run the passes, measure each step, gate the result, save it.

    result = optimize_model("encoder:latest", [opt.export("onnx"), opt.quantize("int8", auto=True)],
                            opt.Gate(metric="cosine", min=0.99, data="calib.npz"))
    result.tag          # 'encoder:9c1f...', a new version of the same model
    print(result.table())

Every step is measured on the same validation inputs: size (stored and gzipped), median latency at batch 1
and 32, throughput at 32, and fidelity to the source model's outputs. The final model must pass the gate;
if it does not, QualityGateError says what failed and by how much, and nothing is saved. A model that passes
is saved as a new version carrying the source's metadata and labels plus `metadata["optimization"]`: the
source tag and digest (its lineage), the passes, the gate and the report.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from bento_like.models import Model, ModelStore, default_store
from bento_like.sdk import opt

from . import compile as compile_pass
from . import distill, export, prune, quantize
from ._context import PassContext, PassOutput
from ._errors import OptimizeError, PassError, QualityGateError
from ._runner import Runner, gzip_size, latency_ms, model_size, rows_of
from .cache import CachedArtifact, PassCache, Uncacheable, fingerprint, make_key
from .gate import Fidelity, compare, describe, output_index, validation_inputs
from .report import METADATA_KEY, Measurement, OptimizationReport, Step, Variant, render_table

_PASSES: dict[type, Any] = {
    opt.Export: export, opt.Quantize: quantize, opt.Prune: prune, opt.Distill: distill, opt.Compile: compile_pass,
}


@dataclass
class OptimizeResult:
    tag: str | None
    """The saved version (None when save=False)."""
    source_tag: str
    report: OptimizationReport
    model: Model
    """The optimized model: the saved version, or the cached artifact when save=False."""

    def table(self) -> str:
        return render_table(self.report)


def describe_pass(spec: opt.Pass) -> str:
    return _PASSES[type(spec)].describe_spec(spec)


def variant_name(name: str, specs: Sequence[opt.Pass]) -> str:
    """The name an optimized model is saved under by default: the source's, plus what the passes made of it
    (`mlp` -> `mlp-onnx-int8`), so that the user's `mlp:latest` keeps meaning the model they saved."""
    words: list[str] = []
    for spec in specs:
        if isinstance(spec, opt.Prune):
            words.append("pruned")
        elif isinstance(spec, opt.Export):
            words.append(spec.format)
        elif isinstance(spec, opt.Quantize):
            words.append("auto" if spec.auto else spec.dtype)
        elif isinstance(spec, opt.Distill):
            words.append("distilled")
        elif isinstance(spec, opt.Compile):
            words.append("trt" if spec.backend == "tensorrt" else "compiled")
    return "-".join([name, *words])[:64].rstrip("-._")


def _pass_document(spec: opt.Pass) -> dict[str, Any]:
    """The declaration as a build config spells it; objects given to distill are shown by name."""
    def named(obj: Any) -> Any:
        return getattr(obj, "__qualname__", type(obj).__qualname__)

    return msgspec.to_builtins(spec, enc_hook=named)


def _gate_document(gate: opt.Gate) -> dict[str, Any]:
    return msgspec.to_builtins(gate, enc_hook=lambda obj: getattr(obj, "__qualname__", type(obj).__qualname__))


def _threads() -> int:
    try:
        import torch

        return torch.get_num_threads()
    except ImportError:
        return os.cpu_count() or 1


class _Build:
    """The state of one optimize_model call: the cache, the reference outputs, the report so far."""

    def __init__(self, source: Model, gate: opt.Gate, inputs: dict[str, np.ndarray], device: str,
                 cache: PassCache, budget_s: float, base_dir: Path | None, log: Callable[[str], None]) -> None:
        self.source, self.gate, self.inputs, self.device = source, gate, inputs, device
        self.cache, self.budget_s, self.base_dir, self.log = cache, budget_s, base_dir, log
        self.inputs_key = fingerprint(inputs)
        self.source_runner = Runner(source, device)
        self.input_names = self.source_runner.input_names
        self.reference = self.source_runner.run_rows(inputs)
        names = self.source_runner.output_names or [f"output_{i}" for i in range(len(self.reference))]
        self.output = output_index(gate, names)

    def measure(self, model: Model, runner: Runner | None = None) -> Measurement:
        """Size and latency of model, cached by its digest, the device and the timing budget."""
        key = make_key("measure", model.info.digest, self.device, self.budget_s, self.inputs_key)
        cached = self.cache.get_json(key)
        if cached is not None:
            return msgspec.convert(cached, type=Measurement)
        runner = runner or Runner(model, self.device)
        one, many = rows_of(self.inputs, 1), rows_of(self.inputs, 32)
        b1 = latency_ms(lambda: runner(one), self.budget_s)
        b32 = latency_ms(lambda: runner(many), self.budget_s)
        measurement = Measurement(
            size_bytes=model_size(model), size_gz_bytes=gzip_size(model), latency_ms_b1=round(b1, 4),
            latency_ms_b32=round(b32, 4), items_per_s=round(32_000 / b32, 2), device=self.device, threads=_threads(),
        )
        self.cache.put_json(key, msgspec.to_builtins(measurement))
        return measurement

    def fidelity(self, model: Model, runner: Runner | None = None) -> Fidelity:
        outputs = (runner or Runner(model, self.device)).run_rows(self.inputs)
        return compare(self.reference, outputs, self.gate, self.output)

    def evaluate(self, model: Model) -> tuple[float, Fidelity]:
        runner = Runner(model, self.device)
        return self.measure(model, runner).items_per_s, self.fidelity(model, runner)

    def materialize(self, label: str, options: Any, model: Model, produce: Callable[[Path], PassOutput]) -> Model:
        """The artifact produce(workdir) makes from model, from the cache when the same label, options and
        input model were seen before."""
        return self._cached(label, options, model, produce)[0].model

    def _cached(
        self, label: str, options: Any, model: Model, produce: Callable[[Path], PassOutput]
    ) -> tuple[CachedArtifact, bool]:
        """(the stored artifact, whether it came from the cache)."""
        try:
            key: str | None = make_key(label, options, model.info.digest, self.device)
        except Uncacheable as exc:
            self.log(f"  not cached: {exc}")
            key = None
        hit = self.cache.get(key) if key else None
        if hit is not None:
            return hit, True
        with tempfile.TemporaryDirectory(prefix="bento-like-optimize-") as workdir:
            started = time.perf_counter()
            output = produce(Path(workdir))
            seconds = round(time.perf_counter() - started, 2)

            def save(store: ModelStore) -> str:
                return store.save(
                    model.name, output.obj, framework=output.framework, metadata=output.metadata, **output.save_options
                )

            extra = {**output.extra, "variants": msgspec.to_builtins(output.variants)} if output.variants else output.extra
            stored = (self.cache if key else PassCache(self.cache.root, enabled=False)).put(
                key or "uncached", model.name, save, notes=output.notes, extra=extra, seconds=seconds
            )
        return stored, False

    def run_pass(self, spec: opt.Pass, model: Model) -> tuple[Model, Step]:
        module = _PASSES[type(spec)]
        options = module.cache_options(spec, self._context()) if hasattr(module, "cache_options") else spec

        def produce(workdir: Path) -> PassOutput:
            return module.run(model, spec, self._context(workdir))

        stored, cached = self._cached(type(spec).__name__.lower(), options, model, produce)
        runner = Runner(stored.model, self.device)
        step = Step(
            name=describe_pass(spec), framework=stored.model.info.framework, digest=stored.model.info.digest,
            measurement=self.measure(stored.model, runner), fidelity=self.fidelity(stored.model, runner),
            cached=cached, pass_seconds=stored.entry.seconds, notes=list(stored.entry.notes),
            extra={k: v for k, v in stored.entry.extra.items() if k != "variants"},
            variants=msgspec.convert(stored.entry.extra.get("variants", []), type=list[Variant]),
        )
        return stored.model, step

    def _context(self, workdir: Path | None = None) -> PassContext:
        return PassContext(
            source=self.source, inputs=self.inputs, gate=self.gate, device=self.device,
            workdir=workdir or Path(tempfile.gettempdir()), cache=self.cache, evaluate=self.evaluate,
            materialize=self.materialize, log=self.log, base_dir=self.base_dir,
        )


def optimize_model(
    tag: str,
    passes: Sequence[Any],
    gate: opt.Gate | Mapping[str, Any] | float | None = None,
    *,
    store: ModelStore | None = None,
    name: str | None = None,
    data: Mapping[str, Any] | str | os.PathLike[str] | None = None,
    device: str = "cpu",
    cache: PassCache | bool = True,
    bench_budget_s: float = 1.0,
    base_dir: str | os.PathLike[str] | None = None,
    save: bool = True,
    save_to: ModelStore | None = None,
    log: Callable[[str], None] | None = print,
) -> OptimizeResult:
    """Optimize the stored model `tag` and save the result as a new version when it passes the gate: under
    `name`, by default the source's name plus the variant (`mlp` -> `mlp-onnx-int8`, see variant_name), or the
    source's own name when saving into another store (`save_to`).

    passes: bl.opt declarations, build-config mappings or shorthands ("onnx", "int8", ...), run in order.
    gate: a bl.opt.Gate, a mapping, a number (cosine minimum) or None (cosine mean >= 0.99).
    data: validation inputs (arrays by input name, or a .npz path) overriding the gate's data.
    cache: a PassCache, True (the default cache), or False (run every pass, keep nothing).
    bench_budget_s: seconds spent timing each batch size of each step (median of the runs).
    base_dir: where relative data paths are resolved (a build's context directory); default the cwd.
    save_to: the store the result is saved in (default: the source's); a build saves into its bento's own
        store, so the user's `name:latest` keeps meaning the source model.
    log: progress lines (None: silent).
    Raises QualityGateError (with `.report`) when the result moves past the gate, PassError when a pass
    cannot apply, PassUnavailableError when it needs hardware or packages this machine lacks.
    """
    specs = opt.passes(passes)
    if not specs:
        raise OptimizeError("optimize_model: give at least one pass")
    gate_spec = opt.gate(gate) or opt.Gate()
    say = log or (lambda _line: None)
    store = store or default_store()
    pass_cache = cache if isinstance(cache, PassCache) else PassCache(enabled=bool(cache))
    source = store.get(tag)
    names = _input_names(source)
    inputs, where = validation_inputs(source, gate_spec, names, data=data, base_dir=base_dir)
    say(f"optimizing {source.tag} ({source.info.framework}): {' -> '.join(describe_pass(s) for s in specs)}")
    build = _Build(source, gate_spec, inputs, device, pass_cache, bench_budget_s, Path(base_dir) if base_dir else None, say)
    report = OptimizationReport(
        source_tag=source.tag, source_digest=source.info.digest, passes=[_pass_document(s) for s in specs],
        gate=_gate_document(gate_spec), validation=where,
    )
    source_measurement = build.measure(source, build.source_runner)
    report.steps.append(Step(name="source", framework=source.info.framework, digest=source.info.digest, measurement=source_measurement))
    current = source
    try:
        for spec in specs:
            say(f"- {describe_pass(spec)}")
            try:
                current, step = build.run_pass(spec, current)
            except QualityGateError as exc:
                exc.report = report
                raise
            report.steps.append(step)
            cached = " (cached)" if step.cached else ""
            say(f"  {step.framework}, {step.measurement.items_per_s:,.0f} items/s, {describe(step.fidelity)}{cached}")
        final = report.steps[-1].fidelity
        report.passed = bool(final and final.passed)
        if not report.passed:
            say(render_table(report))
            raise QualityGateError(
                f"quality gate failed for {source.tag} after {' -> '.join(s.name for s in report.steps[1:])}: "
                f"{describe(final)}; nothing was saved",
                report,
            )
        if not save:
            return OptimizeResult(tag=None, source_tag=source.tag, report=report, model=current)
        target = save_to or store
        default = source.name if save_to is not None else variant_name(source.name, specs)
        new_tag = _save(target, name or default, source, current, report, build)
    finally:
        if save:  # without save, the result stays where it is (the cache, or this process's scratch entry)
            pass_cache.clear_scratch()
    kept = f"; {source.name}:latest is unchanged" if new_tag.split(":")[0] != source.name and save_to is None else ""
    say(f"saved {new_tag}{kept}")
    return OptimizeResult(tag=new_tag, source_tag=source.tag, report=report, model=target.get(new_tag))


def _input_names(source: Model) -> list[str]:
    if source.info.signatures:
        return [spec.name for spec in source.info.signatures[0].inputs]
    if source.info.framework == "torch":
        from ._runner import torch_input_names

        return torch_input_names(source, source.load("cpu"))
    return []


def _save(store: ModelStore, name: str, source: Model, artifact: Model, report: OptimizationReport, build: _Build) -> str:
    metadata = {**source.info.metadata, **artifact.info.metadata, METADATA_KEY: report.manifest_document()}
    labels = dict(source.info.labels)
    framework = artifact.info.framework
    if framework == "torch":
        import torch

        module = artifact.load("cpu")
        options: dict[str, Any] = {}
        if source.info.signatures:
            rows = rows_of(build.inputs, 2)
            args = tuple(torch.from_numpy(np.ascontiguousarray(rows[n])) for n in build.input_names)
            axes = export.dynamic_axes(source, build.input_names, {n: rows[n].ndim for n in build.input_names})
            options = {
                "example_inputs": args,
                "dynamic_shapes": tuple({axis: torch.export.Dim.AUTO for axis in axes[n]} for n in build.input_names),
            }
        return store.save(name, module, framework="torch", metadata=metadata, labels=labels, **options)
    if framework == "onnx":
        return store.save(name, artifact.path / "model.onnx", framework="onnx", metadata=metadata, labels=labels)
    if framework == "tensorrt":
        from bento_like.models._tensorrt import ENGINE_FILE

        return store.save(
            name, artifact.path / ENGINE_FILE, framework="tensorrt", metadata=metadata, labels=labels,
            signatures=list(artifact.info.signatures), build=artifact.info.details.get("build", {}),
        )
    raise PassError(f"cannot save a {framework} artifact")

