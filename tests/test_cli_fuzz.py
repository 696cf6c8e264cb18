"""The command line under fuzzed input (issue 36, "bad input"): thousands of values for config
fields (``--set`` and TOML files), run-directory arguments, ids, options and stray words, each
either accepted or refused with one line on stderr and exit code 2; never a traceback, never a
boxed usage message. Runs in-process through :func:`selfmod.cli.main`; an accepted ``train`` or
``meta-train`` config stops before it builds anything."""

from __future__ import annotations

import contextlib
import io
import random
import string
from collections.abc import Iterator

import pytest

import selfmod.bench.practitioners
import selfmod.bench.vs_search
import selfmod.meta.command
import selfmod.runs.session
from selfmod.cli import main
from selfmod.introspect.config import TrainConfig
from selfmod.meta.train import MetaTrainConfig

#: the flat spelling of a modifier's setting is fuzzed too; its deprecation line is expected
pytestmark = pytest.mark.filterwarnings(
    "ignore::selfmod.introspect.config.ConfigDeprecationWarning"
)


class AcceptedError(Exception):
    """A config passed validation: the fuzz stops the command there."""


SPECIAL = [
    "", " ", "nan", "NaN", "inf", "-inf", "+inf", "1e400", "-1e400", "1e-400", "0x10", "0o7",
    "0b1", "1_000", "1__0", "true", "false", "True", "null", "None", "[", "]", "{", "}", "[]",
    "{}", "'", '"', '"""', "\\", "\x00", "a\x00b", "\n", "\r", "line\nbreak", "\t", "\x1b[31m",
    "\u202e", "\udcff", "\ufeff", "💥", "日本語", "ä" * 300, "x" * 10_000, "9" * 5_000,
    "-" + "9" * 5_000, "1" * 4_300, str(2**63), str(-(2**63) - 1), str(10**400), "1.5", "-0.0",
    "[1, 2]", "[lr, lr]", "[lr, grow]", "{a = 1}", "[[1]]", "[" * 100 + "]" * 100,
    "{a = {b = {c = {d = 1}}}}", "2024-01-01", "1979-05-27T07:32:00Z", "07:32:00",
    "torch.nn:Sequential", "torch.nn:Linear", "os:getcwd", ":", "a:", ":b", "../../etc",
    "/dev/null", "learned:", "learned:/nonexistent", "cuda:99", "-1", "0", "1", "2147483648",
    '"quoted"', "'single'", "$\\frac{1}$", "%s%n", "{0}", "${HOME}",
]  # fmt: skip


def _random_text(rng: random.Random) -> str:
    kind = rng.randrange(8)
    if kind == 0:  # any code point, control characters and lone surrogates included
        return "".join(chr(rng.randrange(0x110000)) for _ in range(rng.randrange(1, 12)))
    if kind == 1:
        return "".join(rng.choice(string.printable) for _ in range(rng.randrange(1, 40)))
    if kind == 2:  # integers near and far beyond every bound
        return str(rng.choice([-1, 1]) * rng.randrange(10 ** rng.randrange(1, 30)))
    if kind == 3:
        return repr(rng.uniform(-1e6, 1e6) * 10.0 ** rng.randrange(-300, 300))
    if kind == 4:  # nested arrays and inline tables
        depth = rng.choice([1, 2, 5, 31, 33, 200, 2_000])
        return (
            "[" * depth + "1" + "]" * depth
            if rng.random() < 0.5
            else "{a = " * depth + ("1" + "}" * depth)
        )
    if kind == 5:
        return "x" * rng.choice([255, 256, 4_096, 5_000, 10_000])
    if kind == 6:  # lists of words and numbers
        items = [rng.choice(["lr", "grow", "1", "nan", '"a"', "[]", "x" * 50]) for _ in range(4)]
        return "[" + ", ".join(items[: rng.randrange(5)]) + "]"
    return rng.choice(SPECIAL) + rng.choice(["", "1", "]", "\n", "x" * 30])


def _texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return SPECIAL + [_random_text(rng) for _ in range(n - len(SPECIAL))]


FIELDS = [*TrainConfig.model_fields, "verify.epsilon", "budget.params", "modifiers.use",
          "modifiers.grow.max_width", "modifiers.grow.every", "modifiers.lr.lr_mean",
          "modifiers.magic.x", "schedule", "colour", "", " ", "a..b", "x" * 300, "\n", "ü",
          "modifiers", "modifiers.grow"]  # fmt: skip
META_FIELDS = [*MetaTrainConfig.model_fields, "colour", "a.b"]


@contextlib.contextmanager
def _stderr() -> Iterator[io.StringIO]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        yield err


def _outcome(argv: list[str]) -> str | None:
    """``None`` if ``main(argv)`` was fine (accepted, or one line and exit code 2), else what
    went wrong."""
    with _stderr() as err:
        try:
            main(argv)
        except AcceptedError:
            return None
        except SystemExit as stop:
            lines = err.getvalue().splitlines()
            if stop.code == 2 and len(lines) == 1 and lines[0].startswith("error: "):
                return None
            return f"exit {stop.code}, stderr {err.getvalue()[-300:]!r}"
        except BaseException as exc:  # the traceback this test is about
            return f"{type(exc).__name__}: {str(exc)[:200]}"
    return None  # a command that finished (e.g. --help)


@pytest.fixture
def stopped(monkeypatch, tmp_path):
    """AcceptedError configs stop before they build a model, data or a run directory."""

    def accept(*args, **kwargs):
        raise AcceptedError

    monkeypatch.setattr(selfmod.runs.session, "from_config", accept)
    monkeypatch.setattr(selfmod.meta.command, "meta_train", accept)
    for bench in (selfmod.bench.vs_search, selfmod.bench.practitioners):
        monkeypatch.setattr(bench, "run_benchmark", accept)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _failures(cases: list[list[str]]) -> list[tuple[list[str], str]]:
    out = []
    for argv in cases:
        why = _outcome(argv)
        if why is not None:
            out.append(([a[:60] for a in argv], why))
    return out


COUNTS: dict[str, int] = {}


def _check(name: str, cases: list[list[str]]) -> None:
    COUNTS[name] = len(cases)
    failures = _failures(cases)
    assert not failures, f"{len(failures)} of {len(cases)}: {failures[:5]}"


def test_train_set_overrides(stopped):
    rng = random.Random(1)
    texts = _texts(2_500, seed=1)
    _check("train --set", [["train", "--set", f"{rng.choice(FIELDS)}={t}"] for t in texts])


def test_train_config_files(stopped):
    rng = random.Random(2)
    cases = []
    for i, text in enumerate(_texts(700, seed=2)):
        path = stopped / f"c{i}.toml"
        field = rng.choice([*TrainConfig.model_fields, "verify", "modifiers", "colour"])
        body = rng.choice(
            [f"{field} = {text}\n", f"[{field}]\nx = {text}\n", text, f'{field} = "{text}"\n']
        )
        path.write_bytes(body.encode("utf-8", "surrogatepass"))
        cases.append(["train", str(path)])
    _check("train CONFIG.toml", cases)


def test_meta_train_set_overrides(stopped):
    rng = random.Random(3)
    texts = _texts(400, seed=3)
    _check("meta-train --set", [["meta-train", "--set", f"{rng.choice(META_FIELDS)}={t}"]
                                for t in texts])  # fmt: skip


def test_bench_set_overrides(stopped):
    rng = random.Random(7)
    texts = _texts(300, seed=7)
    fields = ["seeds", "steps", "out", "trials", "colour", "budget", "x" * 100]
    _check("bench --set", [["bench", rng.choice(["vs-search", "practitioners"]), "--set",
                            f"{rng.choice(fields)}={t}"] for t in texts])  # fmt: skip


def test_run_directory_commands(stopped):
    rng = random.Random(4)
    (stopped / "a_file").write_text("x")
    (stopped / "empty").mkdir()
    paths = ["a_file", "empty", ".", "/", *_texts(200, seed=4)]
    cases = []
    for path in paths:
        word = rng.choice(_texts(60, seed=5))
        cases += [
            rng.choice([["report", path], ["log", path], ["resume", path]]),
            ["approve", path, rng.choice(["1", "-1", word, "9" * 5_000])],
            ["rollback", path, "--to", rng.choice(["0", "-5", word, "9" * 5_000])],
            ["report", rng.choice(["empty", path]), "--x", word],
        ]
    _check("run-directory commands", cases)


def test_stray_words_and_options(stopped):
    rng = random.Random(6)
    words = _texts(150, seed=6)
    commands = [[], ["train"], ["resume"], ["report"], ["log"], ["approve"], ["rollback"],
                ["meta-train"], ["bench"], ["bench", "vs-search"], ["nope"]]  # fmt: skip
    cases = []
    for word in words:
        cmd = rng.choice(commands)
        cases += [
            [*cmd, word],
            [*cmd, "--" + word[:20]],
            [*cmd, "--set"],
            [*cmd, rng.choice(["-", "--", "-x", "--to", "--x", "--set=" + word])],
        ]
    _check("stray words and options", cases)


def test_the_fuzz_counts():
    """Issue 36's target: at least 4,000 fuzzed values through the command line (run after
    the fuzz tests above, in this file's order)."""
    if len(COUNTS) < 6:
        pytest.skip("run with the whole file")
    assert sum(COUNTS.values()) >= 4_000, COUNTS


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["train", "--bogus"], "selfmod train: no such option: --bogus"),
        (["approve", "d", "notint"], "selfmod approve: invalid value for 'ID'"),
        ([], "selfmod: missing command"),
        (["nocmd"], "selfmod: no such command 'nocmd'"),
        (["rollback", "d"], "missing option '--to'"),
    ],
)
def test_usage_errors_are_one_line(argv, words, capsys):
    with pytest.raises(SystemExit) as stop:
        main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1 and "╭" not in err, err
    assert err.startswith("error: ") and words in err, err


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ("a = " + "[" * 2_000 + "]" * 2_000, "nests arrays or tables 2000 deep"),
        ("steps = " + "9" * 5_000, "holds an integer of more than"),
        ('run_id = "' + "x" * 10_000 + '"', "run_id must be a string matching"),
        ('model = "torch.nn:Sequential"', "without a floating-point parameter"),
    ],
    ids=["nested", "5000-digits", "long-run-id", "model-without-parameters"],
)
def test_the_issues_config_files_are_one_line(body, words, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "c.toml"
    path.write_text(body + "\nsteps = 2\n" if "steps" not in body else body)
    with pytest.raises(SystemExit) as stop:
        main(["train", str(path), "--set", f"out={tmp_path / 'runs'}"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1, err
    assert words in err and len(err) < 700, err
    assert not (tmp_path / "runs").exists()
