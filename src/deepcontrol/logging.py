"""What a run records: metrics.csv, summary.json and, when enabled, Weights & Biases.

Plots are drawn from the files in the run directory, never from W&B.
"""

from __future__ import annotations

import csv
import io
import json
import math
import netrc
import os
import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from omegaconf import DictConfig, OmegaConf

from deepcontrol.atomic import write_atomic

WANDB_MODES = ("auto", "online", "offline", "disabled")


def write_json(path: Path, data: dict) -> None:
    write_atomic(path, json.dumps(data, indent=1, default=str) + "\n")


def read_json(path: Path) -> dict | None:
    """``path``'s JSON, or None where there is no such file."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from error


def wandb_credentials_exist() -> bool:
    """An API key in the environment, or a netrc entry for the W&B host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def _check_wandb_mode(mode: object) -> None:
    if mode not in WANDB_MODES:
        raise ValueError(f"logger.mode must be one of {', '.join(WANDB_MODES)}, got {mode!r}")


def check_logger_settings(logger: DictConfig) -> None:
    """``logger.*`` as :class:`RunLogger` reads them, for a check before the run starts:
    ``logger.name`` none or wandb (another would log to no W&B without a word), and for
    W&B its mode and its tags, a list of strings (a string would be one tag a character)."""
    if logger.name not in ("none", "wandb"):
        raise ValueError(f"logger.name must be none or wandb, got {logger.name!r}")
    if logger.name != "wandb":
        return
    _check_wandb_mode(logger.mode)
    tags = logger.tags
    if (
        isinstance(tags, str)
        or not isinstance(tags, Sequence)
        or not all(isinstance(tag, str) for tag in tags)
    ):
        raise ValueError(f"logger.tags must be a list of strings, such as [a,b], got {tags!r}")


def resolve_wandb_mode(mode: str) -> str:
    """``auto`` → ``$WANDB_MODE`` if set, else online with credentials, else offline."""
    _check_wandb_mode(mode)
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    return "online" if wandb_credentials_exist() else "offline"


class RunLogger:
    """Writes one row per epoch to ``metrics.csv`` (rewritten whole, atomically) and W&B.

    Every process keeps the history; only the one with ``enabled`` (rank 0) writes.
    """

    def __init__(
        self, run_dir: Path, cfg: DictConfig, history: list[dict] | None = None,
        enabled: bool = True,
    ) -> None:  # fmt: skip
        self.run_dir = run_dir
        self.history = list(history or [])
        self.enabled = enabled
        self.wandb = None
        if enabled and cfg.logger.name == "wandb":
            mode = resolve_wandb_mode(cfg.logger.mode)
            if mode != "disabled":
                self.wandb = self._start_wandb(cfg, mode)

    def _start_wandb(self, cfg: DictConfig, mode: str) -> Any:
        import wandb  # only when W&B logging is on

        id_file = self.run_dir / "wandb_run_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
        write_atomic(id_file, run_id)
        run = wandb.init(
            project=cfg.logger.project,
            entity=cfg.logger.entity,
            group=cfg.logger.group,
            name=cfg.run_name,
            tags=list(cfg.logger.tags),
            config=OmegaConf.to_container(cfg, resolve=True),
            dir=str(self.run_dir),
            mode=mode,
            id=run_id,
            resume="allow",
        )
        run.define_metric("epoch")
        run.define_metric("samples_seen")
        run.define_metric("*", step_metric="epoch")
        return run

    def log_config(self, values: dict) -> None:
        """Facts found while setting up (class weights, parameter count) for W&B's config."""
        if self.wandb is not None:
            self.wandb.config.update(values, allow_val_change=True)

    def log_epoch(self, row: dict[str, float]) -> None:
        self.history.append(row)
        if not self.enabled:
            return
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(row), lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.history)
        write_atomic(self.run_dir / "metrics.csv", buffer.getvalue())
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in row.items() if not math.isnan(v)})

    def write_summary(self, summary: dict) -> None:
        """summary.json; once the run has stopped (finished, diverged, interrupted) W&B is
        closed too."""
        if not self.enabled:
            return
        write_json(self.run_dir / "summary.json", summary)
        if self.wandb is not None and summary["status"] != "running":
            self.wandb.summary.update(summary)
            self.wandb.finish(exit_code=0 if summary["status"] == "finished" else 1)
