"""A learned optimizer on disk, as ``selfmod meta-train`` writes it, and read back safely.

A folder ``DIR`` holds

- ``weights.safetensors``: the learned optimizer's weights (``{name: tensor}``; safetensors
  never runs code, unlike a pickle);
- ``weights.json``: ``{"format": FORMAT, "optimizer": "lstm" | "mlp", "options": {...},
  "tensors": {name: shape}, "sha256": hex digest of weights.safetensors, ...}``; ``options``
  are the constructor's keyword arguments (:func:`~selfmod.optim.learned.lstm_optimizer` or
  :func:`~selfmod.optim.learned.mlp_optimizer`).

:func:`load_learned` checks the digest, the names and shapes against the constructor's own
initial weights and returns the transform with its weights closed over (constants: nothing
meta-trains them further). Every refusal is one :class:`~selfmod.errors.SelfmodError` line that
names the file and the fix.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save
from torch import Tensor

from selfmod.errors import SelfmodError
from selfmod.optim.base import GradientTransformation, Params
from selfmod.optim.learned import (
    LSTMState,
    init_lstm_optimizer,
    init_mlp_optimizer,
    lstm_optimizer,
    mlp_optimizer,
)

FORMAT = "selfmod learned optimizer 1"
WEIGHTS, DESCRIPTION = "weights.safetensors", "weights.json"
#: every kind: (constructor, initial weights, the options each accepts with their types)
KINDS: dict[str, tuple[Any, Any, dict[str, type]]] = {
    "lstm": (
        lstm_optimizer,
        init_lstm_optimizer,
        {"hidden": int, "layers": int, "output_scale": float, "prefix": str},
    ),
    "mlp": (
        mlp_optimizer,
        init_mlp_optimizer,
        {"decays": list, "step_scale": float, "prefix": str},
    ),
}
#: of the options, those that shape the weights (passed to the initializer as well)
_SHAPING = {"lstm": ("hidden", "layers", "prefix"), "mlp": ("decays", "prefix")}


def describe(kind: str, weights: dict[str, Tensor], data: bytes, **extra: Any) -> dict[str, Any]:
    """``weights.json`` for ``weights`` of learned optimizer ``kind`` with its default options,
    ``data`` being the bytes of ``weights.safetensors``; ``extra`` (e.g. the meta-train
    config) is kept for the reader."""
    options: dict[str, Any] = {
        "lstm": {"hidden": 20, "layers": 2, "output_scale": 0.1, "prefix": "lstm"},
        "mlp": {"decays": [0.5, 0.9, 0.99], "step_scale": 1e-3, "prefix": "mlpopt"},
    }[kind]
    return {
        "format": FORMAT,
        "optimizer": kind,
        "options": options,
        "tensors": {k: list(v.shape) for k, v in weights.items()},
        "sha256": hashlib.sha256(data).hexdigest(),
        **extra,
    }


def save_learned(
    folder: str | Path, kind: str, weights: dict[str, Tensor], write: Any, **extra: Any
) -> None:
    """Write ``weights.safetensors`` then ``weights.json`` into ``folder`` with ``write(path,
    bytes)`` (an atomic writer). A reader that finds the two out of step (a crash between
    them) refuses them by the digest."""
    data = save({k: v.detach().contiguous().cpu() for k, v in weights.items()})
    write(Path(folder) / WEIGHTS, data)
    text = json.dumps(describe(kind, weights, data, **extra), indent=1)
    write(Path(folder) / DESCRIPTION, text.encode())


@dataclass(frozen=True)
class Learned:
    """A learned optimizer read from ``folder``: its kind, options and weights (CPU)."""

    folder: Path
    kind: str
    options: dict[str, Any]
    weights: dict[str, Tensor]

    def transform(self) -> GradientTransformation:
        """The learned update ``u = f_w(g, state)`` (additive: ``p <- p + u``) with the weights
        fixed. Its state restarts from zeros when it no longer fits the params (see
        :func:`_restarting`)."""
        make = KINDS[self.kind][0]
        return _restarting(fixed_weights(make(**self.options), self.weights), self.kind)


def load_learned(folder: str | Path) -> Learned:
    """Read and check a learned optimizer folder (module docstring); one-line errors."""
    d = Path(folder)
    where = f"learned optimizer folder {str(d)!r}"
    fix = "run selfmod meta-train --set out=DIR and pass optimizer = 'learned:DIR'"
    if not d.is_dir():
        raise SelfmodError(f"{where} does not exist or is not a folder; {fix}")
    for name in (WEIGHTS, DESCRIPTION):
        if not (d / name).is_file():
            raise SelfmodError(f"{where} has no {name}; {fix}")
    try:
        desc = json.loads((d / DESCRIPTION).read_text())
    except (UnicodeDecodeError, ValueError) as err:
        raise SelfmodError(f"{d / DESCRIPTION} is not valid JSON ({err}); {fix}") from None
    if not isinstance(desc, dict) or desc.get("format") != FORMAT:
        raise SelfmodError(f"{d / DESCRIPTION} is not a {FORMAT!r} description; {fix}")
    kind, options = desc.get("optimizer"), desc.get("options")
    if kind not in KINDS or not isinstance(options, dict):
        raise SelfmodError(
            f"{d / DESCRIPTION}: optimizer must be one of {', '.join(map(repr, KINDS))} with "
            f"an options table (got {kind!r}); {fix}"
        )
    types = KINDS[kind][2]
    for k, v in options.items():
        want = types.get(k)
        ok = want is not None and (isinstance(v, want) or (want is float and type(v) is int))
        if not ok or isinstance(v, bool):
            raise SelfmodError(f"{d / DESCRIPTION}: option {k!r} is unknown or mistyped; {fix}")
    data = (d / WEIGHTS).read_bytes()
    if hashlib.sha256(data).hexdigest() != desc.get("sha256"):
        raise SelfmodError(f"{d / WEIGHTS} does not match the sha256 in {DESCRIPTION}; {fix}")
    try:
        weights = load(data)
    except SafetensorError as err:
        raise SelfmodError(f"{d / WEIGHTS} is not a safetensors file ({err}); {fix}") from None
    shaping = {k: options[k] for k in _SHAPING[kind] if k in options}
    template = KINDS[kind][1](**shaping)
    for name, t in template.items():
        w = weights.get(name)
        if w is None or w.shape != t.shape or not w.is_floating_point():
            raise SelfmodError(
                f"{d / WEIGHTS}: {name} is missing or not a float tensor of shape "
                f"{list(t.shape)}; {fix}"
            )
        if not bool(torch.isfinite(w).all()):
            raise SelfmodError(f"{d / WEIGHTS}: {name} holds NaN or inf; {fix}")
    extra = sorted(set(weights) - set(template))
    if extra:
        raise SelfmodError(f"{d / WEIGHTS} has unexpected tensors ({extra[0]!r}, ...); {fix}")
    return Learned(d, kind, options, {k: weights[k].float() for k in template})


def fixed_weights(
    inner: GradientTransformation, weights: dict[str, Tensor]
) -> GradientTransformation:
    """``inner`` reading ``weights`` (constants, moved to the gradients' device and dtype)
    instead of the run's ``hparams``."""
    cache: dict[tuple[Any, Any], dict[str, Tensor]] = {}

    def update(grads: Params, state: Any, params: Params | None = None, hparams: Any = None):
        like = next(iter(grads.values()))
        key = (like.device, like.dtype)
        if key not in cache:
            cache[key] = {k: v.to(like.device, like.dtype) for k, v in weights.items()}
        return inner.update(grads, state, params, cache[key])

    return GradientTransformation(inner.init, update)


def _restarting(inner: GradientTransformation, kind: str) -> GradientTransformation:
    """``inner`` whose state restarts from ``init(params)`` when it no longer fits the params.

    The LSTM keeps one ``(N, hidden)`` row per coordinate of all tensors together, which
    surgery cannot re-index: after growth or pruning (``N`` changed) its memory restarts at
    zeros, as a new optimizer would. The MLP's momenta are shaped like the params and are
    re-indexed by surgery like Adam's moments, so they never restart.
    """
    if kind != "lstm":
        return inner

    def update(grads: Params, state: Any, params: Params | None = None, hparams: Any = None):
        n = sum(g.numel() for g in grads.values())
        if isinstance(state, LSTMState) and state.h[0].shape[0] != n:
            state = inner.init(grads)
        return inner.update(grads, state, params, hparams)

    return GradientTransformation(inner.init, update)
