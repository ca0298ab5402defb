"""On-disk cache of chat-completions replies, keyed by (model, request): a call made once
is never sent again.

SQLite in WAL mode: each entry is written in its own transaction, so a process killed
mid-write (even kill -9) leaves the entry either complete or absent, and several
processes on one machine (Ray workers) can read and write the same file at once. WAL
needs a local filesystem: keep the file off NFS.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from pathlib import Path
from typing import Any

_SCHEMA = """
CREATE TABLE IF NOT EXISTS replies (
    key TEXT PRIMARY KEY,     -- cache_key(model, request)
    model TEXT NOT NULL,
    request TEXT NOT NULL,    -- canonical JSON of the request, for inspection
    reply TEXT NOT NULL,      -- the response body as received
    created REAL NOT NULL     -- unix time
)
"""


def canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def cache_key(model: str, request: dict[str, Any]) -> str:
    """sha256 of the model and the whole request body (messages and sampling parameters)."""
    return hashlib.sha256(canonical({"model": model, "request": request}).encode()).hexdigest()


class JudgeCache:
    """A SQLite file of replies; open one per process (connections are not shared across threads)."""

    def __init__(self, path: str | Path, timeout: float = 60.0):
        self.path = Path(path).expanduser()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: autocommit, each put is one atomic transaction.
        # timeout: how long a writer waits for another process's write lock.
        self._db = sqlite3.connect(self.path, timeout=timeout, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # in WAL: safe against process crashes
        self._db.execute(_SCHEMA)

    def get(self, key: str) -> str | None:
        row = self._db.execute("SELECT reply FROM replies WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def put(self, key: str, model: str, request: dict[str, Any], reply: str) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO replies (key, model, request, reply, created) VALUES (?, ?, ?, ?, ?)",
            (key, model, canonical(request), reply, time.time()),
        )

    def __len__(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM replies").fetchone()[0]

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> "JudgeCache":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
