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

Its forward and backward run as Triton kernels (``deepcontrol.nn.triton_agc``). A version
over PyTorch ops lost to them on an H200 in eager mode (2.5× slower at batch 8) and under
torch.compile with CUDA graphs (8% slower), so it was removed (``results/benchmark-h200/``).
"""

from __future__ import annotations

import torch

try:
    from deepcontrol.nn import triton_agc
except ImportError:  # no Triton on this platform: AutoGainControl2d runs the reference
    triton_agc = None


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
    ) -> torch.Tensor:
        out, sums, counts = triton_agc.forward(y, mean_scale, weight, bias)
        ctx.save_for_backward(out, sums, counts, mean_scale, weight, bias)
        return out

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad_out: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        out, sums, counts, mean_scale, weight, bias = ctx.saved_tensors
        return triton_agc.backward(grad_out, out, sums, counts, mean_scale, weight, bias)


def agc_relu(
    y: torch.Tensor, mean_scale: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    """The fused ``relu(AGC(y))``; the same values as the reference, less memory in training."""
    if triton_agc is None:
        raise RuntimeError("the fused AGC needs Triton, which is not installed here")
    return AGCReLUFunction.apply(y, mean_scale, weight, bias)
