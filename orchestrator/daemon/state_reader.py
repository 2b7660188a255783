"""`ltx2 status`, `jobs` and `logs` without a daemon: the state dir's job directories, read directly.

When no daemon answers, the command line asks a StateDirReader instead of a DaemonClient: it answers
the same requests with the same data (orchestrator.daemon.job_views builds both), from the job
directories alone, which are the truth (DESIGN.md rule 1), so it sees every job of the state dir,
whoever ran it. It only reads: job.json, events.log and the worker logs. It never takes the daemon's
lock (daemon.lock), never touches a job's lock, and never opens the sqlite store, which is only a
mirror of the job directories and whose WAL mode may create files even for a reader.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from orchestrator.daemon import job_views
from orchestrator.daemon.client import DaemonError
from orchestrator.daemon.job_views import MAX_LIST, Listed, UnknownJob
from orchestrator.daemon.replies import fit_listing
from protocol import codec, jobs
from protocol.codec import ErrorCode


class StateDirReader:
    """Answers the daemon's read requests (status, list, logs) from the job directories under
    `jobs_dir`; anything else needs the daemon."""

    def __init__(self, jobs_dir: Path) -> None:
        self.jobs_dir = jobs_dir

    def request(self, message: codec.Message) -> dict[str, Any]:
        """The `ok` data the daemon would reply to `message`; DaemonError as its error reply would be."""
        if isinstance(message, jobs.Status):
            return {"job": job_views.summary(*self.find(message.id), detailed=True, progress=None)}
        if isinstance(message, jobs.ListJobs):
            listed = job_views.jobs_outside(self.jobs_dir, set(), max(1, min(message.limit, MAX_LIST)))
            return fit_listing([job_views.summary(*entry, detailed=False, progress=None) for entry in listed])
        if isinstance(message, jobs.Logs):
            row, _ = self.find(message.id)
            return job_views.logs_reply(Path(row["job_dir"]), message.lines)
        raise DaemonError(f"{message.TYPE} needs the daemon, and none answers")

    def find(self, job_id: str) -> Listed:
        """A job's row and directory; DaemonError not_found (naming the nearest ids) when there is none."""
        try:
            path = job_views.job_path(self.jobs_dir, job_id)
        except UnknownJob as exc:
            raise DaemonError(str(exc), ErrorCode.NOT_FOUND, "id") from None
        job = job_views.load_job(path)
        if job is None:
            raise DaemonError(f"job {job_id}: job.json unreadable", ErrorCode.CONFLICT)
        return job_views.directory_row(job), job
