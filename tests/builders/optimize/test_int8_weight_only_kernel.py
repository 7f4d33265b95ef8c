"""bento_like.kernels.int8_weight_only: the Triton kernels compute what their PyTorch references define.

Without CUDA the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set by this folder's conftest before
the module is imported); with CUDA they are compiled. Skipped where triton is not installed."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
from bento_like.kernels import int8_weight_only as k  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and type(k._int8_kernel).__name__ != "InterpretedFunction":
    pytest.skip("the kernel module was imported before TRITON_INTERPRET=1 was set", allow_module_level=True)


@pytest.mark.parametrize(("m", "k_dim", "n"), [(1, 64, 16), (5, 96, 40), (37, 200, 70)])
def test_int8_kernel_matches_reference(m: int, k_dim: int, n: int) -> None:
    gen = torch.Generator().manual_seed(m)
    x = torch.randn(m, k_dim, generator=gen).to(DEVICE)
    q, scale = k.quantize_int8(torch.randn(n, k_dim, generator=gen))
    bias = torch.randn(n, generator=gen)
    q, scale, bias = q.to(DEVICE), scale.to(DEVICE), bias.to(DEVICE)
    expected = k.reference_int8(x, q, scale, bias)
    torch.testing.assert_close(k.int8_weight_only_linear(x, q, scale, bias), expected, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(k.int8_weight_only_linear(x, q, scale), k.reference_int8(x, q, scale), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize(("m", "k_dim", "n", "group"), [(3, 64, 16, 32), (20, 256, 48, 128)])
def test_int4_kernel_matches_reference(m: int, k_dim: int, n: int, group: int) -> None:
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(m, k_dim, generator=gen).to(DEVICE)
    packed, scales = k.quantize_int4(torch.randn(n, k_dim, generator=gen), group)
    bias = torch.randn(n, generator=gen).to(DEVICE)
    packed, scales = packed.to(DEVICE), scales.to(DEVICE)
    expected = k.reference_int4(x, packed, scales, group, bias)
    torch.testing.assert_close(k.int4_weight_only_linear(x, packed, scales, group, bias), expected, rtol=1e-4, atol=1e-3)


def test_half_precision_activations_and_leading_dims() -> None:
    x = torch.randn(2, 3, 64).half().to(DEVICE)
    q, scale = k.quantize_int8(torch.randn(32, 64))
    q, scale = q.to(DEVICE), scale.to(DEVICE)
    y = k.int8_weight_only_linear(x, q, scale)
    assert y.shape == (2, 3, 32) and y.dtype == torch.float16
    torch.testing.assert_close(y.float(), k.reference_int8(x, q, scale).float(), rtol=1e-2, atol=2e-2)


def test_quantization_round_trips_and_layer_follows_reference() -> None:
    values = torch.randint(-8, 8, (4, 10), dtype=torch.int8)
    assert torch.equal(k.unpack_int4(k.pack_int4(values)), values)
    linear = torch.nn.Linear(64, 24)
    x = torch.randn(5, 64)
    layer8 = k.WeightOnlyLinear.from_linear(linear)
    torch.testing.assert_close(layer8(x), k.reference_int8(x, layer8.weight_q, layer8.scales, layer8.bias))
    torch.testing.assert_close(layer8(x), linear(x), rtol=0.05, atol=0.02)
    layer4 = k.WeightOnlyLinear.from_linear(linear, bits=4, group_size=32)
    assert layer4.weight_q.shape == (24, 32) and layer4.scales.shape == (24, 2)
    with pytest.raises(ValueError, match="multiple of an even group_size"):
        k.quantize_int4(torch.randn(4, 48), 32)
