"""AGC and the ReLU after it as one autograd function that saves no activation of its own.

Forward: ``out = relu((y - λ·m)·γ + β)`` with ``m = mean_HW(y)``, one reduction and one
elementwise pass. The backward needs only ``out``, which the next convolution keeps anyway as
its input, and the per-(sample, channel) means ``m``. With ``g = ∂L/∂out · [out > 0]``:

- ``∂L/∂β = Σ g``
- ``∂L/∂γ = Σ g·(y - λm) = Σ g·(out - β)/γ``, because ``out = (y - λm)γ + β`` wherever ``g ≠ 0``
- ``∂L/∂λ = -γ Σ_n m·Σ_HW g``
- ``∂L/∂y = γ·(g - λ·mean_HW(g))``

This is what In-Place Activated BatchNorm (Rota Bulò et al., 2018) does for BN. The eager
reference, ``relu(AutoGainControl2d(y))``, keeps ``y - λm`` for γ's gradient: one more
activation-sized tensor per layer. Recovering ``y - λm`` divides by γ, so a channel whose γ
is exactly 0 gets no γ gradient here; γ starts at 1.
"""

from __future__ import annotations

import torch


class AGCReLUFunction(torch.autograd.Function):
    """``relu((y - λ·mean_HW(y))·γ + β)`` for (N, C, H, W) ``y`` and (C,) λ, γ, β."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        y: torch.Tensor,
        mean_scale: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor,
    ) -> torch.Tensor:
        shape = (1, -1, 1, 1)
        lam, gamma, beta = (p.to(y.dtype).view(shape) for p in (mean_scale, weight, bias))
        mean = y.mean(dim=(2, 3), keepdim=True)
        out = torch.relu((y - lam * mean) * gamma + beta)
        ctx.save_for_backward(out, mean, mean_scale, weight, bias)
        return out

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad_out: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        out, mean, mean_scale, weight, bias = ctx.saved_tensors
        shape = (1, -1, 1, 1)
        # Reductions in float32: bf16 sums over 128×256 positions would lose the gradient.
        g32 = grad_out.masked_fill(out <= 0, 0).float()
        g_sum = g32.sum(dim=(2, 3), keepdim=True)  # (N, C, 1, 1)
        gamma32 = weight.float().view(shape)
        centred = (out.float() - bias.float().view(shape)) / gamma32  # y - λm where g ≠ 0
        grad_bias = g_sum.sum(dim=(0, 2, 3))
        grad_weight = (g32 * centred).sum(dim=(0, 2, 3))
        grad_mean_scale = -(gamma32 * mean.float() * g_sum).sum(dim=(0, 2, 3))
        positions = out.shape[2] * out.shape[3]
        lam32 = mean_scale.float().view(shape)
        grad_y = gamma32 * (g32 - lam32 * g_sum / positions)
        return (
            grad_y.to(out.dtype),
            grad_mean_scale.to(mean_scale.dtype),
            grad_weight.to(weight.dtype),
            grad_bias.to(bias.dtype),
        )


def agc_relu(
    y: torch.Tensor, mean_scale: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    """The fused ``relu(AGC(y))``; the same values as the reference, less memory in training."""
    return AGCReLUFunction.apply(y, mean_scale, weight, bias)
