"""AGC's mean and its gradient taken through the convolution before it: what the fused AGC's
extra passes cost, and the identities a design without them would rest on, on a CPU.

The fused AGC (``deepcontrol.nn.triton_agc``) passes over activation-sized memory three times
more per layer than the ReLU of the no-norm floor: forward it reads ``y`` once for its
per-(sample, channel) sums before the pass that writes ``out``; backward it reads ``∂L/∂out``
and ``out`` once for their sums before the pass that writes ``∂L/∂y``. Besides the two
elementwise kernels that take the ReLU's place, it launches three more per layer: the two
sums and a fill of their counters. Part 1 counts those
bytes for SegNet at 256×512 and sets them beside what run 6 (``../benchmark.json``) leaves
AGC to spend at the rows it missed. Part 2 checks, in float64 and float32, the identities
that would let both sums come from small statistics instead, since every AGC in SegNet
follows a 3×3 convolution with padding 1 (``y = conv(x, W) + b``):

1. forward: ``mean_HW(y)[n, c] = b[c] + Σ_{c', i, j} W[c, c', i, j]·S[n, c', i, j] / HW``,
   where ``S[n, c', i, j]`` sums ``x[n, c']`` over the positions tap (i, j) reads: its total
   less the row and column the padding cuts off, plus their corner. So nine numbers per
   (sample, channel) of ``x`` (its total, first and last rows and columns, four corners),
   which the pass that writes ``x`` could add up as it writes it, give ``y``'s mean
   without reading ``y``;
2. backward: AGC's ``∂L/∂y = γ·g - k`` with ``k = γλ·mean_HW(g)`` constant over each map.
   The convolution's gradients of that constant are small: for ``W``,
   ``Σ_n k[n, c]·S[n, c', i, j]``, the same statistics; for ``x``, an image constant on each
   of the nine regions (inside, four edges, four corners) that the taps reaching a position
   split it into. So the convolution could take ``γ·g``, written in the one pass that also
   adds up ``Σ g``, and the next pass over ``∂L/∂x`` (the earlier layer's own) could
   subtract that image as it reads it.

Part 3 prices that in bf16: the reference takes the mean of ``y`` rounded to bf16, the
identity the exact mean rounded once, so some means differ in their last bit, some outputs
with them, and a few ReLUs flip; it counts how many, per layer of SegNet at initialisation.

What is checked here are the identities, the byte counts and the rounding, not a speed: no
such kernels exist, and whether they would meet the rows is for a GPU to measure.

python results/benchmark-h100/agc_through_conv.py
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from deepcontrol.benchmark import Config, Setting, agc_inputs, build, random_images
from deepcontrol.engine import autocast
from deepcontrol.nn.norms import ConvNormReLU

REPORT = Path(__file__).resolve().parents[1] / "benchmark.json"
H100_PEAK_BYTES_PER_S = 3.35e12  # H100 SXM5's HBM3, NVIDIA's datasheet


def tap_sums(x: torch.Tensor) -> torch.Tensor:
    """(N, C, 3, 3): ``x`` summed over the positions that tap (i, j) of a 3×3 convolution
    with padding 1 reads, from nine statistics per map: its total, first and last rows and
    columns, and four corners. Tap row i = 0 reads all but the last row, i = 2 all but the
    first (likewise the columns), so each sum is the total less a row and a column, plus the
    corner counted in both. Exact for maps of any size, 1×1 included."""
    total = x.sum((2, 3))
    rows = (x[:, :, -1].sum(-1), torch.zeros_like(total), x[:, :, 0].sum(-1))  # cut by tap i
    cols = (x[..., -1].sum(-1), torch.zeros_like(total), x[..., 0].sum(-1))  # cut by tap j
    cut = (-1, None, 0)  # the row (column) that tap row i (column j) leaves out
    sums = torch.empty(*total.shape, 3, 3, dtype=x.dtype)
    for i in range(3):
        for j in range(3):
            corner = (x[:, :, cut[i], cut[j]]
                      if i != 1 and j != 1 else torch.zeros_like(total))  # fmt: skip
            sums[..., i, j] = total - rows[i] - cols[j] + corner
    return sums


def conv_output_mean(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """(N, C_out): ``mean_HW(conv2d(x, weight, bias, padding=1))`` from ``tap_sums(x)``."""
    h, w = x.shape[2:]
    return bias + torch.einsum("nkij,ckij->nc", tap_sums(x), weight) / (h * w)


def weight_grad_of_constant(k: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The weight gradient of ``conv2d(x, W, padding=1)`` for an output gradient ``k[n, c]``
    constant over each map: ``Σ_n k[n, c]·tap_sums(x)[n, c', i, j]``."""
    return torch.einsum("nc,nkij->ckij", k, tap_sums(x))


def input_grad_of_constant(k: torch.Tensor, weight: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The input gradient of ``conv2d(x, weight, padding=1)`` for an output gradient ``k[n, c]``
    constant over each (h, w) map: at input row r, tap row i reaches output row r + 1 - i,
    which exists inside the map or not, so the image is constant on each of nine regions."""
    reaches = torch.arange(3)[:, None]  # tap row (or column) i: output r + 1 - i is inside
    rows = (torch.arange(h) + 1 - reaches >= 0) & (torch.arange(h) + 1 - reaches < h)
    cols = (torch.arange(w) + 1 - reaches >= 0) & (torch.arange(w) + 1 - reaches < w)
    per_tap = torch.einsum("nc,ckij->nkij", k, weight)
    return torch.einsum("nkij,ir,js->nkrs", per_tap, rows.to(k.dtype), cols.to(k.dtype))


def relative_error(found: torch.Tensor, expected: torch.Tensor) -> float:
    """The largest difference, relative to the largest magnitude of ``expected``."""
    difference = (found - expected).detach().abs().max()
    return float(difference / expected.detach().abs().max())


def check(dtype: torch.dtype, n: int, c_in: int, c_out: int, h: int, w: int) -> dict[str, float]:
    """Each identity's error against PyTorch's convolution and its autograd, in ``dtype``:
    the forward mean, and AGC's gradient split into the convolution's gradients of ``γ·g`` less
    the constant parts above."""
    generator = torch.Generator().manual_seed(h * 1000 + w)
    x = torch.randn(n, c_in, h, w, dtype=dtype, generator=generator).relu().requires_grad_()
    weight = (torch.randn(c_out, c_in, 3, 3, dtype=dtype, generator=generator) / 3).requires_grad_()
    bias = torch.randn(c_out, dtype=dtype, generator=generator).requires_grad_()
    lam, gamma = (torch.rand(c_out, dtype=dtype, generator=generator) + 0.5 for _ in range(2))
    y = F.conv2d(x, weight, bias, padding=1)
    mean = conv_output_mean(x.detach(), weight.detach(), bias.detach())
    errors = {"forward mean": relative_error(mean, y.mean((2, 3)))}
    # AGC's gradient of y for some g = ∂L/∂out·[out > 0], and autograd's through the conv
    g = torch.randn(y.shape, dtype=dtype, generator=generator)
    k = gamma * lam * g.mean((2, 3))
    grad_y = gamma[:, None, None] * g - k[..., None, None]
    grad_x, grad_weight, grad_bias = torch.autograd.grad(y, (x, weight, bias), grad_y)
    # the same from the convolution's gradients of γ·g alone and the constants' small parts
    scaled = gamma[:, None, None] * g
    plain = F.conv2d(x, weight, padding=1)
    plain_x, plain_weight = torch.autograd.grad(plain, (x, weight), scaled)
    split_x = plain_x - input_grad_of_constant(k, weight.detach(), h, w)
    split_weight = plain_weight - weight_grad_of_constant(k, x.detach())
    split_bias = scaled.sum((0, 2, 3)) - h * w * k.sum(0)
    errors["input gradient"] = relative_error(split_x, grad_x)
    errors["weight gradient"] = relative_error(split_weight, grad_weight)
    errors["bias gradient"] = relative_error(split_bias, grad_bias)
    return errors


def budgets() -> None:
    """Part 1: the extra passes' bytes at batches 1 and 8, bf16, against what run 6 leaves."""
    cfg = Config()
    cpu = torch.device("cpu")
    shapes = [tuple(y.shape) for y in agc_inputs(Setting("agc", 1, "bf16", "eager"), cfg, cpu)]
    report = json.loads(REPORT.read_text())
    gpu = report["environment"]["gpu"]
    steps = {(s["batch"], s["norm"], s["mode"]): s["ms_per_step"] for s in report["steps"]
             if (s["network"], s["precision"], s["error"]) == ("segnet", "bf16", "")}  # fmt: skip
    print(f"## Part 1: SegNet {cfg.height}x{cfg.width}, bf16; step times from {REPORT.name} "
          f"(code {report['environment']['code']}, {gpu})\n")  # fmt: skip
    print(f"{len(shapes)} AGC layers; their inputs' sizes at batch 1 (elements):",
          ", ".join(f"{c}x{h}x{w}" for _, c, h, w in shapes), "\n")  # fmt: skip
    print(
        "| batch | AGC's extra passes, MB | at the peak HBM3 rate, ms | largest map, MB "
        "| AGC − floor, graphed, ms | cut for the floor row, ms | cut for the best-BN row, ms |"
    )
    print("|---|---|---|---|---|---|---|")
    for batch in (1, 8):
        sizes = [batch * c * h * w * 2 for _, c, h, w in shapes]  # bf16 bytes
        extra = 3 * sum(sizes)  # y forward; ∂L/∂out and out backward
        floor, agc = steps[(batch, "none", "graphed")], steps[(batch, "agc", "graphed")]
        best_bn = min(ms for (b, norm, _), ms in steps.items() if b == batch and norm == "bn")
        print(f"| {batch} | {extra / 1e6:.0f} | {extra / H100_PEAK_BYTES_PER_S * 1e3:.3f} "
              f"| {max(sizes) / 1e6:.1f} | {agc - floor:.3f} | {agc - 1.1 * floor:.3f} "
              f"| {agc - best_bn / 1.1:.3f} |")  # fmt: skip
    print("\nA cut is what AGC's graphed step must lose for the row to be met: down to 1.1 × the"
          " floor's, or to the best BN step / 1.1. The L2 (50 MiB) may serve part of a pass's"
          " reads; the peak-rate time assumes it serves none.\n")  # fmt: skip


def identities() -> None:
    """Part 2: each identity's largest relative error, over map sizes that include 1×1, a
    single row or column and odd sizes."""
    print("## Part 2: the identities, largest error relative to the largest magnitude\n")
    print("| dtype | map | forward mean | input gradient | weight gradient | bias gradient |")
    print("|---|---|---|---|---|---|")
    for dtype in (torch.float64, torch.float32):
        for h, w in ((1, 1), (1, 6), (5, 1), (2, 2), (7, 5), (32, 64)):
            errors = check(dtype, 2, 8, 16, h, w)
            print(f"| {str(dtype).removeprefix('torch.')} | {h}x{w} | "
                  + " | ".join(f"{e:.1e}" for e in errors.values()) + " |")  # fmt: skip


def bf16_agreement(cfg: Config, batch: int = 1) -> list[tuple[int, float, float, float, float]]:
    """Per AGC layer of SegNet at initialisation (λ = γ = 1, β = 0) on ``make bench``'s random
    images under bf16 autocast: how often the mean taken through the convolution, rounded
    once to bf16, differs from the reference's (the mean of the rounded ``y``), by how much
    at most (over the map's standard deviation), and how often the outputs ``relu(y - m)``
    then differ and their ReLU flips. As (channels, share of means, largest difference,
    share of outputs, share of ReLUs)."""
    device = torch.device("cpu")
    torch.manual_seed(0)  # the network's initialisation and the images, as the bench seeds
    model = build("agc", device, "segnet")
    seen = []
    for conv in (layer[0] for layer in model.modules() if isinstance(layer, ConvNormReLU)):
        conv.register_forward_hook(lambda m, args, y: seen.append((m, args[0], y)))
    with torch.no_grad(), autocast(device, "bf16"):
        model(random_images(Setting("agc", batch, "bf16", "eager"), cfg, device))
    rows = []
    for conv, x, y in seen:
        weight = conv.weight.detach().to(torch.bfloat16).double()
        reference = y.mean((2, 3))  # as AutoGainControl2d takes it: bf16, summed in float32
        through = conv_output_mean(x.to(torch.bfloat16).double(), weight, torch.zeros(1))
        through = through.to(torch.bfloat16)
        outputs = [(y.float() - m.float()[..., None, None]).to(torch.bfloat16).relu()
                   for m in (reference, through)]  # fmt: skip
        flips = (outputs[0] > 0) != (outputs[1] > 0)
        spread = y.double().std((2, 3)).clamp(min=1e-30)
        apart = ((reference.double() - through.double()).abs() / spread).max()
        rows.append((y.shape[1], float((reference != through).double().mean()), float(apart),
                     float((outputs[0] != outputs[1]).double().mean()),
                     float(flips.double().mean())))  # fmt: skip
    return rows


def agreement() -> None:
    """Part 3: in bf16, how far the mean through the convolution leaves the reference."""
    print("\n## Part 3: bf16, SegNet at initialisation, batch 1, the bench's random images\n")
    print("| layer | channels | means that differ | by at most, of the map's std "
          "| outputs that differ | ReLUs that flip |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for index, (channels, means, apart, outputs, flips) in enumerate(bf16_agreement(Config())):
        print(f"| {index} | {channels} | {means:.2%} | {apart:.1e} | {outputs:.3%} "
              f"| {flips:.4%} |")  # fmt: skip


def main() -> None:
    print(f"torch {torch.__version__}\n")
    budgets()
    identities()
    agreement()


if __name__ == "__main__":
    main()
