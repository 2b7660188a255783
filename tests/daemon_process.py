"""`ltx2 daemon` as a plain child process (no supervisord), for tests that signal the daemon itself.

Also small /proc readers the guard tests use to find the fork server and stray workers.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from conftest import REPO_ROOT, ltx2_environment
from supervised import Supervised, wait_for_job_state

from orchestrator.daemon.client import DaemonClient, DaemonError
from orchestrator.daemon.transport import DaemonAddress, TransportError
from protocol import jobs

START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 60.0


class DaemonProcess:
    """One `ltx2 daemon`; use as a context manager (left running daemons get SIGTERM, then SIGKILL)."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.env = env
        self.log_path = log_path
        self.endpoint = f"ipc://{env['XDG_RUNTIME_DIR']}/ltx2-stages-{os.getuid()}/daemon.sock"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def __enter__(self) -> DaemonProcess:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "orchestrator.cli", "daemon"],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO_ROOT,
            )
        try:
            self.wait_until_serving()
        except BaseException:
            self.__exit__()
            raise
        return self

    def wait_until_serving(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                with self.client(timeout_s=1.0) as client:
                    if client.request(jobs.Ping(""))["pid"] == self.pid:
                        return
            except (DaemonError, TransportError):  # not listening yet
                pass
            time.sleep(0.2)
        raise TimeoutError(f"daemon {self.pid} did not answer (exit status {self.process.poll()}):\n{self.log()}")

    def __exit__(self, *exc_info: object) -> None:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def client(self, timeout_s: float = 10.0) -> DaemonClient:
        return DaemonClient(DaemonAddress(self.endpoint), timeout_s)

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else "(no log)"

    def wait_for_state(self, job_id: str, states: set[str], timeout_s: float = 180.0) -> dict:
        return wait_for_job_state(self.client, job_id, states, self.log, timeout_s)


def proc_stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state first), or None if gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def is_running(pid: int) -> bool:
    """True while the process exists and is not a zombie."""
    stat = proc_stat(pid)
    return stat is not None and stat[0] != "Z"


def parent_of(pid: int) -> int:
    stat = proc_stat(pid)
    assert stat is not None, f"process {pid} is gone"
    return int(stat[1])


def children_of(pid: int) -> list[int]:
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := proc_stat(int(entry.name))) and int(stat[1]) == pid:
            children.append(int(entry.name))
    return children


def fork_servers() -> list[int]:
    """Every running fork server (services.forkserver) of this host, whoever started it."""
    return [
        int(entry.name)
        for entry in Path("/proc").iterdir()
        if entry.name.isdigit() and "services.forkserver" in cmdline(int(entry.name)) and is_running(int(entry.name))
    ]


def environment_of(pid: int) -> list[str]:
    """The process's environment as NAME=value entries ([] once it is gone)."""
    try:
        return Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def running_writers_into(directory: Path) -> list[int]:
    """Running processes whose stdout is a file inside `directory` (a job's workers log there)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stdout = os.readlink(entry / "fd" / "1")
        except OSError:
            continue
        if stdout.startswith(str(directory)) and is_running(int(entry.name)):
            found.append(int(entry.name))
    return found


def kill_group(pid: int) -> None:
    """Test cleanup: SIGKILL a process group that may already be gone."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


@contextlib.contextmanager
def supervised_with_holds(hf_home: Path, root: Path, name: str, holds: str) -> Iterator[Supervised]:
    """A supervised daemon of its own (state under `root`, runtime dir /tmp/ltx2-test-<pid>-<name>) whose
    orchestrator holds where LTX2_FAULT_HOLD's `holds` say; on the way out every process still writing into
    its state is killed with its group, and the runtime dir is removed."""
    runtime = Path(f"/tmp/ltx2-test-{os.getpid()}-{name}")
    runtime.mkdir(mode=0o700, exist_ok=True)
    (root / "faults").mkdir()
    env = {
        **ltx2_environment(hf_home, root),
        "XDG_RUNTIME_DIR": str(runtime),
        "LTX2_FAULT_DIR": str(root / "faults"),
        "LTX2_FAULT_HOLD": holds,
    }
    try:
        with Supervised(root, env) as supervised:
            yield supervised
    finally:
        for pid in running_writers_into(root / "state"):
            kill_group(pid)
        shutil.rmtree(runtime, ignore_errors=True)
