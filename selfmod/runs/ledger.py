"""The run ledger: an append-only SQLite table of every cycle, proposal, decision and event,
hash-chained so that editing, inserting or deleting a row is detected.

Entry ``i`` stores ``hash_i = sha256(hash_{i-1} || canonical_json(fields_i))`` with
``hash_0 = sha256("selfmod-ledger")``; :meth:`Ledger.verify` recomputes the chain and names the
first entry that does not match. Checkpoint manifests record the head ``(seq, hash)``, so a
truncated tail is detected too. Entries are never updated or deleted: a resumed run appends a
``resume`` entry saying which entries it supersedes.

References: Haber & Stornetta 1991, "How to time-stamp a digital document" (hash chains).
"""

from __future__ import annotations

import hashlib
import json
import math
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from selfmod.errors import SelfmodError

GENESIS = hashlib.sha256(b"selfmod-ledger").hexdigest()

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    seq INTEGER PRIMARY KEY,
    cycle INTEGER NOT NULL,
    step INTEGER NOT NULL,
    kind TEXT NOT NULL,
    decision TEXT NOT NULL,
    reason TEXT NOT NULL,
    payload TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL
)
"""


class LedgerTamperedError(SelfmodError):
    """A ledger row does not match its hash chain (edited, inserted or removed)."""


@dataclass(frozen=True)
class Entry:
    """One ledger row. ``kind``: cycle | proposal | rollback | approval | resume | event."""

    seq: int
    cycle: int
    step: int
    kind: str
    decision: str
    reason: str
    payload: dict[str, Any] = field(default_factory=dict)
    prev_hash: str = ""
    hash: str = ""


def _clean(x: Any) -> Any:
    """JSON-safe: non-finite floats become strings so the canonical form is well defined."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_clean(v) for v in x]
    return x


def _digest(
    prev: str, seq: int, cycle: int, step: int, kind: str, decision: str, reason: str, payload: str
) -> str:
    body = json.dumps([seq, cycle, step, kind, decision, reason, payload], separators=(",", ":"))
    return hashlib.sha256((prev + body).encode("utf-8")).hexdigest()


class Ledger:
    """Append-only, hash-chained SQLite ledger at ``path`` (created if missing).

    Each :meth:`append` is one ``BEGIN IMMEDIATE`` transaction with ``synchronous=FULL``, so
    several processes (a run and ``selfmod approve``) can append safely and a crash loses at
    most the entry being written.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def append(
        self,
        kind: str,
        *,
        cycle: int,
        step: int,
        decision: str = "",
        reason: str = "",
        payload: dict[str, Any] | None = None,
    ) -> Entry:
        text = json.dumps(_clean(payload or {}), sort_keys=True, separators=(",", ":"))
        self._db.execute("BEGIN IMMEDIATE")
        try:
            row = self._db.execute("SELECT seq, hash FROM entries ORDER BY seq DESC LIMIT 1")
            last = row.fetchone()
            seq, prev = (last[0] + 1, last[1]) if last else (1, GENESIS)
            h = _digest(prev, seq, cycle, step, kind, decision, reason, text)
            self._db.execute(
                "INSERT INTO entries VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (seq, cycle, step, kind, decision, reason, text, prev, h),
            )
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        return Entry(seq, cycle, step, kind, decision, reason, json.loads(text), prev, h)

    def entries(self, kind: str | None = None) -> list[Entry]:
        query = "SELECT * FROM entries" + (" WHERE kind = ?" if kind else "") + " ORDER BY seq"
        rows = self._db.execute(query, (kind,) if kind else ()).fetchall()
        return [
            Entry(r[0], r[1], r[2], r[3], r[4], r[5], json.loads(r[6]), r[7], r[8]) for r in rows
        ]

    def head(self) -> tuple[int, str]:
        """``(seq, hash)`` of the last entry (``(0, GENESIS)`` when empty)."""
        last = self._db.execute("SELECT seq, hash FROM entries ORDER BY seq DESC LIMIT 1")
        row = last.fetchone()
        return (row[0], row[1]) if row else (0, GENESIS)

    def verify(self, head: tuple[int, str] | None = None) -> int:
        """Recompute the chain; return the number of entries or raise
        :class:`LedgerTamperedError` naming the first bad one. With ``head`` (from a checkpoint
        manifest), also check that entry ``head[0]`` still has hash ``head[1]``."""
        prev, expected_seq = GENESIS, 1
        rows = self._db.execute(
            "SELECT seq, cycle, step, kind, decision, reason, payload, prev_hash, hash "
            "FROM entries ORDER BY seq"
        ).fetchall()
        hashes = {}
        for seq, cycle, step, kind, decision, reason, payload, prev_hash, h in rows:
            if seq != expected_seq:
                raise LedgerTamperedError(
                    f"ledger {self.path}: entry {expected_seq} is missing (next is {seq})"
                )
            if (
                prev_hash != prev
                or _digest(prev, seq, cycle, step, kind, decision, reason, payload) != h
            ):
                raise LedgerTamperedError(
                    f"ledger {self.path}: entry {seq} does not match its hash chain "
                    "(edited or reordered)"
                )
            hashes[seq] = h
            prev, expected_seq = h, seq + 1
        if head is not None and head[0] > 0 and hashes.get(head[0]) != head[1]:
            raise LedgerTamperedError(
                f"ledger {self.path}: entry {head[0]} recorded by the checkpoint is missing or "
                "changed (truncated ledger)"
            )
        return len(rows)
