"""The benchmark's code paths on the CPU, and its verdicts on known numbers."""

import json
import math
import os
import re
import subprocess
import sys
import time
from dataclasses import replace

import pytest
import torch
from conftest import REPO, tf32_allowed

from deepcontrol import benchmark
from deepcontrol.benchmark import Config, figure1_cost, run_benchmark, targets, write_report
from deepcontrol.engine import sgd_step
from deepcontrol.nn import AutoGainControl2d
from deepcontrol.provenance import code_version

pytestmark = pytest.mark.slow


def cpu_config(**changes) -> Config:
    """A grid small enough for the CPU: SegNet with AGC and no norm at batch 1, fp32 eager,
    one step after none, with ``changes``."""
    small = Config(height=32, width=64, batches=(1,), norms=("agc", "none"),
                   precisions=("fp32",), modes=("eager",), warmup=0, steps=1, val_batch=2,
                   memory_cap_gib=None, loop_steps=2, loop_rounds=1,
                   networks=("segnet",))  # fmt: skip
    return replace(small, **changes)


def test_reduced_benchmark_runs_and_writes_its_report(tmp_path):
    cfg = cpu_config(batches=(1, 2), norms=Config.norms, networks=Config.networks, warmup=1,
                     steps=2, val_batch=3)  # fmt: skip
    report = run_benchmark(cfg, torch.device("cpu"))
    # SegNet's bn, agc, agc-naive and none at 2 batches; ClassNet's bn and agc at batch 4,
    # where Figure 1 trains it
    networks = [(r["network"], r["batch"]) for r in report["steps"]]
    assert networks == [("segnet", 1)] * 4 + [("segnet", 2)] * 4 + [("classnet", 4)] * 2
    assert all(r["ms_per_step"] > 0 and not r["error"] for r in report["steps"])
    validation = {(r["network"], r["norm"], r["batch"]) for r in report["validation"]}
    assert validation == {(n, norm, 3) for n in ("segnet", "classnet") for norm in ("bn", "agc")}
    assert all(r["ms_per_step"] > 0 and not r["error"] for r in report["validation"])
    assert all(loop["ratio"] > 0 for loop in report["loop"]) and report["targets"] == []
    write_report(report, tmp_path, "pytest")
    text = (tmp_path / "benchmark.md").read_text()
    assert "| segnet | fp32 | eager | 2 | agc-naive |" in text and "Targets: not assessed" in text
    assert "| classnet | fp32 | eager | 4 | agc |" in text
    assert "| classnet | fp32 | 3 | agc |" in text  # the validation forwards
    assert "Precisions: fp32 is float32 proper (TF32 off), tf32 float32 with" in text
    environment = json.loads((tmp_path / "benchmark.json").read_text())["environment"]
    assert environment["device"] == "cpu"
    assert environment["code"] == code_version()  # the code measured (tests/test_provenance.py)


def test_the_norms_beyond_the_paper_are_timed_when_asked(tmp_path):
    norms = ("gn", "in", "agc-window", "agc-median")
    report = run_benchmark(cpu_config(norms=norms), torch.device("cpu"))
    assert [(r["norm"], r["error"]) for r in report["steps"]] == [(n, "") for n in norms]
    command = [sys.executable, str(REPO / "scripts" / "benchmark.py"), "--norms", "bn", "ln"]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 2 and "--norms: invalid choice: 'ln'" in done.stderr


@pytest.mark.parametrize(
    "args, message",
    [(["--time-limit", "-5"], "argument --time-limit: must be 0 or more seconds, got '-5'"),
     (["--profile", "agc", "0", "bf16", "eager"], "BATCH must be a positive integer, got '0'"),
     (["--profile", "ln", "8", "bf16", "eager"], "NORM must be one of agc, agc-median, "),
     (["--profile", "agc", "8", "fp16", "eager"], "PRECISION must be one of fp32, tf32, bf16"),
     (["--profile", "agc", "8", "bf16", "fast"], "MODE must be one of eager, compile, ")],
)  # fmt: skip
def test_bad_arguments_are_usage_errors_before_anything_runs(args, message, tmp_path):
    # a GPU's lease is short: batch 0 profiled empty steps, a bad mode was a KeyError's
    # traceback after the network was built, and a negative limit measured nothing
    script = REPO / "scripts" / "benchmark.py"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    done = subprocess.run([sys.executable, str(script), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert not (tmp_path / "outputs").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU's reduced grid")
def test_the_reduced_grid_never_writes_into_results(tmp_path):
    # make bench on a laptop used to replace the GPU report committed in results/
    script = REPO / "scripts" / "benchmark.py"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    done = subprocess.run([sys.executable, str(script), "--time-limit", "0"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "into outputs/benchmark-reduced" in done.stdout
    report = json.loads((tmp_path / "outputs/benchmark-reduced/benchmark.json").read_text())
    assert report["environment"]["device"] == "cpu"
    assert not (tmp_path / "results").exists()


def fake_report(ms: dict, peak: dict, loop_ratio: float = 0.95, val_ms: dict | None = None) -> dict:
    """A report of step times ``ms`` keyed (norm, batch, mode) for SegNet or (network, norm,
    batch, mode), and validation times ``val_ms`` keyed (network, norm)."""
    steps = [{"network": net, "norm": n, "batch": b, "precision": "bf16", "mode": m,
              "ms_per_step": t, "images_per_s": 1000 * b / t,
              "peak_gib": peak.get((n, b), math.nan), "error": ""}
             for key, t in ms.items()
             for net, n, b, m in [key if len(key) == 4 else ("segnet", *key)]]  # fmt: skip
    validation = [{"network": net, "norm": n, "batch": 16, "precision": "bf16",
                   "mode": "eager", "ms_per_step": t, "images_per_s": 16000 / t, "error": ""}
                  for (net, n), t in (val_ms or {}).items()]  # fmt: skip
    config = {"precisions": ["bf16"], "modes": ["eager", "compile", "cudagraphs"],
              "memory_cap_gib": 12.0}  # fmt: skip
    return {"config": config, "steps": steps, "validation": validation,
            "max_batch_under_cap": {"bn": 10, "agc": 14},
            "loop": [{"norm": "agc", "batch": 8, "mode": "eager",
                      "ratio": loop_ratio}]}  # fmt: skip


def test_steps_are_timed_back_to_back_on_the_host_clock_off_a_gpu():
    calls = []

    def work():
        calls.append(None)
        time.sleep(0.002)

    times = benchmark.step_times(work, 5, torch.device("cpu"))
    assert len(calls) == len(times) == 5
    assert all(2.0 <= t < 1000 for t in times)


def test_steps_are_timed_back_to_back_on_a_gpu_waiting_only_after_the_last(monkeypatch):
    """Training never waits for the device between steps, so neither does the timing: one
    event between consecutive steps, and one wait, for the last."""
    log = []

    class Event:  # a CUDA event whose clock is the order of the calls
        def __init__(self, enable_timing):
            assert enable_timing

        def record(self):
            self.at = len(log)
            log.append("record")

        def synchronize(self):
            log.append("wait")

        def elapsed_time(self, end):
            return float(end.at - self.at)

    monkeypatch.setattr(torch.cuda, "Event", Event)
    times = benchmark.step_times(lambda: log.append("step"), 3, torch.device("cuda"))
    assert log == ["record", "step", "record", "step", "record", "step", "record", "wait"]
    assert times == [2.0, 2.0, 2.0]  # each step's time runs from one event to the next


def test_targets_are_judged_from_the_measured_ratios():
    ms = {}
    for b, scale in ((1, 1.0), (4, 2.0), (8, 4.0)):
        ms |= {("none", b, "eager"): 10 * scale, ("agc", b, "eager"): 10.5 * scale,
               ("bn", b, "eager"): 15 * scale, ("none", b, "compile"): 9 * scale,
               ("agc", b, "compile"): 9.5 * scale, ("bn", b, "compile"): 11 * scale,
               ("agc", b, "cudagraphs"): 3 * scale if b == 1 else 9.5 * scale,
               ("bn", b, "cudagraphs"): 4 * scale if b == 1 else 11 * scale}  # fmt: skip
    peak = {("agc", 1): 1.0, ("bn", 1): 1.5, ("agc", 8): 2.5, ("bn", 8): 2.9}
    verdicts = {
        t["target"]: (t["value"] and round(t["value"], 3), t["met"])
        for t in targets(fake_report(ms, peak))
    }
    assert verdicts["batch 8, eager: AGC step / no-norm floor"] == (1.05, True)
    assert verdicts["batch 1, compile: AGC step / no-norm floor"] == (round(9.5 / 9, 3), True)
    assert verdicts["batch 1, cudagraphs: AGC step / no-norm floor"] == (None, False)
    assert verdicts["batch 8: AGC throughput / eager BN"] == (round(60 / 38, 3), True)
    assert verdicts["batch 8: AGC throughput / best BN"] == (round(44 / 38, 3), True)
    assert verdicts["batch 8: AGC peak memory / BN (eager)"] == (round(2.5 / 2.9, 3), False)
    assert verdicts["batch 1, bn: best throughput / eager"] == (3.75, True)
    assert verdicts["largest batch under 12.0 GiB: AGC / BN"] == (1.4, True)
    assert verdicts["training loop / bare step, agc, batch 8, eager"] == (0.95, True)


def test_the_report_marks_a_target_not_yet_measured_as_such(tmp_path):
    """A report written part way through a run judges what it can; a target whose times
    are still missing is "not judged", not "no"."""
    report = fake_report({("agc", 8, "eager"): 10.5, ("none", 8, "eager"): 10.0}, {})
    report |= {"environment": {"device": "a test"}, "loop": [], "reused_steps": 0,
               "unmeasured": [], "figure1_cost": [], "pending": ["bn 8 bf16 eager"]}  # fmt: skip
    report["config"] |= {"height": 256, "width": 512, "steps": 30, "warmup": 10}
    report["targets"] = targets(report)
    write_report(report, tmp_path, "pytest")
    text = (tmp_path / "benchmark.md").read_text()
    assert "| batch 8, eager: AGC step / no-norm floor | 1.050 | 1.1 | yes |" in text
    assert "| batch 8: AGC throughput / eager BN | — | 1.3 | not judged |" in text
    assert "Still to measure: bn 8 bf16 eager." in text


def test_the_committed_gpu_report_is_what_its_measurements_say(tmp_path):
    """results/benchmark.md and the verdicts in its JSON are what the code makes of the
    JSON's measurements, so no number or verdict in the committed report was edited by
    hand. A change to how reports are judged or written must write the report again."""
    saved = REPO / "results" / "benchmark.json"
    if not saved.is_file():
        pytest.skip("no GPU report is committed in results/")
    report = json.loads(saved.read_text())
    markdown = (REPO / "results" / "benchmark.md").read_text()
    command = re.search(r"^Command: `(.+)`$", markdown, re.MULTILINE)
    assert command, "results/benchmark.md names no command"
    assert report["targets"] == targets(report)
    costs = [c for p in report["config"]["precisions"] if (c := figure1_cost(report, p))]
    assert report["figure1_cost"] == costs
    write_report(report, tmp_path, command[1])
    assert (tmp_path / "benchmark.md").read_text() == markdown


def test_figure1_runs_are_read_from_the_panels():
    # the paper's 12: BN and AGC at batches 1, 4, 8 (a, b; c and e are the batch-4 pair),
    # ClassNet's pair at batch 4 (d, f), BN at batch 8 also at lr 0.08 (g), AGC at batch 8
    # also at lr 0.08, 0.32 and 0.64 (h); 150 epochs each of Cityscapes' 2975 training and
    # 500 validation images
    runs = [
        ("segnet", "bn", 1, 1),
        ("segnet", "agc", 1, 1),
        ("segnet", "bn", 4, 1),
        ("segnet", "agc", 4, 1),
        ("classnet", "bn", 4, 1),
        ("classnet", "agc", 4, 1),
        ("segnet", "bn", 8, 2),
        ("segnet", "agc", 8, 4),
    ]  # (network, norm, batch, runs)
    expected = [(net, norm, batch, 150, 2975, 500, count) for net, norm, batch, count in runs]
    assert sorted(benchmark.figure1_run_counts()) == sorted(expected)


def test_figure1_cost_prices_each_run_at_its_own_network_and_norm():
    # SegNet steps: BN 10 ms, AGC 12 ms eager at every batch, and AGC 9 ms with CUDA graphs
    # at batch 8 (its best); ClassNet BN 4 ms, AGC 5 ms at batch 4. Validation: 32 forwards
    # of 16 images (the last one of 4), SegNet BN 30 ms, AGC 40 ms, ClassNet BN 12, AGC 11.
    ms = {(n, b, "eager"): t for n, t in (("bn", 10.0), ("agc", 12.0)) for b in (1, 4, 8)}
    ms |= {("agc", 8, "cudagraphs"): 9.0, ("classnet", "bn", 4, "eager"): 4.0,
           ("classnet", "agc", 4, "eager"): 5.0}  # fmt: skip
    val_ms = {("segnet", "bn"): 30.0, ("segnet", "agc"): 40.0,
              ("classnet", "bn"): 12.0, ("classnet", "agc"): 11.0}  # fmt: skip

    def seconds(step_ms: float, batch: int, val_ms: float) -> float:
        return 150 * (math.ceil(2975 / batch) * step_ms + 32 * val_ms) / 1000

    cost = figure1_cost(fake_report(ms, {}, val_ms=val_ms), "bf16")
    segnet = sum(seconds(10, b, 30) + seconds(12, b, 40) for b in (1, 4))
    segnet += 2 * seconds(10, 8, 30) + 4 * seconds(9, 8, 40)
    classnet = seconds(4, 4, 12) + seconds(5, 4, 11)
    assert cost["runs"] == 12
    assert cost["gpu_hours"] == pytest.approx((segnet + classnet) / 3600)
    agc8 = [r for r in cost["per_run"]
            if (r["network"], r["norm"], r["batch"]) == ("segnet", "agc", 8)]  # fmt: skip
    assert [(r["runs"], r["mode"], r["ms_per_step"]) for r in agc8] == [(4, "cudagraphs", 9.0)]
    assert agc8[0]["gpu_hours"] == pytest.approx(4 * seconds(9, 8, 40) / 3600)
    # a time that failed or went unmeasured: no cost, not a wrong one
    del val_ms[("classnet", "agc")]
    assert figure1_cost(fake_report(ms, {}, val_ms=val_ms), "bf16") is None
    val_ms[("classnet", "agc")] = 11.0
    del ms[("classnet", "agc", 4, "eager")]
    assert figure1_cost(fake_report(ms, {}, val_ms=val_ms), "bf16") is None


def test_figure1_cost_is_an_upper_bound_while_a_faster_mode_is_unmeasured(tmp_path):
    """A run priced at its eager step because its CUDA-graphed one has not been timed yet
    (an unfinished report) makes the total an upper bound, and the report says which."""
    ms = {(n, b, "eager"): 10.0 for n in ("bn", "agc") for b in (1, 4, 8)}
    ms |= {("classnet", n, 4, "eager"): 5.0 for n in ("bn", "agc")}
    val_ms = {(net, n): 10.0 for net in ("segnet", "classnet") for n in ("bn", "agc")}
    report = fake_report(ms, {}, val_ms=val_ms)
    assert not any(r["untimed_modes"] for r in figure1_cost(report, "bf16")["per_run"])
    report |= {"unmeasured": ["agc 4 bf16 cudagraphs", "agc 4 fp32 cudagraphs"],
               "pending": ["classnet bn 4 bf16 compile"]}  # fmt: skip
    cost = figure1_cost(report, "bf16")
    untimed = {(r["network"], r["norm"], r["batch"]): r["untimed_modes"] for r in cost["per_run"]}
    assert untimed.pop(("segnet", "agc", 4)) == ["cudagraphs"]
    assert untimed.pop(("classnet", "bn", 4)) == ["compile"]
    assert set(map(tuple, untimed.values())) == {()}

    report |= {"environment": {"device": "a test"}, "loop": [], "reused_steps": 0,
               "targets": targets(report), "figure1_cost": [cost]}  # fmt: skip
    report["config"] |= {"height": 256, "width": 512, "steps": 30, "warmup": 10,
                         "time_limit_s": 60.0}  # fmt: skip
    write_report(report, tmp_path, "pytest")
    text = (tmp_path / "benchmark.md").read_text()
    assert "target ≤ 4 H100-hours), an upper bound: a run's step in a mode" in text
    rows = [line for line in text.splitlines() if line.startswith("| segnet | agc | 4 | 1 |")]
    # 150 epochs of 744 steps and 32 validation forwards, 10 ms each: 0.32 h
    assert rows == ["| segnet | agc | 4 | 1 | eager | 10.00 | 0.32 | cudagraphs |"]


@pytest.mark.parametrize(("precision", "tf32"), [("fp32", False), ("tf32", True), ("bf16", False)])
def test_each_setting_computes_in_its_precisions_arithmetic(float32_flags, precision, tf32):
    """The step and the validation forward set float32's arithmetic as training does: the
    grid's fp32 is the paper's float32, not PyTorch's TF32 convolutions."""
    cfg, cpu = cpu_config(), torch.device("cpu")
    for work in (benchmark.training_step, benchmark.validation_pass):
        float32_flags(not tf32)
        work(benchmark.Setting("none", 1, precision, "eager"), cfg, cpu)
        assert tf32_allowed() == [tf32, tf32], work


def test_compiled_modes_run_only_where_the_targets_look():
    settings = Config().settings()
    segnet = [s for s in settings if s.network == "segnet"]
    compiled = [s for s in segnet if s.mode != "eager"]
    assert len(segnet) - len(compiled) == 4 * 4 * 2  # eager: every batch, norm, precision
    assert {(s.batch, s.precision) for s in compiled} == {
        (b, p) for b in (1, 4, 8) for p in ("bf16", "fp32")}  # fmt: skip
    assert {s.norm for s in compiled} == {"bn", "agc", "none"} and len(compiled) == 2 * 18
    # the two kinds of CUDA graphs; plain compile only on request
    assert {s.mode for s in compiled} == {"graphed", "cudagraphs"}
    # ClassNet: BN and AGC at Figure 1's batch 4, each precision, eager and CUDA-graphed
    classnet = {(s.norm, s.batch, s.precision, s.mode) for s in settings if s not in segnet}
    assert classnet == {(n, 4, p, m) for n in ("bn", "agc") for p in ("bf16", "fp32")
                        for m in ("eager", "graphed", "cudagraphs")}  # fmt: skip


def test_validation_is_timed_at_the_batch_training_validates_with():
    from deepcontrol.config import compose

    assert Config().val_batch == compose(["data=cityscapes"]).data.val_batch_size


def test_agc_variants_run_the_kernels_they_name():
    kernels = {
        norm: {m.kernels for m in benchmark.build(norm, torch.device("cpu")).modules()
               if isinstance(m, AutoGainControl2d)}
        for norm in ("agc", "agc-naive")
    }  # fmt: skip
    assert kernels == {"agc": {"auto"}, "agc-naive": {"reference"}}


def test_the_graphed_mode_takes_the_step_train_cuda_graph_takes(monkeypatch):
    """Its step is GraphedSGDStep's over torch.compile's model, in the grid and in the loop
    check; off CUDA that step refuses, and the setting records why."""
    monkeypatch.setattr(benchmark, "run_as", lambda model, mode: model)  # no compiling here
    setting = benchmark.Setting("agc", 1, "fp32", "graphed")
    for work in (benchmark.training_step, benchmark.training_loop):
        with pytest.raises(ValueError, match="train.cuda_graph needs the model on a CUDA"):
            work(setting, cpu_config(), torch.device("cpu"))
    eager = benchmark.mode_step(replace(setting, mode="eager"), torch.nn.Conv2d(3, 19, 1),
                                None, None)  # fmt: skip
    assert eager.func is sgd_step  # and every other mode takes sgd_step itself


def test_a_failing_setting_is_recorded_and_the_others_still_run(monkeypatch):
    real_build = benchmark.build

    def build(norm, *args, **kwargs):
        if norm == "agc":
            raise RuntimeError("triton compile failed\nsecond line")
        return real_build(norm, *args, **kwargs)

    monkeypatch.setattr(benchmark, "build", build)
    report = run_benchmark(cpu_config(), torch.device("cpu"))
    steps, loop = report["steps"], {row["norm"]: row for row in report["loop"]}
    validation = {row["norm"]: row for row in report["validation"]}
    assert validation["agc"]["error"].startswith("failed") and validation["bn"]["ms_per_step"] > 0
    assert steps[0]["error"] == "failed: RuntimeError: triton compile failed"
    assert math.isnan(steps[0]["ms_per_step"]) and steps[1]["ms_per_step"] > 0
    assert loop["agc"]["error"].startswith("failed") and math.isnan(loop["agc"]["ratio"])
    assert not loop["bn"]["error"] and loop["bn"]["ratio"] > 0


class Cut(Exception):
    """A job's time limit, arriving after some measurements were saved."""


def test_a_run_cut_short_goes_on_from_what_it_saved(monkeypatch, tmp_path, capsys):
    cfg = cpu_config(batches=(1, 2), val_batch=3)
    measured = []
    real_measure = benchmark.measure_step

    def counting(setting, *args, **kwargs):
        measured.append((setting.norm, setting.batch))
        return real_measure(setting, *args, **kwargs)

    monkeypatch.setattr(benchmark, "measure_step", counting)
    saved = []

    def save_then_cut(report):
        write_report(report, tmp_path, "pytest")  # as scripts/benchmark.py saves
        saved.append(json.loads((tmp_path / "benchmark.json").read_text()))
        if len(report["steps"]) == 3:
            raise Cut

    with pytest.raises(Cut):
        run_benchmark(cfg, torch.device("cpu"), save=save_then_cut)
    partial = saved[-1]
    # the targets' batch first, then the validation forwards (at 3 images), the loop check
    # (which times its bare steps itself), then the rest of the grid, where the cut came
    assert measured == [("agc", 1), ("none", 1), ("bn", 3), ("agc", 3), ("agc", 2)]
    assert not partial["complete"] and len(partial["steps"]) == 3 and len(partial["loop"]) == 2
    assert [len(report["pending"]) for report in saved] == [7, 6, 5, 4, 3, 2, 1]
    assert partial["pending"] == ["none 2 fp32 eager"] and partial["unmeasured"] == []
    # the report the killed run left: everything it measured, and what it had still to do
    text = (tmp_path / "benchmark.md").read_text()
    assert "| segnet | fp32 | eager | 2 | agc |" in text and "| agc | eager | 2 |" in text
    assert "| segnet | fp32 | eager | 2 | none |" not in text
    assert "was still going or was stopped there. Still to measure: none 2 fp32 eager." in text
    assert "median of 1 steps run back to back (as training runs them) after 0 warm-up" in text
    # a report from before the timing was recorded timed each step alone, and says no more
    write_report({k: v for k, v in partial.items() if k != "step_timing"}, tmp_path, "pytest")
    assert "median of 1 steps after 0 warm-up" in (tmp_path / "benchmark.md").read_text()
    capsys.readouterr()
    report = run_benchmark(cfg, torch.device("cpu"), previous=partial)
    assert measured[5:] == [("none", 2)]  # the one step timing the cut run did not take
    # the log says which rows were taken over, and what each new one cost
    log = capsys.readouterr().out.splitlines()
    assert len(log) == 8 and sum(line.endswith("(saved earlier)") for line in log) == 7
    assert re.search(r"^steps .* none 2 fp32 eager .*\(\d+ s\)$", log[-1])
    assert report["complete"] and report["reused_steps"] == 3 and report["loop"] == partial["loop"]
    assert report["pending"] == []
    assert report["validation"] == partial["validation"]
    assert [(r["norm"], r["batch"]) for r in report["steps"]] == [
        ("agc", 1), ("none", 1), ("agc", 2), ("none", 2)]  # fmt: skip
    # a finished report, or one measured another way or on other code, is measured again
    other_code = {**partial, "environment": {**partial["environment"], "code": "0123abcd"}}
    timed_alone = {k: v for k, v in partial.items() if k != "step_timing"}  # an older report
    tf32_convs = {k: v for k, v in partial.items() if k != "arithmetic"}  # fp32 in TF32
    for previous in (report, {**partial, "config": {**partial["config"], "height": 64}},
                     other_code, timed_alone, tf32_convs):  # fmt: skip
        del measured[:]
        run_benchmark(cfg, torch.device("cpu"), previous=previous)
        assert len(measured) == 6  # 4 step timings and 2 validations


def test_what_the_targets_and_figure1_read_is_measured_first():
    """The order a run cut short keeps: the first precision's eager steps at Figure 1's
    batches, its validation, the eager loop, the compiled steps at the targets' batch, the
    CUDA-graphed loop (a target too), the compiled steps at Figure 1's other batches
    (ClassNet first, whose host-bound eager step CUDA graphs change most); then the other
    precision's validation and the rest of the grid."""
    cfg = cpu_config(batches=(1, 4, 8), norms=("bn", "agc"), precisions=("bf16", "fp32"),
                     modes=("eager", "graphed", "cudagraphs"), compiled_batches=(1, 4),
                     compiled_precisions=("bf16",), compiled_norms=("agc",),
                     networks=("segnet", "classnet"))  # fmt: skip
    plans = []

    def save_then_cut(report):
        plans.append([*report["pending"]])
        raise Cut

    with pytest.raises(Cut):
        run_benchmark(cfg, torch.device("cpu"), save=save_then_cut)
    assert plans == [[
        "agc 1 bf16 eager", "bn 4 bf16 eager", "agc 4 bf16 eager", "bn 8 bf16 eager",
        "agc 8 bf16 eager", "classnet bn 4 bf16 eager", "classnet agc 4 bf16 eager",
        "validation bn 2 bf16 eager", "validation agc 2 bf16 eager",
        "validation classnet bn 2 bf16 eager", "validation classnet agc 2 bf16 eager",
        "the training-loop check, bn 8 bf16 eager", "the training-loop check, agc 8 bf16 eager",
        "agc 1 bf16 graphed", "agc 1 bf16 cudagraphs",
        "the training-loop check, bn 1 bf16 graphed",
        "the training-loop check, agc 1 bf16 graphed",
        "the training-loop check, bn 1 bf16 cudagraphs",
        "the training-loop check, agc 1 bf16 cudagraphs",
        "classnet bn 4 bf16 graphed", "classnet agc 4 bf16 graphed",
        "classnet bn 4 bf16 cudagraphs", "classnet agc 4 bf16 cudagraphs",
        "agc 4 bf16 graphed", "agc 4 bf16 cudagraphs",
        "validation bn 2 fp32 eager", "validation agc 2 fp32 eager",
        "validation classnet bn 2 fp32 eager", "validation classnet agc 2 fp32 eager",
        "bn 1 fp32 eager", "agc 1 fp32 eager", "bn 4 fp32 eager", "agc 4 fp32 eager",
        "bn 8 fp32 eager", "agc 8 fp32 eager", "classnet bn 4 fp32 eager",
        "classnet agc 4 fp32 eager",
    ]]  # fmt: skip


def test_the_loop_is_also_checked_with_cuda_graphs_at_batch_1(compile_stand_in):
    """Where each step is shortest, the loop's own host work has the least time to hide
    in. Its bare steps take the loop's own compiled step, on a batch shaped as the loop's:
    nothing is compiled for them. (A stand-in compiler replaces inductor and so CUDA
    graphs.)"""
    cfg = cpu_config(norms=("bn", "agc"), modes=("eager", "cudagraphs"), compiled_batches=(1,),
                     compiled_precisions=("fp32",), compiled_norms=("bn", "agc"), warmup=1,
                     steps=2)  # fmt: skip
    report = run_benchmark(cfg, torch.device("cpu"))
    assert compile_stand_in == [False] * 4  # the grid's two steps, the two loops
    loops = {(r["norm"], r["mode"]): r for r in report["loop"]}
    assert set(loops) == {(n, m) for n in ("bn", "agc") for m in ("eager", "cudagraphs")}
    for loop in loops.values():
        assert loop["ratio"] == pytest.approx(
            loop["loop_images_per_s"] / loop["bare_step_images_per_s"]
        )
        assert loop["ratio"] > 0 and not loop["error"]


def test_the_loop_and_its_bare_step_are_timed_alike_in_turn(monkeypatch):
    """After a warm-up epoch, bare steps and epochs alternate, each timed whole by the
    same clock, and each side's median is taken: a step whose time varies weighs on both."""
    calls, took = [], {"epoch": iter([5.0, 4.0, 9.0]), "bare_steps": iter([3.0, 8.0, 2.0])}

    class Loop:
        def epoch(self):
            calls.append("epoch")

        def bare_steps(self):
            calls.append("bare_steps")

    def seconds(work, device):
        work()
        return next(took[work.__name__])

    monkeypatch.setattr(benchmark, "seconds", seconds)
    loop_s, bare_s = benchmark.loop_and_bare_seconds(Loop(), cpu_config(loop_rounds=3), "cpu")
    assert calls == ["epoch"] + ["bare_steps", "epoch"] * 3
    assert (loop_s, bare_s) == (5.0, 3.0)


def test_the_bare_steps_are_as_many_as_an_epoch_trains_on_a_batch_like_its_own():
    setting = benchmark.Setting("agc", 2, "fp32", "eager")
    loop = benchmark.training_loop(setting, cpu_config(loop_steps=3), torch.device("cpu"))
    taken = []
    loop.step = lambda *batch, scale=None: taken.append((*batch, loop.model.training))
    loop.validate()  # which leaves the model in eval mode
    loop.bare_steps()
    assert all(training for *_, training in taken)
    taken = [batch[:3] for batch in taken]
    [(images, labels, contours)] = {tuple(map(id, batch)): batch for batch in taken}.values()
    assert len(taken) == 3 == len(loop.train)
    for bare, own in zip((images, labels, contours), next(iter(loop.train)), strict=True):
        if own is None:
            assert bare is None
        else:
            assert (bare.shape, bare.stride(), bare.dtype) == (own.shape, own.stride(), own.dtype)


def test_the_log_says_what_torch_compile_built_and_what_its_caches_had(tmp_path, monkeypatch):
    """The note on a measurement's log line, from torch.compile's own counters: a graph built
    into an empty cache, then the same graph compiled again after a reset, which Inductor's
    and AOTAutograd's caches (on disk, so a carried cache dir serves too) then hold."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    notes = []
    for _ in range(2):
        torch._dynamo.reset()
        before = benchmark.compile_counts()
        double_sine = torch.compile(lambda x: (x.sin() * 2).sum(), dynamic=False)
        double_sine(torch.randn(8, requires_grad=True)).backward()  # a forward and a backward
        notes.append(benchmark.compile_note(before, benchmark.compile_counts()))
    torch._dynamo.reset()
    assert notes == [
        "1 graph compiled, from the cache: Inductor 0 of 2, AOTAutograd 0 of 1",
        "1 graph compiled, from the cache: Inductor 2 of 2, AOTAutograd 1 of 1",
    ]
    assert benchmark.compile_note(before, before) == ""  # nothing compiled: no note
    # a cache that refused a graph says so; one that was not asked is left out
    after = {**before, "graphs": before["graphs"] + 2,
             "inductor_bypass": before["inductor_bypass"] + 4}  # fmt: skip
    assert benchmark.compile_note(before, after) == (
        "2 graphs compiled, from the cache: Inductor 0 of 4 (4 bypassed)"
    )
    after = {**before, "graphs": before["graphs"] + 1}  # a backend that is not Inductor
    assert benchmark.compile_note(before, after) == "1 graph compiled, no cache"


def test_past_the_time_limit_nothing_new_starts_and_a_rerun_goes_on(tmp_path):
    cfg = cpu_config(time_limit_s=0)
    report = run_benchmark(cfg, torch.device("cpu"))
    assert report["steps"] == [] and report["loop"] == [] and not report["complete"]
    assert report["unmeasured"] == ["agc 1 fp32 eager", "none 1 fp32 eager",
                                    "validation bn 2 fp32 eager", "validation agc 2 fp32 eager",
                                    "the training-loop check, bn 1 fp32 eager",
                                    "the training-loop check, agc 1 fp32 eager"]  # fmt: skip
    write_report(report, tmp_path, "pytest")
    text = (tmp_path / "benchmark.md").read_text()
    assert "Not measured, the time limit (0 s) having passed: agc 1 fp32 eager;" in text
    done = run_benchmark(replace(cfg, time_limit_s=None), torch.device("cpu"), previous=report)
    assert done["complete"] and done["unmeasured"] == [] and len(done["steps"]) == 2
    assert len(done["validation"]) == 2


def test_profile_says_where_a_step_spends_its_time():
    cfg = Config(height=32, width=64, warmup=1, steps=2)
    table = benchmark.profile_step(benchmark.Setting("agc", 1, "fp32", "eager"), cfg,
                                   torch.device("cpu"))  # fmt: skip
    assert "aten::convolution" in table and "Self CPU" in table
    assert "AGC layers' inputs: " in table
    assert table.endswith("No AGC Triton kernel ran on a device.")  # the reference, on a CPU


def test_agc_kernels_bandwidth_is_their_traffic_over_their_time():
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    cuda, cpu = DeviceType.CUDA, DeviceType.CPU
    kernels = [("_sums_kernel", 3000.0, cuda), ("_agc_relu_grad_kernel", 1500.0, cuda),
               ("aten::convolution", 9e9, cuda)]  # fmt: skip
    # torch.compile's host-side op for each launch: the same kernel's time again
    wrappers = [("_sums_kernel_0", 3000.0, cpu), ("_agc_relu_grad_kernel_1", 1500.0, cpu)]
    events = [SimpleNamespace(key=key, self_device_time_total=us, device_type=device)
              for key, us, device in kernels + wrappers]  # fmt: skip
    lines = benchmark.agc_kernel_bandwidth(events, activation_bytes=10**9, steps=3)
    # sums: 3 GB a step in 1 ms; the backward pass: 3 GB in 0.5 ms; the forward pass: absent
    assert lines == [
        "_sums_kernel: 1.000 ms per step for 3.000 GB, 3000 GB/s",
        "_agc_relu_grad_kernel: 0.500 ms per step for 3.000 GB, 6000 GB/s",
    ]


def test_agc_activation_bytes_scale_with_batch_and_precision():
    cfg, cpu = Config(height=32, width=64), torch.device("cpu")

    def activation_bytes(batch: int, precision: str) -> int:
        setting = benchmark.Setting("agc", batch, precision, "eager")
        return benchmark.agc_activation_bytes(setting, cfg, cpu)

    one, two, half = (
        activation_bytes(1, "fp32"),
        activation_bytes(2, "fp32"),
        activation_bytes(1, "bf16"),
    )
    assert one > 0 and two == 2 * one and half * 2 == one
