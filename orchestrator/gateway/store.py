"""The gateway's own small store: which API key owns which daemon job, and what the request asked.

The daemon knows nothing of HTTP keys, so ownership lives here (sqlite in WAL mode, one file under
`<state dir>/http/`), beside what the OpenAI video object reports that the daemon does not keep
(the `seconds` and `model` as asked, and when the gateway first saw a job end). One connection,
guarded by a lock: every statement is short and the gateway's request threads share it.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import Any

from orchestrator.run.states import JobState

SCHEMA = """
CREATE TABLE IF NOT EXISTS videos (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    owner TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    completed_at INTEGER,
    model TEXT NOT NULL,
    size TEXT NOT NULL,
    seconds TEXT NOT NULL,
    num_frames INTEGER NOT NULL,
    fps REAL NOT NULL,
    prompt TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'queued',
    deleted INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS videos_owner ON videos (owner, seq);
CREATE TABLE IF NOT EXISTS idempotency (
    owner TEXT NOT NULL,
    key TEXT NOT NULL,
    body TEXT NOT NULL,
    video_id TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (owner, key)
);
"""
#: A video whose claim is recorded and whose submit the daemon has not answered yet (not a daemon state).
SUBMITTING = "submitting"
# States after which a job never changes again.
FINAL_STATES = tuple(state.value for state in JobState if state.is_terminal)


class GatewayStore:
    """Ownership and request records of the gateway's videos."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock = threading.Lock()
        self.db = sqlite3.connect(path, timeout=30.0, isolation_level=None, check_same_thread=False)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self.db.close()

    def add(self, record: dict[str, Any]) -> None:
        """Record `record['owner']`'s claim to a video, before its submit reaches the daemon (state SUBMITTING)."""
        columns = ("id", "owner", "created_at", "model", "size", "seconds", "num_frames", "fps", "prompt", "state")
        with self._lock:
            self.db.execute(
                f"INSERT INTO videos ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})",
                tuple(record[column] for column in columns),
            )

    def submitted(self, video_id: str, record: dict[str, Any]) -> None:
        """Fill in what the daemon resolved once it took the video's submit (model, size, frames, frame rate, state)."""
        columns = ("model", "size", "seconds", "num_frames", "fps", "prompt", "state")
        with self._lock:
            self.db.execute(
                f"UPDATE videos SET {', '.join(f'{column} = ?' for column in columns)} WHERE id = ?",
                (*(record[column] for column in columns), video_id),
            )

    def discard(self, video_id: str) -> None:
        """Forget a claim no job came of (the daemon refused the request, or named a reused video instead)."""
        with self._lock:
            self.db.execute("DELETE FROM videos WHERE id = ? AND state = ?", (video_id, SUBMITTING))
            self.db.execute("DELETE FROM idempotency WHERE video_id = ?", (video_id,))

    def state_of(self, video_id: str) -> tuple[str, int] | None:
        """(last known state, created_at) of any key's video, for views of videos the daemon does not know."""
        with self._lock:
            row = self.db.execute("SELECT state, created_at FROM videos WHERE id = ?", (video_id,)).fetchone()
        return (row["state"], row["created_at"]) if row else None

    def keyed(self, owner: str, key: str) -> dict[str, Any] | None:
        """The video an `Idempotency-Key` of this owner was first used for, with the request's fingerprint."""
        with self._lock:
            row = self.db.execute("SELECT * FROM idempotency WHERE owner = ? AND key = ?", (owner, key)).fetchone()
        return dict(row) if row else None

    def remember_key(self, owner: str, key: str, body: str, video_id: str, created_at: int) -> None:
        with self._lock:
            self.db.execute(
                "INSERT OR REPLACE INTO idempotency (owner, key, body, video_id, created_at) VALUES (?, ?, ?, ?, ?)",
                (owner, key, body, video_id, created_at),
            )

    def get(self, owner: str, video_id: str) -> dict[str, Any] | None:
        """The owner's video, or None for another key's, a deleted or an unknown one (all look alike)."""
        with self._lock:
            row = self.db.execute(
                "SELECT * FROM videos WHERE id = ? AND owner = ? AND deleted = 0", (video_id, owner)
            ).fetchone()
        return dict(row) if row else None

    def page(self, owner: str, limit: int, after: str | None, newest_first: bool) -> tuple[list[dict[str, Any]], bool]:
        """Up to `limit` of the owner's videos after the one with id `after`; and whether more follow."""
        order, compare = ("DESC", "<") if newest_first else ("ASC", ">")
        query = "SELECT * FROM videos WHERE owner = ? AND deleted = 0"
        params: list[Any] = [owner]
        if after:
            query += f" AND seq {compare} (SELECT seq FROM videos WHERE id = ? AND owner = ?)"
            params += [after, owner]
        query += f" ORDER BY seq {order} LIMIT ?"
        params.append(limit + 1)
        with self._lock:
            rows = [dict(row) for row in self.db.execute(query, params).fetchall()]
        return rows[:limit], len(rows) > limit

    def active(self, owner: str) -> list[dict[str, Any]]:
        """The owner's videos last seen queued or running (they may have ended since)."""
        marks = ", ".join("?" * len(FINAL_STATES))
        with self._lock:
            rows = self.db.execute(
                f"SELECT * FROM videos WHERE owner = ? AND deleted = 0 AND state NOT IN ({marks})",
                (owner, *FINAL_STATES),
            ).fetchall()
        return [dict(row) for row in rows]

    def note_state(self, video_id: str, state: str, completed_at: int | None) -> bool:
        """Remember the daemon's latest state of a job (and when it ended); True if it just ended."""
        with self._lock:
            row = self.db.execute("SELECT state FROM videos WHERE id = ?", (video_id,)).fetchone()
            if row is None or row["state"] == state:
                return False
            self.db.execute(
                "UPDATE videos SET state = ?, completed_at = ? WHERE id = ?",
                (state, completed_at if state in FINAL_STATES else None, video_id),
            )
        return state in FINAL_STATES

    def mark_deleted(self, video_id: str) -> None:
        with self._lock:
            self.db.execute("UPDATE videos SET deleted = 1 WHERE id = ?", (video_id,))
