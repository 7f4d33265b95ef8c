"""Small models for the optimization builder tests, importable by name (pickles refer to them by reference)."""

from __future__ import annotations

import torch
from torch import nn

import bento_like.models as models

BENCH = 0.01
"""Seconds of timing per batch size per step: enough to exercise measurement, not to measure."""


class MLP(nn.Module):
    def __init__(self, sizes: tuple[int, ...] = (32, 64, 64, 10)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(sizes, sizes[1:], strict=False)):
            layers.append(nn.Linear(a, b))
            if i < len(sizes) - 2:
                layers.append(nn.ReLU())
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Residual(nn.Module):
    """Linear layers joined by a residual add: structured pruning must not touch the pair."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(16, 16)
        self.b = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        return self.b(torch.relu(h)) + h


class Encoder(nn.Module):
    """Token ids and a mask sharing a sequence axis, mean-pooled: the shape of a sentence encoder."""

    def __init__(self, vocab: int = 100, dim: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.proj(self.embed(input_ids)))
        mask = attention_mask.unsqueeze(-1).to(h.dtype)
        return (h * mask).sum(1) / mask.sum(1).clamp(min=1.0)


def outlier_mlp() -> MLP:
    """An MLP whose second layer holds one weight 2,500x larger than the rest, on a hidden unit that is
    always zero: per-channel int8 scales represent it exactly, while one scale per tensor rounds every other
    weight of the layer to zero."""
    torch.manual_seed(1)
    model = MLP((32, 64, 16)).eval()
    with torch.no_grad():
        model.net[0].weight[0] = 0.0
        model.net[0].bias[0] = -1.0  # hidden unit 0 never fires
        model.net[2].weight[0] = 0.0
        model.net[2].weight[0, 0] = 500.0
    return model


def save_mlp(name: str = "mlp", sizes: tuple[int, ...] = (32, 64, 64, 10), model: nn.Module | None = None) -> str:
    torch.manual_seed(0)
    model = model if model is not None else MLP(sizes).eval()
    example = torch.randn(2, model.net[0].in_features)
    return models.save(name, model, example_inputs=example, dynamic_shapes=({0: torch.export.Dim("batch")},))


def save_encoder(name: str = "encoder") -> str:
    torch.manual_seed(0)
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    ids = torch.randint(0, 100, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.int64)
    return models.save(
        name, Encoder().eval(), example_inputs=(ids, mask), dynamic_shapes=({0: batch, 1: seq}, {0: batch, 1: seq})
    )


def mean_abs_diff(reference: list, candidate: list) -> float:
    """A user metric named by import path in a gate."""
    return float(abs(reference[0] - candidate[0]).mean())


def small_student(model: nn.Module | None) -> nn.Module:
    """A distillation student built from the model so far (ignored here): a narrower MLP."""
    return MLP((32, 16, 10))


def counting_step(ctx, batch) -> dict:
    """A user train step: one MSE step toward the teacher, reporting extra metrics."""
    (x,) = batch
    x = torch.as_tensor(x)
    with torch.no_grad():
        target = ctx.teacher(x)
    loss = torch.nn.functional.mse_loss(ctx.student(x), target)
    ctx.optimizer.zero_grad()
    loss.backward()
    ctx.optimizer.step()
    return {"loss": loss.item(), "rows": float(len(x))}


def evaluate_student(student: nn.Module) -> dict:
    return {"hidden": float(student.net[0].out_features)}
