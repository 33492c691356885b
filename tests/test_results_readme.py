"""results/README.md's table of the paper's claims, recomputed from the files it cites; and
each GPU report's target count and Figure 1 cost where the folder index and README.md
state them.

Each row's numbers, in the order they appear, must be those the committed runs.csv and
benchmark reports give, so the table cannot drift from them: a new report that moves one
of them fails here until the table says it.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from pathlib import Path

import pytest

from deepcontrol.figure1 import PAPER_FINAL_ERROR
from deepcontrol.results import read_runs_csv

RESULTS = Path(__file__).resolve().parents[1] / "results"
HEADING = "## The paper's claims, and what this repository measured"
NUMBER = re.compile(r"\d+(?:\.\d+)?")


def claims_section() -> str:
    text = (RESULTS / "README.md").read_text()
    assert HEADING in text, f"results/README.md has no heading {HEADING!r}"
    return text.split(HEADING, 1)[1].split("\n## ", 1)[0]


def claims_table() -> dict[str, tuple[str, str]]:
    """claim -> (the paper's cell, the measured cell)."""
    rows = [line for line in claims_section().splitlines() if line.startswith("|")][2:]
    cells = [[c.strip() for c in row.strip("|").split(" | ")] for row in rows]
    assert all(len(c) == 3 for c in cells), cells
    return {claim: (paper, measured) for claim, paper, measured in cells}


def numbers(text: str) -> list[str]:
    return NUMBER.findall(text)


def row(claim: str) -> tuple[str, str]:
    table = claims_table()
    assert claim in table, f"results/README.md's claims table has no row {claim!r}"
    return table[claim]


@pytest.fixture(scope="module")
def seeds() -> dict[tuple, list[list[dict]]]:
    """The 60-epoch runs behind the table per (model, norm, batch, lr): each seed's rows."""
    groups: dict[tuple, list[list[dict]]] = {}
    for rows in read_runs_csv(RESULTS / "camvid-cpu-small/60-epochs/all-seeds/runs.csv").values():
        first = rows[0]
        key = (first["model"], first["norm"], first["batch_size"], first["lr"])
        groups.setdefault(key, []).append(rows)
    return groups


def trained(runs: list[list[dict]]) -> list[dict[float, float]]:
    """Each of ``runs`` that did not diverge, as epoch -> validation pixel error (%); each
    ran all 60 epochs."""
    errors = []
    for rows in runs:
        first = rows[0]
        if first["status"] == "diverged":
            continue
        assert first["status"] == "finished" and first["epochs"] == 60, first["run_name"]
        errors.append({r["epoch"]: 100 * r["val_pixel_error"] for r in rows
                       if not math.isnan(r["epoch"])})  # fmt: skip
    return errors


@pytest.fixture(scope="module")
def errors(seeds: dict) -> dict[tuple, list[float]]:
    """Per setting, the final errors (%) of its runs that did not diverge."""
    finals = {key: [e[max(e)] for e in trained(runs)] for key, runs in seeds.items()}
    return {key: values for key, values in finals.items() if values}


def mean(errors: dict, model: str, norm: str, batch: int, lr: float) -> str:
    values = errors[(model, norm, batch, lr)]
    assert len(values) == 3, (model, norm, batch, lr, values)
    return f"{statistics.mean(values):.2f}"


def test_accuracy_rows_are_the_three_seeds_means(errors: dict) -> None:
    expected = {
        "SegNet trains as well with AGC as with BN (Fig. 1c)": [
            mean(errors, "segnet", "agc", 4, 0.08), mean(errors, "segnet", "bn", 4, 0.08)],
        "ClassNet does too (Fig. 1d)": [
            mean(errors, "classnet", "agc", 4, 0.08), mean(errors, "classnet", "bn", 4, 0.08)],
        "BN loses accuracy at batch 1 (Fig. 1a)": [
            mean(errors, "segnet", "bn", 1, 0.02), "1",
            mean(errors, "segnet", "bn", 4, 0.08), mean(errors, "segnet", "bn", 8, 0.16), "4", "8"],
        "AGC does not (Fig. 1b): single-sample training works": [
            *(mean(errors, "segnet", "agc", b, round(0.02 * b, 2)) for b in (1, 4, 8)),
            "1", "4", "8"],
    }  # fmt: skip
    for claim, values in expected.items():
        assert numbers(row(claim)[1]) == values, claim


def test_the_learning_speed_row_is_the_three_seeds_mean_errors_by_epoch(seeds: dict) -> None:
    """Each epoch's error is the mean of the five up to it (single epochs move by points)."""
    epochs = (10, 20, 30)

    def at(model: str, norm: str) -> list[str]:
        per_seed = trained(seeds[(model, norm, 4, 0.08)])
        assert len(per_seed) == 3, (model, norm)

        def smoothed(errors: dict, n: int) -> float:
            return statistics.mean(errors[k] for k in range(n - 4, n + 1))

        return [f"{statistics.mean(smoothed(e, n) for e in per_seed):.2f}" for n in epochs]

    expected = [*map(str, epochs), *at("segnet", "agc"), *at("segnet", "bn"),
                *at("classnet", "agc"), *at("classnet", "bn")]  # fmt: skip
    assert numbers(row("AGC learns as fast as BN, epoch for epoch (Fig. 1c, d)")[1]) == expected


def test_the_lr_row_and_the_divergences(seeds: dict, errors: dict) -> None:
    diverged = {key: n for key, runs in seeds.items()
                if (n := sum(rows[0]["status"] == "diverged" for rows in runs))}  # fmt: skip
    paper, measured = row("AGC trains at batch 8 with lr up to 0.64 (Fig. 1h)")
    assert numbers(paper) == ["0.08", "0.16", "0.32", "0.64", "1", "0.08", "0.16"]
    expected = []
    for lr in (0.08, 0.16, 0.32):
        expected += [mean(errors, "segnet", "agc", 8, lr), f"{lr:g}"]
    assert numbers(measured) == [*expected, "0.64"]
    assert "diverges at 0.64 in every seed" in measured
    assert diverged == {("segnet", "agc", 8, 0.64): 3}
    assert ("segnet", "agc", 8, 0.64) not in errors


def test_the_seeds_spread_stated_above_the_table(errors: dict) -> None:
    spread = {key: max(v) - min(v) for key, v in errors.items()}
    bn1 = spread.pop(("segnet", "bn", 1, 0.02))
    stated = (f"end {min(spread.values()):.2f} to {max(spread.values()):.2f} points apart, "
              f"and those of BN at batch 1 {bn1:.2f}")  # fmt: skip
    assert stated in " ".join(claims_section().split())


def test_the_paper_column_is_the_papers_numbers() -> None:
    for claim, model in (("SegNet trains as well with AGC as with BN (Fig. 1c)", "segnet"),
                         ("ClassNet does too (Fig. 1d)", "classnet")):  # fmt: skip
        paper = [f"{100 * PAPER_FINAL_ERROR[(model, norm)]:.2f}" for norm in ("agc", "bn")]
        assert numbers(row(claim)[0])[:2] == paper, claim


def report(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def targets_met_and_cost(report: dict) -> tuple[int, int, dict]:
    """A GPU report's targets met, targets judged, and its Figure 1 cost in bf16."""
    met, judged = sum(t["met"] for t in report["targets"]), len(report["targets"])
    [cost] = [c for c in report["figure1_cost"] if c["precision"] == "bf16"]
    return met, judged, cost


def segnet_step(report: dict, mode: str, batch: int, norm: str) -> dict:
    wanted = ("segnet", "bf16", mode, batch, norm)
    fields = ("network", "precision", "mode", "batch", "norm")
    (step,) = [s for s in report["steps"]
               if not s["error"] and tuple(s[f] for f in fields) == wanted]  # fmt: skip
    return step


def test_memory_row_is_run_6s_eager_peaks() -> None:
    run6 = report("benchmark.json")
    peaks = {(b, n): segnet_step(run6, "eager", b, n)["peak_gib"]
             for b in (1, 8) for n in ("agc", "bn")}  # fmt: skip
    cap = run6["max_batch_under_cap"]
    expected = []
    for batch in (8, 1):
        agc, bn = peaks[(batch, "agc")], peaks[(batch, "bn")]
        expected += [f"{agc:.2f}", f"{bn:.2f}", str(batch), f"{agc / bn:.2f}"]
    expected += [f"{run6['config']['memory_cap_gib']:g}", str(cap["agc"]), str(cap["bn"])]
    assert numbers(row("AGC needs less memory than BN")[1]) == expected


def test_speed_row_is_run_6s_steps_and_runs_3_and_5s_eager_ones() -> None:
    run6 = report("benchmark.json")

    def ms(r: dict, mode: str, norm: str) -> float:
        return segnet_step(r, mode, 8, norm)["ms_per_step"]

    earlier = [report(f"benchmark-h100/report-{code}.json") for code in ("43d0727", "d10fa68")]
    (faster,) = {f"{ms(r, 'eager', 'bn') / ms(r, 'eager', 'agc'):.2f}" for r in earlier}
    (best_vs_eager,) = [t["value"] for t in run6["targets"]
                        if t["target"] == "batch 8: AGC throughput / eager BN"]  # fmt: skip
    expected = ["8"]
    for mode in ("graphed", "eager"):
        agc, bn = ms(run6, mode, "agc"), ms(run6, mode, "bn")
        expected += [f"{bn / agc:.2f}", f"{agc:.2f}", f"{bn:.2f}"]
    expected += ["3", "5", faster]
    expected += [f"{ms(r, 'eager', norm):.2f}" for norm in ("agc", "bn") for r in earlier]
    expected += [f"{best_vs_eager:.2f}"]
    assert numbers(row("AGC trains faster than BN")[1]) == expected


def test_the_targets_count() -> None:
    met, judged, _ = targets_met_and_cost(report("benchmark.json"))
    assert f"({met} of {judged} met)" in claims_section()


@pytest.mark.parametrize("name, gpu", [("benchmark.json", "H100"),
                                       ("benchmark-h200/report-3a0401a.json", "H200")])  # fmt: skip
def test_each_reports_count_and_cost_where_the_folder_index_states_them(name: str, gpu: str):
    run = report(name)
    assert gpu in run["environment"]["gpu"], name
    met, judged, cost = targets_met_and_cost(run)
    folder = f"{name.split('/')[0]}/" if "/" in name else "benchmark.md"
    [index_row] = [line for line in (RESULTS / "README.md").read_text().splitlines()
                   if line.startswith(f"| `{folder}`")]  # fmt: skip
    assert re.search(rf"\b{met} of (the )?{judged} target rows met", index_row), index_row
    assert f"{cost['gpu_hours']:.2f} {gpu}-hours in bf16" in index_row, index_row


def test_the_top_readme_states_the_h100_reports_count_and_cost() -> None:
    met, judged, cost = targets_met_and_cost(report("benchmark.json"))
    bound = "at most " if any(run["untimed_modes"] for run in cost["per_run"]) else ""
    readme = " ".join((RESULTS.parent / "README.md").read_text().split())  # lines joined
    assert f"{met} of the {judged} target rows are met" in readme
    assert f"cost {bound}{cost['gpu_hours']:.2f} H100-hours in bf16 (run" in readme
