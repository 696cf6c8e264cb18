"""The composed run (issue 15): growth by GradMax and its criterion, pruning by L0 gates under
the budget controller, and verification on guard data that no proposal saw. Each modifier's
proposal is checked against a hand computation; surgery keeps the function."""

from __future__ import annotations

import contextlib
import math
from dataclasses import replace

import cycles
import pytest
import torch
import torch.nn.functional as F
from test_introspect import FAST  # the small, fast run the loop's tests share

from selfmod import arch
from selfmod.introspect import Introspector
from selfmod.introspect.config import TrainConfig
from selfmod.introspect.modifiers import Context
from selfmod.introspect.modifiers.grow import Grow
from selfmod.introspect.modifiers.prune import BUDGET_KP, BUDGET_LR, Prune


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _context(run: Introspector) -> Context:
    """The context of the run's next cycle, as the loop builds it (lookahead batches drawn)."""
    look = run.look_ahead()
    return Context(
        run.state, run.problem, run.cycle, run.probe(), {}, look.batches, run.config,
        lambda k: look.batch_grads(run.state, k), run.rng,
    )  # fmt: skip


def _eval_out(run: Introspector, state, x):
    return run.problem.predict(state.params, state.buffers, x)


# ----------------------------------------------------------------------------- growth


def test_growth_criterion_proposal_matches_a_hand_computation_and_keeps_the_function():
    cfg = TrainConfig(
        **{**FAST, "modifiers": ["grow"], "max_width": 64, "grow_threshold": 0.5,
           "grow_rule": "criterion"}
    )  # fmt: skip
    run = Introspector(cfg)
    run.run()  # 60 steps of training: the criterion has something to measure
    ctx = _context(run)
    grow = Grow.from_config(cfg)
    (proposal,), memory = grow.propose(ctx, {})
    # by hand: inputs of each hidden Linear and the loss gradient at the next Linear's output
    x = torch.cat([b[0] for b in ctx.pending])
    y = torch.cat([b[1] for b in ctx.pending])
    p = {k: v.detach().clone().requires_grad_(True) for k, v in run.params.items()}
    h0 = x
    a1 = torch.relu(h0 @ p["0.weight"].T + p["0.bias"])
    o2 = a1 @ p["2.weight"].T + p["2.bias"]
    o2.retain_grad()
    a2 = torch.relu(o2)
    o4 = a2 @ p["4.weight"].T + p["4.bias"]
    o4.retain_grad()
    F.cross_entropy(o4, y).backward()
    expected = []
    for prod, cons, h_in, delta in (("0", "2", h0, o2.grad), ("2", "4", a1, o4.grad)):
        m = delta.T @ h_in  # (n_out, n_in)
        sigma = torch.linalg.svdvals(m)
        g = p[f"{cons}.weight"].grad.norm(dim=0)  # fan-out gradient per unit
        ref = (g / p[f"{prod}.weight"].norm(dim=1)).mean()
        width = p[f"{prod}.weight"].shape[0]
        room = min(math.ceil(grow.settings.grow_fraction * width), grow.settings.max_width - width)
        expected.append(min(int((sigma > grow.settings.grow_threshold * ref).sum()), room))
    assert proposal.surgery["add"] == expected and any(expected), (proposal.surgery, expected)
    # the new fan-in rows are the top right singular vectors of M (up to sign)
    m0 = o2.grad.T @ h0
    _, _, vh = torch.linalg.svd(m0, full_matrices=False)
    k0 = expected[0]
    if k0:
        got = memory["fan_in.0"]
        torch.testing.assert_close(got.abs(), vh[:k0].abs(), atol=1e-5, rtol=1e-4)
    # applying it keeps the eval function to 1e-6 and re-indexes the optimizer state
    state = run.state.clone()
    state = type(state)(**{**state.__dict__, "memory": {"grow": memory}})
    grown = grow.apply(proposal, state, run.problem)
    gx, _ = run.guard()
    torch.testing.assert_close(
        _eval_out(run, grown, gx), _eval_out(run, run.state, gx), atol=1e-6, rtol=0
    )
    assert run.problem.widths(grown.params) == [
        w + k for w, k in zip(run.widths(), expected, strict=True)
    ]


def test_growth_stops_when_no_direction_beats_the_existing_units_not_at_a_cap():
    over = {**FAST, "modifiers": ["grow"], "steps": 100, "max_width": 4096}
    picky = Introspector(TrainConfig(**over, grow_threshold=100.0, grow_rule="criterion"))
    picky.run()
    assert not [d for d in picky.history["decisions"] if d["modifier"] == "grow"]
    assert picky.widths() == [8, 8]  # room for 4,088 more units, none worth adding
    fraction = Introspector(TrainConfig(**over, grow_threshold=100.0, grow_rule="fraction"))
    fraction.run()
    assert fraction.widths() == [62, 62]  # the fraction rule: 8 -> 12 -> 18 -> 27 -> 41 -> 62


@pytest.mark.parametrize("strict", [False, True])
def test_strict_growth_needs_a_lower_held_out_loss_where_plain_growth_has_a_tolerance(strict):
    cfg = TrainConfig(**{**FAST, "modifiers": ["grow"], "steps": 1, "grow_strict": strict})
    run = Introspector(cfg)
    run.run()
    ctx = _context(run)
    (proposal,), _ = Grow.from_config(cfg).propose(ctx, {})
    assert proposal.strict is strict
    widths = run.widths()
    grown = cycles.apply(run, proposal)
    _, value = cycles.check(run, grown, math.inf, 0.0)  # the grown net's held-out loss
    # the current loss 0.5% below it: inside epsilon (1%), but not lower
    run.verify_and_decide(proposal, value / 1.005)
    decision = run.history["decisions"][-1]
    assert decision["decision"] == ("reject" if strict else "commit"), decision["reason"]
    assert run.widths() == (widths if strict else [math.ceil(1.5 * w) for w in widths])


def _mlp_params(w1: int, w2: int) -> int:
    """Parameters of the built-in MLP 40-w1-w2-10 on MNIST-1D, by hand."""
    return 40 * w1 + w1 + w1 * w2 + w2 + w2 * 10 + 10


@pytest.mark.parametrize("margin", [0.5, 2.0])
def test_priced_growth_must_lower_the_held_out_loss_by_its_price(margin):
    price = 0.1
    cfg = TrainConfig(**{**FAST, "modifiers": ["grow"], "steps": 1, "grow_price": price})
    run = Introspector(cfg)
    run.run()
    ctx = _context(run)
    (proposal,), _ = Grow.from_config(cfg).propose(ctx, {})
    (w1, w2) = widths = run.widths()
    grown_widths = [math.ceil(1.5 * w) for w in widths]
    n, n_new = _mlp_params(w1, w2), _mlp_params(*grown_widths)
    assert proposal.gain == pytest.approx(price * (n_new - n) / n, rel=1e-12)
    grown = cycles.apply(run, proposal)
    _, value = cycles.check(run, grown, math.inf, 0.0)
    # the grown net's loss is below the current one by margin x the price
    run.verify_and_decide(proposal, value / (1 - margin * proposal.gain))
    decision = run.history["decisions"][-1]
    if margin > 1:
        assert decision["decision"] == "commit", decision["reason"]
        assert run.widths() == grown_widths
    else:
        assert decision["decision"] == "reject" and "below" in decision["reason"]
        assert run.widths() == widths


# ----------------------------------------------------------------------------- pruning


def _gated_run(**over) -> Introspector:
    cfg = TrainConfig(**{**FAST, "modifiers": ["prune"], "prune_rule": "l0", **over})
    run = Introspector(cfg)
    assert run.problem.gate_sites == ["gate0", "gate1"]
    return run


def test_l0_pruning_removes_exactly_the_closed_gates_and_keeps_the_function():
    run = _gated_run()
    # close three gates of layer 0 and one of layer 1 by hand
    h = dict(run.state.params)
    la0, la1 = h["gate0.log_alpha"].clone(), h["gate1.log_alpha"].clone()
    la0[[1, 4, 6]] = -10.0
    la1[[2]] = -10.0
    h["gate0.log_alpha"], h["gate1.log_alpha"] = la0, la1
    run.state = type(run.state)(**{**run.state.__dict__, "params": h})
    assert int((arch.hard_concrete_eval(la0) == 0).sum()) == 3
    prune = Prune(run.config.settings_of("prune").model_copy(update={"prune_fraction": 0.5}))
    (proposal,), _ = prune.propose(_context(run), {})
    assert proposal.surgery["remove"] == [[1, 4, 6], [2]]
    pruned = prune.apply(proposal, run.state, run.problem)
    assert run.problem.widths(pruned.params) == [5, 7]
    gx, _ = run.guard()
    torch.testing.assert_close(
        _eval_out(run, pruned, gx), _eval_out(run, run.state, gx), atol=1e-6, rtol=0
    )
    # at most prune_fraction of a layer per cycle
    capped = Prune(run.config.settings_of("prune").model_copy(update={"prune_fraction": 0.25}))
    (p2,), _ = capped.propose(_context(run), {})
    assert p2.surgery["remove"] == [[1, 4], [2]]  # int(0.25 * 8) = 2 per layer


def test_the_l0_penalty_is_in_the_training_loss_and_closes_gates():
    run = _gated_run(l0_strength=0.0)
    loss = run.losses.train(run.state.buffers)
    batch = run.feed.next_batch(run.state.batch_size, 0)
    h = dict(run.hparams)
    with torch.random.fork_rng():
        base = loss(run.params, h, batch)
    h["l0_lambda"] = torch.tensor(0.5)
    with torch.random.fork_rng():
        pen = loss(run.params, h, batch)
    n = sum(v.numel() for v in run.params.values())
    expected = 0.5 * run.problem.expected_gated_params(run.params) / n
    torch.testing.assert_close(pen - base, expected, atol=1e-6, rtol=1e-5)
    # a strong penalty trains gates shut and the prune modifier removes their units
    strong = _gated_run(l0_strength=5.0, lr=0.3, steps=200, prune_fraction=0.5)
    strong.run()
    removed = [d for d in strong.history["decisions"] if d["modifier"] == "prune"]
    assert any(d["decision"] == "commit" for d in removed), removed
    assert sum(strong.widths()) < 16


def test_the_budget_controller_raises_lambda_while_over_max_params():
    run = _gated_run(max_params=300)  # the 8-wide MLP has 490 + 16 gate parameters
    prune = Prune.from_config(run.config)
    ctx = _context(run)
    (proposal,), memory = prune.propose(ctx, {})
    params = run.params
    dense = sum(v.numel() for v in params.values())
    gated = sum(sum(params[s.key].numel() for s in g.slots()) for g in run.problem.groups)
    cost = dense - gated + float(run.problem.expected_gated_params(params))
    v = cost / 300 - 1
    assert v > 0
    mu = BUDGET_LR * v + BUDGET_KP * v  # one PI step from 0
    assert float(memory["multiplier"]) == pytest.approx(mu, rel=1e-6)
    lam = float(proposal.hparams["l0_lambda"])
    assert lam == pytest.approx(run.config.settings_of("prune").l0_strength + mu, rel=1e-6)
    # under budget: no multiplier, no proposal
    free = _gated_run(max_params=10**6)
    assert Prune.from_config(free.config).propose(_context(free), {})[0] == []


def _at_ceiling(steps: int = 0, **over) -> Introspector:
    """A run with the lowest rule whose layers are at max_width (20), after 20 base steps
    without a cycle (``steps``: then run to there, cycling)."""
    cfg = TrainConfig(
        **{**FAST, "modifiers": ["grow", "prune"], "width": 20, "max_width": 20,
           "steps": steps or 20, "prune_rule": "lowest", "prune_fraction": 0.25, **over}
    )  # fmt: skip
    run = Introspector(cfg)
    if steps:
        run.run()
    else:
        for _ in range(20):
            run.base_step()
    return run


def test_lowest_pruning_removes_the_least_salient_units_at_the_ceiling_strictly():
    run = _at_ceiling()
    prune = Prune.from_config(run.config)
    (proposal,), memory = prune.propose(_context(run), {})
    assert proposal.strict  # it must lower the verifying guard loss, no epsilon
    p = run.params
    expected = []
    for w_in, w_out in (("0.weight", "2.weight"), ("2.weight", "4.weight")):
        sal = p[w_in].norm(dim=1) * p[w_out].norm(dim=0)  # ||fan-in_j|| ||fan-out_j||, (20,)
        expected.append(sorted(torch.argsort(sal)[:5].tolist()))  # int(0.25 * 20) = 5
    assert proposal.surgery["remove"] == expected
    assert memory["tried"].tolist() == [20, 20]
    pruned = prune.apply(proposal, run.state, run.problem)
    assert run.problem.widths(pruned.params) == [15, 15]
    # the committed prune is the layers' new ceiling: growth does not add the units back
    assert pruned.memory["prune"]["ceiling"].tolist() == [15, 15]
    grow = Grow.from_config(run.config)
    run.state = pruned
    assert grow.propose(_context(run), {}) == ([], {})
    # below max_width without a ceiling, growth has room again and pruning waits
    unbounded = replace(pruned, memory={})
    run.state = unbounded
    assert Prune.from_config(run.config).propose(_context(run), {})[0] == []
    (grown,), _ = grow.propose(_context(run), {})
    assert grown.surgery["add"] == [5, 5]


def test_a_prune_that_did_not_commit_settles_the_layer():
    run = _at_ceiling()
    prune = Prune.from_config(run.config)
    (_proposal,), memory = prune.propose(_context(run), {})
    # the proposal was rejected: the widths are those it was proposed at
    again, memory = prune.propose(_context(run), memory)
    assert again == [] and memory["settled"].tolist() == [True, True]
    assert prune.propose(_context(run), memory)[0] == []  # and it stays settled
    # one layer settled, the other pruned: only the pruned one is proposed again
    memory = {"tried": torch.tensor([20, 0]), "settled": torch.zeros(2, dtype=torch.bool)}
    (p2,), memory = prune.propose(_context(run), memory)
    assert p2.surgery["remove"][0] == [] and len(p2.surgery["remove"][1]) == 5
    assert memory["settled"].tolist() == [True, False]


def test_without_growth_lowest_pruning_proposes_at_any_width():
    run = _at_ceiling(modifiers=["prune"], width=12, max_width=256)
    (proposal,), _ = Prune.from_config(run.config).propose(_context(run), {})
    assert [len(r) for r in proposal.surgery["remove"]] == [3, 3]  # int(0.25 * 12)


def test_a_run_with_lowest_pruning_never_regrows_a_pruned_layer_nor_retries_a_settled_one():
    run = _at_ceiling(width=8, max_width=16, steps=400, prune_fraction=0.2)
    seen_reject, ceiling = False, None
    prunes = [d for d in run.history["decisions"] if d["modifier"] == "prune"]
    assert prunes  # the layers reached 16 and pruning was tried
    for d in run.history["decisions"]:
        if d["modifier"] == "prune":
            assert not seen_reject, "a prune proposed after one was rejected"
            seen_reject = d["decision"] == "reject"
            if d["decision"] == "commit":
                ceiling = d["after"]["widths"]
        if d["modifier"] == "grow" and ceiling is not None and d["decision"] == "commit":
            assert all(a <= c for a, c in zip(d["after"]["widths"], ceiling, strict=True))
    if ceiling is not None:
        assert all(w <= c for w, c in zip(run.widths(), ceiling, strict=True))


# ----------------------------------------------------------------------------- verification


class _Watch(Introspector):
    """Records the guard rows the estimate and the verifier evaluate on."""

    phase = "other"

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.seen: dict[str, set] = {"propose": set(), "verify": set()}

        self.losses = _WatchedLosses(self.losses, self)

    @contextlib.contextmanager
    def _in(self, phase: str):
        self.phase = phase
        try:
            yield
        finally:
            self.phase = "other"

    def look_ahead(self):
        look = super().look_ahead()
        estimate, baseline = look.estimate, look.baseline

        def in_propose(*args):
            with self._in("propose"):
                return estimate(*args)

        def in_verify(*args):
            with self._in("verify"):
                return baseline(*args)

        look.estimate, look.baseline = in_propose, in_verify
        return look

    def verify_and_decide(self, proposal, current):
        with self._in("verify"):
            return super().verify_and_decide(proposal, current)


class _WatchedLosses:
    """The run's losses; the guard loss records the rows it sees in the run's phase."""

    def __init__(self, losses, run) -> None:
        self.losses, self.run = losses, run
        self.problem, self.use_dropout = losses.problem, losses.use_dropout

    def train(self, *args, **kwargs):
        return self.losses.train(*args, **kwargs)

    def guard(self, params, hparams, batch, buffers):
        if self.run.phase in self.run.seen:
            self.run.seen[self.run.phase].update(map(tuple, batch[0].detach().tolist()))
        return self.losses.guard(params, hparams, batch, buffers)


@pytest.mark.parametrize("verify_on", ["held_out", "shared"])
def test_the_verifier_never_sees_the_data_that_proposed(verify_on):
    cfg = TrainConfig(**{**FAST, "modifiers": ["lr", "grow"], "verify_on": verify_on})
    run = _Watch(cfg)
    run.run()
    propose, verify = run.seen["propose"], run.seen["verify"]
    assert propose and verify
    if verify_on == "held_out":
        assert not propose & verify
        px, _ = run.guard("propose")
        vx, _ = run.guard("verify")
        assert len(px) + len(vx) == len(run.guard("all")[0]) and abs(len(px) - len(vx)) <= 1
    else:
        assert propose == verify  # one guard set does both: the test can tell them apart


def test_the_verifiers_reference_is_the_verify_half_after_the_lookahead():
    cfg = TrainConfig(**{**FAST, "modifiers": ["lr"], "steps": 21})
    run = Introspector(cfg)
    run.run()
    look = run.look_ahead()
    current = look.baseline(run.state)
    px, py = run.guard("propose")
    vx, vy = run.guard("verify")
    # the verifier's reference is the verify half's loss after the lookahead
    p_cur, _ = look.replay(run.state)
    with torch.no_grad():
        ref = float(run.losses.guard(p_cur, run.hparams, (vx, vy), run.state.buffers))
        other = float(run.losses.guard(p_cur, run.hparams, (px, py), run.state.buffers))
    assert current == ref != other


# ----------------------------------------------------------------------------- long horizon


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_the_horizon_term_completes_the_lookahead_to_the_full_reverse_unroll(momentum):
    """For a training loss linear in the params (no Hessian term) the first-order tangent is
    exact: lookahead meta-gradient + horizon term = the full reverse unroll of every step."""
    from selfmod import hypergrad, optim

    torch.manual_seed(0)
    names = ["a", "b"]
    params = {"a": torch.randn(3, 2, dtype=torch.float64), "b": torch.randn(4, dtype=torch.float64)}
    c = {n: torch.randn_like(v) for n, v in params.items()}  # training loss sum c . theta
    d = {n: torch.randn_like(v) for n, v in params.items()}  # guard loss sum d . theta^2
    h = {"log_lr": torch.tensor([-2.0, -3.0], dtype=torch.float64)}

    def lr(hp):
        return {n: hp["log_lr"][i].exp() for i, n in enumerate(names)}

    opt = optim.chain(optim.sgd(lr=lr, momentum=momentum), optim.sum_updates(1.0))

    def inner(p, hp, batch):
        return sum((c[n] * p[n]).sum() for n in names) * batch

    def outer(p, hp, batch):
        return sum((d[n] * p[n] ** 2).sum() for n in names)

    n_past, k = 7, 4
    batches = [torch.tensor(1.0 + 0.1 * i, dtype=torch.float64) for i in range(n_past + k)]
    full = hypergrad.reverse(inner, outer, opt, params, h, batches, None)
    p_mid, s_mid = hypergrad.run(
        inner, opt, params, opt.init(params), h, batches[:n_past], create_graph=False
    )
    look = hypergrad.reverse(inner, outer, opt, p_mid, h, batches[n_past:], None, state=s_mid)
    z = s_mid[-1].total
    tail = torch.stack([(look.params[n] * z[n]).sum() for n in names])
    torch.testing.assert_close(look.hparams["log_lr"] + tail, full.hparams["log_lr"])
    assert not torch.allclose(look.hparams["log_lr"], full.hparams["log_lr"])  # the tail matters


def test_meta_horizon_moves_the_learning_rates_by_the_horizon_term(monkeypatch):
    from selfmod.introspect import lookahead

    cfg = TrainConfig(**{**FAST, "modifiers": ["lr"], "steps": 41, "meta_horizon": 50})
    run = Introspector(cfg)
    seen = []
    horizon = lookahead.horizon_term

    def spy(dparams, opt_state, params):
        out = horizon(dparams, opt_state, params)
        seen.append(out)
        return out

    monkeypatch.setattr(lookahead, "horizon_term", spy)
    run.run()
    assert len(seen) == 3 and float(seen[0].abs().sum()) == 0.0  # nothing trained before cycle 0
    assert float(seen[1].abs().sum()) > 0
    with pytest.raises(ValueError, match="meta_horizon needs estimator"):
        TrainConfig(**{**FAST, "meta_horizon": 50, "estimator": "forward"})


# ----------------------------------------------------------------------------- budgets


@pytest.mark.parametrize(
    "budget",
    [{"params": 600}, {"flops": 1200}, {"memory": 2500}],
)
def test_a_change_over_budget_is_refused_with_the_state_bitwise_unchanged(budget):
    from selfmod.introspect.modifiers import Proposal
    from selfmod.introspect.state import flatten

    cfg = TrainConfig(**{**FAST, "modifiers": ["grow"], "steps": 1, "budget": budget})
    run = Introspector(cfg)
    run.run()
    look = run.look_ahead()  # the lookahead batches a cycle would verify on
    before_t, before_s = flatten(run.state, "state")
    grow = Proposal("grow", surgery={"add": [4, 4], "seed": 0, "cycle": run.cycle})
    current = look.baseline(run.state)
    run.verify_and_decide(grow, current)
    decision = run.history["decisions"][-1]
    name = {"params": "parameter", "flops": "FLOPs", "memory": "memory"}[next(iter(budget))]
    assert decision["decision"] == "reject" and decision["reason"].startswith(f"{name} budget")
    after_t, after_s = flatten(run.state, "state")
    assert before_s == after_s and before_t.keys() == after_t.keys()
    assert all(torch.equal(before_t[k], after_t[k]) for k in before_t)


# ----------------------------------------------------------------------------- replays


def test_a_state_is_replayed_once_per_cycle_and_the_current_one_is_kept(monkeypatch):
    from selfmod import hypergrad
    from selfmod.introspect import lookahead

    run = Introspector(TrainConfig(**{**FAST, "steps": 1}))
    run.run()
    look = run.look_ahead()
    calls = []
    real = hypergrad.run

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(lookahead.hypergrad, "run", counted)
    first = look.replay(run.state)
    again = look.replay(run.state)
    assert len(calls) == 1 and again is first
    others = [run.state.clone() for _ in range(lookahead.REPLAYS_KEPT + 1)]
    for other in others:  # equal states, but other objects: replayed, and bitwise the same
        params, _ = look.replay(other)
        assert all(torch.equal(params[k], first[0][k]) for k in params)
    assert len(calls) == 1 + len(others)
    assert look.replay(run.state) is first and len(calls) == 1 + len(others)  # kept
    look.replay(others[0])  # evicted by the later ones: replayed again
    assert len(calls) == 2 + len(others)
    look.replay(run.state, hypergrad.FiniteMonitor(start=run.step))  # a monitor sees every loss
    assert len(calls) == 3 + len(others)
    run.look_ahead().replay(run.state)  # the next cycle's batches
    assert len(calls) == 4 + len(others)


def _composition_bench():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "composition.py"
    spec = importlib.util.spec_from_file_location("composition_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_composition_report_keeps_its_hand_written_notes_and_adds_new_commands(tmp_path):
    bench = _composition_bench()
    md = tmp_path / "composition.md"
    assert bench.preamble(md, "python c.py --a").endswith("\n\n    python c.py --a\n\n")
    notes = "# Title\n\nNotes by hand.\n\n    python c.py --a\n\n"
    md.write_text(notes + "| workload | x |\n|---|\n")
    assert bench.preamble(md, "python c.py --a") == notes
    head = bench.preamble(md, "python c.py --b")
    assert head.startswith("# Title\n\nNotes by hand.") and head.count("python c.py --b") == 1
    # a variant's settings reach the run's configuration alongside the pieces'
    s = bench.settings("verify_on+prune_lowest")
    assert s["verify_on"] == "held_out" and s["prune_rule"] == "lowest"
    assert bench.settings("prune_rule")["prune_rule"] == "l0"


def test_a_run_with_lowest_pruning_resumes_bitwise_with_its_ceilings_and_settled_layers(
    tmp_path,
):
    from selfmod.runs.recorder import RunRecorder

    over = {"width": 8, "max_width": 16, "prune_fraction": 0.2}
    full = _at_ceiling(steps=400, **over)
    memory = full.state.memory["prune"]
    assert set(memory) >= {"tried", "settled"}  # pruning was tried, its memory is checkpointed
    cfg = full.config
    first = Introspector(cfg, recorder=RunRecorder(tmp_path, keep=50))
    first.run()
    back = Introspector(cfg, recorder=(recorder := RunRecorder(tmp_path, keep=50)))
    recorder.resume(back, at_most=120)  # after growth reached 16 and pruning was proposed
    assert back.step == 120
    back.run()
    assert all(torch.equal(back.params[k], full.params[k]) for k in full.params)
    for k, v in memory.items():
        assert torch.equal(back.state.memory["prune"][k], v), k
