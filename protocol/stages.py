"""Messages between a stage worker and the orchestrator that started it.

A worker connects a DEALER socket to the endpoint it was given, says `ready` once its imports are
done, and waits for `go` before it touches the accelerator or loads a weight (DESIGN.md rule 5).
While it works it sends `progress` at each phase and step and a `heartbeat` on a timer; it ends
with `done` or `failed` and then exits with the matching code (protocol.errors.ExitCode).

A worker started for a group of jobs (stage-major scheduling) says `ready` with the first job's
id, then opens each job with a `progress` of phase JOB_STARTED_PHASE (step = the job's position,
total = the group's size) and ends each with its own `done` or `failed`.
"""

from __future__ import annotations

import dataclasses

from protocol.codec import Message, register

#: The progress phase that opens each job of a group worker.
JOB_STARTED_PHASE = "job started"
#: A farm worker's CURVE keys, "server-public own-public own-secret" (Z85,
#: whose alphabet has no space), in its environment
#: (never its command line, which every user of the node can read): ephemeral keys the
#: orchestrator made for its own workers (orchestrator.placement.ray_farm).
WORKER_CURVE_ENV = "LTX2_WORKER_CURVE"
#: A context-parallel rank's place in its group (orchestrator.placement.worker_gang sets them, the workers'
#: services/context_parallel.py reads them): its rank, the group's size, and the rendezvous `host:port`.
#: Names of our own rather than torch's RANK/WORLD_SIZE, which a daemon started under a cluster
#: scheduler may have inherited and would pass on to every worker.
CP_RANK_ENV = "LTX2_CP_RANK"
CP_SIZE_ENV = "LTX2_CP_SIZE"
CP_ADDRESS_ENV = "LTX2_CP_ADDRESS"


@register
@dataclasses.dataclass(frozen=True)
class Ready(Message):
    """The worker has imported its libraries and connected; nothing heavy is allocated yet."""

    TYPE = "ready"
    stage: str
    attempt: int
    pid: int
    #: the size of its torch CPU thread pool (its lane's share of the CPUs: orchestrator.placement.lanes)
    cpu_threads: int = 0


@register
@dataclasses.dataclass(frozen=True)
class Go(Message):
    """Orchestrator to worker: start loading and computing now."""

    TYPE = "go"
    stage: str


@register
@dataclasses.dataclass(frozen=True)
class Progress(Message):
    """A phase started (`step == 0`) or a step of it finished (`step` of `total`)."""

    TYPE = "progress"
    stage: str
    phase: str
    step: int
    total: int
    gpu_bytes: int = 0
    rss_bytes: int = 0


@register
@dataclasses.dataclass(frozen=True)
class Heartbeat(Message):
    """Sent on a timer from a side thread, so a long kernel does not look like a hang."""

    TYPE = "heartbeat"
    stage: str
    gpu_bytes: int = 0
    rss_bytes: int = 0


@register
@dataclasses.dataclass(frozen=True)
class Done(Message):
    """Outputs are in place; peaks are for the whole process."""

    TYPE = "done"
    stage: str
    outputs: list[str]
    seconds: float
    peak_gpu_bytes: int = 0
    peak_rss_bytes: int = 0
    #: what the peaks are measured against: the GPU's memory, or the host's RAM where no GPU was used
    device_memory_bytes: int = 0


@register
@dataclasses.dataclass(frozen=True)
class Failed(Message):
    """The worker caught an error at its edge and is about to exit with `exit_code`."""

    TYPE = "failed"
    stage: str
    exit_code: int
    error: str
