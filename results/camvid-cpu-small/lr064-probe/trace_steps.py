"""Step by step, how AGC at batch 8 and lr 0.64 diverges on CamVid at CPU scale (120×160,
model.width=16), or does not: the loss, each convolution's weight norm over its value at
initialisation (the first four and the largest), and the largest gain |γ| of the first three
AGC layers. It stops at the first non-finite loss, or after 4 epochs (184 steps).

Run from the repository root, with overrides after the script's name:
    .venv/bin/python results/camvid-cpu-small/lr064-probe/trace_steps.py
    .venv/bin/python results/camvid-cpu-small/lr064-probe/trace_steps.py data.input_norm=standard
It builds the run with deepcontrol.train.build_training, as training does, and takes its
steps with deepcontrol.engine.sgd_step, in fp32 on the CPU.
"""

import math
import sys

import torch

from deepcontrol.config import compose
from deepcontrol.engine import sgd_step
from deepcontrol.nn import AutoGainControl2d
from deepcontrol.train import build_training

# The batch too: compose() makes one run, so the experiment's sweep (batch 8) does not apply
SETTING = ["experiment=fig1h", "data.batch_size=8", "optim.lr=0.64", "data=camvid",
           "data.height=120", "data.width=160", "model.width=16", "device=cpu",
           "logger=none"]  # fmt: skip
cfg = compose(SETTING + sys.argv[1:])
run = build_training(cfg, torch.device("cpu"))
model, optimizer, loss_fn = run.model, run.optimizer, run.loss_fn
convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
agcs = [m for m in model.modules() if isinstance(m, AutoGainControl2d)]
initial = [conv.weight.detach().norm().item() for conv in convs]
print(f"lr {cfg.optim.lr}, batch {cfg.data.batch_size}, input_norm {cfg.data.input_norm}, "
      f"seed {cfg.seed}: {len(convs)} convolutions, {len(agcs)} AGC layers")  # fmt: skip
step = 0
for _ in range(4):
    for images, labels, contours in run.data.train:
        loss = sgd_step(model, optimizer, loss_fn, images, labels, contours, "fp32").item()
        step += 1
        norms = [conv.weight.detach().norm().item() for conv in convs]
        growth = [now / then for now, then in zip(norms, initial, strict=True)]
        gains = " ".join(f"{agc.weight.detach().abs().max().item():.3g}" for agc in agcs[:3])
        print(f"step {step:3d}  loss {loss:.4g}  weight norm / initial: "
              f"{' '.join(f'{g:.3g}' for g in growth[:4])} ... largest {max(growth):.3g}  "
              f"first AGCs' largest |γ|: {gains}", flush=True)  # fmt: skip
        if not math.isfinite(loss):
            sys.exit(0)
print("finite for 4 epochs")
