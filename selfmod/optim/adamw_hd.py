"""``AdamWHD``: a drop-in ``torch.optim`` AdamW whose per-tensor learning rates tune themselves.

The in-place, ``foreach`` form of :func:`selfmod.optim.adamw_hd` (same maths, tested equal):
before each step every tensor's rate moves by normalized hypergradient descent,
``log alpha_i += max_step * cos(g_i, -u_i)``, with ``g`` this step's gradient and ``u`` the
tensor's previous update, then ``p_i <- p_i - alpha_i (adam_dir_i + wd p_i)``. A rising slope
along the last step (``g . u < 0``) raises the rate, an overshoot lowers it; no rate moves by more
than ``max_step`` (in log) per step, and each stays in [1e-6, 10].

Guard rail: a step whose gradient has a NaN or an infinity changes nothing (parameters and
moments stay as they were), halves every rate and counts in ``skipped``, like
``torch.amp.GradScaler``'s skipped steps. The cost over ``torch.optim.AdamW`` (foreach) is one
dot product and two norms per tensor and one host sync per step, and one more buffer per
parameter (the previous update, beside Adam's two moments).

References: Baydin et al. 2018, "Online Learning Rate Adaptation with Hypergradient Descent";
Loshchilov & Hutter 2019 (AdamW).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from selfmod.optim.base import check_range, run_closure
from selfmod.optim.hypergradient import LOG_LR_RANGE


class AdamWHD(torch.optim.Optimizer):
    """``AdamWHD(model.parameters(), lr=1e-2)`` then the usual ``zero_grad / backward / step``.

    ``lr`` is every tensor's starting rate; :meth:`rates` gives the learned ones, per tensor.
    Schedulers act on ``group["lr"]`` as a multiplier of the learned rates (its starting value
    is kept as ``group["initial_lr"]``). Param groups may differ in any argument.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        max_step: float = 0.02,
    ) -> None:
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "max_step": max_step,
        }
        super().__init__(params, defaults)
        self.skipped = 0

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's, then every argument of the group checked (one line naming it) and its
        starting rate kept as ``initial_lr``."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        check_range("lr", group["lr"], 1e-6, 10.0)
        check_range("betas[0]", group["betas"][0], 0.0, 1.0, high_open=True)
        check_range("betas[1]", group["betas"][1], 0.0, 1.0, high_open=True)
        check_range("eps", group["eps"], 0.0)
        check_range("weight_decay", group["weight_decay"], 0.0)
        check_range("max_step", group["max_step"], 0.0, 1.0, low_open=True)
        group.setdefault("initial_lr", group["lr"])

    def rates(self) -> list[list[float]]:
        """The learned learning rate of every tensor, group by group (``group["lr"] /
        group["initial_lr"]`` times: what a scheduler multiplies; 1 without one)."""
        return [
            [
                math.exp(self.state[p]["log_lr"]) if p in self.state else group["initial_lr"]
                for p in group["params"]
            ]
            for group in self.param_groups
        ]

    def state_dict(self) -> dict[str, Any]:
        """torch's state dict plus ``"skipped"``, so a resumed run keeps the count."""
        return {**super().state_dict(), "skipped": self.skipped}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        self.skipped = int(state_dict.pop("skipped", 0))
        super().load_state_dict(state_dict)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        loss = run_closure(closure)
        live = [
            (group, params)
            for group in self.param_groups
            if (params := [p for p in group["params"] if p.grad is not None])
        ]
        if not live:
            return loss
        # one host sync for every group: gradient norms (the finiteness check) and the cosines
        measured, plans = [], []
        for group, params in live:
            for p in params:
                if p.grad.is_sparse:
                    raise RuntimeError("AdamWHD does not support sparse gradients")
                if p not in self.state:
                    self.state[p] = {
                        "step": 0,
                        "log_lr": math.log(group["initial_lr"]),
                        "exp_avg": torch.zeros_like(p),
                        "exp_avg_sq": torch.zeros_like(p),
                        "previous": torch.zeros_like(p),
                    }
            grads = [p.grad for p in params]
            previous = [self.state[p]["previous"] for p in params]
            dots = [
                torch.dot(g.reshape(-1), u.reshape(-1))
                for g, u in zip(grads, previous, strict=True)
            ]
            measured += [*torch._foreach_norm(grads), *torch._foreach_norm(previous), *dots]
            plans.append((group, params, grads, previous))
        values = torch.stack(measured).tolist()  # promotes mixed dtypes
        if not all(map(math.isfinite, values)):
            self._skip()
            return loss
        at = 0
        for group, params, grads, previous in plans:
            n = len(params)
            g_norm, u_norm = values[at : at + n], values[at + n : at + 2 * n]
            dot = values[at + 2 * n : at + 3 * n]
            at += 3 * n
            self._update(group, params, grads, previous, g_norm, u_norm, dot)
        return loss

    def _skip(self) -> None:
        """A non-finite gradient: change nothing but halve every rate."""
        self.skipped += 1
        low = LOG_LR_RANGE[0]
        for group in self.param_groups:
            for p in group["params"]:
                if p in self.state:
                    self.state[p]["log_lr"] = max(low, self.state[p]["log_lr"] - math.log(2.0))

    def _update(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        previous: list[Tensor],
        g_norm: list[float],
        u_norm: list[float],
        dot: list[float],
    ) -> None:
        b1, b2 = group["betas"]
        low, high = LOG_LR_RANGE
        scale = group["lr"] / group["initial_lr"]  # a scheduler's multiplier
        rates, counts = [], []
        for p, gn, un, d in zip(params, g_norm, u_norm, dot, strict=True):
            state = self.state[p]
            if un > 0.0 and gn > 0.0:  # no previous update yet, or no gradient: keep the rate
                cos = min(1.0, max(-1.0, -d / (gn * un + 1e-30)))
                state["log_lr"] = min(high, max(low, state["log_lr"] + group["max_step"] * cos))
            state["step"] += 1
            rates.append(math.exp(state["log_lr"]) * scale)
            counts.append(state["step"])
        exp_avg = [self.state[p]["exp_avg"] for p in params]
        exp_avg_sq = [self.state[p]["exp_avg_sq"] for p in params]
        torch._foreach_lerp_(exp_avg, grads, 1 - b1)
        torch._foreach_mul_(exp_avg_sq, b2)
        torch._foreach_addcmul_(exp_avg_sq, grads, grads, 1 - b2)
        denom = torch._foreach_sqrt(exp_avg_sq)
        torch._foreach_div_(denom, [math.sqrt(1 - b2**t) for t in counts])
        torch._foreach_add_(denom, group["eps"])
        update = torch._foreach_div(exp_avg, denom)  # m_hat / (sqrt(v_hat) + eps) times 1 - b1^t
        torch._foreach_mul_(update, [-a / (1 - b1**t) for a, t in zip(rates, counts, strict=True)])
        if group["weight_decay"]:
            decay = torch._foreach_mul(params, [-a * group["weight_decay"] for a in rates])
            torch._foreach_add_(update, decay)
        torch._foreach_add_(params, update)
        for p, u in zip(params, update, strict=True):
            self.state[p]["previous"] = u
