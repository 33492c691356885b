"""Figure 1 of the paper: its panels, the paper's numbers, and the figure, λ plot and table.

Which runs a panel holds is read from its experiment config (``configs/experiment/fig1X.yaml``),
the same sweep that trains them; a panel's runs are found in runs.csv by run name.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from omegaconf import DictConfig

from deepcontrol.atomic import atomic_file, write_atomic
from deepcontrol.config import compose
from deepcontrol.sweeps import experiment_jobs


@dataclass(frozen=True)
class Panel:
    letter: str
    title: str
    metric: str  # val_pixel_error | val_loss
    vary: tuple[str, ...]  # the settings that tell its curves apart (legend)

    @property
    def experiment(self) -> str:
        return f"fig1{self.letter}"


PANELS = (
    Panel("a", "BN, SegNet, batch 1/4/8, lr 0.02×batch", "val_pixel_error", ("batch", "lr")),
    Panel("b", "AGC, SegNet, batch 1/4/8, lr 0.02×batch", "val_pixel_error", ("batch", "lr")),
    Panel("c", "AGC vs BN, SegNet, batch 4, lr 0.08", "val_pixel_error", ("norm",)),
    Panel("d", "AGC vs BN, ClassNet, batch 4, lr 0.08", "val_pixel_error", ("norm",)),
    Panel("e", "AGC vs BN, SegNet, batch 4, lr 0.08", "val_loss", ("norm",)),
    Panel("f", "AGC vs BN, ClassNet, batch 4, lr 0.08", "val_loss", ("norm",)),
    Panel("g", "BN, SegNet, batch 8", "val_pixel_error", ("lr",)),
    Panel("h", "AGC, SegNet, batch 8", "val_pixel_error", ("lr",)),
)

# Final validation pixel errors the paper reports (Cityscapes 256×512, batch 4, lr 0.08).
PAPER_FINAL_ERROR = {
    ("segnet", "agc"): 0.0973,
    ("segnet", "bn"): 0.0957,
    ("classnet", "agc"): 0.0534,
    ("classnet", "bn"): 0.0553,
}
PAPER_CLAIMS = (
    "SegNet: AGC 9.73% vs BN 9.57% final error; ClassNet: AGC 5.34% vs BN 5.53%.",
    "BN at batch 1 is about 2% (absolute) worse than at batch 4 and 8 throughout training.",
    "AGC follows the same curve at every batch size once lr is scaled with the batch.",
)
METRIC_LABEL = {"val_pixel_error": "validation pixel error (%)", "val_loss": "validation loss"}


def panel_configs(panel: Panel, overrides: list[str] | None = None) -> list[DictConfig]:
    """The configs of ``panel``'s runs under ``overrides`` (those of the training command)."""
    return [compose(job) for job in experiment_jobs(panel.experiment, overrides)]


def panel_run_names(panel: Panel, overrides: list[str]) -> list[str]:
    """The run names of ``panel`` under ``overrides``."""
    return [cfg.run_name for cfg in panel_configs(panel, overrides)]


def figure1_runs(overrides: list[str] | None = None) -> dict[str, DictConfig]:
    """Figure 1's distinct runs under ``overrides``, each once as ``experiment=fig1`` trains
    them: its config by run name."""
    return {cfg.run_name: cfg for panel in PANELS for cfg in panel_configs(panel, overrides)}


def panel_membership(overrides: list[str]) -> dict[str, list[str]]:
    """Every panel's run names under ``overrides``, by panel letter."""
    return {panel.letter: panel_run_names(panel, overrides) for panel in PANELS}


def _curve_label(rows: list[dict], vary: tuple[str, ...]) -> str:
    first = rows[0]
    parts = {
        "norm": str(first["norm"]).upper(),
        "batch": f"batch {first['batch_size']:g}",
        "lr": f"lr {first['lr']:g}",
    }
    return ", ".join(parts[key] for key in vary)


SETTING = ("model", "norm", "data", "batch_size", "lr", "epochs")  # a run's settings but seed


def by_setting(names: list[str], runs: dict) -> tuple[list[list[list[dict]]], list[str]]:
    """The runs of ``names`` found in ``runs``, grouped by setting (all but the seed) in the
    order first named, and the names not found."""
    groups: dict[tuple, list[list[dict]]] = {}
    missing = []
    for name in names:
        rows = runs.get(name)
        if rows:
            groups.setdefault(tuple(rows[0].get(k) for k in SETTING), []).append(rows)
        else:
            missing.append(name)
    return list(groups.values()), missing


def _epochs(rows: list[dict]) -> list[dict]:
    return [r for r in rows if not math.isnan(r.get("epoch", math.nan))]


def _by_status(group: list[list[dict]]) -> tuple[list[list[dict]], list[list[dict]]]:
    """A setting's runs that did not diverge, and those that did."""
    diverged = [rows for rows in group if rows[0].get("status") == "diverged"]
    return [rows for rows in group if rows[0].get("status") != "diverged"], diverged


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _span(values: list[str]) -> str:
    """``a`` where every value is ``a``; ``a to b`` from the first to the last."""
    return values[0] if values[0] == values[-1] else f"{values[0]} to {values[-1]}"


def _status_note(group: list[list[dict]]) -> str:
    """What a curve's label says about its runs: how many seeds, and how many of them
    diverged (and in which epoch) or have not finished."""
    many = len(group) > 1
    notes = [f"{len(group)} seeds"] if many else []
    statuses = [str(rows[0]["status"]) for rows in group]
    for status in dict.fromkeys(s for s in statuses if s != "finished"):
        note = f"{statuses.count(status)} {status}" if many else status
        if status == "diverged":
            epochs = [f"{rows[0]['diverged_epoch']:g}" for rows in group
                      if rows[0]["status"] == status]  # fmt: skip
            note += f" at epoch{'s' * (len(epochs) > 1)} {', '.join(epochs)}"
        notes.append(note)
    return f" ({'; '.join(notes)})" if notes else ""


def draw_panel(ax: Axes, panel: Panel, names: list[str], runs: dict) -> None:
    """One panel: a curve per setting. Several seeds of a setting draw their mean over the
    epochs all have reached, shaded from their lowest to their highest value; a run that
    diverged keeps its own curve, ending in a cross, and stays out of the mean."""
    ax.set_title(f"({panel.letter}) {panel.title}", fontsize=9, loc="left")
    ax.set_xlabel("epoch", fontsize=8)
    ax.set_ylabel(METRIC_LABEL[panel.metric], fontsize=8)
    ax.tick_params(labelsize=7)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    scale = 100 if panel.metric == "val_pixel_error" else 1
    groups, missing = by_setting(names, runs)
    for group in groups:
        label = _curve_label(group[0], panel.vary) + _status_note(group)
        color = None
        alive, diverged = _by_status(group)
        if alive:
            curves = [
                {r["epoch"]: r[panel.metric] * scale for r in _epochs(rows)} for rows in alive
            ]
            epochs = sorted(set.intersection(*map(set, curves)))
            values = [[curve[e] for curve in curves] for e in epochs]
            (line,) = ax.plot(epochs, [_mean(v) for v in values], "-o", label=label, lw=1.2, ms=2)
            color, label = line.get_color(), None
            if len(alive) > 1:
                ax.fill_between(epochs, [min(v) for v in values], [max(v) for v in values],
                                color=color, alpha=0.2, lw=0)  # fmt: skip
        for rows in diverged:
            done = _epochs(rows)
            (line,) = ax.plot([r["epoch"] for r in done], [r[panel.metric] * scale for r in done],
                              "-o", color=color, label=label, lw=1.2, ms=2)  # fmt: skip
            color, label = line.get_color(), None
            y = done[-1][panel.metric] * scale if done else ax.get_ylim()[1]
            ax.plot([rows[0]["diverged_epoch"]], [y], "x", color=color, ms=8)
    if missing:
        ax.text(0.98, 0.98, "not yet run:\n" + "\n".join(missing), ha="right", va="top",
                transform=ax.transAxes, fontsize=6, color="0.4")  # fmt: skip
    if groups:
        ax.legend(fontsize=7)


def figure1(runs: dict, membership: dict[str, list[str]]) -> Figure:
    """All eight panels, laid out like the paper's (a)–(h); ``membership`` gives each panel's
    run names (:func:`panel_membership`)."""
    fig = Figure(figsize=(10, 13), layout="tight")
    for ax, panel in zip(fig.subplots(4, 2).flat, PANELS, strict=True):
        draw_panel(ax, panel, membership[panel.letter], runs)
    return fig


def draw_figure1(runs: dict, membership: dict[str, list[str]], out_dir: Path) -> None:
    """:func:`figure1` as fig1.png and fig1.pdf in ``out_dir``, and the run names each panel
    drew as panels.json (which notebooks/fig1.ipynb reads)."""
    _save(figure1(runs, membership), out_dir / "fig1")
    write_atomic(out_dir / "panels.json", json.dumps(membership, indent=1) + "\n")


def lambda_figure(runs: dict) -> Figure | None:
    """λ of the AGC runs: mean λ per layer against depth at the end of training (left; the
    mean over seeds where a setting has several), and λ of five layers against epoch for
    SegNet's batch-4 run when there is one (right).

    None when no run has λ columns."""
    agc = {n: [r for r in rows if not math.isnan(r.get("lambda_01", math.nan))]
           for n, rows in runs.items()}  # fmt: skip
    agc = {n: rows for n, rows in agc.items() if rows}
    if not agc:
        return None
    fig = Figure(figsize=(11, 5), layout="tight")
    left, right = fig.subplots(1, 2)

    def layers(row: dict) -> list[int]:  # runs.csv has every network's λ columns
        return sorted(int(k.split("_")[1]) for k, v in row.items()
                      if k.startswith("lambda_") and not math.isnan(v))  # fmt: skip

    for group in by_setting(sorted(agc), agc)[0]:  # seeds of a setting: their mean
        finals = [rows[-1] for rows in group]
        depths = layers(finals[0])
        epochs = _span([f"{e:g}" for e in sorted(final["epoch"] for final in finals)])
        seeds = f"{len(group)} seeds, " if len(group) > 1 else ""
        label = f"{group[0][0]['model']}, {_curve_label(group[0], ('batch', 'lr'))}"
        left.plot(depths, [_mean([f[f"lambda_{d:02d}"] for f in finals]) for d in depths],
                  marker=".", label=f"{label} ({seeds}epoch {epochs})")  # fmt: skip
    left.set(xlabel="AGC layer (forward order: input → classifier)",
             ylabel="mean λ over channels", title="λ per layer at the end of training")  # fmt: skip
    left.axhline(1.0, color="0.6", lw=0.8, ls="--")
    # below the axes: inside, one of the runs' drops near the classifier would be hidden
    left.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2)
    # the right panel follows panel (c)'s AGC run when there is one
    order = sorted(
        agc, key=lambda n: (agc[n][0]["model"] != "segnet", agc[n][0]["batch_size"] != 4, n)
    )
    rows = agc[order[0]]
    depths = layers(rows[-1])
    picks = sorted({depths[0], depths[len(depths) // 4], depths[len(depths) // 2],
                    depths[3 * len(depths) // 4], depths[-1]})  # fmt: skip
    for d in picks:
        right.plot([r["epoch"] for r in rows], [r[f"lambda_{d:02d}"] for r in rows],
                   label=f"layer {d}")  # fmt: skip
    right.set(xlabel="epoch", ylabel="mean λ over channels", title=f"λ against epoch: {order[0]}")
    right.title.set_fontsize(8)
    right.xaxis.set_major_locator(MaxNLocator(integer=True))
    right.legend(fontsize=7)
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.ticklabel_format(axis="y", useOffset=False)
    return fig


def draw_lambda(runs: dict, out_dir: Path) -> bool:
    """:func:`lambda_figure` as lambda.png and lambda.pdf; False (nothing drawn) without λ."""
    fig = lambda_figure(runs)
    if fig is not None:
        _save(fig, out_dir / "lambda")
    return fig is not None


def _save(fig: Figure, stem: Path) -> None:
    stem.parent.mkdir(parents=True, exist_ok=True)
    for suffix in (".png", ".pdf"):
        with atomic_file(stem.with_suffix(suffix)) as tmp:
            fig.savefig(tmp, format=suffix[1:], dpi=150)


def _percent(value: float) -> str:
    return "—" if value is None or math.isnan(value) else f"{100 * value:.2f}"


def _seeds_note(*finals: list[float]) -> str:
    """How many seeds a claim's means are over, when more than one."""
    counts = sorted({len(f) for f in finals})
    return "" if counts == [1] else f" Means over {_span([str(n) for n in counts])} seeds."


def claims_measured(runs: dict) -> list[str]:
    """What the runs at hand say about each of the paper's claims, as measured numbers; a
    setting run with several seeds counts with the mean of their final errors. A run that
    diverged is left out of the means and named. Runs of different datasets or lengths are
    not compared: each (data, epochs) gets its own claims, prefixed with it when there are
    several."""
    contexts: dict[tuple, list[list[list[dict]]]] = {}
    for group in by_setting(list(runs), runs)[0]:
        first = group[0][0]
        contexts.setdefault((first.get("data"), first.get("epochs")), []).append(group)
    if len(contexts) == 1:
        return _claims(*contexts.values())
    return [f"{data}, {epochs:g} epochs: {line}" for (data, epochs), groups in contexts.items()
            for line in _claims(groups)]  # fmt: skip


def _diverged_runs(key: tuple, count: int) -> str:
    model, norm, batch, lr = key
    return f"{model}, {norm.upper()}, batch {batch:g}, lr {lr:g} ({count} run{'s' * (count > 1)})"


def _claims(groups: list[list[list[dict]]]) -> list[str]:
    """:func:`claims_measured` over the settings (each its seeds' runs) of one dataset and
    length."""
    finals: dict[tuple, list[float]] = {}  # (model, norm, batch, lr) -> each run's final error
    diverged: dict[tuple, int] = {}
    for group in groups:
        first = group[0][0]
        key = (first["model"], first["norm"], first["batch_size"], first["lr"])
        alive, gone = _by_status(group)
        finals[key] = [done[-1]["val_pixel_error"] for rows in alive if (done := _epochs(rows))]
        diverged[key] = len(gone)

    lines = []

    def claim(subject: str, keys: list[tuple], text: Callable[..., str]) -> None:
        """``text`` of the keys' mean final errors, if each has a run that did not diverge."""
        errors = [finals.get(k, []) for k in keys]
        gone = [_diverged_runs(k, diverged[k]) for k in keys if diverged.get(k)]
        if all(errors):
            left_out = f" Diverged and left out: {'; '.join(gone)}." if gone else ""
            lines.append(text(*map(_mean, errors)) + _seeds_note(*errors) + left_out)
        elif all(finals.get(k) or diverged.get(k) for k in keys):
            lost = [_diverged_runs(k, diverged[k]) for k in keys if not finals.get(k)]
            lines.append(f"{subject}: not measured, every run diverged: {'; '.join(lost)}.")

    for model in ("segnet", "classnet"):
        claim(f"{model}, batch 4, lr 0.08", [(model, norm, 4, 0.08) for norm in ("agc", "bn")],
              lambda agc, bn, model=model: (
                  f"{model}, batch 4, lr 0.08: final error AGC {_percent(agc)}% vs BN "
                  f"{_percent(bn)}% (AGC − BN = {100 * (agc - bn):+.2f} points)."))  # fmt: skip
    batches = [("segnet", b, round(0.02 * b, 10)) for b in (1, 4, 8)]
    claim("BN at batch 1 / 4 / 8", [(m, "bn", b, lr) for m, b, lr in batches],
          lambda bn1, bn4, bn8: (
              f"BN final error at batch 1 / 4 / 8: {_percent(bn1)} / {_percent(bn4)} / "
              f"{_percent(bn8)}% (batch 1 − mean of 4 and 8 = "
              f"{100 * (bn1 - (bn4 + bn8) / 2):+.2f} points)."))  # fmt: skip
    claim("AGC at batch 1 / 4 / 8", [(m, "agc", b, lr) for m, b, lr in batches],
          lambda *agc: (
              f"AGC final error at batch 1 / 4 / 8: {' / '.join(map(_percent, agc))}% "
              f"(spread {100 * (max(agc) - min(agc)):.2f} points)."))  # fmt: skip
    return lines


def write_table(runs: dict, membership: dict, out_dir: Path, header: str = "") -> None:
    """fig1_table.md: final and best validation error of every run of the figure, next to
    the paper's numbers, and what the runs say about the paper's claims."""
    panels_of: dict[str, list[str]] = {}
    for letter, names in membership.items():
        for name in names:
            panels_of.setdefault(name, []).append(letter)
    columns = ("panels", "run", "status", "epochs", "final error %", "best error % (epoch)",
               "paper final % (Cityscapes, 150 epochs)")  # fmt: skip
    lines = [header, "", "| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
    for name, letters in panels_of.items():
        rows = runs.get(name)
        if not rows:
            lines.append(f"| {', '.join(letters)} | {name} | not yet run | | | | |")
            continue
        done = _epochs(rows)
        first = rows[0]
        status = first["status"]
        if status == "diverged":
            status += f" at epoch {first['diverged_epoch']:g}"
        best = min(done, key=lambda r: r["val_pixel_error"]) if done else None
        best_text = f"{_percent(best['val_pixel_error'])} ({best['epoch']:g})" if best else "—"
        paper = ""
        if (first["batch_size"], first["lr"]) == (4, 0.08):
            paper = _percent(PAPER_FINAL_ERROR.get((first["model"], first["norm"]), math.nan))
        lines.append(
            f"| {', '.join(letters)} | {name} | {status} | {len(done)} | "
            f"{_percent(done[-1]['val_pixel_error']) if done else '—'} | "
            f"{best_text} | {paper} |"
        )
    lines += _seeds_table(list(panels_of), runs)
    lines += ["", "## The paper's claims", ""] + [f"- {c}" for c in PAPER_CLAIMS]
    lines += ["", "## What these runs measured", ""]
    drawn = {name: runs[name] for name in panels_of if name in runs}
    lines += [f"- {c}" for c in claims_measured(drawn)] or ["- (no comparable runs yet)"]
    write_atomic(out_dir / "fig1_table.md", "\n".join(lines) + "\n")


def _seeds_table(names: list[str], runs: dict, last: int = 5) -> list[str]:
    """The table's section on settings run with several seeds (none without): each setting's
    final error and its mean over the ``last`` epochs, as the mean of its seeds and each
    seed's; curves that move by points from one epoch to the next compare better over
    several epochs than at the last one."""
    groups = by_setting(names, runs)[0]
    if all(len(group) == 1 for group in groups):
        return []
    lines = ["", "## Over seeds", "",
             "The mean over the seeds listed, then each one's value in that order. A seed that "
             "diverged is named and left out; one not finished counts with its last epoch.",
             "", f"| setting | seeds | final error % | mean of the last {last} epochs, % |",
             "|---|---|---|---|"]  # fmt: skip

    def seed(rows: list[dict]) -> str:
        return f"{rows[0].get('seed', math.nan):g}"

    def cell(values: list[float]) -> str:
        return f"{_percent(_mean(values))} ({' / '.join(_percent(v) for v in values)})"

    for group in groups:
        group = sorted(group, key=lambda rows: rows[0].get("seed", 0))
        first = group[0][0]
        setting = f"{first['model']}, {_curve_label(group[0], ('norm', 'batch', 'lr'))}"
        alive, diverged = _by_status(group)
        curves = [done for rows in alive if (done := _epochs(rows))]
        seeds = ", ".join(seed(rows) + _status_note([rows]) for rows in curves) or "none"
        if diverged:
            seeds += f"; {', '.join(seed(rows) for rows in diverged)} diverged"
        if not curves:
            lines.append(f"| {setting} | {seeds} | — | — |")
            continue
        finals = [rows[-1]["val_pixel_error"] for rows in curves]
        tails = [_mean([r["val_pixel_error"] for r in rows[-last:]]) for rows in curves]
        lines.append(f"| {setting} | {seeds} | {cell(finals)} | {cell(tails)} |")
    return lines
