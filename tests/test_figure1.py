"""Figure 1's pipeline: panel sweeps, one run per directory, launchers, collect, plot, table."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, tiny_overrides
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from matplotlib.figure import Figure
from omegaconf import OmegaConf

from deepcontrol.config import CONFIG_DIR, compose
from deepcontrol.figure1 import (
    PANELS,
    claims_measured,
    draw_panel,
    lambda_figure,
    panel_membership,
    panel_run_names,
    write_table,
)
from deepcontrol.results import (
    collect_runs,
    gather_runs,
    read_runs_csv,
    run_record,
    write_runs_csv,
)
from deepcontrol.sweeps import distinct_runs, experiment_jobs, sweep_jobs

EXPECTED_RUNS = {  # (model, norm, batch, lr) of Figure 1's panels, from the paper's caption
    "a": {("segnet", "bn", 1, 0.02), ("segnet", "bn", 4, 0.08), ("segnet", "bn", 8, 0.16)},
    "b": {("segnet", "agc", 1, 0.02), ("segnet", "agc", 4, 0.08), ("segnet", "agc", 8, 0.16)},
    "c": {("segnet", "bn", 4, 0.08), ("segnet", "agc", 4, 0.08)},
    "d": {("classnet", "bn", 4, 0.08), ("classnet", "agc", 4, 0.08)},
    "e": {("segnet", "bn", 4, 0.08), ("segnet", "agc", 4, 0.08)},
    "f": {("classnet", "bn", 4, 0.08), ("classnet", "agc", 4, 0.08)},
    "g": {("segnet", "bn", 8, 0.08), ("segnet", "bn", 8, 0.16)},
    "h": {("segnet", "agc", 8, lr) for lr in (0.08, 0.16, 0.32, 0.64)},
}


@pytest.mark.parametrize("letter", sorted(EXPECTED_RUNS))
def test_each_panel_sweeps_exactly_its_runs(letter):
    configs = [compose(job) for job in experiment_jobs(f"fig1{letter}")]
    got = {(c.model.name, c.norm.name, c.data.batch_size, c.optim.lr) for c in configs}
    assert got == EXPECTED_RUNS[letter] and len(configs) == len(got)
    for c in configs:
        assert (c.data.name, c.epochs, c.data.height, c.data.width) == ("cityscapes", 150, 256, 512)
        assert c.logger.group == f"fig1{letter}"


def test_the_figure_is_twelve_distinct_runs_and_the_grid_eighteen():
    names = set()
    for panel in PANELS:
        names |= set(panel_run_names(panel, []))
    assert len(names) == 12
    grid = {compose(job).run_name for job in experiment_jobs("grid")}
    assert len(grid) == 18 and len(names - grid) == 4  # h's lr 0.32 and 0.64, and ClassNet's
    # the lr rule and an explicit lr name the same run: fig1g's 0.16 is fig1a's batch 8
    assert compose(["data.batch_size=8"]).run_name == compose(
        ["data.batch_size=8", "optim.lr=0.16"]).run_name  # fmt: skip


def test_command_line_overrides_reach_every_panel_run():
    jobs = experiment_jobs("fig1h", ["data=camvid", "epochs=30", "experiment=fig1"])
    configs = [compose(job) for job in jobs]
    assert {c.data.name for c in configs} == {"camvid"} and {c.epochs for c in configs} == {30}
    assert (configs[0].data.height, configs[0].data.width) == (360, 480)
    # an override of a key the panel sweeps replaces its sweep
    [job] = experiment_jobs("fig1a", ["data.batch_size=2"])
    assert compose(job).data.batch_size == 2


def hydra_config(*overrides):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return hydra_compose("config", overrides=list(overrides), return_hydra_config=True)


def test_a_sweep_keeps_one_job_per_run_and_refuses_two_settings_in_one_directory():
    def load(job):
        return hydra_config(*job)

    assert distinct_runs(sweep_jobs(["seed=0,1"]), load) == [["seed=0"], ["seed=1"]]
    assert distinct_runs(sweep_jobs(["seed=0,0"]), load) == [["seed=0"]]
    # the init is not in the run name, so both inits would train into one directory
    with pytest.raises(ValueError, match=r"segnet-bn-synthetic-b4-lr0.08-s0-e150: two runs of "
                       r"this sweep would share .*'model.init': \('he', 'identity'\)"):  # fmt: skip
        distinct_runs(sweep_jobs(["model.init=he,identity"]), load)


def sweep(synthetic_root: Path, tmp_path: Path, sweep_dir: Path, *overrides: str):
    """``deepcontrol-train -m`` with ``overrides`` on the tiny synthetic data, one epoch a
    run, into ``sweep_dir``."""
    command = [
        sys.executable, "-m", "deepcontrol.train", "-m", *overrides,
        *tiny_overrides(synthetic_root, tmp_path / "cache"), "epochs=1",
        f"hydra.sweep.dir={sweep_dir}",
    ]  # fmt: skip
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)


def test_a_colliding_sweep_is_refused_before_any_run(synthetic_root, tmp_path):
    result = sweep(synthetic_root, tmp_path, tmp_path / "sweep", "model.init=he,identity",
                   "hydra/launcher=basic")  # fmt: skip
    assert result.returncode == 1 and "two runs of this sweep would share" in result.stderr
    assert not (tmp_path / "sweep").exists()  # nothing trained, nothing written


def test_cluster_and_pool_launchers_compose():
    slurm = hydra_config("experiment=fig1", "hydra/launcher=slurm", "hydra.launcher.partition=p")
    launcher = slurm.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher") and launcher.partition == "p"
    assert launcher.gpus_per_node == 1 and launcher.additional_parameters.requeue is True
    assert launcher.max_num_timeout > 0 and launcher.signal_delay_s >= 60
    assert slurm.hydra.sweeper._target_.endswith("PanelsSweeper")
    pool = hydra_config("hydra/launcher=gpu_pool", "hydra.launcher.gpus=[0,1]")
    assert pool.hydra.launcher._target_.endswith("GpuPoolLauncher")


def test_gpu_pool_gives_each_run_its_own_device(synthetic_root, tmp_path):
    result = sweep(synthetic_root, tmp_path, tmp_path, "experiment=fig1c",
                   "hydra/launcher=gpu_pool", "hydra.launcher.gpus=[3,5]")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    summaries = [json.loads(p.read_text()) for p in tmp_path.glob("*/summary.json")]
    assert len(summaries) == 2 and {s["status"] for s in summaries} == {"finished"}
    assert {s["cuda_visible_devices"] for s in summaries} == {"3", "5"}
    assert all((Path(s["run_dir"]) / "launcher.log").is_file() for s in summaries)


def test_submitit_runs_each_run_as_a_job(synthetic_root, tmp_path):
    # submitit_local pickles and runs the jobs as the slurm launcher does, without a cluster
    result = sweep(synthetic_root, tmp_path, tmp_path, "experiment=fig1c",
                   "hydra/launcher=submitit_local")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    summaries = [json.loads(p.read_text()) for p in tmp_path.glob("*/summary.json")]
    assert sorted(s["status"] for s in summaries) == ["finished", "finished"]
    assert (tmp_path / ".submitit").is_dir()


def test_fig1_smoke_runs_end_to_end_and_resumes_as_a_no_op(tmp_path):
    out, results = tmp_path / "out", tmp_path / "results"
    make = ["make", "-C", str(REPO), "fig1-smoke", f"VENV={sys.prefix}", f"SMOKE_OUT={out}",
            f"SMOKE_RESULTS={results}"]  # fmt: skip
    first = subprocess.run(make, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
    runs = read_runs_csv(results / "runs.csv")
    assert len(runs) == 12
    assert {rows[0]["status"] for rows in runs.values()} <= {"finished", "diverged"}
    assert all(len(rows) == 3 for rows in runs.values() if rows[0]["status"] == "finished")
    for name in (
        "fig1.png",
        "fig1.pdf",
        "panels.json",
        "lambda.png",
        "lambda.pdf",
        "fig1_table.md",
    ):
        assert (results / name).stat().st_size > 0, name
    table = (results / "fig1_table.md").read_text()
    assert "not yet run" not in table
    assert "| d, f | classnet-agc-synthetic-b4-lr0.08-s0-e3 |" in table and "5.34" in table
    assert "segnet-agc-synthetic-b8-lr0.64-s0-e3" in table and "9.73" in table
    assert "AGC final error at batch 1 / 4 / 8" in table
    again = subprocess.run(make, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0
    assert (again.stdout + again.stderr).count("already finished, nothing to do") == 12


def test_a_run_without_epochs_is_collected_and_drawn_as_diverged(tmp_path):
    # commits whose hashes read as numbers stay text
    codes = {0.08: ["123456789012"], 0.64: ["1234e5678901", "abcdef012345-dirty"]}
    for lr, status in ((0.08, "finished"), (0.64, "diverged")):
        run = tmp_path / f"lr{lr}"
        run.mkdir()
        cfg = compose(["norm=agc", "data.batch_size=8", f"optim.lr={lr}"])
        OmegaConf.save(cfg, run / "config.yaml", resolve=True)
        summary = {"status": status, "code": codes[lr],
                   **({"diverged_epoch": 1} if status == "diverged" else {})}  # fmt: skip
        (run / "summary.json").write_text(json.dumps(summary))
        if status == "finished":
            (run / "metrics.csv").write_text(
                "epoch,val_pixel_error,val_loss,lambda_01\n1,0.5,1.0,0.9\n2,0.4,0.9,0.8\n"
            )
    write_runs_csv(collect_runs(tmp_path), tmp_path / "runs.csv")
    runs = read_runs_csv(tmp_path / "runs.csv")
    diverged = runs["segnet-agc-synthetic-b8-lr0.64-s0-e150"]
    assert len(diverged) == 1 and diverged[0]["status"] == "diverged"
    assert math.isnan(diverged[0]["epoch"])
    assert [r["epoch"] for r in runs["segnet-agc-synthetic-b8-lr0.08-s0-e150"]] == [1, 2]
    assert runs["segnet-agc-synthetic-b8-lr0.08-s0-e150"][0]["code"] == "123456789012"
    assert diverged[0]["code"] == "1234e5678901 then abcdef012345-dirty"
    ax = Figure().subplots()
    panel = next(p for p in PANELS if p.letter == "h")
    draw_panel(ax, panel, [*runs, "segnet-agc-synthetic-b8-lr0.16-s0-e150"], runs)
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["lr 0.08", "lr 0.64 (diverged at epoch 1)"]
    assert any("not yet run" in t.get_text() and "lr0.16" in t.get_text() for t in ax.texts)


def test_claims_are_measured_from_the_runs():
    def run(norm, batch, lr, error):
        row = dict(model="segnet", norm=norm, batch_size=batch, lr=lr, epoch=1.0)
        return [{**row, "val_pixel_error": 0.5}, {**row, "epoch": 2.0, "val_pixel_error": error}]

    runs = {f"{n}{b}": run(n, b, round(0.02 * b, 10), e) for n, b, e in
            [("bn", 1, 0.12), ("bn", 4, 0.10), ("bn", 8, 0.10), ("agc", 1, 0.11),
             ("agc", 4, 0.10), ("agc", 8, 0.105)]}  # fmt: skip
    lines = claims_measured(runs)
    assert lines[0].startswith("segnet, batch 4, lr 0.08: final error AGC 10.00% vs BN 10.00%")
    assert "batch 1 − mean of 4 and 8 = +2.00 points" in lines[1]
    assert "spread 1.00 points" in lines[2]


def test_claims_leave_diverged_runs_out_and_name_them():
    def runs_of(norm, batch, errors, statuses):  # a diverged run keeps its epochs before
        pairs = enumerate(zip(errors, statuses, strict=True))
        return {f"{norm}{batch}s{seed}": seed_run(norm, seed, [0.5, e], s, batch)
                for seed, (e, s) in pairs}  # fmt: skip

    done = ("finished",) * 2
    runs = {**runs_of("bn", 1, (0.2, 0.9), ("finished", "diverged")),
            **runs_of("bn", 4, (0.1, 0.1), done), **runs_of("bn", 8, (0.1, 0.1), done),
            **runs_of("agc", 4, (0.1, 0.1), ("diverged", "diverged"))}  # fmt: skip
    lines = claims_measured(runs)
    # a diverged run's last finite error would have pulled BN's batch-1 mean to 55%
    assert lines == [
        "segnet, batch 4, lr 0.08: not measured, every run diverged: "
        "segnet, AGC, batch 4, lr 0.08 (2 runs).",
        "BN final error at batch 1 / 4 / 8: 20.00 / 10.00 / 10.00% (batch 1 − mean of 4 and 8 "
        "= +10.00 points). Means over 1 to 2 seeds. Diverged and left out: "
        "segnet, BN, batch 1, lr 0.02 (1 run).",
    ]


def test_claims_never_compare_runs_of_different_data_or_length():
    bn = seed_run("bn", 0, [0.10])
    agc = seed_run("agc", 0, [0.30])
    longer = [{**row, "epochs": 60} for row in seed_run("agc", 0, [0.12])]
    assert claims_measured({"bn": bn, "agc": agc, "agc60": longer}) == [
        "synthetic, 150 epochs: segnet, batch 4, lr 0.08: final error AGC 30.00% vs BN 10.00% "
        "(AGC − BN = +20.00 points)."
    ]


def test_lambda_figure_follows_segnet_and_skips_other_networks_layers():
    def run(model, lambdas):
        base = dict(model=model, norm="agc", batch_size=4.0, lr=0.08)
        return [{**base, "epoch": float(e), **{f"lambda_{i:02d}": v + e / 10 for i, v in
                 enumerate(lambdas, 1)}} for e in (1, 2)]  # fmt: skip

    runs = {"classnet-agc": run("classnet", [1.0, 0.9, 0.8, 0.7]),
            "segnet-agc": run("segnet", [1.0, 0.5, math.nan, math.nan])}  # fmt: skip
    left, right = lambda_figure(runs).axes
    assert "segnet-agc" in right.get_title()
    assert [line.get_label() for line in right.get_lines()] == ["layer 1", "layer 2"]
    assert all(math.isfinite(y) for line in right.get_lines() for y in line.get_ydata())
    assert len(left.get_lines()) == 3  # two runs and the λ = 1 guide
    assert lambda_figure({"segnet-bn": [{"model": "segnet", "epoch": 1.0}]}) is None


def seed_run(norm, seed, errors, status="finished", batch=4, lr=None):
    """runs.csv's rows of one SegNet run: its validation pixel error per epoch."""
    lr = round(0.02 * batch, 10) if lr is None else lr
    base = dict(model="segnet", norm=norm, data="synthetic", batch_size=batch, lr=lr,
                epochs=150, seed=seed, status=status, diverged_epoch=math.nan)  # fmt: skip
    if status == "diverged":
        base["diverged_epoch"] = len(errors) + 1
    rows = [{**base, "epoch": float(e), "val_pixel_error": v} for e, v in enumerate(errors, 1)]
    return rows or [{**base, "epoch": math.nan}]


def test_seeds_of_a_setting_draw_one_mean_curve_shaded_by_their_spread():
    runs = {"bn0": seed_run("bn", 0, [0.5, 0.3]), "bn1": seed_run("bn", 1, [0.6, 0.2]),
            "bn2": seed_run("bn", 2, [0.4, 0.4]), "agc0": seed_run("agc", 0, [0.7, 0.5]),
            "agc1": seed_run("agc", 1, [], "diverged"),
            "agc2": seed_run("agc", 2, [0.9], "running")}  # fmt: skip
    ax = Figure().subplots()
    panel = next(p for p in PANELS if p.letter == "c")
    draw_panel(ax, panel, [*runs, "not-run"], runs)
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["BN (3 seeds)", "AGC (3 seeds; 1 diverged at epoch 1; 1 running)"]
    bn, agc = (
        next(line for line in ax.get_lines() if line.get_label() == label) for label in labels
    )
    assert list(bn.get_xdata()) == [1, 2] and list(bn.get_ydata()) == pytest.approx([50, 30])
    # AGC's mean stops where its running seed is; the diverged seed is left out of it
    assert list(agc.get_xdata()) == [1] and list(agc.get_ydata()) == pytest.approx([80])
    bands = [c.get_paths()[0].vertices[:, 1] for c in ax.collections]
    assert len(bands) == 2
    assert (bands[0].min(), bands[0].max()) == pytest.approx((20, 60))
    crosses = [line for line in ax.get_lines() if line.get_marker() == "x"]
    assert len(crosses) == 1 and crosses[0].get_color() == agc.get_color()
    assert any("not-run" in t.get_text() for t in ax.texts)


def test_table_and_claims_give_the_mean_over_seeds(tmp_path):
    final = {
        ("bn", 1): (0.30, 0.20),
        ("bn", 4): (0.10, 0.12),
        ("bn", 8): (0.10, 0.10),
        ("agc", 1): (0.11, 0.13),
        ("agc", 4): (0.12, 0.14),
        ("agc", 8): (0.12, 0.12),
    }
    runs = {}
    for (norm, batch), errors in final.items():
        for seed, error in enumerate(errors):
            name = f"segnet-{norm}-synthetic-b{batch}-lr{round(0.02 * batch, 10)}-s{seed}-e150"
            runs[name] = seed_run(norm, seed, [0.5] * 5 + [error], batch=batch)
    runs["segnet-agc-synthetic-b8-lr0.64-s0-e150"] = seed_run("agc", 0, [0.5], "diverged", 8, 0.64)
    runs["segnet-agc-synthetic-b8-lr0.64-s1-e150"] = seed_run("agc", 1, [0.3], "running", 8, 0.64)
    lines = claims_measured(runs)
    assert lines[0] == (
        "segnet, batch 4, lr 0.08: final error AGC 13.00% vs BN 11.00% "
        "(AGC − BN = +2.00 points). Means over 2 seeds."
    )
    assert "batch 1 − mean of 4 and 8 = +14.50 points" in lines[1]
    membership = panel_membership(["data=synthetic", "seed=0,1"])
    assert set(runs) <= set(membership["a"] + membership["b"] + membership["h"])
    write_table(runs, membership, tmp_path)
    table = (tmp_path / "fig1_table.md").read_text()
    section = table[table.index("## Over seeds") : table.index("## The paper's claims")]
    # the final error, then the mean of the last 5 epochs: (4 × 50 + 30) / 5 = 46% for seed 0
    assert (
        "| segnet, BN, batch 1, lr 0.02 | 0, 1 | 25.00 (30.00 / 20.00) | 45.00 (46.00 / 44.00) |"
    ) in section
    assert "| segnet, AGC, batch 8, lr 0.64 | 1 (running); 0 diverged | 30.00 (30.00) |" in section
    assert "Means over 2 seeds." in table


def test_runs_of_several_sweeps_gather_into_one_table(tmp_path):
    run = tmp_path / "outputs" / "run"
    run.mkdir(parents=True)
    OmegaConf.save(compose(["seed=1"]), run / "config.yaml", resolve=True)
    (run / "summary.json").write_text(json.dumps({"status": "finished"}))
    (run / "metrics.csv").write_text("epoch,val_pixel_error\n1,0.5\n")
    earlier = tmp_path / "seed0" / "runs.csv"
    write_runs_csv([{"run_name": "segnet-bn-synthetic-b4-lr0.08-s0-e150", "seed": 0, "epoch": 1,
                     "val_pixel_error": 0.4, "lambda_01": 0.9}], earlier)  # fmt: skip
    rows = gather_runs([earlier, tmp_path / "outputs"])
    write_runs_csv(rows, tmp_path / "all" / "runs.csv")
    runs = read_runs_csv(tmp_path / "all" / "runs.csv")
    assert sorted(runs) == [
        "segnet-bn-synthetic-b4-lr0.08-s0-e150",
        "segnet-bn-synthetic-b4-lr0.08-s1-e150",
    ]
    assert runs["segnet-bn-synthetic-b4-lr0.08-s0-e150"][0]["lambda_01"] == 0.9
    assert math.isnan(runs["segnet-bn-synthetic-b4-lr0.08-s1-e150"][0]["lambda_01"])
    with pytest.raises(
        ValueError, match="s0-e150 is in both .*seed0/runs.csv and .*seed0/runs.csv"
    ):
        gather_runs([earlier, earlier])
    (tmp_path / "bad.csv").write_text("epoch\n1\n")
    with pytest.raises(ValueError, match="bad.csv: expected a runs.csv with a run_name column"):
        gather_runs([tmp_path / "bad.csv"])
    # plot_fig1.py read it to a KeyError's traceback
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad.csv").rename(tmp_path / "bad" / "runs.csv")
    plot = [sys.executable, str(REPO / "scripts" / "plot_fig1.py")]
    not_collected = "no runs.csv; run scripts/collect_results.py first"
    for results, why in [("bad", "expected a runs.csv with a run_name column"),
                         ("none", not_collected)]:  # fmt: skip
        plotted = subprocess.run([*plot, str(tmp_path / results)], capture_output=True, text=True)
        assert plotted.returncode == 1 and "Traceback" not in plotted.stderr
        assert plotted.stderr == f"plot_fig1: {tmp_path / results / 'runs.csv'}: {why}\n"
    script = [sys.executable, str(REPO / "scripts" / "collect_results.py")]
    done = subprocess.run([*script, str(earlier), str(tmp_path / "none"), str(tmp_path / "out")],
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 1 and not (tmp_path / "out").exists()
    assert done.stderr.startswith("collect_results: ") and "none: no run directories" in done.stderr


def test_a_run_in_two_directories_of_one_folder_is_an_error_naming_both(tmp_path):
    # say the default widths in outputs/camvid and a wider net in outputs/camvid/wide: the
    # run names leave the width out, and the two runs' epochs would mix in one curve
    for folder in ("run", "wide/run"):
        run = tmp_path / folder
        run.mkdir(parents=True)
        OmegaConf.save(compose(), run / "config.yaml", resolve=True)
        (run / "metrics.csv").write_text("epoch,val_pixel_error\n1,0.5\n")
    with pytest.raises(ValueError, match=r"s0-e150 is in both .*/run and .*/wide/run; run names"):
        collect_runs(tmp_path)


def test_a_summary_that_is_not_json_is_named(tmp_path):
    OmegaConf.save(compose(), tmp_path / "config.yaml", resolve=True)
    (tmp_path / "summary.json").write_text('{"status": "finis')
    with pytest.raises(ValueError, match=r"summary.json: not valid JSON"):
        run_record(tmp_path)


def test_a_config_that_is_not_a_runs_is_named(tmp_path):
    (tmp_path / "config.yaml").write_text("run_name: [unclosed\n")  # was a YAML traceback
    with pytest.raises(ValueError, match=r"config.yaml: not the config.yaml of a training run "
                       r"\(while parsing a flow sequence"):  # fmt: skip
        run_record(tmp_path)
    (tmp_path / "config.yaml").write_text("lr: 0.1\n")  # another program's config
    with pytest.raises(ValueError, match=r"config.yaml: not the .* \(Missing key run_name"):
        run_record(tmp_path)


def test_lambda_figure_draws_a_settings_seeds_as_their_mean():
    def run(seed, lambdas, last_epoch=2):
        base = dict(model="segnet", norm="agc", batch_size=4.0, lr=0.08, seed=seed)
        return [{**base, "epoch": float(e), **{f"lambda_{i:02d}": v for i, v in
                 enumerate(lambdas, 1)}} for e in range(1, last_epoch + 1)]  # fmt: skip

    left = lambda_figure({"s0": run(0, [1.0, 0.8]), "s1": run(1, [0.9, 0.6], 3)}).axes[0]
    [line, guide] = left.get_lines()
    assert list(line.get_ydata()) == pytest.approx([0.95, 0.7])
    assert line.get_label() == "segnet, batch 4, lr 0.08 (2 seeds, epoch 2 to 3)"
