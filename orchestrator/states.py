"""Job states and the transitions allowed between them (stdlib only, imported everywhere).

A job is entered as QUEUED by `submit`. The executor moves the oldest QUEUED job to RUNNING.
RUNNING ends in DONE (the MP4 is published), FAILED (a stage failed and its memory ladder ran out,
or the failure is not retryable) or CANCELLED (a person asked). A daemon that dies while a job
runs finds it RUNNING on restart and puts it back to QUEUED; it then resumes at its first
unfinished stage. FAILED and CANCELLED jobs go back to QUEUED only when a person resumes them.
"""

from __future__ import annotations

import enum


class JobState(enum.StrEnum):
    QUEUED = "queued"  #: waiting for the GPU, in submission order
    RUNNING = "running"  #: a stage worker is (or is about to be) running
    DONE = "done"  #: the MP4 is in the output folder
    FAILED = "failed"  #: gave up; `error` says why
    CANCELLED = "cancelled"  #: stopped on request; finished stages kept

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({JobState.DONE, JobState.FAILED, JobState.CANCELLED})
TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.QUEUED: frozenset({JobState.RUNNING, JobState.CANCELLED}),
    JobState.RUNNING: frozenset({JobState.DONE, JobState.FAILED, JobState.CANCELLED, JobState.QUEUED}),
    JobState.DONE: frozenset(),
    JobState.FAILED: frozenset({JobState.QUEUED}),
    JobState.CANCELLED: frozenset({JobState.QUEUED}),
}


class TransitionError(ValueError):
    """A requested state change is not in TRANSITIONS."""


def require_transition(current: JobState, target: JobState) -> None:
    if target not in TRANSITIONS[current]:
        raise TransitionError(f"a {current.value} job cannot become {target.value}")
