"""Misuses of ``fit`` and ``SelfModifier`` (issue 36, "bad input to the Python API"): each one
ends before training in one :class:`~selfmod.errors.SelfmodError` line that names the argument,
never in an internal error far from the cause; valid uses (integer inputs to an embedding, soft
labels, an ignored label) pass the same checks."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from selfmod.errors import NonFiniteError, SelfmodError
from selfmod.introspect.modifiers import registry
from selfmod.introspect.problem import Problem
from selfmod.runs import SelfModifier, fit
from selfmod.runs.arguments import ArgumentError, probe

CONFIG = {"steps": 2, "cycle": 2, "lookahead": 1, "batch_size": 32, "guard_size": 16,
          "report": False}  # fmt: skip
N, G, D, C = 64, 16, 4, 2  # train rows, guard (and test) rows, features, classes


def _data(kind: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Train, guard and test pairs: ``"class"`` (C integer labels) or ``"regress"`` (float
    targets (n, 1))."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N + 2 * G, D, generator=g)
    y = (x[:, 0] > 0).long() if kind == "class" else x[:, :1] * 2.0
    cut = {"train": slice(0, N), "guard": slice(N, N + G), "test": slice(N + G, N + 2 * G)}
    return {k: (x[s], y[s]) for k, s in cut.items()}


def _model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D, 8), nn.ReLU(), nn.Linear(8, C if kind == "class" else 1))


LOSS = {"class": F.cross_entropy, "regress": F.mse_loss}


def _call(entry: str, kind: str, tmp_path, **over: Any) -> Any:
    """``fit`` or ``SelfModifier`` (then one ``step`` with the training pair), with ``over``
    replacing any argument (``train`` is the step's batch for ``SelfModifier``)."""
    data = _data(kind)
    x, y = data["train"]
    args: dict[str, Any] = {
        "model": _model(kind), "loss": LOSS[kind], "guard": data["guard"],
        "train": (x, y) if entry == "fit" else (x[:32], y[:32]),  # SelfModifier: one batch
        "test": data["test"], "config": dict(CONFIG), "run_dir": tmp_path / "run",
    }  # fmt: skip
    args.update(over)
    model, loss, train, guard = (args.pop(k) for k in ("model", "loss", "train", "guard"))
    if entry == "fit":
        return fit(model, loss, train, guard, **args)
    args.pop("on_step", None)
    if "run_dir" not in over:
        args["run_dir"] = None
    sm = SelfModifier(model, loss, guard, **args)
    try:
        sm.step(train)
    finally:
        sm.close()
    return sm


def _one_line_naming(err: BaseException, *names: str) -> None:
    text = str(err)
    assert isinstance(err, SelfmodError), f"{type(err).__name__}: {text}"
    assert text and "\n" not in text and "\r" not in text, text
    assert any(n in text for n in names), (names, text)


# -- data misuses: each kind at each place data enters ---------------------------------------

T = torch.Tensor
Pair = tuple[Any, Any]


def _nan_at(x: T, value: float = math.nan) -> T:
    x = x.clone()
    x[len(x) // 2, 0] = value
    return x


#: misuse -> (problems it applies to, what it does to an (x, y) pair)
DATA: dict[str, tuple[tuple[str, ...], Callable[[Pair], Any]]] = {
    "y_one_short": (("class", "regress"), lambda p: (p[0], p[1][:-1])),
    "x_one_short": (("class", "regress"), lambda p: (p[0][:-1], p[1])),
    "empty": (("class", "regress"), lambda p: (p[0][:0], p[1][:0])),
    "nan_in_x": (("class", "regress"), lambda p: (_nan_at(p[0]), p[1])),
    "inf_in_x": (("class", "regress"), lambda p: (_nan_at(p[0], math.inf), p[1])),
    "minus_inf_in_x": (("class", "regress"), lambda p: (_nan_at(p[0], -math.inf), p[1])),
    "all_nan_x": (("class", "regress"), lambda p: (torch.full_like(p[0], math.nan), p[1])),
    "integer_x": (("class", "regress"), lambda p: ((p[0] * 3).long(), p[1])),
    "bool_x": (("class", "regress"), lambda p: (p[0] > 0, p[1])),
    "complex_x": (("class", "regress"), lambda p: (p[0].to(torch.complex64), p[1])),
    "x_too_narrow": (("class", "regress"), lambda p: (p[0][:, :-1], p[1])),
    "x_too_wide": (("class", "regress"), lambda p: (torch.cat([p[0], p[0]], 1), p[1])),
    "x_as_list": (("class", "regress"), lambda p: (p[0].tolist(), p[1])),
    "y_as_numpy": (("class", "regress"), lambda p: (p[0], p[1].numpy())),
    "x_0_dim": (("class", "regress"), lambda p: (p[0][0, 0], p[1])),
    "y_none": (("class", "regress"), lambda p: (p[0], None)),
    "x_only": (("class", "regress"), lambda p: p[0]),
    "triple": (("class", "regress"), lambda p: (p[0], p[1], p[1])),
    "a_string": (("class", "regress"), lambda p: "data.csv"),
    "label_equal_to_classes": (("class",), lambda p: (p[0], p[1] + (C - 1) * p[1] + p[1])),
    "label_far_above": (("class",), lambda p: (p[0], p[1] + 10**6)),
    "label_minus_one": (("class",), lambda p: (p[0], p[1] - 1)),
    "label_huge_negative": (("class",), lambda p: (p[0], p[1] - 2**40)),
    "float_labels": (("class",), lambda p: (p[0], p[1].float())),
    "bool_labels": (("class",), lambda p: (p[0], p[1].bool())),
    "labels_2d": (("class",), lambda p: (p[0], p[1][:, None])),
    "nan_in_y": (("regress",), lambda p: (p[0], _nan_at(p[1]))),
    "inf_in_y": (("regress",), lambda p: (p[0], _nan_at(p[1], math.inf))),
    "integer_y": (("regress",), lambda p: (p[0], p[1].long())),
    "y_wider": (("regress",), lambda p: (p[0], torch.cat([p[1], p[1]], 1))),
}
#: where data enters: (entry point, argument)
PLACES = [
    ("fit", "train"), ("fit", "guard"), ("fit", "test"),
    ("SelfModifier", "guard"), ("SelfModifier", "test"), ("SelfModifier", "train"),
]  # fmt: skip
#: not a misuse at that place: test=None is no test set
VALID = {("y_none", "test")}


def _data_cases() -> list[Any]:
    cases = []
    for name, (kinds, _) in DATA.items():
        for kind in kinds:
            for entry, place in PLACES:
                if (name, place) in VALID:
                    continue
                shown = "step" if (entry, place) == ("SelfModifier", "train") else place
                cases.append(
                    pytest.param(name, kind, entry, place, id=f"{name}-{kind}-{entry}-{shown}")
                )
    return cases


DATA_CASES = _data_cases()


@pytest.mark.parametrize(("name", "kind", "entry", "place"), DATA_CASES)
def test_bad_data_is_one_line_naming_where_it_entered(name, kind, entry, place, tmp_path):
    pair = _data(kind)[place]
    if entry == "SelfModifier" and place == "train":
        pair = (pair[0][:32], pair[1][:32])
    bad = DATA[name][1](pair)
    with pytest.raises(Exception) as caught:
        _call(entry, kind, tmp_path, **{place: bad})
    # a step's batch is named "step"; bad guard rows may surface at the probe ("guard rows")
    names = ("step",) if (entry, place) == ("SelfModifier", "train") else (place,)
    _one_line_naming(caught.value, *names)
    assert not (tmp_path / "run").exists()  # refused before a run directory is made


# -- misuses of the other arguments --------------------------------------------------------------


class _Tuple(nn.Module):
    def __init__(self, kind: str = "tuple") -> None:
        super().__init__()
        self.lin, self.kind = nn.Linear(D, C), kind

    def forward(self, x: T) -> Any:
        out = self.lin(x)
        return {
            "tuple": lambda: (out, out.sum()),
            "dict": lambda: {"logits": out},
            "list": lambda: [out],
            "none": lambda: None,
            "numpy": lambda: out.detach().numpy(),
            "float": lambda: float(out.sum()),
        }[self.kind]()


class _NoParams(nn.Module):
    def forward(self, x: T) -> T:
        return x[:, :C]


class _IntParams(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(D, C, dtype=torch.long), requires_grad=False)

    def forward(self, x: T) -> T:
        return x @ self.w.float()


class _Raises(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(D, C)

    def forward(self, x: T) -> T:
        raise KeyError("the forward of a broken model\nwith a second line")


def _frozen_out(o: T, t: T) -> T:
    with torch.no_grad():
        return F.cross_entropy(o, t)


def _ce(transform: Callable[[T], Any]) -> Callable[[T, T], Any]:
    return lambda o, t: transform(F.cross_entropy(o, t))


LR = registry()["lr"]
#: (argument named in the message, value or a factory of it); class problems, both entries
OTHER: dict[str, tuple[str, Any]] = {
    "model_returns_tuple": ("model", lambda: _Tuple("tuple")),
    "model_returns_dict": ("model", lambda: _Tuple("dict")),
    "model_returns_list": ("model", lambda: _Tuple("list")),
    "model_returns_none": ("model", lambda: _Tuple("none")),
    "model_returns_numpy": ("model", lambda: _Tuple("numpy")),
    "model_returns_float": ("model", lambda: _Tuple("float")),
    "model_without_parameters": ("model", _NoParams),
    "model_with_integer_parameters": ("model", _IntParams),
    "model_that_raises": ("model", _Raises),
    "model_is_a_function": ("model", lambda: lambda x: x),
    "model_is_none": ("model", lambda: None),
    "model_is_a_string": ("model", lambda: "mlp"),
    "model_too_few_classes": ("guard", lambda: nn.Linear(D, 1)),
    "loss_detached": ("loss", lambda: _ce(lambda v: v.detach())),
    "loss_integer": ("loss", lambda: _ce(lambda v: v.long())),
    "loss_complex": ("loss", lambda: _ce(lambda v: v.to(torch.complex64))),
    "loss_python_float": ("loss", lambda: _ce(float)),
    "loss_item": ("loss", lambda: _ce(lambda v: v.item())),
    "loss_numpy": ("loss", lambda: _ce(lambda v: v.detach().numpy())),
    "loss_none": ("loss", lambda: _ce(lambda v: None)),
    "loss_tuple": ("loss", lambda: _ce(lambda v: (v, v))),
    "loss_per_example": ("loss", lambda: functools.partial(F.cross_entropy, reduction="none")),
    "loss_shape_1": ("loss", lambda: _ce(lambda v: v.reshape(1))),
    "loss_nan": ("loss", lambda: _ce(lambda v: v * math.nan)),
    "loss_inf": ("loss", lambda: _ce(lambda v: v + math.inf)),
    "loss_under_no_grad": ("loss", lambda: _frozen_out),
    "loss_raises": ("loss", lambda: lambda o, t: {}["missing"]),
    "loss_is_a_string": ("loss", lambda: "cross_entropy"),
    "loss_is_none": ("loss", lambda: None),
    "loss_is_mse_on_labels": ("loss", lambda: F.mse_loss),
    "modifiers_names": ("modifiers", ["lr"]),
    "modifiers_none_entry": ("modifiers", [None]),
    "modifiers_int_entry": ("modifiers", [1]),
    "modifiers_a_string": ("modifiers", "lr"),
    "modifiers_a_class": ("modifiers", [LR]),
    "modifiers_a_dict": ("modifiers", {"lr": 1}),
    "modifiers_an_int": ("modifiers", 5),
    "modifiers_mixed": ("modifiers", lambda: [LR(), "grow"]),
    "groups_ints": ("groups", [1, 2]),
    "groups_none_entry": ("groups", [None]),
    "groups_a_string": ("groups", "hidden"),
    "groups_an_int": ("groups", 3),
    "groups_a_group_not_in_a_list": ("groups", lambda: 7),
    "groups_tuples": ("groups", [("0.weight", 0)]),
    "optimizer_int": ("optimizer", 1),
    "optimizer_none": ("optimizer", None),
    "optimizer_torch_class": ("optimizer", torch.optim.SGD),
    "optimizer_unknown": ("optimizer", "lion"),
    "optimizer_empty": ("optimizer", ""),
    "metric_unknown": ("metric", "f1"),
    "metric_int": ("metric", 3),
    "metric_callable": ("metric", lambda: len),
    "config_list": ("config", [("steps", 2)]),
    "config_string": ("config", "steps=2"),
    "config_negative_steps": ("steps", {"steps": -1}),
    "config_bool_steps": ("steps", {"steps": True}),
    "config_unknown_field": ("colour", {"colour": "red"}),
    "config_nan_lr": ("lr", {"lr": math.nan}),
    "config_modifier_name": ("modifiers", {"modifiers": ["magic"]}),
    "run_dir_int": ("run_dir", 3),
    "resume_string": ("resume", "yes"),
    "resume_int": ("resume", 1),
}
#: the keyword each misuse replaces
ARG = {"model": "model", "loss": "loss", "modifiers": "modifiers", "groups": "groups",
       "optimizer": "optimizer", "metric": "metric", "config": "config", "run_dir": "run_dir",
       "resume": "resume"}  # fmt: skip


def _keyword(case: str) -> str:
    return next(k for k in ARG if case.startswith(k + "_"))


@pytest.mark.parametrize("entry", ["fit", "SelfModifier"])
@pytest.mark.parametrize("case", sorted(OTHER))
def test_a_bad_argument_is_one_line_naming_it(case, entry, tmp_path):
    named, value = OTHER[case]
    value = value() if callable(value) and not isinstance(value, type) else value
    keyword = _keyword(case)
    if keyword == "config":
        value = {**CONFIG, **value} if isinstance(value, dict) else value
    with pytest.raises(Exception) as caught:
        _call(entry, "class", tmp_path, **{keyword: value})
    _one_line_naming(caught.value, named)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("case", ["on_step_int", "on_step_string"])
def test_fit_on_step_must_be_callable(case, tmp_path):
    with pytest.raises(ArgumentError) as caught:
        _call("fit", "class", tmp_path, on_step=3 if case == "on_step_int" else "log")
    _one_line_naming(caught.value, "on_step")


@pytest.mark.parametrize("how", ["iterator", "none", "tensor"])
def test_fit_train_that_is_not_data(how, tmp_path):
    x, y = _data("class")["train"]
    train = {"iterator": iter([(x, y)]), "none": None, "tensor": x}[how]
    with pytest.raises(ArgumentError) as caught:
        _call("fit", "class", tmp_path, train=train)
    _one_line_naming(caught.value, "train")


def test_step_batch_that_is_not_a_pair(tmp_path):
    x, y = _data("class")["train"]
    for bad in (x, (x,), (x, y, y), [x[:8], y[:8], y[:8]], None, "batch"):
        with pytest.raises(ArgumentError) as caught:
            _call("SelfModifier", "class", tmp_path, train=bad)
        _one_line_naming(caught.value, "step")


def test_the_count_of_misuses():
    """The issue's target: at least 300 misuses tested."""
    assert len(DATA_CASES) + 2 * len(OTHER) + 2 + 3 + 6 >= 300


# -- a loss that is NaN on every training batch -------------------------------------------------


def test_a_loss_nan_on_every_training_batch_ends_in_one_clear_error(tmp_path):
    """Finite on the guard's rows (so the up-front probe passes), NaN on every training batch
    (of 32 rows): each step rolls back; the run ends in a NonFiniteError, not a success."""

    def loss(out: T, y: T) -> T:
        value = F.cross_entropy(out, y)
        return value * math.nan if len(y) == 32 else value

    with pytest.raises(NonFiniteError) as caught:
        _call("fit", "class", tmp_path, loss=loss)
    _one_line_naming(caught.value, "every one of the 2 steps")
    data = _data("class")
    sm = SelfModifier(_model("class"), loss, data["guard"], config=CONFIG)
    x, y = data["train"]
    for i in range(0, 64, 32):
        sm.step((x[i : i + 32], y[i : i + 32]))
    with pytest.raises(NonFiniteError, match="every one of the"):
        sm.finish()


# -- valid uses pass ---------------------------------------------------------------------------


class _Bag(nn.Module):
    """``tokens (B, T) -> Embedding -> mean -> Linear``: integer inputs are what it takes."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.out = nn.Embedding(16, 8), nn.Linear(8, C)

    def forward(self, tokens: T) -> T:
        return self.out(self.embed(tokens).mean(1))  # (B, C)


def _tokens() -> dict[str, Pair]:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 16, (N + 2 * G, 5), generator=g)
    y = (x < 8).sum(1).gt(2).long()
    return {"train": (x[:N], y[:N]), "guard": (x[N : N + G], y[N : N + G]),
            "test": (x[N + G :], y[N + G :])}  # fmt: skip


def test_integer_inputs_to_an_embedding_pass_and_train(tmp_path):
    data = _tokens()
    result = fit(_Bag(), F.cross_entropy, data["train"], data["guard"], test=data["test"],
                 config=CONFIG, run_dir=tmp_path / "run")  # fmt: skip
    assert result.run.step == CONFIG["steps"]
    sm = SelfModifier(_Bag(), F.cross_entropy, data["guard"], config=CONFIG)
    sm.step(data["train"])
    sm.close()
    with pytest.raises(ArgumentError, match="step: batch: y has label 2, outside"):
        SelfModifier(_Bag(), F.cross_entropy, data["guard"], config=CONFIG).step(
            (data["train"][0], data["train"][1] + 1)
        )


def test_valid_uses_pass(tmp_path):
    """Soft labels, the ignored label -100, an nn.CrossEntropyLoss, a regression with the
    loss as metric, float64 training data and a Dataset of examples are not misuses."""
    data = _data("class")
    x, y = data["train"]
    soft = F.one_hot(y, C).float()
    ignored = y.clone()
    ignored[::5] = -100
    uses: list[dict[str, Any]] = [
        {"train": (x, soft), "guard": (data["guard"][0], F.one_hot(data["guard"][1], C).float()),
         "test": None},
        {"train": (x, ignored)},
        {"loss": nn.CrossEntropyLoss()},
        {"train": (x.double(), y)},
        {"train": TensorDataset(x, y), "guard": TensorDataset(*data["guard"])},
        {"train": [(x[:32], y[:32]), (x[32:], y[32:])], "guard": [data["guard"]]},
    ]  # fmt: skip
    for i, use in enumerate(uses):
        result = _call("fit", "class", tmp_path / str(i), **use)
        assert result.run.step == CONFIG["steps"], use
    result = _call("fit", "regress", tmp_path / "regress", metric="loss")
    assert result.run.problem.metric == "loss"


def test_the_probe_leaves_the_model_and_the_random_state_as_they_were():
    """The checks run the model once on guard rows: no parameter, buffer, mode or random
    state changes (a forward that draws random numbers included)."""

    class Noisy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(D, 8), nn.BatchNorm1d(8), nn.Dropout(0.5))
            self.out = nn.Linear(8, C)

        def forward(self, x: T) -> T:
            return self.out(self.net(x) + torch.randn(8))

    model = Noisy().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    gx, gy = _data("class")["guard"]
    found = probe(Problem(model, F.cross_entropy), F.cross_entropy, gx, gy)
    assert found.classes == C
    assert torch.equal(torch.get_rng_state(), rng)
    assert model.training and all(m.training for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in model.parameters())


def test_messages_name_the_fix():
    data = _data("class")
    guard = data["guard"]
    cases = [
        ({"modifiers": ["lr"]}, 'config={"modifiers": ['),
        ({"modifiers": [LR]}, "pass an instance, "),
        ({"groups": [1, 2]}, "selfmod.arch.UnitGroup"),
    ]
    for kwargs, words in cases:
        with pytest.raises(ArgumentError, match=words.replace("[", r"\[").replace("(", r"\(")):
            SelfModifier(_model("class"), F.cross_entropy, guard, config=CONFIG, **kwargs)
    with pytest.raises(ArgumentError, match="train: x has 64 rows but y has 63; pass tensors"):
        fit(_model("class"), F.cross_entropy, (data["train"][0], data["train"][1][:-1]), guard,
            config=CONFIG)  # fmt: skip
    assert isinstance(ArgumentError("x"), TypeError | ValueError)  # as the errors it replaced


def test_finite_data_whose_sum_overflows_is_not_called_non_finite():
    """The finite check reads one sum and, where the sum is not finite, every entry: values
    near the dtype's largest pass, one NaN or inf among them does not."""
    from selfmod.errors import SelfmodError
    from selfmod.runs.arguments import check_pair

    y = torch.arange(4)
    for dtype in (torch.float32, torch.float16, torch.complex64):
        big = torch.full((4, 3), torch.finfo(torch.float16 if dtype == torch.float16 else
                                             torch.float32).max / 2).to(dtype)  # fmt: skip
        check_pair("train", big, y)  # the sum overflows; every entry is finite
        for bad in (math.nan, math.inf):
            with pytest.raises(SelfmodError, match=r"^train: x has 1 non-finite value"):
                check_pair("train", _nan_at(big, bad), y)
