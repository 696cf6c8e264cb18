"""A run's pieces from its config: the modifiers that apply, the hyperparameter space and its
starting values, the optimizer, and the width at which dropout noise is drawn."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

from selfmod import optim
from selfmod.errors import SelfmodError
from selfmod.introspect.hparams import HParamSpace
from selfmod.introspect.modifiers import Modifier, default_names, registry
from selfmod.introspect.modifiers.base import RunFacts
from selfmod.introspect.problem import Problem

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
