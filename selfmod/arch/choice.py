"""A choice among named operations that a run makes by gradient and then commits.

:class:`Choice` holds ``K`` options (same output shape) and two persistent buffers, so a run
keeps them in its state, checkpoints and rollbacks like any buffer: ``logits (K,)``, the
choice's architecture weights ``alpha``, and ``chosen ()``, ``-1`` while the choice is open,
else the committed option's index. The logits are not parameters: the base optimizer never
trains them on the training loss; the run moves them by the guard loss (DARTS's bilevel split:
weights on train data, ``alpha`` on held-out data). Its forward::

    committed:     y = o_chosen(x)
    relaxed:       y = sum_i w_i o_i(x)      (w (K,) supplied by name as ``weights``)
    training:      y = o_k(x),  k ~ softmax(alpha)   (one option runs: a step costs one option)
    eval:          y = o_argmax(alpha)(x)

so committing ``argmax(alpha)`` (:func:`commit_params`) keeps the eval function exactly.

References: Liu, Simonyan & Yang 2019 (DARTS, first order); Dong & Yang 2019 (GDAS: one
sampled op per step).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

Params = dict[str, Tensor]


class Choice(nn.Module):
    """A choice among ``options`` (name -> module, every one mapping the input to the same
    output shape), made by the run (:mod:`selfmod.introspect.modifiers.choice`)::

        act = Choice({"relu": nn.ReLU(), "gelu": nn.GELU(), "tanh": nn.Tanh()})

    ``logits``: the starting ``alpha`` (default zeros: every option equally likely). The
    first call checks that the options' outputs agree in shape (``ValueError`` if not).
    """

    logits: Tensor  # (K,) architecture weights alpha
    chosen: Tensor  # () int64: -1 while open, else the committed option's index
    weights: Tensor  # (K,) relaxed weights supplied by name (the meta step); else (0,)

    def __init__(
        self, options: Mapping[str, nn.Module], logits: Sequence[float] | None = None
    ) -> None:
        super().__init__()
        check_options(options)
        self.options = nn.ModuleDict(dict(options))
        k = len(self.options)
        start = torch.zeros(k) if logits is None else torch.as_tensor(logits, dtype=torch.float)
        if start.shape != (k,):
            raise ValueError(
                f"logits needs one value per option ({k}; got shape {tuple(start.shape)}); "
                "pass a list of floats or leave it out"
            )
        self.register_buffer("logits", start.clone())
        self.register_buffer("chosen", torch.tensor(-1, dtype=torch.long))
        self.register_buffer("weights", torch.zeros(0), persistent=False)
        self._checked = False  # the options' output shapes, checked on the first call

    @property
    def names(self) -> list[str]:
        return list(self.options.keys())

    def forward(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        ops = list(self.options.values())
        if not self._checked:
            check_outputs(self, x, *args, **kwargs)
        chosen = int(self.chosen)
        if chosen >= 0:
            return ops[chosen](x, *args, **kwargs)
        if self.weights.numel():  # the relaxed mixture: sum_i w_i o_i(x), zero weights skipped
            w, out = self.weights, None
            for i in (w.detach() != 0).nonzero().squeeze(1).tolist():
                term = w[i] * ops[i](x, *args, **kwargs)
                out = term if out is None else out + term
            return out
        return ops[self.pick()](x, *args, **kwargs)

    def pick(self) -> int:
        """The option this call runs: a sample of ``softmax(alpha)`` in training mode (one
        uniform draw of torch's generator), ``argmax(alpha)`` in eval mode."""
        if not self.training:
            return int(self.logits.argmax())
        p = torch.softmax(self.logits.detach().double(), 0)  # (K,)
        u = torch.rand((), dtype=torch.float64, device=p.device)
        return min(int((p.cumsum(0) < u).sum()), len(p) - 1)


def check_options(options: Any) -> None:
    """``ValueError`` (one line, naming the fix) unless ``options`` maps at least two names
    (valid module names) to ``nn.Module``\\ s."""
    if not isinstance(options, Mapping):
        raise ValueError(
            f"Choice options must be a dict of name -> nn.Module (got {type(options).__name__})"
        )
    if len(options) < 2:
        got = "none" if not options else f"only {next(iter(options))!r}"
        raise ValueError(
            f"Choice needs at least two options (got {got}); add options or use the module "
            "itself without a Choice"
        )
    for name, op in options.items():
        if not isinstance(name, str) or not name or "." in name:
            raise ValueError(
                f"Choice option names must be non-empty strings without '.' (got {name!r})"
            )
        if not isinstance(op, nn.Module):
            raise ValueError(
                f"Choice option {name!r} is a {type(op).__name__}, not an nn.Module; wrap it in one"
            )


def check_outputs(choice: Choice, x: Any, *args: Any, **kwargs: Any) -> None:
    """``ValueError`` (one line) if the options' outputs on ``x`` differ in shape; run once per
    module, in eval mode, without grad, the random state left as it was."""
    shapes = {}
    cuda = [x.device] if isinstance(x, Tensor) and x.device.type == "cuda" else []
    saved = [(m, m.training) for m in choice.options.modules()]
    try:
        choice.options.eval()
        with torch.no_grad(), torch.random.fork_rng(devices=cuda):
            for name, op in choice.options.items():
                out = op(x, *args, **kwargs)
                shapes[name] = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
    finally:
        for m, flag in saved:
            m.training = flag
    if len(set(shapes.values())) > 1:
        listed = ", ".join(f"{n} -> {s}" for n, s in shapes.items())
        raise ValueError(
            f"Choice options' outputs differ in shape ({listed}); make every option return "
            "the same shape"
        )
    choice._checked = True


def is_skip(op: nn.Module) -> bool:
    """Whether ``op`` is a skip connection or the zero op (``nn.Identity``, :class:`Zero`):
    the parameter-free options DARTS collapses onto (the skip guard's concern)."""
    from selfmod.arch.mixed import Zero  # mixed imports surgery, which imports this module

    return isinstance(op, nn.Identity | Zero)


def choice_sites(module: nn.Module) -> list[str]:
    """The names of the :class:`Choice` modules in ``module``, in order (``""``: the root)."""
    return [n for n, m in module.named_modules() if isinstance(m, Choice)]


def key(site: str, name: str) -> str:
    """The full name of ``site``'s tensor ``name`` (``"logits"``, ``"chosen"``, ...)."""
    return f"{site}.{name}" if site else name


def option_keys(module: nn.Module, site: str, params: Mapping[str, Tensor]) -> dict[str, list[str]]:
    """Per option of the choice at ``site``, the keys of ``params`` under it."""
    choice = module.get_submodule(site)
    heads = {n: key(site, f"options.{n}.") for n in choice.names}  # type: ignore[union-attr]
    return {n: [k for k in params if k.startswith(h)] for n, h in heads.items()}


def _empty(x: Tensor) -> Tensor:
    """``x`` with no entries: ``(0, *x.shape[1:])`` (``(0,)`` for a 0-dim tensor)."""
    return x.new_zeros((0, *x.shape[1:]) if x.dim() else (0,))


def commit_params(
    module: nn.Module, site: str, index: int, params: Params, buffers: Params
) -> tuple[Params, Params, list[str]]:
    """``(params, buffers, dropped keys)`` with the choice at ``site`` committed to option
    ``index``: ``chosen = index``, every other option's parameters emptied (``(0, ...)``: the
    run's tensor names stay, as a factored layer's weight does). The chosen option's tensors
    are the same objects, so its function and optimizer state carry over exactly."""
    names = module.get_submodule(site).names  # type: ignore[union-attr]
    if not 0 <= index < len(names):
        raise ValueError(f"index must be in [0, {len(names)}) for choice {site!r} (got {index})")
    dropped = [k for n, ks in option_keys(module, site, params).items() if n != names[index]
               for k in ks]  # fmt: skip
    params = {k: _empty(v) if k in dropped else v for k, v in params.items()}
    chosen = torch.tensor(index, dtype=torch.long, device=buffers[key(site, "chosen")].device)
    return params, {**buffers, key(site, "chosen"): chosen}, dropped


def committed_from_params(module: nn.Module, params: Mapping[str, Tensor]) -> Params:
    """``{site.chosen: index}`` of every choice whose commit shows in ``params`` (some option's
    tensors emptied): the option whose tensors are not, else the first without tensors. For
    a model evaluated from its params alone (the cost model), never from its own buffers."""
    out = {}
    for site in choice_sites(module):
        keys = option_keys(module, site, params)
        if not any(ks and all(params[k].numel() == 0 for k in ks) for ks in keys.values()):
            continue  # open
        names = list(keys)
        kept = [i for i, n in enumerate(names) if keys[n] and params[keys[n][0]].numel()]
        index = kept[0] if kept else next(i for i, n in enumerate(names) if not keys[n])
        out[key(site, "chosen")] = torch.tensor(index, dtype=torch.long)
    return out


def resolve(module: nn.Module) -> nn.Module:
    """``module`` with every committed :class:`Choice` replaced by its chosen option, in place
    (an exported model in its final shape); open choices stay. Returns it."""
    for site in reversed(choice_sites(module)):  # the innermost first: outer paths stay
        if not site:
            continue  # the root itself: the caller's object, kept
        choice = module.get_submodule(site)
        if int(choice.chosen) >= 0:  # type: ignore[arg-type]
            parent, _, attr = site.rpartition(".")
            owner = module.get_submodule(parent) if parent else module
            setattr(owner, attr, list(choice.options.values())[int(choice.chosen)])  # type: ignore[union-attr, arg-type]
    return module
