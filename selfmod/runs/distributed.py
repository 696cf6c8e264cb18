"""``selfmod train`` and :func:`~selfmod.runs.api.fit` on several processes, with PyTorch's own
engine: ``torch.distributed`` (gloo on the CPU, NCCL on GPUs), launched by ``torchrun``.

    torchrun --nproc-per-node 2 -m selfmod.cli train --set steps=2000
    torchrun --nnodes 2 --node-rank R --rdzv-endpoint HOST:29500 --nproc-per-node 8 \\
        -m selfmod.cli train CONFIG.toml

The split of the work (every rank holds the whole run; nothing is partitioned but the batch):

- **Base steps are data parallel.** Every rank draws the same global batch of ``batch_size``
  examples (the data streams are seeded, so they agree) and trains on its contiguous slice of
  rows ``[r B / N, (r + 1) B / N)``. One ``all_reduce`` (sum) per step carries
  ``w_r loss_r``, ``w_r grad_r`` and ``w_r buffers_r`` with ``w_r = B_r / B``, so every rank
  gets the global batch's mean loss and gradient, ``sum_r w_r grad_r = grad(mean over B)``, and
  the same optimizer update: the global batch is ``batch_size`` whatever N is.
- **The cycle runs on every rank, identically, on the global lookahead batches** (probes,
  meta-gradient, proposals, replays, verification, decisions, surgery, rollbacks). It needs no
  communication: its inputs (state, batches, random generators) are the same on every rank, so
  its outputs are the same computation as on one process. This is the simplest exactly
  consistent choice (no decision is broadcast, and a decision cannot depend on N); its cost is
  that the cycle does not get faster with N. A check at the start of every cycle
  (:meth:`Collective.agree`: a hash of the whole run state, all-gathered) stops the job with
  one line if the ranks ever disagree.
- **Randomness.** Concrete-dropout noise is drawn for the global batch from the run's
  generator, which every rank advances alike, and each rank takes its rows. A model's own
  ``nn.Dropout`` (``F.dropout``) draws its mask for the global batch, shape ``(B, ...)``, from
  torch's generator and keeps its rows (:class:`_GlobalDropout`), so the masks are those of one
  process on the CPU. Other random ops in a model draw per shard; where the shards differ in
  size, torch's generator state is made rank 0's after the step so that the ranks stay in step.
- **BatchNorm** normalises each rank's shard by the shard's own statistics (DDP without
  ``SyncBatchNorm``); the running statistics are averaged over ranks (weighted by ``w_r``) after
  every step, so every rank holds the same buffers. ``running_mean`` is then exactly the global
  batch's; ``running_var`` misses the spread between shards: a model with BatchNorm trains a
  little differently on N processes.
- **Rank 0 alone writes the run directory** (config, ledger, checkpoints, logs, history,
  report, summary) and holds its lock. Other ranks get rank 0's config, run directory, pending
  approvals and, on resume, its restored state, by broadcast, so a resumed job may use any N and
  other machines need no shared file system.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from selfmod import tree
from selfmod.errors import SelfmodError
from selfmod.hypergrad import FiniteMonitor
from selfmod.introspect.loop import Loop, Recorder
from selfmod.introspect.state import flatten
from selfmod.optim.base import step
from selfmod.process_group import leave_process_group
from selfmod.validation import ConfigError

T = TypeVar("T")
Params = dict[str, Tensor]


def under_torchrun() -> bool:
    """Whether this process was started by ``torchrun`` (its environment variables are set)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


@contextlib.contextmanager
def session() -> Iterator[Collective | None]:
    """The job's :class:`Collective` for the block, or ``None`` on one process.

    Under ``torchrun`` with more than one process it creates the process group (backend
    ``cpu:gloo,cuda:nccl`` where CUDA is available, else ``gloo``; each rank on GPU
    ``LOCAL_RANK``) and destroys it at the end; a group the caller already made is used as it
    is (and left alone).
    """
    made = False
    if not (dist.is_available() and dist.is_initialized()):
        if not under_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
            yield None
            return
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
        made = True
    try:
        yield Collective() if dist.get_world_size() > 1 else None
    finally:
        if made:
            leave_process_group()


class Collective:
    """This process's place in the job and the few collectives a run needs (see the module
    docstring). A :class:`~selfmod.introspect.loop.Loop` with ``collective`` set calls
    :meth:`train_step` for its base steps and :meth:`agree` at the start of every cycle."""

    def __init__(self) -> None:
        self.rank, self.world = dist.get_rank(), dist.get_world_size()

    @property
    def main(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------------ rank 0 decides

    def broadcast(self, obj: T) -> T:
        """Rank 0's ``obj`` (picklable) on every rank."""
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def from_main(self, fn: Callable[[], T]) -> T:
        """``fn()`` run on rank 0 alone, its value on every rank; an error there (bad input:
        :class:`SelfmodError`, :class:`ConfigError`) is raised on every rank, one line each."""
        out: tuple[str, Any] = ("ok", None)
        if self.main:
            try:
                out = ("ok", fn())
            except (SelfmodError, ConfigError) as err:
                out = ("error", str(err))
        kind, value = self.broadcast(out)
        if kind == "error":
            raise SelfmodError(value)
        return value

    def share_run(self, loop: Loop) -> None:
        """Every rank continues from rank 0's run (its state restored from a checkpoint)."""
        payload = loop.checkpoint() if self.main else None
        tensors, meta = self.broadcast(payload)
        if not self.main:
            loop.restore(dict(tensors), json.loads(json.dumps(meta)))

    # ------------------------------------------------------------------ base step

    def rows(self, n: int) -> tuple[int, int]:
        """``(lo, hi)``: this rank's contiguous rows of a batch of ``n``."""
        return self.rank * n // self.world, (self.rank + 1) * n // self.world

    def train_step(
        self, loop: Loop, state: Any, batch: tuple[Any, Tensor, Tensor]
    ) -> tuple[Params, Any, Params, float, tuple[Tensor, ...]]:
        """:meth:`Loop.train_step` on this rank's shard: ``(params, opt_state, buffers, loss,
        grads)``, each the global batch's and the same on every rank.

        ``loss = sum_r w_r loss_r``, ``grads = sum_r w_r grad_r`` (one ``all_reduce``), then
        the optimizer step on every rank; raises :class:`NonFiniteError` on every rank alike."""
        x, y, noise = batch
        n = len(y)
        lo, hi = self.rows(n)
        w = (hi - lo) / n
        part = (
            pytree.tree_map(lambda t: t[lo:hi] if isinstance(t, Tensor) else t, x),
            y[lo:hi],
            noise[:, lo:hi] if noise.numel() else noise,  # (S, B_r, W)
        )
        box: dict[str, Params] = {}
        p = tree.detach(state.params, requires_grad=True)
        names = list(p)
        if hi > lo:
            with torch.enable_grad(), _GlobalDropout(lo, hi, n):
                loss = loop.losses.train(state.buffers, box)(p, state.hparams, part)
                grads = torch.autograd.grad(loss, tuple(p.values()), materialize_grads=True)
        else:  # more ranks than examples: this rank adds nothing
            loss = torch.zeros((), device=loop.device, dtype=loop.dtype)
            grads = tuple(torch.zeros_like(v) for v in p.values())
        buffers = box.get("buffers", state.buffers)
        floats = [k for k, v in buffers.items() if v.is_floating_point()]
        parts = [loss.detach().reshape(1), *grads, *(buffers[k] for k in floats)]
        flat = torch.cat([(w * t.detach()).reshape(-1).to(loop.dtype) for t in parts])
        dist.all_reduce(flat)  # the sums over ranks
        loss, i = flat[0], 1
        out = []
        for t in parts[1:]:
            out.append(flat[i : i + t.numel()].reshape(t.shape).to(t.dtype))
            i += t.numel()
        grads = tuple(out[: len(names)])
        buffers = {**buffers, **dict(zip(floats, out[len(names) :], strict=True))}
        if n % self.world:  # unequal shards: a model's other random ops drew unequally
            self._same_generator(loop.device)
        monitor = FiniteMonitor(start=loop.step)
        monitor.record(loss, grads)
        monitor.check()
        g = dict(zip(names, grads, strict=True))
        with torch.no_grad():  # the fused step where the optimizer has one, as on one process
            params, opt_state = step(loop.opt, g, state.opt_state, tree.detach(p), state.hparams)
        return params, opt_state, buffers, float(loss), grads

    def _same_generator(self, device: torch.device) -> None:
        """torch's generator(s) set to rank 0's (a model's random ops other than ``F.dropout``
        draw per shard, so shards of unequal size advance them unequally)."""
        state = torch.get_rng_state()  # (5056,) uint8, on the CPU
        dist.broadcast(state, src=0)
        torch.set_rng_state(state)
        if device.type == "cuda":
            cuda = torch.cuda.get_rng_state(device)
            dist.broadcast(cuda, src=0)
            torch.cuda.set_rng_state(cuda, device)

    # ------------------------------------------------------------------ agreement

    def agree(self, loop: Loop) -> None:
        """Stop the job (every rank, one line) unless all ranks hold the same run: a sha256 of
        the state, the last good state, the step and cycle counters and the generators,
        all-gathered."""
        mine = fingerprint(loop)
        hashes: list[str] = [""] * self.world
        dist.all_gather_object(hashes, mine)
        bad = [r for r, h in enumerate(hashes) if h != hashes[0]]
        if bad:
            raise SelfmodError(
                f"ranks disagree at cycle {loop.cycle} (step {loop.step}): rank {bad[0]}'s run "
                f"state hashes to {hashes[bad[0]][:12]}, rank 0's to {hashes[0][:12]}; the job "
                "stops (selfmod resume DIR continues from the last checkpoint)"
            )


def fingerprint(loop: Loop) -> str:
    """sha256 of everything that decides the rest of the run on this rank."""
    h = hashlib.sha256()
    tensors, scalars = flatten(loop.state, "state")
    t2, s2 = flatten(loop.good, "good")
    for name, t in sorted({**tensors, **t2}.items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    h.update(torch.get_rng_state().numpy().tobytes())
    h.update(loop.rng.get_state().numpy().tobytes())
    counters = {k: getattr(loop.counters, k) for k in ("step", "cycle", "source_id")}
    h.update(json.dumps([counters, scalars, s2], sort_keys=True, default=str).encode())
    return h.hexdigest()


class RankRecorder(Recorder):
    """The recorder of a run on several processes: rank 0's run-directory recorder writes;
    every rank reads rank 0's pending approvals."""

    def __init__(self, inner: Recorder | None, collective: Collective) -> None:
        self.inner, self.collective = inner, collective

    def record(self, run: Loop, kind: str, decision: str, reason: str, payload: dict) -> int | None:
        return self.inner.record(run, kind, decision, reason, payload) if self.inner else None

    def checkpoint(self, run: Loop) -> None:
        if self.inner is not None:
            self.inner.checkpoint(run)

    def pending(self, run: Loop) -> list[tuple[int, int, dict[str, Any], bool]]:
        return self.collective.broadcast(self.inner.pending(run) if self.inner else None)

    def log(self, run: Loop, row: dict[str, Any]) -> None:
        if self.inner is not None:
            self.inner.log(run, row)


class _GlobalDropout(TorchFunctionMode):
    """``F.dropout`` in training mode draws its mask for the whole batch ``(n, ...)`` from
    torch's generator, as one process would (``empty(...).bernoulli_(1 - p)``, the CPU kernel's
    draw), and applies rows ``lo:hi`` to this rank's shard ``(hi - lo, ...)``."""

    def __init__(self, lo: int, hi: int, n: int) -> None:
        super().__init__()
        self.lo, self.hi, self.n = lo, hi, n

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.dropout:
            x, p, training = _dropout_args(*args, **kwargs)
            if training and 0 < p < 1 and x.dim() > 0 and len(x) == self.hi - self.lo:
                shape = (self.n, *x.shape[1:])
                keep = torch.empty(shape, dtype=x.dtype, device=x.device).bernoulli_(1 - p)
                return x * keep[self.lo : self.hi].div_(1 - p)
        return func(*args, **kwargs)


def _dropout_args(
    input: Tensor, p: float = 0.5, training: bool = True, inplace: bool = False
) -> tuple[Tensor, float, bool]:
    return input, float(p), bool(training)
