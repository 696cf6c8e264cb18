"""The run's whole state in one named structure, and its generic flattening for checkpoints.

:class:`RunState` is what a change transforms and a rollback restores: parameters, buffers,
optimizer state, hyperparameters, batch size, every modifier's memory and the meta learning
rate. :func:`flatten` turns any such structure (dataclasses, dicts, NamedTuples, tensors and
JSON scalars) into ``{name: tensor}`` plus a JSON-able dict, by *name* (pytree key paths), never
by position; :func:`unflatten` reads it back against a template of the same structure, so a
new field or modifier needs no resume code.
"""

from __future__ import annotations

import ast
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor
from torch.utils import _pytree as pytree

Params = dict[str, Tensor]


@dataclass(frozen=True)
class RunState:
    """Everything a change may alter and a rollback restores."""

    params: Params
    buffers: Params  # BatchNorm running statistics and other persistent buffers
    opt_state: Any  # the optimizer's state pytree (NamedTuples of dicts of tensors)
    hparams: Params  # unconstrained hyperparameters (see HParamSpace)
    batch_size: int
    memory: dict[str, Params]  # each modifier's own tensors, by modifier name
    meta_lr: float

    def clone(self) -> RunState:
        """A deep copy of every tensor (a snapshot that later in-place work cannot reach)."""
        return pytree.tree_map(_clone, self)

    def snapshot(self) -> RunState:
        """The state as it is now, kept for a rollback without a copy of the model: the
        functional core makes new tensors at each step, and the loop's base steps write a
        state's tensors in place only where nothing else holds them (``Loop.donate``: taking a
        snapshot counts), so the snapshot shares them; only the buffers are copied (small, and
        a user's module may write its own buffers in place in a forward)."""
        return replace(self, buffers=pytree.tree_map(_clone, self.buffers))

    def with_(self, **changes: Any) -> RunState:
        return replace(self, **changes)

    def contiguous(self) -> RunState:
        """Every tensor row-major, as a checkpoint stores it, so that a resumed run computes
        with the layouts of the run it resumes (a column-major factor can change the order of
        a matmul's additions, and so the last bits); a no-op for tensors already row-major."""
        return pytree.tree_map(_contiguous, self)


def _clone(x: Any) -> Any:
    return x.detach().clone() if isinstance(x, Tensor) else x


def _contiguous(x: Any) -> Any:
    return x.contiguous() if isinstance(x, Tensor) else x


def _flatten(state: RunState) -> tuple[list[Any], pytree.Context]:
    names = [f.name for f in fields(state)]
    return [getattr(state, n) for n in names], names


def _unflatten(values: list[Any], names: list[str]) -> RunState:
    return RunState(**dict(zip(names, values, strict=True)))


def _flatten_with_keys(state: RunState):
    values, names = _flatten(state)
    return [(pytree.GetAttrKey(n), v) for n, v in zip(names, values, strict=True)], names


# a pytree with named children: flatten() names each leaf by its field ("state.params['w']")
pytree.register_pytree_node(RunState, _flatten, _unflatten, flatten_with_keys_fn=_flatten_with_keys)


def flatten(obj: Any, prefix: str = "") -> tuple[dict[str, Tensor], dict[str, Any]]:
    """``(tensors, scalars)`` keyed by each leaf's path (``"params['0.weight']"``)."""
    leaves, _ = pytree.tree_flatten_with_path(obj)
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, Any] = {}
    for path, leaf in leaves:
        name = prefix + pytree.keystr(path)
        if isinstance(leaf, Tensor):
            tensors[name] = leaf
        else:
            scalars[name] = leaf
    return tensors, scalars


def unflatten(
    template: Any, tensors: dict[str, Tensor], scalars: dict[str, Any], prefix: str = ""
) -> Any:
    """The structure of ``template`` with every leaf read by name from :func:`flatten`'s output
    (tensors as saved, shapes included: a grown layer comes back grown)."""
    leaves, spec = pytree.tree_flatten_with_path(template)
    out = []
    for path, leaf in leaves:
        name = prefix + pytree.keystr(path)
        if isinstance(leaf, Tensor):
            if name not in tensors:
                raise KeyError(f"checkpoint has no tensor {name!r}")
            out.append(tensors[name])
        else:
            if name not in scalars:
                raise KeyError(f"checkpoint has no value {name!r}")
            value = scalars[name]
            out.append(type(leaf)(value) if isinstance(leaf, int | float | bool) else value)
    return pytree.tree_unflatten(out, spec)


def read_state(
    tensors: dict[str, Tensor],
    scalars: dict[str, Any],
    prefix: str,
    names: Sequence[str],
    opt_init: Callable[[Params], Any],
) -> RunState:
    """The :class:`RunState` saved under ``prefix`` (:func:`flatten`), its optimizer state's
    structure from ``opt_init`` and its modifiers' memory from the saved names."""
    params = {k: tensors[f"{prefix}.params[{k!r}]"] for k in names}  # as pytree.keystr wrote
    template = RunState(
        params, _under(tensors, f"{prefix}.buffers"), opt_init(params),
        _under(tensors, f"{prefix}.hparams"), 0, memory_template(tensors, prefix), 0.0,
    )  # fmt: skip
    return unflatten(template, tensors, scalars, prefix=prefix)


def _under(tensors: dict[str, Tensor], head: str) -> Params:
    """``{key: tensor}`` for names ``head[repr(key)]`` (one level, as ``pytree.keystr`` writes
    a string key: any quotes or backslashes in it)."""
    out = {}
    for name, t in tensors.items():
        if not (name.startswith(head + "[") and name.endswith("]")):
            continue
        try:
            key = ast.literal_eval(name[len(head) + 1 : -1])
        except (ValueError, SyntaxError):  # deeper than one level: not this one's
            continue
        if isinstance(key, str):
            out[key] = t
    return out


def save_run(
    state: RunState,
    good: RunState,
    buffer: Any,
    rng: torch.Generator,
    counters: Counters,
    applied: set[int],
    stream: dict[str, int],
    history: dict[str, Any],
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """``(tensors, meta)``: a whole run by name: its state, the last good one, the replay
    buffer (a NamedTuple), the random generators, the counters, the approvals acted on, the
    data stream's position and the history. A tensor the last good state shares with the state
    (:meth:`RunState.snapshot`) is stored once: ``meta["shared"]`` maps its ``good.*`` name to
    the ``state.*`` one."""
    tensors, scalars = flatten(state, "state")
    t2, s2 = flatten(good, "good")
    by_id = {id(t): k for k, t in tensors.items()}
    shared = {k: by_id[id(t)] for k, t in t2.items() if id(t) in by_id}  # a snapshot's
    tensors |= {k: t for k, t in t2.items() if k not in shared}
    scalars |= s2
    tensors.update({f"replay.{k}": v for k, v in buffer._asdict().items()})
    tensors |= {"rng.controller": rng.get_state(), "rng.torch": torch.get_rng_state()}
    meta = {**counters.saved(), "scalars": scalars, "applied": sorted(applied), "shared": shared}
    return tensors, meta | {"stream": stream, **random_states(), "history": jsonable(history)}


def load_run(
    tensors: dict[str, Tensor],
    meta: dict[str, Any],
    names: Sequence[str],
    opt_init: Callable[[Params], Any],
    rng: torch.Generator,
    device: torch.device,
) -> tuple[RunState, RunState, dict[str, Tensor], Counters, set[int]]:
    """Read :func:`save_run`'s output: ``(state, good, replay fields, counters, applied)``;
    sets ``rng`` and the global random states as saved (the history and stream are in
    ``meta``)."""
    rngs = {k: tensors.pop(k) for k in ("rng.controller", "rng.torch")}
    tensors = {k: v.to(device) for k, v in tensors.items()}  # checkpoints are on the CPU
    for kept, stored in meta.get("shared", {}).items():  # save_run's one copy of each
        if not (kept.startswith("good.") and stored.startswith("state.")) or kept in tensors:
            raise ValueError(f"meta.shared maps {kept!r} to {stored!r}: not good.* to state.*")
        tensors[kept] = tensors[stored]
    state = read_state(tensors, meta["scalars"], "state", names, opt_init)
    good = read_state(tensors, meta["scalars"], "good", names, opt_init)
    replay = {k[len("replay.") :]: v for k, v in tensors.items() if k.startswith("replay.")}
    replay.pop("loss", None)  # a column 0.2's checkpoints hold (no code read it)
    replay |= {k: v.cpu() for k, v in replay.items() if k not in ("x", "y")}
    rng.set_state(rngs["rng.controller"])
    torch.set_rng_state(rngs["rng.torch"])
    set_random_states(meta)
    return state, good, replay, Counters.read(meta), set(meta["applied"])


def random_states() -> dict[str, Any]:
    """Python's and numpy's global random states, JSON-able (torch's is a tensor)."""
    st = np.random.get_state()  # a tuple holding an array
    return {"python_random": jsonable(random.getstate()), "numpy_random": jsonable(st)}


def set_random_states(meta: dict[str, Any]) -> None:
    """Restore :func:`random_states`'s output."""
    random.setstate(_tuples(meta["python_random"]))
    st = meta["numpy_random"]
    np.random.set_state((st[0], np.array(st[1], dtype=np.uint32), *st[2:]))


def jsonable(x: Any) -> Any:
    """JSON-able Python values: tuples as lists, tensors and numpy values as Python values,
    keys as strings."""
    if isinstance(x, Tensor | np.ndarray):
        return x.tolist()
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [jsonable(v) for v in x]
    return x.item() if isinstance(x, np.integer | np.floating) else x


def _tuples(x: Any) -> Any:
    return tuple(_tuples(v) for v in x) if isinstance(x, list) else x


def memory_template(saved: dict[str, Tensor], prefix: str) -> dict[str, Params]:
    """Rebuild ``RunState.memory`` (modifier -> key -> tensor) from saved names such as
    ``"{prefix}.memory['lr']['step']"``: a modifier's memory keys are not known in advance."""
    out: dict[str, Params] = {}
    head = f"{prefix}.memory["
    for name, t in saved.items():
        if name.startswith(head):
            mod, key = _two_keys(name[len(head) - 1 :])
            out.setdefault(mod, {})[key] = t
    return out


def _two_keys(text: str) -> tuple[str, str]:
    """``"['a']['b']"`` -> ``("a", "b")``."""
    parts = text.replace("']['", "\0").strip("[]'").split("\0")
    if len(parts) != 2:
        raise KeyError(f"unexpected memory entry {text!r}")
    return parts[0], parts[1]


@dataclass
class Counters:
    """The run's counters and clocks, saved in a checkpoint's JSON by field name."""

    step: int = 0
    cycle: int = 0
    average: float | None = None  # running average of the base steps' loss
    first_loss: float | None = None  # the first base step's loss (divergence floor)
    last_loss: float = 0.0
    seconds: float = 0.0
    divergences: int = 0  # base steps whose loss jumped above DIVERGENCE_FACTOR x average
    diverged_at: int | None = None  # the fixed baseline: where a NaN ended it
    shift_cycle: int | None = None  # the cycle at which the data source changed
    cycled_at: int = -1  # the step whose cycle has run (step-level driving)
    source_id: int = 0  # the data source trained on
    #: training examples the base steps drew (a rolled-back step's too; None: resumed from a
    #: checkpoint written before this counter)
    examples: int | None = 0
    #: wall-clock seconds of the race, the cycles (probes, estimates, replays, verification,
    #: checkpoints) and the log points (guard passes, early stopping's offers):
    #: self-modification's own cost, within ``seconds``
    meta_seconds: float = 0.0
    #: self-modification's work in example-equivalents (:mod:`.budget`), and the cycles
    #: skipped because it was over ``meta_budget``
    meta_examples: float = 0.0
    cycles_skipped: int = 0
    last_cycle: float = 0.0  # the last cycle's work: the next one's estimate
    raced: bool = False  # the rates' level has been raced (``level_race``, :mod:`.race`)
    #: the choices' options have been raced (``modifiers.choice.race``, :mod:`.option_race`)
    options_raced: bool = False
    spiked_at: int | None = None  # the last base step whose loss spiked (:func:`.verifier.spike`)

    #: counters added after checkpoints were first written, and their value when absent from
    #: an older one (not known)
    LATER: ClassVar[dict[str, Any]] = {
        "examples": None, "meta_seconds": math.nan, "meta_examples": 0.0, "cycles_skipped": 0,
        "last_cycle": 0.0, "raced": True, "spiked_at": None, "options_raced": True,
    }  # fmt: skip

    def took(self, loss: float) -> None:
        """A base step that trained, with its ``loss``: the step counted, the losses' running
        average (the divergence check's; a spiking loss left out), the first and the last."""
        if self.spiked_at != self.step:
            self.average = loss if self.average is None else 0.9 * self.average + 0.1 * loss
        self.first_loss = loss if self.first_loss is None else self.first_loss
        self.last_loss = loss
        self.step += 1

    def saved(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def read(cls, meta: dict[str, Any]) -> Counters:
        """From :meth:`saved`'s fields in ``meta`` (a later counter may be absent)."""
        names = [f.name for f in fields(cls)]
        return cls(**{k: meta.get(k, cls.LATER[k]) if k in cls.LATER else meta[k] for k in names})
