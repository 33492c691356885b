"""Triton kernels for the fused AGC+ReLU (``deepcontrol.nn.fused_agc``, ``kernels="triton"``).

Four passes over activation-sized memory per layer and step, the fewest the fused function
allows: forward, one read of ``y`` for the means and one read of ``y`` and write of ``out``;
backward, one read of ``∂L/∂out`` and ``out`` for the sums and one more of both to write
``∂L/∂y``. Sums and the backward are float32 whatever the activations' dtype; the forward
rounds as PyTorch's eq. (1) does, so that both zero the same outputs.

Each kernel sees a tensor as (N, H·W, C) through its strides, so NCHW and channels_last
activations run without a copy. Off CUDA the kernels run only under Triton's interpreter
(``TRITON_INTERPRET=1`` set before this module is imported), which is how the CPU tests
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
def _channel_sums_kernel(
    a_ptr, out_ptr, bias_ptr, sums_ptr, dots_ptr,
    N, C, HW, rows,
    a_sn, a_shw, a_sc, o_sn, o_shw, o_sc,
    BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr, GRAD: tl.constexpr,
):  # fmt: skip
    """Per-(sample, channel) partial sums over ``rows`` positions, into [chunk, n, c].

    Forward (``GRAD=False``): ``Σ a`` with ``a = y``. Backward: ``Σ g`` and ``Σ g·(out - β)``
    with ``g = a·[out > 0]`` and ``a = ∂L/∂out``."""
    n = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    chunk = tl.program_id(2)
    c_ok = c < C
    total = tl.zeros((BLOCK_HW, BLOCK_C), dtype=tl.float32)
    dot = tl.zeros((BLOCK_HW, BLOCK_C), dtype=tl.float32)
    if GRAD:
        beta = tl.load(bias_ptr + c, mask=c_ok, other=0.0)
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
            dot += a * (o - beta[None, :])
        total += a
    at = (chunk * N + n) * C + c
    tl.store(sums_ptr + at, tl.sum(total, axis=0), mask=c_ok)
    if GRAD:
        tl.store(dots_ptr + at, tl.sum(dot, axis=0), mask=c_ok)


@triton.jit
def _channel_affine_kernel(
    a_ptr, out_ptr, res_ptr, sub_ptr, scale_ptr, shift_ptr,
    C, HW,
    a_sn, a_shw, a_sc, o_sn, o_shw, o_sc, r_sn, r_shw, r_sc,
    BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr, GRAD: tl.constexpr,
):  # fmt: skip
    """One tile of the forward ``relu((a - sub)·scale + shift)``, rounded to ``res``'s dtype
    after each operation as PyTorch's eq. (1) is, so both zero the same outputs; or of the
    backward ``a·[out > 0]·scale + shift`` (``a = ∂L/∂out``), in float32 until the store.
    ``sub``, ``scale`` and ``shift`` are (N, C) float32."""
    n = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    hw = (tl.program_id(2) * BLOCK_HW + tl.arange(0, BLOCK_HW)).to(tl.int64)
    c_ok = c < C
    ok = (hw < HW)[:, None] & c_ok[None, :]
    scale = tl.load(scale_ptr + n * C + c, mask=c_ok, other=0.0)[None, :]
    shift = tl.load(shift_ptr + n * C + c, mask=c_ok, other=0.0)[None, :]
    a = tl.load(a_ptr + n * a_sn + hw[:, None] * a_shw + c[None, :] * a_sc, mask=ok, other=0.0)
    a = a.to(tl.float32)
    dtype = res_ptr.dtype.element_ty
    if GRAD:
        o = tl.load(out_ptr + n * o_sn + hw[:, None] * o_shw + c[None, :] * o_sc, mask=ok,
                    other=0.0)  # fmt: skip
        res = tl.where(o <= 0, 0.0, a * scale) + shift
    else:
        sub = tl.load(sub_ptr + n * C + c, mask=c_ok, other=0.0)[None, :]
        res = _rounded(_rounded(a - sub, dtype) * scale, dtype) + shift
        res = tl.where(res < 0, 0.0, res)  # NaN stays NaN, as in torch.relu
    res = _rounded(res, dtype).to(dtype)
    tl.store(res_ptr + n * r_sn + hw[:, None] * r_shw + c[None, :] * r_sc, res, mask=ok)


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


def _channel_sums(
    a: torch.Tensor, out: torch.Tensor | None = None, bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    a = _dense(a)
    n, c, h, w = a.shape
    block_hw, block_c = _blocks(c)
    c_blocks = _cdiv(c, block_c)
    chunks = max(1, min(_cdiv(h * w, block_hw), _cdiv(PROGRAMS, n * c_blocks)))
    rows = _cdiv(_cdiv(h * w, chunks), block_hw) * block_hw
    chunks = _cdiv(h * w, rows)
    sums = torch.empty((chunks, n, c), device=a.device, dtype=torch.float32)
    grad = out is not None
    dots = torch.empty_like(sums) if grad else sums
    out = out if grad else a
    bias = bias if grad else sums
    _channel_sums_kernel[(n, c_blocks, chunks)](
        a, out, bias, sums, dots, n, c, h * w, rows, *_strides(a), *_strides(out),
        BLOCK_HW=block_hw, BLOCK_C=block_c, GRAD=grad, num_warps=8,
    )  # fmt: skip
    return sums.sum(0), dots.sum(0) if grad else None


def _channel_affine(
    a: torch.Tensor,
    out: torch.Tensor | None,
    sub: torch.Tensor | None,
    scale: torch.Tensor,
    shift: torch.Tensor,
) -> torch.Tensor:
    a = _dense(a)
    n, c, h, w = a.shape
    block_hw, block_c = _blocks(c)
    grad = out is not None
    out = out if grad else a
    res = torch.empty_like(out)
    scale, shift = scale.contiguous(), shift.contiguous()
    grid = (n, _cdiv(c, block_c), _cdiv(h * w, block_hw))
    _channel_affine_kernel[grid](
        a, out, res, scale if grad else sub.contiguous(), scale, shift, c, h * w,
        *_strides(a), *_strides(out), *_strides(res),
        BLOCK_HW=block_hw, BLOCK_C=block_c, GRAD=grad, num_warps=8,
    )  # fmt: skip
    return res


def channel_means(y: torch.Tensor) -> torch.Tensor:
    """``mean_HW(y)`` as an (N, C) float32 tensor."""
    sums, _ = _channel_sums(y)
    return sums / (y.shape[2] * y.shape[3])


def affine_relu(
    y: torch.Tensor, sub: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor
) -> torch.Tensor:
    """``relu((y - sub)·scale + shift)`` in ``y``'s dtype; (N, C) float32 ``sub``, ``scale``
    and ``shift`` hold values of that dtype."""
    return _channel_affine(y, None, sub, scale, shift)


def grad_sums(
    grad_out: torch.Tensor, out: torch.Tensor, bias: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``Σ_HW g`` and ``Σ_HW g·(out - β)``, (N, C) float32, with ``g = ∂L/∂out·[out > 0]``."""
    return _channel_sums(grad_out, out, bias.float().contiguous())


def grad_input(
    grad_out: torch.Tensor, out: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor
) -> torch.Tensor:
    """``g·scale + shift`` with ``g = ∂L/∂out·[out > 0]``, in ``out``'s dtype and layout."""
    return _channel_affine(grad_out, out, None, scale, shift)
