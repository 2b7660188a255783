"""What `ltx2 status`, `jobs` and `logs` show of jobs, read from their directories.

The daemon answers with these (orchestrator.daemon.server), and so does the command line when no
daemon answers and it reads the state dir itself (orchestrator.daemon.state_reader): one shape,
whoever reads it. A job is found by its id among the job directories, so a job the daemon's store
does not hold (one that `ltx2 generate` or `batch` ran into the same state dir, which the daemon
never runs) is still shown; job.json, the truth, gives the state shown.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from orchestrator.run import reuse
from orchestrator.run.jobdir import (
    JOB_ID_PATTERN,
    JobDir,
    describe_owner,
    is_alive,
    job_ids,
    tail,
    unknown_job_message,
)
from orchestrator.run.policy import describe_plan
from protocol.extension import joined_frames
from protocol.files import EVENTS_FILE, JOB_FILE, Stage
from protocol.retake import LATENTS_SOURCE

# The most jobs one listing shows (the protocol's frame bounds it further: replies.fit_listing).
MAX_LIST = 1000
# The most lines of a log one `logs` reply carries.
MAX_LOG_LINES = 1000
#: A job as listed: its row (the store's columns: id, state, job_dir, created, updated, error, output)
#: and its directory, None when its job.json cannot be read.
Listed = tuple[dict[str, Any], JobDir | None]


class UnknownJob(LookupError):
    """No job directory has this id; the message names the closest ids and how to list them."""


def job_path(jobs_dir: Path, job_id: str) -> Path:
    """The directory of job `job_id`; UnknownJob when none has a job.json. Only an id of the form the
    orchestrator makes is looked up, so a client's id never names another path."""
    path = jobs_dir / job_id
    if JOB_ID_PATTERN.fullmatch(job_id) and (path / JOB_FILE).is_file():
        return path
    raise UnknownJob(unknown_job_message(jobs_dir, job_id))


def load_job(path: Path) -> JobDir | None:
    """The job directory at `path`, or None when its job.json cannot be read (a listing shows the rest)."""
    try:
        return JobDir.load(path)
    except (OSError, ValueError, KeyError):
        return None


def directory_row(job: JobDir) -> dict[str, Any]:
    """A job's row as the store has it, read from its job.json: for jobs the store does not hold."""
    record = job.record
    try:
        updated = dt.datetime.fromtimestamp((job.path / JOB_FILE).stat().st_mtime, dt.UTC)
    except OSError:
        updated = dt.datetime.now(dt.UTC)
    return {
        "id": job.id,
        "state": record.status,
        "job_dir": str(job.path),
        "created": record.created,
        "updated": updated.isoformat(timespec="milliseconds"),
        "error": record.error or "",
        "output": record.output or "",
    }


def jobs_outside(jobs_dir: Path, known: set[str], limit: int) -> list[Listed]:
    """The newest `limit` jobs whose ids are not in `known` (the store's ids; empty: every job), read
    from their directories; one whose job.json cannot be read is left out."""
    listed: list[Listed] = []
    for job_id in reversed(job_ids(jobs_dir)):
        if len(listed) >= limit:
            break
        if job_id not in known and (job := load_job(jobs_dir / job_id)) is not None:
            listed.append((directory_row(job), job))
    return listed


def newest(listed: list[Listed], limit: int) -> list[Listed]:
    """The `limit` most recently created of `listed`, oldest first (the order `ltx2 jobs` prints)."""
    return sorted(listed, key=lambda entry: (entry[0]["created"], entry[0]["id"]))[-limit:]


def summary(row: dict[str, Any], job: JobDir | None, detailed: bool, progress: dict[str, Any] | None) -> dict[str, Any]:
    """What `status` (`detailed`) and `jobs` show about a job: its row, with what job.json says."""
    result = {key: row[key] for key in ("id", "state", "created", "updated", "error", "output")}
    if job is None:
        result["prompt"] = "(job.json unreadable)"
    else:
        record, spec = job.record, job.spec
        # job.json is the truth; a store row follows it a moment later (JobDir.transition, then mirror).
        result.update(state=record.status, error=record.error or "", output=record.output or "")
        result["prompt"] = spec.prompt
        _, _, width, height = spec.crop_box  # as delivered: a crop's size, not the rendered one
        result["size"] = f"{width}x{height}x{spec.num_frames}"
        result["delivered_frames"] = delivered_frames(job)
        result["seed"] = spec.seed
        result["fps"] = spec.fps
        result["model"] = spec.model
        if record.extension is not None:  # what an extension's `seconds` counts: the frames after the overlap
            result["extension"] = {"overlap": record.extension.overlap, "source_frames": record.extension.frames}
        if record.retake is not None and record.retake.kind == LATENTS_SOURCE:  # the finished job it retakes
            result["retake_of"] = record.retake.source
        result["request_digest"] = record.request_digest
        result["failure"] = record.failure  # protocol.errors.Failure's value: the one vocabulary
        result["owner"] = job.owner_command
        result["waits_for"] = record.waits_for.job if record.waits_for else None  # WAITING: the job it extends
        if detailed:
            result["reproducible"] = reproducibility_if_judged(job)
            result["runner"] = runner_summary(job)
    if detailed:
        result["job_dir"] = row["job_dir"]
        result["attempts"] = attempt_summaries(job) if job else []
        result["progress"] = progress
    return result


def delivered_frames(job: JobDir) -> int:
    """The frames of the video a job publishes: an extension's is the source joined to the new part's frames
    after the overlap (protocol/extension.py), every other job's its spec's frame count."""
    extension = job.record.extension
    if extension is None:
        return job.spec.num_frames
    return joined_frames(extension.frames, job.spec.num_frames, extension.overlap)


def reproducibility_if_judged(job: JobDir) -> dict[str, Any] | None:
    """reuse.reproducibility, or None for a record it cannot judge (a hand-edited digest's inputs)."""
    try:
        return reuse.reproducibility(job)
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def runner_summary(job: JobDir) -> dict[str, Any] | None:
    """The process that runs the job (or last did, or made it): `alive` says whether it still runs;
    None for a job recorded before owners were."""
    owner = job.record.owner
    if owner is None:
        return None
    return {
        "command": owner.command,
        "pid": owner.pid,
        "host": owner.host,
        "alive": is_alive(owner),
        "described": describe_owner(owner),
    }


def attempt_summaries(job: JobDir) -> list[dict[str, Any]]:
    """Every attempt of every stage, from job.json, in the order they started."""
    rows = [
        {
            "stage": stage.value,
            "attempt": attempt.attempt,
            "result": attempt.result,
            "reason": attempt.reason or "",
            "seconds": float(attempt.seconds or 0.0),  # from GO: the stage's own time
            "waited_s": float(attempt.waited_s or 0.0),  # its worker's wait for GO (started ahead)
            "plan": describe_plan_text(stage, attempt.plan),
            "started": attempt.started,
            "device": attempt.device or "",
            "lane": attempt.lane or 0,
            "host": attempt.host or "",  # a farm's node, once Ray placed the stage
            "peak_gpu_bytes": attempt.peak_gpu_bytes or 0,
            "peak_rss_bytes": attempt.peak_rss_bytes or 0,
        }
        for stage, record in job.record.stages.items()
        for attempt in record.attempts
    ]
    return sorted(rows, key=lambda row: row["started"])


def describe_plan_text(stage: Stage, plan: dict[str, Any]) -> str:
    """A plan in words; a plan this version cannot describe (a hand-edited job.json) as it is."""
    try:
        return describe_plan(stage, plan)
    except (ValueError, KeyError, TypeError):
        return str(plan)


def logs_reply(job_dir: Path, lines: int) -> dict[str, Any]:
    """What `ltx2 logs` shows: the last `lines` of events.log and of the latest worker log."""
    lines = max(1, min(lines, MAX_LOG_LINES))
    worker_logs = sorted((job_dir / "logs").glob("*.log"), key=lambda path: path.stat().st_mtime)
    latest = worker_logs[-1] if worker_logs else None
    return {
        "events": tail(job_dir / EVENTS_FILE, lines),
        "worker_log_name": latest.name if latest else "",
        "worker_log": tail(latest, lines) if latest else "",
    }
