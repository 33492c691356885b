"""Where the median AGC's run of seed 1 on CamVid diverges (code of d81500e, the median
with the mean's gradient): per step, the loss, the gradient norm, and for the AGC layer with
the largest output that step, its largest input, the largest gap between its maps' mean and
median, and its largest output; and layer 1's largest output. From the repository root:
``PYTHONPATH=src python results/camvid-cpu-small/60-epochs/agc-variants/median_trace.py``
(../shared/data/camvid, 2 CPU cores, about a minute). Layers count from 1 in forward order.
"""

import torch

from deepcontrol.config import compose
from deepcontrol.nn import AutoGainControl2d
from deepcontrol.train import build_training

overrides = ["data=camvid", "norm=agc-median", "data.batch_size=4", "data.height=120",
             "data.width=160", "model.width=16", "device=cpu", "logger=none", "seed=1"]  # fmt: skip
run = build_training(compose(overrides), torch.device("cpu"))  # as deepcontrol.train does
model, optimizer, loss_fn = run.model, run.optimizer, run.loss_fn
seen: dict[int, tuple[float, float, float]] = {}


def record(layer: int):
    def hook(module: AutoGainControl2d, inputs: tuple, out: torch.Tensor) -> None:
        y = inputs[0].detach()
        gap = y.mean((2, 3)) - y.flatten(2).median(2).values
        seen[layer] = (y.abs().max().item(), gap.abs().max().item(), out.abs().max().item())

    return hook


layers = [m for m in model.modules() if isinstance(m, AutoGainControl2d)]
for depth, layer in enumerate(layers, 1):
    layer.register_forward_hook(record(depth))
print("step, loss, gradient norm; layer with the largest output: its |y|, |mean - median|, "
      "|out|; layer 1's |out|")  # fmt: skip
for step, (images, labels, *_) in enumerate(run.data.train):
    loss = loss_fn(model(images), labels)
    optimizer.zero_grad()
    loss.backward()
    size = torch.cat([p.grad.flatten() for p in model.parameters()]).norm().item()
    worst = max(seen, key=lambda depth: seen[depth][2])
    y, gap, out = seen[worst]
    print(f"{step:3d}  {loss.item():.4g}  {size:.4g}  layer {worst}: {y:.3g}  {gap:.3g}  "
          f"{out:.3g}; layer 1: {seen[1][2]:.3g}", flush=True)  # fmt: skip
    if not torch.isfinite(loss):
        break
    optimizer.step()
