"""The run directory's side of a self-modifying run: a :class:`~selfmod.introspect.Recorder`
that writes every decision to the hash-chained ledger, checkpoints the run (safetensors plus a
JSON manifest, atomically), reads manual approvals, and resumes a run from its newest complete
checkpoint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from selfmod.checkpoint import CheckpointError, load_latest, save_checkpoint
from selfmod.introspect.events import Recorder, RunView
from selfmod.introspect.loop import Loop
from selfmod.runs.ledger import Ledger
from selfmod.runs.logs import Logs
from selfmod.runs.rundir import is_head


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
            self.logs.log(run.step, row, run.config.steps)

    def checkpoint(self, run: RunView) -> None:
        tensors, meta = run.checkpoint()
        meta["ledger_head"] = list(self.ledger.head())
        if (record := config_record(run.config)) is not None:  # what a resume must run under
            meta["config"] = record
        save_checkpoint(self.run_dir, run.step, tensors, meta, keep=self.keep, run_id=self.run_id)

    def pending(self, run: RunView) -> list[tuple[int, int, dict[str, Any], bool]]:
        approvals = {e.payload.get("proposal") for e in self.ledger.entries("approval")}
        return [
            (e.seq, e.cycle, e.payload["change"], e.seq in approvals)
            for e in self.ledger.entries("proposal")
            if e.decision == "pending"
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
        try:  # a forged or partial manifest: a missing field, a wrong type or tensor shape
            run.restore(tensors, meta)
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
