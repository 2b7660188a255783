"""`[worker] cuda_mps` (issue 28 item 1, "optionally with CUDA MPS when present"): which MPS control daemon a
stage process joins and at which client priority. A daemon is recognised by the live pid of a program named
nvidia-cuda-mps-control in its pipe directory's pid file; conftest.start_mps_stand_in stands in for it, since this
machine has no GPU and no MPS (the end-to-end check of what each stage's worker gets is in test_stage_overlap)."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq
from conftest import start_mps_stand_in

from config.settings import ConfigError, load_settings
from orchestrator.placement.fork_client import worker_environment
from orchestrator.placement.lanes import Lane
from orchestrator.placement.worker_link import WorkerLink, runtime_dir
from protocol import cuda_mps


@pytest.fixture
def daemon_dir(tmp_path: Path) -> Iterator[Path]:
    """A pipe directory as a running control daemon leaves it."""
    stand_in = start_mps_stand_in(tmp_path / "mps")
    yield tmp_path / "mps"
    stand_in.kill()
    stand_in.wait()


def write_pid_file(directory: Path, content: str) -> Path:
    directory.mkdir(exist_ok=True)
    (directory / cuda_mps.PID_FILE).write_text(content)
    return directory


def test_a_daemon_is_the_live_pid_of_its_program_in_the_pipe_directory(daemon_dir: Path, tmp_path: Path):
    pid = int((daemon_dir / cuda_mps.PID_FILE).read_text())
    assert cuda_mps.control_daemon_pid(daemon_dir) == pid
    assert cuda_mps.control_daemon_pid(tmp_path / "nothing-here") is None
    # A live process of another program (a dead daemon's pid, reused; init), a pid past any the kernel gives, a
    # number no pid can be, and files that hold no pid: no daemon.
    other = subprocess.Popen(["sleep", "600"])
    try:
        beyond = int(Path("/proc/sys/kernel/pid_max").read_text()) + 1
        for content in (f"{other.pid}\n", "1\n", f"{beyond}\n", "99999999999999999999\n", "x\n", "0\n", "-1\n", ""):
            assert cuda_mps.control_daemon_pid(write_pid_file(tmp_path / "stale", content)) is None, content
    finally:
        other.kill()
        other.wait()


def test_decoders_join_a_daemon_at_the_below_normal_priority(daemon_dir: Path, tmp_path: Path):
    no_daemon = tmp_path / "no-cuda-mps"
    given = str(daemon_dir)
    assert cuda_mps.client_environment(given, {}, no_daemon, decoder_link=True) == {
        "CUDA_MPS_PIPE_DIRECTORY": given,
        "CUDA_MPS_CLIENT_PRIORITY": "1",
    }
    assert cuda_mps.client_environment(given, {}, no_daemon, decoder_link=False) == {
        "CUDA_MPS_PIPE_DIRECTORY": given,
        "CUDA_MPS_CLIENT_PRIORITY": "0",
    }
    # "auto" looks where CUDA itself looks: $CUDA_MPS_PIPE_DIRECTORY, else /tmp/nvidia-mps.
    environ = {"CUDA_MPS_PIPE_DIRECTORY": given}
    assert cuda_mps.client_environment("auto", environ, no_daemon, True)["CUDA_MPS_CLIENT_PRIORITY"] == "1"
    assert cuda_mps.pipe_directory("auto", {}, no_daemon) == Path("/tmp/nvidia-mps")
    # "off" sends every process to a directory where no daemon listens, even with one running where CUDA looks.
    assert cuda_mps.client_environment("off", environ, no_daemon, True) == {"CUDA_MPS_PIPE_DIRECTORY": str(no_daemon)}
    # Without a daemon: "auto" adds nothing (CUDA looks where it would anyway); a path given is still where CUDA
    # must look, not its default.
    empty = tmp_path / "empty"
    assert cuda_mps.client_environment("auto", {"CUDA_MPS_PIPE_DIRECTORY": str(empty)}, no_daemon, True) == {}
    assert cuda_mps.client_environment(str(empty), {}, no_daemon, True) == {"CUDA_MPS_PIPE_DIRECTORY": str(empty)}


def test_the_worker_log_line_says_which_daemon_and_priority(daemon_dir: Path, tmp_path: Path):
    pid = int((daemon_dir / cuda_mps.PID_FILE).read_text())
    joined = {"CUDA_MPS_PIPE_DIRECTORY": str(daemon_dir), "CUDA_MPS_CLIENT_PRIORITY": "1"}
    assert cuda_mps.describe_client(joined) == (
        f"CUDA MPS: client of the control daemon (pid {pid}) in {daemon_dir}, priority below normal"
    )
    assert cuda_mps.describe_client({**joined, "CUDA_MPS_CLIENT_PRIORITY": "0"}).endswith("priority normal")
    alone = {"CUDA_MPS_PIPE_DIRECTORY": str(tmp_path)}
    assert cuda_mps.describe_client(alone) == f"CUDA MPS: none (no control daemon in {tmp_path})"
    assert cuda_mps.describe_client({}) is None


def test_a_link_looks_the_daemon_up_at_each_worker_start(daemon_dir: Path, monkeypatch: pytest.MonkeyPatch):
    # The private runtime directory, here: a short path, as its ipc sockets' paths must stay under 108 bytes.
    runtime = Path(tempfile.mkdtemp(prefix="mps-", dir="/tmp"))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    context = zmq.Context()
    links: list[WorkerLink] = []
    try:
        for role, setting in (("decoders", str(daemon_dir)), ("", str(daemon_dir)), ("decoders", "off")):
            links.append(WorkerLink(context, fork_server=False, lane=Lane(0, "", None), role=role, mps_setting=setting))
        decoders, diffusion, off = links
        assert decoders.mps_environment()["CUDA_MPS_CLIENT_PRIORITY"] == "1"
        assert diffusion.mps_environment()["CUDA_MPS_CLIENT_PRIORITY"] == "0"
        # "off": a private, empty directory under the sockets' runtime directory, whatever the orchestrator exports
        monkeypatch.setenv("CUDA_MPS_PIPE_DIRECTORY", str(daemon_dir))
        no_daemon = Path(off.mps_environment()["CUDA_MPS_PIPE_DIRECTORY"])
        assert no_daemon == runtime_dir() / cuda_mps.NO_DAEMON_DIRECTORY and no_daemon.is_relative_to(runtime)
        assert no_daemon.is_dir() and not any(no_daemon.iterdir()) and no_daemon.stat().st_mode & 0o077 == 0
        # An exec'd worker's (and a context-parallel rank's) environment: the link's variables win over exported ones.
        environment = worker_environment("0", None, off.mps_environment())
        assert (
            environment["CUDA_MPS_PIPE_DIRECTORY"] == str(no_daemon) and "CUDA_MPS_CLIENT_PRIORITY" not in environment
        )
        # The daemon stops while the orchestrator runs: the next worker starts without a priority.
        (daemon_dir / cuda_mps.PID_FILE).unlink()
        assert decoders.mps_environment() == {"CUDA_MPS_PIPE_DIRECTORY": str(daemon_dir)}
    finally:
        for link in links:
            link.socket.close()
        context.term()
        shutil.rmtree(runtime, ignore_errors=True)


def test_the_setting_takes_auto_off_or_an_absolute_path(tmp_path: Path):
    environ = {"HOME": str(tmp_path)}
    assert load_settings(environ=environ).cuda_mps == "auto"
    assert load_settings(environ={**environ, "LTX2_CUDA_MPS": "off"}).cuda_mps == "off"
    assert load_settings(environ={**environ, "LTX2_CUDA_MPS": str(tmp_path)}).cuda_mps == str(tmp_path)
    with pytest.raises(ConfigError, match=r'worker.cuda_mps must be "auto", "off" or the absolute path .*got \'on\''):
        load_settings(environ={**environ, "LTX2_CUDA_MPS": "on"})
    with pytest.raises(ConfigError, match=r"worker.cuda_mps .*got 'var/mps'"):
        load_settings(environ={**environ, "LTX2_CUDA_MPS": "var/mps"})
