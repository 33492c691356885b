"""Gather every run under an outputs folder into one table, runs.csv.

python scripts/collect_results.py outputs/cityscapes results/cityscapes
    → results/cityscapes/runs.csv: one row per run and epoch, with the run's settings
      (model, norm, data, batch_size, lr, seed, epochs), status and metrics.csv columns.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from deepcontrol.results import collect_runs, write_runs_csv


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outputs", type=Path, help="folder holding run directories")
    parser.add_argument("results", type=Path, help="folder to write runs.csv into")
    args = parser.parse_args()
    rows = collect_runs(args.outputs)
    write_runs_csv(rows, args.results / "runs.csv")
    runs = {row["run_name"]: row["status"] for row in rows}
    print(f"{args.results / 'runs.csv'}: {len(runs)} runs, {len(rows)} rows")
    for name, status in sorted(runs.items()):
        print(f"  {name}: {status}")


if __name__ == "__main__":
    main()
