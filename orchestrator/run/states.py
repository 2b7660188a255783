"""Every lifecycle of the orchestrator, in one place: job, stage, attempt result and event kind.

Free of heavy imports (the stdlib, and protocol.errors, since a failed attempt's result is its
`Failure`), so the CLI, the daemon, the store and the tests share it. Each state machine is an enum
whose members say, in their comment, how they are entered, with a table of allowed transitions
beside it. `JobDir` (orchestrator/run/jobdir.py) is the only writer of these
states: it checks each change against the tables here before it saves job.json, and the daemon's
sqlite queue only mirrors what job.json says. docs/states.md is generated from this module
(`python -m orchestrator.run.states`); a test keeps the two equal.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping

from protocol.errors import Failure


class JobState(enum.StrEnum):
    WAITING = "waiting"  #: made to extend a job not done yet (`submit --after`, `extend --chain`); queued once it is
    QUEUED = "queued"  #: `submit`/`generate` made it; a stop or crash put it back; a person resumed or handed it over
    RUNNING = "running"  #: an orchestrator (daemon executor, `generate`, `batch`, `decode`, `resume`) took it to run
    DONE = "done"  #: every stage succeeded and the MP4 with its PNGs and JSON was published
    FAILED = "failed"  #: the retry policy gave up (bad input, missing model, ladder ran out); `error` says why
    CANCELLED = "cancelled"  #: a person cancelled it; finished stages are kept

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL


class StageState(enum.StrEnum):
    PENDING = "pending"  #: not run yet, or invalidated because an earlier stage ran again
    RUNNING = "running"  #: an attempt was started and has not ended
    SUCCEEDED = "succeeded"  #: the last attempt wrote outputs whose fingerprints are recorded
    FAILED = "failed"  #: the last attempt failed or was interrupted; a retry or a resume may follow


class AttemptProgress(enum.StrEnum):
    """An attempt's result while it runs and when it succeeds; every other result is a Failure."""

    RUNNING = "running"  #: the worker was started and has not ended
    OK = "ok"  #: exit 0 with every output present


#: How one stage attempt ended (job.json `stages.<stage>.attempts[].result`): `running`, `ok`, or a
#: protocol.errors.Failure by name and value. Built from the two, so the failures are declared once,
#: beside the exit codes they come from, and an attempt's result is the failure itself
#: (`AttemptResult[failure.name]`), not a second list kept in step with it.
AttemptResult = enum.StrEnum(
    "AttemptResult",
    [(member.name, member.value) for member in AttemptProgress]
    + [(failure.name, failure.value) for failure in Failure],
    module=__name__,
)


def attempt_result(failure: Failure | None) -> AttemptResult:
    """The result recorded for an attempt that ended with `failure` (None: it succeeded)."""
    return AttemptResult.OK if failure is None else AttemptResult[failure.name]


class EventKind(enum.StrEnum):
    """The `event` field of each line of a job's events.log."""

    JOB_WAITING = "job_waiting"  #: the job entered WAITING (`waits_for` names the job it waits for)
    JOB_QUEUED = "job_queued"  #: the job entered QUEUED
    JOB_RUNNING = "job_running"  #: the job entered RUNNING
    JOB_DONE = "job_done"  #: the job entered DONE
    JOB_FAILED = "job_failed"  #: the job entered FAILED
    JOB_CANCELLED = "job_cancelled"  #: the job entered CANCELLED
    JOB_INTERRUPTED = "job_interrupted"  #: running attempts were closed as interrupted
    CANCEL_REQUESTED = "cancel_requested"  #: a person cancelled the running job; its worker is being stopped
    STAGE_STARTED = "stage_started"  #: an attempt began (plan, attempt number, group)
    STAGE_FINISHED = "stage_finished"  #: an attempt ended (result, reason, seconds, peaks)
    STAGE_PROGRESS = "stage_progress"  #: the worker began a phase or finished a step (phase, step, total)
    STAGE_SKIPPED = "stage_skipped"  #: the stage's outputs verified, so it did not run
    STAGE_ADOPTED = "stage_adopted"  #: outputs put there by hand (saved latents) were recorded
    STAGE_INVALIDATED = "stage_invalidated"  #: recorded outputs were forgotten; the stage runs again
    PARTIAL_FILE_REMOVED = "partial_file_removed"  #: a killed worker's temp file was deleted
    WARNING = "warning"  #: something the user should know that did not fail the job
    PUBLISH_STARTED = "publish_started"  #: the output names were recorded; files are being written
    PUBLISHED = "published"  #: the MP4, its PNGs and JSON are all in place (recorded complete)
    PUBLISH_TEMP_REMOVED = "publish_temp_removed"  #: a cut-short publish's temp file was deleted
    PUBLISH_ABANDONED = "publish_abandoned"  #: a cut-short publish to another target was dropped
    PUBLISH_UNDONE = "publish_undone"  #: a publish that failed (a full disk) removed the files it had placed

    @classmethod
    def for_job(cls, state: JobState) -> EventKind:
        return cls(f"job_{state.value}")


class StageEventKind(enum.StrEnum):
    """What a progress display (`ltx2 generate`'s lines, `ltx2 watch`, the daemon's board) is told."""

    SKIPPED = "skipped"  #: the stage's outputs verified, so it does not run
    STARTED = "started"  #: an attempt began
    SUCCEEDED = "succeeded"  #: an attempt ended with its outputs written
    FAILED = "failed"  #: an attempt failed; the policy may start another
    WARNING = "warning"  #: a line the user should see even with --quiet


TERMINAL = frozenset({JobState.DONE, JobState.FAILED, JobState.CANCELLED})

JOB_TRANSITIONS: Mapping[JobState, frozenset[JobState]] = {
    # WAITING -> QUEUED: the job it waits for is done and its request was built (orchestrator/daemon/
    # waiting_jobs.py); -> FAILED: that job failed or was cancelled, or the request no longer builds.
    JobState.WAITING: frozenset({JobState.QUEUED, JobState.FAILED, JobState.CANCELLED}),
    # QUEUED -> QUEUED: another owner takes the waiting job over (the daemon queueing a job that an
    # interrupted `ltx2 generate` left, when asked to resume it).
    JobState.QUEUED: frozenset({JobState.QUEUED, JobState.RUNNING, JobState.CANCELLED}),
    # RUNNING -> QUEUED: the orchestrator stopped or died; the job resumes at its next start.
    JobState.RUNNING: frozenset({JobState.DONE, JobState.FAILED, JobState.CANCELLED, JobState.QUEUED}),
    # DONE -> QUEUED: `ltx2 decode --input <job dir>` decodes a finished job again.
    JobState.DONE: frozenset({JobState.QUEUED}),
    # FAILED/CANCELLED -> WAITING: a person resumed a job that never got past waiting (its request is
    # still unbuilt); it waits again for the job it extends.
    JobState.FAILED: frozenset({JobState.QUEUED, JobState.WAITING}),
    JobState.CANCELLED: frozenset({JobState.QUEUED, JobState.WAITING}),
}

STAGE_TRANSITIONS: Mapping[StageState, frozenset[StageState]] = {
    # PENDING -> SUCCEEDED: outputs adopted (saved latents given to `ltx2 decode`).
    StageState.PENDING: frozenset({StageState.RUNNING, StageState.SUCCEEDED}),
    StageState.RUNNING: frozenset({StageState.SUCCEEDED, StageState.FAILED}),
    StageState.SUCCEEDED: frozenset({StageState.PENDING, StageState.SUCCEEDED}),
    StageState.FAILED: frozenset({StageState.RUNNING, StageState.PENDING, StageState.SUCCEEDED}),
}

ATTEMPT_TRANSITIONS: Mapping[AttemptResult, frozenset[AttemptResult]] = {
    AttemptResult.RUNNING: frozenset(set(AttemptResult) - {AttemptResult.RUNNING}),
    **{result: frozenset() for result in AttemptResult if result is not AttemptResult.RUNNING},
}


class TransitionError(ValueError):
    """A requested state change is not in its table."""


def require_transition(table: Mapping[enum.StrEnum, frozenset], current: enum.StrEnum, target: enum.StrEnum) -> None:
    """Raise TransitionError unless `table` allows `current` -> `target`."""
    if target not in table[current]:
        raise TransitionError(
            f"a {current.value} {type(current).__name__.removesuffix('State').lower()} cannot become {target.value}"
        )


def member_notes(enum_type: type[enum.Enum]) -> dict[str, str]:
    """Each member's `#:` comment in its source: how the state is entered (for docs/states.md)."""
    import inspect

    notes: dict[str, str] = {}
    for line in inspect.getsource(enum_type).splitlines():
        name, _, rest = line.strip().partition(" = ")
        if "#:" in rest and name in enum_type.__members__:
            notes[enum_type[name].value] = rest.split("#:", 1)[1].strip()
    return notes


def render_markdown() -> str:
    """docs/states.md: every lifecycle's states, how each is entered, and where each may go."""
    sections = [
        ("Job states", JobState, JOB_TRANSITIONS, "job.json `status`; the daemon's sqlite row mirrors it"),
        ("Stage states", StageState, STAGE_TRANSITIONS, "job.json `stages.<stage>.status`"),
        ("Attempt results", AttemptResult, ATTEMPT_TRANSITIONS, "job.json `stages.<stage>.attempts[].result`"),
    ]
    lines = [
        "# States",
        "",
        "Generated from `orchestrator/run/states.py` by `python -m orchestrator.run.states > docs/states.md`;",
        "a test fails when the two differ. `orchestrator/run/jobdir.py` (`JobDir`) is the only code that",
        "writes any of these states; it checks every change against the tables below.",
    ]
    for title, enum_type, table, where in sections:
        notes = (
            member_notes(AttemptProgress) | member_notes(Failure)
            if enum_type is AttemptResult
            else member_notes(enum_type)
        )
        lines += ["", f"## {title}", "", f"Stored in {where}.", ""]
        lines += ["| state | how it is entered | may become |", "|---|---|---|"]
        for member in enum_type:
            targets = ", ".join(f"`{t.value}`" for t in enum_type if t in table[member]) or "(final)"
            lines.append(f"| `{member.value}` | {notes.get(member.value, '')} | {targets} |")
    notes = member_notes(EventKind)
    lines += [
        "",
        "## Event kinds",
        "",
        "The `event` field of each line of a job's `events.log`.",
        "",
        "| event | when |",
        "|---|---|",
    ]
    lines += [f"| `{kind.value}` | {notes.get(kind.value, '')} |" for kind in EventKind]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    import sys

    sys.stdout.write(render_markdown())
