"""Meta-training on several processes: each rank takes a shard of the meta-batch, meta-gradients
are summed with ``all_reduce``; checkpoints are written by rank 0.

Launch with ``torchrun --nproc-per-node N script.py`` (backend ``gloo`` on CPU, ``nccl`` on
GPUs); on several machines add ``--nnodes M --node-rank R --rdzv-endpoint HOST:PORT``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

T = TypeVar("T")


def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` when ``torch.distributed`` is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard(items: Sequence[T]) -> list[T]:
    """This rank's share of ``items``: every ``world``-th item from ``rank``."""
    rank, world = rank_and_world()
    return list(items[rank::world])


def all_reduce_sum(tree: dict[str, Tensor]) -> dict[str, Tensor]:
    """Sum a dict of tensors over ranks (one flat buffer, one collective); no-op on one rank."""
    _, world = rank_and_world()
    if world == 1 or not tree:
        return tree
    keys = list(tree)
    flat = torch.cat([tree[k].reshape(-1) for k in keys])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    out, i = {}, 0
    for k in keys:
        n = tree[k].numel()
        out[k] = flat[i : i + n].reshape(tree[k].shape)
        i += n
    return out


def gather_objects(obj: T) -> list[T]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank; ``[obj]`` on one rank."""
    _, world = rank_and_world()
    if world == 1:
        return [obj]
    out: list = [None] * world
    dist.all_gather_object(out, obj)
    return out


def is_main_process() -> bool:
    """True on rank 0 (the one that writes checkpoints and logs)."""
    return rank_and_world()[0] == 0
