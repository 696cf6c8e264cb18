"""The run ledger: an append-only SQLite table of every cycle, proposal, decision and event,
hash-chained so that editing, inserting or deleting a row is detected.

Entry ``i`` stores ``hash_i = sha256(hash_{i-1} || canonical_json(fields_i))`` with
``hash_0 = sha256("selfmod-ledger")``; :meth:`Ledger.verify` recomputes the chain and names the
first entry that does not match. A *keyed* ledger uses ``HMAC-SHA256(key, ...)`` instead, with a
key from ``SELFMOD_LEDGER_KEY`` or the file named by ``SELFMOD_LEDGER_KEY_FILE`` (kept outside
the run directory): without the key nobody can recompute the chain. Whether a ledger is keyed
is fixed when it is created and recorded in its ``meta`` table. Checkpoint manifests record
the head ``(seq, hash)``, so a truncated tail is detected too. Entries are never updated or
deleted: a resumed run appends a ``resume`` entry saying which entries it supersedes.

References: Haber & Stornetta 1991, "How to time-stamp a digital document" (hash chains).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from selfmod.errors import SelfmodError
from selfmod.files import DIR_MODE, FILE_MODE

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
_META_SCHEMA = "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)"
#: the ledger's tables and their columns: all a ledger may hold (no trigger, no view)
_COLUMNS = {
    "entries": (
        "seq",
        "cycle",
        "step",
        "kind",
        "decision",
        "reason",
        "payload",
        "prev_hash",
        "hash",
    ),
    "meta": ("key", "value"),
}
KEY_ENV, KEY_FILE_ENV = "SELFMOD_LEDGER_KEY", "SELFMOD_LEDGER_KEY_FILE"
_KEY_CHECK = b"selfmod-ledger-key-check"


class LedgerError(SelfmodError):
    """A ledger is missing, not a selfmod ledger, or needs a key that was not given."""


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
    prev: str,
    seq: int,
    cycle: int,
    step: int,
    kind: str,
    decision: str,
    reason: str,
    payload: str,
    key: bytes | None = None,
) -> str:
    """``sha256(prev || body)``, or ``HMAC-SHA256(key, prev || body)`` for a keyed ledger."""
    body = json.dumps([seq, cycle, step, kind, decision, reason, payload], separators=(",", ":"))
    message = (prev + body).encode("utf-8")
    if key is None:
        return hashlib.sha256(message).hexdigest()
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def ledger_key(run_dir: str | Path | None = None) -> bytes | None:
    """The ledger key from ``SELFMOD_LEDGER_KEY`` (its UTF-8 bytes) or from the file named by
    ``SELFMOD_LEDGER_KEY_FILE`` (its bytes, a trailing newline dropped); ``None`` if neither
    is set. A key file inside ``run_dir`` is refused: whoever can edit the run could read it."""
    text = os.environ.get(KEY_ENV)
    if text:
        return text.encode("utf-8")
    name = os.environ.get(KEY_FILE_ENV)
    if not name:
        return None
    path = Path(name)
    if run_dir is not None and path.resolve().is_relative_to(Path(run_dir).resolve()):
        raise LedgerError(
            f"{KEY_FILE_ENV} must name a file outside the run directory (got {name!r}); "
            "a key stored next to the ledger protects nothing"
        )
    try:
        key = path.read_bytes().removesuffix(b"\n")
    except OSError as err:
        raise LedgerError(f"{KEY_FILE_ENV}={name!r} is unreadable: {err.strerror}") from None
    if not key:
        raise LedgerError(f"{KEY_FILE_ENV}={name!r} is empty; put a secret key in it")
    return key


class Ledger:
    """Append-only, hash-chained SQLite ledger at ``path``.

    Each :meth:`append` is one ``BEGIN IMMEDIATE`` transaction with ``synchronous=FULL``, so
    several processes (a run and ``selfmod approve``) can append safely and a crash loses at
    most the entry being written.

    ``create``: make the ledger if it is missing (the run's writer); readers pass ``False`` so
    a deleted ledger is an error, never a fresh empty one. ``key``: the HMAC key (default:
    :func:`ledger_key` from the environment). A new ledger is keyed iff a key is given; a keyed
    ledger refuses to be verified or appended to without its key, and an unkeyed one refuses
    to be used while a key is set (an unkeyed chain could have replaced a keyed one).
    """

    def __init__(self, path: str | Path, *, create: bool = True, key: bytes | None = None) -> None:
        self.path = Path(path)
        self._key = ledger_key(self.path.parent) if key is None else key
        if not create and not self.path.is_file():
            raise LedgerError(
                f"ledger {self.path} does not exist; DIR must be a run directory with its "
                "ledger.sqlite (it is never recreated: a missing ledger is lost history)"
            )
        if self.path.is_symlink():
            raise LedgerError(
                f"ledger {self.path} is a symbolic link; a run's ledger must be its own file"
            )
        if create:
            self.path.parent.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
            flags = os.O_CREAT | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC
            fd = os.open(self.path, flags, FILE_MODE)  # 0600 before sqlite opens it
            try:
                os.fchmod(fd, FILE_MODE)  # one policy for every file of a run
            finally:
                os.close(fd)
        try:
            uri = f"{self.path.resolve().as_uri()}?mode={'rwc' if create else 'rw'}"
            self._db = sqlite3.connect(uri, uri=True, timeout=30.0, isolation_level=None)
        except sqlite3.Error as err:
            raise LedgerError(f"ledger {self.path} cannot be opened: {err}") from None
        try:
            self._db.execute("PRAGMA synchronous=FULL")
            if create:
                self._db.execute(_SCHEMA)
                self._db.execute(_META_SCHEMA)
            self.keyed = self._read_keyed(create)
        except sqlite3.Error as err:
            self._db.close()
            raise LedgerError(
                f"ledger {self.path} is not a selfmod ledger (SQLite: {err}); restore it from "
                "a copy"
            ) from None
        except BaseException:
            self._db.close()
            raise

    def _read_keyed(self, create: bool) -> bool:
        """Whether the chain is keyed; a new ledger records it (and a check of the key)."""
        tables = self._check_schema()
        meta = dict(self._db.execute("SELECT key, value FROM meta")) if "meta" in tables else {}
        if "keyed" not in meta:
            empty = self._db.execute("SELECT 1 FROM entries LIMIT 1").fetchone() is None
            if not (create and empty):
                return False  # a ledger from before keyed chains: unkeyed
            check = "" if self._key is None else self._mac(_KEY_CHECK)
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute(
                "INSERT OR IGNORE INTO meta VALUES ('keyed', ?)", (str(int(bool(check))),)
            )
            self._db.execute("INSERT OR IGNORE INTO meta VALUES ('key_check', ?)", (check,))
            self._db.execute("COMMIT")
            meta = dict(self._db.execute("SELECT key, value FROM meta"))
        keyed = meta.get("keyed") == "1"
        if keyed and self._key is not None and meta.get("key_check") != self._mac(_KEY_CHECK):
            raise LedgerError(
                f"ledger {self.path} is keyed with another key than the one given "
                f"({KEY_ENV} / {KEY_FILE_ENV}); set the key this run was written with"
            )
        return keyed

    def _check_schema(self) -> set[str]:
        """The ledger's tables, once checked to be exactly its own: ``entries`` (and ``meta``)
        with their columns, no other table, no trigger, no view (either could hide, change or
        drop entries as they are written or read); else one line."""
        objects = list(self._db.execute("SELECT type, name, tbl_name FROM sqlite_master"))
        tables = {name for kind, name, _ in objects if kind == "table"}
        extra = [
            f"{kind} {name!r}"
            for kind, name, table in objects
            if not (
                (kind == "table" and name in _COLUMNS)
                or (kind == "index" and name.startswith("sqlite_autoindex_") and table in _COLUMNS)
            )
        ]
        for table in sorted(tables & _COLUMNS.keys()):
            columns = tuple(r[1] for r in self._db.execute(f"PRAGMA table_info({table})"))
            if columns != _COLUMNS[table]:
                extra.append(f"table {table!r} with columns {', '.join(columns)}")
        if "entries" not in tables and not extra:
            raise sqlite3.DatabaseError("no entries table")
        if extra:
            raise LedgerError(
                f"ledger {self.path} is not a selfmod ledger: it holds {'; '.join(extra)} "
                "(only the tables entries and meta, no trigger or view); restore it from a copy"
            )
        return tables

    def _mac(self, message: bytes) -> str:
        assert self._key is not None
        return hmac.new(self._key, message, hashlib.sha256).hexdigest()

    def _chain_key(self) -> bytes | None:
        """The key the chain is computed with, or an error if the key and the ledger disagree."""
        if self.keyed and self._key is None:
            raise LedgerError(
                f"ledger {self.path} is keyed (HMAC-SHA256); set {KEY_ENV} or {KEY_FILE_ENV} to "
                "its key to verify or extend it"
            )
        if not self.keyed and self._key is not None:
            raise LedgerError(
                f"ledger {self.path} is not keyed but a ledger key is set ({KEY_ENV} / "
                f"{KEY_FILE_ENV}): anyone with write access can recompute an unkeyed chain, so "
                "it may have replaced a keyed one; unset the key to read an unkeyed ledger"
            )
        return self._key if self.keyed else None

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
        key = self._chain_key()
        self._db.execute("BEGIN IMMEDIATE")
        try:
            row = self._db.execute("SELECT seq, hash FROM entries ORDER BY seq DESC LIMIT 1")
            last = row.fetchone()
            seq, prev = (last[0] + 1, last[1]) if last else (1, GENESIS)
            h = _digest(prev, seq, cycle, step, kind, decision, reason, text, key)
            self._db.execute(
                "INSERT INTO entries VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (seq, cycle, step, kind, decision, reason, text, prev, h),
            )
            self._db.execute("COMMIT")
        except BaseException:
            # an interrupt (Ctrl-C) can land after SQLite committed: nothing left to roll back,
            # and a ROLLBACK then would raise over the interrupt
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise
        return Entry(seq, cycle, step, kind, decision, reason, json.loads(text), prev, h)

    def entries(self, kind: str | None = None) -> list[Entry]:
        query = "SELECT * FROM entries" + (" WHERE kind = ?" if kind else "") + " ORDER BY seq"
        try:
            rows = self._db.execute(query, (kind,) if kind else ()).fetchall()
            return [
                Entry(r[0], r[1], r[2], r[3], r[4], r[5], json.loads(r[6]), r[7], r[8])
                for r in rows
            ]
        except (sqlite3.Error, ValueError, TypeError, IndexError) as err:
            raise LedgerError(f"ledger {self.path} has a malformed entry: {err}") from None

    def head(self) -> tuple[int, str]:
        """``(seq, hash)`` of the last entry (``(0, GENESIS)`` when empty)."""
        last = self._db.execute("SELECT seq, hash FROM entries ORDER BY seq DESC LIMIT 1")
        row = last.fetchone()
        return (row[0], row[1]) if row else (0, GENESIS)

    def verify(self, head: tuple[int, str] | None = None) -> int:
        """Recompute the chain; return the number of entries or raise
        :class:`LedgerTamperedError` naming the first bad one. With ``head`` (from a checkpoint
        manifest), also check that entry ``head[0]`` still has hash ``head[1]``."""
        key = self._chain_key()
        prev, expected_seq = GENESIS, 1
        try:
            rows = self._db.execute(
                "SELECT seq, cycle, step, kind, decision, reason, payload, prev_hash, hash "
                "FROM entries ORDER BY seq"
            ).fetchall()
        except sqlite3.Error as err:
            raise LedgerError(f"ledger {self.path} cannot be read: {err}") from None
        hashes = {}
        for seq, cycle, step, kind, decision, reason, payload, prev_hash, h in rows:
            if seq != expected_seq:
                raise LedgerTamperedError(
                    f"ledger {self.path}: entry {expected_seq} is missing (next is {seq})"
                )
            try:
                ok = prev_hash == prev and hmac.compare_digest(
                    _digest(prev, seq, cycle, step, kind, decision, reason, payload, key), h
                )
            except TypeError:  # a value of the wrong type stored in place of the real one
                ok = False
            if not ok:
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
