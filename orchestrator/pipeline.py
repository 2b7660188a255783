"""Run one job: its stages in order, each in its own process, then publish the MP4.

A stage whose outputs verify against job.json is skipped, so running a job again after a crash
resumes at the first unfinished stage. The finished video is copied to the output folder as
`<name>_<YYYYmmdd_HHMMSS>.mp4`.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import itertools
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from config.settings import Settings
from orchestrator.jobdir import JobDir
from orchestrator.policy import Attempt, describe_plan, initial_plan, next_plan
from orchestrator.runner import StageOutcome, StageSettings, WorkerLink, run_stage
from protocol import codec
from protocol.errors import Failure
from protocol.files import STAGE_ORDER, VIDEO_FILE, Stage


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


def run_job(job: JobDir, settings: Settings, link: WorkerLink, hooks: JobHooks) -> Path:
    """Run every unfinished stage, retrying per the policy, then publish; returns the MP4's path."""
    for stage in STAGE_ORDER:
        if job.has_outputs(stage):
            job.mark_skipped(stage)
            hooks.listener(StageEvent(stage.value, "skipped"))
            continue
        run_stage_until_done(job, stage, settings, link, hooks)
    output = publish_video(job, settings.output_dir)
    job.finish("done", output=str(output))
    return output


def run_stage_until_done(job: JobDir, stage: Stage, settings: Settings, link: WorkerLink, hooks: JobHooks) -> None:
    """Attempt a stage until it succeeds or the policy gives up (then JobFailed)."""
    stage_settings = StageSettings(settings.heartbeat_s, settings.hung_after_s, settings.stderr_tail_lines)
    previous = job.stage_record(stage)["attempts"]
    # A resumed stage starts from its last plan: a lower-memory plan found earlier stays.
    plan = previous[-1]["plan"] if previous else initial_plan(stage, job.spec, settings)
    history: list[Attempt] = []
    while True:
        attempt = job.start_attempt(stage, plan)
        hooks.listener(StageEvent(stage.value, "started", attempt, describe_plan(stage, plan)))
        outcome = run_stage(
            job, stage, attempt, plan, link, stage_settings, hooks.listener, hooks.should_cancel, hooks.on_spawn
        )
        record_outcome(job, stage, outcome)
        hooks.on_attempt(stage, attempt, plan, outcome)
        if outcome.ok:
            hooks.listener(StageEvent(stage.value, "succeeded", attempt, f"{outcome.seconds:.1f} s"))
            return
        history.append(Attempt(plan, outcome.failure))
        following = next_plan(stage, history, job.spec, settings)
        hooks.listener(StageEvent(stage.value, "failed", attempt, f"{outcome.failure.value}: {outcome.reason}"))
        if following is None:
            exhausted = outcome.failure.is_retryable
            reason = (
                f"{outcome.reason} (after {len(history)} attempt(s); no lower-memory plan left)"
                if exhausted
                else outcome.reason
            )
            job.finish("cancelled" if outcome.failure is Failure.CANCELLED else "failed", error=reason)
            raise JobFailed(stage, outcome, reason)
        plan = following


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


def publish_video(job: JobDir, output_dir: Path, now: dt.datetime | None = None) -> Path:
    """Copy the job's MP4 to `output_dir/<name>_<YYYYmmdd_HHMMSS>.mp4`, never overwriting.

    The copy is made under a temp name, then hard-linked to the first free name: a link fails if
    the name exists, so two jobs finishing in the same second cannot overwrite each other.
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    stamp = f"{(now or dt.datetime.now()):%Y%m%d_%H%M%S}"
    temp = output_dir / f".{job.id}.mp4.tmp"
    shutil.copyfile(job.path / VIDEO_FILE, temp)
    os.chmod(temp, 0o644)
    with temp.open("rb") as handle:
        os.fsync(handle.fileno())
    try:
        for counter in itertools.count():
            suffix = f"_{counter}" if counter else ""
            target = output_dir / f"{job.spec.name}_{stamp}{suffix}.mp4"
            try:
                os.link(temp, target)
            except FileExistsError:
                continue
            return target.resolve()
    finally:
        temp.unlink(missing_ok=True)
    raise AssertionError("unreachable")
