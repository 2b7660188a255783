"""One job's steps: find its unfinished stages, attempt a stage until the policy is done with it,
publish the MP4. orchestrator.run.stage_major runs them for one job or many; every way a run ends
(a failed attempt the policy gives up on, a cancel, a failed publish, DONE) is carried out by
orchestrator.run.job_end.

A stage whose outputs verify against job.json is skipped, so running a job again after a crash
resumes at the first unfinished stage. The finished video is published to the output folder as
`<name>_<YYYYmmdd-HHMMSS>.mp4` once (orchestrator.run.publishing).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from config.settings import Settings
from orchestrator.placement.worker_link import SpawnedWorker, WorkerLink, discard_worker
from orchestrator.run import reuse
from orchestrator.run.job_end import after_failed_attempt, cancelled_before_publish, mark_done, publish_failed
from orchestrator.run.job_hooks import JobHooks, StageEvent
from orchestrator.run.jobdir import JobDir
from orchestrator.run.policy import Attempt, initial_plan
from orchestrator.run.publishing import publish_job
from orchestrator.run.runner import StageOutcome, spawn_worker
from orchestrator.run.stage_attempt import run_attempt
from orchestrator.run.states import AttemptResult, EventKind, StageEventKind
from protocol.errors import Failure
from protocol.fault_points import fault_point
from protocol.files import STAGE_ORDER, Stage


def pending_stages(job: JobDir, hooks: JobHooks) -> list[Stage]:
    """The stages left to run: from the first one whose outputs fail to verify to the end.

    Stages before it are reported as skipped; it and every later stage are invalidated, since
    later outputs derive from earlier ones.
    """
    first = first_unfinished(job)
    for stage in STAGE_ORDER[:first]:
        job.mark_skipped(stage)
        hooks.listener(StageEvent(stage.value, StageEventKind.SKIPPED))
    for stage in STAGE_ORDER[first:]:
        job.invalidate(stage)
    return list(STAGE_ORDER[first:])


def first_unfinished(job: JobDir) -> int:
    """Index in STAGE_ORDER of the job's first stage whose outputs do not verify (len if none)."""
    return next((i for i, stage in enumerate(STAGE_ORDER) if not job.has_outputs(stage)), len(STAGE_ORDER))


def finish_job(job: JobDir, settings: Settings, hooks: JobHooks, target: Path | None = None) -> Path:
    """Publish a job whose stages all succeeded, mark it done, flush caches if asked; the MP4's path.

    A cancel that came in after the last stage's worker ended still wins until publishing begins
    (the job ends CANCELLED, JobStopped); from then on it is answered "too late" (JobDir.request_cancel).
    A publish that fails (the output folder is full, read-only or gone) ends the job FAILED with
    the command that recovers the video (orchestrator.run.job_end.publish_failed); it is never left RUNNING.
    """
    fault_point("job.before_publish", job_id=job.id, job_name=job.spec.name)
    if not job.commit_to_finish():
        raise cancelled_before_publish(job)
    fault_point("job.publishing", job_id=job.id, job_name=job.spec.name)
    try:
        output = publish_job(job, settings.output_dir, target)
    except OSError as exc:
        raise publish_failed(job, exc, target.parent if target else settings.output_dir) from exc
    mark_done(job, output)
    try:  # a render of exactly its request is found again by its digest (`--reuse`)
        reuse.remember(job, settings.state_dir)
    except OSError as exc:  # the video is out; only a later --reuse misses it
        job.log_event(EventKind.WARNING, message=f"not indexed for --reuse: {exc}")
    if job.spec.drop_caches and (warning := drop_page_cache()):
        job.log_event(EventKind.WARNING, message=warning)
        hooks.listener(StageEvent("publish", StageEventKind.WARNING, 0, warning))
    return output


def next_attempt(job: JobDir, stage: Stage, settings: Settings) -> tuple[int, dict[str, Any]]:
    """(number, plan) of a stage's next attempt.

    A stage whose last attempt failed or was interrupted resumes with that attempt's plan (a
    lower-memory plan found earlier stays); otherwise the plan comes from the spec, so a re-run
    after changing decode settings (`ltx2 decode --vae-chunk-frames`) uses the new ones.
    """
    previous = job.stage_record(stage).attempts
    if previous and previous[-1].result not in (AttemptResult.OK, AttemptResult.CANCELLED):
        return len(previous) + 1, previous[-1].plan
    return len(previous) + 1, initial_plan(stage, job.spec, settings, job.deterministic)


def run_stage_until_done(
    job: JobDir,
    stage: Stage,
    settings: Settings,
    link: WorkerLink,
    hooks: JobHooks,
    prestarted: SpawnedWorker | None = None,
    following: Stage | None = None,
    history: tuple[Attempt, ...] = (),
) -> SpawnedWorker | None:
    """Attempt a stage until it succeeds (returns the next stage's prestarted worker) or the policy
    ends the job (JobStopped). `history` holds attempts this run already made elsewhere (a failed
    stage-major group attempt), so the policy sees them."""
    fault_point("job.before_stage", job_id=job.id, job_name=job.spec.name, stage=stage.value)
    attempts = list(history)
    plan = next_attempt(job, stage, settings)[1]
    next_worker: SpawnedWorker | None = None

    def prestart_following() -> None:
        nonlocal next_worker
        if following is not None and next_worker is None and link.prestarts:
            next_worker = spawn_worker(
                job, following, *next_attempt(job, following, settings), link, settings.heartbeat_s
            )

    try:
        while True:
            if why := hooks.should_stop():  # no worker is started for a job already told to stop
                outcome = StageOutcome(0, why, "stopped before the stage started", "", 0.0)
            else:
                adopted, prestarted = prestarted, None  # the attempt adopts it or stops it
                outcomes = run_attempt([job], stage, plan, settings, link, lambda _: hooks, adopted, prestart_following)
                outcome = outcomes.get(job.id) or StageOutcome(
                    0, Failure.INTERRUPTED, "stopped with its group", "", 0.0
                )
            if outcome.ok:
                handed_over, next_worker = next_worker, None
                return handed_over
            attempts.append(Attempt(plan, outcome.failure))
            plan = after_failed_attempt(job, stage, attempts, outcome, settings)
            hooks.before_retry(stage, outcome.failure)
    finally:
        # The worker started ahead for this stage, if no attempt took it (the job was stopped
        # before the stage began), and the one started for the next stage, if this one never ended
        # well: each waits for a GO that will not come.
        discard_worker(prestarted, link)
        discard_worker(next_worker, link)


def drop_page_cache() -> str:
    """Flush the kernel page cache (needs root); returns a warning, or "" when it worked.

    Only called after the job's last file is written: on unified-memory machines model weights
    can still be backed by cached pages while a model is alive, and every model is gone by then.
    """
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as handle:
            handle.write("3\n")
    except OSError as exc:
        return f"warning: --drop-caches: could not drop the page cache ({exc.strerror}); needs root"
    return ""
