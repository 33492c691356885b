"""Parameters, forward multiply-accumulates and path depths of the networks.

python scripts/model_summary.py [--height 256 --width 512]
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from deepcontrol.data.registry import get_format
from deepcontrol.models import ClassNet, SegNet


def conv_macs(model: nn.Module, height: int, width: int) -> int:
    """Multiply-accumulates of every conv in one forward pass of a 1×3×H×W input."""
    total = 0

    def count(module: nn.Conv2d, inputs: tuple, output: torch.Tensor) -> None:
        nonlocal total
        kh, kw = module.kernel_size
        total += output.numel() * (module.in_channels // module.groups) * kh * kw

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, height, width))
    for hook in hooks:
        hook.remove()
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--width", type=int, default=512)
    args = parser.parse_args()
    if min(args.height, args.width) < SegNet.min_input_size:
        parser.error(f"--height and --width must be at least {SegNet.min_input_size} (SegNet)")
    print(f"| network | norm | parameters | GMACs at {args.height}x{args.width} | convs |")
    print("|---|---|---|---|---|")
    for name, cls in (("SegNet", SegNet), ("ClassNet", ClassNet)):
        for norm in ("bn", "agc"):
            model = cls(num_classes=get_format("cityscapes").num_classes, norm=norm)
            params = sum(p.numel() for p in model.parameters())
            convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
            macs = conv_macs(model, args.height, args.width) / 1e9
            print(f"| {name} | {norm} | {params:,} | {macs:.1f} | {convs} |")
    print(f"ClassNet path depths (shortest, longest): {ClassNet().path_depths()}")


if __name__ == "__main__":
    main()
