"""The hyperparameters a run can change, declared once: each entry's name, unconstrained form
(``log`` or ``logit``), shape (scalar, per tensor or per dropout site) and initial value.

The space generates the ``hparams`` dict the optimizer reads through callables
(``lr = exp(h["log_lr"][i])`` for tensor ``i``), and the natural-unit values the ledger and the
report show. Optimizers: ``sgd`` (momentum, L2 weight decay), ``adam`` (L2 weight decay) and
``adamw`` (decoupled weight decay), all from :mod:`selfmod.optim`, and ``learned:DIR``: a
learned optimizer written by ``selfmod meta-train`` into ``DIR``
(:mod:`selfmod.optim.saved`), its weights fixed, its update scaled per tensor by the run's
learning rate and fed the L2-decayed gradient:

    u_i = lr_i * f_w(g + wd * theta)_i        (theta_i <- theta_i + u_i)

where ``f_w`` is the learned update (additive, descent built in) of tensor ``i``: ``lr_i`` is a
multiplier of the learned step (``lr = 1`` runs the optimizer as meta-trained), which the
``lr`` modifier tunes per tensor like any learning rate; ``weight_decay`` likewise. The space
has no momentum or betas then (the learned rule has its own memory).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import AfterValidator
from torch import Tensor

from selfmod import optim
from selfmod.optim.saved import load_learned

Params = dict[str, Tensor]
OPTIMIZERS = ("sgd", "adam", "adamw", "learned:DIR")
#: ``optimizer = "learned:DIR"``: a learned optimizer from the meta-train output folder DIR
LEARNED = "learned:"


def check_optimizer(name: str) -> str:
    """The config's ``optimizer`` value if well formed (the folder is read when the run is
    built: :meth:`HParamSpace.make_optimizer`), else ``ValueError`` in one line."""
    if name in OPTIMIZERS[:3] or (name.startswith(LEARNED) and name[len(LEARNED) :].strip()):
        return name
    raise ValueError(
        "optimizer must be 'sgd', 'adam', 'adamw' or 'learned:DIR' (DIR: a folder written by "
        f"selfmod meta-train) (got {name!r:.200})"
    )


#: the config field's type: one of :data:`OPTIMIZERS`, checked by :func:`check_optimizer`
OptimizerName = Annotated[str, AfterValidator(check_optimizer)]
#: Adam's sqrt(v + eps_root): a meta-gradient through sqrt at v = 0 would be infinite
EPS_ROOT = 1e-16


@dataclass(frozen=True)
class HParam:
    """One tunable hyperparameter, declared once: ``natural = transform(h[key])``.

    ``per``: one value (``"scalar"``), one per parameter tensor (``"tensor"``) or one per
    dropout site (``"site"``). A run starts it at the config field ``name`` (where the config
    has one; else the optimizer factory's default), clamped into ``bounds`` (``log 0`` and
    ``logit 1`` are not numbers). ``optional``: in the space only when a chosen modifier
    ``needs`` its key; otherwise the factory keeps its default, a constant.
    """

    key: str  # name in the hparams dict, e.g. "log_lr"
    name: str  # natural name (logs, ledger, report, config), e.g. "lr"
    transform: Literal["exp", "sigmoid"]
    per: Literal["scalar", "tensor", "site"] = "scalar"
    bounds: tuple[float, float] = (-math.inf, math.inf)
    optional: bool = False
    #: how the report plots it: the value, or ``1 - value`` (a decay rate close to 1)
    shown: Literal["value", "complement"] = "value"
    #: a 0-dim log factor in ``hparams`` (when there) added to every entry: the schedule
    scaled_by: str | None = None

    def value(self, h: Params, names: Sequence[str]) -> Tensor | Params:
        """What the optimizer reads: ``{tensor name: lr_i}`` per tensor, else a tensor."""
        if self.per == "tensor":
            v = h[self.key] + h[self.scaled_by] if self.scaled_by in h else h[self.key]
            return dict(zip(names, v.exp().unbind(), strict=True))
        return h[self.key].exp() if self.transform == "exp" else torch.sigmoid(h[self.key])


#: ``hparams[LR_SCHEDULE]``: the log of the schedule's factor on every learning rate now
#: (:mod:`selfmod.introspect.schedule`); the rates the modifiers tune are the levels
LR_SCHEDULE = "lr_schedule"
LR = HParam("log_lr", "lr", "exp", per="tensor", scaled_by=LR_SCHEDULE)
MOMENTUM = HParam("mom_logit", "momentum", "sigmoid", bounds=(1e-3, 1.0), shown="complement")
BETA1 = HParam("beta1_logit", "beta1", "sigmoid", shown="complement")
BETA2 = HParam("beta2_logit", "beta2", "sigmoid", shown="complement")
EPS = HParam("log_eps", "eps", "exp", optional=True)
WEIGHT_DECAY = HParam("log_wd", "weight_decay", "exp", bounds=(1e-7, math.inf))
DROPOUT = HParam("drop_logit", "dropout", "sigmoid", per="site", bounds=(0.01, 0.95))


@dataclass(frozen=True)
class Declared:
    """An optimizer factory and which of its keyword arguments are hyperparameters (as optax's
    ``inject_hyperparams`` reads them from the factory): each becomes a callable of
    ``hparams``; ``fixed`` arguments are passed as they are."""

    factory: Callable[..., optim.GradientTransformation]
    hparams: dict[str, HParam]  # factory argument -> hyperparameter
    fixed: dict[str, Any] = field(default_factory=dict)

    def default(self, hp: HParam) -> float:
        """The factory's own default for ``hp`` (an optional entry's value when off)."""
        arg = next(a for a, h in self.hparams.items() if h is hp)
        return float(inspect.signature(self.factory).parameters[arg].default)


def _learned(lr: Any, weight_decay: Any, *, folder: str) -> optim.GradientTransformation:
    """``u_i = lr_i * f_w(g + wd * theta)_i`` (the module docstring)."""
    learned = load_learned(Path(folder).expanduser())
    return optim.chain(
        optim.add_decayed_weights(weight_decay), learned.transform(), optim.scale(lr)
    )


_ADAM = {"lr": LR, "b1": BETA1, "b2": BETA2, "eps": EPS, "weight_decay": WEIGHT_DECAY}
#: every optimizer a run can use, with its hyperparameters: the one place they are declared
DECLARED: dict[str, Declared] = {
    "sgd": Declared(optim.sgd, {"lr": LR, "momentum": MOMENTUM, "weight_decay": WEIGHT_DECAY}),
    "adam": Declared(optim.adam, _ADAM, {"eps_root": EPS_ROOT}),
    "adamw": Declared(optim.adamw, _ADAM, {"eps_root": EPS_ROOT}),
}


def declared(optimizer: str) -> Declared:
    """The declaration of ``optimizer`` (``learned:DIR`` reads DIR when the run is built)."""
    if optimizer.startswith(LEARNED):
        folder = optimizer[len(LEARNED) :]
        return Declared(_learned, {"lr": LR, "weight_decay": WEIGHT_DECAY}, {"folder": folder})
    return DECLARED[optimizer]


@dataclass(frozen=True)
class Entry:
    """One hyperparameter of a run: ``natural = transform(h[key])``, ``h[key]`` of ``size``
    entries (``0``: a scalar)."""

    key: str  # name in the hparams dict, e.g. "log_lr"
    name: str  # natural name for logs, e.g. "lr"
    transform: Literal["exp", "sigmoid"]
    size: int  # 0 for a scalar, else a vector (per tensor or per dropout site)

    def natural(self, value: Tensor) -> Any:
        v = value.exp() if self.transform == "exp" else torch.sigmoid(value)
        return float(v) if self.size == 0 else v.tolist()


def unconstrained(transform: str, value: float) -> float:
    """The inverse transform: ``log value`` or ``logit value``."""
    return math.log(value) if transform == "exp" else math.log(value / (1 - value))


@dataclass(frozen=True)
class HParamSpace:
    """The hyperparameters of one run: its optimizer's (:data:`DECLARED`) and the dropout
    sites' rates; ``wanted``: the keys of optional entries that a chosen modifier needs."""

    optimizer: OptimizerName
    tensor_names: tuple[str, ...]
    dropout_sites: int  # 0: no learnable dropout
    wanted: frozenset[str] = frozenset()

    def declared(self) -> list[HParam]:
        """The run's hyperparameters, in order: the optimizer's, then dropout."""
        hps = [h for h in declared(self.optimizer).hparams.values()]
        hps = [h for h in hps if not h.optional or h.key in self.wanted]
        return hps + ([DROPOUT] if self.dropout_sites else [])

    def described(self) -> list[dict[str, str]]:
        """``[{"name", "per", "shown"}]`` of each hyperparameter (what the report plots)."""
        return [{"name": h.name, "per": h.per, "shown": h.shown} for h in self.declared()]

    @property
    def entries(self) -> tuple[Entry, ...]:
        sizes = {"scalar": 0, "tensor": len(self.tensor_names), "site": self.dropout_sites}
        return tuple(Entry(h.key, h.name, h.transform, sizes[h.per]) for h in self.declared())

    def start(self, config: Any, lrs: Sequence[float] | None = None) -> dict[str, Any]:
        """Natural starting values: each entry's config field of its name (else the factory's
        default), clamped into its bounds; ``lrs``: one learning rate per tensor instead."""
        d = declared(self.optimizer)
        out: dict[str, Any] = {}
        for h in self.declared():
            v = getattr(config, h.name) if hasattr(config, h.name) else d.default(h)
            out[h.name] = min(max(v, h.bounds[0]), h.bounds[1])
        if lrs is not None:
            if len(lrs) != len(self.tensor_names):
                n = len(self.tensor_names)
                raise ValueError(f"lrs needs one rate per tensor ({n}; got {len(lrs)})")
            out[LR.name] = list(lrs)
        return out

    def init(self, values: dict[str, float | Sequence[float]]) -> Params:
        """``hparams`` from natural values, e.g. ``{"lr": 0.1, "momentum": 0.9, ...}``; a
        per-tensor entry takes one value (for every tensor) or one per tensor."""
        h = {}
        for e in self.entries:
            v = values[e.name]
            if e.size == 0:
                h[e.key] = torch.tensor(unconstrained(e.transform, float(v)))
            elif isinstance(v, int | float):
                h[e.key] = torch.full((e.size,), unconstrained(e.transform, float(v)))
            else:
                if len(v) != e.size:
                    raise ValueError(f"{e.name} needs {e.size} values (got {len(v)})")
                h[e.key] = torch.tensor([float(x) for x in v])
                h[e.key] = h[e.key].log() if e.transform == "exp" else h[e.key].logit()
        return h

    def values(self, h: Params) -> dict[str, Any]:
        """Natural values for logs: ``{"lr": [...], "momentum": 0.9, ...}``."""
        out: dict[str, Any] = {}
        for e in self.entries:
            if e.key in h:
                out[e.name] = e.natural(h[e.key])
        if "lr" in out:
            out["lr"] = [round(v, 8) for v in out["lr"]]
        return out

    def make_optimizer(self) -> optim.GradientTransformation:
        """The optimizer with every hyperparameter in the space a callable of ``hparams``."""
        d, names = declared(self.optimizer), self.tensor_names
        on = {h.key for h in self.declared()}
        args = {a: _reader(h, names) for a, h in d.hparams.items() if h.key in on}
        return d.factory(**args, **d.fixed)


def _reader(hp: HParam, names: Sequence[str]) -> Callable[[Params], Any]:
    @optim.of_hparams_only
    def value(h: Params) -> Any:
        return hp.value(h, names)

    return value
