"""Why λ moves slowly at the lr: each AGC layer's λ gradient split into the part that
repeats β's and the part only the per-sample mean gives, over one epoch of CamVid.

For one channel of eq. (1), ``out = (y - λ·m)·γ + β`` with ``m_n`` sample n's map mean and
``G_n = Σ_HW ∂L/∂out``: ``∂L/∂β = Σ_n G_n`` and ``∂L/∂λ = -γ Σ_n m_n G_n``. With ``m̄`` the
batch's mean of ``m_n``, exactly:

    ∂L/∂λ = -γ·m̄·∂L/∂β  -  γ·Σ_n (m_n - m̄)·G_n
            (common)        (own)

The common part is what subtracting any constant would give, a step β also takes; the own
part is what subtracting each sample's own mean adds. Each run's weights stay as they are
while one epoch of its training batches passes, in the order training would have used next
(the checkpoint's loader state); then again with SGD stepping them as training does; then
with SGD stepping all but β (each AGC layer's β put back after each step). Each WHERE is a
run directory, or ``init`` for seed 0's weights before training. From the repository root:

    PYTHONPATH=src python results/camvid-cpu-small/60-epochs/lambda-lr/lambda_gradient.py WHERE...
"""

import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

from deepcontrol.config import compose
from deepcontrol.engine import load_checkpoint, sgd_step
from deepcontrol.nn import AutoGainControl2d
from deepcontrol.train import build_training

INIT = ["data=camvid", "data.height=120", "data.width=160", "model.width=16", "norm=agc",
        "data.batch_size=4", "epochs=60", "device=cpu", "logger=none"]  # fmt: skip
CPU = torch.device("cpu")
LEGEND = """Per AGC layer (1 = the input's, 25 = the classifier's), over one epoch's steps:
rms: each gradient's root mean square over steps and channels;
CV: the map mean's spread over a batch's samples (std / |mean|), median over channels;
common/λ, own/λ: the rms of each part of λ's gradient over the rms of λ's;
sums: an epoch's sum of a gradient's steps over the sum of their sizes, per channel, median
over channels (1: every step the same way; about 0.1 for 92 steps of random sign);
λ's drift: lr / (1 - momentum) · |Σ ∂L/∂λ|, mean over channels, how far steady SGD steps
of the epoch's gradients move λ.
"""


def setup(where: str):
    """The training setup, weights and batch order of a run directory, or of ``init``."""
    if where == "init":
        return build_training(compose(INIT), CPU), "seed 0 before training"
    cfg = OmegaConf.load(Path(where) / "config.yaml")
    run = build_training(cfg, CPU)
    state = load_checkpoint(Path(where) / "last.pt", run.model, run.optimizer, run.data.train, CPU)
    return run, f"{Path(where).name}, after epoch {state['epoch']}"


def rms(t: torch.Tensor) -> float:
    return float(t.pow(2).mean().sqrt())


def coherence(g: torch.Tensor) -> float:
    """How far an epoch's (steps, channels) gradients add up: per channel the sum of the
    steps over the sum of their sizes, median over channels."""
    return float((g.sum(0).abs() / g.abs().sum(0).clamp_min(1e-30)).median())


HOW = ("weights held", "stepped by SGD", "stepped by SGD, β held")


def epoch_gradients(where: str, how: str) -> tuple[str, dict, float, float]:
    """Per step and AGC layer: λ, β and γ's gradients, the common part of λ's, and the map
    mean's spread over the batch; the weights held, stepped by SGD as training steps them,
    or stepped with every AGC layer's β put back after each step."""
    run, label = setup(where)
    layers = [m for m in run.model.modules() if isinstance(m, AutoGainControl2d)]
    seen = {}  # each layer's (N, C) map means in the current batch, and its γ then
    for layer in layers:
        layer.register_forward_hook(
            lambda mod, args, out: seen.__setitem__(
                mod, (args[0].detach().mean(dim=(2, 3)).double(), mod.weight.detach().double())
            )
        )
    steps = {name: [[] for _ in layers] for name in ("lam", "beta", "gamma", "common", "cv")}
    betas = [layer.bias.detach().clone() for layer in layers]
    for images, labels, contours in run.data.train:
        if how == HOW[0]:
            run.model.zero_grad()
            run.loss_fn(run.model(images), labels, contours).backward()
        else:
            sgd_step(run.model, run.optimizer, run.loss_fn, images, labels, contours, "fp32")
        if how == HOW[2]:
            with torch.no_grad():
                for layer, beta in zip(layers, betas, strict=True):
                    layer.bias.copy_(beta)
        for i, layer in enumerate(layers):
            m, gamma = seen[layer]
            g_beta = layer.bias.grad.double()
            common = -gamma * m.mean(0) * g_beta
            spread = m.std(0) / m.mean(0).abs().clamp_min(1e-12)
            for name, value in (("lam", layer.mean_scale.grad.double()), ("beta", g_beta),
                                ("gamma", layer.weight.grad.double()), ("common", common),
                                ("cv", spread)):  # fmt: skip
                steps[name][i].append(value)
    lam = layers[0].mean_scale
    group = next(g for g in run.optimizer.param_groups if any(p is lam for p in g["params"]))
    label += f", {how}: {len(steps['lam'][0])} batches (batch {run.data.train.batch_size})"
    return label, steps, group["lr"], group["momentum"]


print(LEGEND)
for where in sys.argv[1:]:
    for how in HOW:
        label, steps, lr, momentum = epoch_gradients(where, how)
        print(f"{label}, λ's lr {lr}")
        print("layer  rms: λ        β        γ   CV  common/λ own/λ  sums: β    λ   own  λ's drift")
        for i in range(len(steps["lam"])):
            lam, beta, gamma, common, cv = (torch.stack(steps[k][i]) for k in steps)
            own = lam - common
            drift = lr / (1 - momentum) * lam.sum(0).abs().mean()
            print(f"{i + 1:5d}  {rms(lam):.2e} {rms(beta):.2e} {rms(gamma):.2e} "
                  f"{float(cv.median()):4.2f}  {rms(common) / rms(lam):6.2f} "
                  f"{rms(own) / rms(lam):5.2f}  {coherence(beta):7.2f} {coherence(lam):4.2f}"
                  f" {coherence(own):5.2f}  {float(drift):9.4f}")  # fmt: skip
        print()
