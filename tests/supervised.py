"""Run the repo's supervisord.conf for a test, with its paths moved into a temp folder.

supervisord and the daemon are the real programs; only the file locations change (`var/` goes to
the test's folder, everything else keeps pointing at the repository).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from conftest import REPO_ROOT

from orchestrator.daemon.client import DaemonClient, DaemonError
from orchestrator.daemon.transport import DaemonAddress
from protocol import jobs

START_TIMEOUT_S = 30.0
# How often a test asks the daemon for a job's state: one request from this process, a millisecond of
# the daemon's time; tests wait for some forty job ends a session, each noticed half a poll late.
STATUS_POLL_S = 0.1


class Supervised:
    """supervisord + ltx2d in the foreground; use as a context manager."""

    def __init__(self, root: Path, env: dict[str, str]) -> None:
        self.root = root
        self.var = root / "var"
        self.var.mkdir(parents=True, exist_ok=True)
        self.env = env
        self.conf = root / "supervisord.conf"
        text = (REPO_ROOT / "supervisord.conf").read_text()
        self.conf.write_text(text.replace("%(here)s/var", str(self.var)).replace("%(here)s", str(REPO_ROOT)))
        self.endpoint = f"ipc://{env['XDG_RUNTIME_DIR']}/ltx2-stages-{os.getuid()}/daemon.sock"
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Supervised:
        supervisord = shutil.which("supervisord", path=str(REPO_ROOT / ".venv" / "bin")) or "supervisord"
        self.process = subprocess.Popen(
            [supervisord, "-n", "-c", str(self.conf)],
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.wait_until_serving()
        return self

    def __exit__(self, *exc_info: object) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def client(self, timeout_s: float = 10.0) -> DaemonClient:
        return DaemonClient(DaemonAddress(self.endpoint), timeout_s)

    def wait_until_serving(self, previous_pid: int = 0) -> int:
        """Block until a daemon (other than `previous_pid`) answers ping; returns its pid."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                with self.client(timeout_s=1.0) as client:
                    pid = client.request(jobs.Ping(""))["pid"]
                if pid != previous_pid:
                    return pid
            except (DaemonError, ValueError):
                pass
            time.sleep(0.2)
        raise TimeoutError(f"daemon did not answer; see {self.var / 'ltx2d.log'}:\n{self.daemon_log()}")

    def daemon_log(self) -> str:
        path = self.var / "ltx2d.log"
        return path.read_text() if path.exists() else "(no log)"

    def wait_for_state(self, job_id: str, states: set[str], timeout_s: float = 180.0) -> dict:
        return wait_for_job_state(self.client, job_id, states, self.daemon_log, timeout_s)


def wait_for_job_state(
    client: Callable[[], DaemonClient], job_id: str, states: set[str], log: Callable[[], str], timeout_s: float
) -> dict:
    """Poll `status` until the job is in one of `states`; its summary, or TimeoutError with the log."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with client() as connected:
            job = connected.request(jobs.Status(job_id))["job"]
        if job["state"] in states:
            return job
        time.sleep(STATUS_POLL_S)
    raise TimeoutError(f"job {job_id} never reached {states}; daemon log:\n{log()[-3000:]}")


def wait_for_file(path: Path, timeout_s: float = 120.0) -> Path:
    deadline = time.monotonic() + timeout_s
    while not path.exists() or not path.read_text().strip():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.1)
    return path
