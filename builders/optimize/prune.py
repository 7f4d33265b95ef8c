"""prune(amount, structured=...): remove the smallest weights of a PyTorch model's Linear layers.

Unstructured pruning zeroes `amount` of each layer's weights by magnitude. The shapes stay, so the model is
no faster on dense kernels (and sparse kernels were slower still at 50%, measured here); what shrinks is the
compressed size, i.e. the image layer. Structured pruning removes whole hidden units between two Linear layers
joined only by elementwise operations (activations, dropout): the first layer loses output rows, the second
the matching input columns, and both are rebuilt smaller, so every matmul does less work. Units are ranked by
the product of their outgoing and incoming weight norms.

Either way accuracy drops (on the digits MLP here, 50% structured: argmax agreement 0.70): follow pruning with
`distill(...)` to recover it.
"""

from __future__ import annotations

from typing import Any

from bento_like.models import Model
from bento_like.sdk.opt import Prune

from ._context import PassContext, PassOutput
from ._errors import PassError

_ELEMENTWISE_MODULES = (
    "ReLU", "ReLU6", "GELU", "SiLU", "Tanh", "Sigmoid", "LeakyReLU", "ELU", "SELU", "Mish", "Hardswish",
    "Hardtanh", "Softplus", "Dropout", "Identity",
)
_ELEMENTWISE_FUNCTIONS = ("relu", "relu6", "gelu", "silu", "tanh", "sigmoid", "leaky_relu", "elu", "selu", "mish", "hardswish", "dropout", "softplus")


def describe_spec(spec: Prune) -> str:
    kind = "structured" if spec.structured else "unstructured"
    return f"prune({spec.amount:.0%} {kind})"


def run(model: Model, spec: Prune, ctx: PassContext) -> PassOutput:
    if model.info.framework != "torch":
        raise PassError(f"prune: {model.tag} is a {model.info.framework} model; prune PyTorch models, before export")
    import torch

    module = model.load("cpu")
    before = sum(p.numel() for p in module.parameters())
    with torch.no_grad():
        if spec.structured:
            pairs = _structured(module, spec)
            after = sum(p.numel() for p in module.parameters())
            notes = [f"{len(pairs)} Linear pair(s) shrunk; parameters {before:,} -> {after:,}"]
            return PassOutput(obj=module, framework="torch", notes=notes, extra={"pairs": pairs, "parameters": [before, after]})
        layers = _unstructured(module, spec)
    zeros = sum(int((p == 0).sum()) for p in module.parameters())
    notes = [f"{len(layers)} Linear layer(s) at {spec.amount:.0%} zeros; same shapes (no speedup on dense kernels)"]
    return PassOutput(obj=module, framework="torch", notes=notes, extra={"layers": layers, "zero_parameters": zeros, "parameters": before})


def _linears(module: Any, spec: Prune) -> list[tuple[str, Any]]:
    import torch

    found = [(name, child) for name, child in module.named_modules() if isinstance(child, torch.nn.Linear)]
    if spec.layers:
        unknown = set(spec.layers) - {name for name, _ in found}
        if unknown:
            raise PassError(f"prune: no Linear layer named {', '.join(sorted(unknown))}")
        found = [(name, child) for name, child in found if name in spec.layers]
    if not found:
        raise PassError("prune: the model has no nn.Linear layer to prune")
    return found


def _unstructured(module: Any, spec: Prune) -> list[str]:
    names = []
    for name, linear in _linears(module, spec):
        weight = linear.weight
        count = int(weight.numel() * spec.amount)
        if count == 0:
            continue
        threshold = weight.abs().flatten().kthvalue(count).values
        weight.masked_fill_(weight.abs() <= threshold, 0.0)
        names.append(name)
    return names


def _structured(module: Any, spec: Prune) -> list[dict[str, Any]]:
    import torch

    pairs = _pairs(module)
    if spec.layers:
        pairs = [(a, b) for a, b in pairs if a in spec.layers]
    if not pairs:
        raise PassError(
            "prune(structured=True): found no two Linear layers joined only by elementwise operations "
            "(Linear -> activation -> Linear), in a torch.fx trace or in an nn.Sequential"
        )
    done = []
    for a_name, b_name in pairs:
        a, b = module.get_submodule(a_name), module.get_submodule(b_name)
        units = a.out_features
        keep_count = max(1, round(units * (1 - spec.amount)))
        score = a.weight.norm(dim=1) * b.weight.norm(dim=0)
        keep = torch.sort(torch.topk(score, keep_count).indices).values
        _replace(module, a_name, _slice_linear(a, rows=keep))
        _replace(module, b_name, _slice_linear(module.get_submodule(b_name), columns=keep))
        done.append({"first": a_name, "second": b_name, "units": [units, keep_count]})
    return done


def _slice_linear(linear: Any, *, rows: Any = None, columns: Any = None) -> Any:
    import torch

    weight = linear.weight
    if rows is not None:
        weight = weight[rows]
    if columns is not None:
        weight = weight[:, columns]
    bias = linear.bias
    if bias is not None and rows is not None:
        bias = bias[rows]
    new = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=weight.dtype, device=weight.device)
    new.weight.copy_(weight)
    if bias is not None:
        new.bias.copy_(bias)
    return new


def _replace(module: Any, name: str, new: Any) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(module.get_submodule(parent) if parent else module, attr, new)


def _pairs(module: Any) -> list[tuple[str, str]]:
    """(first, second) Linear names whose hidden units can be removed together."""
    try:
        return _pairs_fx(module)
    except Exception:  # symbolic tracing fails on data-dependent Python in many models; fall back
        return _pairs_sequential(module)


def _is_elementwise(node: Any, modules: dict[str, Any]) -> bool:
    if node.op == "call_module":
        return type(modules[node.target]).__name__ in _ELEMENTWISE_MODULES
    if node.op in ("call_function", "call_method"):
        name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
        return name.rstrip("_") in _ELEMENTWISE_FUNCTIONS
    return False


def _pairs_fx(module: Any) -> list[tuple[str, str]]:
    import torch
    import torch.fx

    graph = torch.fx.symbolic_trace(module).graph
    modules = dict(module.named_modules())
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), torch.nn.Linear) or calls[node.target] != 1:
            continue
        current = node
        while len(current.users) == 1:
            (user,) = current.users
            if user.op == "call_module" and isinstance(modules.get(user.target), torch.nn.Linear):
                if calls[user.target] == 1 and user.args and user.args[0] is current:
                    pairs.append((node.target, user.target))
                break
            if not _is_elementwise(user, modules) or not user.args or user.args[0] is not current:
                break
            current = user
    return pairs


def _pairs_sequential(module: Any) -> list[tuple[str, str]]:
    import torch

    pairs = []
    for name, container in module.named_modules():
        if not isinstance(container, torch.nn.Sequential):
            continue
        children = list(container.named_children())
        for i, (child_name, child) in enumerate(children):
            if not isinstance(child, torch.nn.Linear):
                continue
            for next_name, next_child in children[i + 1 :]:
                if isinstance(next_child, torch.nn.Linear):
                    prefix = f"{name}." if name else ""
                    pairs.append((prefix + child_name, prefix + next_name))
                    break
                if type(next_child).__name__ not in _ELEMENTWISE_MODULES:
                    break
    return pairs
