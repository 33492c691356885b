"""DistributedDataParallel on the CPU (gloo, 2 processes) against one process."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, tiny_config, tiny_overrides
from torch import distributed as dist
from torch import multiprocessing as mp

from deepcontrol.data import build_data
from deepcontrol.distributed import init_distributed, unwrap, wrap_model
from deepcontrol.engine import evaluate, train_one_epoch
from deepcontrol.results import read_metrics
from deepcontrol.train import build_training, train

pytestmark = pytest.mark.slow

# global batch 4 over 2 processes. AGC couples no two samples, so DDP computes exactly what one
# process does (BN would need SyncBatchNorm, which PyTorch runs on GPUs only).
OVERRIDES = ("norm=agc", "data.batch_size=4", "epochs=1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_epoch(cfg, rank: int, world_size: int, out: Path) -> None:
    """Train one epoch and evaluate, as rank ``rank`` of ``world_size``; save what it ends with."""
    place, device = init_distributed(torch.device("cpu"))
    run = build_training(cfg, device, place.rank, place.world_size)
    model = wrap_model(run.model, place, cfg.norm.sync)
    stats = train_one_epoch(model, run.data.train, run.optimizer, run.loss_fn)
    metrics, _ = evaluate(unwrap(model), run.data.val, run.loss_fn, run.data.num_classes, "fp32")
    torch.save({"model": unwrap(model).state_dict(), **stats, **metrics}, out / f"rank{rank}.pt")


def ddp_worker(rank: int, world_size: int, port: int, cfg, out: Path) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
    torch.set_num_threads(1)
    try:
        one_epoch(cfg, rank, world_size, out)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache") / "synthetic-32x64"


def test_two_processes_train_like_one_on_the_same_global_batch(synthetic_root, cache, tmp_path):
    cfg = tiny_config(synthetic_root, cache, *OVERRIDES)
    build_data(cfg.data, torch.device("cpu"))  # the cache, before the processes read it
    mp.spawn(ddp_worker, args=(2, free_port(), cfg, tmp_path), nprocs=2, join=True)
    (tmp_path / "single").mkdir()
    one_epoch(cfg, 0, 1, tmp_path / "single")

    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    single = torch.load(tmp_path / "single" / "rank0.pt")
    for name, value in rank0["model"].items():  # the replicas stay identical
        assert torch.equal(value, rank1["model"][name]), name
    # and equal to one process up to float32 summation order (measured: 4e-5 on weights of
    # order 1 after 4 steps; a wrong gradient scale would be off by a factor of 2)
    for name, value in single["model"].items():
        torch.testing.assert_close(rank0["model"][name].float(), value.float(),
                                   rtol=1e-3, atol=3e-4, msg=name)  # fmt: skip
    for key in ("train_loss", "val_loss"):
        assert rank0[key] == rank1[key] == pytest.approx(single[key], rel=1e-5), key
    # a handful of the 16384 validation pixels may flip class with such differences
    assert rank0["val_pixel_error"] == pytest.approx(single["val_pixel_error"], abs=5e-3)


def test_torchrun_run_directory_matches_one_process(synthetic_root, cache, tmp_path):
    cfg = tiny_config(synthetic_root, cache, *OVERRIDES)
    train(cfg, tmp_path / "single")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
        f"--master_port={free_port()}", "-m", "deepcontrol.train",
        *tiny_overrides(synthetic_root, cache), *OVERRIDES, f"hydra.run.dir={tmp_path / 'ddp'}",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600,
                            env=env)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    [ddp], [single] = read_metrics(tmp_path / "ddp"), read_metrics(tmp_path / "single")
    assert ddp["samples_seen"] == single["samples_seen"] == 16
    for key in ("train_loss", "val_loss"):
        assert ddp[key] == pytest.approx(single[key], rel=1e-5), key
    assert ddp["val_pixel_error"] == pytest.approx(single["val_pixel_error"], abs=5e-3)
    summary = (tmp_path / "ddp" / "summary.json").read_text()
    assert '"world_size": 2' in summary and '"batch_size_per_process": 2' in summary
    assert '"batch_size": 4' in summary and '"val_samples": 8' in summary


def test_sync_batchnorm_on_the_cpu_is_refused_clearly():
    from deepcontrol.distributed import Dist

    with pytest.raises(ValueError, match="norm.sync=true needs CUDA"):
        wrap_model(torch.nn.Conv2d(1, 1, 1), Dist(0, 2, 0), sync_norm=True)
