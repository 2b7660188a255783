"""`[worker] cuda_mps` (issue 28 item 1, "optionally with CUDA MPS when present"): which MPS control daemon a
stage process joins and at which client priority. A daemon is recognised by the live pid in its pipe
directory's pid file; here a `sleep` process stands in for it, since this machine has no GPU and no MPS (the
end-to-end check of what each stage's worker gets is in test_stage_overlap)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from config.settings import ConfigError, load_settings
from orchestrator.placement.lanes import Lane
from orchestrator.placement.worker_link import WorkerLink, runtime_dir
from protocol import cuda_mps


@pytest.fixture
def daemon_dir(tmp_path: Path) -> Iterator[Path]:
    """A pipe directory whose pid file names a live process, as a running control daemon leaves it."""
    stand_in = subprocess.Popen(["sleep", "600"])
    directory = tmp_path / "mps"
    directory.mkdir()
    (directory / cuda_mps.PID_FILE).write_text(f"{stand_in.pid}\n")
    yield directory
    stand_in.kill()
    stand_in.wait()


def test_a_daemon_is_its_live_pid_in_the_pipe_directory(daemon_dir: Path, tmp_path: Path):
    pid = int((daemon_dir / cuda_mps.PID_FILE).read_text())
    assert cuda_mps.control_daemon_pid(daemon_dir) == pid
    assert cuda_mps.control_daemon_pid(tmp_path / "nothing-here") is None
    ended = subprocess.Popen(["true"])
    ended.wait()
    for content in (f"{ended.pid}\n", "not a pid\n", "0\n", "-1\n", ""):
        stale = tmp_path / "stale"
        stale.mkdir(exist_ok=True)
        (stale / cuda_mps.PID_FILE).write_text(content)
        assert cuda_mps.control_daemon_pid(stale) is None, content


def test_decoders_beside_a_diffusion_join_a_daemon_at_the_below_normal_priority(daemon_dir: Path, tmp_path: Path):
    no_daemon = tmp_path / "no-cuda-mps"
    given = str(daemon_dir)
    assert cuda_mps.client_environment(given, {}, no_daemon, beside_diffusion=True) == {
        "CUDA_MPS_PIPE_DIRECTORY": given,
        "CUDA_MPS_CLIENT_PRIORITY": "1",
    }
    assert cuda_mps.client_environment(given, {}, no_daemon, beside_diffusion=False) == {
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


def test_a_link_looks_the_daemon_up_at_each_worker_start(daemon_dir: Path, tmp_path: Path):
    context = zmq.Context()
    links = [
        WorkerLink(context, fork_server=False, lane=Lane(0, "", None), role=role, cuda_mps=setting)
        for role, setting in (("decoders", str(daemon_dir)), ("", str(daemon_dir)), ("decoders", "off"))
    ]
    try:
        decoders, diffusion, off = links
        assert decoders.mps_environment()["CUDA_MPS_CLIENT_PRIORITY"] == "1"
        assert diffusion.mps_environment()["CUDA_MPS_CLIENT_PRIORITY"] == "0"
        # "off": a private, empty directory under the sockets' runtime directory
        no_daemon = Path(off.mps_environment()["CUDA_MPS_PIPE_DIRECTORY"])
        assert no_daemon == runtime_dir() / cuda_mps.NO_DAEMON_DIRECTORY
        assert no_daemon.is_dir() and not any(no_daemon.iterdir()) and no_daemon.stat().st_mode & 0o077 == 0
        # The daemon stops while the orchestrator runs: the next worker starts without a priority.
        (daemon_dir / cuda_mps.PID_FILE).unlink()
        assert decoders.mps_environment() == {"CUDA_MPS_PIPE_DIRECTORY": str(daemon_dir)}
    finally:
        for link in links:
            link.socket.close()
        context.term()


def test_the_setting_takes_auto_off_or_an_absolute_path(tmp_path: Path):
    environ = {"HOME": str(tmp_path)}
    assert load_settings(environ=environ).cuda_mps == "auto"
    assert load_settings(environ={**environ, "LTX2_CUDA_MPS": "off"}).cuda_mps == "off"
    assert load_settings(environ={**environ, "LTX2_CUDA_MPS": str(tmp_path)}).cuda_mps == str(tmp_path)
    with pytest.raises(ConfigError, match=r'worker.cuda_mps must be "auto", "off" or the absolute path .*got \'on\''):
        load_settings(environ={**environ, "LTX2_CUDA_MPS": "on"})
    with pytest.raises(ConfigError, match=r"worker.cuda_mps .*got 'var/mps'"):
        load_settings(environ={**environ, "LTX2_CUDA_MPS": "var/mps"})
