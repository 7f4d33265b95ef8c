"""The pass cache: keys follow content, entries install whole, a second build reuses every pass."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

import bento_like.models as models
import bento_like.sdk.opt as opt
from bento_like.builders.optimize import PassCache, optimize_model
from bento_like.builders.optimize import quantize as quantize_pass
from bento_like.builders.optimize.cache import Uncacheable, fingerprint, make_key
from optimize_testlib import BENCH, MLP


def test_keys_follow_content_not_identity(tmp_path: Path) -> None:
    a = np.arange(6, dtype=np.float32)
    assert make_key("p", a.copy()) == make_key("p", a.copy())
    assert make_key("p", a) != make_key("p", a + 1)
    torch.manual_seed(0)
    m1 = MLP()
    m2 = MLP()
    assert fingerprint(m1) != fingerprint(m2)
    (tmp_path / "d.npz").write_bytes(b"one")
    first = make_key(tmp_path / "d.npz")
    (tmp_path / "d.npz").write_bytes(b"two")
    assert make_key(tmp_path / "d.npz") != first
    assert make_key(opt.quantize("int8")) != make_key(opt.quantize("int8", per_channel=False))
    with pytest.raises(Uncacheable):
        make_key(x for x in range(3))


def test_put_installs_an_entry_and_a_racing_put_keeps_one(home: Path) -> None:
    cache = PassCache()
    assert cache.root == home / "cache" / "optimize"

    def save(store: models.ModelStore) -> str:
        return store.save("blob", [1, 2, 3], framework="pickle")

    entry = cache.put("k1", "blob", save, notes=["n"], extra={"e": 1})
    again = cache.put("k1", "blob", save)  # the same key filled twice: the first entry stays
    assert again.path == entry.path and cache.get("k1").entry.notes == ["n"]
    assert cache.get("k1").model.load() == [1, 2, 3]
    assert cache.get("missing") is None
    assert not [p for p in cache.root.iterdir() if p.name.startswith(".tmp")]
    disabled = PassCache(enabled=False)
    scratch = disabled.put("k2", "blob", save)
    assert disabled.get("k2") is None and scratch.path.name.startswith(".scratch-")
    disabled.clear_scratch()
    assert not scratch.path.exists()


def test_second_build_hits_the_cache_for_every_pass(mlp_tag: str, monkeypatch: pytest.MonkeyPatch) -> None:
    passes = [opt.export("onnx"), opt.quantize("int8")]
    first = optimize_model(mlp_tag, passes, 0.99, bench_budget_s=BENCH, log=None)
    assert [s.cached for s in first.report.steps] == [False, False, False]
    calls = []
    with monkeypatch.context() as patch:
        patch.setattr(quantize_pass, "run", lambda *a: calls.append(a))
        second = optimize_model(mlp_tag, passes, 0.99, bench_budget_s=BENCH, log=None)
    assert [s.cached for s in second.report.steps[1:]] == [True, True] and not calls
    assert second.tag == first.tag  # same inputs, same report, same version
    entries = [p for p in (Path(os.environ["BENTO_LIKE_HOME"]) / "cache" / "optimize").iterdir() if len(p.name) == 64]
    assert len(entries) == 2
    third = optimize_model(mlp_tag, [opt.export("onnx"), opt.quantize("int8", per_channel=False)], 0.9, bench_budget_s=BENCH, log=None)
    assert [s.cached for s in third.report.steps[1:]] == [True, False]  # other options, other key
