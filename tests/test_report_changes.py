"""What the report and the log say of each change: before -> after by tensor name, and why it
was proposed (the meta-gradient, noise scale or gap that drove it)."""

import torch
import torch.nn.functional as F
from torch import nn

from selfmod.runs import fit
from selfmod.runs.logs import changes, why


def test_changes_name_the_tensors_whose_rate_moved():
    before = {"lr": [0.1, 0.2, 0.3], "weight_decay": 1e-5, "widths": [8]}
    after = {"lr": [0.1, 0.25, 0.3], "weight_decay": 2e-5, "widths": [8]}
    text = changes(before, after, ["0.weight", "0.bias", "2.weight"])
    assert text == "lr[0.bias] 0.2 -> 0.25; weight_decay 1e-05 -> 2e-05"
    assert changes(before, after) == "lr [0.1, 0.2, 0.3] -> [0.1, 0.25, 0.3]; " + (
        "weight_decay 1e-05 -> 2e-05"
    )
    assert why({"gap": 0.3125, "noise_scale": 412.0}) == "gap 0.3125; noise_scale 412"


def test_the_report_says_why_each_change_was_proposed(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(700, 4)
    y = (x[:, 0] + x[:, 1] > 0).long()
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))
    result = fit(
        model, F.cross_entropy, (x[:500], y[:500]), (x[500:600], y[500:600]),
        test=(x[600:], y[600:]), optimizer="sgd", modifiers=None,
        config={"steps": 60, "cycle": 20, "lookahead": 5, "out": str(tmp_path),
                "compare_fixed": False, "modifiers": None},  # every modifier that applies
    )  # fmt: skip
    html = (result.run_dir / "report.html").read_text()
    assert "why proposed" in html and "d guard / d log_lr" in html
    assert "lr[0.weight]" in html or "lr[2.weight]" in html  # rates by tensor name
    assert "self-modification / training time" in html
    s = result.summary  # summary.json's: the time of training and of self-modification apart
    assert s["meta_seconds"] > 0 and s["meta_overhead"] == s["meta_seconds"] / s["base_seconds"]


def test_fit_leaves_the_callers_random_state_and_determinism_setting_as_they_were(tmp_path):
    x = torch.randn(300, 4)
    y = (x[:, 0] > 0).long()
    model = nn.Linear(4, 2)
    torch.manual_seed(123)
    expected = torch.rand(3)  # the caller's next draws, without a fit in between
    torch.manual_seed(123)
    torch.use_deterministic_algorithms(False)
    fit(model, F.cross_entropy, (x[:200], y[:200]), (x[200:], y[200:]),
        config={"steps": 20, "cycle": 10, "lookahead": 2, "out": str(tmp_path)})  # fmt: skip
    assert not torch.are_deterministic_algorithms_enabled()  # the run set it for itself only
    assert torch.equal(torch.rand(3), expected)  # the caller's stream goes on as it would
