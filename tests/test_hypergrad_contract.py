"""The estimator contract: every estimator takes the seven arguments of ``MetaProblem`` (in order,
by position or name) and keyword-only options, declared once; ``@estimator`` gives a new one
that signature."""

import inspect

import pytest
import torch

from selfmod import hypergrad, optim
from selfmod.hypergrad.contract import MetaProblem, estimator


def _args():
    torch.manual_seed(0)
    params = {"w": torch.randn(3, dtype=torch.float64)}
    hparams = {"log_lr": torch.tensor(-1.0, dtype=torch.float64)}

    def loss(p, h, batch):
        return ((p["w"] - batch) ** 2).sum()

    batches = [torch.randn(3, dtype=torch.float64) for _ in range(3)]
    opt = optim.sgd(lambda h: h["log_lr"].exp())
    return (loss, loss, opt, params, hparams, batches, torch.zeros(3, dtype=torch.float64))


@pytest.mark.parametrize("name", sorted(hypergrad.ESTIMATORS))
def test_every_estimator_has_the_shared_arguments_then_keyword_only_options(name):
    params = list(inspect.signature(hypergrad.ESTIMATORS[name]).parameters.values())
    shared, options = params[: len(MetaProblem._fields)], params[len(MetaProblem._fields) :]
    assert [p.name for p in shared] == list(MetaProblem._fields)
    assert all(p.kind is p.POSITIONAL_OR_KEYWORD and p.default is p.empty for p in shared)
    assert "state" in [p.name for p in options]
    assert all(p.kind is p.KEYWORD_ONLY for p in options)
    assert hypergrad.ESTIMATORS[name].__name__ == name


def test_a_new_estimator_gets_the_signature_and_positional_and_keyword_calls_agree():
    @estimator
    def doubled(problem: MetaProblem, *, factor: float = 2.0, state=None):
        """Twice the reverse-mode hypergradient."""
        res = hypergrad.reverse(*problem, state=state)
        return res.hparams["log_lr"] * factor

    args = _args()
    by_name = dict(zip(MetaProblem._fields, args, strict=True))
    assert torch.equal(doubled(*args), doubled(**by_name))
    assert torch.equal(doubled(*args, factor=3.0), 1.5 * doubled(*args))
    assert doubled.__doc__ == "Twice the reverse-mode hypergradient."
    assert list(inspect.signature(doubled).parameters)[-2:] == ["factor", "state"]
    with pytest.raises(TypeError, match="window"):
        doubled(*args, window=2)  # an option it does not have
    with pytest.raises(TypeError, match="outer_batch"):
        doubled(*args[:-1])


def test_options_must_be_keyword_only():
    with pytest.raises(TypeError, match="keyword-only"):

        @estimator
        def bad(problem, window):  # window could be given by position
            return None
