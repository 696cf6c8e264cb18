"""Meta-training a learned optimizer over MNIST-1D template tasks, on one process or many.

Each of ``meta_batch`` slots trains an MLP on its own task (10 random meta-train templates) with
the learned optimizer; every meta-step advances each slot by ``unroll`` inner steps and takes the
meta-gradient of the slot's training loss (whole train split) at the end of the window through
those steps
(truncated backpropagation with persistent inner state; ``hypergrad.reverse`` on the window).
A slot starts a new task after ``horizon`` inner steps. Meta-gradients are averaged over slots
(summed across ranks with ``all_reduce``), clipped and applied with Adam.

Slots are seeded by ``(seed, slot, episode)``, not by rank, so the result does not depend on the
number of processes. Rank 0 writes the checkpoint (safetensors + JSON with sha256) every
``checkpoint_every`` meta-steps; ``resume`` continues from it with fresh inner tasks.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load_file, save_file
from torch import Tensor

from selfmod import hypergrad, optim
from selfmod.meta import distributed
from selfmod.models import init_mlp_params, mlp_forward
from selfmod.optim.learned import (
    init_lstm_optimizer,
    init_mlp_optimizer,
    lstm_optimizer,
    mlp_optimizer,
)
from selfmod.runs.files import atomic_write_bytes, atomic_write_text
from selfmod.tasks import TemplateTasks


class MetaTrainConfig(BaseModel):
    """``selfmod meta-train``: meta-train a learned optimizer on MNIST-1D template tasks."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    optimizer: Literal["lstm", "mlp"] = "lstm"
    seed: int = Field(0, ge=0, le=2**31 - 1)
    meta_steps: int = Field(1000, ge=1, le=10_000_000)
    meta_batch: int = Field(8, ge=1, le=4096, description="task slots per meta-step (all ranks)")
    unroll: int = Field(10, ge=1, le=10_000, description="inner steps per meta-gradient")
    horizon: int = Field(100, ge=1, le=1_000_000, description="inner steps before a new task")
    width: int = Field(32, ge=1, le=4096, description="hidden units of the inner MLP")
    n_way: int = Field(10, ge=2, le=160, description="classes per task")
    inner_batch: int = Field(64, ge=1, le=4096)
    meta_lr: float = Field(3e-3, gt=0, le=1)
    clip: float = Field(1.0, gt=0, le=1e6, description="meta-gradient global-norm clip")
    checkpoint_every: int = Field(100, ge=1, le=10_000_000)
    time_limit: float = Field(0.0, ge=0, description="stop after this many seconds (0: none)")
    out: str = Field("runs/meta", min_length=1)


@dataclass
class Slot:
    params: dict[str, Tensor]
    state: Any
    t: int  # inner steps taken on this task
    episode: int  # tasks this slot has had
    train: tuple[Tensor, Tensor]
    valid: tuple[Tensor, Tensor]
    gen: torch.Generator


def learned_optimizer(kind: str, seed: int):
    """``(transform, initial weights)`` of the ``lstm`` or ``mlp`` learned optimizer."""
    if kind == "lstm":
        return lstm_optimizer(), init_lstm_optimizer(seed=seed)
    return mlp_optimizer(), init_mlp_optimizer(seed=seed)


def task_loss(p, h, batch):
    x, y = batch
    return F.cross_entropy(mlp_forward(p, x), y)


def new_task(
    tasks: TemplateTasks, split: str, n_way: int, seed: int
) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """A ``n_way``-class task from the ``split`` templates: (train set, validation set)."""
    gen = torch.Generator().manual_seed(seed)
    pool = torch.as_tensor(tasks.classes(split))
    classes = pool[torch.randperm(len(pool), generator=gen)[:n_way]].tolist()
    x_tr, y_tr, x_va, y_va = tasks.dataset(classes)
    return (x_tr, y_tr), (x_va, y_va)


def minibatch(data: tuple[Tensor, Tensor], size: int, gen: torch.Generator):
    idx = torch.randint(0, len(data[0]), (size,), generator=gen)
    return data[0][idx], data[1][idx]


def _reset(slot_index: int, episode: int, cfg: MetaTrainConfig, tasks, opt) -> Slot:
    seed = hash((cfg.seed, slot_index, episode)) % 2**31
    gen = torch.Generator().manual_seed(seed)
    train, valid = new_task(tasks, "train", cfg.n_way, seed)
    params = init_mlp_params([40, cfg.width, cfg.n_way], gen)
    return Slot(params, opt.init(params), 0, episode, train, valid, gen)


def meta_train(
    cfg: MetaTrainConfig,
    tasks: TemplateTasks | None = None,
    on_step: Callable[[int, float], None] | None = None,
    resume: bool = False,
) -> dict[str, Tensor]:
    """Run meta-training; returns the learned optimizer's weights (same on every rank)."""
    torch.manual_seed(cfg.seed)
    tasks = tasks or TemplateTasks(seed=cfg.seed)
    opt, weights = learned_optimizer(cfg.optimizer, cfg.seed)
    meta = optim.chain(optim.clip_by_global_norm(cfg.clip), optim.adam(cfg.meta_lr))
    meta_state = meta.init(weights)
    out = Path(cfg.out)
    start_step = 0
    if resume:
        weights, meta_state, start_step = load_checkpoint(out, meta_state)
    my_slots = distributed.shard(range(cfg.meta_batch))
    slots = {i: _reset(i, 0, cfg, tasks, opt) for i in my_slots}
    began = time.perf_counter()
    for step in range(start_step, cfg.meta_steps):
        grads = {k: torch.zeros_like(v) for k, v in weights.items()}
        loss_sum = torch.zeros(1)
        for i, slot in slots.items():
            batches = [minibatch(slot.train, cfg.inner_batch, slot.gen) for _ in range(cfg.unroll)]
            res = hypergrad.reverse(
                task_loss,
                task_loss,
                opt,
                slot.params,
                weights,
                batches,
                slot.train,
                state=slot.state,
            )
            grads = {k: grads[k] + res.hparams[k] for k in grads}
            loss_sum += res.value
            slot.params, slot.state, slot.t = res.final_params, res.final_state, slot.t + cfg.unroll
            if slot.t >= cfg.horizon:
                slots[i] = _reset(i, slot.episode + 1, cfg, tasks, opt)
        summed = distributed.all_reduce_sum({"loss": loss_sum, **grads})
        grads = {k: summed[k] / cfg.meta_batch for k in grads}
        updates, meta_state = meta.update(grads, meta_state, weights)
        weights = optim.apply_updates(weights, updates)
        if on_step is not None:
            on_step(step, float(summed["loss"]) / cfg.meta_batch)
        done = step + 1 == cfg.meta_steps or (
            cfg.time_limit and time.perf_counter() - began > cfg.time_limit
        )
        if distributed.is_main_process() and ((step + 1) % cfg.checkpoint_every == 0 or done):
            save_checkpoint(out, weights, meta_state, step + 1, cfg)
        if done:
            break
    return weights


def save_checkpoint(out: Path, weights, meta_state, step: int, cfg: MetaTrainConfig) -> None:
    """``weights.safetensors`` (the learned optimizer), ``meta_state.safetensors`` (Adam's
    moments) and ``checkpoint.json`` (step, config, sha256 of both), each written atomically."""
    leaves, _ = torch.utils._pytree.tree_flatten(meta_state)
    tensors = {f"leaf{i}": x for i, x in enumerate(leaves) if isinstance(x, Tensor)}
    scalars = {f"leaf{i}": x for i, x in enumerate(leaves) if not isinstance(x, Tensor)}
    files = {"weights.safetensors": weights, "meta_state.safetensors": tensors}
    digests = {}
    for name, tensors_ in files.items():
        tmp = out / f".{name}.staging"
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in tensors_.items()}, str(tmp))
        data = tmp.read_bytes()
        tmp.unlink()
        atomic_write_bytes(out / name, data)
        digests[name] = hashlib.sha256(data).hexdigest()
    manifest = {
        "step": step,
        "sha256": digests,
        "meta_state_scalars": scalars,
        "config": cfg.model_dump(),
    }
    atomic_write_text(out / "checkpoint.json", json.dumps(manifest, indent=1))


def load_checkpoint(out: Path, meta_state_template) -> tuple[dict[str, Tensor], Any, int]:
    """Load and verify (sha256) a checkpoint written by :func:`save_checkpoint`."""
    manifest = json.loads((out / "checkpoint.json").read_text())
    for name, digest in manifest["sha256"].items():
        if hashlib.sha256((out / name).read_bytes()).hexdigest() != digest:
            raise ValueError(f"checkpoint file {out / name} does not match its sha256")
    weights = load_file(str(out / "weights.safetensors"))
    tensors = load_file(str(out / "meta_state.safetensors"))
    leaves, spec = torch.utils._pytree.tree_flatten(meta_state_template)
    restored = [
        tensors.get(f"leaf{i}", manifest["meta_state_scalars"].get(f"leaf{i}"))
        for i in range(len(leaves))
    ]
    return weights, torch.utils._pytree.tree_unflatten(restored, spec), manifest["step"]
