"""What it costs to run a module at given tensors: ``torch.func.functional_call`` against
``selfmod.models.FunctionalModel`` (the loop's and every estimator's way in: a plain
``nn.Sequential`` as direct functional calls, any other module through its own tensor slots,
:class:`selfmod.models.TensorSlots`), on the development panel's models that are no plain
``nn.Sequential`` (MNIST's CNN with BatchNorm, pylm's Transformer, seqdigits' GRU), one
training batch each, training mode, BatchNorm statistics updated on copies.

    python benchmarks/forward_call.py              # 300 calls of each, interleaved
    python benchmarks/forward_call.py --calls 50

One process, one thread; the calls take turns (their order rotated every round), so drifts in
the machine's speed hit all alike. Prints and writes ``benchmarks/results/forward_call.md``:
median microseconds per forward and ``FunctionalModel``'s ratio to each peer.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from torch.func import functional_call

from selfmod.bench.training import make_workload
from selfmod.files import atomic_write_text
from selfmod.models import FunctionalModel

WORKLOADS = ("mnist", "pylm", "seqdigits")
OUT = Path(__file__).parent / "results" / "forward_call.md"


def timings(name: str, calls: int) -> tuple[float, float, float]:
    """Median seconds of one forward of ``name``'s model at its own tensors by
    ``functional_call`` (the module already in training mode, buffers cloned as the loop
    clones them), by the same with every submodule's mode set and restored around the call
    (``FunctionalModel`` before its tensor slots), and by ``FunctionalModel``; the outputs are
    checked equal bit for bit first."""
    work = make_workload(name, 1.0, 1)
    model = work.model().train()
    x = work.train[0][: work.batch]
    fm = FunctionalModel(model)
    params, buffers = fm.init()

    def torch_call() -> torch.Tensor:
        clones = {k: v.clone() for k, v in buffers.items()}
        return functional_call(model, {**params, **clones}, (x,))

    def torch_call_in_modes() -> torch.Tensor:
        flags = [(m, m.training) for m in model.modules()]
        model.train(True)
        try:
            return torch_call()
        finally:
            for m, flag in flags:
                m.training = flag

    def selfmod_call() -> torch.Tensor:
        return fm(params, buffers, x, train=True, update_buffers=True)[0]

    calls_of = {"torch": torch_call, "modes": torch_call_in_modes, "selfmod": selfmod_call}
    if not all(torch.equal(torch_call(), c()) for c in calls_of.values()):
        raise SystemExit(f"{name}: the calls disagree")
    seconds: dict[str, list[float]] = {key: [] for key in calls_of}
    order = list(calls_of.items())
    for r in range(calls):
        for key, call in order[r % 3 :] + order[: r % 3]:
            start = time.perf_counter()
            call()
            seconds[key].append(time.perf_counter() - start)
    return tuple(statistics.median(seconds[key]) for key in calls_of)  # type: ignore[return-value]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=300, help="forwards of each, interleaved")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    torch.set_num_threads(1)
    lines = [
        "# Running a module at given tensors: `functional_call` against `FunctionalModel`",
        "",
        f"Command: `python benchmarks/forward_call.py --calls {args.calls}`. One process, one "
        "thread, the calls interleaved; median microseconds per forward (training mode, "
        "BatchNorm statistics updated on copies); outputs equal bit for bit.",
        "",
        "| model | `functional_call` us | with the modes set (before) us | `FunctionalModel` us "
        "| ratio to each |",
        "|---|---:|---:|---:|---|",
    ]
    for name in WORKLOADS:
        a, m, b = timings(name, args.calls)
        us = " | ".join(f"{1e6 * t:.0f}" for t in (a, m, b))
        row = f"| {name} | {us} | {b / a:.2f}x, {b / m:.2f}x |"
        print(row, flush=True)
        lines.append(row)
    atomic_write_text(args.out, "\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
