"""A model with integer inputs (token ids through an ``nn.Embedding``) under the loop: every
cycle's probes, the cost model and the summary work on its real examples."""

import torch
import torch.nn.functional as F
from torch import nn

from selfmod.data import as_batches
from selfmod.introspect import Loop, Problem, Source
from selfmod.runs.api import make_config


class _Bag(nn.Module):
    """``tokens (B, T) -> Embedding -> mean over T -> Linear``: a bag-of-tokens classifier."""

    def __init__(self, vocab: int = 16, dim: int = 8, classes: int = 2) -> None:
        super().__init__()
        self.embed, self.out = nn.Embedding(vocab, dim), nn.Linear(dim, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.out(self.embed(tokens).mean(1))  # (B, classes)


def test_a_token_model_runs_its_cycles_and_is_costed():
    torch.manual_seed(0)
    x = torch.randint(0, 16, (600, 5))
    y = (x < 8).sum(1).gt(2).long()  # more low tokens than high ones
    source = Source(as_batches((x[200:], y[200:]), 0), x[:100], y[:100], x[100:200], y[100:200])
    cfg = make_config({"steps": 60, "cycle": 20, "lookahead": 5, "lr": 0.1,
                       "guard_size": 100, "compare_fixed": False}, optimizer="adamw")  # fmt: skip
    run = Loop(Problem(_Bag(), F.cross_entropy), [source], cfg)
    run.run()
    assert len(run.history["probes"]) == 3
    s = run.summary()
    assert s["params"] == 16 * 8 + 8 * 2 + 2 and s["flops"] == 2 * 8 * 2 + 2
    assert s["test_metric"] > 0.5


def test_the_exported_model_is_in_eval_mode_and_predicts_as_the_run():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.5), nn.ReLU(), nn.Linear(8, 2))
    problem = Problem(model, F.cross_entropy)
    params, buffers = problem.init()
    exported = problem.export(params, buffers)
    x = torch.randn(16, 3)
    assert not exported.training  # dropout off: the same output twice, equal to the run's
    torch.testing.assert_close(exported(x), problem.predict(params, buffers, x))
    torch.testing.assert_close(exported(x), exported(x))


def _self_modify(model: nn.Module, modifiers) -> object:
    from selfmod.runs import SelfModifier

    torch.manual_seed(0)
    x = torch.randn(400, 4)
    y = (x[:, 0] > 0).long()
    config = {"cycle": 20, "lookahead": 5, "lr": 0.05, "modifiers": modifiers}
    sm = SelfModifier(model, F.cross_entropy, (x[:100], y[:100]), optimizer="adamw", config=config)
    for i in range(100, 400, 16):
        sm.step((x[i : i + 16], y[i : i + 16]))
    sm.finish()
    torch.testing.assert_close(model(x[:100]), sm.module()(x[:100]))  # the trained model
    return sm


def test_self_modifier_trains_the_model_it_was_given_in_place():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    first = model[0].weight
    before = first.detach().clone()
    _self_modify(model, ["lr", "weight_decay"])
    assert model[0].weight is first  # the same Parameter: an optimizer holding it still works
    assert not torch.equal(first.detach(), before)  # ... now trained
    grown = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    sm = _self_modify(grown, ["lr", "grow"])
    assert (
        grown[0].out_features
        == grown[0].weight.shape[0]
        == sm.run.problem.widths(sm.run.params)[0]
        > 8
    )


def test_evaluation_chunks_follow_the_output_width():
    """``Problem.predict`` sizes its chunks by the first chunk's output: a model with wide
    per-example outputs (a token model's logits) runs short chunks, a narrow one few; the
    outputs equal one forward over every example."""
    from selfmod.introspect.problem import EVAL_FIRST, EVAL_OUTPUT

    class Counted(nn.Module):
        def __init__(self, width: int) -> None:
            super().__init__()
            self.emb, self.calls = nn.Embedding(16, width), []

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls.append(len(x))
            return self.emb(x)  # (B, T, width)

    x = torch.randint(0, 16, (3000, 8))
    for width, most in ((2048, EVAL_OUTPUT // (8 * 2048)), (2, len(x) - EVAL_FIRST)):
        model = Counted(width)
        problem = Problem(model, lambda out, y: out.mean())
        params, buffers = problem.init()
        out = problem.predict(params, buffers, x)
        with torch.no_grad():
            torch.testing.assert_close(out, model.emb(x), rtol=0, atol=0)
        assert model.calls[0] == EVAL_FIRST and max(model.calls[1:]) == most
        assert sum(model.calls) == len(x)


def test_a_structured_output_is_evaluated_in_one_pass():
    """A model returning a tuple cannot be joined across chunks: ``predict`` returns the one
    forward's output over every example."""

    class Pair(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self.lin(x), x.sum(-1)

    x = torch.randn(300, 3)
    problem = Problem(Pair(), lambda out, y: F.cross_entropy(out[0], y))
    params, buffers = problem.init()
    logits, total = problem.predict(params, buffers, x)
    assert logits.shape == (300, 2) and torch.equal(total, x.sum(-1))
