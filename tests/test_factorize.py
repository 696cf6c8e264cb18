"""Low-rank factorization (``selfmod.arch.lowrank`` and the ``factorize`` modifier): the layer
is an ``nn.Linear`` until factored, the factors are the truncated SVD, surgery around a factored
layer keeps the function, the proposal matches a hand computation, and a run resumes bitwise
through a factorization."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from test_composition import _context
from test_introspect import FAST  # the small, fast run the loop's tests share
from torch import nn

from selfmod import arch
from selfmod.introspect import Introspector
from selfmod.introspect.config import TrainConfig
from selfmod.introspect.modifiers import Proposal
from selfmod.introspect.modifiers.factorize import Factorize
from selfmod.introspect.modifiers.lr import LearningRates
from selfmod.introspect.problem import Problem
from selfmod.introspect.summary import unused


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _net(seed: int = 0, factorable: bool = True) -> nn.Sequential:
    torch.manual_seed(seed)
    mid = arch.FactorableLinear(12, 10) if factorable else nn.Linear(12, 10)
    return nn.Sequential(nn.Linear(6, 12), nn.ReLU(), mid, nn.ReLU(), nn.Linear(10, 3)).double()


def _out(problem: Problem, params, x):
    return problem.predict(params, {}, x)


def test_a_dense_factorable_layer_is_an_nn_linear_with_the_same_random_draws():
    plain, fact = _net(factorable=False), _net(factorable=True)
    for i in (0, 2, 4):
        assert torch.equal(plain[i].weight, fact[i].weight)
    x = torch.randn(7, 6, dtype=torch.float64)
    assert torch.equal(plain(x), fact(x))  # the empty factors add nothing
    assert fact[2].left.shape == (10, 0) and fact[2].right.shape == (0, 12)
    assert arch.cost(fact, (6,)) == arch.cost(plain, (6,))  # empty tensors cost nothing


def test_factorization_is_the_truncated_svd_and_keeps_the_function_at_full_rank():
    net = _net()
    problem = Problem(net, F.cross_entropy)
    params, _ = problem.init()
    x = torch.randn(9, 6, dtype=torch.float64)
    full = arch.factorized_params(params, "2", 10)  # min(10, 12): exact
    assert full["2.left"].is_contiguous() and full["2.right"].is_contiguous()  # as stored
    assert torch.allclose(_out(problem, full, x), _out(problem, params, x), atol=1e-10, rtol=0)
    assert full["2.weight"].shape == (10, 0) and arch.is_factored(full, "2")
    w = params["2.weight"]
    s = torch.linalg.svdvals(w)
    for r in (1, 4, 7):
        low = arch.factorized_params(params, "2", r)
        product = low["2.left"] @ low["2.right"]
        # Eckart-Young: the error of the best rank-r approximation is the tail of the spectrum
        assert torch.allclose((w - product).norm(), s[r:].norm(), atol=1e-10, rtol=0)
        assert torch.allclose(low["2.left"].norm(dim=0), low["2.right"].norm(dim=1))  # balanced
        assert low["2.right"].shape[0] == r  # the rank
        # the factored network is the dense one with the product as its weight
        dense = {**params, "2.weight": product}
        assert torch.allclose(_out(problem, low, x), _out(problem, dense, x), atol=1e-12, rtol=0)
        c = arch.cost(net, (6,), low)
        assert c.params == sum(v.numel() for v in low.values())
        assert c.params == arch.cost(net, (6,), params).params - 12 * 10 + r * (12 + 10)
        assert c.flops == 2 * (6 * 12 + r * 22 + 10 * 3) + 12 + 10 + 3
    with pytest.raises(ValueError, match="already factored"):
        arch.factorized_params(full, "2", 3)
    with pytest.raises(ValueError, match=r"rank must be in \[1, 10\]"):
        arch.factorized_params(params, "2", 11)


def test_growth_and_pruning_around_a_factored_layer_keep_the_function():
    net = _net()
    problem = Problem(net, F.cross_entropy)
    params, _ = problem.init()
    low = arch.factorized_params(params, "2", 4)
    x = torch.randn(9, 6, dtype=torch.float64)
    before = _out(problem, low, x)
    into, out_of = problem.groups  # the units the layer reads and those it writes
    assert [s.key for s in into.consumers] == ["2.weight", "2.right"]
    assert [s.key for s in out_of.producers] == ["2.weight", "2.left", "2.bias"]
    grown = arch.apply_params(arch.zero_plan(into, low, 3), low)  # zero fan-out: same function
    assert grown["2.right"].shape == (4, 15) and grown["2.weight"].shape == (10, 0)
    assert torch.allclose(_out(problem, grown, x), before, atol=1e-12, rtol=0)
    # pruning a unit the layer writes = pruning it from the dense product
    keep = torch.ones(10, dtype=torch.bool)
    keep[[2, 7]] = False
    pruned = arch.apply_params(arch.prune_plan(out_of, keep), low)
    dense = {**low, "2.weight": low["2.left"] @ low["2.right"], "2.left": low["2.left"][:, :0],
             "2.right": low["2.right"][:0]}  # fmt: skip
    dense_pruned = arch.apply_params(arch.prune_plan(out_of, keep), dense)
    assert torch.allclose(
        _out(problem, pruned, x), _out(problem, dense_pruned, x), atol=1e-12, rtol=0
    )
    # saliency reads the fan-in from the factor once the weight is empty
    assert torch.equal(
        problem.saliency(low, 1), low["2.left"].norm(dim=1) * low["4.weight"].norm(dim=0)
    )


def _at_cap(**over) -> Introspector:
    """A built-in MLP run naming factorize, both hidden layers at max_width (20), 20 base
    steps done without a cycle."""
    cfg = TrainConfig(
        **{**FAST, "modifiers": ["lr", "grow", "factorize"], "width": 20, "max_width": 20,
           "steps": 100, "factorize_after": 0.0, "factorize_rank": 0.25, **over}
    )  # fmt: skip
    run = Introspector(cfg)
    for _ in range(20):
        run.base_step()
    return run


def test_the_proposal_matches_a_hand_computation_and_waits_for_growth_and_time():
    run = _at_cap(factorize_rank=0.25, factorize_tolerance=0.03)
    module = run.problem.module  # hidden -> hidden only
    assert isinstance(module.get_submodule("2"), arch.FactorableLinear)
    assert type(module.get_submodule("0")) is nn.Linear
    fact = Factorize.from_config(run.config)
    (proposal,), _ = fact.propose(_context(run), {})
    r = math.ceil(0.25 * 20)  # 5: 5 * 40 = 200 < 400 parameters
    assert proposal.surgery == {"factorize": {"2": r}}
    before = sum(v.numel() for v in run.params.values())
    assert proposal.info["params"] == [before, before - 400 + r * 40]
    assert proposal.tolerance(run.config.epsilon) == 0.03  # its own tolerance, not epsilon
    assert _roundtrip(proposal) == proposal.to_json()
    # not before factorize_after of the steps, nor while growth can still widen a layer
    late = _at_cap(factorize_after=0.5)
    assert Factorize.from_config(late.config).propose(_context(late), {})[0] == []
    wide = _at_cap(max_width=40)
    assert fact.propose(_context(wide), {})[0] == []
    # once growth has reached the ceiling, a layer below it (a dead unit pruned) still counts
    assert fact.propose(_context(_at_cap()), {})[1]["reached"].tolist() == [True, True]
    (again,), _ = fact.propose(_context(wide), {"reached": torch.tensor([True, True])})
    assert again.surgery == {"factorize": {"2": 5}}
    # a rank that would not save parameters is not proposed
    assert Factorize(factorize_rank=0.6).rank(20, 20) == 0  # 12 * 40 > 400
    assert Factorize(factorize_rank=0.45).rank(20, 20) == 9


def _roundtrip(p: Proposal) -> dict:
    return Proposal.from_json(p.to_json(), {}).to_json()


def test_apply_gives_the_factors_the_weights_rate_and_fresh_state():
    run = _at_cap()
    fact = Factorize.from_config(run.config)
    (proposal,), _ = fact.propose(_context(run), {})
    state = fact.apply(proposal, run.state, run.problem)
    names = list(run.params)
    i_w, i_l, i_r = (names.index(f"2.{k}") for k in ("weight", "left", "right"))
    lr = state.hparams["log_lr"]
    assert lr[i_l] == lr[i_w] == lr[i_r] == run.state.hparams["log_lr"][i_w]
    others = [i for i in range(len(names)) if i not in (i_l, i_r)]
    assert torch.equal(lr[others], run.state.hparams["log_lr"][others])
    tensors = _momentum(state.opt_state)  # SGD's momentum: zeros in the new shapes
    assert tensors["2.weight"].shape == (20, 0)
    assert tensors["2.left"].shape == (20, 5) and not tensors["2.left"].any()
    assert tensors["2.right"].shape == (5, 20) and not tensors["2.right"].any()
    assert torch.equal(tensors["0.weight"], _momentum(run.state.opt_state)["0.weight"])
    assert run.problem.widths(state.params) == [20, 20]  # the units stay
    assert run.params["2.weight"].shape == (20, 20)  # pure: the run's state is untouched
    # a second approved copy of the change (manual approval) leaves the factored layer alone
    again = fact.apply(proposal, state, run.problem)
    assert all(torch.equal(again.params[k], state.params[k]) for k in state.params)


def _momentum(state) -> dict[str, torch.Tensor]:
    """The per-parameter dict of an SGD state (the one with the params' keys)."""
    found: dict[str, torch.Tensor] = {}

    def walk(x):
        if isinstance(x, dict):
            if "0.weight" in x and isinstance(x["0.weight"], torch.Tensor):
                found.update(x)
            for v in x.values():
                walk(v)
        elif isinstance(x, tuple | list):
            for v in x:
                walk(v)

    walk(state)
    return found


def test_empty_tensors_rates_neither_move_nor_count_in_the_mean():
    run = _at_cap(lr_mean="fixed")
    names = list(run.params)
    active = torch.tensor([run.params[n].numel() > 0 for n in names])
    assert not active.all()  # left and right are empty while the layer is dense
    mod = LearningRates.from_config(run.config)
    current = torch.zeros(len(names))
    new = torch.arange(len(names), dtype=torch.float32)
    out = mod.adjust(current, new, _context(run))
    move = new[active] - new[active].mean()  # by hand: centred over the active entries only
    assert torch.allclose(out[active], move) and not out[~active].any()


def test_a_run_factorizes_verified_and_resumes_bitwise_through_it(tmp_path):
    from selfmod.runs.recorder import RunRecorder
    from selfmod.runs.report import summary_rows

    cfg = TrainConfig(
        **{**FAST, "modifiers": ["lr", "grow", "factorize"], "width": 8, "max_width": 16,
           "steps": 160, "factorize_after": 0.25, "factorize_tolerance": 1.0,
           "factorize_rank": 0.25}
    )  # fmt: skip
    full = Introspector(cfg)
    full.run()
    decisions = [d for d in full.history["decisions"] if d["modifier"] == "factorize"]
    assert [d["decision"] for d in decisions] == ["commit"]
    assert decisions[0]["step"] >= 40  # factorize_after * steps
    assert arch.is_factored(full.params, "2") and full.params["2.left"].shape == (16, 4)
    assert full.problem.cost(full.params, full.example).params == sum(
        v.numel() for v in full.params.values()
    )
    module = full.problem.export(full.params, full.state.buffers).eval()  # a plain nn.Module
    x = full.sources[0].test_x[:50]
    with torch.no_grad():
        assert torch.equal(module(x), full.problem.predict(full.params, full.state.buffers, x))
    # what the report shows: no rate for an empty tensor (the factors before, the weight after)
    names = full.names
    left, right, weight = (names.index(f"2.{k}") for k in ("left", "right", "weight"))
    fresh = Introspector(cfg)
    assert unused(fresh.names, fresh.params) == [left, right]  # dense: the factors are empty
    after = [r["unused"] for r in full.history["log"] if r["step"] > decisions[0]["step"]]
    assert after and all(u == [weight] for u in after)
    summary = full.summary()
    assert summary["unused_tensors"] == [weight]
    shown = dict((r[0], r[1]) for r in summary_rows({"tuned_summary": summary}))
    rates = shown["final learning rates"].split(", ")
    assert len(rates) == len(names) - 1 == len(summary["lr"]) - 1
    first = Introspector(cfg, recorder=RunRecorder(tmp_path, keep=50))
    first.run()
    back = Introspector(cfg, recorder=(recorder := RunRecorder(tmp_path, keep=50)))
    recorder.resume(back, at_most=decisions[0]["step"] + cfg.cycle)  # after the commit
    assert arch.is_factored(back.params, "2")
    back.run()
    # the factors are row-major, like the checkpoint's copies: the same layouts after resume
    assert all(v.is_contiguous() for v in full.params.values())
    assert all(torch.equal(back.params[k], full.params[k]) for k in full.params)


def test_factorize_needs_a_factorable_layer():
    cfg = TrainConfig(**{**FAST, "model": "cnn", "modifiers": ["factorize"]})
    with pytest.raises(Exception, match="FactorableLinear"):
        Introspector(cfg)


def test_a_factorize_proposal_is_refused_with_the_state_unchanged_when_it_costs_too_much():
    # rank 1 of 20, no tolerance, nothing else changing: the guard loss rises, it is refused
    run = _at_cap(modifiers=["factorize"], factorize_rank=0.05, factorize_tolerance=0.0)
    for _ in range(180):
        run.base_step()
    before = run.state.clone()
    run.run_cycle()
    ds = [d for d in run.history["decisions"] if d["modifier"] == "factorize"]
    assert [d["decision"] for d in ds] == ["reject"]
    assert all(torch.equal(run.params[k], before.params[k]) for k in before.params)
    assert torch.equal(run.state.hparams["log_lr"], before.hparams["log_lr"])


def test_the_built_in_mlp_is_factorable_exactly_when_the_run_has_factorize():
    from selfmod.introspect.builtin import uses_factorable
    from selfmod.introspect.modifiers import registry

    named = TrainConfig(**{**FAST, "modifiers": ["lr", "factorize"]})
    assert uses_factorable(named)
    assert not uses_factorable(TrainConfig(**{**FAST, "modifiers": ["lr"]}))
    assert not uses_factorable(named.model_copy(update={"model": "cnn"}))
    # naming none: the registry's defaults decide
    assert uses_factorable(TrainConfig(**FAST)) == registry()["factorize"].default


def test_a_run_saved_before_factorize_was_a_default_resumes_without_it():
    from selfmod.runs.config import saved_config

    now = TrainConfig(**FAST).model_dump(mode="json")
    assert now["modifiers"] is None and saved_config(now).modifiers is None  # defaults, as saved
    # an older run: its config.json flat (before the modifier tables), without factorize's fields
    tables = now.pop("modifier_settings")
    flat = {k: v for name, t in tables.items() if name != "factorize" for k, v in t.items()}
    old = {**now, **flat}
    names = saved_config(old).modifiers
    assert "factorize" not in names and {"lr", "grow", "prune"} <= set(names)
    named = {**old, "modifiers": ["lr", "grow"]}  # a run that named its modifiers keeps them
    assert saved_config(named).modifiers == ["lr", "grow"]


def test_growth_by_the_criterion_reads_a_dense_factorable_layer_as_a_linear_one():
    from selfmod.introspect.modifiers.grow import Grow

    over = {"max_width": 64, "grow_threshold": 0.5, "grow_rule": "criterion"}
    proposals = []
    for modifiers in (["grow"], ["grow", "factorize"]):
        cfg = TrainConfig(**{**FAST, "modifiers": modifiers, **over})
        run = Introspector(cfg)
        run.run()  # 60 steps, below max_width: nothing factorized
        assert ("2.left" in run.params) == ("factorize" in modifiers)
        (proposal,), memory = Grow.from_config(cfg).propose(_context(run), {})
        proposals.append((proposal.surgery["add"], memory["fan_in.0"], memory["fan_in.1"]))
    (add, d0, d1), (add_f, d0_f, d1_f) = proposals
    assert add == add_f and any(add)  # the same GradMax decisions, not the fraction fallback
    assert torch.equal(d0, d0_f) and torch.equal(d1, d1_f)
