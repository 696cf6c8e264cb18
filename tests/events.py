"""A recorder for tests that keeps a run's ledger events (shifts, races shortened, ...)."""

from __future__ import annotations

from selfmod.introspect.events import Recorder


class Events(Recorder):
    """The ledger's events, kept: ``(decision, reason, payload)``."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, str, dict]] = []

    def record(self, run, kind, decision, reason, payload):
        if kind == "event":
            self.rows.append((decision, reason, payload))

    def titled(self, title: str) -> list[tuple[str, str, dict]]:
        """The events whose decision starts with ``title``."""
        return [row for row in self.rows if row[0].startswith(title)]
