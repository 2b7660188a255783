"""The one place a run of a job ends (DESIGN.md rule 7; STYLE.md §7, arq's single `finish_job`).

Every way a run can end names what happened in the one failure vocabulary (protocol.errors.Failure),
asks the policy what follows (orchestrator.run.policy: `decide` after a stage attempt, `decide_run_end`
otherwise) and is carried out by `end_run`, which closes the attempts still open, writes the state, the
error and the failure through JobDir.transition (the single writer; the daemon's sqlite row mirrors
it) and hands back the JobStopped its caller raises or reports:

- a stage attempt failed (a worker's exit, kill or hang, a cancel, Ctrl-C), for a job alone or a
  group member: `after_failed_attempt`, the failure from the exit; a plan to retry, or the run ends
  FAILED, CANCELLED or QUEUED;
- a cancel came after the last stage, before publishing: `cancelled_before_publish` (cancelled);
- publishing failed, the output folder full, read-only or missing: `publish_failed` (no_space or
  invalid_input); FAILED, the video kept in the job;
- the orchestrator broke on the job, a bug: `internal_error` (internal), called by the daemon's
  executor; FAILED;
- the orchestrator stopped or died mid-run, found at the next start: `take_job` and the daemon's
  `resume` through `release_orphaned` (its workers stopped), or the daemon's recovery through
  `requeue_orphan` (interrupted); QUEUED, or CANCELLED if a cancel was asked;
- a person cancelled a job that was not running: `cancel_waiting` (cancelled);
- a WAITING job can never be built, as the job it extends failed or was cancelled, or its request no
  longer builds against that job's video: `fail_waiting` (invalid_input); FAILED;
- every stage and the publish succeeded: `mark_done`; DONE.

What does not end here: a daemon row whose job.json cannot be read is marked failed in sqlite alone
(orchestrator/daemon/store.py `mark_unreadable`), as there is no record to write; a job entering
RUNNING (a claim) or QUEUED by a person's resume is a start. tests/test_job_end.py holds the rule: no
other module moves a job to FAILED, CANCELLED or DONE, calls the policy or closes running attempts.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from config.settings import Settings
from orchestrator.placement.processes import kill_orphan
from orchestrator.run.jobdir import CANCEL_REASON, JobDir, describe_owner
from orchestrator.run.policy import Attempt, Decision, decide, decide_run_end
from orchestrator.run.runner import StageOutcome
from orchestrator.run.states import AttemptResult, JobState, TransitionError
from protocol.errors import Failure, is_no_space
from protocol.files import STAGE_ORDER, Stage
from protocol.job_record import AttemptRecord


class JobStopped(Exception):
    """The run stopped without a video, by the policy's decision: `job_state` says how (FAILED;
    CANCELLED on request; QUEUED again when the orchestrator was interrupted, to be resumed), `failure`
    why, in the one vocabulary; `stage` is the stage it stopped in (None: outside any stage's attempt).
    Not every stop is a failure, hence the name."""

    def __init__(
        self, stage: Stage | None, outcome: StageOutcome, decision: Decision, publishing: bool = False
    ) -> None:
        self.stage = stage
        self.failure = outcome.failure or Failure.CRASH
        self.outcome = outcome
        self.reason = decision.reason
        self.job_state = decision.job_state or JobState.FAILED
        where = "publishing" if publishing else f"stage {stage.value}" if stage else "the run"
        # A failed publish says only its reason, which names the folder and the command that recovers
        # the video; a stage's stop names the stage and the failure first.
        super().__init__(self.reason if publishing else f"{where} failed ({self.failure.value}): {self.reason}")


def end_run(
    job: JobDir, stage: Stage | None, outcome: StageOutcome, decision: Decision, publishing: bool = False
) -> JobStopped:
    """Carry out the policy's end of a run: close the job's attempts still running (with the run's
    failure), move it to the decided state with the reason and the failure; the JobStopped to raise."""
    assert decision.job_state is not None, "a decision to retry does not end the run"
    # A run that ends CANCELLED was cancelled, whatever stopped its worker (a dead orchestrator's run
    # whose cancel a person was promised is carried out as a cancel).
    failure = Failure.CANCELLED if decision.job_state is JobState.CANCELLED else outcome.failure or Failure.CRASH
    job.close_running_attempts(failure, decision.reason)
    job.transition(decision.job_state, error=decision.reason, failure=failure)
    return JobStopped(stage, dataclasses.replace(outcome, failure=failure), decision, publishing)


def after_failed_attempt(
    job: JobDir, stage: Stage, attempts: list[Attempt], outcome: StageOutcome, settings: Settings
) -> dict[str, Any]:
    """The plan of the stage's next attempt after the last of `attempts` failed with `outcome`;
    raises the JobStopped when the policy ends the run instead."""
    decision = decide(stage, attempts, outcome.reason, job.spec, settings)
    if decision.plan is not None:
        return decision.plan
    raise end_run(job, stage, outcome, decision)


def end_without_attempt(
    job: JobDir, stage: Stage | None, failure: Failure, reason: str, publishing: bool = False
) -> JobStopped:
    """End a run for something other than a stage attempt (see `decide_run_end`)."""
    outcome = StageOutcome(0, failure, reason, "", 0.0)
    decision = decide_run_end(failure, reason, cancel_requested=job.cancel_requested)
    return end_run(job, stage, outcome, decision, publishing)


def cancelled_before_publish(job: JobDir) -> JobStopped:
    """A cancel recorded after the last stage's worker ended but before publishing began: it wins."""
    return end_without_attempt(job, STAGE_ORDER[-1], Failure.CANCELLED, CANCEL_REASON)


def publish_failed(job: JobDir, error: OSError, folder: Path) -> JobStopped:
    """Every stage succeeded but the MP4 could not be copied out (a full, read-only or missing output
    folder): FAILED, with the video kept in the job and the command that recovers it."""
    failure = Failure.NO_SPACE if is_no_space(error) else Failure.INVALID_INPUT
    reason = (
        f"cannot publish the video to {failed_folder(error, folder)}: {error.strerror or error}; it is kept in "
        f"the job, recover it with: ltx2 decode --input {job.path} --output PATH.mp4"
    )
    return end_without_attempt(job, STAGE_ORDER[-1], failure, reason, publishing=True)


def failed_folder(error: OSError, folder: Path) -> Path:
    """The folder a publish could not write: where its file was going (a copy's error names the
    job's file it read first and the destination second), else the output folder."""
    name = error.filename2 or error.filename
    return Path(name).parent if name else folder


def internal_error(job: JobDir, error: str) -> None:
    """The orchestrator itself broke on the job (a bug): its open attempts closed, the run FAILED.
    A job no longer running (its run ended before the error) keeps that end."""
    if job.state is JobState.RUNNING:
        end_without_attempt(job, running_stage(job), Failure.INTERNAL, error)


class JobBusy(Exception):
    """The job is running in another live process (the daemon, or another `ltx2` command): two
    orchestrators must never run one job."""

    def __init__(self, job: JobDir) -> None:
        runner = job.live_runner()
        who = describe_owner(runner) if runner else "another process"
        super().__init__(f"job {job.id} is running in {who}; wait for it to end, or stop it there first")


class JobWaiting(Exception):
    """The job still waits for the job it extends: its request is not built yet, and only the daemon
    builds it (orchestrator/daemon/waiting_jobs.py), once that job is done."""

    def __init__(self, job: JobDir, source: str) -> None:
        super().__init__(
            f"job {job.id} is not built yet: it extends job {source}, and the daemon builds and queues it once"
            f" that job is done (start the daemon; `ltx2 resume {job.id}` there makes it wait again)"
        )


def take_job(job: JobDir, owner: str | None = None) -> None:
    """Move a job to RUNNING for this process, about to run it, whatever it was; `owner` (the `ltx2`
    command doing so) becomes its owner (None: the recorded one stays).

    A job running in another live process is refused (JobBusy), and so is one whose request is not built
    yet (JobWaiting). A job found RUNNING otherwise was left so by an orchestrator that died: that run
    ends first, as interrupted (`release_orphaned`). A finished, failed or cancelled one is queued again
    (a re-run, a decode, a resume).
    """
    if job.live_runner() is not None:
        raise JobBusy(job)
    if job.record.waits_for is not None:
        raise JobWaiting(job, job.record.waits_for.job)
    if job.state is JobState.RUNNING:
        release_orphaned(job)
    elif job.state is not JobState.QUEUED:
        job.transition(JobState.QUEUED)
    try:
        job.transition(JobState.RUNNING, owner=owner)
    except TransitionError:  # checked against job.json: another process took it a moment ago
        if job.live_runner() is not None:
            raise JobBusy(job) from None
        raise


def release_orphaned(job: JobDir, owner: str | None = None) -> None:
    """End the run of a job whose orchestrator died while running it (`requeue_orphan`), stop the stage
    workers it left if they still run, and leave the job QUEUED (for `owner`, if given: the daemon
    taking over a job an `ltx2` command left), even one whose cancel the dead run still owed."""
    for pid in requeue_orphan(job, "its orchestrator stopped"):
        kill_orphan(pid, str(job.path))
    if job.state is not JobState.QUEUED or owner is not None:
        job.transition(JobState.QUEUED, owner=owner)


def requeue_orphan(job: JobDir, reason: str) -> list[int]:
    """End the run of a RUNNING job whose orchestrator died (the daemon's recovery at its start): its
    open attempts closed as interrupted, the job QUEUED to resume, or CANCELLED if a person had been
    answered "cancelling". Returns the pids the closed attempts recorded: the caller stops orphans."""
    pids = [attempt.pid or 0 for attempt in open_attempts(job).values()]
    end_without_attempt(job, running_stage(job), Failure.INTERRUPTED, reason)
    return [pid for pid in pids if pid > 0]


def cancel_waiting(job: JobDir) -> bool:
    """Cancel a job that is not running (queued, waiting for the job it extends, or ended and waiting for
    a resume) at once; False if it is running (or was claimed meanwhile: checked under the job's lock),
    which only its orchestrator may end (JobDir.request_cancel asks it)."""
    if job.state is JobState.RUNNING:
        return False
    decision = decide_run_end(Failure.CANCELLED, CANCEL_REASON)
    try:
        job.transition(JobState.CANCELLED, error=decision.reason, failure=Failure.CANCELLED)
    except TransitionError:
        return False
    return True


def fail_waiting(job: JobDir, reason: str, failure: Failure = Failure.INVALID_INPUT) -> None:
    """A WAITING job whose input will never come (orchestrator/daemon/waiting_jobs.py says why): FAILED,
    as invalid input since no run of it could succeed (or INTERNAL: building it broke the daemon's code),
    with `reason` naming the job it waited for."""
    decision = decide_run_end(failure, reason)
    job.transition(decision.job_state or JobState.FAILED, error=decision.reason, failure=failure)


def mark_done(job: JobDir, output: Path) -> None:
    """The run published its video: DONE, with the MP4's path."""
    job.transition(JobState.DONE, output=str(output))


def open_attempts(job: JobDir) -> dict[Stage, AttemptRecord]:
    """The attempts a run left running, by stage (one per stage at most)."""
    found = {}
    for stage in Stage:
        attempts = job.stage_record(stage).attempts
        if attempts and attempts[-1].result == AttemptResult.RUNNING:
            found[stage] = attempts[-1]
    return found


def running_stage(job: JobDir) -> Stage | None:
    """The stage whose attempt is still open, if any (the one a dead or broken orchestrator was running)."""
    return next(iter(open_attempts(job)), None)
