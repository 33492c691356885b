"""Gather every run under outputs folders into one table, runs.csv.

python scripts/collect_results.py outputs/cityscapes results/cityscapes
    → results/cityscapes/runs.csv: one row per run and epoch, with the run's settings
      (model, norm, data, batch_size, lr, seed, epochs), status, code and metrics.csv
      columns.
python scripts/collect_results.py outputs/seed1 results/seed0/runs.csv results/all-seeds
    → one table of several sources: outputs folders, or runs.csv files collected before.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from deepcontrol.results import gather_runs, write_runs_csv


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sources", type=Path, nargs="+",
                        help="folders holding run directories, or runs.csv files")  # fmt: skip
    parser.add_argument("results", type=Path, help="folder to write runs.csv into")
    args = parser.parse_args()
    try:
        rows = gather_runs(args.sources)
    except (FileNotFoundError, ValueError) as e:  # a bad source: say which, no traceback
        sys.exit(f"collect_results: {e}")
    write_runs_csv(rows, args.results / "runs.csv")
    runs = {row["run_name"]: row["status"] for row in rows}
    print(f"{args.results / 'runs.csv'}: {len(runs)} runs, {len(rows)} rows")
    for name, status in sorted(runs.items()):
        print(f"  {name}: {status}")


if __name__ == "__main__":
    main()
