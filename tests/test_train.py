"""End to end: train(cfg) on the synthetic Cityscapes, determinism, resume, W&B offline, CLI."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, tf32_allowed, tiny_config, tiny_overrides
from omegaconf import OmegaConf

from deepcontrol.logging import RunLogger
from deepcontrol.losses import pixel_cross_entropy
from deepcontrol.models import build_model
from deepcontrol.provenance import code_version
from deepcontrol.results import read_metrics, run_record
from deepcontrol.train import (
    CODE_BEFORE,
    build_training,
    resolve_device,
    sgd,
    train,
    use_channels_last,
)

pytestmark = pytest.mark.slow

# Small enough for 2 CPU cores, large enough that SegNet's 2^5 pooling leaves a 2x4 map.
SIZE = ("data.height=64", "data.width=128")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache") / "synthetic-64x128"


def test_run_directory_holds_everything(synthetic_root, cache, tmp_path):
    cfg = tiny_config(synthetic_root, cache, *SIZE, "epochs=1")
    summary = train(cfg, tmp_path)
    assert summary["status"] == "finished" and summary["epochs_completed"] == 1
    assert {"config.yaml", "metrics.csv", "summary.json", "last.pt", "best.pt"} <= {
        p.name for p in tmp_path.iterdir()
    }
    [row] = read_metrics(tmp_path)
    assert row["samples_seen"] == 16 and row["lr"] == 0.08
    assert 0 <= row["val_pixel_error"] <= 1 and 0 <= row["val_miou"] <= 1
    assert {"train_loss", "val_loss", "iou_road", "iou_bicycle", "seconds"} <= set(row)
    saved = json.loads((tmp_path / "summary.json").read_text())
    model = build_model(cfg, num_classes=19)
    assert saved["num_parameters"] == sum(p.numel() for p in model.parameters()) == 1_845_747
    assert len(saved["class_weights"]) == 19
    assert "lr: 0.08" in (tmp_path / "config.yaml").read_text()  # the resolved lr is saved
    assert saved["code"] == [code_version()]
    state = torch.load(tmp_path / "last.pt", weights_only=False)
    assert state["epoch"] == 1 and set(state) >= {"model", "optimizer", "loader", "rng"}


@pytest.mark.parametrize("norm, lr", [("bn", 0.02), ("agc", 0.08)])
def test_validation_error_falls(synthetic_root, cache, tmp_path, norm, lr):
    # Batch 1, 16 steps an epoch. BN at the paper's lr rule (0.02 per sample); AGC at 0.08 per
    # sample, the rate of the paper's Fig. 1(h) (batch 8, lr 0.64), since from He init a net
    # with AGC starts with far smaller gradients than with BN (docs/notes.md).
    cfg = tiny_config(synthetic_root, cache, *SIZE, f"norm={norm}", "data.batch_size=1",
                      f"optim.lr={lr}", "epochs=5")  # fmt: skip
    summary = train(cfg, tmp_path)
    errors = [row["val_pixel_error"] for row in read_metrics(tmp_path)]
    assert summary["final_val_pixel_error"] == errors[-1]
    assert errors[-1] < errors[0] - 0.1, errors


@pytest.mark.parametrize(("precision", "tf32"), [("fp32", False), ("tf32", True)])
def test_the_run_sets_how_float32_convolutions_compute(
    synthetic_root, cache, tmp_path, float32_flags, precision, tf32
):
    """fp32 is the paper's float32 even where PyTorch's default would run cuDNN's
    convolutions in TF32; tf32 asks for TF32."""
    float32_flags(not tf32)
    cfg = tiny_config(synthetic_root, cache, *SIZE, "epochs=1", f"train.precision={precision}")
    summary = train(cfg, tmp_path)
    assert summary["status"] == "finished" and summary["tf32"] is tf32  # the run says which
    assert tf32_allowed() == [tf32, tf32]


def test_same_seed_same_metrics_and_resume_after_sigterm_matches(
    synthetic_root, cache, tmp_path, monkeypatch
):
    # batch 1: 16 steps an epoch, so the stop (checked every 10 steps) lands mid-epoch
    cfg = tiny_config(synthetic_root, cache, *SIZE, "norm=agc", "data.hflip=true",
                      "data.batch_size=1")  # fmt: skip
    train(cfg, tmp_path / "a")
    train(cfg, tmp_path / "b")

    calls = []

    def loss_then_sigterm(logits, labels, weights):
        if torch.is_grad_enabled():
            calls.append(1)
            if len(calls) == 19:  # epoch 2, step 3
                os.kill(os.getpid(), signal.SIGTERM)
        return pixel_cross_entropy(logits, labels, weights)

    with monkeypatch.context() as patch:
        patch.setattr("deepcontrol.losses.pixel_cross_entropy", loss_then_sigterm)
        stopped = train(cfg, tmp_path / "c")
    assert stopped["status"] == "interrupted" and stopped["signal"] == signal.SIGTERM
    assert json.loads((tmp_path / "c" / "summary.json").read_text())["status"] == "interrupted"
    state = torch.load(tmp_path / "c" / "last.pt", weights_only=False)
    assert state["epoch"] == 1 and state["loader"]["position"] == 10 and state["running"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is taken down
    assert train(cfg, tmp_path / "c")["status"] == "finished"  # the same command again

    def comparable(run):  # NaN (IoU of a class never seen) compared as a string
        rows = read_metrics(run)
        return [{k: str(v) for k, v in row.items() if k != "seconds"} for row in rows]

    assert comparable(tmp_path / "a") == comparable(tmp_path / "b")
    assert comparable(tmp_path / "a") == comparable(tmp_path / "c")
    assert "lambda_01" in read_metrics(tmp_path / "a")[0]  # λ per AGC layer, each epoch


def test_a_signal_during_validation_stops_after_the_epoch(
    synthetic_root, cache, tmp_path, monkeypatch
):
    cfg = tiny_config(synthetic_root, cache, *SIZE, "norm=agc")
    train(cfg, tmp_path / "a")
    sent = []

    def sigterm_in_validation(logits, labels, weights):
        if not torch.is_grad_enabled() and not sent:
            sent.append(os.kill(os.getpid(), signal.SIGTERM))
        return pixel_cross_entropy(logits, labels, weights)

    with monkeypatch.context() as patch:
        patch.setattr("deepcontrol.losses.pixel_cross_entropy", sigterm_in_validation)
        assert train(cfg, tmp_path / "b")["status"] == "interrupted"
    state = torch.load(tmp_path / "b" / "last.pt", weights_only=False)
    assert state["epoch"] == 1 and state["loader"]["position"] == 0
    assert train(cfg, tmp_path / "b")["status"] == "finished"
    drop = ("seconds",)
    rows = [[{k: str(v) for k, v in r.items() if k not in drop} for r in read_metrics(tmp_path / d)]
            for d in ("a", "b")]  # fmt: skip
    assert rows[0] == rows[1]


def killed_after_the_checkpoint(self: RunLogger, summary: dict) -> None:
    """Stands in for ``RunLogger.write_summary``: the process dies right after epoch 1's
    checkpoint."""
    raise KeyboardInterrupt


def test_a_crash_after_a_checkpoint_resumes(synthetic_root, cache, tmp_path, monkeypatch):
    cfg = tiny_config(synthetic_root, cache, *SIZE)
    train(cfg, tmp_path / "a")
    with monkeypatch.context() as patch:
        patch.setattr(RunLogger, "write_summary", killed_after_the_checkpoint)
        with pytest.raises(KeyboardInterrupt):
            train(cfg, tmp_path / "b")
    assert torch.load(tmp_path / "b" / "last.pt", weights_only=False)["epoch"] == 1
    train(cfg, tmp_path / "b")
    assert (tmp_path / "a" / "metrics.csv").read_text().count("\n") == 3
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in read_metrics(tmp_path / "a")]
    again = [{k: v for k, v in r.items() if k != "seconds"} for r in read_metrics(tmp_path / "b")]
    assert str(strip) == str(again)


def test_a_checkpoint_that_cannot_resume_the_run_is_named(
    synthetic_root, cache, tmp_path, monkeypatch
):
    cfg = tiny_config(synthetic_root, cache, *SIZE)
    with monkeypatch.context() as patch:
        patch.setattr(RunLogger, "write_summary", killed_after_the_checkpoint)
        with pytest.raises(KeyboardInterrupt):
            train(cfg, tmp_path)
    last = tmp_path / "last.pt"
    shutil.copy(tmp_path / "best.pt", last)  # weights only: was a KeyError 'optimizer'
    with pytest.raises(RuntimeError, match=r"last.pt: not a checkpoint to resume from \(no "
                       r"optimizer, loader, rng; best.pt holds weights only\)"):  # fmt: skip
        train(cfg, tmp_path)
    last.write_bytes(b"garbage")  # was "invalid literal for int()", naming no file
    with pytest.raises(RuntimeError, match=r"last.pt: cannot read this checkpoint \(\w+Error"):
        train(cfg, tmp_path)


def test_the_summary_names_every_code_version_that_trained_the_run(
    synthetic_root, cache, tmp_path, monkeypatch
):
    """A run resumed under other code says so: the versions in the order they trained, one
    more each time the code changed; one whose summary (of older code) names none starts
    its list with that."""
    cfg = tiny_config(synthetic_root, cache, *SIZE, "epochs=5")
    write_summary = RunLogger.write_summary

    def code_after(commit: str, crash: bool = True) -> list[str]:
        """Train under ``commit`` for an epoch (or to the end), then the summary's code."""

        def killed(self, summary):  # the process dies right after the epoch's summary
            write_summary(self, summary)
            raise KeyboardInterrupt

        with monkeypatch.context() as patch:
            patch.setenv("DEEPCONTROL_COMMIT", commit)
            if crash:
                patch.setattr(RunLogger, "write_summary", killed)
                with pytest.raises(KeyboardInterrupt):
                    train(cfg, tmp_path)
            else:
                assert train(cfg, tmp_path)["status"] == "finished"
        return json.loads((tmp_path / "summary.json").read_text())["code"]

    assert code_after("aaa") == ["aaa"]
    assert code_after("aaa") == ["aaa"]  # epoch 2, same code
    assert code_after("bbb") == ["aaa", "bbb"]
    assert run_record(tmp_path)["code"] == "aaa then bbb"
    assert code_after("aaa") == ["aaa", "bbb", "aaa"]  # back to the first code
    summary = json.loads((tmp_path / "summary.json").read_text())
    del summary["code"]  # as code before this change wrote it
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    assert code_after("aaa", crash=False) == [CODE_BEFORE, "aaa"]
    assert len(read_metrics(tmp_path)) == 5


def test_compiled_training_matches_eager_and_saves_the_plain_network(
    synthetic_root, cache, tmp_path, compile_stand_in
):
    """train.compile (on a stand-in compiler): one static graph per batch size (the last
    batch of an epoch is smaller), validation on the uncompiled network between epochs, and
    checkpoints without torch.compile's key prefix."""
    runs = {}
    for mode in ("false", "default"):  # 16 images at batch 6: the last batch has 4
        cfg = tiny_config(synthetic_root, cache, *SIZE, "norm=agc", "data.batch_size=6",
                          f"train.compile={mode}")  # fmt: skip
        assert train(cfg, tmp_path / mode)["status"] == "finished"
        runs[mode] = read_metrics(tmp_path / mode)
    # batches of 6 and of 4, each its own graph with static shapes, which is what the
    # benchmark times; by default the second size would make a dynamic graph, which then
    # serves every later batch too
    assert compile_stand_in == [False, False]
    for eager, compiled in zip(runs["false"], runs["default"], strict=True):
        for key in ("train_loss", "val_loss", "val_pixel_error"):
            assert compiled[key] == pytest.approx(eager[key], rel=1e-5), key
    saved = torch.load(tmp_path / "default" / "last.pt", weights_only=False)["model"]
    assert saved.keys() == build_model(cfg, num_classes=19).state_dict().keys()


@pytest.mark.cuda
def test_cuda_graphed_training_matches_eager(synthetic_root, cache, tmp_path):
    """train.cuda_graph: 16 images at batch 3 end each epoch with a batch of 1, whose graph
    is recorded in epoch 4, after its 3 eager steps; validation and checkpoints between."""
    runs = {}
    for graphed in ("false", "true"):
        cfg = tiny_config(synthetic_root, cache, *SIZE, "device=cuda", "norm=agc",
                          "data.batch_size=3", "epochs=4", "train.cudnn_benchmark=false",
                          f"train.cuda_graph={graphed}")  # fmt: skip
        assert train(cfg, tmp_path / graphed)["status"] == "finished"
        runs[graphed] = read_metrics(tmp_path / graphed)
    assert len(runs["true"]) == 4
    for eager, graphed in zip(runs["false"], runs["true"], strict=True):
        for key in ("train_loss", "val_loss", "val_pixel_error"):
            assert graphed[key] == pytest.approx(eager[key], rel=1e-4), key


def test_finished_run_is_not_trained_again(synthetic_root, cache, tmp_path):
    cfg = tiny_config(synthetic_root, cache, *SIZE, "epochs=1")
    first = train(cfg, tmp_path)
    before = (tmp_path / "metrics.csv").read_text()
    assert train(cfg, tmp_path) == json.loads((tmp_path / "summary.json").read_text()) == first
    assert (tmp_path / "metrics.csv").read_text() == before
    # nor is one made before optim.mean_scale_lr_mult existed: it ran at the default, 1
    saved = OmegaConf.load(tmp_path / "config.yaml")
    del saved.optim["mean_scale_lr_mult"]
    OmegaConf.save(saved, tmp_path / "config.yaml")
    assert train(cfg, tmp_path) == first
    assert (tmp_path / "metrics.csv").read_text() == before


def test_a_run_being_trained_elsewhere_is_left_alone(synthetic_root, cache, tmp_path):
    from deepcontrol.locks import exclusive_lock

    cfg = tiny_config(synthetic_root, cache, *SIZE, "epochs=1")
    with exclusive_lock(tmp_path / ".lock") as held:  # as another process would hold it
        assert held
        assert train(cfg, tmp_path)["status"] == "busy"
        assert [p.name for p in tmp_path.iterdir()] == [".lock"]
    assert train(cfg, tmp_path)["status"] == "finished"


def test_divergence_is_recorded_not_raised(synthetic_root, cache, tmp_path):
    summary = train(tiny_config(synthetic_root, cache, *SIZE, "optim.lr=1e30"), tmp_path)
    assert summary["status"] == "diverged" and summary["diverged_epoch"] == 1
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "diverged"


def wandb_history(path: Path, wait_s: float = 60.0) -> list[dict]:
    """The history rows of an offline W&B run file, once W&B has written all of it.

    The file is a LevelDB-style log (32 KiB blocks of records with a 7-byte header: crc,
    length, type) after a 7-byte ':W&B' header; each record is a protobuf ``Record``. W&B's
    service process writes it, and may still be writing when ``wandb.finish`` has returned
    (seen in about one full test run in four), so this waits for its last record, ``exit``.
    """
    deadline = time.monotonic() + wait_s
    while True:
        rows, complete = _wandb_records(path)
        if complete or time.monotonic() > deadline:
            assert complete, f"{path}: W&B wrote no exit record within {wait_s} s"
            return rows
        time.sleep(0.2)


def _wandb_records(path: Path) -> tuple[list[dict], bool]:
    """The history rows in ``path`` so far, and whether its ``exit`` record is there."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    rows, pos, block, pending, complete = [], 7, 32768, b"", False
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        if pos + 7 + length > len(data):  # a record still being written
            break
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk  # full/first, middle/last
        if kind not in (1, 4):
            continue
        record = wandb_internal_pb2.Record()
        record.ParseFromString(pending)
        complete |= record.WhichOneof("record_type") == "exit"
        if record.WhichOneof("record_type") == "history":
            items = record.history.item
            rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in items})
    return rows, complete


def test_wandb_offline_run_holds_the_history(synthetic_root, cache, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "")  # no credentials: auto must fall back to offline
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    cfg = tiny_config(synthetic_root, cache, *SIZE, "logger=wandb", "epochs=2")
    assert cfg.logger.mode == "auto"
    train(cfg, tmp_path / "run")
    [history] = (tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb")
    logged = wandb_history(history)
    expected = read_metrics(tmp_path / "run")
    logged = [row for row in logged if "epoch" in row]  # wandb may add rows of its own
    assert [r["epoch"] for r in logged] == [1, 2], logged
    for got, want in zip(logged, expected, strict=True):
        assert got["samples_seen"] == want["samples_seen"]
        assert got["val_pixel_error"] == pytest.approx(want["val_pixel_error"])


def test_command_line_entry_point(synthetic_root, cache, tmp_path):
    command = [
        sys.executable, "-m", "deepcontrol.train", *tiny_overrides(synthetic_root, cache), *SIZE,
        "epochs=1", "data.batch_size=8", f"hydra.run.dir={tmp_path}",
    ]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "val pixel error" in result.stderr + result.stdout
    assert "lr: 0.16" in (tmp_path / "config.yaml").read_text()
    assert (tmp_path / ".hydra" / "overrides.yaml").is_file()


def test_a_directory_of_other_settings_is_refused(synthetic_root, cache, tmp_path):
    train(tiny_config(synthetic_root, cache, *SIZE, "epochs=1"), tmp_path)
    other = tiny_config(synthetic_root, cache, *SIZE, "epochs=1", "model.init=identity")
    with pytest.raises(
        ValueError,
        match=r"config.yaml: this directory holds a run with other"
        r".*'model.init': \('he', 'identity'\).*one hydra.sweep.dir per value",
    ):
        train(other, tmp_path)
    # logging, progress and speed settings may change between a run and its resumption
    same = tiny_config(synthetic_root, cache, *SIZE, "epochs=1", "train.progress=true",
                       "train.cudnn_benchmark=false")  # fmt: skip
    assert train(same, tmp_path)["status"] == "finished"
    best = torch.load(tmp_path / "best.pt", weights_only=False)  # weights, no optimiser
    assert best["epoch"] == 1 and "model" in best and "optimizer" not in best


@pytest.mark.parametrize(
    ("override", "message"),
    [("train.precision=fp16", "train.precision must be one of fp32, tf32, bf16, got 'fp16'"),
     ("epochs=0", "epochs must be a positive integer, got 0"),
     ("seed=abc", r"seed must be an integer from 0 to 2\*\*32 - 1, got 'abc'"),
     ("seed=-1", r"seed must be an integer from 0 to 2\*\*32 - 1, got -1"),
     ("optim.mean_scale_lr_mult=-1", "optim.mean_scale_lr_mult must be a number >= 0, got -1"),
     # PyTorch's SGD trained on with these two, and named neither setting for abc
     ("optim.lr=nan", "optim.lr must be a number >= 0, got nan"),
     ("optim.momentum=1.5", "optim.momentum must be a number from 0 to below 1, got 1.5"),
     ("optim.momentum=abc", "optim.momentum must be a number from 0 to below 1, got 'abc'"),
     ("optim.weight_decay=-1", "optim.weight_decay must be a number >= 0, got -1"),
     # these two read as true, being non-empty strings
     ("train.resume=maybe", "train.resume must be true or false, got 'maybe'"),
     ("norm.sync=yes", "norm.sync must be true or false, got 'yes'"),
     ("train.cuda_graph=true", "train.cuda_graph=true needs a CUDA device, got device=cpu"),
     # these failed after the data and the network were built, or not at all: a misspelt
     # logger.name logged to no W&B, and a string of tags was one tag a character
     ("logger=wandb logger.mode=abc",
      "logger.mode must be one of auto, online, offline, disabled, got 'abc'"),
     ("logger=wandb logger.tags=abc",
      r"logger.tags must be a list of strings, such as \[a,b\], got 'abc'"),
     ("logger.name=wnadb", "logger.name must be none or wandb, got 'wnadb'")],
)  # fmt: skip
def test_a_bad_setting_read_late_is_refused_before_the_run_directory(
    synthetic_root, cache, tmp_path, override, message
):
    # fp16 used to fail at the first step, after config.yaml was written, and then the
    # corrected command was refused as "a run with other settings"; epochs=0 "finished"
    cfg = tiny_config(synthetic_root, cache, *SIZE, *override.split())
    with pytest.raises(ValueError, match=message):
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_run_that_failed_as_it_started_does_not_block_other_settings(
    synthetic_root, cache, tmp_path, monkeypatch
):
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    with monkeypatch.context() as patch:
        patch.setattr("deepcontrol.train.train_one_epoch", out_of_memory)
        with pytest.raises(torch.OutOfMemoryError):
            train(tiny_config(synthetic_root, cache, *SIZE, "epochs=1"), tmp_path)
    assert (tmp_path / "config.yaml").is_file() and not (tmp_path / "last.pt").exists()
    smaller = tiny_config(synthetic_root, cache, *SIZE, "epochs=1", "model.init=identity")
    assert train(smaller, tmp_path)["status"] == "finished"
    assert "init: identity" in (tmp_path / "config.yaml").read_text()


def test_sgd_refuses_what_training_refuses_when_called_directly():
    # make bench and the record scripts call sgd() without training's check_settings
    model = torch.nn.Conv2d(1, 1, 1)
    with pytest.raises(ValueError, match="optim.momentum must be a number from 0 to below 1"):
        sgd(model, lr=0.1, momentum=1.0)
    with pytest.raises(ValueError, match="optim.lr must be a number >= 0, got inf"):
        sgd(model, lr=float("inf"), momentum=0.9)
    assert sgd(model, lr=0.0, momentum=0).param_groups[0]["lr"] == 0.0


def test_an_unknown_device_is_named():
    with pytest.raises(ValueError, match="device must be auto, cpu, cuda or cuda:N, got 'tpu'"):
        resolve_device("tpu")


def test_channels_last_is_auto_on_cuda_only_and_a_bad_value_is_named():
    assert use_channels_last("auto", torch.device("cuda")) is True
    assert use_channels_last("auto", torch.device("cpu")) is False
    assert use_channels_last(True, torch.device("cpu")) is True
    with pytest.raises(ValueError, match="train.channels_last must be true, false or auto"):
        use_channels_last("yes", torch.device("cpu"))


def test_build_training_seeds_first_so_one_config_gives_one_network(synthetic_root, cache):
    cfg = tiny_config(synthetic_root, cache, *SIZE)
    first = build_training(cfg, torch.device("cpu"))
    torch.rand(1000)  # whatever ran before must not change the run's initial weights
    second = build_training(cfg, torch.device("cpu"))
    reseeded = tiny_config(synthetic_root, cache, *SIZE, "seed=1")
    other_seed = build_training(reseeded, torch.device("cpu"))
    runs = (first, second, other_seed)
    weights = [run.model.state_dict()["encoder.0.0.0.weight"] for run in runs]
    assert torch.equal(weights[0], weights[1]) and not torch.equal(weights[0], weights[2])
    assert first.optimizer.param_groups[0]["lr"] == cfg.optim.lr
    assert first.data.num_classes == 19 and first.data.train.num_samples == 16
