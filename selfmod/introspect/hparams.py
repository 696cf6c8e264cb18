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

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
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
class Entry:
    """One hyperparameter: ``natural = transform(h[key])``, ``h[key]`` of ``size`` entries
    (``0``: a scalar)."""

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
    """The hyperparameters of one run: the optimizer's and the dropout sites' rates."""

    optimizer: OptimizerName
    tensor_names: tuple[str, ...]
    dropout_sites: int  # 0: no learnable dropout

    @property
    def entries(self) -> tuple[Entry, ...]:
        t = len(self.tensor_names)
        out = [Entry("log_lr", "lr", "exp", t)]
        if self.optimizer == "sgd":
            out.append(Entry("mom_logit", "momentum", "sigmoid", 0))
        elif not self.optimizer.startswith(LEARNED):
            out += [Entry("beta1_logit", "beta1", "sigmoid", 0)]
            out += [Entry("beta2_logit", "beta2", "sigmoid", 0)]
        out.append(Entry("log_wd", "weight_decay", "exp", 0))
        if self.dropout_sites:
            out.append(Entry("drop_logit", "dropout", "sigmoid", self.dropout_sites))
        return tuple(out)

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
        """The optimizer with every hyperparameter a callable of ``hparams``."""
        names = self.tensor_names

        def lr(h: Params) -> Params:
            return {k: h["log_lr"][i].exp() for i, k in enumerate(names)}

        def wd(h: Params) -> Tensor:
            return h["log_wd"].exp()

        if self.optimizer == "sgd":
            return optim.sgd(lr=lr, momentum=_sigmoid("mom_logit"), weight_decay=wd)
        if self.optimizer.startswith(LEARNED):
            learned = load_learned(Path(self.optimizer[len(LEARNED) :]).expanduser())
            return optim.chain(optim.add_decayed_weights(wd), learned.transform(), optim.scale(lr))
        make = optim.adam if self.optimizer == "adam" else optim.adamw
        return make(
            lr=lr,
            b1=_sigmoid("beta1_logit"),
            b2=_sigmoid("beta2_logit"),
            weight_decay=wd,
            eps_root=EPS_ROOT,
        )


def _sigmoid(key: str) -> Callable[[Params], Tensor]:
    def value(h: Params) -> Tensor:
        return torch.sigmoid(h[key])

    return value
