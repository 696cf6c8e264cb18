"""Propose, apply, verify, decide: the steps of a cycle between the estimate and the commit.

Each function takes what it reads explicitly and returns what it decides; the loop
(:mod:`.loop`) alone applies the outcome to the run.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import Any

from selfmod.introspect import verifier
from selfmod.introspect.lookahead import Lookahead
from selfmod.introspect.modifiers import Context, Modifier, Proposal, registry
from selfmod.introspect.modifiers.base import apply_plain, merge
from selfmod.introspect.problem import Problem
from selfmod.introspect.state import RunState


def propose(
    modifiers: Sequence[Modifier], ctx: Context, state: RunState
) -> tuple[list[Proposal], RunState]:
    """Every modifier's proposals (the due ones, in registry order) and ``state`` with each
    one's new memory; proposals that share a ``group`` become one joint proposal at the place
    of the first."""
    slots: list[Proposal | str] = []
    groups: dict[str, list[Proposal]] = {}
    for m in modifiers:
        proposals, memory = m.propose(ctx, state.memory.get(m.name, {}))
        state = replace(state, memory={**state.memory, m.name: memory})
        for p in proposals:
            if p.group is None:
                slots.append(p)
                continue
            if p.group not in groups:
                groups[p.group] = []
                slots.append(p.group)
            groups[p.group].append(p)
    return [merge(s, groups[s]) if isinstance(s, str) else s for s in slots], state


def apply(
    proposal: Proposal,
    state: RunState,
    modifiers: Sequence[Modifier],
    problem: Problem,
    config: Any,
) -> RunState:
    """``state`` with ``proposal`` applied by its modifier (pure; the run's own, else the
    registered one), every tensor row-major whatever layout the modifier returned
    (:meth:`RunState.contiguous`)."""
    if proposal.parts:
        for part in proposal.parts:
            state = apply(part, state, modifiers, problem, config)
        return state
    m = {m.name: m for m in modifiers}.get(proposal.modifier)
    if m is None and proposal.modifier in registry():
        m = registry()[proposal.modifier].from_config(config)
    changed = m.apply(proposal, state, problem) if m else apply_plain(proposal, state)
    return changed.contiguous()


def verdict(
    proposal: Proposal,
    look: Lookahead,
    state: RunState,
    proposed: RunState,
    current: float,
    config: Any,
) -> tuple[str, str, float]:
    """``(decision, reason, proposed guard loss)`` for ``proposed``, ``proposal`` applied to
    ``state``: ``commit`` (``pending`` under manual approval) if it keeps every invariant
    (:func:`.verifier.check`), else ``reject``; unchecked with safeguards off."""
    tol = proposal.tolerance(config.epsilon)
    if not config.safeguards:
        return _kept(config), "committed unchecked (safeguards off)", math.nan
    noise = proposal.beat_noise
    reason, value = verifier.check(look, state, proposed, current, tol, config, noise)
    if reason is not None:
        return "reject", reason, value
    ok = f"guard loss {value:.6g} vs {current:.6g} (tolerance x{1 + tol:g}); invariants hold"
    if value == current:  # the lookahead cannot tell: the check could not have failed
        ok += "; no effect within the lookahead: accepted by rule, not by its guard loss"
    return _kept(config), ok, value


def _kept(config: Any) -> str:
    return "pending" if config.approval == "manual" else "commit"


def approvals(
    pending: list[tuple[int, int, dict[str, Any], bool]],
    applied: set[int],
    cycle: int,
    expiry: int,
) -> Iterator[tuple[int, dict[str, Any], str, str]]:
    """Manual approval: the pending changes to act on now, in order, as ``(seq, change,
    decision, reason)``: the approved ones (``applied``) and the ones older than ``expiry``
    cycles past their next cycle (``expired``: approved or not, a change verified against an
    old state is not applied late). Those already in ``applied`` are skipped."""
    for seq, made, change, approved in pending:
        if seq in applied:
            continue
        if cycle - made - 1 > expiry:
            why = f"proposal {seq} from cycle {made} expired (approval_expiry {expiry})"
            yield seq, change, "expired", why
        elif approved:
            yield seq, change, "applied", f"approved proposal {seq} applied"


def per_step_changes(
    modifiers: Sequence[Modifier], entries: Sequence[Any], good: RunState, state: RunState
) -> Iterator[tuple[str, str, dict[str, Any], dict[str, Any]]]:
    """``(modifier, reason, before, after)`` of each per-step modifier's changes since the
    last cycle (``good``: the state then), in natural units."""
    for m in modifiers:
        if m.per_step:
            keys = [e for e in entries if e.key in m.needs]
            why = getattr(m, "summary", f"{m.name}: per-step changes since the last cycle")
            before = {e.name: e.natural(good.hparams[e.key]) for e in keys}
            yield m.name, why, before, {e.name: e.natural(state.hparams[e.key]) for e in keys}


def memory_reset(modifiers: Sequence[Modifier], state: RunState) -> RunState:
    """``state`` with every modifier's memory as after a change of data distribution."""
    memory = state.memory
    reset = {m.name: m.reset(memory[m.name]) for m in modifiers if m.name in memory}
    return replace(state, memory={**memory, **reset})
