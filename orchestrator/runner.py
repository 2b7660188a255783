"""Start one stage worker, follow it over ZeroMQ, and classify how it ended.

The orchestrator binds one ROUTER socket (WorkerLink) on an `ipc://` path inside a 0700 runtime
directory; each worker connects a DEALER to it, says READY, gets GO, streams progress and
heartbeats, and exits. Whatever the worker says, the verdict comes from its exit status
(protocol.errors.classify_exit): a worker killed by the kernel says nothing at all.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import zmq

from orchestrator.fork_client import ForkedProcess, ForkServer, ForkServerUnusable, worker_environment
from orchestrator.jobdir import JobDir
from orchestrator.lanes import Lane
from orchestrator.stale_sockets import remove_stale_worker_sockets
from protocol import codec
from protocol.errors import Failure
from protocol.files import Stage

log = logging.getLogger("ltx2.orchestrator")
# Poll interval of the follow loop: short enough that progress feels live and an exit is noticed
# at once, long enough to cost nothing.
POLL_MS = 200
# After a worker exits, messages it sent just before may still be in flight.
DRAIN_MS = 300
# SIGTERM first so a worker can close its files; SIGKILL if it has not gone after this long.
KILL_GRACE_S = 10.0
# Messages kept per worker that nobody follows yet; a waiting worker sends only READY.
WAITING_LIMIT = 100


class UnsafeRuntimeDir(Exception):
    """The ipc:// socket directory exists but another user owns it or may write into it."""


def runtime_dir() -> Path:
    """A private (0700) directory for ipc:// socket files; paths must stay short (108 bytes).

    Under /tmp (XDG_RUNTIME_DIR unset) another local user can create the directory first and then
    replace the daemon's socket with their own, so an existing directory is used only if it is a
    real directory of ours that nobody else can enter; otherwise UnsafeRuntimeDir says what to do.
    It is never chmod-ed into shape: a directory that was open to others may hold their files.
    """
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    path = Path(base) / f"ltx2-stages-{os.getuid()}"
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        pass
    except OSError as exc:  # XDG_RUNTIME_DIR names a folder that is gone (a closed login session) or read-only
        source = "XDG_RUNTIME_DIR" if os.environ.get("XDG_RUNTIME_DIR") else "the temp folder"
        raise UnsafeRuntimeDir(
            f"cannot make the socket directory {path} ({exc.strerror}): {source} = {base} must be an existing folder"
            " this user may write; unset XDG_RUNTIME_DIR or point it at one"
        ) from None
    check_private_dir(path)
    return path


def check_private_dir(path: Path) -> None:
    """Raise UnsafeRuntimeDir unless `path` is a directory (not a link) owned by us, mode 0700 or less."""
    info = os.lstat(path)
    uid = os.getuid()
    if not stat.S_ISDIR(info.st_mode):
        problem = "is not a directory (a symlink or a file)"
    elif info.st_uid != uid:
        problem = f"is owned by uid {info.st_uid}, not by this user (uid {uid})"
    elif info.st_mode & 0o077:
        problem = f"has mode {stat.S_IMODE(info.st_mode):o}: other users may replace its sockets"
    else:
        return
    raise UnsafeRuntimeDir(
        f"socket directory {path} {problem}; remove it (or chmod 700 it if it is yours and you trust "
        "its contents), or set XDG_RUNTIME_DIR to a private directory"
    )


@runtime_checkable
class RemoteProcess(Protocol):
    """A stage process another host's scheduler runs (orchestrator.ray_farm): the parts of Popen
    the runner uses, plus the wait for a place to run and where it runs once placed."""

    pid: int  #: 0: not a process of this host, never signalled from here

    def poll(self) -> int | None: ...

    def wait(self, timeout: float | None = None) -> int: ...

    def stop(self) -> int:
        """Stop it wherever it runs and return its exit status."""
        ...

    @property
    def queued(self) -> bool:
        """Still waiting for a node with a free unit of the resource; silence then is not a hang."""
        ...

    @property
    def placement(self) -> dict[str, Any] | None:
        """Where it runs (node, host, pids there), once placed; recorded in each member's attempt."""
        ...


class RemoteSpawner(Protocol):
    """Starts stage processes elsewhere (orchestrator.ray_farm.RayFarm)."""

    def spawn(self, module: str, args: list[str], log_path: Path) -> RemoteProcess: ...


#: A stage process as the runner follows it.
WorkerProcess = subprocess.Popen[bytes] | ForkedProcess | RemoteProcess


class WorkerLink:
    """The ROUTER socket workers connect to; one per lane of an orchestrator process (each lane is
    followed by one thread), and the lane's workers run on the lane's device.

    Locally the socket is an ipc:// path in the private runtime directory. A lane of a farm
    (`spawner` given) binds `endpoint` on tcp with the farm's CURVE server key (`curve`: public,
    secret), and advertises it as `tcp://<advertise_host>:<port>`; its workers are started by
    the spawner, never prestarted (a waiting worker would hold a farm's GPU).
    """

    def __init__(
        self,
        context: zmq.Context,
        endpoint: str | None = None,
        fork_server: bool = True,
        lane: Lane | None = None,
        spawner: RemoteSpawner | None = None,
        curve: tuple[bytes, bytes] | None = None,
        advertise_host: str = "",
        shared_fork_server: ForkServer | None = None,
    ) -> None:
        # Workers are forked from a server that imported torch once (orchestrator.fork_client),
        # or, with fork_server=False, exec'd as `python -m services.<stage>` each time. A server
        # shared by all lanes of a host (orchestrator.lane_links) is its owner's to close.
        self.owns_fork_server = shared_fork_server is None
        self.fork_server = shared_fork_server or (ForkServer() if fork_server and spawner is None else None)
        self.spawner = spawner
        self.lane = lane or Lane(0, "", None)
        self.socket = context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        if curve is not None:
            self.socket.curve_publickey, self.socket.curve_secretkey = curve
            self.socket.curve_server = True
        if endpoint is None:
            directory = runtime_dir()
            remove_stale_worker_sockets(directory)  # those of orchestrators killed before they closed
            suffix = f"-{self.lane.index}" if self.lane.index else ""
            endpoint = f"ipc://{directory}/workers-{os.getpid()}{suffix}.sock"
        self.socket.bind(endpoint)
        self.endpoint = endpoint
        if endpoint.startswith("tcp://"):  # a wildcard port or address becomes the one bound
            port = self.socket.getsockopt_string(zmq.LAST_ENDPOINT).rsplit(":", 1)[1]
            self.endpoint = f"tcp://{advertise_host or endpoint.removeprefix('tcp://').rsplit(':', 1)[0]}:{port}"
        # Messages of workers nobody is following yet (a prestarted worker's READY).
        self.waiting: dict[tuple[str, str], collections.deque[tuple[bytes, codec.Message]]] = {}
        # Every worker started over this link and not known to have ended: whatever path a job
        # ends by, `stop_workers_of` leaves none of its workers waiting for a GO that never comes.
        self.started: list[SpawnedWorker] = []

    def receive_for(
        self, job_ids: str | Collection[str], stage: str, timeout_ms: int
    ) -> tuple[bytes, codec.Message] | None:
        """The next message of the worker running `stage` for `job_ids` (one job, or a group's);
        others' messages are kept for later."""
        keys = {(job_id, stage) for job_id in ([job_ids] if isinstance(job_ids, str) else job_ids)}
        for key in keys:
            if self.waiting.get(key):
                return self.waiting[key].popleft()
        deadline = time.monotonic() + timeout_ms / 1000
        while (remaining := deadline - time.monotonic()) > 0:
            received = self._receive(int(remaining * 1000))
            if received is None:
                continue
            sender = (received[1].id, str(getattr(received[1], "stage", "")))
            if sender in keys:
                return received
            self.waiting.setdefault(sender, collections.deque(maxlen=WAITING_LIMIT)).append(received)
        return None

    def forget(self, job_id: str, stage: str) -> None:
        """Drop kept messages of a worker that will not be followed."""
        self.waiting.pop((job_id, stage), None)

    def _receive(self, timeout_ms: int) -> tuple[bytes, codec.Message] | None:
        """One decoded message with its sender, or None on timeout or a bad frame."""
        if not self.socket.poll(max(timeout_ms, 0)):
            return None
        parts = self.socket.recv_multipart()
        if len(parts) != 2:
            log.warning("dropped a worker message of %d frames", len(parts))
            return None
        try:
            return parts[0], codec.decode(parts[1])
        except codec.ProtocolError as exc:
            log.warning("dropped a bad worker message: %s", exc)
            return None

    @property
    def prestarts(self) -> bool:
        """Whether a worker may be started ahead of its turn (only on this host's own lanes)."""
        return self.spawner is None

    def send(self, identity: bytes, message: codec.Message) -> None:
        self.socket.send_multipart([identity, codec.encode(message)])

    def stop_workers_of(self, job_ids: Collection[str]) -> list[int]:
        """Stop every worker started over this link for any of `job_ids` that still runs (a
        prestarted one no scheduler adopted); returns their pids. Called when jobs end."""
        wanted = set(job_ids)
        stopped = []
        for worker in list(self.started):
            if wanted & set(worker.job_ids) and worker.process.poll() is None:
                log.info("stopping %s worker %d of ended job(s) %s", worker.stage.value, worker.process.pid,
                         ", ".join(worker.job_ids))  # fmt: skip
                discard_worker(worker, self)
                stopped.append(worker.process.pid)
        self.started = [worker for worker in self.started if worker.process.poll() is None]
        return stopped

    def close(self) -> None:
        """Stop every worker still running (the orchestrator is stopping), then the fork server and socket."""
        for worker in self.started:
            discard_worker(worker, self)
        self.started = []
        if self.fork_server is not None and self.owns_fork_server:
            self.fork_server.close()
        self.socket.close()
        if self.endpoint.startswith("ipc://"):
            Path(self.endpoint.removeprefix("ipc://")).unlink(missing_ok=True)


@dataclasses.dataclass
class StageOutcome:
    """How one attempt ended."""

    returncode: int
    failure: Failure | None
    reason: str  #: one line: the worker's own error, or how the process ended
    log_tail: str
    seconds: float  #: from GO to the end: the stage's own time
    peak_gpu_bytes: int = 0
    peak_rss_bytes: int = 0
    waited_s: float = 0.0  #: from the worker's start to GO (imports; for a prestarted one, its wait)

    @property
    def ok(self) -> bool:
        return self.failure is None


def worker_args(
    jobs: list[JobDir],
    stage: Stage,
    attempt: int,
    plan: dict[str, Any],
    endpoint: str,
    heartbeat_s: float,
    orchestrator_pid: int = 0,
) -> list[str]:
    """The arguments of one worker (after `python -m services.<stage>`); several jobs make a group.
    `orchestrator_pid`, this process on this host, lets a waiting worker notice when it is gone."""
    watch = ["--orchestrator-pid", str(orchestrator_pid)] if orchestrator_pid else []
    return [
        *(arg for job in jobs for arg in ("--job-dir", str(job.path))),
        "--endpoint", endpoint,
        "--attempt", str(attempt),
        "--plan", json.dumps(plan),
        "--heartbeat-s", str(heartbeat_s),
        *watch,
    ]  # fmt: skip


@dataclasses.dataclass
class SpawnedWorker:
    """A started worker process and the attempt it was started for."""

    process: WorkerProcess
    stage: Stage
    attempt: int
    plan: dict[str, Any]
    job_ids: tuple[str, ...]
    #: when it was started (monotonic): a worker started ahead of its turn waits for GO from here
    spawned: float = dataclasses.field(default_factory=time.monotonic)

    def matches(self, job_ids: tuple[str, ...], stage: Stage, attempt: int, plan: dict[str, Any]) -> bool:
        """Still running and started for exactly this attempt of exactly these jobs."""
        started_for = (self.job_ids, self.stage, self.attempt, self.plan)
        return self.process.poll() is None and started_for == (job_ids, stage, attempt, plan)


def spawn_worker(
    job: JobDir | list[JobDir],
    stage: Stage,
    attempt: int,
    plan: dict[str, Any],
    link: WorkerLink,
    heartbeat_s: float,
) -> SpawnedWorker:
    """Start a worker; it says READY and waits for GO before it touches the GPU (DESIGN.md rule 5).

    Given a list of jobs it is a group worker (stage-major); its log is the first job's. It sees
    only the link's lane's device (`CUDA_VISIBLE_DEVICES`), if the lane pins one.
    """
    jobs = job if isinstance(job, list) else [job]
    job_ids = tuple(job.id for job in jobs)
    worker = SpawnedWorker(start_process(jobs, stage, attempt, plan, link, heartbeat_s), stage, attempt, plan, job_ids)
    link.started.append(worker)
    return worker


def start_process(
    jobs: list[JobDir], stage: Stage, attempt: int, plan: dict[str, Any], link: WorkerLink, heartbeat_s: float
) -> WorkerProcess:
    """The worker's process: on the link's farm, forked by its fork server, or exec'd."""
    log_path = jobs[0].log_path(stage, attempt)
    if link.spawner is not None:  # another host: its scheduler, not a pid here, bounds its life
        args = worker_args(jobs, stage, attempt, plan, link.endpoint, heartbeat_s)
        return link.spawner.spawn(stage.module, args, log_path)
    args = worker_args(jobs, stage, attempt, plan, link.endpoint, heartbeat_s, os.getpid())
    visible, threads = link.lane.visible_devices, link.lane.threads
    if link.fork_server is not None:
        try:
            return link.fork_server.spawn(stage.value, args, log_path, visible, threads)
        except ForkServerUnusable as exc:  # said once: the link execs workers from now on
            log.warning("%s", exc)
            if link.owns_fork_server:
                link.fork_server.close()
            link.fork_server = None
    with log_path.open("ab") as log_file:
        return subprocess.Popen(
            [sys.executable, "-m", stage.module, *args],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: a kill reaches any helpers it spawned
            env=worker_environment(visible, threads),
        )


def discard_worker(worker: SpawnedWorker | None, link: WorkerLink) -> None:
    """Stop a prestarted worker that will not be used."""
    if worker is not None:
        stop_process(worker.process)
        for job_id in worker.job_ids:
            link.forget(job_id, worker.stage.value)


def follow_until_exit(
    process: WorkerProcess,
    pump: Callable[[int], bool],
    last_heard: Callable[[], float],
    should_stop: Callable[[], Failure | None],
    hung_after_s: float,
) -> tuple[int, Failure | None]:
    """Handle a worker's messages (`pump`) until it exits, stopping it when `should_stop` says
    why (cancelled, interrupted) or when it is silent for `hung_after_s`; returns (exit status,
    the reason it was stopped or None). A remote process still queued for a node is not silent:
    the hang clock starts when it is placed."""
    forced: Failure | None = None
    queued_until = 0.0
    while (returncode := process.poll()) is None:
        if isinstance(process, RemoteProcess) and process.queued:
            queued_until = time.monotonic()
        if pump(POLL_MS):
            continue
        forced = should_stop()
        if forced is None and time.monotonic() - max(last_heard(), queued_until) > hung_after_s:
            forced = Failure.HUNG
        if forced is not None:
            returncode = stop_process(process)
            break
    while pump(DRAIN_MS):  # messages sent just before the exit
        pass
    return returncode, forced


def hung_reason(hung_after_s: float) -> str:
    return f"no message for {hung_after_s:.0f} s; killed"


def stop_process(process: WorkerProcess) -> int:
    """SIGTERM the worker's process group, SIGKILL after a grace period; returns its exit status.

    A worker whose end is already known is not signalled: its pid may belong to another process now.
    A remote one is stopped by its own scheduler.
    """
    if (returncode := process.poll()) is not None:
        return returncode
    if isinstance(process, RemoteProcess):
        return process.stop()
    for sig, wait_s in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, None)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        try:
            return process.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            continue
    return process.wait()
