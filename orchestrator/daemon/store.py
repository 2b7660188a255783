"""The daemon's job queue: sqlite in WAL mode, beside the job directories; a mirror of job.json.

The store keeps the order in which jobs run (submission order) and a copy of each job's state,
error and output for fast listing. It decides nothing and holds nothing that is not in a job
directory: every state change is made by `JobDir.transition` (orchestrator/run/jobdir.py), which checks
it and calls `mirror`; a cancel request is a file in the job's directory. So the store can always
be re-derived from the job directories (`sync_from_job_dirs`: rows added for jobs it lacks, rows
dropped for jobs whose directory is gone), and it is, at every start and whenever it is found
damaged: a crash between job.json and the store, a lost store or a corrupt one loses no job and
keeps no phantom (DESIGN.md rule 1).

It holds the daemon's jobs only (JobDir.in_daemon_queue): a job that `ltx2 generate`, `batch`, `decode`
or `resume` runs in its own process is never queued here, so the daemon never runs it; the daemon
lists it from its directory (orchestrator.daemon.job_views).

A store damaged under a running daemon (garbage written over it, the file replaced or deleted) is
noticed by whichever connection touches it next: the file is moved aside as
`jobs.sqlite.corrupt-<time>` and a new one is built from the job directories under the running jobs
(`JobStore.recover`), so no job fails for it. Each thread opens its own JobStore (one sqlite
connection per thread); a process-wide lock per file keeps two threads from rebuilding at once.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import sqlite3
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

from orchestrator.run.jobdir import JobDir
from orchestrator.run.states import JobState
from protocol.files import JOB_FILE

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
    output TEXT NOT NULL DEFAULT ''
);
"""
# A writer waits this long for another connection's transaction before giving up; transactions
# here are single statements, so contention is short.
BUSY_TIMEOUT_S = 30.0
# The first 16 bytes of every sqlite 3 database file: anything else there is damage.
SQLITE_HEADER = b"SQLite format 3\0"
# sqlite's primary result codes for a file that is not (or no longer) a readable database.
SQLITE_CORRUPT, SQLITE_NOTADB = 11, 26
T = TypeVar("T")
# One lock per store file, shared by every thread's JobStore: a damaged file is rebuilt once.
_REBUILDING: dict[Path, threading.Lock] = {}
_REBUILDING_GUARD = threading.Lock()


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")


class StoreDamaged(sqlite3.DatabaseError):
    """The store file is not the database this connection opened (replaced, deleted, overwritten)."""


class JobStore:
    """One connection to the job database; it rebuilds the file from the job directories when it
    finds it damaged, and then runs the statement again."""

    def __init__(self, path: Path, jobs_dir: Path | None = None) -> None:
        """Open the store at `path`; a file sqlite cannot read is moved aside and a new one is
        built from the job directories in `jobs_dir` (default: `jobs` beside the store)."""
        self.path = path
        self.jobs_dir = jobs_dir or path.parent / "jobs"  #: where `recover` re-derives the rows from
        path.parent.mkdir(parents=True, exist_ok=True)
        with rebuild_lock(path):
            self.db, rebuilt = open_or_rebuild(path)
            self.identity = file_identity(path)
            if rebuilt:
                self.sync_from_job_dirs(read_job_dirs(self.jobs_dir))

    def close(self) -> None:
        self.db.close()

    def _run(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """Run `work` on the connection; a damaged store is rebuilt (`recover`) and `work` runs again."""
        try:
            self.check()
            return work(self.db)
        except sqlite3.DatabaseError as exc:
            if not is_damage(exc):
                raise
            self.recover(exc)
            return work(self.db)

    def check(self) -> None:
        """Raise StoreDamaged if the file at `path` is no longer the database this connection opened.

        sqlite does not notice by itself: a connection keeps reading its page cache and WAL while
        the file holds garbage, and then fails (or checkpoints over the garbage) at some later
        statement. A stat and a 16-byte read per statement notice it before the statement runs.
        """
        if file_identity(self.path) != self.identity:
            raise StoreDamaged(f"{self.path} was replaced or removed")
        try:
            with self.path.open("rb") as handle:
                header = handle.read(len(SQLITE_HEADER))
        except OSError as exc:
            raise StoreDamaged(f"{self.path} cannot be read: {exc}") from None
        if header != SQLITE_HEADER:
            raise StoreDamaged(f"{self.path} is not a database any more")

    def recover(self, why: Exception) -> None:
        """Reopen the store; if the file is unreadable, move it aside and build a new one; then
        re-derive every row from the job directories (another thread may have done the first part)."""
        with rebuild_lock(self.path):
            self.db.close()
            self.db, _ = open_or_rebuild(self.path)
            self.identity = file_identity(self.path)
            changed = self.sync_from_job_dirs(read_job_dirs(self.jobs_dir))
        log.warning(
            "store %s was damaged under the daemon (%s); reopened, %d row(s) re-derived", self.path, why, changed
        )

    def mirror(self, job: JobDir) -> None:
        """Copy a job's state, error and output from its job.json (called by JobDir.transition);
        a job not in the store yet is added at the end of the queue, a job no longer the daemon's
        (`ltx2 resume` took it) is dropped from it."""
        if not job.in_daemon_queue:
            self.forget(job.id)
            return
        self._run(lambda db: self._mirror(db, job))

    def forget(self, job_id: str) -> None:
        """Drop a job's row: its job is not the daemon's to run (its directory stays, and it is still listed)."""
        self._run(lambda db: db.execute("DELETE FROM jobs WHERE id = ?", (job_id,)))

    @staticmethod
    def _mirror(db: sqlite3.Connection, job: JobDir) -> None:
        record, now = job.record, _now()
        db.execute(
            "INSERT INTO jobs (id, state, job_dir, created, updated, error, output) VALUES (?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT(id) DO UPDATE SET state = excluded.state, job_dir = excluded.job_dir, "
            "updated = excluded.updated, error = excluded.error, output = excluded.output",
            (job.id, record.status, str(job.path), record.created, now, record.error or "", record.output or ""),
        )

    def sync_from_job_dirs(self, jobs: Iterable[JobDir]) -> int:
        """Make the rows equal to the job directories' job.json: rows the store did not have are
        added in creation order (so the queue keeps submission order), changed ones updated, and
        rows of jobs whose directory (or job.json) is gone, or that are not the daemon's, are dropped;
        returns how many changed. Runs on the connection as it is (`recover` calls it while rebuilding)."""
        changed = 0
        ours = []
        for job in jobs:
            if job.in_daemon_queue:
                ours.append(job)
            elif self.db.execute("DELETE FROM jobs WHERE id = ?", (job.id,)).rowcount:
                changed += 1
        for job in sorted(ours, key=lambda j: (j.record.created, j.id)):
            row = self.db.execute("SELECT * FROM jobs WHERE id = ?", (job.id,)).fetchone()
            if row is None or (row["state"], row["error"], row["output"], row["job_dir"]) != (
                job.record.status, job.record.error or "", job.record.output or "", str(job.path)
            ):  # fmt: skip
                self._mirror(self.db, job)
                changed += 1
        for row in self.db.execute("SELECT id, job_dir FROM jobs").fetchall():
            if not (Path(row["job_dir"]) / JOB_FILE).exists():
                self.db.execute("DELETE FROM jobs WHERE id = ?", (row["id"],))
                log.warning("store: job %s dropped: %s is gone", row["id"], row["job_dir"])
                changed += 1
        return changed

    def get(self, job_id: str) -> dict[str, Any] | None:
        row = self._run(lambda db: db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone())
        return dict(row) if row else None

    def ids(self) -> set[str]:
        """The id of every job in the store."""
        return {row["id"] for row in self._run(lambda db: db.execute("SELECT id FROM jobs").fetchall())}

    def list(self, limit: int) -> list[dict[str, Any]]:
        """The `limit` most recent jobs, oldest first."""
        rows = self._run(lambda db: db.execute("SELECT * FROM jobs ORDER BY seq DESC LIMIT ?", (limit,)).fetchall())
        return [dict(row) for row in reversed(rows)]

    def queued(self, limit: int) -> list[dict[str, Any]]:
        """The oldest `limit` queued jobs, in submission order."""
        rows = self._run(
            lambda db: db.execute(
                "SELECT * FROM jobs WHERE state = ? ORDER BY seq LIMIT ?", (JobState.QUEUED.value, limit)
            ).fetchall()
        )
        return [dict(row) for row in rows]

    def waiting(self) -> list[dict[str, Any]]:
        """The jobs waiting for another (JobState.WAITING), in submission order: a chain's segments in order."""
        rows = self._run(
            lambda db: db.execute(
                "SELECT * FROM jobs WHERE state = ? ORDER BY seq", (JobState.WAITING.value,)
            ).fetchall()
        )
        return [dict(row) for row in rows]

    def mark_unreadable(self, job_id: str, error: str) -> None:
        """Fail a row whose job.json cannot be read: there is no job.json state to change, so
        the store records why the job can never run."""
        self._run(
            lambda db: db.execute(
                "UPDATE jobs SET state = ?, error = ?, updated = ? WHERE id = ?",
                (JobState.FAILED.value, error, _now(), job_id),
            )
        )


def connect(path: Path) -> sqlite3.Connection:
    """A connection in WAL mode with the schema; sqlite3.DatabaseError if the file is not a database."""
    db = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
    try:
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")  # a queued job must survive power loss
        db.executescript(SCHEMA)
    except sqlite3.DatabaseError:
        db.close()
        raise
    return db


def file_identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of the file, or None when there is none: tells a replaced file from ours."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_dev, info.st_ino


def is_damage(exc: sqlite3.DatabaseError) -> bool:
    """An error that says the file is not a readable database (not a busy or locked one)."""
    if isinstance(exc, StoreDamaged):
        return True
    return (getattr(exc, "sqlite_errorcode", 0) & 0xFF) in (SQLITE_CORRUPT, SQLITE_NOTADB)


def rebuild_lock(path: Path) -> threading.Lock:
    with _REBUILDING_GUARD:
        return _REBUILDING.setdefault(path.resolve(), threading.Lock())


def open_or_rebuild(path: Path) -> tuple[sqlite3.Connection, bool]:
    """A connection to the store at `path` and whether it is new: the file there if sqlite can read
    it whole, else a new one, the unreadable file moved aside as `<name>.corrupt-<time>` with its WAL
    files (kept for a post-mortem). Call it holding `rebuild_lock(path)`."""
    try:
        db = connect(path)
        if db.execute("PRAGMA quick_check").fetchone()[0] == "ok":
            return db, False
        db.close()
        why: Exception = sqlite3.DatabaseError("quick_check failed")
    except sqlite3.DatabaseError as exc:
        why = exc
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    for suffix in ("", "-wal", "-shm"):
        damaged = path.with_name(path.name + suffix)
        if damaged.exists():
            damaged.rename(path.with_name(f"{path.name}.corrupt-{stamp}{suffix}"))
    log.warning("%s is unreadable (%s); moved aside, rebuilding it from the job directories", path, why)
    return connect(path), True


def open_store(path: Path, jobs_dir: Path) -> JobStore:
    """Open the store and re-derive it from the job directories (the daemon does this at start).

    A file sqlite cannot read (garbage, a zeroed header, a half truncation) is moved aside as
    `<name>.corrupt-<time>` with its WAL files and a new store is built, so a corrupt file never
    crash-loops the daemon; a store emptied (truncated to 0 bytes) is refilled the same way; rows
    of jobs whose directory was deleted are dropped.
    """
    store = JobStore(path, jobs_dir)
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
