"""Run one job: its stages in order, each in its own process, then publish the MP4.

A stage whose outputs verify against job.json is skipped, so running a job again after a crash
resumes at the first unfinished stage. The finished video is published to the output folder as
`<name>_<YYYYmmdd_HHMMSS>.mp4` once (orchestrator.publishing).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from config.settings import Settings
from orchestrator.jobdir import JobDir
from orchestrator.policy import Attempt, describe_plan, initial_plan, next_plan
from orchestrator.publishing import publish_job
from orchestrator.runner import (
    SpawnedWorker,
    StageOutcome,
    StageSettings,
    WorkerLink,
    discard_worker,
    run_stage,
    spawn_worker,
)
from protocol import codec
from protocol.errors import Failure
from protocol.files import STAGE_ORDER, Stage


class JobFailed(Exception):
    """A stage failed and no lower-memory plan is left; `failure` says how."""

    def __init__(self, stage: Stage, outcome: StageOutcome, reason: str) -> None:
        self.stage = stage
        self.failure = outcome.failure or Failure.CRASH
        self.outcome = outcome
        self.reason = reason
        super().__init__(f"stage {stage.value} failed ({self.failure.value}): {reason}")


@dataclasses.dataclass(frozen=True)
class StageEvent:
    """Orchestrator-side events for progress displays (stage skipped, attempt started/ended)."""

    stage: str
    kind: str  #: "skipped", "started", "succeeded", "failed" (a retry may follow)
    attempt: int = 0
    detail: str = ""


Listener = Callable[[codec.Message | StageEvent], None]


@dataclasses.dataclass
class JobHooks:
    """How a caller follows a job: events for displays, cancellation, and bookkeeping callbacks."""

    listener: Listener = lambda event: None
    should_cancel: Callable[[], bool] = lambda: False
    on_spawn: Callable[[int], None] = lambda pid: None
    on_attempt: Callable[[Stage, int, dict[str, Any], StageOutcome], None] = lambda *args: None
    #: called as the job's last stage starts; the daemon prestarts the next job's first worker
    on_last_stage: Callable[[], None] = lambda: None


def run_job(
    job: JobDir,
    settings: Settings,
    link: WorkerLink,
    hooks: JobHooks,
    prestarted: SpawnedWorker | None = None,
    target: Path | None = None,
) -> Path:
    """Run every unfinished stage, retrying per the policy, then publish; returns the MP4's path.

    Stages before the first one whose outputs fail to verify are skipped; that stage and every
    later one run, since later outputs derive from earlier ones. While a stage runs, the next
    stage's worker is already started (imports done, waiting for GO), so its start-up overlaps;
    `prestarted` is such a worker for this job's first stage, started during the previous job.
    """
    pending = pending_stages(job, hooks)
    try:
        for index, stage in enumerate(pending):
            following = pending[index + 1] if index + 1 < len(pending) else None
            if following is None:
                hooks.on_last_stage()
            prestarted = run_stage_until_done(job, stage, settings, link, hooks, prestarted, following)
    finally:
        discard_worker(prestarted, link, job.id)
    return finish_job(job, settings, hooks, target)


def pending_stages(job: JobDir, hooks: JobHooks) -> list[Stage]:
    """The stages left to run: from the first one whose outputs fail to verify to the end.

    Stages before it are reported as skipped; it and every later stage are invalidated, since
    later outputs derive from earlier ones.
    """
    first = first_unfinished(job)
    for stage in STAGE_ORDER[:first]:
        job.mark_skipped(stage)
        hooks.listener(StageEvent(stage.value, "skipped"))
    for stage in STAGE_ORDER[first:]:
        job.invalidate(stage)
    return list(STAGE_ORDER[first:])


def first_unfinished(job: JobDir) -> int:
    """Index in STAGE_ORDER of the job's first stage whose outputs do not verify (len if none)."""
    return next((i for i, stage in enumerate(STAGE_ORDER) if not job.has_outputs(stage)), len(STAGE_ORDER))


def finish_job(job: JobDir, settings: Settings, hooks: JobHooks, target: Path | None = None) -> Path:
    """Publish a job whose stages all succeeded, mark it done, flush caches if asked; the MP4's path."""
    output = publish_job(job, settings.output_dir, target)
    job.finish("done", output=str(output))
    if job.spec.drop_caches and (warning := drop_page_cache()):
        job.log_event("warning", message=warning)
        hooks.listener(StageEvent("publish", "warning", 0, warning))
    return output


def next_attempt(job: JobDir, stage: Stage, settings: Settings) -> tuple[int, dict[str, Any]]:
    """(number, plan) of a stage's next attempt.

    A stage whose last attempt failed or was interrupted resumes with that attempt's plan (a
    lower-memory plan found earlier stays); otherwise the plan comes from the spec, so a re-run
    after changing decode settings (`ltx2 decode --vae-chunk-frames`) uses the new ones.
    """
    previous = job.stage_record(stage)["attempts"]
    if previous and previous[-1]["result"] not in ("ok", "cancelled"):
        return len(previous) + 1, previous[-1]["plan"]
    return len(previous) + 1, initial_plan(stage, job.spec, settings)


def run_stage_until_done(
    job: JobDir,
    stage: Stage,
    settings: Settings,
    link: WorkerLink,
    hooks: JobHooks,
    prestarted: SpawnedWorker | None = None,
    following: Stage | None = None,
) -> SpawnedWorker | None:
    """Attempt a stage until it succeeds (returns the next stage's prestarted worker) or the policy
    gives up (JobFailed)."""
    stage_settings = StageSettings(settings.heartbeat_s, settings.hung_after_s, settings.stderr_tail_lines)
    _, plan = next_attempt(job, stage, settings)
    history: list[Attempt] = []
    next_worker: SpawnedWorker | None = None

    def prestart_following(pid: int) -> None:
        nonlocal next_worker
        hooks.on_spawn(pid)
        if following is not None and next_worker is None:
            next_worker = spawn_worker(
                job, following, *next_attempt(job, following, settings), link, settings.heartbeat_s
            )

    try:
        while True:
            attempt = job.start_attempt(stage, plan)
            hooks.listener(StageEvent(stage.value, "started", attempt, describe_plan(stage, plan)))
            outcome = run_stage(
                job,
                stage,
                attempt,
                plan,
                link,
                stage_settings,
                hooks.listener,
                hooks.should_cancel,
                prestart_following,
                prestarted,
            )
            prestarted = None
            record_outcome(job, stage, outcome)
            hooks.on_attempt(stage, attempt, plan, outcome)
            if outcome.ok:
                hooks.listener(StageEvent(stage.value, "succeeded", attempt, f"{outcome.seconds:.1f} s"))
                handed_over, next_worker = next_worker, None
                return handed_over
            history.append(Attempt(plan, outcome.failure))
            plan = next_plan(stage, history, job.spec, settings)
            hooks.listener(StageEvent(stage.value, "failed", attempt, f"{outcome.failure.value}: {outcome.reason}"))
            if plan is None:
                raise job_failed(job, stage, outcome, len(history))
    finally:
        discard_worker(next_worker, link, job.id)


def job_failed(job: JobDir, stage: Stage, outcome: StageOutcome, attempts: int) -> JobFailed:
    """Record the job's end; returns the JobFailed (with a readable reason) for the caller to raise."""
    reason = outcome.reason
    if outcome.failure.is_retryable:
        reason += f" (after {attempts} attempt(s); no lower-memory plan left)"
    job.finish("cancelled" if outcome.failure is Failure.CANCELLED else "failed", error=reason)
    return JobFailed(stage, outcome, reason)


def record_outcome(job: JobDir, stage: Stage, outcome: StageOutcome) -> None:
    """Write an attempt's result into job.json."""
    job.finish_attempt(
        stage,
        "ok" if outcome.ok else outcome.failure.value,
        returncode=outcome.returncode,
        reason=outcome.reason,
        seconds=round(outcome.seconds, 3),
        peak_gpu_bytes=outcome.peak_gpu_bytes,
        peak_rss_bytes=outcome.peak_rss_bytes,
    )


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
