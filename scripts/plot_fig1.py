"""Draw Figure 1's eight panels, the λ figure and the results table from runs.csv.

python scripts/plot_fig1.py results/cityscapes [OVERRIDES ...]
    OVERRIDES are those of the training command (e.g. data=camvid epochs=30), so that each
    panel finds its runs by name. Writes fig1.png/.pdf, lambda.png/.pdf and fig1_table.md
    next to runs.csv, and panels.json (each panel's run names) for notebooks/fig1.ipynb.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from deepcontrol.figure1 import draw_figure1, draw_lambda, panel_membership, write_table
from deepcontrol.results import read_runs_csv


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="folder holding runs.csv")
    parser.add_argument("overrides", nargs="*", help="the training command's overrides")
    args = parser.parse_args()
    try:
        runs = read_runs_csv(args.results / "runs.csv")
    except (FileNotFoundError, ValueError) as e:  # no or a bad runs.csv: say which, no traceback
        sys.exit(f"plot_fig1: {e}")
    membership = panel_membership(args.overrides)
    draw_figure1(runs, membership, args.results)
    header = (f"# Figure 1: validation error per run ({args.results / 'runs.csv'}; overrides: "
              f"{' '.join(args.overrides) or 'none'})")  # fmt: skip
    write_table(runs, membership, args.results, header)
    drew_lambda = draw_lambda(runs, args.results)
    for letter, names in membership.items():
        print(f"({letter}) " + "; ".join(n if n in runs else f"{n} (not yet run)" for n in names))
    print(
        f"wrote {args.results}/fig1.png, fig1.pdf, panels.json, fig1_table.md"
        + (", lambda.png, lambda.pdf" if drew_lambda else " (no AGC run: no λ figure)")
    )


if __name__ == "__main__":
    main()
