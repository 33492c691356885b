"""How big are a network's logits and gradients at initialisation, per norm and input scaling?

A network of convs without bias, AGC with β = 0, ReLU and max-(un)pooling is positively
homogeneous at init: its logits scale with its input. Each AGC removes the per-sample mean
that follows a ReLU, so the signal also shrinks layer by layer. This prints, for one batch of
the configured data, the std of the logits and the median over convs of |∇W| / |W|.

    python scripts/init_signal.py data.height=256 data.width=512     # any training overrides
    python scripts/init_signal.py model=classnet data.height=256 data.width=512
"""

from __future__ import annotations

import argparse

import torch

from deepcontrol.config import compose
from deepcontrol.data import build_data
from deepcontrol.engine import class_logits
from deepcontrol.losses import pixel_cross_entropy
from deepcontrol.models import build_model


def measure(overrides: list[str]) -> tuple[float, float]:
    cfg = compose(["device=cpu", *overrides])
    torch.manual_seed(cfg.seed)
    data = build_data(cfg.data, torch.device("cpu"), seed=cfg.seed)
    model = build_model(cfg, data.num_classes)
    images, labels, _ = next(iter(data.train))
    logits = class_logits(model(images))
    pixel_cross_entropy(logits, labels, data.class_weights).backward()
    convs = [p for p in model.parameters() if p.dim() == 4 and p.grad is not None]
    ratios = [p.grad.norm() / p.norm() for p in convs]  # the contour head has no class gradient
    return logits.std().item(), torch.stack(ratios).median().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="training overrides, e.g. model=classnet")
    overrides = parser.parse_args().overrides
    print("| norm | data.input_norm | logits std | median conv grad/weight |")
    print("|---|---|---|---|")
    for norm in ("bn", "agc"):
        for input_norm in ("mean", "standard"):
            std, ratio = measure([f"norm={norm}", f"data.input_norm={input_norm}", *overrides])
            print(f"| {norm} | {input_norm} | {std:.3g} | {ratio:.3g} |")


if __name__ == "__main__":
    main()
