"""AGC and the ReLU after it as one autograd function that saves no activation of its own.

Forward: ``out = relu((y - λ·m)·γ + β)`` with ``m = mean_HW(y)``, one reduction and one
elementwise pass. The backward needs only ``out``, which the next convolution keeps anyway as
its input, and the per-(sample, channel) sums of ``y``. With ``g = ∂L/∂out · [out > 0]``:

- ``∂L/∂β = Σ g``
- ``∂L/∂γ = Σ g·(y - λm) = Σ g·(out - β)/γ``, because ``out = (y - λm)γ + β`` wherever ``g ≠ 0``
- ``∂L/∂λ = -γ Σ_n m·Σ_HW g``
- ``∂L/∂y = γ·g - γλ·mean_HW(g)``

This is what In-Place Activated BatchNorm (Rota Bulò et al., 2018) does for BN. The eager
reference, ``relu(AutoGainControl2d(y))``, keeps ``y - λm`` for γ's gradient: one more
activation-sized tensor per layer. Recovering ``y - λm`` divides by γ, so a channel whose γ
is exactly 0 gets no γ gradient here; γ starts at 1. In bf16 ``out`` keeps y - λm only to
within β's rounding over γ, so a channel with |γ| ≪ |β| gets a poor γ gradient (against the
reference, with β = 0.6: 0.4% error at γ = 1, 2% at 0.1, 88% at 0.001; the other gradients
stay within 1%). In float32, the paper's setting, the same effect is 2^16 times smaller.

Two implementations of its forward and backward exist: ``kernels="torch"``
(PyTorch ops, which ``torch.compile`` fuses) and ``kernels="triton"``
(``deepcontrol.nn.triton_agc``, a kernel each, so that eager mode launches few). ``make bench``
times both on the GPU (issue 4 asks for whichever measures faster).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import Tensor

try:
    from deepcontrol.nn import triton_agc
except ImportError:  # no Triton on this platform: the PyTorch passes serve
    triton_agc = None


def _rounded(dtype: torch.dtype, *params: Tensor) -> list[Tensor]:
    """``params`` as eq. (1) uses them on ``dtype`` activations (rounded), in float32."""
    return [p.to(dtype).float() for p in params]


def _torch_forward(y: Tensor, mean_scale: Tensor, weight: Tensor,
                   bias: Tensor) -> tuple[Tensor, Tensor]:  # fmt: skip
    sums = y.sum(dim=(2, 3), dtype=torch.float32)
    lam, gamma, beta = (p.to(y.dtype) for p in (mean_scale, weight, bias))
    mean = (sums / (y.shape[2] * y.shape[3])).to(y.dtype)
    centred = y - (lam * mean)[:, :, None, None]  # eq. (1) in y's dtype, as the reference
    return torch.relu(centred * gamma[:, None, None] + beta[:, None, None]), sums


def _torch_backward(grad_out: Tensor, out: Tensor, sums: Tensor, mean_scale: Tensor,
                    weight: Tensor, bias: Tensor) -> tuple[Tensor, ...]:  # fmt: skip
    lam, gamma, beta = _rounded(out.dtype, mean_scale, weight, bias)
    positions = out.shape[2] * out.shape[3]
    # Float32 products and sums: bf16 sums over 128×256 positions would lose the gradient.
    g = grad_out.masked_fill(out <= 0, 0).float()
    g_sum = g.sum(dim=(2, 3))
    g_centred = (g * (out.float() - beta[:, None, None])).sum(dim=(2, 3))
    grad_y = g * gamma[:, None, None] - (gamma * lam * g_sum / positions)[:, :, None, None]
    mean = (sums / positions).to(out.dtype).float()
    # 0 where γ is exactly 0, which leaves y - λm unrecoverable from out
    grad_gamma = torch.where(
        gamma == 0, 0.0, g_centred.sum(0) / torch.where(gamma == 0, 1.0, gamma)
    )
    return (
        grad_y.to(out.dtype),
        (-gamma * (mean * g_sum).sum(0)).to(mean_scale.dtype),
        grad_gamma.to(weight.dtype),
        g_sum.sum(0).to(bias.dtype),
    )


# The fused function's forward ((out, Σ_HW y)) and backward (∂L/∂y, ∂L/∂λ, ∂L/∂γ, ∂L/∂β) as
# PyTorch ops; deepcontrol.nn.triton_agc has the same two as Triton kernels.
TORCH_KERNELS = SimpleNamespace(forward=_torch_forward, backward=_torch_backward)
KERNELS = {"torch": TORCH_KERNELS, "triton": triton_agc}
# What AutoGainControl2d(kernels="auto") runs when training on CUDA: in eager mode the Triton
# kernels, which launch few; under torch.compile the PyTorch ops, which inductor can fuse with
# the ops around them, while a Triton kernel of our own stays opaque to it. make bench times
# both in both modes (rows agc, agc-torch and agc-triton of results/benchmark.md).
DEFAULT_KERNELS = "triton" if triton_agc is not None else "torch"
COMPILED_KERNELS = "torch"


def auto_kernels(y: Tensor) -> str:
    """The implementation ``kernels="auto"`` picks for activations ``y``: fused when training
    on CUDA (``DEFAULT_KERNELS``, or ``COMPILED_KERNELS`` inside torch.compile), else the
    reference."""
    if not (y.is_cuda and torch.is_grad_enabled()):
        return "reference"
    return COMPILED_KERNELS if torch.compiler.is_compiling() else DEFAULT_KERNELS


class AGCReLUFunction(torch.autograd.Function):
    """``relu((y - λ·mean_HW(y))·γ + β)`` for (N, C, H, W) ``y`` and (C,) λ, γ, β.

    In the activations' dtype the forward rounds after each operation as the reference does:
    in bf16 a different rounding would flip the ReLU of outputs near 0, and with them the
    gradient. The backward differentiates that forward, with λ, γ, β rounded as it used them.
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        y: torch.Tensor,
        mean_scale: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor,
        kernels: str,
    ) -> torch.Tensor:
        out, sums = KERNELS[kernels].forward(y, mean_scale, weight, bias)
        ctx.kernels = kernels
        ctx.save_for_backward(out, sums, mean_scale, weight, bias)
        return out

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad_out: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, None]:
        out, sums, mean_scale, weight, bias = ctx.saved_tensors
        grads = KERNELS[ctx.kernels].backward(grad_out, out, sums, mean_scale, weight, bias)
        return *grads, None


def agc_relu(
    y: torch.Tensor,
    mean_scale: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    kernels: str = "torch",
) -> torch.Tensor:
    """The fused ``relu(AGC(y))``; the same values as the reference, less memory in training."""
    if KERNELS.get(kernels) is None:
        available = ", ".join(k for k, v in KERNELS.items() if v is not None)
        raise ValueError(f"AGC kernels must be one of {available}, got {kernels!r}")
    return AGCReLUFunction.apply(y, mean_scale, weight, bias, kernels)
