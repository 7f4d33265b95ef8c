"""Weight-only INT8 and INT4 linear layers: `y = x @ dequantize(W).T + bias`, activations kept in float.

Weights are quantized symmetrically: INT8 with one scale per output channel (`q = round(w / s)`,
`s = max|w_row| / 127`), INT4 with one scale per `group_size` input features of each output channel
(`s = max|w_group| / 7`, q in [-8, 7], stored as `q + 8`, two per byte: even input feature in the low
nibble). The `reference_*` functions define what the kernels compute; the Triton kernels compute the same
product without ever materializing the float weight matrix, which is what makes weight-only quantization
pay on a GPU (memory-bound matmuls read a quarter or an eighth of the bytes).

`WeightOnlyLinear` runs the Triton kernel on CUDA tensors when triton is importable, the reference
otherwise. With `TRITON_INTERPRET=1` set before this module is imported, the kernels also run on CPU tensors
in Triton's interpreter: slow, but it checks their arithmetic on machines without a GPU.

This module imports torch and (optionally) triton only: never the rest of bento_like.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

try:
    import triton
    import triton.language as tl
except ImportError:  # the reference serves CPU-only installations
    triton = None
    tl = None

__all__ = [
    "WeightOnlyLinear",
    "int4_weight_only_linear",
    "int8_weight_only_linear",
    "pack_int4",
    "quantize_int4",
    "quantize_int8",
    "reference_int4",
    "reference_int8",
    "triton_available",
    "unpack_int4",
]


def triton_available() -> bool:
    return triton is not None


# --- quantization and the reference -------------------------------------------------------------------------


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 [N, K], scale float32 [N]) for a weight [N, K], symmetric per output channel."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int values in [-8, 7], shape [N, K] with K even -> uint8 [N, K // 2]."""
    u = (q.to(torch.int16) + 8).to(torch.uint8)
    return u[:, 0::2] | (u[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K // 2] -> int8 [N, K] in [-8, 7]."""
    low = (packed & 0x0F).to(torch.int8) - 8
    high = (packed >> 4).to(torch.int8) - 8
    return torch.stack((low, high), dim=2).reshape(packed.shape[0], -1)


def quantize_int4(weight: torch.Tensor, group_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed uint8 [N, K // 2], scales float32 [N, K // group_size]); K must be a multiple of group_size,
    and group_size even."""
    n, k = weight.shape
    if group_size % 2 or k % group_size:
        raise ValueError(f"int4 needs in_features ({k}) to be a multiple of an even group_size ({group_size})")
    w = weight.detach().float().reshape(n, k // group_size, group_size)
    scales = (w.abs().amax(dim=2) / 7).clamp(min=1e-12)
    q = torch.round(w / scales[:, :, None]).clamp(-8, 7).reshape(n, k)
    return pack_int4(q), scales


def reference_int8(
    x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """What the INT8 kernel computes: (x @ q.T) * scale + bias in float32, returned in x's dtype."""
    y = (x.float() @ q.float().t()) * scale.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def reference_int4(
    x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, group_size: int, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """What the INT4 kernel computes: x @ (unpack(packed) * scales per group).T + bias in float32."""
    w = unpack_int4(packed).float() * scales.float().repeat_interleave(group_size, dim=1)
    y = x.float() @ w.t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


# --- Triton kernels -----------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _int8_kernel(
        x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, M, N, K,
        stride_xm, stride_xk, stride_wn, stride_wk, stride_ym, stride_yn,
        HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + offs_k
            x = tl.load(
                x_ptr + offs_m[:, None] * stride_xm + k[None, :] * stride_xk,
                mask=(offs_m[:, None] < M) & (k[None, :] < K), other=0.0,
            )
            w = tl.load(
                w_ptr + offs_n[None, :] * stride_wn + k[:, None] * stride_wk,
                mask=(offs_n[None, :] < N) & (k[:, None] < K), other=0,
            )
            acc += tl.dot(x, w.to(x.dtype))
        scale = tl.load(s_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
        acc = acc * scale[None, :]
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        tl.store(
            y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn,
            acc.to(y_ptr.dtype.element_ty),
            mask=(offs_m[:, None] < M) & (offs_n[None, :] < N),
        )

    @triton.jit
    def _int4_kernel(
        x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, M, N, K,
        stride_xm, stride_xk, stride_wn, stride_wk, stride_sn, stride_sg, stride_ym, stride_yn,
        GROUP: tl.constexpr, HAS_BIAS: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + offs_k
            x = tl.load(
                x_ptr + offs_m[:, None] * stride_xm + k[None, :] * stride_xk,
                mask=(offs_m[:, None] < M) & (k[None, :] < K), other=0.0,
            )
            w_mask = (offs_n[None, :] < N) & (k[:, None] < K)
            packed = tl.load(w_ptr + offs_n[None, :] * stride_wn + (k[:, None] // 2) * stride_wk, mask=w_mask, other=0)
            nibble = (packed.to(tl.int32) >> ((k[:, None] % 2) * 4)) & 0xF
            scale = tl.load(
                s_ptr + offs_n[None, :] * stride_sn + (k[:, None] // GROUP) * stride_sg, mask=w_mask, other=0.0
            )
            w = (nibble.to(tl.float32) - 8.0) * scale.to(tl.float32)
            acc += tl.dot(x, w.to(x.dtype))
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        tl.store(
            y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn,
            acc.to(y_ptr.dtype.element_ty),
            mask=(offs_m[:, None] < M) & (offs_n[None, :] < N),
        )


def _blocks(m: int) -> tuple[int, int, int]:
    """Tile sizes: tl.dot needs 16 or more on each side; small batches (decoding) get the narrowest M tile."""
    return (16 if m <= 16 else 64), 64, 64


def _launch_checks(x: torch.Tensor) -> None:
    if triton is None:
        raise RuntimeError("the weight-only kernels need triton (pip install triton); use the reference_* functions")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"activations must be float16, bfloat16 or float32, got {x.dtype}")


def int8_weight_only_linear(
    x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """The Triton INT8 kernel on x [..., K], q int8 [N, K], scale [N]: same result as reference_int8."""
    _launch_checks(x)
    n, k = q.shape
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    block_m, block_n, block_k = _blocks(m)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _int8_kernel[grid](
        x2, q, scale, bias if bias is not None else scale, y, m, n, k,
        x2.stride(0), x2.stride(1), q.stride(0), q.stride(1), y.stride(0), y.stride(1),
        HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
    )
    return y.reshape(*x.shape[:-1], n)


def int4_weight_only_linear(
    x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, group_size: int, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """The Triton INT4 kernel on x [..., K], packed uint8 [N, K // 2], scales [N, K // group_size]."""
    _launch_checks(x)
    n, k = packed.shape[0], packed.shape[1] * 2
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    block_m, block_n, block_k = _blocks(m)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _int4_kernel[grid](
        x2, packed, scales, bias if bias is not None else scales, y, m, n, k,
        x2.stride(0), x2.stride(1), packed.stride(0), packed.stride(1), scales.stride(0), scales.stride(1),
        y.stride(0), y.stride(1),
        GROUP=group_size, HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
    )
    return y.reshape(*x.shape[:-1], n)


# --- the layer ----------------------------------------------------------------------------------------------


class WeightOnlyLinear(nn.Module):
    """A Linear layer whose weight is stored as INT8 (per-channel scales) or INT4 (per-group scales)."""

    def __init__(
        self, in_features: int, out_features: int, *, bits: int = 8, group_size: int = 128, bias: bool = True
    ) -> None:
        super().__init__()
        if bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, got {bits}")
        self.in_features, self.out_features, self.bits, self.group_size = in_features, out_features, bits, group_size
        if bits == 8:
            self.register_buffer("weight_q", torch.zeros(out_features, in_features, dtype=torch.int8))
            self.register_buffer("scales", torch.ones(out_features))
        else:
            self.register_buffer("weight_q", torch.zeros(out_features, in_features // 2, dtype=torch.uint8))
            self.register_buffer("scales", torch.ones(out_features, in_features // group_size))
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, bits: int = 8, group_size: int = 128) -> WeightOnlyLinear:
        layer = cls(linear.in_features, linear.out_features, bits=bits, group_size=group_size, bias=linear.bias is not None)
        q, scales = quantize_int8(linear.weight) if bits == 8 else quantize_int4(linear.weight, group_size)
        layer.weight_q.copy_(q)
        layer.scales.copy_(scales)
        if linear.bias is not None:
            layer.bias.data.copy_(linear.bias.detach().float())
        return layer.to(linear.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias
        if x.is_cuda and triton is not None:
            if self.bits == 8:
                return int8_weight_only_linear(x, self.weight_q, self.scales, bias)
            return int4_weight_only_linear(x, self.weight_q, self.scales, self.group_size, bias)
        if self.bits == 8:
            # Same product as reference_int8, with the scale folded into the weight: one matmul in x's dtype.
            return F.linear(x, self.weight_q.to(x.dtype) * self.scales.to(x.dtype)[:, None], None if bias is None else bias.to(x.dtype))
        return reference_int4(x, self.weight_q, self.scales, self.group_size, bias)

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.bits == 4 else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}{group}, bias={self.bias is not None}"
