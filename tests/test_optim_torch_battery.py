"""Every drop-in optimizer through one battery of torch.optim's generic checks.

Modelled on PyTorch's own optimizer tests: an ``OptimizerInfo``-style table (``DROP_INS``) of
constructor inputs and error inputs (torch's ``OptimizerInput`` / ``ErrorOptimizerInput``, and
for the control torch's own tables for AdamW), and one generic battery (``CHECKS``) that every
entry meets. ``torch.optim.AdamW`` is the control and must pass everything that applies to it
on CPU. A new drop-in is one more entry; a check that does not apply says why (``skips``).
"""

from __future__ import annotations

import copy
import io
import math
import pickle
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch.nn import Parameter
from torch.optim.lr_scheduler import ReduceLROnPlateau, StepLR
from torch.overrides import TorchFunctionMode

from selfmod import optim

try:  # torch's own tables (torch.testing._internal needs the expecttest package)
    from torch.testing._internal import common_optimizers as torch_tables
except ImportError:
    torch_tables = None
FLAGS = ("foreach", "fused", "capturable", "differentiable", "maximize", "amsgrad")


@dataclass
class OptimizerInput:
    """Constructor arguments, as torch's ``common_optimizers.OptimizerInput``."""

    params: Any
    kwargs: dict[str, Any]
    desc: str = ""


@dataclass
class ErrorOptimizerInput:
    """An input that must fail, as torch's (``error_on``: "construction" or "step")."""

    optimizer_error_input: OptimizerInput
    error_type: type[BaseException] = RuntimeError
    error_regex: str = ""
    error_on: str = "construction"


def _from_torch(item: Any) -> Any:
    """torch's table entries as ours."""
    if hasattr(item, "optimizer_error_input"):
        on = "step" if item.error_on.name == "STEP_ERROR" else "construction"
        inner = _from_torch(item.optimizer_error_input)
        return ErrorOptimizerInput(inner, item.error_type, item.error_regex, on)
    return OptimizerInput(item.params, dict(item.kwargs), item.desc)


def _all_optims_errors() -> list[ErrorOptimizerInput]:
    """torch's errors for every optimizer (``get_error_inputs_for_all_optims``): torch's own
    table when importable, else a copy of it as of 2.13."""
    if torch_tables is not None:
        errors = torch_tables.get_error_inputs_for_all_optims("cpu", torch.float32)
        return [_from_torch(e) for e in errors]
    p, q = Parameter(torch.randn(1, 1)), Parameter(torch.randn(1, 1))
    return [
        ErrorOptimizerInput(
            OptimizerInput(p, {}, "invalid param type"),
            TypeError,
            "params argument given to the optimizer should be an iterable of Tensors or dicts",
        ),
        ErrorOptimizerInput(
            OptimizerInput([p, p], {}, "duplicate parameters in a group"),
            UserWarning,
            ".*a parameter group with duplicate parameters.*",
        ),
        ErrorOptimizerInput(
            OptimizerInput([{"params": p}, {"params": p}], {}, "duplicates across groups"),
            ValueError,
            "some parameters appear in more than one parameter group",
        ),
        ErrorOptimizerInput(
            OptimizerInput(None, {"lr": torch.tensor([0.001, 0.001])}, "1-element tensor lr"),
            ValueError,
            "Tensor lr must be 1-element",
        ),
        ErrorOptimizerInput(
            OptimizerInput([("weight", p), q], {}, "all params with or without names"),
            ValueError,
            "all optimizer params should be with/without names. Some param names are missing",
        ),
        ErrorOptimizerInput(
            OptimizerInput(
                [{"params": [p], "lr": 1e-2}, {"params": [("weight", q)]}],
                {},
                "all groups with or without names",
            ),
            ValueError,
            "all optimizer param groups should be with/without names. "
            "cannot add param group with names to the optimizer",
        ),
    ]


def _adamw_inputs() -> list[OptimizerInput]:
    """torch's AdamW inputs on CPU (``optim_inputs_func_adamw``), from torch when importable."""
    if torch_tables is not None:
        return [_from_torch(i) for i in torch_tables.optim_inputs_func_adamw("cpu")]
    return _adam_inputs()


def _adam_inputs() -> list[OptimizerInput]:
    """torch's AdamW inputs on CPU, as of 2.13."""
    return [
        OptimizerInput(None, {}, "default"),
        OptimizerInput(None, {"lr": 0.01}, "non-default lr"),
        OptimizerInput(None, {"weight_decay": 0.1}, "nonzero weight_decay"),
        OptimizerInput(None, {"weight_decay": 0.1, "maximize": True}, "maximize"),
        OptimizerInput(None, {"weight_decay": 0.1, "amsgrad": True}, "amsgrad"),
    ]


def _adamw_errors() -> list[ErrorOptimizerInput]:
    if torch_tables is not None:
        errors = torch_tables.optim_error_inputs_func_adamw("cpu", torch.float32)
        return [_from_torch(e) for e in errors]
    return _adam_range_errors()


@dataclass(frozen=True)
class DropIn:
    """One optimizer under test, as torch's ``OptimizerInfo``."""

    name: str
    make: Callable[..., torch.optim.Optimizer]  # make(params, **kwargs)
    inputs: Callable[[], list[OptimizerInput]]  # constructor kwargs to try
    error_inputs: Callable[[], list[ErrorOptimizerInput]]
    flags: dict[str, type[Exception] | None]  # Adam-family flag=True: accepted, or the refusal
    stepped_flags: tuple[str, ...]  # accepted flags that can step here (CPU)
    # (our kwargs, torch.optim.AdamW kwargs) where the rules coincide, compared in float64
    reference: tuple[dict[str, Any], dict[str, Any]]
    skips: dict[str, str] = field(default_factory=dict)  # check name -> why it does not apply


def _adamwhd_inputs() -> list[OptimizerInput]:
    return [
        *_adam_inputs(),
        OptimizerInput(None, {"lr": torch.tensor(0.001)}, "Tensor lr"),
        OptimizerInput(None, {"lr": torch.tensor([[0.001]])}, "Tensor lr of shape [1, 1]"),
        OptimizerInput(
            None,
            {"betas": (torch.tensor([[[0.9]]]), torch.tensor([[0.99]]))},
            "Tensor betas of shapes [1, 1, 1] and [1, 1]",
        ),
        OptimizerInput(None, {"betas": (torch.tensor(0.9), torch.tensor(0.99))}, "Tensor betas"),
        OptimizerInput(None, {"max_step": 0.2, "lr": 0.05}, "large max_step"),
    ]


def _adam_range_errors() -> list[ErrorOptimizerInput]:
    """torch's errors for Adam's ranges, plus what every AdamW-like drop-in must refuse."""
    return [
        *_all_optims_errors(),
        ErrorOptimizerInput(
            OptimizerInput(None, {"lr": 1e-2, "betas": (1.0, 0.0)}, "beta1 in [0, 1)"),
            error_type=ValueError,
            error_regex="Invalid beta parameter at index 0: 1.0",
        ),
        ErrorOptimizerInput(
            OptimizerInput(None, {"lr": 1e-2, "weight_decay": -1}, "weight_decay >= 0"),
            error_type=ValueError,
            error_regex="Invalid weight_decay value: -1",
        ),
        ErrorOptimizerInput(
            OptimizerInput(None, {"lr": -1e-2}, "lr >= 0"),
            error_type=ValueError,
            error_regex="Invalid learning rate: -0.01",
        ),
    ]


def _adamwhd_errors() -> list[ErrorOptimizerInput]:
    both = "betas must be either both floats or both Tensors"
    return [
        *_adam_range_errors(),
        ErrorOptimizerInput(
            OptimizerInput(None, {"lr": 1e-2, "betas": (0.9, torch.tensor(0.99))}, both),
            error_type=ValueError,
            error_regex=both,
        ),
        ErrorOptimizerInput(
            OptimizerInput(None, {"max_step": 0.0}, "max_step in (0, 1]"),
            error_type=ValueError,
            error_regex=r"max_step must be in \(0.0, 1.0\]",
        ),
    ]


def _wrapper(params, **kwargs):
    return optim.Optimizer(params, optim.adamw, **kwargs)


def _wrapper_inputs() -> list[OptimizerInput]:
    return [
        OptimizerInput(None, {}, "default"),
        OptimizerInput(None, {"lr": 0.01}, "non-default lr"),
        OptimizerInput(None, {"weight_decay": 0.1}, "nonzero weight_decay"),
        OptimizerInput(None, {"betas": (0.8, 0.99), "eps": 1e-6}, "betas and eps"),
        OptimizerInput(None, {"lr": torch.tensor([[0.001]])}, "Tensor lr of shape [1, 1]"),
    ]


def _wrapper_errors() -> list[ErrorOptimizerInput]:
    return [
        *_all_optims_errors(),
        ErrorOptimizerInput(
            OptimizerInput(None, {"lr": -1e-2}, "lr >= 0"),
            error_type=ValueError,
            error_regex=r"lr must be in \[0.0, inf\)",
        ),
        ErrorOptimizerInput(
            OptimizerInput(None, {"lr": {"w": 0.1}}, "group hyperparameters are scalars"),
            error_type=TypeError,
            error_regex="must be a float or a 1-element tensor to live in the param group",
        ),
    ]


DROP_INS = {
    "torch.AdamW": DropIn(
        name="torch.AdamW",
        make=torch.optim.AdamW,
        inputs=_adamw_inputs,
        error_inputs=_adamw_errors,
        flags=dict.fromkeys(FLAGS),
        stepped_flags=("foreach", "fused", "maximize", "amsgrad"),
        reference=({}, {}),
        skips={
            "no_host_sync": "on CPU AdamW keeps its step count on the host (capturable needs "
            "an accelerator); the device check runs it with capturable=True",
        },
    ),
    "AdamWHD": DropIn(
        name="AdamWHD",
        make=optim.AdamWHD,
        inputs=_adamwhd_inputs,
        error_inputs=_adamwhd_errors,
        flags={
            "foreach": None,
            "capturable": None,
            "maximize": None,
            "amsgrad": None,
            "fused": RuntimeError,
            "differentiable": RuntimeError,
        },
        stepped_flags=("foreach", "capturable", "maximize", "amsgrad"),
        reference=({"max_step": 1e-12}, {}),
        skips={
            "complex_as_two_real_tensors": "one learned rate per tensor: a complex tensor has "
            "one, its real and imaginary parts as two tensors have two",
        },
    ),
    "Optimizer(adamw)": DropIn(
        name="Optimizer(adamw)",
        make=_wrapper,
        inputs=_wrapper_inputs,
        error_inputs=_wrapper_errors,
        flags=dict.fromkeys(FLAGS, TypeError),
        stepped_flags=(),
        reference=({}, {}),
        skips={},
    ),
}


# ------------------------------------------------------------------ helpers


def _inputs(entry: DropIn) -> list[OptimizerInput]:
    return entry.inputs()


def _weight_bias(dtype=torch.float32, contiguous=True, seed=0):
    torch.manual_seed(seed)
    if contiguous:
        return Parameter(torch.randn(10, 5, dtype=dtype)), Parameter(torch.randn(10, dtype=dtype))
    weight = Parameter(torch.randn(10, 5, 2, dtype=dtype)[..., 0])
    return weight, Parameter(torch.randn(10, 2, dtype=dtype)[..., 0])


def _loss(weight, bias, dtype=torch.float32):
    x = torch.linspace(-1, 1, 5, dtype=dtype)
    return (weight.mv(x) + bias).pow(2).sum()


def _closure(opt, weight, bias):
    def closure():
        opt.zero_grad()
        loss = _loss(weight, bias, weight.dtype)
        loss.backward()
        return loss

    return closure


def _fresh(kwargs: dict[str, Any]) -> dict[str, Any]:
    """A deep copy, so that tensor hyperparameters are not shared between optimizers."""
    return copy.deepcopy(kwargs)


def _run(entry, kwargs, steps=5, dtype=torch.float32, seed=0):
    weight, bias = _weight_bias(dtype, seed=seed)
    opt = entry.make([weight, bias], **_fresh(kwargs))
    for _ in range(steps):
        opt.step(_closure(opt, weight, bias))
    return opt, weight, bias


def _assert_same_params(a, b, **tol):
    for p, q in zip(a, b, strict=True):
        torch.testing.assert_close(p.detach(), q.detach(), **tol)


# ------------------------------------------------------------------ the battery


def check_errors(entry):
    """torch's test_errors: each error input raises its type and message at construction (the
    hyperparameters checked before the parameters: ``params`` may be None there)."""
    errors = entry.error_inputs()
    assert errors
    for error in errors:
        params = error.optimizer_error_input.params
        if params is None:
            params = [Parameter(torch.randn(2, 2))]
        kwargs = error.optimizer_error_input.kwargs
        if error.error_on == "construction":
            if issubclass(error.error_type, Warning):
                with pytest.warns(error.error_type, match=error.error_regex):
                    entry.make(params, **kwargs)
            else:
                with pytest.raises(error.error_type, match=error.error_regex):
                    entry.make(error.optimizer_error_input.params, **kwargs)
        else:
            opt = entry.make(params, **kwargs)
            with pytest.raises(error.error_type, match=error.error_regex):
                opt.step()


def check_goes_right_direction(entry):
    """torch's test_forloop_goes_right_direction: every input, contiguous or not, with and
    without schedulers, lowers the loss in 20 steps (raises it under maximize)."""
    schedulers = [[], [lambda o: StepLR(o, gamma=0.9, step_size=10)], [ReduceLROnPlateau]]
    for contiguous in (True, False):
        for make_scheds in schedulers:
            for given in _inputs(entry):
                weight, bias = _weight_bias(contiguous=contiguous)
                opt = entry.make([weight, bias], **_fresh(given.kwargs))
                scheds = [s(opt) for s in make_scheds]
                closure = _closure(opt, weight, bias)
                start = closure().item()
                for _ in range(20):
                    loss = opt.step(closure)
                    for s in scheds:
                        s.step(loss.item()) if isinstance(s, ReduceLROnPlateau) else s.step()
                end = closure().item()
                if given.kwargs.get("maximize"):
                    assert end > start, given.desc
                else:
                    assert end < start, given.desc


def check_param_groups_equal_separate_optimizers(entry):
    """Param groups with their own settings (the usual "no weight decay on biases"): the same
    steps as one optimizer per group."""
    w1, b1 = _weight_bias()
    w2, b2 = (Parameter(t.detach().clone()) for t in (w1, b1))
    grouped = entry.make([{"params": [w1]}, {"params": [b1], "weight_decay": 0.0, "lr": 1e-2}])
    alone = [entry.make([w2]), entry.make([b2], weight_decay=0.0, lr=1e-2)]
    assert [len(g["params"]) for g in grouped.param_groups] == [1, 1]
    assert grouped.param_groups[1]["weight_decay"] == 0.0
    for _ in range(8):
        grouped.step(_closure(grouped, w1, b1))
        for o in alone:
            o.zero_grad()
        _loss(w2, b2).backward()
        for o in alone:
            o.step()
    _assert_same_params([w1, b1], [w2, b2], rtol=0, atol=0)


def check_tensor_lr(entry):
    """torch's test_tensor_lr: a tensor lr steps as the same float."""
    for given in _inputs(entry):
        kwargs = {k: v for k, v in given.kwargs.items() if k != "lr"}
        _, *ref = _run(entry, {**kwargs, "lr": 1e-3})
        _, *got = _run(entry, {**kwargs, "lr": torch.tensor(1e-3)})
        _assert_same_params(ref, got)


def check_complex(entry):
    """torch's test_complex: a complex parameter steps as its real view (view_as_real)."""
    for given in _inputs(entry):
        torch.manual_seed(0)
        c = Parameter(torch.randn(5, 5, dtype=torch.complex64))
        r = Parameter(torch.view_as_real(c.detach()).clone())
        oc = entry.make([c], **_fresh(given.kwargs))
        orr = entry.make([r], **_fresh(given.kwargs))
        for _ in range(3):
            c.grad = torch.randn_like(c)
            r.grad = torch.view_as_real(c.grad).clone()
            oc.step()
            orr.step()
            torch.testing.assert_close(torch.view_as_real(c.detach()), r.detach(), msg=given.desc)


def check_complex_as_two_real_tensors(entry):
    """torch's test_complex_2d: a complex parameter steps as its real and imaginary parts."""
    torch.manual_seed(0)
    a = Parameter(torch.randn(2, dtype=torch.complex64))
    re, im = (Parameter(t.detach().clone()) for t in (a.real, a.imag))
    o1, o2 = entry.make([a]), entry.make([re, im])
    for _ in range(10):
        g = torch.randn_like(a)
        a.grad, re.grad, im.grad = g, g.real.clone(), g.imag.clone()
        o1.step()
        o2.step()
        torch.testing.assert_close(a.real.detach(), re.detach())
        torch.testing.assert_close(a.imag.detach(), im.detach())


def check_noop_without_grads(entry):
    """torch's test_step_is_noop_when_params_have_no_grad."""
    for given in _inputs(entry):
        weight, bias = _weight_bias()
        before = [weight.detach().clone(), bias.detach().clone()]
        opt = entry.make([weight, bias], **_fresh(given.kwargs))
        for _ in range(3):
            opt.step()
        _assert_same_params([weight, bias], before, rtol=0, atol=0)


def check_noop_for_zero_grads(entry):
    """torch's test_step_is_noop_for_zero_grads (without weight decay, which moves them)."""
    for given in _inputs(entry):
        kwargs = {**_fresh(given.kwargs), "weight_decay": 0.0}
        weight, bias = _weight_bias()
        before = [weight.detach().clone(), bias.detach().clone()]
        opt = entry.make([weight, bias], **kwargs)
        for _ in range(3):
            weight.grad, bias.grad = torch.zeros_like(weight), torch.zeros_like(bias)
            opt.step()
        _assert_same_params([weight, bias], before, rtol=0, atol=0)


def check_printable(entry):
    opt, _, _ = _run(entry, {}, steps=1)
    text = repr(opt)
    assert "Parameter Group 0" in text and "lr:" in text


def check_state_dict_deterministic(entry):
    """torch's test_state_dict_deterministic: a copy loaded from the state dict steps the same,
    loading leaves the dict as it was, and both state dicts then agree."""
    for given in _inputs(entry):
        opt, weight, bias = _run(entry, given.kwargs, steps=10)
        w2, b2 = (Parameter(t.detach().clone()) for t in (weight, bias))
        other = entry.make([w2, b2], **_fresh(given.kwargs))
        saved = copy.deepcopy(opt.state_dict())
        loaded = copy.deepcopy(opt.state_dict())
        other.load_state_dict(loaded)
        torch.testing.assert_close(loaded, saved)  # loading did not change it
        for _ in range(10):
            opt.step(_closure(opt, weight, bias))
            other.step(_closure(other, w2, b2))
            _assert_same_params([weight, bias], [w2, b2], rtol=0, atol=0)
        torch.testing.assert_close(opt.state_dict(), other.state_dict())


def check_load_older_state_dict(entry):
    """torch's test_can_load_older_state_dict: without the flags added to torch over time and
    with a Python number as the step count, a state dict loads and steps the same."""
    for given in _inputs(entry):
        opt, weight, bias = _run(entry, given.kwargs, steps=5)
        old = copy.deepcopy(opt.state_dict())
        for group in old["param_groups"]:
            for flag in FLAGS:
                if flag not in ("maximize", "amsgrad") or not group.get(flag):
                    group.pop(flag, None)
        for state in old["state"].values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].item()
        w2, b2 = (Parameter(t.detach().clone()) for t in (weight, bias))
        other = entry.make([w2, b2], **_fresh(given.kwargs))
        other.load_state_dict(old)
        for _ in range(3):
            opt.step(_closure(opt, weight, bias))
            other.step(_closure(other, w2, b2))
        _assert_same_params([weight, bias], [w2, b2])


def check_save_load_weights_only(entry):
    """torch's test_save_load_equality_with_weights_only: torch.save / torch.load(weights_only)
    round trip, then the same steps."""
    for given in _inputs(entry):
        opt, weight, bias = _run(entry, given.kwargs, steps=5)
        buffer = io.BytesIO()
        torch.save(opt.state_dict(), buffer)
        buffer.seek(0)
        w2, b2 = (Parameter(t.detach().clone()) for t in (weight, bias))
        other = entry.make([w2, b2], **_fresh(given.kwargs))
        other.load_state_dict(torch.load(buffer, weights_only=True))
        for _ in range(3):
            opt.step(_closure(opt, weight, bias))
            other.step(_closure(other, w2, b2))
        _assert_same_params([weight, bias], [w2, b2], rtol=0, atol=0)


def _public(opt) -> dict[str, Any]:
    return {k: v for k, v in vars(opt).items() if not k.startswith("_")}


def _continue_equal(opt, copied, steps=3):
    """``copied`` (a deep copy or an unpickled ``opt``, with its own parameters) steps as
    ``opt`` does on the same gradients."""
    mine = [p for g in opt.param_groups for p in g["params"]]
    theirs = [p for g in copied.param_groups for p in g["params"]]
    _assert_same_params(mine, theirs, rtol=0, atol=0)
    for t in range(steps):
        for p, q in zip(mine, theirs, strict=True):
            p.grad = torch.full_like(p, math.nan) if t == 1 else torch.randn_like(p)
            q.grad = p.grad.clone()
        opt.step()
        copied.step()
        _assert_same_params(mine, theirs, rtol=0, atol=0, equal_nan=True)


def check_deepcopy(entry):
    """torch's test_deepcopy_copies_all_public_attrs, and the copy steps as the original
    (through a non-finite gradient too: AdamWHD's skipped count must survive)."""
    for given in _inputs(entry):
        opt, _, _ = _run(entry, given.kwargs, steps=3)
        copied = copy.deepcopy(opt)
        assert set(_public(copied)) == set(_public(opt))
        for k in ("skipped",):
            assert getattr(copied, k, None) == getattr(opt, k, None)
        _continue_equal(opt, copied)


def check_pickle(entry):
    """pickle round trip (as for multiprocessing): every attribute and the state kept."""
    for given in _inputs(entry):
        opt, _, _ = _run(entry, given.kwargs, steps=3)
        if hasattr(opt, "skipped"):
            opt.skipped = 3
        copied = pickle.loads(pickle.dumps(opt))
        assert set(_public(copied)) == set(_public(opt))
        assert getattr(copied, "skipped", None) == getattr(opt, "skipped", None)
        _continue_equal(opt, copied)


def check_hooks(entry):
    """torch's hook tests: step pre/post, state_dict pre/post and load_state_dict pre/post
    hooks all run, in order, and a post hook's change reaches the caller."""
    calls = []
    opt, weight, bias = _run(entry, {}, steps=1)
    opt.register_step_pre_hook(lambda o, a, k: calls.append("step_pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("step_post"))
    opt.register_state_dict_pre_hook(lambda o: calls.append("sd_pre"))

    def sd_post(o, sd):
        calls.append("sd_post")
        sd["marker"] = 1
        return sd

    opt.register_state_dict_post_hook(sd_post)
    opt.register_load_state_dict_pre_hook(lambda o, sd: calls.append("load_pre"))
    opt.register_load_state_dict_post_hook(lambda o: calls.append("load_post"))
    opt.step(_closure(opt, weight, bias))
    sd = opt.state_dict()
    assert sd["marker"] == 1
    opt.load_state_dict(sd)
    assert calls == ["step_pre", "step_post", "sd_pre", "sd_post", "load_pre", "load_post"]


def check_foreach_matches_forloop(entry):
    """torch's test_foreach_matches_forloop, for an entry that takes ``foreach``."""
    if entry.flags["foreach"] is not None:
        pytest.skip(f"{entry.name} takes no foreach")
    for given in _inputs(entry):
        _, *a = _run(entry, {**given.kwargs, "foreach": True}, steps=5)
        _, *b = _run(entry, {**given.kwargs, "foreach": False}, steps=5)
        _assert_same_params(a, b)


def check_mixed_dtypes(entry):
    """torch's test_mixed_device_dtype on CPU: float32 and float64 parameters in one optimizer
    step as each in its own."""
    torch.manual_seed(0)
    a32, a64 = Parameter(torch.randn(4, 3)), Parameter(torch.randn(3, dtype=torch.float64))
    b32, b64 = (Parameter(t.detach().clone()) for t in (a32, a64))
    mixed = entry.make([a32, a64], lr=1e-2)
    alone = [entry.make([b32], lr=1e-2), entry.make([b64], lr=1e-2)]
    for _ in range(5):
        g32, g64 = torch.randn(4, 3), torch.randn(3, dtype=torch.float64)
        a32.grad, a64.grad, b32.grad, b64.grad = g32, g64, g32.clone(), g64.clone()
        mixed.step()
        for o in alone:
            o.step()
    assert a32.dtype == torch.float32 and a64.dtype == torch.float64
    _assert_same_params([a32, a64], [b32, b64], rtol=0, atol=0)


def check_state_on_param_device_and_dtype(entry):
    """torch's test_non_empty_state and state placement: after a step every parameter has state,
    its tensors on the parameter's device and of its dtype (the step count excepted)."""
    opt, weight, bias = _run(entry, {}, steps=2, dtype=torch.float64)
    sd = opt.state_dict()
    assert len(sd["state"]) == 2
    for i, p in enumerate((weight, bias)):
        for key, value in sd["state"][i].items():
            if isinstance(value, torch.Tensor) and value.shape == p.shape:
                assert value.device == p.device and value.dtype == p.dtype, key


def check_matches_adamw_float64(entry):
    """Against torch.optim.AdamW in float64 where the rules coincide (for AdamWHD: rates that
    barely move, max_step 1e-12), every input without a tensor hyperparameter."""
    ours, theirs = entry.reference
    torch_entry = DROP_INS["torch.AdamW"]
    for given in _inputs(entry):
        if any(isinstance(v, torch.Tensor | tuple) for v in given.kwargs.values()):
            continue
        if "max_step" in given.kwargs:  # AdamWHD's own argument
            continue
        _, *a = _run(entry, {**given.kwargs, **ours}, steps=10, dtype=torch.float64)
        _, *b = _run(torch_entry, {**given.kwargs, **theirs}, steps=10, dtype=torch.float64)
        _assert_same_params(a, b, rtol=1e-9, atol=1e-12)


def check_torch_layout_both_ways(entry):
    """A torch.optim.AdamW state dict loads and the run goes on as AdamW's would (the entry
    starting its own extra state), and AdamW loads the entry's."""
    ours, _ = entry.reference
    torch_entry = DROP_INS["torch.AdamW"]
    for amsgrad in (False, True) if entry.flags["amsgrad"] is None else (False,):
        kw = {"weight_decay": 0.1, **({"amsgrad": True} if amsgrad else {})}
        adamw, weight, bias = _run(torch_entry, kw, steps=5, dtype=torch.float64)
        w2, b2 = (Parameter(t.detach().clone()) for t in (weight, bias))
        mine = entry.make([w2, b2], **kw, **ours)
        mine.load_state_dict(copy.deepcopy(adamw.state_dict()))
        for _ in range(5):
            adamw.step(_closure(adamw, weight, bias))
            mine.step(_closure(mine, w2, b2))
        _assert_same_params([weight, bias], [w2, b2], rtol=1e-9, atol=1e-12)
        # and back: AdamW continues from the entry's state
        w3, b3 = (Parameter(t.detach().clone()) for t in (w2, b2))
        back = torch.optim.AdamW([w3, b3], **kw)
        back.load_state_dict(copy.deepcopy(mine.state_dict()))
        for _ in range(5):
            mine.step(_closure(mine, w2, b2))
            back.step(_closure(back, w3, b3))
        _assert_same_params([w2, b2], [w3, b3], rtol=1e-9, atol=1e-12)


def check_capturable_matches_default(entry):
    """The device-side step (``capturable=True``: masks instead of host decisions) steps as
    the default, through a non-finite gradient too."""
    if "capturable" not in entry.stepped_flags:
        pytest.skip(f"{entry.name} does not step with capturable=True on CPU")
    for given in _inputs(entry):
        results = []
        for capturable in (False, True):
            opt, weight, bias = _run(entry, {**given.kwargs, "capturable": capturable}, steps=3)
            for t in range(3):
                opt.zero_grad()
                _loss(weight, bias).backward()
                if t == 1:
                    weight.grad[0, 0] = math.nan
                opt.step()
            results.append((opt, weight, bias))
        (a, *pa), (b, *pb) = results
        _assert_same_params(pa, pb, msg=given.desc)  # float32: Python vs tensor scalars
        assert getattr(a, "skipped", 0) == getattr(b, "skipped", 0)


def check_lr_zero(entry):
    """lr = 0 is allowed and leaves the parameters where they are (weight decay too)."""
    opt, weight, bias = _run(entry, {"lr": 0.0, "weight_decay": 0.1}, steps=0)
    before = [weight.detach().clone(), bias.detach().clone()]
    for _ in range(4):
        opt.step(_closure(opt, weight, bias))
    _assert_same_params([weight, bias], before, rtol=0, atol=0)


def check_flags(entry):
    """Each flag of torch's Adam family, set to True: accepted (and stepped where this machine
    can), or refused at construction with one line that names what is supported."""
    for flag in FLAGS:
        refusal = entry.flags[flag]
        weight, bias = _weight_bias()
        if refusal is not None:
            with pytest.raises(refusal) as err:
                entry.make([weight, bias], **{flag: True})
            message = str(err.value)
            assert "\n" not in message and flag in message, message
            continue
        opt = entry.make([weight, bias], **{flag: True})
        if flag in entry.stepped_flags:
            start = _closure(opt, weight, bias)().item()
            for _ in range(5):
                opt.step(_closure(opt, weight, bias))
            end = _closure(opt, weight, bias)().item()
            assert (end > start) if flag == "maximize" else (end < start), flag


def check_sparse_refused(entry):
    """A sparse gradient is refused with a RuntimeError (no entry here supports them)."""
    weight, bias = _weight_bias()
    opt = entry.make([weight, bias])
    weight.grad = torch.zeros_like(weight).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()


class _HostReads(TorchFunctionMode):
    """Records every read of a tensor's value on the host (what waits for an accelerator)."""

    READS = frozenset(
        {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy", "cpu"}
    )

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in self.READS:
            self.reads.append(name)
        return func(*args, **(kwargs or {}))


def check_no_host_sync(entry):
    """The step never reads a tensor's value on the host, through a non-finite gradient too:
    on an accelerator it never waits (the GPU check also runs it under CUDA's sync debug
    mode). With ``capturable`` where the entry takes it: on CPU without it, reading on the
    host costs no wait, and AdamWHD does so to step with Python scalars."""
    capturable = {"capturable": True} if "capturable" in entry.stepped_flags else {}
    for given in _inputs(entry):
        if any(isinstance(v, torch.Tensor | tuple) for v in given.kwargs.values()):
            continue  # a CPU tensor hyperparameter is read on the host, as torch does
        opt, weight, bias = _run(entry, {**given.kwargs, **capturable}, steps=2)
        for t in range(3):
            _loss(weight, bias).backward()
            if t == 1:
                weight.grad[0, 0] = math.inf
            with _HostReads() as spy:
                opt.step()
            opt.zero_grad()
            assert spy.reads == [], (given.desc, spy.reads)


def check_closure_returns_loss(entry):
    opt, weight, bias = _run(entry, {}, steps=0)
    closure = _closure(opt, weight, bias)
    expected = _loss(weight, bias).item()
    assert opt.step(closure).item() == expected
    assert opt.step() is None


def check_zero_rank_and_empty_parameters(entry):
    """pytorch_optimizer's generic checks: a 0-dim parameter trains, a parameter with no
    elements steps without error."""
    scalar = Parameter(torch.tensor(2.0))
    empty = Parameter(torch.zeros(0, 3))
    opt = entry.make([scalar, empty], lr=0.1)
    for _ in range(10):
        opt.zero_grad()
        (scalar**2 + empty.sum()).backward()
        opt.step()
    assert abs(scalar.item()) < 2.0 and empty.shape == (0, 3)


def check_frozen_layer_trains(entry):
    """pytorch_optimizer's test_no_gradients: with one layer frozen (no gradient ever), the rest
    trains and the frozen layer stays as it was."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    for p in model[0].parameters():
        p.requires_grad_(False)
    frozen = [p.clone() for p in model[0].parameters()]
    opt = entry.make(model.parameters(), lr=1e-2)
    x, y = torch.randn(32, 4), torch.randn(32, 1)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = (model(x) - y).pow(2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    _assert_same_params(list(model[0].parameters()), frozen, rtol=0, atol=0)


def check_bfloat16_trains(entry):
    """pytorch_optimizer's low-precision checks: bfloat16 parameters train, state in bfloat16."""
    weight, bias = _weight_bias(torch.bfloat16)
    opt = entry.make([weight, bias], lr=1e-2)
    start = _loss(weight, bias, torch.bfloat16).item()
    for _ in range(20):
        opt.step(_closure(opt, weight, bias))
    assert _loss(weight, bias, torch.bfloat16).item() < start
    assert weight.dtype == torch.bfloat16


CHECKS = {
    name.removeprefix("check_"): fn for name, fn in globals().items() if name.startswith("check_")
}


@pytest.mark.parametrize("check", list(CHECKS))
@pytest.mark.parametrize("entry", list(DROP_INS))
def test_battery(entry, check):
    drop_in = DROP_INS[entry]
    if check in drop_in.skips:
        pytest.skip(drop_in.skips[check])
    CHECKS[check](drop_in)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("entry", ["torch.AdamW", "AdamWHD"])
def test_cuda_step_never_waits_for_the_device_and_is_captured_in_a_graph(entry):
    """On CUDA (AdamW with capturable=True as the control): no host sync in a step, under CUDA's
    sync debug mode, through a non-finite gradient; a CUDA graph replays the step; parameters
    on CPU and CUDA in one optimizer step as each alone."""
    make = DROP_INS[entry].make
    kwargs = {"capturable": True, "foreach": True}
    weight, bias = (Parameter(t.cuda()) for t in _weight_bias())
    opt = make([weight, bias], **kwargs)
    for t in range(3):
        opt.zero_grad()
        _loss(weight, bias).backward()
        if t == 1:
            weight.grad[0, 0] = math.inf
        torch.cuda.set_sync_debug_mode("error")
        try:
            opt.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(weight).all()
    # graph capture of the step, replayed against eager steps of a twin
    w2, b2 = (Parameter(t.detach().clone()) for t in (weight, bias))
    twin = make([w2, b2], **kwargs)
    twin.load_state_dict(copy.deepcopy(opt.state_dict()))
    grads = [torch.randn_like(weight), torch.randn_like(bias)]
    weight.grad, bias.grad = (g.clone() for g in grads)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        opt.step()  # warm up on a side stream, as torch's capture tests do
    torch.cuda.current_stream().wait_stream(stream)
    w2.grad, b2.grad = (g.clone() for g in grads)
    twin.step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    for _ in range(3):
        graph.replay()
        twin.step()
    _assert_same_params([weight, bias], [w2, b2])
    # several devices in one group
    cpu, gpu = Parameter(torch.randn(3)), Parameter(torch.randn(4, device="cuda"))
    alone_cpu, alone_gpu = (Parameter(p.detach().clone()) for p in (cpu, gpu))
    both = make([cpu, gpu], foreach=True)
    alone = [make([alone_cpu], foreach=True), make([alone_gpu], foreach=True)]
    for _ in range(3):
        cpu.grad, gpu.grad = torch.randn(3), torch.randn(4, device="cuda")
        alone_cpu.grad, alone_gpu.grad = cpu.grad.clone(), gpu.grad.clone()
        both.step()
        for o in alone:
            o.step()
    _assert_same_params([cpu, gpu], [alone_cpu, alone_gpu])
