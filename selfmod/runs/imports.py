"""``model``, ``data`` and ``loss`` of a config: a built-in name or ``"package.module:callable"``
imported from the current directory and ``PYTHONPATH``, checked to return the right thing.

Every failure is one line naming the field and the fix (a :class:`ConfigError`, exit code 2 in
the CLI): an import that fails, a callable that returns the wrong thing, shapes that do not fit.

A run directory carries data, never code: a resumed run imports a ``"package.module:callable"``
its ``config.json`` names only if the user allows it on the command line
(``selfmod resume DIR --allow-import package.module:callable``, see :class:`Imports`), and never
a module that resolves inside the run directory.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfmod.data import Dataset, Split, hold_out
from selfmod.validation import ConfigError

LOSSES: dict[str, Callable[[Any, Tensor], Tensor]] = {
    "cross_entropy": F.cross_entropy,
    "mse": F.mse_loss,
}


@dataclass(frozen=True)
class Imports:
    """What a resumed run may import: the specs the user ``allowed`` on the command line
    (``"package.module:callable"`` exactly, or a module or package name for all of its
    callables), never a module inside ``run_dir``."""

    allowed: frozenset[str]
    run_dir: Path

    @classmethod
    def of(cls, allowed: Iterable[str], run_dir: str | os.PathLike[str]) -> Imports:
        return cls(frozenset(allowed), Path(run_dir).resolve())

    def permits(self, spec: str) -> bool:
        module = spec.partition(":")[0]
        return spec in self.allowed or any(
            module == a or module.startswith(f"{a}.") for a in self.allowed if ":" not in a
        )

    def check(self, field: str, spec: str) -> None:
        """One line naming the field and the fix unless ``spec`` may be imported."""
        if not self.permits(spec):
            raise ConfigError(
                f"{field} = {spec!r} in {self.run_dir / 'config.json'} names code to import; "
                f"a run directory never runs code on its own: resume with --allow-import {spec} "
                "if you trust it"
            )
        top = spec.partition(":")[0].partition(".")[0]
        _search_cwd()
        try:
            found = importlib.util.find_spec(top) if top else None  # locates, runs nothing
        except (ImportError, ValueError):
            found = None
        places = [found.origin] if found is not None and found.has_location else []
        places += list(getattr(found, "submodule_search_locations", None) or [])
        for place in places:
            if place and Path(place).resolve().is_relative_to(self.run_dir):
                raise ConfigError(
                    f"{field} = {spec!r} resolves to {place}, inside the run directory; a run "
                    "directory never runs code: move the module out of it (onto PYTHONPATH)"
                )


def user_specs(cfg: Any) -> list[tuple[str, str]]:
    """``(field, spec)`` of every model, data and loss of ``cfg`` that is not built in."""
    from selfmod.introspect.config import DATA, MODELS

    builtin = {"model": MODELS, "data": DATA, "loss": tuple(LOSSES)}
    return [(f, getattr(cfg, f)) for f in builtin if getattr(cfg, f) not in builtin[f]]


def _search_cwd() -> None:
    """User modules are found in the current directory (then on ``PYTHONPATH``)."""
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)


def load_object(field: str, spec: str) -> Any:
    """The attribute named by ``"package.module:name"``; the current directory is searched."""
    module_name, _, attr = spec.partition(":")
    _search_cwd()
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # any error while importing user code
        raise ConfigError(
            f"{field} = {spec!r}: cannot import {module_name!r} ({type(err).__name__}: {err}); "
            "check the name and that its folder is the current directory or on PYTHONPATH"
        ) from None
    if not hasattr(module, attr):
        raise ConfigError(f"{field} = {spec!r}: module {module_name!r} has no {attr!r}")
    return getattr(module, attr)


def _call(field: str, spec: str) -> Any:
    fn = load_object(field, spec)
    if not callable(fn):
        raise ConfigError(f"{field} = {spec!r} is not callable; name a function of no arguments")
    try:
        return fn()
    except Exception as err:
        raise ConfigError(f"{field} = {spec!r} raised {type(err).__name__}: {err}") from None


def load_model(spec: str) -> nn.Module:
    """``"package.module:callable"`` -> the ``nn.Module`` it returns."""
    model = _call("model", spec)
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"model = {spec!r} must return a torch.nn.Module (got {type(model).__name__})"
        )
    if not any(p.is_floating_point() for p in model.parameters()):
        raise ConfigError(
            f"model = {spec!r} returned {type(model).__name__} without a floating-point "
            "parameter: nothing to train; name a callable that returns a model with parameters"
        )
    return model


def load_loss(spec: str) -> Callable[[Any, Tensor], Tensor]:
    """A built-in loss or the callable ``(output, target) -> scalar`` named by ``spec``."""
    if spec in LOSSES:
        return LOSSES[spec]
    fn = load_object("loss", spec)
    if not callable(fn):
        raise ConfigError(f"loss = {spec!r} is not callable; name (output, target) -> scalar")
    return fn


def load_data(spec: str, guard_size: int, seed: int) -> Split:
    """``"package.module:callable"`` returning ``(x_train, y_train, x_test, y_test)`` tensors or
    a :class:`selfmod.data.Dataset`; ``guard_size`` training examples are held out as guard."""
    data = _call("data", spec)
    if (
        isinstance(data, tuple | list)
        and len(data) == 4
        and all(isinstance(t, Tensor) for t in data)
    ):
        x, y, xt, yt = data
        for name, a, b in (("train", x, y), ("test", xt, yt)):
            if len(a) != len(b):
                raise ConfigError(
                    f"data = {spec!r}: {name} x and y differ in length ({len(a)} vs {len(b)})"
                )
        data = Dataset(x, y, xt, yt, num_classes=0)
    if not isinstance(data, Dataset):
        raise ConfigError(
            f"data = {spec!r} must return (x_train, y_train, x_test, y_test) tensors or a "
            f"selfmod.data.Dataset (got {type(data).__name__})"
        )
    if guard_size >= len(data.x_train):
        raise ConfigError(
            f"guard_size must be < the {len(data.x_train)} training examples of {spec!r} "
            f"(got {guard_size})"
        )
    return hold_out(data, guard_size, seed)


def build_problem(cfg: Any, imports: Imports | None = None) -> tuple[Any, list[Split]]:
    """``(problem, splits)`` of a config: its model, data and loss, built-in or imported
    (the model is built after seeding torch with ``cfg.seed``). With ``imports`` (a resumed
    run) every import is checked against it first, before any code runs."""
    from selfmod.introspect.builtin import builtin_module, builtin_splits, uses_factorable
    from selfmod.introspect.config import DATA, MODELS
    from selfmod.introspect.problem import Problem, default_metric

    if imports is not None:
        for field, spec in user_specs(cfg):
            imports.check(field, spec)

    try:
        splits = (
            builtin_splits(cfg)
            if cfg.data in DATA
            else [load_data(cfg.data, cfg.guard_size, cfg.seed)]
        )
    except ValueError as err:  # e.g. a guard set as large as the data
        raise ConfigError(f"{err} (data = {cfg.data!r})") from None
    loss = load_loss(cfg.loss)
    first = splits[0]
    torch.manual_seed(cfg.seed)
    if cfg.model in MODELS:
        if first.x.dim() != 2 or first.y.is_floating_point():
            raise ConfigError(
                f"model = {cfg.model!r} needs (N, features) inputs and class labels; data "
                f"{cfg.data!r} gives inputs of shape {tuple(first.x.shape)}: name your own model"
            )
        classes = int(max(int(first.y.max()), int(first.y_test.max()))) + 1
        module = builtin_module(
            cfg.model, cfg.depth, first.x.shape[1], cfg.width, classes,
            factorable=uses_factorable(cfg),
        )  # fmt: skip
    else:
        module = load_model(cfg.model)
    check_fit(module, loss, first, cfg)
    return Problem(module, loss, metric=default_metric(first.y, cfg.metric)), splits


def check_fit(model: nn.Module, loss: Callable, split: Split, cfg: Any) -> None:
    """One forward and loss on two guard examples, or a one-line error naming the fields."""
    try:
        with torch.no_grad():
            was = model.training
            model.eval()
            out = model(split.guard_x[:2])
            model.train(was)
            value = loss(out, split.guard_y[:2])
        if not (isinstance(value, Tensor) and value.dim() == 0):
            raise ValueError(
                f"the loss returned {type(value).__name__} of shape "
                f"{tuple(getattr(value, 'shape', ()))}, not a scalar tensor"
            )
    except Exception as err:
        raise ConfigError(
            f"model {cfg.model!r}, data {cfg.data!r} and loss {cfg.loss!r} do not fit together: "
            f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}; "
            "check the model's input and output shapes and the loss"
        ) from None
