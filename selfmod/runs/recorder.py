"""The run directory's side of a self-modifying run: a :class:`~selfmod.introspect.Recorder`
that writes every decision to the hash-chained ledger, checkpoints the run (safetensors plus a
JSON manifest, atomically), reads manual approvals, and resumes a run from its newest complete
checkpoint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import Tensor
from torch.utils import _pytree as pytree

from selfmod.checkpoint import CheckpointError, load_latest, save_checkpoint
from selfmod.introspect.events import Recorder, RunView
from selfmod.introspect.loop import Loop
from selfmod.runs.fingerprint import fingerprint
from selfmod.runs.ledger import Ledger
from selfmod.runs.logs import Logs
from selfmod.runs.rundir import is_head, start_entry, superseded


class RunRecorder(Recorder):
    """Ledger and checkpoints in ``run_dir``; keeps the last ``keep`` checkpoints."""

    def __init__(
        self,
        run_dir: str | Path,
        keep: int = 3,
        run_id: str | None = None,
        logs: Logs | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        for tmp in self.run_dir.glob(".*.tmp"):  # a write a kill interrupted (never read)
            tmp.unlink(missing_ok=True)
        self.ledger = Ledger(self.run_dir / "ledger.sqlite")
        self.keep, self.run_id = keep, run_id or None
        self.logs = logs  # CSV, TensorBoard and console lines (the CLI's runs)
        self.data: str | None = None  # the run's data fingerprint, once :meth:`start` ran

    def start(self, run: Loop) -> None:
        """Bind the run to its data and config, or refuse another: the ledger's ``start``
        entry records the config (:func:`~selfmod.runs.rundir.open_run_dir`) and a ``data``
        entry the data's fingerprint (:func:`~selfmod.runs.fingerprint.fingerprint`), both in
        the hash chain (keyed where a key is set); a run started again or resumed on other
        data or under another config is refused in one line naming the field."""
        self.ledger.verify()
        start = start_entry(self.ledger)
        if start is not None:
            check_config(start.payload.get("config"), run.config, "the ledger's start entry")
        recorded = next((e for e in self.ledger.entries("event") if e.decision == "data"), None)
        self.data = fingerprint(run.sources, like=recorded and recorded.payload.get("data"))
        if recorded is None:
            self.ledger.append(
                "event", cycle=run.cycle, step=run.step, decision="data",
                reason="the run's data fingerprint", payload={"data": self.data},
            )  # fmt: skip
        else:
            check_data(recorded.payload.get("data"), self.data, "the ledger's data entry")

    def close(self) -> None:
        self.ledger.close()
        if self.logs is not None:
            self.logs.close()

    def record(
        self, run: RunView, kind: str, decision: str, reason: str, payload: dict[str, Any]
    ) -> int | None:
        e = self.ledger.append(
            kind, cycle=run.cycle, step=run.step, decision=decision, reason=reason, payload=payload
        )
        if self.logs is not None and kind in ("proposal", "rollback"):
            self.logs.decision(run.cycle, run.step, decision, reason, payload)
        return e.seq

    def log(self, run: RunView, row: dict[str, Any]) -> None:
        if self.logs is not None:
            self.logs.log(row["step"], row, run.config.steps)  # a race's rows: after it

    def checkpoint(self, run: RunView) -> None:
        tensors, meta = run.checkpoint()
        meta["ledger_head"] = list(self.ledger.head())
        if (record := config_record(run.config)) is not None:  # what a resume must run under
            meta["config"] = record
        if self.data is not None:
            meta["data"] = self.data
        save_checkpoint(self.run_dir, run.step, tensors, meta, keep=self.keep, run_id=self.run_id)

    def pending(self, run: RunView) -> list[tuple[int, int, dict[str, Any], bool]]:
        """The pending changes of the run that goes on (not those of a segment a resume went
        back on), each approved or not: an approval counts for the proposal and the cycle it
        names."""
        entries = self.ledger.entries()
        gone = superseded(entries)
        approvals = {
            (e.payload.get("proposal"), e.payload.get("cycle", e.cycle))
            for e in entries
            if e.kind == "approval"
        }
        return [
            (e.seq, e.cycle, e.payload["change"], (e.seq, e.cycle) in approvals)
            for e in entries
            if e.kind == "proposal" and e.decision == "pending" and e.seq not in gone
        ]

    def resume(self, run: Loop, at_most: int | None = None) -> None:
        """Restore ``run`` from the newest complete checkpoint (``step <= at_most``); the
        ledger chain is verified against the head the checkpoint recorded."""
        tensors, manifest = load_latest(self.run_dir, at_most, run_id=self.run_id)
        meta = manifest["meta"]
        name = f"checkpoint ckpt-{manifest['step']:08d}.json"
        if not is_head(meta.get("ledger_head")):
            raise CheckpointError(f"{name}: meta.ledger_head is missing or not [seq, hash]")
        self.ledger.verify(tuple(meta["ledger_head"]))
        check_config(meta.get("config"), run.config, name)
        if "data" in meta and self.data is not None:
            check_data(meta["data"], self.data, name)
        try:  # a forged or partial manifest: a missing field, a wrong type or tensor shape
            run.restore(tensors, meta)
            for state in (run.state, run.good):
                check_shapes(state.opt_state, run.opt.init(state.params), "optimizer state")
            ints = ("step", "cycle", "divergences", "cycled_at", "source_id")
            bad = [k for k in ints if not _is_int(getattr(run.counters, k))]
            if bad or run.step != manifest["step"]:
                raise TypeError(f"counters {bad or ['step']} are not the step's integers")
            for state in (run.state, run.good):  # the model runs on what was restored
                run.problem.predict(state.params, state.buffers, run.example)
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as err:
            why = str(err).splitlines()[0] if str(err) else ""
            raise CheckpointError(
                f"{name} does not hold a run selfmod can continue ({type(err).__name__}: "
                f"{why:.200}); its manifest is forged or damaged: selfmod rollback to an "
                "earlier cycle or start the run again"
            ) from None
        seq = meta["ledger_head"][0]
        superseded = self.ledger.head()[0] - seq
        run.event(
            "resume",
            "resume",
            f"resumed from checkpoint at step {run.step}; the {superseded} entries "
            f"after entry {seq} are superseded",
            {"from_seq": seq + 1},
        )


def check_shapes(restored: Any, template: Any, what: str) -> None:
    """``ValueError`` unless ``restored`` has ``template``'s structure and, for tensors keyed
    by a parameter's name (Adam's moments, a momentum), its shapes: a per-parameter state of
    another shape would fail, or broadcast, steps later. Unkeyed state (a learned optimizer's
    memory across tensors, sized as it was when saved) keeps its own shape."""
    got, _ = pytree.tree_flatten_with_path(restored)
    want, _ = pytree.tree_flatten_with_path(template)
    shapes = lambda leaves: [  # noqa: E731
        (pytree.keystr(p), tuple(v.shape) if isinstance(v, Tensor) else None) for p, v in leaves
    ]
    for (name, a), (_, b) in zip(shapes(got), shapes(want), strict=False):
        if a != b and ("['" in name or '["' in name):  # per parameter: ...['name']
            raise ValueError(f"{what} {name} has shape {a}, the run's is {b}")
    if len(got) != len(want):
        raise ValueError(f"{what} has {len(got)} entries, the run's {len(want)}")


def check_data(recorded: Any, now: str, name: str) -> None:
    """One line naming ``data`` unless ``now`` is the data fingerprint ``name`` recorded."""
    if recorded != now:
        raise CheckpointError(
            f"the data differs from the data {name} recorded (data: {recorded!s:.23} then, "
            f"{now:.23} now: other values, rows, shapes or dtypes); pass the run's own data, or "
            "start a new run"
        )


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


#: fields a resume may change: where new runs go, not what this one computes (the run's id is
#: checked against each manifest's own, see :func:`selfmod.checkpoint.load_checkpoint`)
RESUME_MAY_CHANGE = frozenset({"out", "run_id"})


def config_record(cfg: Any) -> dict[str, Any] | None:
    """``cfg``'s fields as JSON values: what a checkpoint records of the run's config
    (``None`` for a config that is no pydantic model)."""
    dump = getattr(cfg, "model_dump_json", None)
    return json.loads(dump()) if callable(dump) else None


def check_config(recorded: Any, cfg: Any, name: str) -> None:
    """One line naming the fields unless ``cfg`` is the config the checkpoint was written
    under (a checkpoint from before configs were recorded is not checked)."""
    now = config_record(cfg)
    if not isinstance(recorded, dict) or now is None:
        return
    fields = sorted(
        k for k in recorded.keys() | now.keys()
        if k not in RESUME_MAY_CHANGE and recorded.get(k, _MISSING) != now.get(k, _MISSING)
    )  # fmt: skip
    if fields:
        first = fields[0]
        was = recorded.get(first, "absent")
        raise CheckpointError(
            f"config.json differs from the config {name} was written under in "
            f"{', '.join(fields)} ({first}: {was!r:.60} then, {now.get(first, 'absent')!r:.60} "
            "now); restore config.json, or start a new run with the new values"
        )


_MISSING = object()
