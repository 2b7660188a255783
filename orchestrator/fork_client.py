"""Start stage workers through the fork server (services.forkserver), torch-free on this side.

`ForkServer.spawn` returns a `ForkedProcess` with the subset of `subprocess.Popen` the runner
uses (`pid`, `poll`, `wait`), so the runner treats forked and exec'd workers alike. Exit codes
come from the server, which is the workers' parent and reaps them. If the server itself dies,
its children are checked through /proc: one that is gone without a report counts as a crash.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

log = logging.getLogger("ltx2.forkserver")
# The server imports torch and diffusers before it answers: 5 s here, up to 30 s on a cold GPU
# host. Give it ample time before declaring it broken.
START_TIMEOUT_S = 300.0
# Exit status reported for a worker whose parent (the server) vanished before reporting it.
UNKNOWN_EXIT = 1


def worker_environment() -> dict[str, str]:
    """The environment of stage workers (and of the fork server they come from).

    MKL, torch's CPU BLAS, may pick different kernels depending on how a buffer happens to be
    aligned, so two runs of the same job could differ in the last bits. `MKL_CBWR=AUTO,STRICT`
    makes results reproducible on the same CPU, which is what lets a retried attempt reproduce the
    killed one exactly.

    `expandable_segments` lets torch's CUDA allocator grow its blocks in place instead of caching
    many fixed-size ones, so what a stage holds on the device stays close to what it uses: on a
    unified-memory box (Jetson Thor) the allocator's slack is taken from the host's RAM too.
    A value the user set is kept, for both; so is an allocator configuration given under torch's
    newer, device-neutral name `PYTORCH_ALLOC_CONF`.
    """
    defaults = {"MKL_CBWR": "AUTO,STRICT"}
    if "PYTORCH_ALLOC_CONF" not in os.environ:
        defaults["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    return {**defaults, **os.environ, "PYTHONUNBUFFERED": "1"}


class ForkServerError(RuntimeError):
    """The fork server could not be started or stopped answering."""


class ForkedProcess:
    """A worker forked by the server; mirrors the parts of Popen the runner needs."""

    def __init__(self, pid: int, server: ForkServer) -> None:
        self.pid = pid
        self.server = server
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self.server.exit_code(self.pid)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while (code := self.poll()) is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(str(self.pid), timeout or 0)
            time.sleep(0.02)
        return code


class ForkServer:
    """One server process per orchestrator, started on first use."""

    def __init__(self) -> None:
        self.process: subprocess.Popen[bytes] | None = None
        self.replies: queue.Queue[dict] = queue.Queue()
        self.exits: dict[int, int] = {}
        self.lock = threading.Lock()

    def spawn(self, stage: str, argv: list[str], log_path: Path) -> ForkedProcess:
        """Fork a worker for `stage` with the worker's command-line `argv`."""
        with self.lock:
            self._ensure_started()
            assert self.process is not None and self.process.stdin is not None
            request = {"stage": stage, "argv": argv, "log": str(log_path)}
            try:
                self.process.stdin.write((json.dumps(request) + "\n").encode())
                self.process.stdin.flush()
                reply = self.replies.get(timeout=START_TIMEOUT_S)
            except (OSError, queue.Empty) as exc:
                self.process = None
                raise ForkServerError(f"fork server did not answer: {exc}") from exc
        if "pid" not in reply:
            raise ForkServerError(f"fork server failed: {reply}")
        return ForkedProcess(int(reply["pid"]), self)

    def exit_code(self, pid: int) -> int | None:
        """The worker's exit code once reported; a worker lost with its server counts as a crash."""
        if pid in self.exits:
            return self.exits[pid]
        if self.process is not None and self.process.poll() is None:
            return None
        return None if Path(f"/proc/{pid}").exists() else self.exits.get(pid, UNKNOWN_EXIT)

    def close(self) -> None:
        """Stop the server (EOF on its stdin); running workers are left to their own sessions."""
        if self.process is None:
            return
        try:
            if self.process.stdin:
                self.process.stdin.close()
            self.process.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            self.process.kill()
            self.process.wait()
        self.process = None

    def _ensure_started(self) -> None:
        if self.process is not None and self.process.poll() is None:
            return
        self.replies = queue.Queue()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "services.forkserver"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            start_new_session=True,
            env=worker_environment(),
        )
        threading.Thread(target=self._read, args=(self.process,), name="forkserver-reader", daemon=True).start()
        try:
            ready = self.replies.get(timeout=START_TIMEOUT_S)
        except queue.Empty:
            ready = {}
        if not ready.get("ready"):
            self.process.kill()
            self.process = None
            raise ForkServerError("fork server did not start (see the daemon's stderr)")

    def _read(self, process: subprocess.Popen[bytes]) -> None:
        assert process.stdout is not None
        for line in process.stdout:
            try:
                message = json.loads(line)
            except ValueError:
                log.warning("fork server said: %r", line[:200])
                continue
            if "exit" in message:
                self.exits[int(message["exit"])] = int(message["code"])
            else:
                self.replies.put(message)
