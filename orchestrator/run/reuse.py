"""Finished renders found by their request digest: `--reuse` returns one instead of rendering again.

A job is kept for reuse when it ended DONE, published, and rendered exactly what its request names:
every stage's every attempt ran the plan recorded with the digest (`reproducibility`). A job that
finished on a lower-memory plan after an OOM (FP8 weights, tiled decode), whose latents were adopted
from a file, or whose request changed after it was digested made other bits than a fresh render of
its request would, so it is never returned for one.

The index is one small file per digest, `<state>/digests/<digest>`, holding the job id of the last
such job; finding one re-checks the job on disk (state, digest, the published MP4 still there at
its recorded size), so a deleted or re-rendered job is never returned.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from config.settings import Settings
from orchestrator.run.jobdir import JobDir
from orchestrator.run.policy import describe_plan
from orchestrator.run.states import JobState
from protocol.files import Stage, publish, temp_path_for

DIGESTS_DIR = "digests"


def reproducibility(job: JobDir) -> dict[str, Any]:
    """`{"exact": bool, "why": str}`: whether the job's files are what a fresh render of its request makes.

    "why" names the first reason it is not (empty when it is), for the sidecar and `ltx2 status`.
    """
    inputs = job.record.digest_inputs
    if not job.record.request_digest or inputs is None:
        return {"exact": False, "why": "no request digest (created before digests, or its spec changed since)"}
    if not inputs.get("deterministic"):
        return {"exact": False, "why": "rendered with [worker] deterministic = false"}
    for stage in Stage:
        wanted = canonical(inputs["plans"].get(stage.value))
        for attempt in job.stage_record(stage).attempts:
            plan = attempt.plan
            if canonical(plan) == wanted:
                continue
            if plan == {}:
                return {"exact": False, "why": f"its {stage.value} outputs were adopted from a file"}
            label = describe_plan(stage, plan)
            return {"exact": False, "why": f"{stage.value} ran on another plan than its request's ({label})"}
    return {"exact": True, "why": ""}


def canonical(plan: object) -> str:
    """A plan as JSON text: job.json gives lists where a fresh plan may hold tuples."""
    return json.dumps(plan, sort_keys=True)


def remember(job: JobDir, state_dir: Path) -> bool:
    """Index a DONE, published job under its digest if it rendered exactly its request; True if it was."""
    digest = job.record.request_digest
    if not digest or not reproducibility(job)["exact"]:
        return False
    entry = state_dir / DIGESTS_DIR / digest
    entry.parent.mkdir(parents=True, exist_ok=True)
    temp = temp_path_for(entry)
    temp.write_text(job.id)
    publish(temp, entry)
    return True


def find(digest: str, settings: Settings) -> JobDir | None:
    """The last job indexed under `digest` if it still holds a published render of that request."""
    try:
        job_id = (settings.state_dir / DIGESTS_DIR / digest).read_text().strip()
    except OSError:
        return None
    if not job_id or "/" in job_id or job_id.startswith("."):
        return None
    try:
        job = JobDir.load(settings.jobs_dir / job_id)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if job.state is not JobState.DONE or job.record.request_digest != digest:
        return None
    return job if published_video(job) is not None else None


def published_video(job: JobDir) -> Path | None:
    """The job's published MP4 if its publish finished and every file of it is still in place."""
    record = job.record.publish
    if record is None or not record.complete:
        return None
    video = Path(record.video)
    if not all(Path(name).is_file() for name in record.files):
        return None
    return video if video.stat().st_size == record.source["size"] else None


def describe(job: JobDir) -> str:
    """One line naming the reused job, for the CLI and the daemon's notices."""
    return f"reused job {job.id} (request digest {str(job.record.request_digest)[:16]}..., seed {job.spec.seed})"
