"""Reading finished runs back from their directories (never from W&B)."""

from __future__ import annotations

import csv
from pathlib import Path


def read_metrics(run_dir: Path) -> list[dict[str, float]]:
    """The rows of ``run_dir/metrics.csv`` as floats."""
    path = Path(run_dir) / "metrics.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics.csv; is {run_dir} a run directory?")
    with path.open() as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def comparison_table(run_dirs: list[Path], column: str = "val_pixel_error") -> str:
    """A text table of ``column`` per epoch (rows) for each run (columns)."""
    runs = {Path(d).name: {int(r["epoch"]): r[column] for r in read_metrics(d)} for d in run_dirs}
    epochs = sorted({e for rows in runs.values() for e in rows})
    width = max(len(name) for name in runs)
    lines = [f"{column} per epoch", "epoch  " + "  ".join(f"{n:>{width}}" for n in runs)]
    for epoch in epochs:
        cells = (
            f"{rows[epoch]:>{width}.4f}" if epoch in rows else " " * width for rows in runs.values()
        )
        lines.append(f"{epoch:5d}  " + "  ".join(cells))
    return "\n".join(lines)
