"""Module and parameter names with TeX, a backslash or quotes (issue 36): the report draws
them as text and a run with them resumes."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from selfmod.runs import fit

NAMES = ["$\\frac{1}$", "back\\slash", 'dq"uote', "sq'uote", "$x_1$"]
CONFIG = {"steps": 4, "cycle": 2, "lookahead": 1, "batch_size": 32, "guard_size": 16,
          "modifiers": ["lr"], "checkpoint_every": 1}  # fmt: skip


class Odd(nn.Module):
    """Two linear layers and a scale, each under a name that TeX or JSON would misread."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.add_module(NAMES[0], nn.Linear(4, 8))
        self.add_module(NAMES[1], nn.Linear(8, 2))
        for name in NAMES[2:]:
            self.register_parameter(name, nn.Parameter(torch.ones(())))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(getattr(self, NAMES[0])(x))
        scale = getattr(self, NAMES[2]) * getattr(self, NAMES[3]) * getattr(self, NAMES[4])
        return getattr(self, NAMES[1])(h) * scale


class _Stop(Exception):  # noqa: N818
    """Ends a run mid-way, as a crash would."""


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 4, generator=g)
    y = (x[:, 0] > 0).long()
    return (x[:64], y[:64]), (x[64:80], y[64:80]), (x[80:], y[80:])


def test_tex_backslash_and_quote_names_are_drawn_as_text(tmp_path):
    train, guard, test = _data()
    done = fit(Odd(), F.cross_entropy, train, guard, test=test, config=CONFIG,
               run_dir=tmp_path / "full")  # fmt: skip
    assert (tmp_path / "full" / "report.html").read_text().count("<img") >= 5
    assert done.run.step == CONFIG["steps"]


def test_quote_and_backslash_names_resume(tmp_path):
    train, guard, test = _data()
    cfg = {**CONFIG, "report": False}

    def stop(run) -> None:
        if run.step == 3:
            raise _Stop

    with contextlib.suppress(_Stop):  # stopped after the checkpoint of step 2 ...
        fit(Odd(), F.cross_entropy, train, guard, test=test, config=cfg,
            run_dir=tmp_path / "half", on_step=stop)  # fmt: skip
    # ... and resumed to the end: the names round-trip through the checkpoint
    resumed = fit(Odd(), F.cross_entropy, train, guard, test=test, config=cfg,
                  run_dir=tmp_path / "half", resume=True)  # fmt: skip
    assert resumed.run.step == CONFIG["steps"]
    names = dict(resumed.module.named_parameters())
    assert {f"{NAMES[0]}.weight", f"{NAMES[1]}.bias", *NAMES[2:]} <= set(names)
