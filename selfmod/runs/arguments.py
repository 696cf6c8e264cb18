"""Up-front checks of the arguments of :func:`selfmod.runs.fit` and
:class:`selfmod.runs.SelfModifier`: a misuse is one :class:`ArgumentError` line that names the
argument and the fix, before a run directory or a training step, never an internal error far
from the cause::

    train: x has 100 rows but y has 99; pass tensors of the same length
    loss: returned a float, not a Tensor; return the loss tensor itself (no float() or .item())

What is checked: the model (an ``nn.Module`` with a floating parameter, whose forward on two
guard rows returns one Tensor), the data (``(x, y)`` pairs of equal length, non-empty, finite,
of the guard's kinds and row shapes; labels in ``[0, C)`` of the model's ``C`` outputs for a
cross-entropy loss), the loss (a real floating 0-dim tensor that requires grad, finite on the
probe), ``modifiers`` (objects), ``groups`` (:class:`selfmod.arch.UnitGroup`), ``metric`` and
``config``. Integer inputs pass where the model takes them (an ``nn.Embedding``).

The probe forward runs in eval mode on the module's own parameters through the run's
functional call (no buffer or parameter is written, no ``.grad``) under a forked random state,
so that a checked run trains exactly as an unchecked one.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfmod import arch
from selfmod.errors import SelfmodError

#: rows of the guard set the probe forward runs on; the loss is tried on the first 2 and on
#: all 3 (a target that only broadcasts by chance, as (2, 2) against (2,), fails on one)
PROBE_ROWS = 3
METRICS = (None, "auto", "accuracy", "loss")
#: the training data of ``SelfModifier``: its batches come from ``step``, checked there
FROM_STEPS: Any = object()


class ArgumentError(SelfmodError, TypeError, ValueError):
    """An argument of ``fit`` or ``SelfModifier`` cannot be used; the message (one line)
    names the argument and the fix. A ``TypeError`` and a ``ValueError`` too, as the internal
    errors it replaces were."""


def _fail(where: str, why: str) -> ArgumentError:
    """``where: why`` on one line (a newline in a user's text is shown escaped)."""
    text = f"{where}: {why}"
    return ArgumentError(text.replace("\r", "\\r").replace("\n", "\\n"))


def _first_line(err: BaseException, limit: int = 160) -> str:
    text = (str(err).strip().splitlines() or [""])[0]
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _kind(t: Tensor) -> str:
    """``"floating"``, ``"complex"``, ``"bool"`` or ``"integer"``: what a dtype is for."""
    if t.is_floating_point():
        return "floating"
    if t.is_complex():
        return "complex"
    return "bool" if t.dtype == torch.bool else "integer"


def _dtype(t: Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _a(word: str) -> str:
    """``word`` with its article: ``a float``, ``an int64``."""
    return f"{'an' if word[:1].lower() in 'aeiou' else 'a'} {word}"


# -- the model, the loss and the other arguments ---------------------------------------------


def check_model(model: Any) -> None:
    """An ``nn.Module`` with at least one floating-point parameter."""
    if not isinstance(model, nn.Module):
        raise _fail(
            "model",
            f"must be a torch.nn.Module (got {type(model).__name__}); wrap a function in an "
            "nn.Module whose parameters it uses",
        )
    params = list(model.parameters())
    if not params:
        raise _fail(
            "model",
            f"{type(model).__name__} has no parameters, so there is nothing to train; pass a "
            "model with at least one nn.Parameter",
        )
    if not any(p.is_floating_point() for p in params):
        raise _fail(
            "model",
            f"{type(model).__name__} has no floating-point parameter (got "
            f"{sorted({_dtype(p) for p in params})}); train a model with float parameters",
        )


def check_arguments(
    loss: Any,
    optimizer: Any,
    config: Any,
    modifiers: Any,
    groups: Any,
    metric: Any,
    run_dir: Any = None,
    resume: Any = False,
    on_step: Any = None,
) -> None:
    """The arguments that need no data: types and names (the config's values are validated
    by :func:`selfmod.runs.config.validate`)."""
    if not callable(loss):
        raise _fail(
            "loss",
            f"must be a callable (output, target) -> scalar tensor (got {type(loss).__name__}); "
            "pass e.g. torch.nn.functional.cross_entropy",
        )
    if not isinstance(optimizer, str):
        raise _fail(
            "optimizer",
            f"must be a name: 'sgd', 'adam', 'adamw' or 'learned:DIR' (got "
            f"{type(optimizer).__name__}); selfmod builds the optimizer itself",
        )
    if config is not None and not isinstance(config, dict):
        from selfmod.introspect.config import TrainConfig

        if not isinstance(config, TrainConfig):
            raise _fail(
                "config",
                f"must be a dict of config fields or a TrainConfig (got "
                f'{type(config).__name__}); e.g. config={{"steps": 500}}',
            )
    if metric not in METRICS:
        raise _fail(
            "metric",
            f"must be 'accuracy', 'loss' or None (got {metric!r:.80}); 'loss' for regression "
            "and language models",
        )
    _check_modifiers(modifiers)
    _check_groups(groups)
    if run_dir is not None and not isinstance(run_dir, str | Path):
        raise _fail(
            "run_dir",
            f"must be a path (str or pathlib.Path) or None (got {type(run_dir).__name__})",
        )
    if not isinstance(resume, bool):
        raise _fail("resume", f"must be True or False (got {type(resume).__name__})")
    if on_step is not None and not callable(on_step):
        raise _fail(
            "on_step", f"must be a callable run -> None or None (got {type(on_step).__name__})"
        )


def _check_modifiers(modifiers: Any) -> None:
    from selfmod.introspect.modifiers import Modifier

    if modifiers is None:
        return
    if isinstance(modifiers, str | bytes) or not isinstance(modifiers, Sequence):
        raise _fail(
            "modifiers",
            f"must be a list of modifier objects (got {type(modifiers).__name__}); to choose "
            'built-in ones by name use config={"modifiers": [...]}',
        )
    for i, m in enumerate(modifiers):
        if isinstance(m, Modifier):
            continue
        if isinstance(m, str):
            fix = f'to choose built-in ones by name use config={{"modifiers": [{m!r:.40}, ...]}}'
        elif isinstance(m, type) and issubclass(m, Modifier):
            fix = f"pass an instance, {m.__name__}(), not the class"
        else:
            fix = "pass objects of a selfmod.introspect.Modifier subclass"
        raise _fail(f"modifiers[{i}]", f"is {_a(type(m).__name__)}, not a Modifier object; {fix}")


def _check_groups(groups: Any) -> None:
    if groups is None:
        return
    if not isinstance(groups, Sequence) or isinstance(groups, str | bytes):
        raise _fail(
            "groups",
            f"must be a list of selfmod.arch.UnitGroup (got {type(groups).__name__}); "
            "selfmod.arch.sequential_groups(model) finds them in an nn.Sequential",
        )
    for i, g in enumerate(groups):
        if not isinstance(g, arch.UnitGroup):
            raise _fail(
                f"groups[{i}]",
                f"is {_a(type(g).__name__)}, not a selfmod.arch.UnitGroup; build one from the "
                "layer's Slots or leave groups=None",
            )


# -- data -------------------------------------------------------------------------------------


def is_pair(data: Any, loosely: bool = False) -> bool:
    """Whether ``data`` is an ``(x, y)`` pair of tensors (``loosely``: a 2-sequence holding a
    tensor, meant as a pair, of which the other part may be wrong)."""
    if not (isinstance(data, tuple | list) and len(data) == 2):
        return False
    return (any if loosely else all)(isinstance(t, Tensor) for t in data)


def check_pair(where: str, x: Any, y: Any, like: tuple[Tensor, Tensor] | None = None) -> None:
    """``(x, y)``: tensors of equal, non-zero length, finite where floating, and (given
    ``like``, the guard pair) of the guard's kinds and row shapes."""
    for name, t in (("x", x), ("y", y)):
        if not isinstance(t, Tensor):
            raise _fail(
                where,
                f"{name} is {_a(type(t).__name__)}, not a Tensor; pass tensors "
                f"(torch.as_tensor({name}))",
            )
        if t.dim() == 0:
            raise _fail(where, f"{name} is a 0-dim tensor; pass one row per example")
    if len(x) != len(y):
        raise _fail(
            where, f"x has {len(x)} rows but y has {len(y)}; pass tensors of the same length"
        )
    if len(x) == 0:
        fix = "pass at least one example" + (" (or test=None)" if where == "test" else "")
        raise _fail(where, f"has no examples; {fix}")
    if like is not None:
        for name, t, g in (("x", x, like[0]), ("y", y, like[1])):
            if _kind(t) != _kind(g):
                raise _fail(
                    where,
                    f"{name} is {_dtype(t)} but the guard's {name} is {_dtype(g)}; pass the same "
                    "kind of tensor as the guard",
                )
            if t.shape[1:] != g.shape[1:]:
                raise _fail(
                    where,
                    f"{name} rows have shape {tuple(t.shape[1:])} but the guard's have "
                    f"{tuple(g.shape[1:])}; pass rows of the same shape",
                )
    for name, t in (("x", x), ("y", y)):
        if not _all_finite(t):
            bad = int((~torch.isfinite(t)).sum())
            raise _fail(
                where,
                f"{name} has {bad} non-finite value{'s' if bad != 1 else ''} (NaN or inf); "
                "remove or impute them before training",
            )


def _all_finite(t: Tensor) -> bool:
    """Whether every entry of ``t`` is finite (integers always are), by one reduction that
    allocates nothing of ``t``'s size: the sum of a real tensor is NaN or inf iff an entry is,
    or the sum overflows (then the per-entry test decides)."""
    if not (t.is_floating_point() or t.is_complex()):
        return True
    if t.numel() and bool(torch.isfinite(t.sum())):
        return True
    return bool(torch.isfinite(t).all())


def check_train(train: Any, guard: tuple[Tensor, Tensor]) -> None:
    """A ``(x, y)`` training pair is checked as the guard is; a ``Dataset`` or batches are
    read by the run (a 2-sequence holding a tensor is taken as a broken pair)."""
    if is_pair(train, loosely=True):
        check_pair("train", train[0], train[1], like=guard)
    elif isinstance(train, tuple | list) and any(isinstance(t, Tensor) for t in train):
        raise _fail(
            "train",
            f"is {_a(type(train).__name__)} of {len(train)} holding tensors; pass an (x, y) pair "
            "or a list of (x, y) batches",
        )
    elif train is None or isinstance(train, str | bytes | Tensor | int | float):
        raise _fail(
            "train",
            f"must be an (x, y) tensor pair, a Dataset or a re-iterable of (x, y) batches (got "
            f"{type(train).__name__})",
        )
    elif isinstance(train, Iterator):
        raise _fail(
            "train",
            f"is an iterator ({type(train).__name__}), which cannot be replayed; pass the "
            "re-iterable it came from (a list of batches, a Dataset or a DataLoader)",
        )


def materialized(where: str, data: Any) -> tuple[Tensor, Tensor]:
    """Guard or test data as one ``(x, y)`` pair; a shape the run cannot read is one line."""
    from selfmod.data.streams import materialize

    if is_pair(data, loosely=True):
        return data[0], data[1]
    if isinstance(data, tuple | list) and any(isinstance(t, Tensor) for t in data):
        raise _fail(
            where,
            f"is {_a(type(data).__name__)} of {len(data)} holding tensors; pass an (x, y) pair",
        )
    if data is None or isinstance(data, str | bytes | Tensor | int | float):
        raise _fail(
            where,
            f"must be an (x, y) tensor pair, a Dataset or (x, y) batches (got "
            f"{type(data).__name__})",
        )
    try:
        x, y = materialize(data)
    except Exception as err:  # an unreadable Dataset or batches: named, with its cause
        raise _fail(
            where, f"cannot be read as (x, y) examples ({_first_line(err)}); pass an (x, y) pair"
        ) from err
    return x, y


# -- the probe: one forward and one loss on two guard rows --------------------------------------


_CLASSIFICATION = (F.cross_entropy, F.nll_loss)


def _classification(loss: Any) -> tuple[bool, int]:
    """``(is a class-index loss, its ignore_index)``: ``F.cross_entropy``, ``F.nll_loss``, their
    ``nn`` modules and ``functools.partial``\\ s of them."""
    if isinstance(loss, nn.CrossEntropyLoss | nn.NLLLoss):
        return True, loss.ignore_index
    if isinstance(loss, functools.partial) and loss.func in _CLASSIFICATION:
        return True, int(loss.keywords.get("ignore_index", -100))
    return loss in _CLASSIFICATION, -100


def _name(loss: Any) -> str:
    return getattr(loss, "__name__", None) or type(loss).__name__


class Probe:
    """What the probe learned: the model's output row shape and, for a class-index loss, the
    number of classes ``C`` and the label that is ignored."""

    def __init__(self, classes: int | None, ignore_index: int) -> None:
        self.classes, self.ignore_index = classes, ignore_index


def probe(problem: Any, loss: Callable[[Any, Tensor], Tensor], gx: Tensor, gy: Tensor) -> Probe:
    """Run the model and the loss on the first :data:`PROBE_ROWS` guard rows and check what
    they return. Eval mode, the module's own parameters (not written), a forked random state."""
    module: nn.Module = problem.module
    first = next(p for p in module.parameters() if p.is_floating_point())
    x, y = gx[:PROBE_ROWS], gy[:PROBE_ROWS]
    x = x.to(first.device, first.dtype) if x.is_floating_point() else x.to(first.device)
    y = y.to(first.device, first.dtype) if y.is_floating_point() else y.to(first.device)
    params = {
        k: v.detach().requires_grad_(v.is_floating_point()) for k, v in module.named_parameters()
    }
    _, buffers = problem.model.init()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices), torch.enable_grad():
        try:
            out, _ = problem.forward(params, buffers, x, train=False)
        except Exception as err:
            fix = "pass inputs the model takes"
            if not x.is_floating_point():
                fix += f" (x is {_dtype(x)}: x.float() for a model without an nn.Embedding)"
            raise _fail(
                "model",
                f"forward on {len(x)} guard rows of shape {tuple(x.shape[1:])} failed "
                f"({_first_line(err)}); {fix}",
            ) from err
        if not isinstance(out, Tensor):
            raise _fail(
                "model",
                f"forward returns {_a(type(out).__name__)}, not one Tensor; return the output the "
                "loss takes (e.g. wrap the model: logits only)",
            )
        is_class, ignore = _classification(loss)
        classes = _check_labels(loss, out, gy) if is_class else None
        try:
            value = loss(out, y)
            if len(y) > 2:
                loss(out[:2], y[:2])
        except Exception as err:
            raise _fail(
                "loss",
                f"{_name(loss)} on {len(x)} guard rows (output {tuple(out.shape)}, y "
                f"{tuple(y.shape)} {_dtype(y)}) failed ({_first_line(err)}); pass targets and a "
                "loss that fit the model's output",
            ) from err
        _check_loss_value(loss, value)
    return Probe(classes, ignore)


def metric_for(metric: str | None, gy: Tensor) -> str | None:
    """``metric``, refused as ``"accuracy"`` for real-valued targets (no class to compare)."""
    if metric == "accuracy" and (gy.is_floating_point() or gy.is_complex()):
        raise _fail(
            "metric",
            f"'accuracy' compares class indices but the guard's y is {_dtype(gy)}; use "
            "metric='loss' (or None) for real-valued targets",
        )
    return metric


def check_trained(run: Any) -> None:
    """A run that took steps but never a finite one (each rolled back: a loss NaN on every
    batch) ends in one :class:`~selfmod.errors.NonFiniteError` line, not a quiet success."""
    from selfmod.errors import NonFiniteError

    if run.step > 0 and run.counters.first_loss is None:
        raise NonFiniteError(
            f"training loss on every one of the {run.step} steps",
            hint="each rolled back and nothing was trained; check the loss and the training data",
        )


def _check_labels(loss: Any, out: Tensor, gy: Tensor) -> int | None:
    """For a class-index loss: integer labels (or probabilities of the output's shape)."""
    if gy.is_floating_point():
        if gy.dim() == out.dim() and gy.shape[1:] == out.shape[1:]:
            return None  # class probabilities: cross-entropy takes them
        raise _fail(
            "guard",
            f"y is {_dtype(gy)} but {_name(loss)} takes class indices; pass integer labels "
            "(y.long()) or, for regression, a loss such as mse_loss",
        )
    if out.dim() < 2:
        return None
    return int(out.shape[1])


def check_labels(where: str, y: Tensor, found: Probe) -> None:
    """Integer labels in ``[0, C)`` (or the loss's ignore index) for a class-index loss."""
    if found.classes is None or y.is_floating_point() or y.numel() == 0:
        return
    kept = y[y != found.ignore_index]
    if kept.numel() == 0:
        return
    lo, hi = int(kept.min()), int(kept.max())
    if lo < 0 or hi >= found.classes:
        bad = lo if lo < 0 else hi
        raise _fail(
            where,
            f"y has label {bad}, outside [0, {found.classes}) of the model's {found.classes} "
            f"outputs; pass labels 0..{found.classes - 1} or give the model more outputs",
        )


def _check_loss_value(loss: Any, value: Any) -> None:
    """A real floating 0-dim tensor that requires grad and is finite."""
    name = _name(loss)
    if not isinstance(value, Tensor):
        raise _fail(
            "loss",
            f"{name} returned {_a(type(value).__name__)}, not a Tensor; return the loss tensor "
            "itself (no float(), .item() or numpy)",
        )
    if value.is_complex() or not value.is_floating_point():
        raise _fail(
            "loss",
            f"{name} returned {_a(_dtype(value))} tensor; return a real floating-point scalar "
            "(no .long(), .round() or complex values)",
        )
    if value.dim() != 0:
        raise _fail(
            "loss",
            f"{name} returned shape {tuple(value.shape)}, not a scalar; reduce it "
            "(reduction='mean' or .mean())",
        )
    if not value.requires_grad:
        raise _fail(
            "loss",
            f"{name} returned a tensor detached from the model (requires_grad is False); "
            "compute it from the output with torch operations (no .detach() or torch.no_grad())",
        )
    if not math.isfinite(float(value.detach())):
        raise _fail(
            "loss",
            f"{name} is {float(value.detach())} on the first guard rows (finite inputs); "
            "return a finite loss (check logs of zero, divisions and the targets)",
        )


def check_batch(batch: Any, guard: tuple[Tensor, Tensor], found: Probe | None) -> None:
    """A step's batch: an ``(x, y)`` pair of the guard's kinds and shapes, labels in range."""
    if not (isinstance(batch, tuple | list) and len(batch) == 2):
        raise _fail(
            "step: batch",
            f"must be an (x, y) pair (got {type(batch).__name__}"
            + (f" of {len(batch)}" if isinstance(batch, tuple | list) else "")
            + "); pass step((x, y))",
        )
    check_pair("step: batch", batch[0], batch[1], like=guard)
    if found is not None:
        check_labels("step: batch", batch[1], found)
