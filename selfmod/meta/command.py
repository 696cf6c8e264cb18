"""``selfmod meta-train [CONFIG.toml] [--set key=value ...] [--resume]``.

Runs on one process, or on many under ``torchrun`` (gloo on CPU, NCCL on GPUs): the process
group is created from torchrun's environment variables when they are set.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist

from selfmod.checkpoint import list_checkpoints
from selfmod.meta import distributed
from selfmod.meta.train import MetaTrainConfig, meta_train, read_checkpoint
from selfmod.process_group import leave_process_group
from selfmod.validation import load


def load_meta_config(path: str | Path | None, overrides: list[str] | None) -> MetaTrainConfig:
    return load(MetaTrainConfig, path, overrides)


def run_meta_train(
    config: str | Path | None, overrides: list[str] | None, resume: bool = False
) -> Path:
    """Meta-train; returns the output folder. Initialises ``torch.distributed`` under torchrun."""
    cfg = load_meta_config(config, overrides)
    if resume and list_checkpoints(cfg.out):  # a checkpoint that cannot be resumed is one
        read_checkpoint(Path(cfg.out), cfg)  # line, before any progress output (none: anew)
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
                progress.update(
                    task, completed=step + 1, description=f"meta-training (meta-loss {loss:.3f})"
                )

            meta_train(cfg, on_step=on_step, resume=resume)
        if main:
            out = Path(cfg.out)
            console.print(
                f"learned optimizer: {out / 'weights.safetensors'} "
                f"(train with it: --set optimizer=learned:{out})"
            )
    finally:
        if started_group:
            leave_process_group()
    return Path(cfg.out)
