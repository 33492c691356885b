"""Triton kernels for the fused AGC+ReLU (``deepcontrol.nn.fused_agc``).

Four passes over activation-sized memory per layer and step, the fewest the fused function
allows: forward, one read of ``y`` for the sums and one read of ``y`` and write of ``out``;
backward, one read of ``∂L/∂out`` and ``out`` for the sums and one more of both to write
``∂L/∂y``. The per-(sample, channel) arithmetic (means, eq. (1)'s scale and shift, the
parameters' gradients) happens inside the kernels too, so a layer launches three kernels
and one small sum forward and four backward: in eager mode at batch 1, launches, not memory,
bound the step. Sums and the backward are float32 whatever the activations' dtype; the
forward rounds as PyTorch's eq. (1) does, so that both zero the same outputs.

Each kernel sees a tensor as (N, H·W, C) through its strides, so NCHW and channels_last
activations run without a copy. Off CUDA the kernels run only under Triton's interpreter
(``TRITON_INTERPRET=1`` set before Triton is first imported), which is how the CPU tests
check them against the reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

TILE = 4096  # elements of one program's (positions × channels) tile
PROGRAMS = 1024  # reduction programs to aim for: several per streaming multiprocessor


@triton.jit
def _rounded(x, dtype: tl.constexpr):
    """``x`` rounded to ``dtype`` (to nearest, ties to even) and kept in float32. Written out
    for bf16 because Triton's interpreter, which the CPU tests use, truncates there."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    else:
        return x.to(dtype).to(tl.float32)


@triton.jit
def _param(ptr, c, c_ok, dtype: tl.constexpr):
    """The per-channel parameter at ``ptr`` (λ, γ or β) for channels ``c``, rounded to the
    activations' ``dtype`` as eq. (1) uses it under autocast, in float32."""
    return _rounded(tl.load(ptr + c, mask=c_ok, other=0.0).to(tl.float32), dtype)


@triton.jit
def _tile(C, HW, BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's sample ``n``, channels ``c`` and positions ``hw`` in the elementwise
    kernels' (N, C blocks, HW blocks) grid, with the channel and tile masks."""
    n = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    hw = (tl.program_id(2) * BLOCK_HW + tl.arange(0, BLOCK_HW)).to(tl.int64)
    c_ok = c < C
    return n, c, hw, c_ok, (hw < HW)[:, None] & c_ok[None, :]


@triton.jit
def _partial_sums_kernel(
    a_ptr, out_ptr, bias_ptr, partial_ptr,
    N, C, HW, rows,
    a_sn, a_shw, a_sc, o_sn, o_shw, o_sc,
    BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr, GRAD: tl.constexpr,
):  # fmt: skip
    """Per-(sample, channel) sums over one chunk of ``rows`` positions, into
    ``partial[k, chunk, n, c]``. Forward (``GRAD=False``): ``Σ a`` with ``a = y``. Backward:
    ``Σ g`` (k = 0) and ``Σ g·(out - β)`` (k = 1), with ``g = a·[out > 0]``, ``a = ∂L/∂out``."""
    n = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    chunk = tl.program_id(2)
    c_ok = c < C
    total = tl.zeros((BLOCK_HW, BLOCK_C), dtype=tl.float32)
    dot = tl.zeros((BLOCK_HW, BLOCK_C), dtype=tl.float32)
    if GRAD:
        beta = _param(bias_ptr, c, c_ok, out_ptr.dtype.element_ty)[None, :]
    first = chunk * rows
    for start in range(0, rows, BLOCK_HW):
        hw = (first + start + tl.arange(0, BLOCK_HW)).to(tl.int64)
        ok = (hw < HW)[:, None] & c_ok[None, :]
        a = tl.load(a_ptr + n * a_sn + hw[:, None] * a_shw + c[None, :] * a_sc, mask=ok, other=0.0)
        a = a.to(tl.float32)
        if GRAD:
            o = tl.load(out_ptr + n * o_sn + hw[:, None] * o_shw + c[None, :] * o_sc, mask=ok,
                        other=0.0).to(tl.float32)  # fmt: skip
            a = tl.where(o <= 0, 0.0, a)
            dot += a * (o - beta)
        total += a
    at = (chunk * N + n) * C + c
    tl.store(partial_ptr + at, tl.sum(total, axis=0), mask=c_ok)
    if GRAD:
        tl.store(partial_ptr + tl.num_programs(2) * N * C + at, tl.sum(dot, axis=0), mask=c_ok)


@triton.jit
def _agc_relu_kernel(
    y_ptr, out_ptr, sums_ptr, lam_ptr, gamma_ptr, beta_ptr,
    C, HW,
    y_sn, y_shw, y_sc, o_sn, o_shw, o_sc,
    BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """One tile of eq. (1) and the ReLU, ``relu((y - λ·mean)·γ + β)``, rounded to ``out``'s
    dtype after each operation as PyTorch computes the reference."""
    n, c, hw, c_ok, ok = _tile(C, HW, BLOCK_HW, BLOCK_C)
    dtype = out_ptr.dtype.element_ty
    mean = _rounded(tl.load(sums_ptr + n * C + c, mask=c_ok, other=0.0) / HW, dtype)
    lam = _param(lam_ptr, c, c_ok, dtype)
    gamma = _param(gamma_ptr, c, c_ok, dtype)
    beta = _param(beta_ptr, c, c_ok, dtype)
    sub = _rounded(lam * mean, dtype)[None, :]
    y = tl.load(y_ptr + n * y_sn + hw[:, None] * y_shw + c[None, :] * y_sc, mask=ok, other=0.0)
    res = _rounded(_rounded(y.to(tl.float32) - sub, dtype) * gamma[None, :], dtype) + beta[None, :]
    res = _rounded(tl.where(res < 0, 0.0, res), dtype)  # NaN stays NaN, as in torch.relu
    tl.store(out_ptr + n * o_sn + hw[:, None] * o_shw + c[None, :] * o_sc, res.to(dtype), mask=ok)


@triton.jit
def _agc_relu_grad_kernel(
    g_ptr, out_ptr, grad_ptr, gsums_ptr, lam_ptr, gamma_ptr,
    C, HW,
    g_sn, g_shw, g_sc, o_sn, o_shw, o_sc, r_sn, r_shw, r_sc,
    BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """One tile of ``∂L/∂y = γ·g - γλ·mean_HW(g)`` with ``g = ∂L/∂out·[out > 0]``; ``gsums``
    holds ``Σ_HW g`` per (sample, channel)."""
    n, c, hw, c_ok, ok = _tile(C, HW, BLOCK_HW, BLOCK_C)
    dtype = grad_ptr.dtype.element_ty
    lam = _param(lam_ptr, c, c_ok, dtype)
    gamma = _param(gamma_ptr, c, c_ok, dtype)
    g_sum = tl.load(gsums_ptr + n * C + c, mask=c_ok, other=0.0)
    shift = (-gamma * lam * g_sum / HW)[None, :]
    g = tl.load(g_ptr + n * g_sn + hw[:, None] * g_shw + c[None, :] * g_sc, mask=ok, other=0.0)
    o = tl.load(out_ptr + n * o_sn + hw[:, None] * o_shw + c[None, :] * o_sc, mask=ok, other=0.0)
    res = tl.where(o <= 0, 0.0, g.to(tl.float32) * gamma[None, :]) + shift
    res = _rounded(res, dtype).to(dtype)
    tl.store(grad_ptr + n * r_sn + hw[:, None] * r_shw + c[None, :] * r_sc, res, mask=ok)


@triton.jit
def _param_grads_kernel(
    sums_ptr, gsums_ptr, gamma_ptr, grad_lam_ptr, grad_gamma_ptr, grad_beta_ptr, out_ptr,
    N, C, HW,
    BLOCK_C: tl.constexpr,
):  # fmt: skip
    """λ, γ and β's gradients from the per-(sample, channel) sums: ``Σ g``, ``Σ g·(out-β)/γ``
    (0 where γ is exactly 0, which leaves ``y - λm`` unrecoverable) and ``-γ Σ_n m·Σ g``.
    Of ``out`` only the dtype is read, to round as the forward did."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    dtype = out_ptr.dtype.element_ty
    gamma = _param(gamma_ptr, c, c_ok, dtype)
    g_total = tl.zeros((BLOCK_C,), dtype=tl.float32)
    dot_total = tl.zeros((BLOCK_C,), dtype=tl.float32)
    mean_g_total = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for n in range(0, N):
        g_sum = tl.load(gsums_ptr + n * C + c, mask=c_ok, other=0.0)
        mean = _rounded(tl.load(sums_ptr + n * C + c, mask=c_ok, other=0.0) / HW, dtype)
        g_total += g_sum
        dot_total += tl.load(gsums_ptr + (N + n) * C + c, mask=c_ok, other=0.0)
        mean_g_total += mean * g_sum
    tl.store(grad_beta_ptr + c, g_total.to(grad_beta_ptr.dtype.element_ty), mask=c_ok)
    grad_gamma = tl.where(gamma == 0, 0.0, dot_total / tl.where(gamma == 0, 1.0, gamma))
    tl.store(grad_gamma_ptr + c, grad_gamma.to(grad_gamma_ptr.dtype.element_ty), mask=c_ok)
    tl.store(grad_lam_ptr + c, (-gamma * mean_g_total).to(grad_lam_ptr.dtype.element_ty),
             mask=c_ok)  # fmt: skip


def _dense(t: torch.Tensor) -> torch.Tensor:
    """``t`` if its H and W merge into one position axis (NCHW or channels_last), else a copy."""
    if t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last):
        return t
    return t.contiguous()


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    """(sample, position, channel) strides of a ``_dense`` (N, C, H, W) tensor."""
    n, c, h, w = t.stride()
    return n, w if t.shape[3] > 1 else h, c


# Plain Python, not triton.cdiv and friends, so that torch.compile traces the launches
# without calling into Triton's host helpers.
def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _blocks(channels: int) -> tuple[int, int]:
    block_c = min(64, 1 << (channels - 1).bit_length())
    return TILE // block_c, block_c


def _tiles(t: torch.Tensor) -> tuple[tuple[int, int, int], int, int]:
    """The grid of ``_agc_relu_kernel`` and ``_agc_relu_grad_kernel`` over ``t``, and blocks."""
    n, c, h, w = t.shape
    block_hw, block_c = _blocks(c)
    return (n, _cdiv(c, block_c), _cdiv(h * w, block_hw)), block_hw, block_c


def _sums(a: torch.Tensor, out: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
    """``_partial_sums_kernel`` over ``a``, then the sum over chunks: (k, N, C) float32."""
    n, c, h, w = a.shape
    block_hw, block_c = _blocks(c)
    c_blocks = _cdiv(c, block_c)
    chunks = max(1, min(_cdiv(h * w, block_hw), _cdiv(PROGRAMS, n * c_blocks)))
    rows = _cdiv(_cdiv(h * w, chunks), block_hw) * block_hw
    chunks = _cdiv(h * w, rows)
    grad = out is not None
    partial = torch.empty((2 if grad else 1, chunks, n, c), device=a.device, dtype=torch.float32)
    out = out if grad else a
    _partial_sums_kernel[(n, c_blocks, chunks)](
        a, out, bias if grad else partial, partial, n, c, h * w, rows,
        *_strides(a), *_strides(out),
        BLOCK_HW=block_hw, BLOCK_C=block_c, GRAD=grad, num_warps=8,
    )  # fmt: skip
    return partial.sum(1)


def forward(
    y: torch.Tensor, mean_scale: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``relu((y - λ·mean_HW(y))·γ + β)`` in ``y``'s dtype and layout, and ``Σ_HW y`` (N, C)."""
    y = _dense(y)
    sums = _sums(y, None, None)[0]
    out = torch.empty_like(y)
    grid, block_hw, block_c = _tiles(y)
    _agc_relu_kernel[grid](
        y, out, sums, mean_scale, weight, bias, y.shape[1], y.shape[2] * y.shape[3],
        *_strides(y), *_strides(out), BLOCK_HW=block_hw, BLOCK_C=block_c, num_warps=8,
    )  # fmt: skip
    return out, sums


def backward(
    grad_out: torch.Tensor,
    out: torch.Tensor,
    sums: torch.Tensor,
    mean_scale: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``∂L/∂y`` (in ``out``'s dtype and layout), then λ, γ and β's gradients."""
    grad_out = _dense(grad_out)
    gsums = _sums(grad_out, out, bias)  # [Σ_HW g, Σ_HW g·(out - β)] with g = ∂L/∂out·[out > 0]
    grad_y = torch.empty_like(out)
    grid, block_hw, block_c = _tiles(out)
    _agc_relu_grad_kernel[grid](
        grad_out, out, grad_y, gsums, mean_scale, weight, out.shape[1],
        out.shape[2] * out.shape[3], *_strides(grad_out), *_strides(out), *_strides(grad_y),
        BLOCK_HW=block_hw, BLOCK_C=block_c, num_warps=8,
    )  # fmt: skip
    n, c = sums.shape
    grads = [torch.empty_like(p) for p in (mean_scale, weight, bias)]
    block_c = min(256, 1 << (c - 1).bit_length())
    _param_grads_kernel[(_cdiv(c, block_c),)](
        sums, gsums, weight, *grads, out, n, c, out.shape[2] * out.shape[3], BLOCK_C=block_c,
    )  # fmt: skip
    return grad_y, grads[0], grads[1], grads[2]
