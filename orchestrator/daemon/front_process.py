"""The daemon's side of its client front (orchestrator.daemon.client_front): start it, notice when it
dies, start another after a backoff, and stop it when the daemon stops.

A front may die when a client floods it past its memory bound (libzmq aborts where it cannot
allocate), or be killed; clients connected then lose their connection and reconnect to the new
front. The first front that cannot start (a bad CURVE key, an endpoint in use) is a configuration
error: TransportError with its one line, which `ltx2 daemon` turns into exit status 2. A later one
that cannot (another process took the port meanwhile) is retried with the same backoff: the
daemon's running jobs go on, and clients are served again once a front starts.
"""

from __future__ import annotations

import logging
import os
import select
import subprocess
import sys
import time

from orchestrator.daemon.client_front import ERROR_PREFIX, READY
from orchestrator.daemon.transport import DaemonAddress, TransportError, new_front_token

log = logging.getLogger("ltx2.daemon")
# How long a front may take to bind and say so: Python start-up and zmq, on a loaded two-core host.
START_TIMEOUT_S = 30.0
# Restart delays after a front dies: doubling from the first to the last, so a client that floods
# again and again costs the daemon a process start every half minute at most, not a busy loop.
FIRST_BACKOFF_S = 0.2
MAX_BACKOFF_S = 30.0
# A front that served this long before dying was not crash-looping: the next restart is immediate again.
STABLE_S = 60.0
# How long a front gets to exit on SIGTERM before it is killed.
STOP_TIMEOUT_S = 5.0


class ClientFront:
    """One client front process at a time, restarted with backoff when it dies."""

    def __init__(self, address: DaemonAddress, core_endpoint: str) -> None:
        self.address = address
        self.core_endpoint = core_endpoint
        self.process: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0
        self.restart_at: float | None = None  #: when the next front starts, after one died
        self.backoff_s = FIRST_BACKOFF_S
        #: what the running front sends with each request; a random one until a front runs
        self.token = new_front_token()

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def command(self) -> list[str]:
        command = [sys.executable, "-m", "orchestrator.daemon.client_front"]
        command += ["--endpoint", self.address.endpoint, "--core", self.core_endpoint]
        command += ["--daemon-pid", str(os.getpid())]
        if self.address.server_secret_key:
            command += ["--server-secret-key", str(self.address.server_secret_key)]
        if self.address.authorized_keys_dir:
            command += ["--authorized-keys-dir", str(self.address.authorized_keys_dir)]
        return command

    def start(self) -> None:
        """Start a front and wait until it has bound the endpoint; TransportError if it cannot."""
        # stderr is the daemon's: libzmq's abort message and any traceback land in the daemon's log.
        process = subprocess.Popen(self.command(), stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert process.stdin is not None and process.stdout is not None
        token = new_front_token()
        with process.stdin:  # the token goes through a pipe, never argv or the environment
            process.stdin.write(token.hex().encode() + b"\n")
        with process.stdout:
            ready, _, _ = select.select([process.stdout], [], [], START_TIMEOUT_S)
            line = process.stdout.readline().decode(errors="replace").strip() if ready else ""
        if line != READY:
            if process.poll() is None:
                process.kill()
            status = process.wait()
            reason = line.removeprefix(ERROR_PREFIX) if line.startswith(ERROR_PREFIX) else ""
            raise TransportError(
                reason or f"the client front for {self.address.endpoint} did not start (exit status {status})"
            )
        self.process, self.started_at, self.restart_at = process, time.monotonic(), None
        self.token = token

    def keep_running(self) -> None:
        """Called from the daemon's loop: notice a dead front, and start the next one when its backoff is over."""
        if self.process is not None and self.process.poll() is not None:
            lived = time.monotonic() - self.started_at
            if lived >= STABLE_S:
                self.backoff_s = FIRST_BACKOFF_S
            log.error(
                "client front %d died (exit status %d) after %.0f s; starting another in %.1f s",
                self.process.pid,
                self.process.returncode,
                lived,
                self.backoff_s,
            )
            self.process = None
            self.restart_at = time.monotonic() + self.backoff_s
            self.backoff_s = min(self.backoff_s * 2, MAX_BACKOFF_S)
        if self.process is None and self.restart_at is not None and time.monotonic() >= self.restart_at:
            try:
                self.start()
            except TransportError as exc:
                log.error("client front could not start (%s); trying again in %.1f s", exc, self.backoff_s)
                self.restart_at = time.monotonic() + self.backoff_s
                self.backoff_s = min(self.backoff_s * 2, MAX_BACKOFF_S)
                return
            log.info("client front %d serves %s", self.pid, self.address.endpoint)

    def stop(self) -> None:
        """Stop the front (SIGTERM, then SIGKILL) and reap it: no process outlives the daemon."""
        process, self.process, self.restart_at = self.process, None, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
