"""Start stage workers through the fork server (services.forkserver), torch-free on this side.

`ForkServer.spawn` returns a `ForkedProcess` with the subset of `subprocess.Popen` the runner
uses (`pid`, `poll`, `wait`), so the runner treats forked and exec'd workers alike. Exit codes
come from the server, which is the workers' parent and reaps them. A server that dies (killed,
crashed) reports nothing more, so once its last reports are read, every worker it forked and did
not report is killed (SIGKILL of its session) and counts as killed by SIGKILL, as the kernel's OOM
killer would leave it: the policy retries it (host_oom), nothing waits forever on a dead server's
child, and no worker of it lives on holding memory. The next spawn starts a new server.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from orchestrator.placement import processes

log = logging.getLogger("ltx2.forkserver")
# The server imports torch and diffusers before it answers: 5 s here, up to 30 s on a cold GPU
# host. Give it ample time before declaring it broken.
START_TIMEOUT_S = 300.0
# After the server died, how long its last lines (exit reports written just before) may take to be
# read; the pipe holds them, so this is only a bound, not a delay.
DRAIN_TIMEOUT_S = 5.0
# Exit status given to a worker its dead server never reported: killed by SIGKILL (host_oom).
LOST_EXIT = -signal.SIGKILL


def worker_environment(
    visible_devices: str | None = None, threads: int | None = None, extra: dict[str, str] | None = None
) -> dict[str, str]:
    """The environment of stage workers (and of the fork server they come from).

    (Reproducible CPU maths, `MKL_CBWR=AUTO,STRICT`, is set by the workers' own package,
    services/__init__.py, so that every process running them has it, not only those started here.)

    `expandable_segments` lets torch's CUDA allocator grow its blocks in place instead of caching
    many fixed-size ones, so what a stage holds on the device stays close to what it uses: on a
    unified-memory box (Jetson Thor) the allocator's slack is taken from the host's RAM too.
    A value the user set is kept, for both; so is an allocator configuration given under torch's
    newer, device-neutral name `PYTORCH_ALLOC_CONF`.

    `visible_devices`, a lane's device (orchestrator.placement.lanes), becomes `CUDA_VISIBLE_DEVICES`, and
    `threads`, the lane's share of the CPUs, `OMP_NUM_THREADS` (torch sizes its pool from it); `extra` (the
    link's CUDA MPS variables: WorkerLink.mps_environment) is set last.
    """
    defaults: dict[str, str] = {}
    if "PYTORCH_ALLOC_CONF" not in os.environ:
        defaults["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    lane = {} if visible_devices is None else {"CUDA_VISIBLE_DEVICES": visible_devices}
    if threads is not None:
        lane["OMP_NUM_THREADS"] = str(threads)
    return {**defaults, **os.environ, "PYTHONUNBUFFERED": "1", **lane, **(extra or {})}


class ForkServerError(RuntimeError):
    """The fork server could not be started or stopped answering."""


class ForkServerUnusable(ForkServerError):
    """The server's imports initialised CUDA, so a worker forked from it could not use the GPU."""


class _ServerDied(ForkServerError):
    """The server exited while a request was under way."""


class ForkedProcess:
    """A worker forked by a server; mirrors the parts of Popen the runner needs."""

    def __init__(self, pid: int, server: _Server) -> None:
        self.pid = pid
        self.server = server  #: the server that forked it, even after a newer one replaced it
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self.server.exit_code(self.pid)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        """Its exit status; never endless: a dead server's unreported workers are killed and reported."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while (code := self.poll()) is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(str(self.pid), timeout or 0)
            time.sleep(0.02)
        return code


class _Server:
    """One fork-server process: its requests, the workers it forked, the exits it reported."""

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "services.forkserver"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            start_new_session=True,
            env=worker_environment(),
        )
        self.replies: queue.Queue[dict[str, Any]] = queue.Queue()
        self.lock = threading.Lock()
        self.exits: dict[int, int] = {}
        # Workers forked and not reported yet, with their start times (pids get reused).
        self.running: dict[int, int | None] = {}
        self.drained = threading.Event()  # set once everything the server wrote has been read
        self.ready = False  #: its imports are done (wait_ready returned)
        threading.Thread(target=self._read, name="forkserver-reader", daemon=True).start()

    def is_alive(self) -> bool:
        return self.process.poll() is None

    def wait_ready(self) -> None:
        """Block until the server has imported everything; a server that cannot is killed."""
        try:
            ready = self.replies.get(timeout=START_TIMEOUT_S)
        except queue.Empty:
            ready = {}
        if not ready.get("ready"):
            self.process.kill()
            self.process.wait()
            raise ForkServerError("fork server did not start (see the daemon's stderr)")
        if culprit := ready.get("cuda_initialised_by"):
            self.stop()
            raise ForkServerUnusable(
                f"fork server off: importing the stage modules initialised CUDA (likely {culprit}), so a "
                "worker forked from it could not use the GPU; every stage worker now starts as a fresh "
                "process, which imports torch and diffusers itself. `[worker] fork_server = false` skips this check."
            )
        self.ready = True

    def request(self, request: dict[str, Any]) -> int:
        """Have the server fork a worker; returns its pid."""
        assert self.process.stdin is not None
        try:
            self.process.stdin.write((json.dumps(request) + "\n").encode())
            self.process.stdin.flush()
        except OSError as exc:
            raise _ServerDied(f"fork server is gone: {exc}") from exc
        try:
            reply = self.replies.get(timeout=START_TIMEOUT_S)
        except queue.Empty:
            self.process.kill()  # hung: its workers are settled as a dead server's
            self.process.wait()
            raise ForkServerError(f"fork server did not answer within {START_TIMEOUT_S:.0f} s") from None
        if reply.get("eof"):
            raise _ServerDied("fork server exited before it answered")
        if "pid" not in reply:
            raise ForkServerError(f"fork server failed: {reply}")
        return int(reply["pid"])

    def exit_code(self, pid: int) -> int | None:
        """The worker's exit status once reported; if the server died, killed by SIGKILL."""
        with self.lock:
            if pid in self.exits:
                return self.exits[pid]
        if self.is_alive():
            return None
        self.settle()
        with self.lock:
            return self.exits.get(pid, LOST_EXIT)

    def settle(self) -> None:
        """After the server died: read its last reports, then kill every worker it did not report."""
        self.drained.wait(DRAIN_TIMEOUT_S)
        with self.lock:
            lost, self.running = self.running, {}
            for pid, started in lost.items():
                log.warning("fork server %d died; killing its worker %d", self.process.pid, pid)
                processes.kill_session(pid, started)
                self.exits[pid] = LOST_EXIT

    def stop(self) -> None:
        """EOF on stdin stops the server; running workers are left to their own sessions."""
        try:
            if self.process.stdin:
                self.process.stdin.close()
            self.process.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            self.process.kill()
            self.process.wait()

    def _read(self) -> None:
        """Reader thread: route the server's lines (fork replies to the requester, exit reports to
        `exits`), so exits are recorded even while nobody is waiting for a reply."""
        assert self.process.stdout is not None
        for line in self.process.stdout:
            try:
                message = json.loads(line)
            except ValueError:
                log.warning("fork server said: %r", line[:200])
                continue
            if "exit" in message:
                with self.lock:
                    pid = int(message["exit"])
                    self.running.pop(pid, None)
                    self.exits[pid] = int(message["code"])
                continue
            if "pid" in message:
                with self.lock:
                    pid = int(message["pid"])
                    self.exits.pop(pid, None)  # an earlier worker's report, if the kernel reused its pid
                    self.running[pid] = processes.start_time(pid)
            self.replies.put(message)
        self.drained.set()
        self.replies.put({"eof": True})  # a request waiting for an answer gets one at once


class ForkServer:
    """Forks workers through one server process, started on first use and again after it died.

    `die_with_server`: each worker dies with the server that forked it (a farm node's server,
    orchestrator.placement.node_forker, whose orchestrator is on another host); locally a stopped server's
    workers are left to their own sessions, and this side kills those of a server that died."""

    def __init__(self, die_with_server: bool = False) -> None:
        self.server: _Server | None = None
        self.lock = threading.Lock()
        self.die_with_server = die_with_server
        # Once a server's imports initialised CUDA, every later one's would too: said once, kept.
        self.unusable: ForkServerUnusable | None = None
        self.closed = False
        # Guards `closed` and the start of a server process against each other (not held while a
        # server imports, unlike `lock`): a close racing a warming start either finds the new
        # server and kills it, or keeps it from being started at all.
        self.starting = threading.Lock()

    def start(self) -> None:
        """Start the server now rather than at the first spawn (raises ForkServerError if it cannot)."""
        with self.lock:
            self._running_server()

    def warm(self) -> None:
        """Start the server in the background: its imports (10 s on a GPU host) then overlap whatever
        the caller does before its first spawn, which waits for them. A failure is left for that
        spawn to raise (a broken server is tried again then; an unusable one is not)."""

        def start_quietly() -> None:
            try:
                self.start()
            except ForkServerError as exc:
                log.info("fork server not started in advance: %s", exc)

        threading.Thread(target=start_quietly, name="forkserver-warm", daemon=True).start()

    def spawn(
        self,
        stage: str,
        argv: list[str],
        log_path: Path,
        visible_devices: str | None = None,
        threads: int | None = None,
        environment: dict[str, str] | None = None,
    ) -> ForkedProcess:
        """Fork a worker for `stage` with the worker's command-line `argv`; `visible_devices`
        (its lane's device) becomes its `CUDA_VISIBLE_DEVICES`, set in the child before CUDA starts,
        `threads` (its lane's share of the CPUs) the size of its torch thread pool, and `environment`
        (CUDA MPS variables) is added to the child's environment, also before CUDA starts."""
        request: dict[str, Any] = {"stage": stage, "argv": argv, "log": str(log_path)}
        if self.die_with_server:
            request["die_with_server"] = True
        if visible_devices is not None:
            request["cuda_visible_devices"] = visible_devices
        if threads is not None:
            request["threads"] = threads
        if environment:
            request["environment"] = environment
        with self.lock:
            try:
                server = self._running_server()
                return ForkedProcess(server.request(request), server)
            except _ServerDied:  # it died between the check and the request: once more, on a new one
                server = self._running_server()
                return ForkedProcess(server.request(request), server)

    def close(self) -> None:
        """Stop the server; a server that had died has its unreported workers killed, and one still
        importing (started by `warm` for a run that ended first, e.g. on an invalid batch file) is
        killed at once rather than waited for."""
        with self.starting:
            self.closed = True
            server = self.server
        if server is None:
            return
        if not server.ready and server.is_alive():
            server.process.kill()  # its wait_ready, in the warming thread, then fails quietly
        elif server.is_alive():
            server.stop()
        else:
            server.settle()
        self.server = None

    def _running_server(self) -> _Server:
        """The live server, starting one if there is none; a dead one's lost workers are killed first,
        so they free their memory before the next worker starts."""
        if self.unusable is not None:
            raise self.unusable
        if self.closed:
            raise ForkServerError("fork server closed")
        if self.server is not None and self.server.is_alive():
            return self.server
        if self.server is not None:
            self.server.settle()
        with self.starting:
            if self.closed:
                raise ForkServerError("fork server closed")
            self.server = _Server()
        try:
            self.server.wait_ready()
        except ForkServerUnusable as exc:
            self.server, self.unusable = None, exc
            raise
        except ForkServerError:
            self.server = None
            raise
        return self.server
