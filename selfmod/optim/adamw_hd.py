"""``AdamWHD``: a drop-in ``torch.optim`` AdamW whose per-tensor learning rates tune themselves.

The in-place, ``foreach`` form of :func:`selfmod.optim.adamw_hd` (same maths, tested equal):
before each step every tensor's rate moves by normalized hypergradient descent,
``log alpha_i += max_step * cos(g_i, -u_i)``, with ``g`` this step's gradient and ``u`` the
tensor's previous update, then ``p_i <- p_i - alpha_i (adam_dir_i + wd p_i)``. A rising slope
along the last step (``g . u < 0``) raises the rate, an overshoot lowers it; no rate moves by more
than ``max_step`` (in log) per step, and each stays in ``[min(lr, 1e-6), max(lr, 10)]``.

Guard rail: a step whose gradient has a NaN or an infinity changes nothing (parameters, moments
and step counts stay as they were), halves every rate and counts in ``skipped``, like
``torch.amp.GradScaler``'s skipped steps. On an accelerator (or with ``capturable=True``) the
decision is made on the device, by masks rather than an ``if``, so ``step()`` never waits for
the accelerator, as ``torch.optim.AdamW`` doesn't, and can be captured in a CUDA graph; on CPU,
where reading a value waits for nothing, it decides on the host and steps with Python scalars
(fewer kernels; the two agree to rounding). The cost over ``torch.optim.AdamW`` (foreach) is one
dot product and two norms per tensor (and on the device path a masked copy of the gradients),
and one more buffer per parameter (the previous update, beside Adam's two moments).

Differences from ``torch.optim.AdamW`` that remain: the rates are per tensor, so a complex
tensor is not stepped as its real and imaginary parts as two tensors; the skipped-step guard;
``state["step"]`` lives on the parameter's device (as torch's capturable state does).

References: Baydin et al. 2018, "Online Learning Rate Adaptation with Hypergradient Descent";
Loshchilov & Hutter 2019 (AdamW).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from selfmod.optim.base import run_closure

#: the learned rates stay in [min(lr, RATE_RANGE[0]), max(lr, RATE_RANGE[1])]
RATE_RANGE = (1e-6, 10.0)

#: flags of torch's Adam family and what AdamWHD does with them
FLAGS = {"amsgrad": False, "maximize": False, "foreach": None, "capturable": False}
REFUSED = {"fused": None, "differentiable": False}


def _host(value: Any) -> Any:
    """A CPU tensor hyperparameter as a Python number (reading it never waits for a device)."""
    if isinstance(value, Tensor) and value.device.type == "cpu":
        return value.item()
    return value


def _cos(dot: float, norms: float) -> float:
    """``dot / norms`` in [-1, 1]; 0 where a norm is 0 (no previous update or no gradient)."""
    return min(1.0, max(-1.0, dot / (norms + 1e-30)))


def _rate_dtype(p: Tensor) -> torch.dtype:
    """float64 for double parameters, float32 otherwise (half precision included)."""
    return torch.float64 if p.dtype.to_real() == torch.float64 else torch.float32


def check_hyperparameters(
    lr: Any, betas: Any, eps: Any, weight_decay: Any, max_step: Any, **flags: Any
) -> None:
    """torch's checks and error types (ValueError for a range, one line naming the fix), run on
    the defaults before the parameters are looked at and on every param group."""
    if isinstance(lr, Tensor) and lr.numel() != 1:
        raise ValueError(f"Tensor lr must be 1-element (got shape {tuple(lr.shape)})")
    if not float(lr) >= 0.0:
        raise ValueError(f"Invalid learning rate: {lr}; lr must be >= 0")
    if not isinstance(betas, tuple | list) or len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2) (got {betas!r})")
    if isinstance(betas[0], Tensor) != isinstance(betas[1], Tensor):
        raise ValueError("betas must be either both floats or both Tensors")
    for i, beta in enumerate(betas):
        if isinstance(beta, Tensor) and beta.numel() != 1:
            raise ValueError(f"Tensor betas[{i}] must be 1-element (got shape {tuple(beta.shape)})")
        if not 0.0 <= float(beta) < 1.0:
            raise ValueError(
                f"Invalid beta parameter at index {i}: {float(beta)}; it must be in [0, 1)"
            )
    if not eps >= 0.0:
        raise ValueError(f"Invalid epsilon value: {eps}; eps must be >= 0")
    if not weight_decay >= 0.0:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}; it must be >= 0")
    if not 0.0 < max_step <= 1.0:
        raise ValueError(f"max_step must be in (0.0, 1.0] (got {max_step})")
    if flags.get("fused"):
        raise RuntimeError(
            "AdamWHD has no fused kernel (fused=True); it runs foreach kernels, and takes "
            "foreach, capturable, maximize and amsgrad"
        )
    if flags.get("differentiable"):
        raise RuntimeError(
            "AdamWHD steps in place without autograd (differentiable=True); for a "
            "differentiable step use the functional selfmod.optim.adamw_hd"
        )


class AdamWHD(torch.optim.Optimizer):
    """``AdamWHD(model.parameters(), lr=1e-2)`` then the usual ``zero_grad / backward / step``.

    ``lr`` is every tensor's starting rate; :meth:`rates` gives the learned ones, per tensor.
    Schedulers act on ``group["lr"]`` as a multiplier of the learned rates (its starting value
    is kept as ``group["initial_lr"]``). Param groups may differ in any argument.

    Flags of ``torch.optim.AdamW``: ``maximize`` and ``amsgrad`` as torch's; ``foreach=False``
    steps tensor by tensor (lower peak memory), otherwise one foreach kernel per device and
    dtype; the state lives on the parameters' devices and a step on an accelerator reads
    nothing on the host, so it can be captured in a CUDA graph; ``capturable=True`` takes that
    path on CPU too (by default CPU steps decide on the host, where nothing waits).
    ``fused=True`` and ``differentiable=True`` are refused with a one-line ``RuntimeError``
    naming the alternative.

    State per parameter in torch's layout (``step``, ``exp_avg``, ``exp_avg_sq``, with amsgrad
    ``max_exp_avg_sq``) plus ``log_lr`` and ``previous``: a ``torch.optim.AdamW`` checkpoint
    loads and starts the learned rates at the group's lr; AdamW loads this one (ignoring the
    extra entries).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] | tuple[Tensor, Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        max_step: float = 0.02,
        *,
        amsgrad: bool = False,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
    ) -> None:
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "max_step": max_step,
            "amsgrad": amsgrad,
            "maximize": maximize,
            "foreach": foreach,
            "capturable": capturable,
            "differentiable": differentiable,
            "fused": fused,
        }
        check_hyperparameters(**defaults)
        super().__init__(params, defaults)
        first = self.param_groups[0]["params"][0]
        self._skipped = torch.zeros((), dtype=torch.int64, device=first.device)
        self._ready: set[Tensor] = set()  # parameters whose state _state() has completed

    @property
    def skipped(self) -> int:
        """Steps refused for a non-finite gradient (reading it waits for the device)."""
        return int(self._skipped)

    @skipped.setter
    def skipped(self, value: int) -> None:
        self._skipped.fill_(int(value))

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's, then every argument of the group checked (one line naming it) and its
        starting rate kept as ``initial_lr``."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        check_hyperparameters(**{k: group[k] for k in self.defaults})
        group.setdefault("initial_lr", float(group["lr"]))

    def __getstate__(self) -> dict[str, Any]:
        """torch's (defaults, state, groups) plus the skipped-step count, so that deep copies
        and pickles keep it."""
        return {**super().__getstate__(), "_skipped": self._skipped}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:  # pickles from before these flags
            for key, value in {**FLAGS, **REFUSED}.items():
                group.setdefault(key, value)
        if "_skipped" not in self.__dict__:
            self._skipped = torch.zeros((), dtype=torch.int64)
        self._ready = set()

    def rates(self) -> list[list[float]]:
        """The learned learning rate of every tensor, group by group (``group["lr"] /
        group["initial_lr"]`` times: what a scheduler multiplies; 1 without one)."""
        return [
            [
                math.exp(self.state[p]["log_lr"].item())
                if "log_lr" in self.state.get(p, {})
                else group["initial_lr"]
                for p in group["params"]
            ]
            for group in self.param_groups
        ]

    def state_dict(self) -> dict[str, Any]:
        """torch's state dict (hooks run) plus ``"skipped"``, so a resumed run keeps the count."""
        return {**super().state_dict(), "skipped": self.skipped}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's (hooks run; a ``torch.optim.AdamW`` state dict too), keeping each learned
        log rate in its own dtype (torch would cast it to a half-precision parameter's)."""
        state_dict = dict(state_dict)
        self.skipped = int(state_dict.pop("skipped", 0))
        self._ready = set()
        own = [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups]
        super().load_state_dict(state_dict)
        for group, before in zip(self.param_groups, own, strict=True):
            for key, value in before.items():  # what a torch.optim.AdamW checkpoint lacks
                group.setdefault(key, value)
        saved = state_dict["state"]
        ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        for i, p in zip(ids, params, strict=True):
            if "log_lr" in saved.get(i, {}):
                self.state[p]["log_lr"] = torch.as_tensor(
                    saved[i]["log_lr"], dtype=_rate_dtype(p), device=p.device
                ).clone()

    def _state(self, p: Tensor, group: dict[str, Any]) -> dict[str, Any]:
        """``p``'s state, created (or completed, for a ``torch.optim.AdamW`` checkpoint or an
        older AdamWHD one) on ``p``'s device."""
        state = self.state[p]
        rate = _rate_dtype(p)
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if group["amsgrad"] and "max_exp_avg_sq" not in state:
            state["max_exp_avg_sq"] = state["exp_avg_sq"].clone()
        if "previous" not in state:
            state["previous"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        step = state.get("step", 0.0)
        if not isinstance(step, Tensor) or step.device != p.device or step.dtype != torch.float32:
            state["step"] = torch.as_tensor(float(step), dtype=torch.float32).to(p.device)
        log_lr = state.get("log_lr")
        if log_lr is None:
            start = group["initial_lr"]
            log_lr = math.log(start) if start > 0 else -math.inf
        if not isinstance(log_lr, Tensor) or log_lr.device != p.device or log_lr.dtype != rate:
            state["log_lr"] = torch.as_tensor(log_lr, dtype=rate).to(p.device)
        self._ready.add(p)
        return state

    def _buckets(self) -> list[tuple[dict[str, Any], dict[str, list[Tensor]]]]:
        """Per group, the stepped tensors (real views) split by device and dtype (one tensor
        per bucket with ``foreach=False``)."""
        keys = ["exp_avg", "exp_avg_sq", "previous"]
        out = []
        for group in self.param_groups:
            amsgrad = group["amsgrad"]
            buckets: dict[Any, dict[str, list[Tensor]]] = {}
            for i, p in enumerate(group["params"]):
                grad = p.grad
                if grad is None:
                    continue
                if grad.is_sparse:
                    raise RuntimeError(
                        "AdamWHD does not support sparse gradients; use torch.optim.SparseAdam"
                    )
                state = self.state[p] if p in self._ready else self._state(p, group)
                dtype = p.dtype
                key = i if group["foreach"] is False else (p.device, dtype)
                bucket = buckets.get(key)
                if bucket is None:
                    names = [
                        "params",
                        "grads",
                        *keys,
                        "log_lr",
                        "step",
                        "max_exp_avg_sq",
                        "states",
                        "complex",
                    ]
                    bucket = buckets[key] = {k: [] for k in names}
                tensors = [p, grad, *(state[k] for k in keys)]
                if amsgrad:
                    tensors.append(state["max_exp_avg_sq"])
                is_complex = dtype.is_complex
                if is_complex:
                    tensors = [torch.view_as_real(t) for t in tensors]
                bucket["complex"].append(is_complex)
                bucket["params"].append(tensors[0])
                bucket["grads"].append(tensors[1])
                for k, t in zip(keys, tensors[2:], strict=False):
                    bucket[k].append(t)
                if amsgrad:
                    bucket["max_exp_avg_sq"].append(tensors[-1])
                bucket["states"].append(state)
                bucket["log_lr"].append(state["log_lr"])
                bucket["step"].append(state["step"])
            out += [(group, bucket) for bucket in buckets.values()]
        return out

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        loss = run_closure(closure)
        buckets = self._buckets()
        if not buckets:
            return loss
        # first the measurements of every bucket, then one finiteness flag for all of them
        measured = []
        for _, b in buckets:
            dots = [
                torch.dot(g.reshape(-1), u.reshape(-1))
                for g, u in zip(b["grads"], b["previous"], strict=True)
            ]
            norms = [*torch._foreach_norm(b["grads"]), *torch._foreach_norm(b["previous"])]
            measured.append(torch.stack([*norms, *dots]).view(3, -1))  # (3, n): |g|, |u|, g.u
        home = self._skipped.device
        on_host = all(m.device.type == "cpu" for m in measured) and not any(
            g["capturable"] for g, _ in buckets
        )
        if on_host:  # no device to wait for: decide here, and step with Python scalars
            values = [m.tolist() for m in measured]
            if all(math.isfinite(v) for rows in values for row in rows for v in row):
                for (group, b), rows in zip(buckets, values, strict=True):
                    self._update(group, b, True, rows)
                return loss
        flags = [torch.isfinite(m[[0, 2]]).all().to(home) for m in measured]
        ok = flags[0] if len(flags) == 1 else torch.stack(flags).all()  # () bool: step or skip
        self._skipped.add_(~ok)
        for (group, b), m in zip(buckets, measured, strict=True):
            self._update(group, b, ok.to(m.device), m)
        return loss

    def _update(
        self,
        group: dict[str, Any],
        b: dict[str, list[Tensor]],
        ok: Tensor | bool,
        measured: Tensor | list[list[float]],
    ) -> None:
        """One bucket's step from its ``(3, n)`` gradient norms, previous update norms and their
        dot products. ``ok``: a 0-dim bool on the bucket's device that masks every change, or
        ``True`` where the host knows the step goes ahead (``measured`` then as Python floats,
        and the masks fold away)."""
        b1, b2 = (float(_host(beta)) for beta in group["betas"])
        sign = -1.0 if group["maximize"] else 1.0
        start = group["initial_lr"]
        low = math.log(min(start, RATE_RANGE[0])) if start > 0 else -math.inf
        high = math.log(max(start, RATE_RANGE[1])) if start > 0 else -math.inf
        lr = _host(group["lr"])
        scale = lr / start if start > 0 else 0.0  # a scheduler's multiplier
        if isinstance(scale, Tensor):
            scale = scale.to(b["params"][0].device).reshape(())
        go = ok is True
        if go:  # on the host: per-tensor scalars as Python floats, no device to wait for
            gn, un, dot = measured
            n = len(gn)
            state = torch.stack([*b["log_lr"], *b["step"]]).tolist()
            logs, counts = state[:n], [c + 1.0 for c in state[n:]]
            logs = [
                min(high, max(low, lg + group["max_step"] * _cos(-sign * d, g * u)))
                for lg, d, g, u in zip(logs, dot, gn, un, strict=True)
            ]
            like = b["log_lr"][0]
            torch._foreach_copy_(b["log_lr"], torch.tensor(logs, dtype=like.dtype).unbind(0))
            torch._foreach_add_(b["step"], 1.0)
            rate = [math.exp(lg) * scale for lg in logs]
            step_size = [-a / (1 - b1**c) for a, c in zip(rate, counts, strict=True)]
            bias2 = [math.sqrt(1 - b2**c) for c in counts]
            decay = [-a * group["weight_decay"] for a in rate]
        else:
            log_lr = torch.stack(b["log_lr"])  # (n,)
            dtype = log_lr.dtype
            g_norm, u_norm, dots = measured.to(dtype)
            cos = (-sign * dots / (g_norm * u_norm + 1e-30)).clamp(-1.0, 1.0)  # 0 without u or g
            learned = (log_lr + group["max_step"] * cos).clamp(low, high)
            halved = (log_lr - math.log(2.0)).clamp_min(low)  # a skipped step halves the rates
            log_lr = torch.where(ok, learned, halved)
            torch._foreach_copy_(b["log_lr"], log_lr.unbind(0))
            steps = torch.stack(b["step"]) + ok  # (n,) float32
            torch._foreach_copy_(b["step"], steps.unbind(0))
            t = steps.to(dtype).clamp_min(1.0)
            rate_t = log_lr.exp() * scale * ok  # (n,), 0 on a skipped step
            step_size = (-rate_t / (1 - b1**t)).unbind(0)
            bias2 = (1 - b2**t).sqrt().unbind(0)
            decay = (-rate_t * group["weight_decay"]).unbind(0)

        # moments: m <- b1' m + (1 - b1) g', with g' = 0 and b1' = 1 on a skipped step
        grads = b["grads"] if go else [torch.where(ok, g, 0.0) for g in b["grads"]]
        if group["maximize"]:
            grads = torch._foreach_neg(grads)
        keep1 = b1 if go else torch.where(ok, b1, 1.0).to(grads[0].dtype)
        keep2 = b2 if go else torch.where(ok, b2, 1.0).to(grads[0].dtype)
        if go:
            torch._foreach_lerp_(b["exp_avg"], grads, 1 - b1)
        else:
            torch._foreach_mul_(b["exp_avg"], keep1)
            torch._foreach_add_(b["exp_avg"], grads, alpha=1 - b1)
        torch._foreach_mul_(b["exp_avg_sq"], keep2)
        torch._foreach_addcmul_(b["exp_avg_sq"], grads, grads, value=1 - b2)
        second = b["exp_avg_sq"]
        if group["amsgrad"]:
            torch._foreach_maximum_(b["max_exp_avg_sq"], b["exp_avg_sq"])
            second = b["max_exp_avg_sq"]
        denom = torch._foreach_sqrt(second)
        torch._foreach_div_(denom, bias2)
        torch._foreach_add_(denom, group["eps"])
        if group["eps"] == 0:  # 0/0 where a moment is 0: step 0 there, not NaN
            torch._foreach_clamp_min_(denom, torch.finfo(denom[0].dtype).tiny)
        update = torch._foreach_div(b["exp_avg"], denom)  # m_hat / (sqrt(v_hat) + eps), x bc1
        torch._foreach_mul_(update, step_size)
        if group["weight_decay"]:
            torch._foreach_add_(update, torch._foreach_mul(b["params"], decay))
        torch._foreach_add_(b["params"], update)
        if go:  # the update is the new previous update (the old one is not needed)
            for state, u, is_complex in zip(b["states"], update, b["complex"], strict=True):
                state["previous"] = torch.view_as_complex(u) if is_complex else u
        else:  # previous <- update, kept as it was on a skipped step (where the update is 0)
            torch._foreach_mul_(b["previous"], (~ok).to(update[0].dtype))
            torch._foreach_add_(b["previous"], update)
