"""AGC and the ReLU after it as one autograd function that saves no activation of its own.

Forward: ``out = relu((y - λ·m)·γ + β)`` with ``m = mean_HW(y)``, one reduction and one
elementwise pass. The backward needs only ``out``, which the next
convolution keeps anyway as its input, and the per-(sample, channel) means ``m``. With
``g = ∂L/∂out · [out > 0]``:

- ``∂L/∂β = Σ g``
- ``∂L/∂γ = Σ g·(y - λm) = Σ g·(out - β)/γ``, because ``out = (y - λm)γ + β`` wherever ``g ≠ 0``
- ``∂L/∂λ = -γ Σ_n m·Σ_HW g``
- ``∂L/∂y = γ·g - γλ·mean_HW(g)``

This is what In-Place Activated BatchNorm (Rota Bulò et al., 2018) does for BN. The eager
reference, ``relu(AutoGainControl2d(y))``, keeps ``y - λm`` for γ's gradient: one more
activation-sized tensor per layer. Recovering ``y - λm`` divides by γ, so a channel whose γ
is exactly 0 gets no γ gradient here; γ starts at 1.

The function works on four passes, each a per-(sample, channel) reduction or affine map, and
two implementations of them exist: ``kernels="torch"`` (PyTorch ops, which ``torch.compile``
fuses) and ``kernels="triton"`` (``deepcontrol.nn.triton_agc``, two kernels in eager mode too).
``make bench`` times both on the GPU (issue 4 asks for whichever measures faster).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

try:
    from deepcontrol.nn import triton_agc
except ImportError:  # no Triton on this platform: the PyTorch passes serve
    triton_agc = None


def _per_sample(t: torch.Tensor) -> torch.Tensor:
    return t[:, :, None, None]


def _torch_grad_sums(
    grad_out: torch.Tensor, out: torch.Tensor, bias: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    # Float32 products and sums: bf16 sums over 128×256 positions would lose the gradient.
    g = grad_out.masked_fill(out <= 0, 0).float()
    centred = out.float() - bias.float().view(1, -1, 1, 1)
    return g.sum(dim=(2, 3)), (g * centred).sum(dim=(2, 3))


TORCH_KERNELS = SimpleNamespace(
    channel_means=lambda y: y.mean(dim=(2, 3), dtype=torch.float32),
    affine_relu=lambda y, sub, scale, shift: torch.relu(
        (y - _per_sample(sub).to(y.dtype)) * _per_sample(scale).to(y.dtype)
        + _per_sample(shift).to(y.dtype)
    ),
    grad_sums=_torch_grad_sums,
    grad_input=lambda grad_out, out, scale, shift: (
        grad_out.masked_fill(out <= 0, 0).float() * _per_sample(scale) + _per_sample(shift)
    ).to(out.dtype),
)


KERNELS = {"torch": TORCH_KERNELS, "triton": triton_agc}
# What AutoGainControl2d runs when training on CUDA. Pending issue 4's GPU measurement of both.
DEFAULT_KERNELS = "triton" if triton_agc is not None else "torch"


class AGCReLUFunction(torch.autograd.Function):
    """``relu((y - λ·mean_HW(y))·γ + β)`` for (N, C, H, W) ``y`` and (C,) λ, γ, β."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        y: torch.Tensor,
        mean_scale: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor,
        kernels: str,
    ) -> torch.Tensor:
        passes = KERNELS[kernels]
        mean = passes.channel_means(y)  # (N, C) float32
        # Eq. (1) in y's dtype, rounded after each operation as the reference is: in bf16 a
        # different rounding would flip the ReLU of outputs near 0 and with them the gradient.
        lam, gamma, beta = (p.to(y.dtype).float() for p in (mean_scale, weight, bias))
        sub = (lam * mean.to(y.dtype).float()).to(y.dtype).float()
        out = passes.affine_relu(y, sub, gamma.expand_as(mean), beta.expand_as(mean))
        ctx.kernels = kernels
        ctx.save_for_backward(out, mean, mean_scale, weight, bias)
        return out

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad_out: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, None]:
        out, mean, mean_scale, weight, bias = ctx.saved_tensors
        passes = KERNELS[ctx.kernels]
        # The derivative of the forward as computed, with the parameters rounded as it used them.
        lam, gamma, beta = (p.to(out.dtype).float() for p in (mean_scale, weight, bias))
        g_sum, g_centred = passes.grad_sums(grad_out, out, beta)  # (N, C) float32 each
        positions = out.shape[2] * out.shape[3]
        grad_y = passes.grad_input(
            grad_out, out, gamma.expand_as(g_sum), -gamma * lam * g_sum / positions
        )
        return (
            grad_y,
            (-gamma * (mean * g_sum).sum(0)).to(mean_scale.dtype),
            (g_centred.sum(0) / gamma).to(weight.dtype),
            g_sum.sum(0).to(bias.dtype),
            None,
        )


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
