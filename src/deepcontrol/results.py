"""Reading runs back from their directories (never from W&B) and gathering them in a table."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from deepcontrol.atomic import write_atomic
from deepcontrol.config import norm_label
from deepcontrol.logging import read_json


def read_metrics(run_dir: Path) -> list[dict[str, float]]:
    """The rows of ``run_dir/metrics.csv`` as floats."""
    path = Path(run_dir) / "metrics.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics.csv; is {run_dir} a run directory?")
    with path.open() as f:
        reader = csv.DictReader(f)
        rows = []
        for row in reader:
            try:
                rows.append({key: float(value) for key, value in row.items()})
            except (TypeError, ValueError) as e:  # a cell missing (None) or not a number
                raise ValueError(
                    f"{path}, line {reader.line_num}: expected a number in each of "
                    f"{len(reader.fieldnames)} columns, got {list(row.values())}"
                ) from e
        return rows


def comparison_table(run_dirs: list[Path], column: str = "val_pixel_error") -> str:
    """A text table of ``column`` per epoch (rows) for each run (columns), each headed by its
    directory's name, or by its path where two runs share a name (one run in two sweeps)."""
    names = [Path(d).name for d in run_dirs]
    labels = names if len(set(names)) == len(names) else [str(d) for d in run_dirs]
    runs = {}
    for label, run_dir in zip(labels, run_dirs, strict=True):
        rows = read_metrics(run_dir)
        if rows and column not in rows[0]:
            raise ValueError(f"{Path(run_dir) / 'metrics.csv'}: no column {column!r}; it has "
                             f"{', '.join(rows[0])}")  # fmt: skip
        runs[label] = {int(r["epoch"]): r[column] for r in rows}
    epochs = sorted({e for rows in runs.values() for e in rows})
    width = max(len(name) for name in runs)
    lines = [f"{column} per epoch", "epoch  " + "  ".join(f"{n:>{width}}" for n in runs)]
    for epoch in epochs:
        cells = (
            f"{rows[epoch]:>{width}.4f}" if epoch in rows else " " * width for rows in runs.values()
        )
        lines.append(f"{epoch:5d}  " + "  ".join(cells))
    return "\n".join(lines)


def run_record(run_dir: Path) -> dict:
    """A run's settings and outcome, from its config.yaml and summary.json."""
    run_dir = Path(run_dir)
    path = run_dir / "config.yaml"
    try:
        cfg = OmegaConf.load(path)
        settings = {
            "run_name": cfg.run_name,
            "model": cfg.model.name,
            "norm": norm_label(cfg.norm),
            "data": cfg.data.name,
            "batch_size": cfg.data.batch_size,
            "lr": cfg.optim.lr,
            "seed": cfg.seed,
            "epochs": cfg.epochs,
        }
    except (yaml.YAMLError, OmegaConfBaseException) as e:
        raise ValueError(f"{path}: not the config.yaml of a training run ({e})") from e
    summary = read_json(run_dir / "summary.json") or {}
    return {
        **settings,
        "status": summary.get("status", "not started"),
        "diverged_epoch": summary.get("diverged_epoch"),
        "run_dir": str(run_dir),
        # the code versions that trained it (blank for runs of code that recorded none)
        "code": " then ".join(summary.get("code", [])),
    }


def _found_once(found: dict[str, Path], name: str, where: Path, why: str = "") -> None:
    """Record that run ``name`` is in ``where``; an error naming both places if it was found
    before (each directory, or each source, is read once)."""
    if name in found:
        raise ValueError(f"run {name} is in both {found[name]} and {where}{why}")
    found[name] = where


def collect_runs(outputs: Path) -> list[dict]:
    """One row per epoch of every run under ``outputs`` (any depth), settings first.

    A run without a finished epoch (diverged in its first) still gets one row, so that it
    is not lost from the table. A run found in two directories is an error, naming both:
    their epochs would mix in one curve.
    """
    rows = []
    found: dict[str, Path] = {}
    for config in sorted(Path(outputs).rglob("config.yaml")):
        run_dir = config.parent
        if config.parent.name == ".hydra":
            continue
        record = run_record(run_dir)
        _found_once(found, record["run_name"], run_dir, "; run names leave out the image size "
                    "and network width, so runs that differ in those need folders of their "
                    "own, each collected into its own results folder")  # fmt: skip
        metrics = read_metrics(run_dir) if (run_dir / "metrics.csv").is_file() else []
        rows += [{**record, **row} for row in metrics] or [record]
    if not rows:
        raise FileNotFoundError(f"{outputs}: no run directories (config.yaml) found")
    return rows


def gather_runs(sources: list[Path]) -> list[dict]:
    """The rows of every run in ``sources``: outputs folders (:func:`collect_runs`) or runs.csv
    tables written before, as they are; seeds trained in separate sweeps end in one table.

    A run found in two sources is an error, naming both: one of them would be dropped."""
    rows: list[dict] = []
    found: dict[str, Path] = {}
    for source in map(Path, sources):
        if source.is_file():
            new = _runs_csv_rows(source)
        else:
            new = collect_runs(source)
        for name in dict.fromkeys(str(row["run_name"]) for row in new):
            _found_once(found, name, source)
        rows += new
    return rows


def write_runs_csv(rows: list[dict], path: Path) -> None:
    """``rows`` as CSV, columns in first-seen order, blanks where a run lacks a column."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_atomic(Path(path), buffer.getvalue())


# Columns read as text: a commit's hash can read as a number (123456789012, 1234e5678901)
TEXT_COLUMNS = frozenset({"code"})


def _runs_csv_rows(path: Path) -> list[dict[str, str]]:
    """The rows of a runs.csv as text; an error naming it if it is not one."""
    with path.open() as f:
        reader = csv.DictReader(f)
        if "run_name" not in (reader.fieldnames or []):
            raise ValueError(f"{path}: expected a runs.csv with a run_name column")
        return list(reader)


def read_runs_csv(path: Path) -> dict[str, list[dict]]:
    """runs.csv grouped by run name; numbers as floats, blanks as NaN, epochs in order."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no runs.csv; run scripts/collect_results.py first")
    runs: dict[str, list[dict]] = {}
    for row in _runs_csv_rows(path):
        runs.setdefault(row["run_name"], []).append(
            {k: v if k in TEXT_COLUMNS else _number(v) for k, v in row.items()}
        )
    for rows in runs.values():
        rows.sort(key=lambda r: -1 if math.isnan(r.get("epoch", math.nan)) else r["epoch"])
    return runs


def _number(text: str) -> float | str:
    if text == "":
        return math.nan
    try:
        return float(text)
    except ValueError:
        return text
