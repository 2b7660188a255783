"""The durable job queue: sqlite in WAL mode, beside the job directories.

The store says which jobs exist, in what order they run and what state each is in; job.json in
each job directory holds the details. Every state change goes through `transition`, which checks
orchestrator.states inside a write transaction, so two threads (or a restarted daemon) can never
move a job along an edge that does not exist. Each thread opens its own JobStore (one sqlite
connection per thread).
"""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
from pathlib import Path
from typing import Any

from orchestrator.states import JobState, require_transition

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    state TEXT NOT NULL,
    job_dir TEXT NOT NULL,
    created TEXT NOT NULL,
    updated TEXT NOT NULL,
    error TEXT NOT NULL DEFAULT '',
    output TEXT NOT NULL DEFAULT '',
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    worker_pid INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS attempts (
    job_id TEXT NOT NULL,
    stage TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    plan TEXT NOT NULL,
    result TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    seconds REAL NOT NULL DEFAULT 0,
    recorded TEXT NOT NULL,
    PRIMARY KEY (job_id, stage, attempt)
);
"""
# A writer waits this long for another connection's transaction before giving up; transactions
# here are single statements, so contention is short.
BUSY_TIMEOUT_S = 30.0


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")


class JobStore:
    """One connection to the job database."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")  # a queued job must survive power loss
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        self.db.close()

    def add(self, job_id: str, job_dir: Path) -> None:
        """Queue a new job behind every job queued before it."""
        now = _now()
        self.db.execute(
            "INSERT INTO jobs (id, state, job_dir, created, updated) VALUES (?, ?, ?, ?, ?)",
            (job_id, JobState.QUEUED.value, str(job_dir), now, now),
        )

    def get(self, job_id: str) -> dict[str, Any] | None:
        row = self.db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return dict(row) if row else None

    def list(self, limit: int) -> list[dict[str, Any]]:
        """The `limit` most recent jobs, oldest first."""
        rows = self.db.execute("SELECT * FROM jobs ORDER BY seq DESC LIMIT ?", (limit,)).fetchall()
        return [dict(row) for row in reversed(rows)]

    def transition(self, job_id: str, target: JobState, **fields: Any) -> None:
        """Move a job to `target` (checked against the allowed transitions) and set columns."""
        allowed = {"error", "output", "cancel_requested", "worker_pid"}
        if set(fields) - allowed:
            raise ValueError(f"cannot set {sorted(set(fields) - allowed)}")
        self.db.execute("BEGIN IMMEDIATE")
        try:
            row = self.db.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise KeyError(job_id)
            require_transition(JobState(row["state"]), target)
            assignments = "".join(f", {name} = ?" for name in fields)
            self.db.execute(
                f"UPDATE jobs SET state = ?, updated = ?{assignments} WHERE id = ?",  # noqa: S608 (names are fixed)
                (target.value, _now(), *fields.values(), job_id),
            )
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    def claim_next(self, job_id: str | None = None) -> dict[str, Any] | None:
        """Atomically take the oldest queued job (or `job_id`, if it is still queued) and mark it
        running; None when there is none."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            if job_id is None:
                row = self.db.execute(
                    "SELECT * FROM jobs WHERE state = ? ORDER BY seq LIMIT 1", (JobState.QUEUED.value,)
                ).fetchone()
            else:
                row = self.db.execute(
                    "SELECT * FROM jobs WHERE state = ? AND id = ?", (JobState.QUEUED.value, job_id)
                ).fetchone()
            if row is not None:
                self.db.execute(
                    "UPDATE jobs SET state = ?, updated = ?, cancel_requested = 0 WHERE id = ?",
                    (JobState.RUNNING.value, _now(), row["id"]),
                )
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        return dict(row) if row else None

    def peek_next(self) -> dict[str, Any] | None:
        """The job `claim_next` would take now, without taking it."""
        row = self.db.execute(
            "SELECT * FROM jobs WHERE state = ? ORDER BY seq LIMIT 1", (JobState.QUEUED.value,)
        ).fetchone()
        return dict(row) if row else None

    def request_cancel(self, job_id: str) -> None:
        self.db.execute("UPDATE jobs SET cancel_requested = 1, updated = ? WHERE id = ?", (_now(), job_id))

    def is_cancel_requested(self, job_id: str) -> bool:
        row = self.db.execute("SELECT cancel_requested FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return bool(row and row["cancel_requested"])

    def set_worker_pid(self, job_id: str, pid: int) -> None:
        self.db.execute("UPDATE jobs SET worker_pid = ? WHERE id = ?", (pid, job_id))

    def in_state(self, state: JobState) -> list[dict[str, Any]]:
        rows = self.db.execute("SELECT * FROM jobs WHERE state = ? ORDER BY seq", (state.value,)).fetchall()
        return [dict(row) for row in rows]

    def record_attempt(
        self, job_id: str, stage: str, attempt: int, plan: dict[str, Any], result: str, reason: str, seconds: float
    ) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO attempts VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (job_id, stage, attempt, json.dumps(plan, sort_keys=True), result, reason, seconds, _now()),
        )

    def attempts(self, job_id: str) -> list[dict[str, Any]]:
        rows = self.db.execute("SELECT * FROM attempts WHERE job_id = ? ORDER BY recorded", (job_id,)).fetchall()
        return [{**dict(row), "plan": json.loads(row["plan"])} for row in rows]
