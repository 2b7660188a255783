"""A render farm on Ray (DESIGN.md rule 8): each stage attempt is a task on some node of a cluster.

The only module that imports ray, and only inside its functions: a daemon or `ltx2 batch` with
`[cluster] backend = "ray"` reaches them (`pip install 'ltx2-stages[cluster]'`); importing this
module loads no ray, so `orchestrator/` stays ray-free at start. The head keeps everything it owns today:
the queue, every job's state and the retry policy. Ray only places processes. Each stage attempt
(or stage-major group) is one task taking one unit of `[cluster] ray_resource` ("GPU"), in a fresh
Ray worker process that runs that one task and exits (`max_calls=1`): it has its node's fork
server fork the stage (orchestrator.placement.node_forker: one actor per lane node, started with the farm,
so a stage does not import torch and diffusers itself) or, on a node without a usable one, starts
it as a local lane execs it (`python -m services.<stage> ...`, through services.parent_bound), and
waits for it; either way the stage dies with the task. Ray never retries a task
(`max_retries=0`): the policy does. The task is a generator: its first item says where the stage
runs once Ray placed it, its last the stage's exit status. A Ray worker or node that dies
mid-stage reads as a stage killed by SIGKILL, as the kernel's OOM killer leaves one locally:
host_oom, which the policy retries.

Workers report to the head over tcp:// with CURVE: keys made at start for this run only; the
head accepts no client key but the one it hands its own tasks. Job directories and the model
cache must be at the same path on every node (`paths.state_dir` on shared storage); at start one
probe task per node reads a file just written in the state dir, and the farm refuses to start,
naming each node that cannot. Nodes that join later are not probed.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import zmq
from zmq.auth.thread import ThreadAuthenticator

from config.settings import ConfigError, Settings
from orchestrator.placement.fork_client import worker_environment
from orchestrator.placement.lanes import Lane
from orchestrator.placement.worker_link import WorkerLink
from protocol.errors import ExitCode
from protocol.fault_points import fault_point, fault_switches
from protocol.stages import WORKER_CURVE_ENV

if TYPE_CHECKING:
    from ray import ObjectRefGenerator
    from ray.actor import ActorClass, ActorHandle
    from ray.remote_function import RemoteFunction

log = logging.getLogger("ltx2.farm")
# Every stage task: one per fresh Ray worker process (nothing of a stage outlives it; Ray's own
# default for GPU tasks, and ours for any resource) and never retried by Ray, only by the policy.
STAGE_TASK_OPTIONS: dict[str, Any] = {"max_calls": 1, "max_retries": 0, "num_cpus": 0, "num_returns": "streaming"}
# How long the start waits for each node's probe; a node that cannot run a task that long is lost.
PROBE_TIMEOUT_S = 60.0
# Exit status given to a stage whose Ray worker or node died: killed by SIGKILL (host_oom).
LOST_EXIT = -signal.SIGKILL
# How long the start waits for the cluster's address to accept a connection.
CONNECT_TIMEOUT_S = 5.0
# How often `wait` asks Ray about a task.
WAIT_POLL_S = 0.05
# Threads of a node's fork-server actor: each stage task on the node keeps one waiting for its stage.
FORKER_THREADS = 64


class FarmUnusable(ConfigError):
    """The Ray cluster cannot run this farm (unreachable, no resource, a node without the state dir)."""


def ray_module() -> ModuleType:
    """Ray, imported on first use (with the submodules this farm uses)."""
    import ray
    import ray.exceptions
    import ray.util

    return ray


def run_stage(
    module: str, args: list[str], log_path: str, curve: str, forwarded: dict[str, str], forkers: str, ranks: int = 1
) -> Iterator[dict]:
    """The stage task, in a fresh Ray worker on some node: start the stage, say where, wait for it.

    The stage is forked by the node's fork server (orchestrator.placement.node_forker, the actor named
    `forkers` + node id) when the node has a usable one, else started as a new process that dies
    with this one (services.parent_bound). A context-parallel stage (`ranks` > 1) holds `ranks` units of
    the resource on this one node and starts its ranks here (run_gang)."""
    ray = ray_module()
    where = {
        "node": ray.get_runtime_context().get_node_id()[:12],
        "host": socket.gethostname(),
        "node_ip": ray.util.get_node_ip_address(),
        "ray_worker_pid": os.getpid(),
    }
    if ranks > 1:
        yield from run_gang(module, args, log_path, {**forwarded, WORKER_CURVE_ENV: curve}, ranks, where)
        return
    forker = node_forker_of(forkers, ray.get_runtime_context().get_node_id()) if forkers else None
    if forker is not None:
        devices = os.environ.get("CUDA_VISIBLE_DEVICES")  # Ray's choice for this task, if it made one
        try:
            pid = ray.get(forker.spawn.remote(module, args, log_path, devices, os.getpid()))
        except ray.exceptions.RayActorError:  # the node's fork server is gone: a new process, below
            pid = 0
        if pid:
            yield where | {"remote_pid": pid, "forked": True}
            try:
                code = ray.get(forker.wait.remote(pid))
            except ray.exceptions.RayActorError:  # the stage died with the server (PR_SET_PDEATHSIG)
                code = LOST_EXIT
            yield {"returncode": code}
            return
    environment = {**worker_environment(), **forwarded, WORKER_CURVE_ENV: curve}
    command = [sys.executable, "-m", "services.parent_bound", str(os.getpid()), module, *args]
    with open(log_path, "ab") as log_file:
        if forkers:
            note = f"ltx2 farm: no fork server ({why_no_forker(forker)}); the stage starts as a new process\n"
            log_file.write(note.encode())
            log_file.flush()
        child = subprocess.Popen(
            command, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=environment
        )
    yield where | {"remote_pid": child.pid, "forked": False}
    yield {"returncode": child.wait()}


def run_gang(
    module: str, args: list[str], log_path: str, forwarded: dict[str, str], ranks: int, where: dict[str, Any]
) -> Iterator[dict]:
    """A context-parallel stage's `ranks` processes on this task's node, as a local lane starts them
    (orchestrator.placement.worker_gang: rank 0's rendezvous on the loopback, the task's devices, which Ray
    chose, visible to each rank), each bound to this Ray worker (services.parent_bound) so all die with it;
    the first to fail stops the others. Never forked: the node's fork server gives its children no
    per-process environment, and the ranks need theirs."""
    from orchestrator.placement.worker_gang import start_gang
    from orchestrator.placement.worker_link import stop_process

    devices = os.environ.get("CUDA_VISIBLE_DEVICES")  # Ray's choice for this task, if it made one

    def environment(threads: int | None) -> dict[str, str]:
        return {**worker_environment(devices, threads), **forwarded}

    bound = [str(os.getpid()), module, *args]
    gang = start_gang("services.parent_bound", bound, Path(log_path), ranks, environment, None, stop_process)
    yield where | {"remote_pid": gang.pid, "forked": False, "ranks": ranks}
    yield {"returncode": gang.wait()}


def why_no_forker(forker: ActorHandle | None) -> str:
    """Why a stage task on this node could not have its stage forked, for the stage's log."""
    if forker is None:
        return "none on this node: it joined the cluster after the farm started"
    try:
        return ray_module().get(forker.warm.remote()) or "it refused the stage"
    except ray_module().exceptions.RayActorError:
        return "this node's fork-server actor died"


def node_forker_of(prefix: str, node_id: str) -> ActorHandle | None:
    """This farm's fork-server actor on the node, if it has one (a node that joined later has not)."""
    try:
        return ray_module().get_actor(f"{prefix}-{node_id}")
    except ValueError:
        return None


def read_probe(path: str) -> str:
    """The probe task: the text of the file the head just wrote, as this node sees it."""
    fault_point("farm.probe_read", path=path)
    return Path(path).read_text()


@cache
def stage_task() -> RemoteFunction:
    """`run_stage` as a Ray task with STAGE_TASK_OPTIONS (made once, on first use)."""
    return ray_module().remote(**STAGE_TASK_OPTIONS)(run_stage)


@cache
def node_forker_actor() -> ActorClass:
    """orchestrator.placement.node_forker.NodeForker as a Ray actor: no resources (the stage tasks hold the
    GPUs), never restarted by Ray, many threads (one per stage task waiting on it)."""
    from orchestrator.placement.node_forker import NodeForker

    return ray_module().remote(num_cpus=0, max_restarts=0, max_task_retries=0, max_concurrency=FORKER_THREADS)(
        NodeForker
    )


@cache
def probe_task() -> RemoteFunction:
    """`read_probe` as a Ray task that takes no resources and is never retried."""
    return ray_module().remote(num_cpus=0, max_retries=0)(read_probe)


def check_reachable(address: str) -> None:
    """Refuse at once an address nothing listens on: ray.init would retry it for minutes."""
    if address == "auto":
        address = os.environ.get("RAY_ADDRESS", "")  # empty: Ray looks for a cluster of this host
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return  # "auto" without RAY_ADDRESS, or a form Ray itself will judge
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise FarmUnusable(f"cluster.address = {address!r}: nothing answers at {host}:{port} ({exc})") from None


class RayStageProcess:
    """A stage running as a Ray task: what the runner needs of a process (worker_link.RemoteProcess)."""

    pid = 0  # not a process of this host: never signalled from here

    def __init__(self, generator: ObjectRefGenerator, log_path: Path) -> None:
        self.generator = generator
        self.log_path = log_path
        self.returncode: int | None = None
        self._placement: dict[str, Any] | None = None

    @property
    def placement(self) -> dict[str, Any] | None:
        self.poll()  # what the task has yielded so far: a worker's messages do not wait for this read
        return self._placement

    @property
    def queued(self) -> bool:
        return self.poll() is None and self._placement is None

    def poll(self) -> int | None:
        ray = ray_module()
        while self.returncode is None and ray.wait([self.generator], timeout=0)[0]:
            try:
                item = ray.get(next(self.generator))
            except StopIteration:  # cannot happen: the task yields its exit status last
                self.returncode = LOST_EXIT
            except ray.exceptions.RayTaskError as exc:  # the task itself failed: this node cannot run it
                self.note(f"the farm task failed before the stage ran: {exc}")
                self.returncode = int(ExitCode.ENVIRONMENT)
            except ray.exceptions.RayError as exc:  # its Ray worker or node died, or it was cancelled
                self.note(f"the Ray worker of this stage was lost: {type(exc).__name__}: {exc}")
                self.returncode = LOST_EXIT
            else:
                if "returncode" in item:
                    self.returncode = int(item["returncode"])
                else:
                    self._placement = item
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while (code := self.poll()) is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired("ray task", timeout or 0)
            time.sleep(WAIT_POLL_S)
        return code

    def stop(self) -> int:
        """Cancel the task: Ray kills its worker, and the stage dies with it (the node fork server's
        watcher, or services.parent_bound)."""
        ray_module().cancel(self.generator, force=True)
        return self.wait()

    def note(self, line: str) -> None:
        """Add why the task ended to the stage's log, where the attempt's error tail is read."""
        try:
            with self.log_path.open("a") as log_file:
                log_file.write(f"ltx2 farm: {line.splitlines()[0] if line else line}\n")
        except OSError:
            log.warning("%s: %s", self.log_path, line)


class UnplacedStage:
    """A stage the farm cannot place anywhere (a context-parallel stage wider than every node): it ends at once
    as an environment failure, with the reason in its log (the attempt's error)."""

    pid = 0
    placement = None
    queued = False

    def __init__(self, log_path: Path, why: str) -> None:
        with log_path.open("a") as log_file:
            log_file.write(f"ltx2 farm: {why}\n")
        self.returncode = int(ExitCode.ENVIRONMENT)

    def poll(self) -> int:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        return self.returncode

    def stop(self) -> int:
        return self.returncode


class RayFarm:
    """The lanes of a Ray cluster (one per unit of `ray_resource`) and the stage tasks they start."""

    def __init__(self, settings: Settings) -> None:
        if STAGE_TASK_OPTIONS["max_calls"] != 1 or STAGE_TASK_OPTIONS["max_retries"] != 0:
            raise RuntimeError("stage tasks must run one per Ray worker and never be retried by Ray")
        self.settings = settings
        ray = ray_module()
        check_reachable(settings.address)
        try:
            ray.init(address=settings.address, namespace="ltx2-stages", log_to_driver=False, configure_logging=False)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise FarmUnusable(f"cluster.address = {settings.address!r}: cannot join the Ray cluster ({exc})") from None
        resource = settings.ray_resource
        units = int(ray.cluster_resources().get(resource, 0))
        if units < 1:
            ray.shutdown()
            raise FarmUnusable(f"cluster.ray_resource = {resource!r}: the Ray cluster has none of it")
        self.lanes = [Lane(index, "ray", None) for index in range(units)]
        self.task = stage_task()
        # The head's test fault switches go on to its tasks; nothing else of its environment, which
        # describes the head, not the node.
        self.forwarded = fault_switches()
        self.context = zmq.Context()
        server_public, server_secret = zmq.curve_keypair()
        self.client_public, client_secret = zmq.curve_keypair()
        self.server_keys = (server_public, server_secret)
        self.worker_keys = b" ".join((server_public, self.client_public, client_secret)).decode()
        self.authenticator = ThreadAuthenticator(self.context)
        self.authenticator.start()
        self.authenticator.configure_curve_callback(domain="*", credentials_provider=self)
        self.head_ip = ray.util.get_node_ip_address()
        # This farm's fork-server actors (one per lane node), named after a token of this start.
        self.forkers = f"ltx2-forker-{secrets.token_hex(6)}" if settings.fork_server else ""
        self.forker_handles: list[ActorHandle] = []
        try:
            self.probe_state_dir(settings.state_dir)
            if self.forkers:
                self.start_forkers()
        except BaseException:
            self.close()
            raise
        log.info("Ray farm: %d lanes of %s, head %s", units, resource, self.head_ip)

    def callback(self, _domain: str, client_key: bytes) -> bool:
        """CURVE authentication: only this farm's own workers may connect."""
        return secrets.compare_digest(client_key, self.client_public)

    def lane_nodes(self) -> list[dict[str, Any]]:
        """The live nodes holding some of `ray_resource`: where stage tasks can run."""
        return [
            node
            for node in ray_module().nodes()
            if node["Alive"] and node["Resources"].get(self.settings.ray_resource, 0) > 0
        ]

    def start_forkers(self) -> None:
        """One fork-server actor per lane node, its imports started now and not waited for: they
        overlap the farm's start, and a stage task that comes sooner waits for them on its node."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        environment = {**self.forwarded, WORKER_CURVE_ENV: self.worker_keys}
        for node in self.lane_nodes():
            handle = (
                node_forker_actor()
                .options(
                    name=f"{self.forkers}-{node['NodeID']}",
                    scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False),
                )
                .remote(environment)
            )
            handle.warm.remote()
            self.forker_handles.append(handle)  # the actor lives while its handle does

    def probe_state_dir(self, state_dir: Path) -> None:
        """One task per node that can run stages reads a file just written in the state dir;
        raises FarmUnusable naming every node that cannot see it."""
        ray = ray_module()
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        state_dir.mkdir(parents=True, exist_ok=True)
        token = secrets.token_hex(16)
        probe = state_dir / f".farm-probe-{token[:8]}"
        probe.write_text(token)
        try:
            nodes = self.lane_nodes()
            answers = {
                node["NodeID"]: probe_task()
                .options(scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False))
                .remote(str(probe))
                for node in nodes
            }
            blind = []
            for node in nodes:
                try:
                    seen = ray.get(answers[node["NodeID"]], timeout=PROBE_TIMEOUT_S)
                    problem = "" if seen == token else "reads different contents (another file system)"
                except ray.exceptions.GetTimeoutError:
                    problem = f"did not answer within {PROBE_TIMEOUT_S:.0f} s"
                except ray.exceptions.RayError as exc:
                    cause = getattr(exc, "cause", None) or exc
                    problem = f"cannot read it ({type(cause).__name__}: {str(cause).splitlines()[0]})"
                if problem:
                    blind.append(f"node {node['NodeManagerAddress']} ({node['NodeID'][:12]}) {problem}")
        finally:
            probe.unlink(missing_ok=True)
        if blind:
            raise FarmUnusable(
                f"paths.state_dir = {state_dir} must be on storage every node mounts at the same path; "
                + "; ".join(blind)
            )

    def link(self, lane: Lane) -> WorkerLink:
        """A lane's socket: tcp on every interface, CURVE, advertised at the head's address."""
        return WorkerLink(
            self.context,
            endpoint="tcp://*:*",
            fork_server=False,
            lane=lane,
            spawner=self,
            curve=self.server_keys,
            advertise_host=self.head_ip,
        )

    def spawn(self, module: str, args: list[str], log_path: Path, ranks: int = 1) -> RayStageProcess | UnplacedStage:
        """The stage as a task holding one unit of `ray_resource`; a context-parallel stage's task holds
        `ranks` units, which Ray gives a task on one node only (DESIGN.md rule 8: a lane may be a group of
        devices, never spread over hosts), and starts its ranks there (run_gang)."""
        resource = self.settings.ray_resource
        largest = max((node["Resources"].get(resource, 0) for node in self.lane_nodes()), default=0)
        if ranks > largest:  # Ray would keep the task pending for ever
            why = (
                f"--context-parallel {ranks} needs a node with {ranks} units of cluster.ray_resource = {resource!r};"
                f" the largest node of the farm has {largest:g}"
            )
            return UnplacedStage(log_path, why)
        placement = {"num_gpus": ranks} if resource == "GPU" else {"resources": {resource: ranks}}
        task = self.task.options(**placement)
        generator = task.remote(module, args, str(log_path), self.worker_keys, self.forwarded, self.forkers, ranks)
        return RayStageProcess(generator, log_path)

    def close(self) -> None:
        self.forker_handles.clear()
        self.authenticator.stop()
        self.context.destroy(linger=0)
        ray_module().shutdown()
