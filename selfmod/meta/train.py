"""Meta-training a learned optimizer over MNIST-1D template tasks, on one process or many.

Each of ``meta_batch`` slots trains an MLP on its own task (10 random meta-train templates) with
the learned optimizer; every meta-step advances each slot by ``unroll`` inner steps and takes the
meta-gradient of the slot's training loss (whole train split) at the end of the window through
those steps
(truncated backpropagation with persistent inner state; ``hypergrad.reverse`` on the window).
A slot starts a new task after ``horizon`` inner steps. Meta-gradients are averaged over slots
(summed across ranks with ``all_reduce``), clipped and applied with Adam.

Slots are seeded by ``(seed, slot, episode)``, not by rank, so the result does not depend on the
number of processes. Every ``checkpoint_every`` meta-steps rank 0 writes a checkpoint of the
whole state (the learned optimizer, Adam's moments, every slot's inner weights, inner state,
position and RNG) as one set through :mod:`selfmod.checkpoint` (``out/checkpoints``: the
tensors, then one manifest with their sha256 and its own, written last; the previous set is
kept until the new one is complete), and the learned optimizer alone to
``out/weights.safetensors`` with its description ``out/weights.json``
(:mod:`selfmod.optim.saved`; a run uses it as ``optimizer = "learned:OUT"``). ``resume``
continues from the newest complete set exactly where it stopped: resuming any number of times
gives the uninterrupted run's weights (a run killed before its first set starts again).

State is flattened by name (``torch.utils._pytree.keystr`` paths such as ``[1][0].mu['b0']``),
never by position, so the order of a dict's keys never matters.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import Tensor
from torch.utils._pytree import keystr, tree_flatten_with_path, tree_unflatten

from selfmod import hypergrad, optim
from selfmod.checkpoint import CheckpointError, list_checkpoints, load_latest
from selfmod.checkpoint import save_checkpoint as save_checkpoint_set
from selfmod.files import atomic_write_bytes
from selfmod.meta import distributed
from selfmod.models import init_mlp_params, mlp_forward
from selfmod.optim.learned import (
    init_lstm_optimizer,
    init_mlp_optimizer,
    lstm_optimizer,
    mlp_optimizer,
)
from selfmod.optim.saved import save_learned
from selfmod.tasks import TemplateTasks
from selfmod.validation import check_out_dir

KIND = "selfmod meta-train"
# fields that shape the saved state: a resume must use the checkpoint's values
RESUME_FIXED = ("optimizer", "seed", "meta_batch", "unroll", "horizon", "width", "n_way")
KEEP = 2  # checkpoint sets kept: the newest complete one and the one before it


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

    @field_validator("out")
    @classmethod
    def _out(cls, value: str) -> str:
        return check_out_dir(value)


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
    my_slots = distributed.shard(range(cfg.meta_batch))
    if resume and not list_checkpoints(out):  # killed before its first checkpoint: start again
        resume = False
    if resume:
        weights, meta_state, start_step, slots = load_checkpoint(
            out, cfg, weights, meta_state, lambda i, episode: _reset(i, episode, cfg, tasks, opt)
        )
        slots = {i: slots[i] for i in my_slots}
    else:
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
        if (step + 1) % cfg.checkpoint_every == 0 or done:
            save_checkpoint(out, weights, meta_state, step + 1, cfg, slots)
        if done:
            break
    return weights


def _flatten(tree: Any, prefix: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """``({prefix + name: tensor}, {name: scalar})`` with each leaf named by its path."""
    tensors, scalars = {}, {}
    for path, leaf in tree_flatten_with_path(tree)[0]:
        if isinstance(leaf, Tensor):
            tensors[prefix + keystr(path)] = leaf
        else:
            scalars[keystr(path)] = leaf
    return tensors, scalars


def _unflatten(
    template: Any, tensors: dict[str, Tensor], scalars: dict[str, Any], prefix: str
) -> Any:
    """Rebuild ``template``'s structure from leaves saved by :func:`_flatten` under the same
    names; a missing name or another shape is a :class:`CheckpointError`."""
    flat, spec = tree_flatten_with_path(template)
    leaves = []
    for path, leaf in flat:
        name = keystr(path)
        if isinstance(leaf, Tensor):
            saved = tensors.get(prefix + name)
            if saved is None or saved.shape != leaf.shape:
                raise CheckpointError(
                    f"the checkpoint's {prefix}{name} is missing or has another shape; it was "
                    "written by another configuration (use its config or a new out)"
                )
            leaves.append(saved.to(leaf.dtype))
        else:
            if name not in scalars:
                raise CheckpointError(f"the checkpoint has no {prefix}{name}")
            leaves.append(scalars[name])
    return tree_unflatten(leaves, spec)


def _named(
    template: dict[str, Tensor], tensors: dict[str, Tensor], prefix: str
) -> dict[str, Tensor]:
    """``{name: tensors[prefix + name]}`` in ``template``'s key order, shapes checked."""
    out = {}
    for name, fresh in template.items():
        saved = tensors.get(prefix + name)
        if saved is None or saved.shape != fresh.shape:
            raise CheckpointError(
                f"the checkpoint's {prefix}{name} is missing or has another shape; it was "
                "written by another configuration (use its config or a new out)"
            )
        out[name] = saved.to(fresh.dtype)
    return out


def _slot_record(i: int, slot: Slot) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """One slot's tensors (inner weights, inner state, RNG) and JSON values."""
    prefix = f"slots/{i}/"
    params = {f"{prefix}params/{k}": v for k, v in slot.params.items()}
    state, scalars = _flatten(slot.state, f"{prefix}state/")
    tensors = {**params, **state, f"{prefix}gen": slot.gen.get_state()}
    return tensors, {"t": slot.t, "episode": slot.episode, "state_scalars": scalars}


def save_checkpoint(
    out: Path,
    weights: dict[str, Tensor],
    meta_state: Any,
    step: int,
    cfg: MetaTrainConfig,
    slots: dict[int, Slot],
) -> Path | None:
    """Write the whole meta-training state as one checkpoint set (rank 0; the other ranks send
    their slots) and the learned optimizer to ``out/weights.{safetensors,json}``; returns the
    manifest on rank 0.

    The set is ``out/checkpoints/ckpt-<step>.{safetensors,json}`` (:mod:`selfmod.checkpoint`:
    tensors first, the manifest with every sha256 last); only the last :data:`KEEP` are kept.
    """
    records = {i: _slot_record(i, slot) for i, slot in slots.items()}
    gathered = distributed.gather_objects(records)
    if not distributed.is_main_process():
        return None
    tensors = {f"weights/{k}": v for k, v in weights.items()}
    state_tensors, state_scalars = _flatten(meta_state, "meta_state/")
    tensors.update(state_tensors)
    slot_meta = {}
    for rank_records in gathered:
        for i, (slot_tensors, values) in rank_records.items():
            tensors.update(slot_tensors)
            slot_meta[str(i)] = values
    meta = {
        "kind": KIND,
        "config": cfg.model_dump(),
        "weights": list(weights),  # the learned optimizer's names, in their order
        "meta_state_scalars": state_scalars,
        "slots": slot_meta,
    }
    tensors = {k: v.detach().clone() for k, v in tensors.items()}  # no shared storage
    manifest = save_checkpoint_set(out, step, tensors, meta, keep=KEEP)
    save_learned(  # weights.safetensors + weights.json: loadable as optimizer = "learned:OUT"
        out, cfg.optimizer, weights, atomic_write_bytes, meta_train=cfg.model_dump(), step=step
    )
    return manifest


def read_checkpoint(out: Path, cfg: MetaTrainConfig) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """``(tensors, manifest)`` of the newest complete checkpoint set in ``out``, verified (every
    sha256, the manifest's own) and written by meta-train with ``cfg``'s :data:`RESUME_FIXED`
    values; otherwise a one-line :class:`CheckpointError` saying what to do."""
    tensors, manifest = load_latest(out)
    meta = manifest["meta"]
    if meta.get("kind") != KIND or not isinstance(meta.get("config"), dict):
        raise CheckpointError(f"the checkpoint in {out} was not written by selfmod meta-train")
    saved = meta["config"]
    for name in RESUME_FIXED:
        if saved.get(name) != getattr(cfg, name):
            raise CheckpointError(
                f"{name} is {getattr(cfg, name)!r} but the checkpoint in {out} was written with "
                f"{saved.get(name)!r}; resume with --set {name}={saved.get(name)!r} or start "
                "a new out"
            )
    return tensors, manifest


def load_checkpoint(
    out: Path,
    cfg: MetaTrainConfig,
    weights: dict[str, Tensor],
    meta_state: Any,
    new_slot: Callable[[int, int], Slot],
) -> tuple[dict[str, Tensor], Any, int, dict[int, Slot]]:
    """``(weights, meta_state, step, slots)`` from the newest complete checkpoint set in
    ``out``, verified (every sha256, the manifest's own) and checked against ``cfg``
    (:data:`RESUME_FIXED` must match); ``weights`` and ``meta_state`` are the fresh ones, whose
    structure and key order are kept. ``new_slot(i, episode)`` rebuilds slot ``i``'s task."""
    tensors, manifest = read_checkpoint(out, cfg)
    meta = manifest["meta"]
    try:
        restored = _named(weights, tensors, "weights/")
        state = _unflatten(meta_state, tensors, meta["meta_state_scalars"], "meta_state/")
        slots = {}
        for i in range(cfg.meta_batch):
            record = meta["slots"][str(i)]
            slot = new_slot(i, record["episode"])
            slot.params = _named(slot.params, tensors, f"slots/{i}/params/")
            slot.state = _unflatten(
                slot.state, tensors, record["state_scalars"], f"slots/{i}/state/"
            )
            slot.t = record["t"]
            slot.gen.set_state(tensors[f"slots/{i}/gen"])
            slots[i] = slot
    except (KeyError, TypeError, RuntimeError) as err:
        raise CheckpointError(f"the checkpoint in {out} is incomplete ({err!r})") from None
    return restored, state, manifest["step"], slots
