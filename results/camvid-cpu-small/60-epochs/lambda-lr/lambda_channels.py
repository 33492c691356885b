"""Each AGC layer's λ over its channels (min, 10%, median, 90%, max; then the mean, which
metrics.csv logs as ``lambda_NN``), from the last checkpoint of each run directory given.

    PYTHONPATH=src python results/camvid-cpu-small/60-epochs/lambda-lr/lambda_channels.py RUN_DIR...
"""

import sys
from pathlib import Path

import torch

QUANTILES = torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0])

for run in map(Path, sys.argv[1:]):
    checkpoint = torch.load(run / "last.pt", map_location="cpu", weights_only=False)
    lambdas = [v for k, v in checkpoint["model"].items() if k.rsplit(".", 1)[-1] == "mean_scale"]
    if not lambdas:
        raise SystemExit(f"{run / 'last.pt'}: no AGC λ (mean_scale) in the model")
    print(f"{run.name}, epoch {checkpoint['epoch']}")
    print("layer channels   min   10%   50%   90%   max  mean")
    for depth, lam in enumerate(lambdas, 1):
        cells = " ".join(f"{q:5.2f}" for q in torch.quantile(lam.float(), QUANTILES))
        print(f"{depth:5d} {lam.numel():8d} {cells} {lam.float().mean():5.2f}")
    print()
