"""Messages between a client (the `ltx2` CLI) and the orchestrator daemon.

Every request is answered with exactly one reply: `ok` carrying a data map, or `error` with a
code (protocol.codec.ErrorCode), a message and the offending field. A request's `id` is the job
id it concerns (empty for submit and list); the reply echoes it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from protocol.codec import Message, register


@register
@dataclasses.dataclass(frozen=True)
class Submit(Message):
    """Queue a job; `spec` is a JobSpec as plain data. Replies ok{id}.

    With `reuse`, a finished job that rendered exactly this request (orchestrator.run.reuse) is named
    instead (ok{id, reused: true}) and nothing is queued.

    `job_id`, when given, is the id the new job gets (the HTTP gateway records its key's claim to it
    before sending): a submit naming a job that exists answers with that job and queues nothing, so a
    submit sent again after a lost reply never makes a second job.

    `after`, when given, is the id of a job of the daemon's queue whose video this request extends
    (`spec` then names no other `extend`). A job that is not done yet (queued, running, or waiting itself)
    is waited for: the new job is WAITING until it is done, then built and queued, or FAILED if it
    failed or was cancelled; one that is done is extended at once, as `extend` does.
    """

    TYPE = "submit"
    spec: dict[str, Any]
    reuse: bool = False
    job_id: str = ""
    after: str = ""


@register
@dataclasses.dataclass(frozen=True)
class Status(Message):
    """One job's state, attempts and live progress. Replies ok{job}."""

    TYPE = "status"


@register
@dataclasses.dataclass(frozen=True)
class ListJobs(Message):
    """Recent jobs, newest last. Replies ok{jobs: [...]}."""

    TYPE = "list"
    limit: int = 50


@register
@dataclasses.dataclass(frozen=True)
class Cancel(Message):
    """Stop a queued or running job; its finished stages stay on disk. Replies ok{status}."""

    TYPE = "cancel"


@register
@dataclasses.dataclass(frozen=True)
class Resume(Message):
    """Queue a cancelled or failed job again; it restarts at its first unfinished stage."""

    TYPE = "resume"


@register
@dataclasses.dataclass(frozen=True)
class Logs(Message):
    """The job's event log and the tail of its latest worker log. Replies ok{events, worker_log}."""

    TYPE = "logs"
    lines: int = 40


@register
@dataclasses.dataclass(frozen=True)
class Ping(Message):
    """Liveness check. Replies ok{pid, protocol, executor_alive}."""

    TYPE = "ping"


@register
@dataclasses.dataclass(frozen=True)
class Ok(Message):
    """Success reply."""

    TYPE = "ok"
    data: dict[str, Any]


@register
@dataclasses.dataclass(frozen=True)
class Error(Message):
    """Failure reply; `code` is a protocol.codec.ErrorCode value."""

    TYPE = "error"
    code: str
    message: str
    field: str = ""
