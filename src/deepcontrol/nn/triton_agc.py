"""Triton kernels for the fused AGC+ReLU (``deepcontrol.nn.fused_agc``).

Four passes over activation-sized memory per layer and step, the fewest the fused function
allows: forward, one read of ``y`` for the sums and one read of ``y`` and write of ``out``;
backward, one read of ``∂L/∂out`` and ``out`` for the sums and one more of both to write
``∂L/∂y``. Each pass is one kernel, and the per-(sample, channel) arithmetic happens inside
them: a reduction's chunks add up in the program that finishes last (a counter per sample
and channel block says which), and in the backward the last sample to finish computes λ, γ
and β's gradients. So a layer launches two kernels forward and two backward, plus one fill
of its counters; in eager mode at batch 1 launches, not memory, bound the step. The last
program adds the chunks in a fixed order, so results do not depend on which one it is.
Sums and the backward are float32 whatever the activations' dtype; the forward rounds as
PyTorch's eq. (1) does, so that both zero the same outputs.

Each kernel sees its tensors as (N, H·W, C) through one set of strides, so NCHW and
channels_last activations run without a copy, and a gradient in another layout than the
activation's is copied into it. Off CUDA the kernels run only under Triton's interpreter
(``TRITON_INTERPRET=1`` set before Triton is first imported), which is how the CPU tests
check them against the reference.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# The elementwise kernels' launch: one program's (positions × channels) tile, in elements,
# and its warps (scripts/tune_agc_kernels.py times others on a GPU)
TILE = 4096
ELEMENTWISE_WARPS = 8
# The reduction's launch (scripts/tune_agc_kernels.py times others on a GPU): its tile, the
# programs to aim for (several per streaming multiprocessor), the most chunks per (sample,
# channel block), which its last program adds up, and its warps
SUMS_TILE = 4096
PROGRAMS = 512
MAX_CHUNKS = 256
SUMS_WARPS = 4
FINISH = 64  # chunks the last program adds per load
BLOCK_N = 16  # samples the backward's last program adds per load
# Whether the kernels run under Triton's interpreter: read, as Triton reads it, at import
INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")


@triton.jit
def _rounded(x, dtype: tl.constexpr):
    """``x`` rounded to ``dtype`` (to nearest, ties to even) and kept in float32. Triton's
    interpreter, which the CPU tests use, truncates to bf16, so there it is written out; on a
    GPU the conversion instruction takes a quarter of the instructions, which keeps the
    forward's elementwise pass bound by memory rather than by instruction issue."""
    if INTERPRETED and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    else:
        return x.to(dtype).to(tl.float32)  # Triton rounds to nearest even


@triton.jit
def _rounded_unfused(x, dtype: tl.constexpr):
    """``x`` rounded as :func:`_rounded` does, and hidden from the compiler's arithmetic
    rewrites, so that no later operation is fused with the one that made ``x``. Seeing
    operands that were rounded to bf16, LLVM computes in bf16 and fuses a multiply with the
    subtraction after it: for sm_90 it made ``y - round(λ·m)`` one ``fma(-m, λ, y)``, which
    drops the rounding of λ·m. On an H100, 6% of bf16 outputs then differed from the
    reference's by a unit in the last place, and the ReLU of some outputs near 0 flipped
    (results/benchmark-h100/README.md); fp16 compiled the same way. Clearing the low bits
    that the dtype lacks (16 for bf16, 13 for fp16) changes no value of it, but LLVM cannot
    prove that, so it keeps the rounding."""
    x = _rounded(x, dtype)
    if dtype == tl.bfloat16:
        x = (x.to(tl.uint32, bitcast=True) & 0xFFFF0000).to(tl.float32, bitcast=True)
    elif dtype == tl.float16:
        x = (x.to(tl.uint32, bitcast=True) & 0xFFFFE000).to(tl.float32, bitcast=True)
    return x


@triton.jit
def _param(ptr, c, c_ok, dtype: tl.constexpr):
    """The per-channel parameter at ``ptr`` (λ, γ or β) for channels ``c``, rounded to the
    activations' ``dtype`` as eq. (1) uses it under autocast, in float32."""
    return _rounded(tl.load(ptr + c, mask=c_ok, other=0.0).to(tl.float32), dtype)


@triton.jit
def _tile(C, HW, s_n, s_hw, s_c, BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's sample ``n``, channels ``c`` (and mask) in the elementwise kernels'
    (N, C blocks, HW blocks) grid, and its tile's element offsets and mask. The HW blocks run
    last to first: the reduction before read the last positions last, so they may still be
    in L2."""
    n = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    block = tl.num_programs(2) - 1 - tl.program_id(2)
    hw = (block * BLOCK_HW + tl.arange(0, BLOCK_HW)).to(tl.int64)
    c_ok = c < C
    at = n * s_n + hw[:, None] * s_hw + c[None, :] * s_c
    return n, c, c_ok, at, (hw < HW)[:, None] & c_ok[None, :]


@triton.jit
def _last_to_arrive(counts_ptr, index, expected):
    """Whether this program is the last of ``expected`` to reach counter ``index``; the last
    resets it to 0 for the next kernel. What every program stored before is then visible to
    the last one (the barrier, then the atomic's release and acquire)."""
    tl.debug_barrier()
    arrived = tl.atomic_add(counts_ptr + index, 1, sem="acq_rel")
    last = arrived == expected - 1
    if last:
        tl.store(counts_ptr + index, 0)
    return last


@triton.jit
def _sum_rows(ptr, rows, stride, n, c, c_ok, C, BLOCK_ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    """``Σ_r ptr[r·stride + n·C + c]`` over ``rows`` rows, in a fixed order (so the same
    result whichever program computes it), float32. Loads bypass L1, which may hold what
    another program overwrote since."""
    total = tl.zeros((BLOCK_ROWS, BLOCK_C), dtype=tl.float32)
    for first in range(0, rows, BLOCK_ROWS):
        r = first + tl.arange(0, BLOCK_ROWS)
        ok = (r < rows)[:, None] & c_ok[None, :]
        total += tl.load(ptr + r[:, None] * stride + n * C + c[None, :], mask=ok, other=0.0,
                         cache_modifier=".cg")  # fmt: skip
    return tl.sum(total, axis=0)


@triton.jit
def _param_grads(
    sums_ptr, y_sums_ptr, gamma_ptr, grad_lam_ptr, grad_gamma_ptr, grad_beta_ptr,
    N, C, HW, c, c_ok, dtype: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """λ, γ and β's gradients for channels ``c`` from the per-(sample, channel) sums ``Σ g``,
    ``Σ g·(out - β)`` (``sums``) and ``Σ y`` (``y_sums``): ``Σ g``, ``Σ g·(out - β)/γ`` (0
    where γ is exactly 0, which leaves ``y - λm`` unrecoverable) and ``-γ Σ_n m·Σ g``."""
    gamma = _param(gamma_ptr, c, c_ok, dtype)
    g_total = tl.zeros((BLOCK_C,), dtype=tl.float32)
    dot_total = tl.zeros((BLOCK_C,), dtype=tl.float32)
    mean_g_total = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for first in range(0, N, BLOCK_N):
        n = first + tl.arange(0, BLOCK_N)
        ok = (n < N)[:, None] & c_ok[None, :]
        at = n[:, None] * C + c[None, :]
        g_sum = tl.load(sums_ptr + at, mask=ok, other=0.0, cache_modifier=".cg")
        dot = tl.load(sums_ptr + N * C + at, mask=ok, other=0.0, cache_modifier=".cg")
        mean = _rounded(tl.load(y_sums_ptr + at, mask=ok, other=0.0) / HW, dtype)
        g_total += tl.sum(g_sum, axis=0)
        dot_total += tl.sum(dot, axis=0)
        mean_g_total += tl.sum(mean * g_sum, axis=0)
    tl.store(grad_beta_ptr + c, g_total.to(grad_beta_ptr.dtype.element_ty), mask=c_ok)
    grad_gamma = tl.where(gamma == 0, 0.0, dot_total / tl.where(gamma == 0, 1.0, gamma))
    tl.store(grad_gamma_ptr + c, grad_gamma.to(grad_gamma_ptr.dtype.element_ty), mask=c_ok)
    tl.store(grad_lam_ptr + c, (-gamma * mean_g_total).to(grad_lam_ptr.dtype.element_ty),
             mask=c_ok)  # fmt: skip


@triton.jit
def _sums_kernel(
    a_ptr, out_ptr, bias_ptr, partial_ptr, sums_ptr, counts_ptr,
    y_sums_ptr, gamma_ptr, grad_lam_ptr, grad_gamma_ptr, grad_beta_ptr,
    N, C, HW, rows, s_n, s_hw, s_c,
    BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr, FINISH: tl.constexpr,
    GRAD: tl.constexpr,
):  # fmt: skip
    """Per-(sample, channel) sums over H·W into ``sums[k, n, c]``. Forward (``GRAD=False``):
    ``Σ a`` with ``a = y``. Backward: ``Σ g`` (k = 0) and ``Σ g·(out - β)`` (k = 1) with
    ``g = a·[out > 0]``, ``a = ∂L/∂out``, and then λ, γ and β's gradients.

    Each program sums one chunk of ``rows`` positions into ``partial[k, chunk, n, c]``; the
    last chunk of a (sample, channel block) to finish adds the chunks up, and in the backward
    the last sample of a channel block to finish computes that block's parameter gradients."""
    n = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1)
    c = block * BLOCK_C + tl.arange(0, BLOCK_C)
    chunk = tl.program_id(2)
    chunks = tl.num_programs(2)
    c_ok = c < C
    total = tl.zeros((BLOCK_HW, BLOCK_C), dtype=tl.float32)
    dot = tl.zeros((BLOCK_HW, BLOCK_C), dtype=tl.float32)
    dtype = out_ptr.dtype.element_ty
    if GRAD:
        beta = _param(bias_ptr, c, c_ok, dtype)[None, :]
    first = chunk * rows
    for start in range(0, rows, BLOCK_HW):
        hw = (first + start + tl.arange(0, BLOCK_HW)).to(tl.int64)
        ok = (hw < HW)[:, None] & c_ok[None, :]
        at = n * s_n + hw[:, None] * s_hw + c[None, :] * s_c
        a = tl.load(a_ptr + at, mask=ok, other=0.0).to(tl.float32)
        if GRAD:
            o = tl.load(out_ptr + at, mask=ok, other=0.0).to(tl.float32)
            a = tl.where(o <= 0, 0.0, a)
            dot += a * (o - beta)
        total += a
    slot = (chunk * N + n) * C + c  # in partial[k, chunk, n, c]
    tl.store(partial_ptr + slot, tl.sum(total, axis=0), mask=c_ok)
    if GRAD:
        tl.store(partial_ptr + chunks * N * C + slot, tl.sum(dot, axis=0), mask=c_ok)
    if _last_to_arrive(counts_ptr, n * tl.num_programs(1) + block, chunks):
        all_total = _sum_rows(partial_ptr, chunks, N * C, n, c, c_ok, C, FINISH, BLOCK_C)
        tl.store(sums_ptr + n * C + c, all_total, mask=c_ok)
        if GRAD:
            all_dot = _sum_rows(partial_ptr + chunks * N * C, chunks, N * C, n, c, c_ok, C,
                                FINISH, BLOCK_C)  # fmt: skip
            tl.store(sums_ptr + N * C + n * C + c, all_dot, mask=c_ok)
            if _last_to_arrive(counts_ptr, N * tl.num_programs(1) + block, N):
                _param_grads(sums_ptr, y_sums_ptr, gamma_ptr, grad_lam_ptr, grad_gamma_ptr,
                             grad_beta_ptr, N, C, HW, c, c_ok, dtype, BLOCK_N, BLOCK_C)  # fmt: skip


@triton.jit
def _agc_relu_kernel(
    y_ptr, out_ptr, sums_ptr, lam_ptr, gamma_ptr, beta_ptr,
    C, HW, s_n, s_hw, s_c,
    BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """One tile of eq. (1) and the ReLU, ``relu((y - λ·mean)·γ + β)``, rounded to ``out``'s
    dtype after each operation as PyTorch computes the reference."""
    n, c, c_ok, at, ok = _tile(C, HW, s_n, s_hw, s_c, BLOCK_HW, BLOCK_C)
    dtype = out_ptr.dtype.element_ty
    mean = _rounded(tl.load(sums_ptr + n * C + c, mask=c_ok, other=0.0) / HW, dtype)
    lam = _param(lam_ptr, c, c_ok, dtype)
    gamma = _param(gamma_ptr, c, c_ok, dtype)
    beta = _param(beta_ptr, c, c_ok, dtype)
    # λ·m rounded to the activations' dtype and hidden from the compiler, which cannot fuse
    # it back; y - λ·m then compiles to one subtraction in that dtype (rounded as the float32
    # one would be), and the bf16 forward to about 18 instructions per element
    # (tests/test_triton_codegen.py)
    sub = _rounded_unfused(lam * mean, dtype).to(dtype).to(tl.float32)[None, :]
    y = tl.load(y_ptr + at, mask=ok, other=0.0)
    res = _rounded(_rounded(y.to(tl.float32) - sub, dtype) * gamma[None, :], dtype) + beta[None, :]
    res = _rounded(tl.where(res < 0, 0.0, res), dtype)  # NaN stays NaN, as in torch.relu
    tl.store(out_ptr + at, res.to(dtype), mask=ok)


@triton.jit
def _agc_relu_grad_kernel(
    g_ptr, out_ptr, grad_ptr, gsums_ptr, lam_ptr, gamma_ptr,
    C, HW, s_n, s_hw, s_c,
    BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """One tile of ``∂L/∂y = γ·g - γλ·mean_HW(g)`` with ``g = ∂L/∂out·[out > 0]``; ``gsums``
    holds ``Σ_HW g`` per (sample, channel)."""
    n, c, c_ok, at, ok = _tile(C, HW, s_n, s_hw, s_c, BLOCK_HW, BLOCK_C)
    dtype = grad_ptr.dtype.element_ty
    lam = _param(lam_ptr, c, c_ok, dtype)
    gamma = _param(gamma_ptr, c, c_ok, dtype)
    g_sum = tl.load(gsums_ptr + n * C + c, mask=c_ok, other=0.0)
    shift = (-gamma * lam * g_sum / HW)[None, :]
    g = tl.load(g_ptr + at, mask=ok, other=0.0)
    o = tl.load(out_ptr + at, mask=ok, other=0.0)
    res = tl.where(o <= 0, 0.0, g.to(tl.float32) * gamma[None, :]) + shift
    res = _rounded(res, dtype).to(dtype)
    tl.store(grad_ptr + at, res, mask=ok)


def _dense(t: torch.Tensor) -> torch.Tensor:
    """``t`` if its H and W merge into one position axis (NCHW or channels_last), else a copy."""
    if t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last):
        return t
    return t.contiguous()


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    """(sample, position, channel) strides of a ``_dense`` (N, C, H, W) tensor."""
    n, c, h, w = t.stride()
    return n, w if t.shape[3] > 1 else h, c


def _layout(t: torch.Tensor) -> torch.memory_format:
    """The memory format of a ``_dense`` tensor."""
    return torch.contiguous_format if t.is_contiguous() else torch.channels_last


# Plain Python, not triton.cdiv and friends, so that torch.compile traces the launches
# without calling into Triton's host helpers.
def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _blocks(channels: int, tile: int | None = None) -> tuple[int, int, int]:
    """A tile's positions and channels (an elementwise ``TILE`` unless ``tile`` is given), and
    how many channel blocks cover ``channels``."""
    block_c = min(64, 1 << (channels - 1).bit_length())
    return (TILE if tile is None else tile) // block_c, block_c, _cdiv(channels, block_c)


def _tiles(t: torch.Tensor) -> tuple[tuple[int, int, int], int, int]:
    """The grid of ``_agc_relu_kernel`` and ``_agc_relu_grad_kernel`` over ``t``, and blocks."""
    n, c, h, w = t.shape
    block_hw, block_c, c_blocks = _blocks(c)
    return (n, c_blocks, _cdiv(h * w, block_hw)), block_hw, block_c


def _counters(y: torch.Tensor) -> torch.Tensor:
    """Zeroed counters for ``_sums_kernel`` over ``y``, forward and backward: one per (sample,
    channel block), then one per channel block. Each kernel leaves them zeroed again."""
    n, c = y.shape[:2]
    c_blocks = _blocks(c)[2]
    return torch.zeros(n * c_blocks + c_blocks, device=y.device, dtype=torch.int32)


def _chunks(n: int, c_blocks: int, block_hw: int, hw: int) -> tuple[int, int]:
    """How ``_sums_kernel`` splits each (sample, channel block) of an (n, C, H·W = hw) tensor
    whose C makes ``c_blocks`` blocks and its tiles ``block_hw`` positions (``_blocks``): the
    chunks, each one program, and the positions per chunk (whole tiles)."""
    chunks = min(_cdiv(hw, block_hw), _cdiv(PROGRAMS, n * c_blocks), MAX_CHUNKS)
    rows = _cdiv(_cdiv(hw, chunks), block_hw) * block_hw
    return _cdiv(hw, rows), rows


def _sums(
    a: torch.Tensor,
    strides: tuple[int, int, int],
    counts: torch.Tensor,
    out: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    y_sums: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    param_grads: tuple[torch.Tensor, ...] = (),
) -> torch.Tensor:
    """``_sums_kernel`` over ``a`` (and ``out``), both read with ``strides``: (1, N, C)
    float32 sums forward; backward (with ``out`` and the rest), (2, N, C), and λ, γ and β's
    gradients written into ``param_grads``."""
    n, c, h, w = a.shape
    block_hw, block_c, c_blocks = _blocks(c, SUMS_TILE)
    chunks, rows = _chunks(n, c_blocks, block_hw, h * w)
    grad = out is not None
    partial = torch.empty((2 if grad else 1, chunks, n, c), device=a.device, dtype=torch.float32)
    sums = torch.empty((2 if grad else 1, n, c), device=a.device, dtype=torch.float32)
    unused = partial  # a pointer for the arguments only the backward reads
    _sums_kernel[(n, c_blocks, chunks)](
        a, out if grad else a, bias if grad else unused, partial, sums, counts,
        *((y_sums, weight, *param_grads) if grad else (unused,) * 5),
        n, c, h * w, rows, *strides,
        BLOCK_HW=block_hw, BLOCK_C=block_c, BLOCK_N=BLOCK_N, FINISH=FINISH, GRAD=grad,
        num_warps=SUMS_WARPS,
    )  # fmt: skip
    return sums


def forward(
    y: torch.Tensor, mean_scale: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``relu((y - λ·mean_HW(y))·γ + β)`` in ``y``'s dtype and layout, ``Σ_HW y`` (N, C),
    and the zeroed counters, which the backward reuses."""
    y = _dense(y)
    strides = _strides(y)
    counts = _counters(y)
    sums = _sums(y, strides, counts)[0]
    out = torch.empty_like(y)  # y's strides, as y is dense
    grid, block_hw, block_c = _tiles(y)
    _agc_relu_kernel[grid](
        y, out, sums, mean_scale, weight, bias, y.shape[1], y.shape[2] * y.shape[3],
        *strides, BLOCK_HW=block_hw, BLOCK_C=block_c, num_warps=ELEMENTWISE_WARPS,
    )  # fmt: skip
    return out, sums, counts


def backward(
    grad_out: torch.Tensor,
    out: torch.Tensor,
    sums: torch.Tensor,
    counts: torch.Tensor,
    mean_scale: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``∂L/∂y`` (in ``out``'s dtype and layout), then λ, γ and β's gradients; ``counts``
    are zeroed counters (the forward's)."""
    # ∂L/∂out in out's layout, read with out's strides. Under torch.compile this gradient's
    # strides are unknown while dynamo traces the backward, and asking for them makes it
    # copy every gradient to NCHW first; this way only one in another layout (after a
    # max-unpooling) is copied.
    grad_out = grad_out.contiguous(memory_format=_layout(out))
    strides = _strides(out)
    grads = tuple(torch.empty_like(p) for p in (mean_scale, weight, bias))
    # [Σ_HW g, Σ_HW g·(out - β)] with g = ∂L/∂out·[out > 0], and the parameters' gradients
    gsums = _sums(grad_out, strides, counts, out, bias, sums, weight, grads)
    grad_y = torch.empty_like(out)  # out's strides, as out is dense
    grid, block_hw, block_c = _tiles(out)
    _agc_relu_grad_kernel[grid](
        grad_out, out, grad_y, gsums, mean_scale, weight, out.shape[1],
        out.shape[2] * out.shape[3], *strides, BLOCK_HW=block_hw, BLOCK_C=block_c,
        num_warps=ELEMENTWISE_WARPS,
    )  # fmt: skip
    return grad_y, *grads
