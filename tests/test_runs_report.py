"""report.html renders in headless Chromium: the screenshot shows text and plots, not a blank."""

import os
import shutil
import subprocess
import sys

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium package")
def test_report_renders_in_headless_chromium(tmp_path):
    import matplotlib.image

    args = [
        "steps=300",
        "cycle=30",
        "lookahead=5",
        "modifiers.grow.max_width=32",
        "shift_step=150",
        f"out={tmp_path / 'runs'}",
    ]
    out = subprocess.run(
        [sys.executable, "-m", "selfmod.cli", "train", *[a for s in args for a in ("--set", s)]],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    (run_dir,) = (tmp_path / "runs").iterdir()
    shot = tmp_path / "report.png"
    subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}",
            f"--screenshot={shot}",
            "--window-size=1100,1800",
            f"file://{(run_dir / 'report.html').resolve()}",
        ],
        capture_output=True,
        check=False,
        timeout=120,
        env={**os.environ, "HOME": str(tmp_path)},
    )
    assert shot.is_file(), "chromium wrote no screenshot"
    img = matplotlib.image.imread(shot)[..., :3]  # (H, W, 3) in [0, 1]
    assert img.shape[:2] == (1800, 1100)
    ink = (img.mean(axis=-1) < 0.9).mean()  # fraction of non-white pixels
    colour = (img.max(axis=-1) - img.min(axis=-1) > 0.2).mean()  # coloured curves and markers
    assert ink > 0.02, f"screenshot looks blank ({ink:.3%} non-white pixels)"
    assert colour > 0.001, f"no coloured plot pixels ({colour:.3%})"
    shutil.copy(shot, run_dir / "report.png")
    os.environ.get("SELFMOD_KEEP_SCREENSHOT") and shutil.copy(
        shot, os.environ["SELFMOD_KEEP_SCREENSHOT"]
    )


def test_a_run_without_cycles_writes_its_report_without_plot_warnings(tmp_path):
    """fit's defaults on a run shorter than a cycle: no probes, so the probe plots are empty;
    the report is written and matplotlib says nothing about empty legends."""
    import warnings

    import torch
    import torch.nn.functional as F
    from torch import nn

    from selfmod.runs import fit

    torch.manual_seed(0)
    x = torch.randn(300, 4)
    y = (x[:, 0] > 0).long()
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        result = fit(model, F.cross_entropy, (x[:200], y[:200]), (x[200:], y[200:]),
                     config={"steps": 40}, run_dir=tmp_path / "run")  # fmt: skip
    assert (result.run_dir / "report.html").is_file()
    assert not [w for w in seen if "legend" in str(w.message)]


@pytest.mark.parametrize("log_test, curve", [(False, "guard accuracy"), (True, "test accuracy")])
def test_the_reports_metric_curve_is_the_test_sets_only_where_log_points_read_it(
    log_test, curve, tmp_path
):
    """With a test set, fit's log points leave it alone by default (``log_test = false``): the
    report's metric curve is then the guard set's, not an empty test curve."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    from selfmod.runs import fit

    torch.manual_seed(0)
    x = torch.randn(400, 4)
    y = (x[:, 0] > 0).long()
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    result = fit(model, F.cross_entropy, (x[:200], y[:200]), (x[200:300], y[200:300]),
                 test=(x[300:], y[300:]), config={"steps": 40, "log_test": log_test},
                 run_dir=tmp_path / "run")  # fmt: skip
    page = (result.run_dir / "report.html").read_text()
    assert f'alt="{curve}"' in page
    assert result.summary["test_accuracy"] > 0.5


def test_log_axes_are_labelled_in_plain_text_where_names_are_not_parsed_as_tex():
    """The report draws names as written (``PLAIN_TEXT``: no mathtext), so a log axis's ticks
    must not be mathtext either: matplotlib's default would print ``$\\mathdefault{10^{-2}}$``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from selfmod.runs.report import PLAIN_TEXT, log_scale

    with plt.rc_context(PLAIN_TEXT):
        fig, ax = plt.subplots()
        ax.plot([0, 1, 2], [1e-5, 2e-3, 3e-2])
        log_scale(ax)
        fig.canvas.draw()
        labels = [t.get_text() for t in ax.get_yticklabels() + ax.get_yticklabels(minor=True)]
        plt.close(fig)
    shown = [t.replace("\N{MINUS SIGN}", "-") for t in labels if t]
    assert ax.get_yscale() == "log" and "1e-03" in shown, shown
    assert not [t for t in shown if "$" in t or "mathdefault" in t], shown
