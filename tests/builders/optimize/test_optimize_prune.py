"""prune: magnitude zeros (smaller compressed), and hidden units removed from Linear pairs (smaller layers)."""

from __future__ import annotations

import pytest
import torch

import bento_like.models as models
import bento_like.sdk.opt as opt
from bento_like.builders.optimize import PassError, optimize_model
from bento_like.builders.optimize.prune import _pairs_fx, _pairs_sequential
from optimize_testlib import BENCH, MLP, Residual, save_mlp

LOOSE = opt.Gate(metric="cosine", min=-1.0)  # pruning without recovery moves outputs a lot; measured, not gated


def test_unstructured_zeroes_half_of_each_layer_and_shrinks_the_compressed_size(home) -> None:
    tag = save_mlp(sizes=(64, 256, 256, 10))
    result = optimize_model(tag, [opt.prune(0.5)], LOOSE, bench_budget_s=BENCH, log=None)
    module = models.get(result.tag).load()
    for layer in (module.net[0], module.net[2], module.net[4]):
        assert (layer.weight == 0).float().mean().item() == pytest.approx(0.5, abs=0.01)
    source, pruned = result.report.steps
    assert pruned.measurement.size_gz_bytes < 0.75 * source.measurement.size_gz_bytes
    assert "same shapes" in pruned.notes[0]


def test_structured_shrinks_both_layers_of_each_pair(home) -> None:
    tag = save_mlp(sizes=(784, 512, 512, 10))
    result = optimize_model(tag, [opt.prune(0.5, structured=True)], LOOSE, bench_budget_s=BENCH, log=None)
    module = models.get(result.tag).load()
    shapes = [tuple(layer.weight.shape) for layer in module.net if isinstance(layer, torch.nn.Linear)]
    assert shapes == [(256, 784), (256, 256), (10, 256)]
    step = result.report.steps[1]
    assert step.extra["pairs"] == [
        {"first": "net.0", "second": "net.2", "units": [512, 256]},
        {"first": "net.2", "second": "net.4", "units": [512, 256]},
    ]
    assert step.measurement.size_bytes < 0.6 * result.report.steps[0].measurement.size_bytes
    assert models.get(result.tag).info.signatures[0].inputs[0].shape == [-1, 784]


def test_structured_keeps_the_strongest_units() -> None:
    model = MLP((4, 4, 2)).eval()
    with torch.no_grad():
        model.net[0].weight.copy_(torch.diag(torch.tensor([1.0, 5.0, 0.1, 3.0])))
        model.net[2].weight.fill_(1.0)
    from bento_like.builders.optimize.prune import _structured

    with torch.no_grad():
        _structured(model, opt.prune(0.5, structured=True))
    assert torch.equal(model.net[0].weight, torch.tensor([[0.0, 5.0, 0.0, 0.0], [0.0, 0.0, 0.0, 3.0]]))


def test_pairs_follow_only_elementwise_paths() -> None:
    assert _pairs_fx(MLP((8, 8, 8, 2))) == [("net.0", "net.2"), ("net.2", "net.4")]
    assert _pairs_sequential(MLP((8, 8, 2))) == [("net.0", "net.2")]
    assert _pairs_fx(Residual()) == []  # a's output also feeds the residual add


def test_structured_without_a_prunable_pair_says_why(home) -> None:
    tag = models.save("res", Residual().eval(), example_inputs=torch.randn(2, 16))
    with pytest.raises(PassError, match="found no two Linear layers joined only by elementwise operations"):
        optimize_model(tag, [opt.prune(0.5, structured=True)], LOOSE, bench_budget_s=BENCH, log=None)


def test_prune_refuses_onnx_models(mlp_tag: str) -> None:
    with pytest.raises(PassError, match="prune PyTorch models, before export"):
        optimize_model(mlp_tag, ["onnx", opt.prune(0.5)], LOOSE, bench_budget_s=BENCH, log=None)
