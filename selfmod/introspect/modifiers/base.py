"""The modifier protocol: what every self-modification, built-in or third-party, provides.

A modifier reads a :class:`Context` (the run's state, probes, this cycle's meta-gradient and
lookahead batches) and returns :class:`Proposal`\\ s; its ``apply`` is a pure function
``(proposal, state) -> state``. It never touches the run: the loop applies a proposal to a copy,
replays the lookahead, checks every invariant, then commits, queues it for approval or rejects
it. A modifier's own memory (e.g. Rprop step sizes) is a ``dict[str, Tensor]`` returned by
``propose``: the loop keeps it in the run state, so checkpoints and resume need no code of its.

    class ClipThreshold(Modifier):
        name = "clip"
        def propose(self, ctx, memory): ...
            return [Proposal(self.name, hparams={...})], memory

Register it with :func:`register` (the built-ins are registered on import of
:mod:`selfmod.introspect.modifiers`), or, from another package, name it in the entry-point group
``selfmod.modifiers`` (``clip = "mypackage.clip:ClipThreshold"`` under
``[project.entry-points."selfmod.modifiers"]``): the registry loads those when first read. Its
``Settings`` are then set in the run's config as ``[modifiers.clip]``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor

if TYPE_CHECKING:
    from selfmod.introspect.problem import Problem
    from selfmod.introspect.state import RunState

Params = dict[str, Tensor]


@dataclass(frozen=True)
class RunFacts:
    """What ``Modifier.applies`` may read besides the problem and the hyperparameters."""

    config: Any  # the run's TrainConfig
    resizable_batches: bool  # the training data can be drawn at any batch size


class NoSettings(BaseModel):
    """A modifier without settings of its own."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class Proposal:
    """One change a modifier proposes.

    ``hparams``: new values of some hyperparameters (unconstrained form); ``batch_size``: a new
    batch size; ``surgery``: what the modifier's ``apply`` needs for an architecture change
    (JSON-able). ``strict``: the change must lower the guard loss (no ``epsilon`` tolerance);
    ``gain > 0``: it must lower it by at least that fraction (``guard' <= (1 - gain) guard``).
    ``info``: extra figures for the ledger (e.g. the noise scale behind a batch size).
    ``beat_noise``: the guard loss must also fall by more than its noise (the standard error of
    the paired differences over chunks of the verifying guard data:
    :func:`~selfmod.introspect.verifier.beats_noise`).
    """

    modifier: str
    hparams: Params = field(default_factory=dict)
    batch_size: int | None = None
    surgery: dict[str, Any] = field(default_factory=dict)
    strict: bool = False
    info: dict[str, Any] = field(default_factory=dict)
    gain: float = 0.0
    #: a tolerance of its own instead of the run's ``epsilon`` (``guard' <= (1 + slack) guard``)
    slack: float | None = None
    #: proposals of one group in a cycle are verified together, as one change named ``group``
    group: str | None = None
    parts: tuple[Proposal, ...] = ()  # the proposals a joint one was merged from
    beat_noise: bool = False

    def tolerance(self, epsilon: float) -> float:
        """The verifier's tolerance: ``guard' <= (1 + tol) guard``; ``-gain`` for a priced
        change, its ``slack`` where it has one, ``0`` (strictly lower) for a strict one, else
        the run's ``epsilon``."""
        if self.gain > 0:
            return -self.gain
        if self.slack is not None:
            return self.slack
        return 0.0 if self.strict else epsilon

    def to_json(self) -> dict[str, Any]:
        """A JSON-able form that :meth:`from_json` reads back (the ledger's ``change``)."""
        out: dict[str, Any] = {"modifier": self.modifier}
        if self.hparams:
            out["hparams"] = {k: v.tolist() for k, v in self.hparams.items()}
        if self.batch_size is not None:
            out["batch_size"] = self.batch_size
        if self.surgery:
            out["surgery"] = self.surgery
        if self.strict:
            out["strict"] = True
        if self.beat_noise:
            out["beat_noise"] = True
        if self.gain:
            out["gain"] = self.gain
        if self.slack is not None:
            out["slack"] = self.slack
        if self.parts:
            out["parts"] = [p.to_json() for p in self.parts]
        return out

    @classmethod
    def from_json(cls, d: dict[str, Any], like: Params) -> Proposal:
        """Read :meth:`to_json`'s form; ``like`` gives each hyperparameter's dtype and shape."""
        h = {
            k: torch.as_tensor(v, dtype=like[k].dtype).reshape(like[k].shape)
            for k, v in d.get("hparams", {}).items()
        }
        return cls(
            d["modifier"],
            h,
            d.get("batch_size"),
            d.get("surgery", {}),
            d.get("strict", False),
            gain=float(d.get("gain", 0.0)),
            slack=d.get("slack"),
            parts=tuple(cls.from_json(p, like) for p in d.get("parts", [])),
            beat_noise=bool(d.get("beat_noise", False)),
        )


def merge(name: str, proposals: list[Proposal]) -> Proposal:
    """One joint proposal from several that set disjoint hyperparameters."""
    if len(proposals) == 1 and proposals[0].modifier == name:
        return proposals[0]
    h: Params = {}
    info: dict[str, Any] = {}
    for p in proposals:
        h.update(p.hparams)
        info.update(p.info)
    strict = any(p.strict for p in proposals)
    gain, noise = max(p.gain for p in proposals), any(p.beat_noise for p in proposals)
    return Proposal(
        name, h, strict=strict, info=info, gain=gain, parts=tuple(proposals), beat_noise=noise
    )


@dataclass
class Context:
    """What a modifier may read in a cycle (read-only by convention; tensors are the run's)."""

    state: RunState
    problem: Problem
    cycle: int
    probe: dict[str, float]
    hypergrad: Params  # d guard loss / d hparams over the lookahead ({} when not estimated)
    pending: list[Any]  # the lookahead batches
    settings: Any  # the run's config (trust_region, meta_lr, epsilon, ...)
    batch_grads: Callable[[int], list[Params]]  # per-batch gradients of the first n pending
    rng: torch.Generator  # the run's generator (seeds for growth)
    #: the cycle's :class:`~selfmod.introspect.lookahead.Lookahead` (its guard splits, and its
    #: ``cost``, where a modifier's own passes count against ``meta_budget``); ``None`` outside
    lookahead: Any = None
    counters: Any = None  # the run's :class:`~selfmod.introspect.state.Counters` (read-only)

    @property
    def trust_region(self) -> float:
        return self.settings.trust_region

    @property
    def meta_lr(self) -> float:
        return self.state.meta_lr


class Modifier:
    """Base class of the modifiers. Subclasses set ``name`` and override ``propose``; those
    with settings set ``Settings`` (a pydantic model: the run config's ``[modifiers.NAME]``
    table)."""

    name: ClassVar[str]
    Settings: ClassVar[type[BaseModel]] = NoSettings
    #: proposals are made and verified in ascending order (built-ins: 10, 20, ..., 90)
    order: ClassVar[int] = 100
    #: on in a run that does not name its modifiers (where it applies)
    default: ClassVar[bool] = True
    #: runs every base step (``on_step``) instead of in a cycle
    per_step: ClassVar[bool] = False
    #: hyperparameters (unconstrained keys) this modifier needs in the space
    needs: ClassVar[tuple[str, ...]] = ()
    #: reads ``ctx.hypergrad``: a cycle in which no due modifier does skips the meta-gradient
    #: (its reverse unroll through the lookahead); the built-ins that never read it say so
    reads_meta_gradient: ClassVar[bool] = True

    def __init__(self, settings: BaseModel | None = None, **values: Any) -> None:
        self.settings = settings if settings is not None else self.Settings(**values)

    @classmethod
    def from_config(cls, config: Any) -> Modifier:
        """Built from the run config's table of this modifier (``config.settings_of(name)``,
        validated by ``Settings``); defaults where the config has none of this class's."""
        known = cls.name in registry() and hasattr(config, "settings_of")
        settings = config.settings_of(cls.name) if known else None
        return cls(settings if isinstance(settings, cls.Settings) else cls.Settings())

    @classmethod
    def check_config(cls, config: Any) -> None:
        """Raise ``ValueError`` naming the fields when this modifier's settings
        (``config.settings_of(name)``) disagree with the run's; called only when the run has
        this modifier (named, or by default when it names none)."""

    def applies(self, problem: Problem, hparams: Params, facts: RunFacts) -> str | None:
        """``None`` if this modifier can act on the run, else why not (one line)."""
        missing = [k for k in self.needs if k not in hparams]
        if missing:
            return f"{self.name} needs the hyperparameter {missing[0]}, which this run lacks"
        return None

    def widest(self) -> int:
        """The widest a layer may become under this modifier (0: it changes no width); the
        run draws its dropout noise at the widest, so that growth leaves the stream as it is."""
        return 0

    def hparams_init(self, problem: Problem) -> Params:
        """Hyperparameters this modifier adds to the run (e.g. a penalty's weight), by key,
        as 0-dim or 1-dim tensors; default none."""
        return {}

    def penalty(self, problem: Problem, params: Params, hparams: Params) -> Tensor | None:
        """A term added to the training loss (differentiable in ``params``), or ``None``."""
        return None

    def propose(self, ctx: Context, memory: Params) -> tuple[list[Proposal], Params]:
        """``(proposals, new memory)``."""
        return [], memory

    def apply(self, proposal: Proposal, state: RunState, problem: Problem) -> RunState:
        """``state`` with ``proposal`` applied (pure). The default sets hyperparameters and the
        batch size; architecture modifiers override it."""
        return apply_plain(proposal, state)

    def on_step(self, state: RunState, grads: Params, new_params: Params) -> RunState:
        """Per-step modifiers: the state after one base step (default: unchanged)."""
        return state

    def reset(self, memory: Params) -> Params:
        """Memory after a change of data distribution (default: kept)."""
        return memory


def apply_plain(proposal: Proposal, state: RunState) -> RunState:
    """Set ``proposal.hparams`` and ``proposal.batch_size`` in ``state`` (pure)."""
    h = dict(state.hparams)
    for k, v in proposal.hparams.items():
        h[k] = torch.as_tensor(v, dtype=state.hparams[k].dtype).reshape(state.hparams[k].shape)
    b = state.batch_size if proposal.batch_size is None else int(proposal.batch_size)
    return replace(state, hparams=h, batch_size=b)


def rprop_step(
    step: Tensor | None, prev: Tensor | None, g: Tensor, meta_lr: float, trust_region: float
) -> tuple[Tensor, Tensor]:
    """Per-entry step sizes on the sign of the meta-gradient (Rprop): ``x1.2`` while the sign
    repeats, ``x0.5`` when it flips, within ``[1e-3 meta_lr, min(meta_lr, trust_region)]``.

    Each hyperparameter moves by a bounded amount whatever its gradient's scale (per-tensor
    hypergradients differ by orders of magnitude), and oscillation damps itself.
    Returns ``(step, sign)``, both shaped like ``g``. References: Riedmiller & Braun 1993.
    """
    hi = min(meta_lr, trust_region)
    sign = torch.sign(g)
    if step is None or prev is None:
        return torch.full_like(g, hi), sign
    factor = torch.where(sign * prev > 0, 1.2, torch.where(sign * prev < 0, 0.5, 1.0))
    return (step * factor).clamp(1e-3 * hi, hi), sign


_REGISTRY: dict[str, type[Modifier]] = {}
#: the entry-point group of third-party modifiers, loaded when the registry is first read
ENTRY_POINTS = "selfmod.modifiers"
_entry_points_loaded = False
_SHOWN: dict[Any, Any] = {}  # the entry-point lines already shown (warnings' registry)


def register(cls: type[Modifier]) -> type[Modifier]:
    """Add a modifier class to the registry (usable as a decorator)."""
    if not getattr(cls, "name", None):
        raise ValueError(f"{cls.__name__} must set a class attribute name")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"a modifier named {cls.name!r} is already registered")
    _REGISTRY[cls.name] = cls
    return cls


def load_entry_points() -> None:
    """Register every modifier class named in the ``selfmod.modifiers`` entry-point group (once
    per process; :func:`registry` calls it). One that fails to load is skipped with one line
    (a ``RuntimeWarning``) naming it and why."""
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINTS):
        try:
            cls = ep.load()
            if not (isinstance(cls, type) and issubclass(cls, Modifier)):
                raise TypeError(f"{cls!r} is not a Modifier subclass")
            register(cls)
        except Exception as err:  # a broken plugin must not stop the run: say which
            why = f"{type(err).__name__}: {err}".splitlines()[0]
            warnings.warn_explicit(  # one line, without a source line under it
                f"modifier entry point {ep.name} = {ep.value!r} ({ENTRY_POINTS}) not loaded: {why}",
                RuntimeWarning,
                "selfmod modifiers",
                0,
                module="selfmod.modifiers",
                registry=_SHOWN,
            )


def registry() -> dict[str, type[Modifier]]:
    """Every registered modifier class by name, in their ``order`` (third-party ones from the
    ``selfmod.modifiers`` entry points included)."""
    load_entry_points()
    return dict(sorted(_REGISTRY.items(), key=lambda item: item[1].order))


def default_names() -> list[str]:
    """The modifiers a run that names none has (where they apply), in their ``order``."""
    return [n for n, c in registry().items() if c.default]
