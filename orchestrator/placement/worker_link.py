"""The socket stage workers connect to (WorkerLink), the processes it starts and how they stop.

The orchestrator binds one ROUTER socket per lane on an `ipc://` path inside a 0700 runtime
directory (or on tcp for a farm's lane); each worker connects a DEALER to it. A worker is a local
process (exec'd or forked: orchestrator.placement.fork_client) or a remote one (RemoteProcess:
orchestrator.placement.ray_farm); `stop_process` ends either. What a worker is started for is the
run's business (orchestrator.run.runner); this module knows a job only by its id.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import Collection
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import zmq

from orchestrator.placement.fork_client import ForkedProcess, ForkServer
from orchestrator.placement.lanes import Lane
from orchestrator.placement.stale_sockets import remove_stale_worker_sockets
from orchestrator.placement.worker_gang import WorkerGang
from protocol import codec, cuda_mps
from protocol.files import Stage

log = logging.getLogger("ltx2.orchestrator")
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
    """A stage process another host's scheduler runs (orchestrator.placement.ray_farm): the parts of Popen
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
    """Starts stage processes elsewhere (orchestrator.placement.ray_farm.RayFarm)."""

    def spawn(self, module: str, args: list[str], log_path: Path, ranks: int = 1) -> RemoteProcess: ...


#: A stage process as the runner follows it (a context-parallel attempt's ranks as one: WorkerGang).
WorkerProcess = subprocess.Popen[bytes] | ForkedProcess | RemoteProcess | WorkerGang


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
        role: str = "",
        niceness: int = 0,
        mps_setting: str = "auto",
    ) -> None:
        # Workers are forked from a server that imported torch once (orchestrator.placement.fork_client),
        # or, with fork_server=False, exec'd as `python -m services.<stage>` each time. A server
        # shared by all lanes of a host (orchestrator.placement.lane_links) is its owner's to close.
        self.niceness = niceness  # added to each worker's CPU niceness as it starts (services.runtime)
        self.role, self.mps_setting = role, mps_setting  # `[worker] cuda_mps`: which MPS daemon its workers join
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
            # A lane's second link (its decoders beside its diffusion: orchestrator.run.stage_overlap) has a role.
            suffix = (f"-{self.lane.index}" if self.lane.index else "") + (f"-{role}" if role else "")
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

    def mps_environment(self) -> dict[str, str]:
        """What this link's next local worker adds to its environment for CUDA MPS (protocol/cuda_mps.py), looked
        up at each start so a daemon started or stopped while the orchestrator runs is seen: the decoders' link
        (role "decoders", which runs a lane's decoders beside its diffusion) asks for the below-normal priority."""
        no_daemon = runtime_dir() / cuda_mps.NO_DAEMON_DIRECTORY
        if self.mps_setting == "off":
            no_daemon.mkdir(mode=0o700, exist_ok=True)
        decoder_link = self.role == "decoders"
        return cuda_mps.client_environment(self.mps_setting, os.environ, no_daemon, decoder_link)

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


def discard_worker(worker: SpawnedWorker | None, link: WorkerLink) -> None:
    """Stop a prestarted worker that will not be used."""
    if worker is not None:
        stop_process(worker.process)
        for job_id in worker.job_ids:
            link.forget(job_id, worker.stage.value)


def stop_process(process: WorkerProcess) -> int:
    """SIGTERM the worker's process group, SIGKILL after a grace period; returns its exit status.

    A worker whose end is already known is not signalled: its pid may belong to another process now.
    A remote one is stopped by its own scheduler.
    """
    if (returncode := process.poll()) is not None:
        return returncode
    if isinstance(process, RemoteProcess):
        return process.stop()
    if isinstance(process, WorkerGang):
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
