"""The seeds' meta-metrics, measured as defined: linear CKA against hand computations, the
self-induced shift of committed changes (zero for a no-op, positive for real changes), the
convergence rate against the static baseline, and all of them in summary.json and the report."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
import user_models

from selfmod.data import as_batches
from selfmod.introspect import Context, Loop, Modifier, Proposal
from selfmod.introspect.builtin import sources_of
from selfmod.introspect.loop import Source
from selfmod.introspect.probes import against_fixed, meta_metrics
from selfmod.introspect.problem import Problem
from selfmod.introspect.shift import linear_cka, representations
from selfmod.runs import fit
from selfmod.runs.api import make_config
from selfmod.runs.imports import build_problem
from selfmod.runs.report import META_MEANING


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


# ----------------------------------------------------------------------------- CKA


def test_linear_cka_by_hand():
    x = torch.tensor([[1.0], [2.0], [3.0]])
    y = torch.tensor([[1.0], [0.0], [2.0]])
    # one feature each: CKA is the squared correlation, (xc . yc)^2 / (|xc|^2 |yc|^2)
    # xc = (-1, 0, 1), yc = (0, -1, 1): 1^2 / (2 * 2)
    assert linear_cka(x, y) == pytest.approx(0.25, abs=1e-12)
    # two features: Xc = [[-1, 0], [0, 0], [1, 0]] (a zero column), Y = [xc, yc]:
    # ||Y^T Xc||^2 = 2^2 + 1^2 = 5, ||Xc^T Xc|| = 2, ||Y^T Y|| = ||[[2, 1], [1, 2]]|| = sqrt(10)
    two = torch.cat([x - 2, y - 1], dim=1)
    assert linear_cka(torch.cat([x, torch.zeros(3, 1)], 1), two) == pytest.approx(
        5 / (2 * math.sqrt(10)), abs=1e-12
    )
    orth = torch.tensor([[1.0], [-2.0], [1.0]])  # centred, orthogonal to xc
    assert linear_cka(x, orth) == pytest.approx(0.0, abs=1e-12)
    assert math.isnan(linear_cka(x, torch.ones(3, 2)))  # a constant representation


def test_linear_cka_is_one_on_itself_and_invariant_to_rotation_and_scale():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 6, generator=g, dtype=torch.float64)  # float64: exact to 1e-10
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(x, (x.double() @ q) * 7.5) == pytest.approx(1.0, abs=1e-10)
    assert linear_cka(x, x + 3.0) == pytest.approx(1.0, abs=1e-10)  # centring
    y = torch.randn(50, 4, generator=g, dtype=torch.float64)
    assert linear_cka(x, y) == pytest.approx(linear_cka(y, x), abs=1e-12)
    assert 0.0 < linear_cka(x, y) < 0.5  # unrelated features: far from 1
    # not invariant to an anisotropic scaling (CKA's linear kernel sees it)
    assert linear_cka(x, x * torch.tensor([10.0, 1, 1, 1, 1, 0.1])) < 0.99
    # many features, few examples: the Gram-matrix path gives the same value
    wide = torch.randn(5, 40, generator=g, dtype=torch.float64)
    wide2 = wide @ torch.randn(40, 30, generator=g, dtype=torch.float64)
    xc, yc = wide.double() - wide.double().mean(0), wide2.double() - wide2.double().mean(0)
    want = (yc.T @ xc).pow(2).sum() / ((xc.T @ xc).norm() * (yc.T @ yc).norm())
    assert linear_cka(wide, wide2) == pytest.approx(float(want), abs=1e-10)


@pytest.mark.parametrize("n, d", [(1500, 256), (40, 300)])  # feature and Gram paths
def test_linear_cka_of_float32_inputs_agrees_with_float64_to_1e_7(n, d):
    g = torch.Generator().manual_seed(1)
    x = torch.relu(torch.randn(n, d, generator=g)) + 2.0  # features with a mean, as ReLUs'
    y = x + 0.05 * torch.randn(n, d, generator=g)  # a small shift: 1 - CKA ~ 1e-3
    exact = linear_cka(x.double(), y.double())
    assert 1e-4 < 1 - exact < 1e-2
    assert linear_cka(x, y) == pytest.approx(exact, abs=1e-7)
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)


# ----------------------------------------------------------------------------- the shift


class Scale(Modifier):
    """Proposes every learning rate times ``factor`` (1: a no-op change)."""

    name = "scale"
    default = False

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def propose(self, ctx: Context, memory):
        h = ctx.state.hparams["log_lr"] + math.log(self.factor)
        return [Proposal(self.name, {"log_lr": h})], memory


def _digits_loop(factor: float) -> Loop:
    x, y, xt, yt = user_models.digits()
    cfg = make_config(
        {"steps": 60, "cycle": 20, "lookahead": 4, "lr": 0.02, "guard_size": 200,
         "replay_size": 200, "compare_fixed": False, "epsilon": 0.5}
    )  # fmt: skip
    source = Source(as_batches((x[200:], y[200:]), 0), x[:200], y[:200], xt, yt)
    problem = Problem(user_models.residual_mlp(), F.cross_entropy)
    return Loop(problem, [source], cfg, modifiers=[Scale(factor)])


def test_a_no_op_change_induces_no_shift_and_a_learning_rate_change_does():
    noop, real = _digits_loop(1.0), _digits_loop(1.5)
    for run in (noop, real):
        run.run()
    zero = noop.history["self_shift"]
    assert [d["decision"] for d in noop.history["decisions"]] == ["commit"] * 3
    assert len(zero) == 3 and all(abs(r["shift"]) < 1e-9 for r in zero), zero
    moved = real.history["self_shift"]
    assert moved and all(r["modifier"] == "scale" for r in moved)
    assert all(r["shift"] > 1e-4 for r in moved), moved
    mm = real.summary()["meta_metrics"]
    assert mm["commits_measured"] == len(moved)
    assert mm["self_induced_shift_total"] == pytest.approx(sum(r["shift"] for r in moved))
    assert mm["self_induced_shift_by_modifier"] == {"scale": mm["self_induced_shift_total"]}
    assert noop.summary()["meta_metrics"]["self_induced_shift_mean"] == pytest.approx(0, abs=1e-9)


def test_growth_commits_shift_the_representations():
    cfg = make_config(
        {"steps": 100, "cycle": 50, "lookahead": 5, "width": 8, "compare_fixed": False,
         "guard_size": 200, "replay_size": 200, "modifiers": ["grow"]}
    )  # fmt: skip
    problem, splits = build_problem(cfg)
    run = Loop(problem, sources_of(splits, cfg.seed), cfg)
    # the representation is the input of the read-out layer: its width grows with the model
    rep = representations(problem, run.params, run.state.buffers, run.buffer.x)
    assert rep.shape == (len(run.buffer.x), 8)
    run.run()
    grown = [r for r in run.history["self_shift"] if r["modifier"] == "grow"]
    assert grown and run.widths() != [8, 8]
    assert all(r["shift"] > 1e-3 for r in grown), grown
    by = run.summary()["meta_metrics"]["self_induced_shift_by_modifier"]
    assert by["grow"] == pytest.approx(sum(r["shift"] for r in grown))


# ----------------------------------------------------------------------------- definitions


def _log(values, every=50):
    return [{"step": every * (i + 1), "guard_loss": v} for i, v in enumerate(values)]


def test_meta_convergence_rate_against_the_fixed_baseline():
    fixed = _log([2.0, 1.5, 1.2, 1.0])  # final guard loss 1.0, first reached at step 200
    out = against_fixed(_log([1.8, 1.0, 0.9, 0.8]), fixed)
    assert out == {
        "meta_convergence_rate": 2.0,
        "steps_to_fixed_final": 100,
        "fixed_steps_to_final": 200,
    }
    slower = against_fixed(_log([1.9, 1.6, 1.3, 1.1]), fixed)  # never reaches 1.0
    assert slower["meta_convergence_rate"] == 0.0 and slower["steps_to_fixed_final"] is None
    # a fixed run that dipped below its final value reached it earlier
    assert against_fixed(_log([1.0]), _log([2.0, 0.9, 1.0]))["fixed_steps_to_final"] == 100
    assert against_fixed(_log([1.0]), None)["meta_convergence_rate"] is None


def test_gap_and_undefined_meta_metrics():
    probes = [
        {"guard_loss": 2.0 - 0.1 * i, "guard_acc": 0.1 * i, "test_acc": math.nan, "gap": 0.1 * i}
        for i in range(5)
    ]
    mm = meta_metrics(probes, None, [], 0.7)
    assert mm["gap_final"] == 0.7 and mm["gap_mean"] == pytest.approx(0.2)
    assert mm["adaptation_cycles"] is None and mm["internal_vs_external_acc_gap"] is None
    assert mm["self_induced_shift_mean"] is None and mm["commits_measured"] == 0
    json.dumps(mm, allow_nan=False)  # JSON-safe: no NaN or inf


# ----------------------------------------------------------------------------- the run's files


def test_summary_json_and_the_report_hold_every_meta_metric(tmp_path):
    x, y, xt, yt = user_models.digits()
    config = {"steps": 100, "cycle": 50, "lookahead": 4, "lr": 0.02, "guard_size": 200,
              "replay_size": 200, "compare_fixed": True, "modifiers": None}  # fmt: skip
    result = fit(
        user_models.residual_mlp(), F.cross_entropy, (x[200:], y[200:]), (x[:200], y[:200]),
        test=(xt, yt), config=config, run_dir=tmp_path / "run",
    )  # fmt: skip
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    mm = summary["meta_metrics"]
    assert set(META_MEANING) == set(mm)
    assert mm == result.summary["meta_metrics"]
    assert mm["fixed_steps_to_final"] is not None and mm["meta_convergence_rate"] is not None
    assert mm["gap_final"] is not None and mm["commits_measured"] >= 1
    assert "meta_metrics" not in summary["fixed"]
    page = (tmp_path / "run" / "report.html").read_text()
    for key, meaning in META_MEANING.items():
        assert key.replace("_", " ") in page
        assert meaning.split(":")[0].replace(">", "&gt;").replace("'", "&#x27;") in page
