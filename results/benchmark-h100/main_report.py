"""Writes report-f57f8cf.md and .json (until the H200 run of 2026-11-27, ../benchmark.md and
.json) from run1-benchmark.json, the file the H100 run left when `timeout 420` stopped it: the
targets and Figure 1's cost from what it measured, and what it did not measure. Run from the
repository root."""

import json
import tempfile
from dataclasses import asdict
from pathlib import Path

from deepcontrol.benchmark import (
    PAPER_NORMS,
    Config,
    Setting,
    _key,
    _label,
    figure1_cost,
    targets,
    write_report,
)  # fmt: skip

HERE = Path("results/benchmark-h100")
report = json.loads((HERE / "run1-benchmark.json").read_text())
cfg = Config()  # the grid the run was measuring (its saved config is the same)
assert report["config"] == json.loads(json.dumps({**asdict(cfg), "time_limit_s": 360.0}))
measured = {_key(row) for row in report["steps"]}
report["unmeasured"] = [_label(s) for s in cfg.settings() if _key(asdict(s)) not in measured]
report["unmeasured"] += ["the training-loop check, " + _label(Setting(n, 1, "bf16", "cudagraphs"))
                         for n in PAPER_NORMS]  # fmt: skip
report["targets"] = targets(report)
report["figure1_cost"] = [c for p in cfg.precisions if (c := figure1_cost(report, p))]
with tempfile.TemporaryDirectory() as temporary:  # write_report names its files benchmark.*
    out = Path(temporary)
    write_report(
        report,
        out,
        "make bench PY=python3 BENCH_OUT=results "
        'BENCH_ARGS="--time-limit 360", stopped by `timeout 420` (results/benchmark-h100)',
    )
    text = (out / "benchmark.md").read_text()
    (HERE / "report-f57f8cf.json").write_text((out / "benchmark.json").read_text())
why = "Not measured, the time limit (360.0 s) having passed: "
ending = "Running the same command again goes on from here."
assert why in text and ending in text
text = text.replace(
    why,
    "Not measured, `timeout 420` having stopped the run in the "
    "CUDA-graphed training-loop check (the last measurement started before "
    "the 360 s limit): ",
)
(HERE / "report-f57f8cf.md").write_text(
    text.replace(
        ending,
        "The code has changed since (results/benchmark-h100/README.md), so running the "
        "command again measures afresh.",
    )
)
