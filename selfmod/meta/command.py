"""``selfmod meta-train [CONFIG.toml] [--set key=value ...] [--resume]``.

Runs on one process, or on many under ``torchrun`` (gloo on CPU, NCCL on GPUs): the process
group is created from torchrun's environment variables when they are set.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from selfmod.meta import distributed
from selfmod.meta.train import MetaTrainConfig, meta_train
from selfmod.validation import ConfigError, validate


def load_meta_config(path: str | Path | None, overrides: list[str] | None) -> MetaTrainConfig:
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            values = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"config file {str(path)!r} is not valid TOML: {err}") from None
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects key=value (got {item!r})")
        try:
            values[key.strip()] = tomllib.loads(f"v = {raw.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            values[key.strip()] = raw.strip()
    return validate(MetaTrainConfig, values)


def run_meta_train(config: str | Path | None, overrides: list[str] | None,
                   resume: bool = False) -> Path:
    """Meta-train; returns the output folder. Initialises ``torch.distributed`` under torchrun."""
    cfg = load_meta_config(config, overrides)
    started_group = False
    if "WORLD_SIZE" in os.environ and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        started_group = True
    try:
        from rich.console import Console
        from rich.progress import Progress

        console = Console(stderr=True)
        main = distributed.is_main_process()
        with Progress(console=console, disable=not main) as progress:
            task = progress.add_task("meta-training", total=cfg.meta_steps)

            def on_step(step: int, loss: float) -> None:
                progress.update(task, completed=step + 1,
                                description=f"meta-training (meta-loss {loss:.3f})")

            meta_train(cfg, on_step=on_step, resume=resume)
        if main:
            console.print(f"learned optimizer: {Path(cfg.out) / 'weights.safetensors'}")
    finally:
        if started_group:
            dist.destroy_process_group()
    return Path(cfg.out)
