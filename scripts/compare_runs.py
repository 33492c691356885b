"""Print the validation pixel error per epoch of runs side by side.

python scripts/compare_runs.py RUN_DIR [RUN_DIR ...]
python scripts/compare_runs.py --latest outputs/demo     # the newest sweep in that folder
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from deepcontrol.results import comparison_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="*", type=Path, help="run directories")
    parser.add_argument("--latest", type=Path, help="folder of timestamped sweeps: use the newest")
    parser.add_argument("--column", default="val_pixel_error")
    args = parser.parse_args()
    runs = list(args.runs)
    if args.latest:
        if not args.latest.is_dir():
            parser.error(f"{args.latest}: not a folder; expected one of timestamped sweeps")
        sweeps = sorted(p for p in args.latest.iterdir() if p.is_dir())
        if not sweeps:
            parser.error(f"{args.latest}: no sweep folders")
        runs += sorted(p.parent for p in sweeps[-1].glob("*/metrics.csv"))
    if not runs:
        parser.error("no run directories given")
    try:
        table = comparison_table(runs, args.column)
    except (FileNotFoundError, ValueError) as e:  # a bad run: say which, no traceback
        sys.exit(f"compare_runs: {e}")
    print(table)
    print("\noutputs (config.yaml, metrics.csv, summary.json, checkpoints):")
    for run in runs:
        print(f"  {run}")


if __name__ == "__main__":
    main()
