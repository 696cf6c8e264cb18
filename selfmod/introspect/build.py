"""A run's pieces from its config (:func:`pieces`): the modifiers that apply, the hyperparameter
space and its starting values, the optimizer, the losses, the initial state and the data feed."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from selfmod import optim
from selfmod.errors import SelfmodError
from selfmod.introspect.feed import AUTOCAST, DTYPES, Feed, Source, device_of, place
from selfmod.introspect.hparams import HParamSpace
from selfmod.introspect.lookahead import Losses
from selfmod.introspect.modifiers import Modifier, default_names, registry
from selfmod.introspect.modifiers.base import RunFacts
from selfmod.introspect.problem import Problem
from selfmod.introspect.state import RunState

Params = dict[str, Tensor]


def chosen_modifiers(config: Any, given: Sequence[Modifier] | None) -> tuple[list[Modifier], bool]:
    """``(modifiers, named)``: the given objects, the config's names, or (not named) every
    registered default one (those that do not apply are skipped by :func:`applicable`)."""
    if given is not None:
        return list(given), True
    reg, names = registry(), config.modifiers
    named = names is not None
    wanted = names if named else default_names()
    return [reg[n].from_config(config) for n in reg if n in wanted], named


def applicable(
    chosen: Sequence[Modifier], problem: Problem, hparams: Params, facts: RunFacts, named: bool
) -> tuple[list[Modifier], dict[str, str]]:
    """``(modifiers that apply, {skipped default: why})``; a named one that does not apply is
    a one-line error."""
    modifiers, skipped = [], {}
    for m in chosen:
        why = m.applies(problem, hparams, facts)
        if why is None:
            modifiers.append(m)
        elif named:
            raise SelfmodError(f"modifiers: {why}; remove {m.name!r} from modifiers")
        else:
            skipped[m.name] = why
    return modifiers, skipped


def space_of(
    config: Any, names: Sequence[str], sites: int, chosen: Sequence[Modifier]
) -> HParamSpace:
    """The run's hyperparameters: its optimizer's, the learned dropout rates of ``sites``
    sites, and the optional ones a chosen modifier ``needs``."""
    wanted = frozenset(k for m in chosen for k in m.needs)
    return HParamSpace(config.optimizer, tuple(names), sites, wanted)


def make_optimizer(space: HParamSpace, meta_horizon: int) -> optim.GradientTransformation:
    """The space's optimizer; with a ``meta_horizon``, chained with the first-order tangent
    of the params w.r.t. log lr (:func:`selfmod.optim.sum_updates`)."""
    opt = space.make_optimizer()
    if meta_horizon:
        opt = optim.chain(opt, optim.sum_updates(1.0 - 1.0 / meta_horizon))
    return opt


def noise_width(config: Any, problem: Problem, params: Params, buffers: Params, x: Any) -> int:
    """The dropout noise's width: the widest a layer may become under any registered modifier
    or is now at a dropout site (its input's dim 1, from the example ``x``)."""
    widths: list[int] = []
    if problem.dropout_sites:
        hooks = [
            problem.module.get_submodule(s).register_forward_hook(
                lambda m, inp, out: widths.append(int(inp[0].shape[1]))
            )
            for s in problem.dropout_sites
        ]
        try:
            problem.predict(params, buffers, x)
        finally:
            for h in hooks:
                h.remove()
    widest = [cls.from_config(config).widest() for cls in registry().values()]
    return max(*widest, *widths, 1)


@dataclass
class Pieces:
    """What :func:`pieces` builds for a :class:`~selfmod.introspect.loop.Loop`."""

    device: torch.device
    dtype: torch.dtype
    rng: torch.Generator  # the run's generator (dropout noise, reservoirs, growth seeds)
    names: list[str]  # parameter tensors, in the order of the per-tensor learning rates
    space: HParamSpace
    modifiers: list[Modifier]  # those that apply
    skipped: dict[str, str]  # default modifiers that do not apply, and why
    losses: Losses
    opt: optim.GradientTransformation
    state: RunState
    feed: Feed


def pieces(
    problem: Problem,
    sources: list[Source],
    config: Any,
    given: Sequence[Modifier] | None,
    tune: bool,
    lrs: Sequence[float] | None,
    device: torch.device | str | None,
    dtype: torch.dtype | None,
) -> Pieces:
    """Seed every generator from ``config.seed``, put the model and ``sources`` on the run's
    device, then choose the modifiers (none for the fixed baseline, ``tune=False``) and make
    the space, the optimizer and the initial state."""
    cfg = config
    device = device_of(cfg) if device is None else torch.device(device)
    dtype = DTYPES[cfg.dtype] if dtype is None else dtype
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    rng = torch.Generator().manual_seed(cfg.seed)
    problem.module.to(device=device, dtype=dtype)
    problem.autocast = AUTOCAST[cfg.autocast]
    params, buffers = problem.init()
    names = list(params)
    place(sources, device, dtype, cfg.batch_size)
    chosen, named = chosen_modifiers(cfg, given) if tune else ([], False)
    wants_dropout = cfg.dropout > 0 or any(m.name == "dropout" for m in chosen)
    sites = len(problem.dropout_sites) if problem.dropout_sites and wants_dropout else 0
    space = space_of(cfg, names, sites, chosen)
    hparams = {k: v.to(device, dtype) for k, v in space.init(space.start(cfg, lrs)).items()}
    facts = RunFacts(cfg, getattr(sources[0].train, "resizable", True))
    modifiers, skipped = applicable(chosen, problem, hparams, facts, named)
    for m in modifiers:
        hparams.update({k: v.to(device, dtype) for k, v in m.hparams_init(problem).items()})
    penalties = [m for m in modifiers if type(m).penalty is not Modifier.penalty]
    opt = make_optimizer(space, cfg.meta_horizon)
    state = RunState(params, buffers, opt.init(params), hparams, cfg.batch_size, {}, cfg.meta_lr)
    width = noise_width(cfg, problem, params, buffers, sources[0].guard_x[:1])
    feed = Feed(sources, device, dtype, rng, sites, width)
    losses = Losses(problem, penalties, bool(sites))
    return Pieces(
        device, dtype, rng, names, space, modifiers, skipped, losses, opt, state.contiguous(), feed
    )
