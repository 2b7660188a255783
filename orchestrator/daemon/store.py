"""The daemon's job queue: sqlite in WAL mode, beside the job directories; a mirror of job.json.

The store keeps the order in which jobs run (submission order), cancel requests, and a copy of
each job's state, error and output for fast listing. It decides nothing: every state change is
made by `JobDir.transition` (orchestrator/jobdir.py), which checks it and calls `mirror`. At
start the daemon re-derives every row from the job directories (`sync_from_job_dirs`), so a
crash between job.json and the store, a lost store or a corrupt one (`open_store` moves it aside
and starts a new one) loses no job: the job directories are the truth (DESIGN.md rule 1).
Each thread opens its own JobStore (one sqlite connection per thread).
"""

from __future__ import annotations

import datetime as dt
import logging
import sqlite3
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from orchestrator.jobdir import JobDir
from orchestrator.states import JobState

log = logging.getLogger("ltx2.store")
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
    cancel_requested INTEGER NOT NULL DEFAULT 0
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
        try:
            self.db.row_factory = sqlite3.Row
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")  # a queued job must survive power loss
            self.db.executescript(SCHEMA)
        except sqlite3.DatabaseError:
            self.db.close()
            raise

    def close(self) -> None:
        self.db.close()

    def mirror(self, job: JobDir) -> None:
        """Copy a job's state, error and output from its job.json (called by JobDir.transition);
        a job not in the store yet is added at the end of the queue."""
        record, now = job.record, _now()
        self.db.execute(
            "INSERT INTO jobs (id, state, job_dir, created, updated, error, output) VALUES (?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT(id) DO UPDATE SET state = excluded.state, updated = excluded.updated, "
            "error = excluded.error, output = excluded.output",
            (job.id, record["status"], str(job.path), record.get("created", now), now,
             record.get("error", ""), record.get("output", "")),
        )  # fmt: skip

    def sync_from_job_dirs(self, jobs: Iterable[JobDir]) -> int:
        """Make the rows equal to the job directories' job.json (rows the store did not have are
        added in creation order, so the queue keeps submission order); returns how many changed."""
        changed = 0
        for job in sorted(jobs, key=lambda j: (j.record.get("created", ""), j.id)):
            row = self.get(job.id)
            if row is None or (row["state"], row["error"], row["output"]) != (
                job.record["status"], job.record.get("error", ""), job.record.get("output", "")
            ):  # fmt: skip
                self.mirror(job)
                changed += 1
        return changed

    def get(self, job_id: str) -> dict[str, Any] | None:
        row = self.db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return dict(row) if row else None

    def list(self, limit: int) -> list[dict[str, Any]]:
        """The `limit` most recent jobs, oldest first."""
        rows = self.db.execute("SELECT * FROM jobs ORDER BY seq DESC LIMIT ?", (limit,)).fetchall()
        return [dict(row) for row in reversed(rows)]

    def queued(self, limit: int) -> list[dict[str, Any]]:
        """The oldest `limit` queued jobs, in submission order."""
        rows = self.db.execute(
            "SELECT * FROM jobs WHERE state = ? ORDER BY seq LIMIT ?", (JobState.QUEUED.value, limit)
        ).fetchall()
        return [dict(row) for row in rows]

    def request_cancel(self, job_id: str) -> None:
        self.db.execute("UPDATE jobs SET cancel_requested = 1, updated = ? WHERE id = ?", (_now(), job_id))

    def clear_cancel(self, job_id: str) -> None:
        self.db.execute("UPDATE jobs SET cancel_requested = 0 WHERE id = ?", (job_id,))

    def is_cancel_requested(self, job_id: str) -> bool:
        row = self.db.execute("SELECT cancel_requested FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return bool(row and row["cancel_requested"])

    def mark_unreadable(self, job_id: str, error: str) -> None:
        """Fail a row whose job.json cannot be read: there is no job.json state to change, so
        the store records why the job can never run."""
        self.db.execute(
            "UPDATE jobs SET state = ?, error = ?, updated = ? WHERE id = ?",
            (JobState.FAILED.value, error, _now(), job_id),
        )


def open_store(path: Path, jobs_dir: Path) -> JobStore:
    """Open the store and re-derive it from the job directories.

    A file sqlite cannot read (garbage, a zeroed header, a half truncation) is moved aside as
    `<name>.corrupt-<time>` with its WAL files and a new store is built, so a corrupt file never
    crash-loops the daemon; a store emptied (truncated to 0 bytes) is refilled the same way.
    """
    try:
        store = JobStore(path)
        if store.db.execute("PRAGMA quick_check").fetchone()[0] != "ok":
            store.close()
            raise sqlite3.DatabaseError("quick_check failed")
    except sqlite3.DatabaseError as exc:
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        for suffix in ("", "-wal", "-shm"):
            damaged = path.with_name(path.name + suffix)
            if damaged.exists():
                damaged.rename(path.with_name(f"{path.name}.corrupt-{stamp}{suffix}"))
        log.warning("%s is unreadable (%s); moved aside, rebuilding from %s", path, exc, jobs_dir)
        store = JobStore(path)
    changed = store.sync_from_job_dirs(read_job_dirs(jobs_dir))
    if changed:
        log.warning("store: %d job(s) re-derived from their job.json", changed)
    return store


def read_job_dirs(jobs_dir: Path) -> list[JobDir]:
    """Every job directory with a readable job.json (an unreadable one is logged and skipped)."""
    found = []
    for job_file in sorted(jobs_dir.glob("*/job.json")):
        try:
            found.append(JobDir.load(job_file.parent))
        except (OSError, ValueError, KeyError) as exc:
            log.warning("skipping %s: %s", job_file, exc)
    return found
