"""Population-based training (Jaderberg et al. 2017) with Ray Tune for
:mod:`selfmod.bench.practitioners`: AdamW members whose learning rate and weight decay are
perturbed or copied every ``steps / 5`` steps, scored on validation; the best member's
schedule of hyperparameters is then replayed from scratch on each published seed.

Each member runs in a Ray worker process; the members time-share the one core the driver is
pinned to (the workers inherit its affinity). Every checkpoint carries the member's
schedule so far, so a member that copies another inherits its history too. A checkpoint is
tensors (safetensors) and JSON, never a pickle: loading one runs no code.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
import time
from typing import Any, Protocol

import torch
from safetensors.torch import load_file, save_file

from selfmod.bench.training import LR_RANGE, WD_RANGE, Run, adamw, make_workload, train
from selfmod.bench.workloads import Workload
from selfmod.data import Stream

#: PBT's perturbation intervals per run
INTERVALS = 5


class PBTBudget(Protocol):
    """What :func:`pbt_search` reads of the benchmark's budget
    (:class:`selfmod.bench.practitioners.Budget`)."""

    @property
    def tuning_seed(self) -> int: ...
    @property
    def split(self) -> int: ...
    @property
    def pbt_members(self) -> int: ...


def save_member_state(
    folder: str, model: torch.nn.Module, opt: torch.optim.Optimizer, extra: dict[str, Any]
) -> None:
    """``folder/state.safetensors`` (the model's and the optimizer's tensors) and
    ``folder/state.json`` (the optimizer's other state, its param groups and ``extra``)."""
    tensors = {f"model.{k}": v.detach().contiguous() for k, v in model.state_dict().items()}
    opt_state = opt.state_dict()
    plain: dict[str, dict[str, Any]] = {}
    for idx, state in opt_state["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"opt.{idx}.{key}"] = value.detach().contiguous()
            else:
                plain.setdefault(str(idx), {})[key] = value
    save_file(tensors, os.path.join(folder, "state.safetensors"))
    meta = {"param_groups": opt_state["param_groups"], "opt_plain": plain, "extra": extra}
    with open(os.path.join(folder, "state.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f)


def load_member_state(
    folder: str, model: torch.nn.Module, opt: torch.optim.Optimizer
) -> dict[str, Any]:
    """Restore ``model`` and ``opt`` from :func:`save_member_state`'s files; returns ``extra``."""
    tensors = load_file(os.path.join(folder, "state.safetensors"))
    with open(os.path.join(folder, "state.json"), encoding="utf-8") as f:
        meta = json.load(f)
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("opt."):
            idx, key = name[4:].split(".", 1)
            state.setdefault(int(idx), {})[key] = value
    for idx, values in meta["opt_plain"].items():
        state.setdefault(int(idx), {}).update(values)
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    return meta["extra"]


def _member(config: dict[str, Any]) -> None:
    """One PBT member (a Ray Tune function trainable)."""
    from ray import tune

    torch.set_num_threads(1)
    work = make_workload(config["workload"], config["scale"], config["split"])
    interval = max(1, work.steps // INTERVALS)
    torch.manual_seed(config["seed"])
    model = work.model()
    opt = adamw(config["lr"], config["weight_decay"])(model.parameters())
    stream = Stream(config["seed"], len(work.train[1]))
    step, schedule = 0, []
    ckpt = tune.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = load_member_state(d, model, opt)
        step, schedule = state["step"], [tuple(s) for s in state["schedule"]]
        stream = Stream(config["seed"], len(work.train[1]), **state["stream"])
    for g in opt.param_groups:  # this member's (maybe perturbed) hyperparameters
        g["lr"], g["weight_decay"] = config["lr"], config["weight_decay"]
    schedule = [*schedule, (step, config["lr"], config["weight_decay"])]
    x, y = work.train
    while step < work.steps:
        end = min(work.steps, step + interval)
        model.train()
        for _ in range(step, end):
            idx = stream.next(work.batch)
            loss = work.loss(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        step = end
        val = work.evaluate(model, work.val)
        score = val if work.higher_is_better else -val
        if score != score:  # NaN
            score = -1e9
        pos = stream.position()
        with tempfile.TemporaryDirectory() as d:
            stream_at = {"epoch": pos["epoch"], "pos": pos["pos"]}
            save_member_state(
                d, model, opt, {"step": step, "schedule": schedule, "stream": stream_at}
            )
            tune.report(
                {"score": score, "step": step, "val": val, "schedule": schedule},
                checkpoint=tune.Checkpoint.from_directory(d),
            )


def pbt_search(work: Workload, budget: PBTBudget) -> tuple[dict[str, Any], float, int]:
    """``(chosen, seconds, steps)``: chosen holds the best member's ``schedule``, a list of
    ``(from step, lr, weight_decay)``; seconds include starting and stopping Ray."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    import ray
    from ray import tune
    from ray.tune.schedulers import PopulationBasedTraining

    start = time.perf_counter()
    random.seed(budget.tuning_seed)  # PBT's perturbations draw from Python's RNG
    members = budget.pbt_members
    ray.init(
        num_cpus=members,
        include_dashboard=False,
        object_store_memory=100 * 1024**2,
        log_to_driver=False,
        configure_logging=False,
        runtime_env={"env_vars": {"PYTHONPATH": os.environ.get("PYTHONPATH", "")}},
    )
    try:
        interval = max(1, work.steps // INTERVALS)
        space = {
            "lr": tune.loguniform(*LR_RANGE),
            "weight_decay": tune.loguniform(*WD_RANGE),
        }
        scheduler = PopulationBasedTraining(
            time_attr="step",
            perturbation_interval=interval,
            hyperparam_mutations=space,
            quantile_fraction=0.25,
        )
        fixed = {
            "workload": work.name,
            "scale": work.steps / make_workload(work.name).steps,
            "split": budget.split,
        }
        with tempfile.TemporaryDirectory() as storage:
            tuner = tune.Tuner(
                tune.with_resources(_member, {"cpu": 1}),
                param_space={**space, **fixed, "seed": budget.tuning_seed},
                tune_config=tune.TuneConfig(
                    scheduler=scheduler,
                    num_samples=members,
                    metric="score",
                    mode="max",
                    reuse_actors=True,
                    search_alg=tune.search.BasicVariantGenerator(random_state=budget.tuning_seed),
                ),
                run_config=tune.RunConfig(storage_path=storage, verbose=0, name="pbt"),
            )
            grid = tuner.fit()
            best = grid.get_best_result(metric="score", mode="max", scope="last")
            schedule = [tuple(s) for s in best.metrics["schedule"]]
    finally:
        ray.shutdown()
    seconds = time.perf_counter() - start
    steps = members * work.steps  # every member trains to the end; exploiting copies weights
    return {"schedule": schedule, "val": best.metrics["val"]}, seconds, steps


def replay(work: Workload, seed: int, schedule: list[tuple[int, float, float]]) -> Run:
    """Train from scratch on ``seed`` following ``schedule`` (piecewise constant)."""
    changes = {int(s): {"lr": lr, "weight_decay": wd} for s, lr, wd in schedule}
    _, lr0, wd0 = schedule[0]
    return train(work, seed, adamw(lr0, wd0), hparams=changes.get)
