"""SegNet's first steps with the median AGC, three ways to take the gradient through the
median, against the paper's mean: loss and gradient norm per step. A record of why
AutoGainControl2d gives the median the mean's gradient. From the repository root:

PYTHONPATH=src python results/camvid-cpu-small/60-epochs/agc-variants/median_gradient.py synthetic
    6 steps on 64×128 synthetic data, width 8, each way.
PYTHONPATH=src python results/camvid-cpu-small/60-epochs/agc-variants/median_gradient.py camvid
    2 epochs of CamVid at 120×160, width 16 (../shared/data/camvid), held constant and as
    committed; every 15th step, and any that is not finite.
"""

import sys

import torch

from deepcontrol.config import compose
from deepcontrol.nn import AutoGainControl2d
from deepcontrol.train import build_training

as_committed = AutoGainControl2d._background_level  # the median with the mean's gradient


def median(y: torch.Tensor) -> torch.Tensor:
    return y.flatten(2).median(dim=2).values[..., None, None]


def exact(self: AutoGainControl2d, y: torch.Tensor) -> torch.Tensor:
    return median(y)  # torch.median's own gradient, all onto the median's position


def held(self: AutoGainControl2d, y: torch.Tensor) -> torch.Tensor:
    return median(y).detach()  # no gradient through the level


SETTINGS = {
    "synthetic": ["data.height=64", "data.width=128", "model.width=8"],
    "camvid": ["data=camvid", "data.height=120", "data.width=160", "model.width=16"],
}
WAYS = {
    "synthetic": (
        ("mean (the paper)", "agc", as_committed),
        ("median, exact gradient", "agc-median", exact),
        ("median, held constant", "agc-median", held),
        ("median, the mean's gradient (as committed)", "agc-median", as_committed),
    ),
    "camvid": (
        ("median, held constant", "agc-median", held),
        ("median, the mean's gradient (as committed)", "agc-median", as_committed),
    ),
}
where = sys.argv[1] if len(sys.argv) > 1 else "synthetic"
steps, every = (6, 1) if where == "synthetic" else (2 * 92, 15)  # CamVid: 92 steps an epoch
for label, norm, level in WAYS[where]:
    AutoGainControl2d._background_level = level
    cfg = compose([f"norm={norm}", "device=cpu", "logger=none", *SETTINGS[where]])
    run = build_training(cfg, torch.device("cpu"))  # seed 0
    model, optimizer, loss_fn = run.model, run.optimizer, run.loss_fn
    print(f"{label}: step, loss, gradient norm", flush=True)
    batches = (batch for _ in range(steps) for batch in run.data.train)  # epochs back to back
    for step, (images, labels, *_) in zip(range(steps), batches, strict=False):
        loss = loss_fn(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        size = torch.cat([p.grad.flatten() for p in model.parameters()]).norm()
        finite = bool(torch.isfinite(loss))
        if step % every == 0 or not finite:
            print(f"  {step}  {loss.item():.4g}  {size.item():.4g}", flush=True)
        if not finite:
            break
        optimizer.step()
