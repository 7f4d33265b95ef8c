"""distill: the builder runs the user's training hook and records the student's metrics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

import bento_like.models as models
import bento_like.sdk.opt as opt
from bento_like.builders.optimize import optimize_model
from optimize_testlib import BENCH, save_mlp

LOOSE = opt.Gate(metric="argmax", min=0.0)


def _batches(count: int = 40, rows: int = 64) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    return [torch.randn(rows, 32, generator=generator) for _ in range(count)]


def test_distill_after_structured_pruning_recovers_agreement(home) -> None:
    tag = save_mlp(sizes=(32, 128, 128, 10))
    result = optimize_model(
        tag, [opt.prune(0.5, structured=True), opt.distill(_batches(), epochs=4)], LOOSE, bench_budget_s=BENCH, log=None
    )
    _, pruned, distilled = result.report.steps
    assert distilled.fidelity.argmax > pruned.fidelity.argmax + 0.1
    assert distilled.fidelity.cosine_mean > pruned.fidelity.cosine_mean
    losses = distilled.extra["epoch_loss"]
    assert len(losses) == 4 and losses[-1] < losses[0] and distilled.extra["steps"] == 160
    module = models.get(result.tag).load()
    assert module.net[0].out_features == 64  # the student is the pruned model, trained


def test_user_student_train_step_and_evaluate_by_import_path(home, tmp_path: Path) -> None:
    tag = save_mlp()
    np.savez(tmp_path / "train.npz", x=np.random.default_rng(0).standard_normal((96, 32)).astype(np.float32))
    spec = opt.distill(
        "train.npz", student="optimize_testlib:small_student", train_step="optimize_testlib:counting_step",
        evaluate="optimize_testlib:evaluate_student", epochs=2, batch_size=32,
    )
    result = optimize_model(tag, [spec], LOOSE, bench_budget_s=BENCH, log=None, base_dir=tmp_path)
    step = result.report.steps[1]
    assert step.name == "distill(optimize_testlib:small_student, 2 epochs)"
    assert step.extra["steps"] == 6 and step.extra["metrics"] == {"hidden": 16.0, "rows": 32.0}
    assert models.get(result.tag).load().net[0].out_features == 16


def test_distill_results_are_cached_by_data_and_code(home) -> None:
    tag = save_mlp()
    batches = _batches(4)
    first = optimize_model(tag, [opt.distill(batches)], LOOSE, bench_budget_s=BENCH, log=None)
    again = optimize_model(tag, [opt.distill(batches)], LOOSE, bench_budget_s=BENCH, log=None)
    assert again.report.steps[1].cached and again.tag == first.tag
    other = optimize_model(tag, [opt.distill(_batches(5))], LOOSE, bench_budget_s=BENCH, log=None)
    assert not other.report.steps[1].cached
    one_shot = optimize_model(tag, [opt.distill(iter(batches))], LOOSE, bench_budget_s=BENCH, log=None)
    assert not one_shot.report.steps[1].cached  # an iterator has no fingerprint: run, not cached
