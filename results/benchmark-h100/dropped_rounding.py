"""Recomputes, on the CPU, the fused bf16 AGC forward as the H100 ran it before the fix: eq. (1)
rounded to bf16 after each operation, except λ·m, which the GPU compiler fused into the
subtraction (one fma). Prints how many outputs differ from eq. (1) rounded after every
operation, and how many ReLUs flip; the H100's counts are in run2-bf16-rounding.txt.
The cases are bf16_rounding.py's. Run from the repository root."""

import sys

import torch

sys.path.insert(0, "tests")
from test_fused_agc import layer  # noqa: E402


def bf16(t: torch.Tensor) -> torch.Tensor:
    """``t`` rounded to bf16, to nearest with ties to even, in ``t``'s dtype."""
    return t.to(torch.bfloat16).to(t.dtype)


CASES = [((2, 16, 32, 64), 1, None), ((2, 64, 33, 65), 2, None), ((2, 4, 33, 65), 7, 1.0),
         ((8, 64, 128, 256), 10, None)]  # fmt: skip
for shape, seed, gain in CASES:
    generator = torch.Generator().manual_seed(seed)
    y = (torch.randn(shape, generator=generator) + 0.3).to(torch.bfloat16).double()
    agc = layer(shape[1], "reference")
    if gain is not None:
        with torch.no_grad():
            agc.weight.fill_(gain)
            agc.bias.fill_(0.6)
    lam, gamma, beta = (bf16(p.detach().double()).view(1, -1, 1, 1)
                        for p in (agc.mean_scale, agc.weight, agc.bias))  # fmt: skip
    m = bf16(y.float().mean((2, 3), keepdim=True).double())
    spec = bf16(torch.relu(bf16(bf16(bf16(y - bf16(lam * m)) * gamma) + beta)))
    # the GPU: one rounding for y - λ·m; the product with γ rounded; + β in float32
    gpu = bf16(torch.relu(bf16(bf16(y - lam * m) * gamma).float().double() + beta))
    print(shape, "differ from eq. (1) rounded per op:", int((gpu != spec).sum()),
          "ReLU flips:", int(((gpu > 0) != (spec > 0)).sum()))  # fmt: skip
