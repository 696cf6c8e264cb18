"""Ways to find a good MNIST-1D network, each run on one budget and recorded the same way.

Every contender trains the same model family (an MLP ``40 -> w -> w -> 10`` or a 1-D CNN with
two conv layers of ``w`` channels, kernel 5, stride 2: :class:`~selfmod.introspect.network.Network`;
SGD with momentum, weight decay and dropout, batch 128) from the same data split: the training
pool, a validation set of ``guard_size`` training examples (the introspective run's guard set;
search methods select on it), and the test set, which nobody selects on. The search space is
:class:`Point`'s: a learning rate per layer, weight decay, momentum, dropout and width
(:func:`space`: the CNN's width range is narrower, its trials cost ~3x an MLP's).

- :func:`fixed`: the default point, trained once;
- :func:`grid_search`, :func:`random_search`, :func:`tpe_search` (Optuna TPE with its median
  pruner): one trial per point, ``steps`` base steps each;
- :func:`online_hd`: one run of SGD-HD / Adam-HD (Baydin et al. 2018), or of a hyperoptimizer
  stack (Chandra et al. 2022), from the default point;
- :func:`introspective`: one :class:`selfmod.introspect.Introspector` run from the default point,
  with safeguards on or off.

Each returns a :class:`Outcome`: the selected model's test accuracy, the compute spent (base
steps and wall seconds) and a curve of the selected model's test accuracy against compute.
Without safeguards nothing rolls back: a trial or run whose loss jumps above
``DIVERGENCE_FACTOR`` times its running average counts as diverged and trains on, and one that
reaches a non-finite loss stops there (diverged too).
"""

from __future__ import annotations

import itertools
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from selfmod import optim
from selfmod.data import Split, Stream
from selfmod.errors import DivergenceError, NonFiniteError
from selfmod.introspect import Introspector, probes
from selfmod.introspect.network import Network
from selfmod.runs.config import TrainConfig, validate

DEPTH = 2
BATCH = 128

#: hidden units (MLP) or channels (CNN) per layer
WIDTHS = {"mlp": (16, 256), "cnn": (8, 64)}
#: the search space: (low, high) per coordinate; learning rates, weight decay and width on a
#: log scale
SPACE = {
    "lr": (1e-3, 1.0),
    "weight_decay": (1e-6, 1e-2),
    "momentum": (0.0, 0.99),
    "dropout": (0.0, 0.5),
    "width": WIDTHS["mlp"],
}


def space(model: str) -> dict[str, tuple[float, float]]:
    """:data:`SPACE` with ``model``'s width range."""
    return {**SPACE, "width": WIDTHS[model]}


@dataclass(frozen=True)
class Point:
    """One configuration: ``lr`` per layer (``DEPTH + 1`` of them) and the rest shared."""

    lr: tuple[float, ...] = (0.05,) * (DEPTH + 1)
    weight_decay: float = 1e-5
    momentum: float = 0.9
    dropout: float = 0.0
    width: int = 32

    def describe(self) -> dict[str, Any]:
        return {
            "lr": [float(f"{v:.3g}") for v in self.lr],
            "weight_decay": float(f"{self.weight_decay:.3g}"),
            "momentum": round(self.momentum, 3),
            "dropout": round(self.dropout, 3),
            "width": self.width,
        }


#: the fixed default configuration every one-run contender starts from
DEFAULT = Point()


@dataclass
class Outcome:
    """What one contender achieved on one seed.

    ``curve`` holds ``(seconds, steps, test_acc)``: cumulative compute and the test accuracy
    of the model the contender would hand over at that moment (for searches: the best trial by
    validation accuracy so far).
    """

    name: str
    test_acc: float
    val_acc: float
    steps: int
    seconds: float
    diverged: int = 0  # trials (or runs) whose loss went non-finite or jumped (see module doc)
    rollbacks: int = 0  # safeguard rollbacks (introspective runs)
    rejected: int = 0  # proposals the verification refused (introspective runs)
    trials: int = 1
    curve: list[tuple[float, int, float]] = field(default_factory=list)
    best: dict[str, Any] = field(default_factory=dict)

    def seconds_to(self, accuracy: float) -> float:
        """Wall seconds until the handed-over model first reached ``accuracy`` (inf: never)."""
        return next((s for s, _, a in self.curve if a >= accuracy), math.inf)


@dataclass
class Trial:
    """One training of one point: accuracies of its final model and the compute it took."""

    point: Point
    val_acc: float
    test_acc: float
    steps: int
    seconds: float
    diverged: bool
    pruned: bool


class _Clock:
    """Wall seconds of a contender's own compute: evaluations made only for its curve are not
    counted."""

    def __init__(self) -> None:
        self.spent, self._start = 0.0, time.perf_counter()

    def record(self, out: Outcome, step: int, test_acc: Callable[[], float]) -> None:
        """Append ``(seconds so far, step, test_acc())`` to ``out.curve``, off the clock."""
        self.spent += time.perf_counter() - self._start
        out.curve.append((self.spent, step, test_acc()))
        self._start = time.perf_counter()

    def total(self) -> float:
        return self.spent + time.perf_counter() - self._start


class Workload:
    """The data split, model family and budget every contender of one seed shares."""

    def __init__(
        self,
        source: Split,
        seed: int,
        steps: int,
        eval_every: int | None = None,
        model: str = "mlp",
    ):
        self.source, self.seed, self.steps, self.model = source, seed, steps, model
        self.eval_every = eval_every or max(1, steps // 20)

    @property
    def space(self) -> dict[str, tuple[float, float]]:
        return space(self.model)

    def config(self, point: Point, **overrides: Any) -> TrainConfig:
        values = {
            "seed": self.seed,
            "steps": self.steps,
            "batch_size": BATCH,
            "width": point.width,
            "model": self.model,
            "modifiers.grow.max_width": max(point.width, self.space["width"][1]),
            "depth": DEPTH,
            "lr": point.lr[0],
            "momentum": point.momentum,
            "weight_decay": point.weight_decay,
            "dropout": point.dropout,
            "guard_size": len(self.source.guard_y),
            "compare_fixed": False,
            "deterministic": False,
        }
        return validate({**values, **overrides})

    def accuracies(self, apply: Callable, params: dict) -> tuple[float, float]:
        """``(validation, test)`` accuracy; a non-finite model scores 0 on validation."""
        _, val = probes.loss_and_accuracy(apply, params, self.source.guard_x, self.source.guard_y)
        _, test = probes.loss_and_accuracy(apply, params, self.source.x_test, self.source.y_test)
        finite = all(bool(torch.isfinite(v).all()) for v in params.values())
        return (val if finite else 0.0), test


# ----------------------------------------------------------------------------- trials


def train_point(
    work: Workload, point: Point, report: Callable[[int, float], None] | None = None
) -> Trial:
    """Train ``point`` for ``work.steps`` base steps, no safeguards; ``report(step, val_acc)``
    every ``eval_every`` steps may raise ``optuna.TrialPruned`` to stop early."""
    cfg = work.config(point, modifiers=[], safeguards=False)
    run = Introspector(cfg, splits=[work.source], tune=False, lrs=_per_tensor(point.lr))

    def on_step(r: Introspector) -> None:
        if report is not None and r.step % work.eval_every == 0 and r.step < work.steps:
            report(r.step, work.accuracies(_output(r), r.params)[0])

    start = time.perf_counter()
    diverged = pruned = False
    try:
        run.run(on_step=on_step)
    except (NonFiniteError, DivergenceError):
        diverged = True
    except Exception as err:  # optuna.TrialPruned, without importing optuna here
        if type(err).__name__ != "TrialPruned":
            raise
        pruned = True
    seconds = time.perf_counter() - start
    val, test = work.accuracies(_output(run), run.params)
    return Trial(
        point, val, test, run.step, seconds, diverged or run.counters.divergences > 0, pruned
    )


def _per_tensor(lr: Sequence[float]) -> list[float]:
    """Per-layer rates -> one per tensor of the network (weight, bias)."""
    return [v for v in lr for _ in range(2)]


def fold(name: str, trials: Sequence[Trial]) -> Outcome:
    """A search's outcome after ``trials``: the best by validation accuracy is handed over.

    TPE and random search do not depend on the total budget, so ``fold(name, trials[:20])``
    is exactly the 20-trial search.
    """
    out = Outcome(name, math.nan, -1.0, 0, 0.0, trials=0)
    for t in trials:
        out.trials += 1
        out.steps += t.steps
        out.seconds += t.seconds
        out.diverged += t.diverged
        if not t.pruned and t.val_acc > out.val_acc:
            out.val_acc, out.test_acc, out.best = t.val_acc, t.test_acc, t.point.describe()
        out.curve.append((out.seconds, out.steps, out.test_acc))
    return out


# ----------------------------------------------------------------------------- contenders


def fixed(work: Workload, point: Point = DEFAULT, name: str = "fixed default") -> Outcome:
    return fold(name, [train_point(work, point)])


GRID = {
    "lr": (0.01, 0.05, 0.25),
    "weight_decay": (1e-5, 1e-3),
    "dropout": (0.0, 0.2),
}
#: the grid's widths per model (the upper half of its width range)
GRID_WIDTHS = {"mlp": (64, 256), "cnn": (16, 64)}


def grid_points(model: str = "mlp") -> list[Point]:
    """A 3 x 2 x 2 x 2 = 24-point grid (one rate for all layers, momentum 0.9): a full grid
    over all seven coordinates would need thousands of trials."""
    grid = {**GRID, "width": GRID_WIDTHS[model]}
    keys = list(grid)
    return [
        Point(lr=(v["lr"],) * (DEPTH + 1), **{k: v[k] for k in keys if k != "lr"})
        for v in (dict(zip(keys, c, strict=True)) for c in itertools.product(*grid.values()))
    ]


def grid_search(work: Workload, points: int | None = None) -> list[Trial]:
    """The first ``points`` points of :func:`grid_points` (all of them by default)."""
    return [train_point(work, p) for p in grid_points(work.model)[:points]]


def sample_point(rng: random.Random, space: dict = SPACE) -> Point:
    """A point drawn uniformly from ``space`` (log-uniform where the space is log)."""

    def log_uniform(lo: float, hi: float) -> float:
        return math.exp(rng.uniform(math.log(lo), math.log(hi)))

    return Point(
        lr=tuple(log_uniform(*space["lr"]) for _ in range(DEPTH + 1)),
        weight_decay=log_uniform(*space["weight_decay"]),
        momentum=rng.uniform(*space["momentum"]),
        dropout=rng.uniform(*space["dropout"]),
        width=round(log_uniform(*space["width"])),
    )


def random_search(work: Workload, trials: int) -> list[Trial]:
    rng = random.Random(work.seed)
    return [train_point(work, sample_point(rng, work.space)) for _ in range(trials)]


def tpe_search(work: Workload, trials: int) -> list[Trial]:
    """Optuna's TPE sampler with its median pruner (pruned trials count the steps they ran)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        direction="maximize",
        sampler=optuna.samplers.TPESampler(seed=work.seed),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=work.steps // 4),
    )
    done: list[Trial] = []
    space = work.space

    def objective(trial: optuna.Trial) -> float:
        point = Point(
            lr=tuple(
                trial.suggest_float(f"lr{i}", *space["lr"], log=True) for i in range(DEPTH + 1)
            ),
            weight_decay=trial.suggest_float("weight_decay", *space["weight_decay"], log=True),
            momentum=trial.suggest_float("momentum", *space["momentum"]),
            dropout=trial.suggest_float("dropout", *space["dropout"]),
            width=trial.suggest_int("width", *space["width"], log=True),
        )

        def report(step: int, val: float) -> None:
            trial.report(val, step)
            if trial.should_prune():
                raise optuna.TrialPruned()

        t = train_point(work, point, report)
        done.append(t)
        if t.pruned:
            raise optuna.TrialPruned()
        return t.val_acc

    study.optimize(objective, n_trials=trials)
    return done


def online_hd(work: Workload, method: str, point: Point = DEFAULT) -> Outcome:
    """One run from ``point`` whose learning rate adapts online: ``"sgd-hd"`` (per tensor, with
    the point's momentum and weight decay in the direction), ``"adam-hd"``, or ``"stack"`` (a
    height-2 hyperoptimizer stack on SGD with momentum)."""
    direction = optim.chain(
        optim.add_decayed_weights(point.weight_decay), optim.trace(point.momentum)
    )
    opt = {
        "sgd-hd": lambda: optim.hypergradient_descent(point.lr[0], 1e-3, direction, True),
        "adam-hd": lambda: optim.adam_hd(1e-3, 1e-7),
        "stack": lambda: optim.hyperoptimizer_stack(point.lr[0], [1e-3, 1e-6], direction),
    }[method]()
    torch.manual_seed(work.seed)
    net = Network(work.model, DEPTH, work.source.x.shape[1])
    params = net.init(point.width)
    state = opt.init(params)
    stream = Stream(work.seed, len(work.source.y))

    def apply(p: dict, x: torch.Tensor) -> torch.Tensor:
        return net.apply(p, x)

    def loss_fn(p: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(apply(p, x), y)

    out = Outcome(method, math.nan, math.nan, 0, 0.0)
    clock = _Clock()
    for step in range(1, work.steps + 1):
        idx = stream.next(BATCH)
        grads = torch.func.grad(loss_fn)(params, work.source.x[idx], work.source.y[idx])
        if not all(bool(torch.isfinite(g).all()) for g in grads.values()):
            out.diverged = 1
            break
        updates, state = opt.update(grads, state, params)
        params = optim.apply_updates(params, updates)
        out.steps = step
        if step % work.eval_every == 0 and step < work.steps:
            clock.record(out, step, lambda p=params: work.accuracies(apply, p)[1])
    out.seconds = clock.total()
    out.val_acc, out.test_acc = work.accuracies(apply, params)
    out.curve.append((out.seconds, out.steps, out.test_acc))
    lr = state.lr
    out.best = (
        {"final lr": [round(float(v), 5) for v in lr.values()]}
        if isinstance(lr, dict)
        else {"final lr": round(float(lr), 5)}
    )
    return out


#: what the introspective run may change: the search space's coordinates (no batch size)
MODIFIERS = ["lr", "momentum", "weight_decay", "dropout", "grow", "prune"]


def introspective(
    work: Workload, safeguards: bool, point: Point = DEFAULT, **overrides: Any
) -> Outcome:
    """One self-modifying run from ``point`` (the config's defaults, e.g. ``cycle`` 100 and
    lookahead 20, unless ``overrides`` say otherwise; growth up to the space's largest width);
    with ``safeguards=False`` every proposal is committed unchecked and a non-finite loss ends
    the run."""
    overrides = {"modifiers": MODIFIERS, **overrides}
    cfg = work.config(point, safeguards=safeguards, **overrides)
    run = Introspector(cfg, splits=[work.source], lrs=_per_tensor(point.lr))
    name = "selfmod introspective" + ("" if safeguards else " (no safeguards)")
    out = Outcome(name, math.nan, math.nan, 0, 0.0)
    clock = _Clock()

    def on_step(r: Introspector) -> None:
        if r.step % work.eval_every == 0 and r.step < work.steps:
            clock.record(out, r.step, lambda: work.accuracies(_output(r), r.params)[1])

    try:
        run.run(on_step=on_step)
    except (NonFiniteError, DivergenceError):
        out.diverged = 1
    out.seconds, out.steps = clock.total(), run.step
    if not safeguards:
        out.diverged = max(out.diverged, int(run.counters.divergences > 0))
    out.val_acc, out.test_acc = work.accuracies(_output(run), run.params)
    out.curve.append((out.seconds, run.step, out.test_acc))
    decisions = run.history["decisions"]
    out.rollbacks = sum(d["decision"] == "rollback" for d in decisions)
    out.rejected = sum(d["decision"] == "reject" for d in decisions)
    v = run.values()
    out.best = {
        "lr": [float(f"{x:.3g}") for x in v["lr"][::2]],
        "weight_decay": float(f"{v['weight_decay']:.3g}"),
        "momentum": round(v["momentum"], 3),
        "dropout": [round(x, 3) for x in v.get("dropout", [])],
        "widths": v["widths"],
    }
    return out


def _output(run: Any) -> Callable[[Any, torch.Tensor], torch.Tensor]:
    """``(params, x) -> output``: the run's model in eval mode, with its buffers now."""
    return lambda params, x: run.problem.predict(params, run.state.buffers, x)
