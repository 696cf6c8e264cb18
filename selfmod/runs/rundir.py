"""What one can do to a run directory from outside a run: open or make one, read its config
and JSON files, verify its ledger, approve a pending change, roll back to a cycle.

Plain functions of explicit inputs. Bad input (a folder that is not a run directory, a damaged
file, an id that is not pending) is a :class:`RunDirError` or another
:class:`~selfmod.errors.SelfmodError`: one line that says what is wrong and what to do.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any, NamedTuple

from selfmod.errors import SelfmodError
from selfmod.files import DIR_MODE, atomic_write_text, read_bytes
from selfmod.runs.config import TrainConfig, saved_config
from selfmod.runs.ledger import Entry, Ledger
from selfmod.runs.lock import run_lock


class RunDirError(SelfmodError):
    """A run directory (or one of its files) that cannot be used as asked."""


# ----------------------------------------------------------------------------- opening

#: what selfmod keeps in a run directory: none of them may be a symbolic link
RUN_ENTRIES = (
    "config.json", "status.json", "final.json", "final.safetensors", "history.json",
    "summary.json", "report.html", "ledger.sqlite", "ledger.sqlite-journal",
    "ledger.sqlite-wal", "ledger.sqlite-shm", "scalars.csv", ".lock", "checkpoints",
    "tensorboard",
)  # fmt: skip
#: what only a run holds: a new run is never made in a folder that has one of them
RUN_HELD = ("config.json", "ledger.sqlite", "checkpoints")
#: folders of a run directory whose entries may not be symbolic links either
RUN_FOLDERS = ("checkpoints", "checkpoints/rolled-back", "tensorboard")


def resolved(run_dir: str | Path) -> Path:
    """``run_dir`` as an absolute path with every link resolved, once, when a command or a run
    takes it: what it reads and writes after that cannot be redirected by a link swapped in
    meanwhile (links inside the run are refused: :func:`check_links`)."""
    return Path(run_dir).expanduser().resolve()


def check_links(run_dir: str | Path) -> None:
    """Raise (one line) if a file or folder selfmod reads or writes in ``run_dir`` is a
    symbolic link: nothing is read or written outside a run directory through it."""
    run_dir = Path(run_dir)
    paths = [run_dir / name for name in RUN_ENTRIES]
    for sub in RUN_FOLDERS:
        folder = run_dir / sub
        if folder.is_dir() and not any(p.is_symlink() for p in (folder, folder.parent)):
            paths += list(folder.iterdir())
    for path in paths:
        if path.is_symlink():
            raise RunDirError(
                f"{path} is a symbolic link; a run directory's files must be its own: replace "
                "the link with the file itself or remove it"
            )


def new_run_dir(out: str | Path) -> Path:
    """A fresh ``out/train-YYYYmmdd-HHMMSS[-N]``, created here. The directory is claimed by
    ``mkdir`` itself (no check first), so runs started in the same second by other processes
    get distinct directories instead of failing with "File exists"."""
    stamp = time.strftime("train-%Y%m%d-%H%M%S")
    Path(out).mkdir(parents=True, exist_ok=True)
    run_dir, suffix = Path(out) / stamp, 1
    while True:
        try:
            run_dir.mkdir(mode=DIR_MODE)
            return run_dir
        except FileExistsError:
            run_dir, suffix = Path(out) / f"{stamp}-{suffix}", suffix + 1


def with_run_id(cfg: Any) -> Any:
    """``cfg`` with a fresh random ``run_id`` (a new run directory's identity)."""
    return cfg.model_copy(update={"run_id": uuid.uuid4().hex})


def open_run_dir(
    run_dir: str | Path | None, cfg: Any, resume: bool, *, by: str = "train", locked: bool = False
) -> tuple[Path, Any]:
    """``(run_dir, config)``: (``resume``) the saved config of ``run_dir`` (``cfg``, if given,
    must equal it but for ``run_id`` and ``out``), or a new run
    directory (default: under ``cfg.out``) with a fresh ``run_id``, its ledger's ``start``
    entry (who made the run, ``by``, and its config) and then its ``config.json``, written
    holding the run lock (``locked``: the caller holds it); a folder that already holds a run is
    refused, never reused."""
    if resume:
        if run_dir is None:
            raise RunDirError("resume needs a run directory")
        run_dir = resolved(run_dir)
        if not (run_dir / "config.json").is_file():
            raise RunDirError(f"{run_dir} has no config.json: nothing to resume")
        saved = config_of(run_dir)
        if cfg is not None:  # the caller's config (fit, SelfModifier) is the run's, or refused
            was, now = json.loads(saved.model_dump_json()), json.loads(cfg.model_dump_json())
            fields = sorted(
                k for k in was.keys() | now.keys()
                if k not in ("run_id", "out") and was.get(k) != now.get(k)
            )  # fmt: skip
            if fields:
                raise RunDirError(
                    f"resume continues the run in {run_dir} as its config.json records it; the "
                    f"config given differs in {', '.join(fields)} ({fields[0]}: "
                    f"{was.get(fields[0])!r:.60} recorded, {now.get(fields[0])!r:.60} given): "
                    "pass the run's config, or start a new run in a new run_dir"
                )
        return run_dir, saved
    run_dir = resolved(new_run_dir(cfg.out) if run_dir is None else run_dir)
    run_dir.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    check_links(run_dir)
    with contextlib.nullcontext() if locked else run_lock(run_dir):
        held = [n for n in RUN_HELD if (run_dir / n).exists()]
        if held:  # never prune, resume or overwrite another run's files
            raise RunDirError(
                f"{run_dir} already holds a run ({held[0]}); resume it (resume=True, selfmod "
                "resume) or give a new or empty run_dir"
            )
        cfg = with_run_id(cfg)
        with Ledger(run_dir / "ledger.sqlite") as ledger:  # bound to the chain, keyed or not
            record = json.loads(cfg.model_dump_json())
            ledger.append(
                "event", cycle=0, step=0, decision="start", reason=f"run started by {by}",
                payload={"by": by, "config": record},
            )  # fmt: skip
        atomic_write_text(run_dir / "config.json", cfg.model_dump_json(indent=1))
    return run_dir, cfg


def start_run(cfg: Any) -> tuple[Path, Any, bool]:
    """``(run_dir, config, resume)`` of ``selfmod train``: a new run directory with its
    config.json; under ``torchrun --max-restarts``, a restarted job's own run directory (named
    in ``out/.torchrun-<rdzv id>``), to resume."""
    job = os.environ.get("TORCHELASTIC_RUN_ID")
    marker = Path(cfg.out) / f".torchrun-{job}" if job else None
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
    if marker is not None and restarted and marker.is_file():
        run_dir = Path(marker.read_text().strip())
        return run_dir, config_of(run_dir), True
    run_dir, cfg = open_run_dir(None, cfg, resume=False)
    if marker is not None:
        atomic_write_text(marker, f"{run_dir}\n")
    return run_dir, cfg, False


def write_status(run_dir: Path, state: str, step: int) -> None:
    """``status.json``: what the run is doing (running, interrupted, complete, rolled back)."""
    atomic_write_text(run_dir / "status.json", json.dumps({"state": state, "step": step}))


# ----------------------------------------------------------------------------- reading


def config_of(run_dir: str | Path) -> TrainConfig:  # type: ignore[valid-type]
    """The config of the run in ``run_dir`` (its ``config.json``)."""
    path = Path(run_dir) / "config.json"
    check_links(run_dir)
    if not path.is_file():
        raise RunDirError(f"DIR must be a run directory with config.json (got {str(run_dir)!r})")
    values = json_file(path)
    if not isinstance(values, dict):
        raise RunDirError(f"{path} must hold a JSON object of config fields (got {values!r:.40})")
    return saved_config(values)


def json_file(path: Path) -> Any:
    """The JSON value in ``path`` (never through a symlink), or one line saying why it cannot
    be read."""
    try:
        return json.loads(read_bytes(path).decode("utf-8"))
    except OSError as err:
        raise RunDirError(f"{path} is unreadable: {err.strerror}") from None
    except UnicodeDecodeError:
        raise RunDirError(f"{path} is not UTF-8 text; restore it from a copy") from None
    except ValueError as err:
        raise RunDirError(f"{path} is not valid JSON ({err}); restore it from a copy") from None


def completed(run_dir: Path, cfg: Any) -> int | None:
    """The final step of a finished run in ``run_dir``, else ``None``: ``status.json`` says
    complete, ``final.json`` is at ``cfg.steps`` and names the sha256 of ``final.safetensors``,
    and the ledger's last entry (its chain verified) is the run's ``complete`` entry for that
    step and file. A forged claim (a killed run's ``status.json``, a ``final.json`` of wrong
    types, final weights that are not the run's) is not completion: the run resumes."""
    try:
        final = json.loads(read_bytes(run_dir / "final.json"))
        state = json.loads(read_bytes(run_dir / "status.json"))["state"]
        step, sha = final["step"], final["sha256"]
        done = state == "complete" and is_int(step) and step >= cfg.steps and isinstance(sha, str)
        weights = read_bytes(run_dir / "final.safetensors") if done else b""
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not done or hashlib.sha256(weights).hexdigest() != sha:
        return None
    with Ledger(run_dir / "ledger.sqlite", create=False) as ledger:
        ledger.verify()
        last = ledger.entries()[-1:]
    end = last[0] if last else None
    ok = end is not None and (end.kind, end.decision, end.step) == ("event", "complete", step)
    return step if ok and end.payload.get("final_sha256") == sha else None  # type: ignore[union-attr]


def start_entry(ledger: Ledger) -> Entry | None:
    """The ledger's ``start`` entry (who made the run, its config; ``None`` in a run made
    before runs recorded one)."""
    return next((e for e in ledger.entries("event") if e.decision == "start"), None)


def superseded(entries: list[Entry]) -> set[int]:
    """The seqs of ``entries`` that a resume went back on: those after the checkpoint it
    resumed from and before the resume entry itself (a proposal made there was never made in
    the run that goes on)."""
    spans = [(e.payload.get("from_seq"), e.seq) for e in entries if e.kind == "resume"]
    spans = [(a, b) for a, b in spans if is_int(a)]
    return {e.seq for e in entries if any(a <= e.seq < b for a, b in spans)}


def cli_config(run_dir: Path) -> TrainConfig:  # type: ignore[valid-type]
    """:func:`config_of` a run that ``selfmod resume`` can continue: one that ``fit`` or
    ``SelfModifier`` made runs its caller's model, data and loss, which config.json cannot
    name, and is refused in one line saying how to continue it."""
    cfg = config_of(run_dir)
    start = None
    if (run_dir / "ledger.sqlite").is_file():
        with Ledger(run_dir / "ledger.sqlite", create=False) as ledger:
            start = start_entry(ledger)
    by = start.payload.get("by", "train") if start is not None else "train"
    if by != "train":
        raise RunDirError(
            f"{run_dir} is a run of {by}() on its caller's model, data and loss, which "
            f"config.json cannot name; continue it in Python: {by}(..., "
            f"run_dir={str(run_dir)!r}, resume=True)"
        )
    return cfg


def ledger_rows(run_dir: Path) -> list[dict]:
    """The ledger's entries but the per-cycle ones, as dicts, its hash chain verified."""
    with Ledger(run_dir / "ledger.sqlite", create=False) as ledger:
        ledger.verify()
        return [e.__dict__ for e in ledger.entries() if e.kind != "cycle"]


class Log(NamedTuple):
    """The ledger of a run directory, verified: what ``selfmod log`` shows."""

    n: int  # entries, every one verified
    rows: list[Any]  # the ledger entries but the per-cycle ones
    keyed: bool  # whether the chain is an HMAC (else anyone can recompute it)


def verified_log(run_dir: Path) -> Log:
    """The ledger of ``run_dir``, its hash chain verified; against the head a finished run
    recorded in ``final.json`` too, so that a cut tail shows."""
    config_of(run_dir)
    final = run_dir / "final.json"
    head = None
    if final.is_file():
        recorded = json_file(final)
        claimed = recorded.get("ledger_head") if isinstance(recorded, dict) else None
        if not is_head(claimed):
            raise RunDirError(
                f"{final}: ledger_head must be [seq, hash] (got {claimed!r:.40}); the file is "
                "forged or damaged: selfmod resume rewrites it"
            )
        head = tuple(claimed)
    with Ledger(run_dir / "ledger.sqlite", create=False) as ledger:
        n = ledger.verify(head)  # type: ignore[arg-type]
        rows = [e for e in ledger.entries() if e.kind != "cycle"]
        return Log(n, rows, ledger.keyed)


def write_run_report(run_dir: Path, x: str = "step") -> Path:
    """(Re)write ``run_dir/report.html`` from the run's history and ledger; returns its path."""
    from selfmod.runs.report import write_report

    config_of(run_dir)
    with run_lock(run_dir):
        path = run_dir / "history.json"
        if not path.is_file():
            raise RunDirError(f"{path} does not exist; finish the run first (selfmod resume)")
        history = json_file(path)
        if not isinstance(history, dict):
            raise RunDirError(f"{path} must hold a JSON object")
        rows = ledger_rows(run_dir)
        try:
            return write_report(run_dir, history, rows, x=x)
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as err:
            raise RunDirError(
                f"{path} is not a history selfmod train writes "
                f"({type(err).__name__}: {err}); rerun selfmod resume to rewrite it"
            ) from None


# ----------------------------------------------------------------------------- changing


def approve(run_dir: Path, id_: int) -> None:
    """Approve pending change ``id_`` of a manual-approval run (an ``approval`` ledger entry
    naming the proposal and the cycle it was verified for; the run applies it at its next
    cycle unless it has expired by then). A change a resume went back on, or one of a finished
    run, cannot be approved: nothing would apply it."""
    cfg = config_of(run_dir)
    with run_lock(run_dir):
        if (step := completed(run_dir, cfg)) is not None:
            raise RunDirError(
                f"the run in {run_dir} is complete (step {step}): no later cycle applies change "
                f"{id_}; start a new run to try it"
            )
        with Ledger(run_dir / "ledger.sqlite", create=False) as ledger:
            ledger.verify()
            entries = ledger.entries()
            gone = superseded(entries)
            proposals = [e for e in entries if e.kind == "proposal"]
            if any(e.seq == id_ and e.decision == "pending" for e in proposals) and id_ in gone:
                raise RunDirError(
                    f"change {id_} was superseded by a resume (the run went back to before it "
                    "was proposed); approve the change the resumed run proposes (selfmod log)"
                )
            pending = {e.seq: e for e in proposals if e.decision == "pending" and e.seq not in gone}
            if id_ not in pending:
                ids = ", ".join(map(str, sorted(pending))) or "none"
                raise RunDirError(
                    f"ID must be a pending change of {run_dir} (got {id_}); pending: {ids}"
                )
            if any(e.payload.get("proposal") == id_ for e in entries if e.kind == "approval"):
                raise RunDirError(f"change {id_} is already approved")
            done = {
                e.payload.get("change", {}).get("proposal"): e
                for e in proposals
                if e.decision in ("applied", "expired") and e.seq not in gone
            }
            if id_ in done:
                e = done[id_]
                raise RunDirError(f"change {id_} was {e.decision} at cycle {e.cycle}: {e.reason}")
            e = pending[id_]
            kept, cycle = newest_head(run_dir, cfg)
            if cycle - e.cycle - 1 > cfg.approval_expiry:  # the next cycle expires it at once
                raise RunDirError(
                    f"change {id_} was expired at cycle {cycle}, where the run goes on: proposal "
                    f"{id_} from cycle {e.cycle} is older than approval_expiry "
                    f"{cfg.approval_expiry} cycles"
                )
            if e.seq > kept:
                raise RunDirError(
                    f"change {id_} was proposed after the newest checkpoint (ledger entry "
                    f"{kept}): a resume goes back to before it and proposes again; resume, and "
                    "approve the change it proposes once a later checkpoint is written"
                )
            ledger.append(
                "approval", cycle=e.cycle, step=e.step, decision="approved",
                reason=f"change {id_} approved", payload={"proposal": id_, "cycle": e.cycle},
            )  # fmt: skip


def newest_head(run_dir: Path, cfg: Any) -> tuple[int, int]:
    """``(ledger entry, cycle)`` the newest complete checkpoint recorded: where a resume goes
    back to (entries after it are superseded); a run without one: every entry, cycle 0."""
    from selfmod.checkpoint import CheckpointError, load_latest

    try:
        meta = load_latest(run_dir, run_id=cfg.run_id)[1]["meta"]
    except CheckpointError:
        return sys.maxsize, 0
    head, cycle = meta.get("ledger_head"), meta.get("cycle")
    return (head[0] if is_head(head) else sys.maxsize), (cycle if is_int(cycle) else 0)


def rollback(run_dir: Path, to: int) -> int:
    """Go back to the checkpoint taken at the start of cycle ``to``: move the checkpoints of
    later cycles aside (within the checkpoints folder) and return the target step.

    Every kept checkpoint and the ledger (against the head each checkpoint recorded) are
    verified before anything moves."""
    from selfmod.checkpoint import FOLDER, CheckpointError, list_checkpoints, load_checkpoint

    config_of(run_dir)
    with run_lock(run_dir):
        kept: dict[int, tuple[Path, dict[str, Any]]] = {}
        for path in list_checkpoints(run_dir):
            _, manifest = load_checkpoint(path)  # every manifest verified before anything moves
            cycle, head = manifest["meta"].get("cycle"), manifest["meta"].get("ledger_head")
            if not isinstance(cycle, int) or isinstance(cycle, bool):
                raise CheckpointError(
                    f"checkpoint {path.name}: meta.cycle is missing or not an int"
                )
            if not is_head(head):
                raise CheckpointError(f"checkpoint {path.name}: meta.ledger_head is missing")
            kept[cycle] = (path, manifest)
        if to not in kept:
            cycles = ", ".join(map(str, sorted(kept))) or "none"
            raise RunDirError(
                f"--to must be a cycle with a kept checkpoint (got {to}); kept: {cycles}"
            )
        with Ledger(run_dir / "ledger.sqlite", create=False) as ledger:
            ledger.verify()
            for _, manifest in kept.values():  # the target's head, and every later one's
                ledger.verify(tuple(manifest["meta"]["ledger_head"]))
        folder = run_dir / FOLDER
        aside = folder / "rolled-back"
        if aside.is_symlink() or (aside.exists() and not aside.is_dir()):
            raise RunDirError(f"{aside} must be a folder, not a link or file; remove it")
        aside.mkdir(exist_ok=True)
        target = kept[to][1]["step"]
        for cycle, (path, manifest) in kept.items():
            if cycle > to:  # the manifest first: a checkpoint without it is simply incomplete
                for f in (path, path.parent / manifest["file"]):
                    f.replace(aside / f.name)
        for name in ("final.safetensors", "final.json"):
            (run_dir / name).unlink(missing_ok=True)
        write_status(run_dir, "rolled back", target)
        with Ledger(run_dir / "ledger.sqlite", create=False) as ledger:
            ledger.append(
                "rollback",
                cycle=to,
                step=target,
                decision="rollback",
                reason=f"manual rollback to cycle {to} (step {target})",
                payload={"modifier": "user", "to_cycle": to},
            )
        return target


def is_int(value: Any) -> bool:
    """An ``int`` that is no ``bool``."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_head(head: Any) -> bool:
    """``[seq, hash]`` as a checkpoint manifest records the ledger head."""
    return (
        isinstance(head, list)
        and len(head) == 2
        and isinstance(head[0], int)
        and not isinstance(head[0], bool)
        and isinstance(head[1], str)
    )
