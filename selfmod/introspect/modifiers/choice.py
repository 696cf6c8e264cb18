"""``choice``: make the model's :class:`~selfmod.arch.choice.Choice`\\ s by the guard data, then
commit each one, verified like every change.

By default (``race > 0``) the options are first raced at the run's start, each on its own
weights (:mod:`selfmod.introspect.option_race`, run by the loop before the first cycle): the
winner is committed and its training kept, so no cycle finds a choice open. On development
seeds of ``benchmarks/choice.py`` the race picked the best option on all three workloads where
the gradient choice below lost 5.3 points on one (its options trained on shared weights;
``benchmarks/results/choice_dev.md``). Where there is no race (``race = 0``; choices whose
combinations of options are too many; :class:`~selfmod.runs.SelfModifier`, whose batches come
one at a time), the choice is made by gradient:

While a choice is open, each base step runs one option sampled from ``p = softmax(alpha)``
(the module's training mode: a step costs one option), so every option's weights train in
proportion to its probability. In a cycle the modifier takes the first-order (DARTS)
gradient of the guard loss at the current weights w.r.t. every open choice's ``alpha``,
through the relaxed network on ``choice_rows`` rows of the proposing guard split::

    relax = "darts":  y = sum_i p_i o_i(x)                         (every option runs)
    relax = "gdas":   y = sum_i (h_i - q_i.detach() + q_i) o_i(x)  (one sampled option runs;
                      h = one_hot(argmax(alpha + g)), q = softmax((alpha + g) / tau))
    relax = "expected":  d/d alpha_j E_{k ~ p} guard(o_k) = p_j (L_j - sum_k p_k L_k)
                      (each option alone, forward only: the network as it trains, sampled)
    g_alpha = d/d alpha [guard(w, alpha) - entropy_weight mean_c H(p_c)
                         + diversity_weight (log K - H(mean_c p_c))]

(``expected``, the default, was chosen on development seeds of ``benchmarks/choice.py``: it
and GDAS were the two settings of six above the average fixed option on all three workloads;
GDAS, a one-sample estimate, fell 9.5 and 14 points below the best fixed option when its step
or warm-up changed, so the exact, deterministic one was taken)
and proposes ``alpha - choice_lr * Adam(g_alpha)`` (betas 0.5, 0.9: a handful of cycles;
none before ``warmup`` of the steps, while the options are barely trained),
verified within ``choice_slack`` (eval mode runs the argmax, so a step that moves it changes
the guard function at once, against options trained for a fraction of the steps so far).
The entropy term keeps a choice spread early (DARTS's collapse onto the option that is
easiest to train first); the diversity term (choices with the same options) keeps them from
all picking the same one. Once a choice is confident (``max p >= confidence``), it proposes
the commit of ``argmax(alpha)``; at its last chance (``decide_by`` of the steps or of the
meta budget spent) the commit of the argmax after this cycle's step, with the step. A commit
empties the other options' tensors and their optimizer state, and the module
runs the chosen option only (:func:`selfmod.arch.choice.commit_params`). Eval mode ran the
argmax already, so the commit keeps the guard function exactly; it is verified on the
lookahead (the chosen option training alone against the sampling going on). Skip guard: a
commit to a skip connection or the zero op (:func:`~selfmod.arch.choice.is_skip`) must lower
the guard loss by more than its noise (``strict`` and ``beat_noise``); once such a commit
is not verified, the next one takes the most probable other option.

References: Liu, Simonyan & Yang 2019 (DARTS); Dong & Yang 2019 (GDAS); Zela et al. 2020 and
Chu et al. 2020 (collapse onto skip connections).
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from selfmod import arch
from selfmod.arch.choice import Choice, choice_sites, commit_params, is_skip, key
from selfmod.introspect.budget import examples_budget
from selfmod.introspect.modifiers.base import (
    Context,
    Modifier,
    Params,
    Proposal,
    RunFacts,
    register,
)

#: Adam's decay rates on the logits' meta-gradient (a run has tens of cycles, not thousands)
BETAS = (0.5, 0.9)


class ChoiceSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    race: float = Field(
        0.1,
        ge=0,
        le=0.25,
        description="before the first cycle, every option trains this share of the steps on its "
        "own weights, the race_keep best by guard accuracy twice as long, and the finalist best "
        "on the whole guard set is committed (selfmod.introspect.option_race); shortened to fit "
        "meta_budget; 0: no race",
    )
    race_keep: int = Field(2, ge=2, le=8, description="race: the options that train twice as long")
    race_reads: int = Field(
        3,
        ge=1,
        le=8,
        description="race: a rung's guard figures are the mean of this many reads at even steps "
        "over its second half, the last at its end (1: the end alone)",
    )
    choice_lr: float = Field(0.5, gt=0, le=10, description="Adam step on the logits per cycle")
    relax: Literal["darts", "gdas", "expected"] = Field(
        "expected",
        description="darts: the softmax mixture of every option on the guard rows; gdas: one "
        "Gumbel-sampled option, straight-through (cheaper, noisier); expected: the exact "
        "gradient of the sampled network's expected guard loss (K forward passes per choice)",
    )
    tau: float = Field(1.0, gt=0, le=100, description="gdas: the Gumbel-softmax temperature")
    confidence: float = Field(
        0.9, gt=0, lt=1, description="commit a choice once its largest probability is this"
    )
    decide_by: float = Field(
        0.5,
        gt=0,
        le=1,
        description="commit the argmax by this fraction of the steps or of the meta budget",
    )
    entropy_weight: float = Field(
        0.0, ge=0, le=10, description="weight of -H(p): keeps a choice spread early"
    )
    diversity_weight: float = Field(
        0.0, ge=0, le=10, description="weight of log K - H(mean p) over choices alike"
    )
    warmup: float = Field(
        0.0, ge=0, lt=1, description="no logits step before this fraction of the steps"
    )
    choice_rows: int = Field(256, ge=1, le=100_000, description="guard rows of the relaxed pass")
    choice_slack: float = Field(
        0.05,
        ge=0,
        le=1,
        description="a logits step commits if the verifying guard loss is at most (1 + slack) "
        "x that of not taking it (the commit of a choice: the run's epsilon)",
    )


@register
class ChoiceModifier(Modifier):
    name = "choice"
    order = 65
    reads_meta_gradient = False  # it takes its own first-order gradient
    Settings = ChoiceSettings

    def applies(self, problem: Any, hparams: Params, facts: RunFacts) -> str | None:
        if not choice_sites(problem.module):
            return "choice needs selfmod.arch.Choice modules in the model (the choices it makes)"
        return None

    def propose(self, ctx: Context, memory: Params) -> tuple[list[Proposal], Params]:
        s: Any = self.settings
        state, module = ctx.state, ctx.problem.module
        sites = [c for c in choice_sites(module) if int(state.buffers[key(c, "chosen")]) < 0]
        if not sites or ctx.lookahead is None:
            return [], memory
        logits = {c: state.buffers[key(c, "logits")] for c in sites}
        probs = {c: torch.softmax(a.double(), 0) for c, a in logits.items()}
        ready = {c: self.pick(module, c, p, memory) for c, p in probs.items()
                 if p.max() >= s.confidence}  # fmt: skip
        if ready:
            return [self.commit(module, ready, probs, False)], self.tried(module, ready, memory)
        warm = ctx.probe.get("step", 0) >= s.warmup * ctx.settings.steps
        if not warm and not self.last_chance(ctx):
            return [], memory  # the options have not trained enough to be compared
        g, loss = self.relaxed_grads(ctx, logits)
        new, info = {}, {}
        for c, a in logits.items():
            m, v = adam(g[c], memory.get(key(c, "m")), memory.get(key(c, "v")))
            t = memory.get(key(c, "t"), torch.zeros(())) + 1
            memory = {**memory, key(c, "m"): m, key(c, "v"): v, key(c, "t"): t}
            b1, b2 = 1 - BETAS[0] ** float(t), 1 - BETAS[1] ** float(t)  # Adam's bias correction
            moved = a - (s.choice_lr * (m / b1) / ((v / b2).sqrt() + 1e-12)).to(a.dtype)
            new[c] = moved.tolist()
            names = module.get_submodule(c).names
            info[c] = {"options": names, "p": _rounded(probs[c]), "grad": _rounded(g[c], 6)}
        info_all = {"choice": info, "relaxed guard loss": loss}
        if self.last_chance(ctx):  # the argmax after this step, committed with it
            moved = {c: torch.softmax(torch.tensor(v).double(), 0) for c, v in new.items()}
            ready = {c: self.pick(module, c, p, memory) for c, p in moved.items()}
            memory = self.tried(module, ready, memory)
            last = self.commit(module, ready, moved, True)
            info_all = {**info_all, **last.info, "choice": info | last.info["choice"]}
            surgery = {"logits": new, "commit": ready}
            return [replace(last, surgery=surgery, info=info_all)], memory
        step = Proposal(self.name, surgery={"logits": new}, info=info_all, slack=s.choice_slack)
        return [step], memory

    def last_chance(self, ctx: Context) -> bool:
        """Whether a choice must commit now: past ``decide_by`` of the steps (the next cycle's
        step), or of the meta budget with this cycle's cost (the last cycle's; the first one's:
        its work so far and three replays), so that cycles are left to verify the commit."""
        cfg, n, look = ctx.settings, ctx.counters, ctx.lookahead
        by = self.settings.decide_by  # type: ignore[attr-defined]
        if ctx.probe.get("step", 0) + getattr(cfg, "cycle", 0) > by * cfg.steps:
            return True
        share = getattr(cfg, "meta_budget", None)
        if n is None or share is None or n.examples is None or look is None:
            return False
        limit = examples_budget(cfg) or cfg.steps * cfg.batch_size
        this = n.last_cycle or look.cost.total + 3 * look.examples + len(look.propose[1])
        return n.meta_examples + this > by * share * limit

    def pick(self, module: Any, site: str, p: Tensor, memory: Params) -> int:
        """The option a commit takes: the most probable, but where a commit to a skip
        connection was tried and not verified (the skip guard), the most probable other one."""
        choice: Choice = module.get_submodule(site)
        order = [int(i) for i in torch.argsort(p, descending=True, stable=True)]
        if key(site, "skip_tried") not in memory:
            return order[0]
        ops = list(choice.options.values())
        return next((i for i in order if not is_skip(ops[i])), order[0])

    def tried(self, module: Any, ready: dict[str, int], memory: Params) -> Params:
        """``memory`` noting each choice of ``ready`` whose commit is to a skip connection."""
        for c, k in ready.items():
            if is_skip(list(module.get_submodule(c).options.values())[k]):
                memory = {**memory, key(c, "skip_tried"): torch.tensor(True)}
        return memory

    def commit(
        self, module: Any, ready: dict[str, int], probs: dict[str, Tensor], last: bool
    ) -> Proposal:
        """The proposal that commits ``ready`` (site -> option index)."""
        skip, info = False, {}
        for c, k in ready.items():
            choice: Choice = module.get_submodule(c)
            skip |= is_skip(list(choice.options.values())[k])
            info[c] = {"options": choice.names, "p": _rounded(probs[c]), "option": choice.names[k]}
        why = "last chance" if last else f"confident (p >= {self.settings.confidence})"  # type: ignore[attr-defined]
        return Proposal(
            self.name, surgery={"commit": ready}, strict=skip, beat_noise=skip,
            info={"choice": info, "commit": why + ("; skip guard: strict" if skip else "")},
        )  # fmt: skip

    def relaxed_grads(
        self, ctx: Context, logits: dict[str, Tensor]
    ) -> tuple[dict[str, Tensor], float]:
        """``({site: d J / d alpha (K,)}, guard loss)``: ``J`` the relaxed guard loss plus the
        entropy and diversity terms (module docstring), at the current weights, eval mode."""
        s: Any = self.settings
        look, problem, state = ctx.lookahead, ctx.problem, ctx.state
        x, y = (t[: s.choice_rows] for t in look.propose)
        alphas = {c: a.detach().clone().requires_grad_(True) for c, a in logits.items()}
        if s.relax == "expected":
            return self.expected_grads(ctx, alphas, x, y)
        with torch.enable_grad():
            weights = {
                key(c, "weights"): arch.mixture_weights(a, s.relax, s.tau, True, ctx.rng)
                if s.relax == "gdas" else torch.softmax(a, 0)
                for c, a in alphas.items()
            }  # fmt: skip
            out, _ = problem.model(state.params, state.buffers, x, train=False, extra=weights)
            loss = problem.loss(out, y)
            total = loss
            if s.entropy_weight:
                total = total + s.entropy_weight * arch.entropy_penalty(alphas.values())
            for same in _alike(alphas).values():
                if s.diversity_weight and len(same) > 1:
                    total = total + s.diversity_weight * arch.diversity_penalty(same)
            grads = torch.autograd.grad(total, list(alphas.values()))
        runs = sum(int((w.detach() != 0).sum()) for w in weights.values()) / len(weights)
        look.cost.trained(len(y), runs)  # a forward and backward of the options that ran
        return dict(zip(alphas, (g.detach() for g in grads), strict=True)), float(loss.detach())

    def expected_grads(
        self, ctx: Context, alphas: dict[str, Tensor], x: Any, y: Tensor
    ) -> tuple[dict[str, Tensor], float]:
        """``relax = "expected"``: the exact gradient of the expected guard loss of the sampled
        network, ``d/d alpha_j E_{k ~ p}[L_k] = p_j (L_j - sum_k p_k L_k)``, ``L_k`` the guard
        loss with option ``k`` alone (the other choices at their argmax), by ``K`` forward
        passes per choice and no backward; plus the entropy and diversity terms'."""
        s: Any = self.settings
        look, problem, state = ctx.lookahead, ctx.problem, ctx.state
        grads, expected = {}, math.nan
        for c, a in alphas.items():
            losses = []
            for k in range(a.numel()):
                one = {key(c, "weights"): torch.nn.functional.one_hot(torch.tensor(k), a.numel())}
                one = {n: w.to(a.dtype).to(a.device) for n, w in one.items()}
                with torch.no_grad():
                    out, _ = problem.model(state.params, state.buffers, x, train=False, extra=one)
                    losses.append(problem.loss(out, y).to(a.dtype))
            look.cost.evaluated(len(y) * a.numel())
            p, l_k = torch.softmax(a.detach(), 0), torch.stack(losses)  # (K,), (K,)
            grads[c] = p * (l_k - (p * l_k).sum())
            expected = float((p * l_k).sum()) if math.isnan(expected) else expected
        with torch.enable_grad():
            total = torch.zeros((), dtype=next(iter(alphas.values())).dtype)
            if s.entropy_weight:
                total = total + s.entropy_weight * arch.entropy_penalty(alphas.values())
            for same in _alike(alphas).values():
                if s.diversity_weight and len(same) > 1:
                    total = total + s.diversity_weight * arch.diversity_penalty(same)
            if total.requires_grad:
                extra = torch.autograd.grad(total, list(alphas.values()), allow_unused=True)
                for c, e in zip(alphas, extra, strict=True):
                    grads[c] = grads[c] + (0 if e is None else e.detach())
        return grads, expected

    def apply(self, proposal: Proposal, state: Any, problem: Any) -> Any:
        params, buffers, opt_state = state.params, dict(state.buffers), state.opt_state
        for c, values in proposal.surgery.get("logits", {}).items():
            old = buffers[key(c, "logits")]
            buffers[key(c, "logits")] = torch.tensor(values, dtype=old.dtype, device=old.device)
        for c, index in proposal.surgery.get("commit", {}).items():
            if int(buffers[key(c, "chosen")]) >= 0:  # a second approved copy: committed already
                continue
            params, buffers, opt_state = commit(problem.module, c, int(index), params, buffers,
                                                opt_state)  # fmt: skip
        return replace(state, params=params, buffers=buffers, opt_state=opt_state)


def commit(
    module: Any, site: str, index: int, params: Params, buffers: Params, opt_state: Any
) -> tuple[Params, Params, Any]:
    """:func:`~selfmod.arch.choice.commit_params` and the optimizer state with it: every
    per-coordinate tensor of a dropped option's parameters emptied the same way."""
    new, buffers, dropped = commit_params(module, site, index, params, buffers)
    shapes = {k: params[k].shape for k in dropped}
    opt_state = arch.map_state(opt_state, shapes, lambda k, t: t.new_zeros(new[k].shape))
    return new, buffers, opt_state


def adam(g: Tensor, m: Tensor | None, v: Tensor | None) -> tuple[Tensor, Tensor]:
    """Adam's moments ``(m, v)`` after ``g`` with :data:`BETAS` (both start at 0)."""
    m = torch.zeros_like(g) if m is None else m
    v = torch.zeros_like(g) if v is None else v
    return BETAS[0] * m + (1 - BETAS[0]) * g, BETAS[1] * v + (1 - BETAS[1]) * g * g


def _alike(alphas: dict[str, Tensor]) -> dict[int, list[Tensor]]:
    """The logits grouped by their number of options (the diversity term's sets)."""
    out: dict[int, list[Tensor]] = {}
    for a in alphas.values():
        out.setdefault(a.numel(), []).append(a)
    return out


def _rounded(t: Tensor, digits: int = 4) -> list[float]:
    return [round(float(v), digits) if math.isfinite(float(v)) else float(v) for v in t]
