"""Operator switches shared by every process on the spool (SQLite table ``controls``).

Pausing ingest makes the SCP refuse new associations (A-ASSOCIATE-RJ, transient, local limit
exceeded) so the sending PACS queues and retries; processing of what was received goes on.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

_SCHEMA = "CREATE TABLE IF NOT EXISTS controls (key TEXT PRIMARY KEY, value TEXT NOT NULL)"


class IngestControls:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with sqlite3.connect(self.path, timeout=60.0) as db:
            db.execute(_SCHEMA)

    def _get(self, key: str) -> str | None:
        with sqlite3.connect(self.path, timeout=60.0) as db:
            row = db.execute("SELECT value FROM controls WHERE key=?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def _set(self, key: str, value: str) -> None:
        with sqlite3.connect(self.path, timeout=60.0) as db:
            db.execute("INSERT OR REPLACE INTO controls (key, value) VALUES (?,?)", (key, value))

    @property
    def paused(self) -> bool:
        return self._get("ingest_paused") == "1"

    def pause(self) -> None:
        self._set("ingest_paused", "1")

    def resume(self) -> None:
        self._set("ingest_paused", "0")
