"""How a caller follows the jobs it runs: display events, stop requests and bookkeeping callbacks.

Its own module because the schedulers (pipeline, stage_major), the attempt follower and the
displays (progress, the daemon's board) all use these types, and none of them should import
another only to get them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from orchestrator.run.states import StageEventKind
from protocol import codec
from protocol.errors import Failure
from protocol.files import Stage

if TYPE_CHECKING:
    from orchestrator.run.jobdir import JobDir


@dataclasses.dataclass(frozen=True)
class StageEvent:
    """Orchestrator-side events for progress displays (stage skipped, attempt started/ended)."""

    stage: str
    kind: StageEventKind
    attempt: int = 0
    detail: str = ""


Listener = Callable[[codec.Message | StageEvent], None]


def never_stop() -> Failure | None:
    return None


@dataclasses.dataclass
class JobHooks:
    """Callbacks of one job: events for displays, stop requests, and bookkeeping."""

    listener: Listener = lambda event: None
    #: asked while a worker runs: CANCELLED (a person cancelled this job), INTERRUPTED (the
    #: orchestrator is stopping) or None (go on); the answer becomes the attempt's failure
    should_stop: Callable[[], Failure | None] = never_stop
    on_attempt: Callable[[Stage, int, dict[str, Any], Any], None] = lambda *args: None
    #: called as the job's last stage starts; the daemon prestarts the next job's first worker
    on_last_stage: Callable[[], None] = lambda: None
    #: called when the policy chose to try a stage again, before that attempt starts (its failure given);
    #: an overlapped run (orchestrator.run.stage_overlap) waits there until the stage can run alone
    before_retry: Callable[[Stage, Failure | None], None] = lambda *args: None


#: A job's hooks, as the schedulers ask for them.
HooksFor = Callable[["JobDir"], JobHooks]
