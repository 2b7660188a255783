"""One fork server per farm node, so a stage task starts its stage in a second, not after 10 s of imports.

On a Ray farm every stage attempt is a task in a fresh Ray worker (orchestrator.placement.ray_farm). Started
as a new process, each stage imported torch and diffusers itself: about 11 s per stage on an H200
host, which made each clip group's two decoder stages cost 12 and 17 s instead of 1.6 and 5.7 s
(docs/benchmarks.md, version 7). A node's `NodeForker` (run by ray_farm as a Ray actor pinned to
that node, started with the farm so its imports overlap the farm's start) keeps one fork server
(orchestrator.placement.fork_client, services.forkserver) and forks each stage of a task on its node from it.

The stage still belongs to its task, as it did when the task was its parent: a task that dies
(cancelled with `ray.cancel(force=True)`, its worker OOM-killed) takes its stage with it, because
a watcher here kills the session of every stage whose task's process is gone. And the whole
chain dies with the farm: the actor dies with the daemon that made it (Ray stops a dead driver's
actors), the fork server exits on the EOF of its stdin, and its children, forked with
`die_with_server`, get SIGKILL from the kernel when it does (PR_SET_PDEATHSIG).

Ray-free and torch-free, so it is tested and imported like any orchestrator module.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from pathlib import Path

from orchestrator.placement import processes
from orchestrator.placement.fork_client import ForkedProcess, ForkServer, ForkServerError
from protocol.files import Stage

log = logging.getLogger("ltx2.farm")
# How often the watcher looks for stages whose task is gone: the delay before such a stage dies.
WATCH_S = 0.1


@dataclasses.dataclass
class ForkedStage:
    """A stage forked for a task: the stage process, and the task's process it lives and dies with."""

    process: ForkedProcess
    started: int | None  #: the stage's start time (processes.start_time), against pid reuse
    owner: int  #: the pid of the task's process (its Ray worker)
    owner_started: int | None


class NodeForker:
    """The fork server of one node, shared by this farm's stage tasks on that node."""

    def __init__(self, environment: dict[str, str]) -> None:
        # The fork server and every stage forked from it inherit this process's environment: the
        # farm's CURVE keys and forwarded test switches on top of the node's own.
        os.environ.update(environment)
        self.forks = ForkServer(die_with_server=True)
        self.unusable = ""  #: why this node's stages start as new processes instead ("" while usable)
        self.stages: dict[int, ForkedStage] = {}
        self.lock = threading.Lock()
        threading.Thread(target=self.watch, name="node-forker-watch", daemon=True).start()

    def warm(self) -> str:
        """Start the fork server now (its imports take seconds); "" or why it cannot be used."""
        try:
            self.forks.start()
        except ForkServerError as exc:
            self.unusable = str(exc)
            log.warning("node fork server off: %s", exc)
        return self.unusable

    def spawn(self, module: str, argv: list[str], log_path: str, visible_devices: str | None, owner: int) -> int:
        """Fork the stage `module` runs (`python -m module argv...`) for the task whose process is
        `owner`; its pid, or 0 when this node has no usable fork server (the task then starts the
        stage as a new process)."""
        if self.unusable:
            return 0
        stage = next(stage for stage in Stage if stage.module == module)
        try:
            process = self.forks.spawn(stage.value, argv, Path(log_path), visible_devices)
        except ForkServerError as exc:
            self.unusable = str(exc)
            log.warning("node fork server off: %s", exc)
            return 0
        with self.lock:
            self.stages[process.pid] = ForkedStage(
                process, processes.start_time(process.pid), owner, processes.start_time(owner)
            )
        return process.pid

    def wait(self, pid: int) -> int:
        """The stage's exit status, once it has ended (negative: killed by that signal)."""
        with self.lock:
            stage = self.stages[pid]
        code = stage.process.wait()
        with self.lock:
            self.stages.pop(pid, None)
        return code

    def watch(self) -> None:
        """Kill the stages whose task's process is gone (cancelled, OOM-killed), so none outlives
        the task that the farm's bookkeeping believes holds the GPU."""
        while True:
            with self.lock:
                orphans = [
                    (pid, stage)
                    for pid, stage in self.stages.items()
                    if stage.process.poll() is None and processes.start_time(stage.owner) != stage.owner_started
                ]
            for pid, stage in orphans:
                log.warning("stage %d lost its task (process %d); killing it", pid, stage.owner)
                processes.kill_session(pid, stage.started)
            time.sleep(WATCH_S)
