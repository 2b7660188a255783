"""The daemon's guards against its own failures: a killed fork server, a second daemon on the same
state dir, a dead executor thread, socket files left by killed daemons. Real daemons, real signals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import RunAhead, daemon_environment, probe_mp4, run_ltx2, submit_tiny
from daemon_process import (
    DaemonProcess,
    children_of,
    cmdline,
    is_running,
    kill_group,
    parent_of,
    running_writers_into,
)
from supervised import Supervised, wait_for_file

from protocol import jobs

# How long a test waits for a file the daemon is about to create (a hang guard, not a measurement).
FILE_WAIT_S = 60.0


def submit(env: dict, *extra: str) -> str:
    return submit_tiny(env, "a lighthouse in fog", *extra)


def kill_workers_left_in(state_dir: Path) -> None:
    """Cleanup after a failed test: workers are identified by their log inside the state dir."""
    for pid in running_writers_into(state_dir):
        kill_group(pid)


def wait_until_exists(path: Path) -> None:
    deadline = time.monotonic() + FILE_WAIT_S
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.1)


def test_fork_server_killed_mid_stage_its_workers_die_and_the_job_is_retried_to_the_end(
    daemon_env: dict, tmp_path: Path
):
    env = {**daemon_env, "LTX2_FAULT_PAUSE": "encode_diffuse:denoise:2"}
    state_dir = Path(env["LTX2_STATE_DIR"])
    try:
        with DaemonProcess(env, tmp_path / "daemon.log") as daemon:
            job_id = submit(env)
            worker = int(wait_for_file(Path(env["LTX2_FAULT_DIR"]) / "paused-encode_diffuse.pid").read_text())
            server = parent_of(worker)
            assert "services.forkserver" in cmdline(server)
            # The paused diffusion worker and the audio worker prestarted behind it (waiting for GO).
            forked = children_of(server)
            assert worker in forked and len(forked) == 2, forked
            os.kill(server, signal.SIGKILL)

            job = daemon.wait_for_state(job_id, {"done", "failed"})
            assert job["state"] == "done", job["error"]
            assert [(a["stage"], a["result"]) for a in job["attempts"]] == [
                ("encode_diffuse", "host_oom"),
                ("encode_diffuse", "ok"),
                ("audio_decode", "ok"),
                ("video_decode", "ok"),
            ]
            assert probe_mp4(Path(job["output"]))["frames"] == 17
            assert [pid for pid in forked if is_running(pid)] == []
            assert running_writers_into(state_dir) == []

            later = submit(env, "--seed", "12")
            assert daemon.wait_for_state(later, {"done", "failed"})["state"] == "done", daemon.log()[-3000:]
            daemon.process.send_signal(signal.SIGTERM)
            assert daemon.process.wait(timeout=60) == 0, daemon.log()[-3000:]
    finally:
        kill_workers_left_in(state_dir)


def second_daemon_on_the_same_state_dir(root: Path, hf_home: Path) -> dict[str, object]:
    """A daemon with a job paused in diffusion; a second daemon started on its state dir; then the first
    SIGKILLed and a third started there. What each daemon answered, and whether the worker ran on."""
    env = {**daemon_environment(hf_home, root), "LTX2_FAULT_PAUSE": "encode_diffuse:denoise:2"}
    try:
        with DaemonProcess(env, root / "first.log") as first:
            submit(env)
            worker = int(wait_for_file(Path(env["LTX2_FAULT_DIR"]) / "paused-encode_diffuse.pid").read_text())
            second = run_ltx2(["daemon"], env, timeout=60)
            # The refused daemon touched nothing: the first's worker runs, its socket answers.
            seen = {"first": first.pid, "second": second, "worker_running": is_running(worker)}
            with first.client() as client:
                seen["first_answered"] = client.request(jobs.Ping(""))["pid"]
            first.process.kill()
            first.process.wait()
        with DaemonProcess(env, root / "third.log") as third, third.client() as client:
            seen |= {"third": third.pid, "third_answered": client.request(jobs.Ping(""))["pid"]}
    finally:
        kill_workers_left_in(Path(env["LTX2_STATE_DIR"]))
    return seen


def test_second_daemon_on_the_same_state_dir_refuses_to_start_and_a_dead_ones_lock_is_taken_over(ran_ahead: dict):
    second = ran_ahead["second"]
    assert second.returncode != 0
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and f"pid {ran_ahead['first']}" in lines[0], second.stderr
    assert ran_ahead["worker_running"]
    assert ran_ahead["first_answered"] == ran_ahead["first"]
    assert ran_ahead["third_answered"] == ran_ahead["third"]


def executor_thread_dies(root: Path, hf_home: Path) -> dict[str, object]:
    """A supervised daemon whose executor thread dies claiming the job (LTX2_FAULT_EXECUTOR), and the
    daemon supervisord starts next: the job as it ended, `ltx2 daemon --check`, and the logs."""
    env = {**daemon_environment(hf_home, root), "LTX2_FAULT_EXECUTOR": "1"}
    with Supervised(root, env) as supervised:
        with supervised.client() as client:
            first_pid = client.request(jobs.Ping(""))["pid"]
        job_id = submit(env)
        # The executor dies on claiming the job; the daemon exits and supervisord starts another.
        restarted_pid = supervised.wait_until_serving(previous_pid=first_pid)
        job = supervised.wait_for_state(job_id, {"done", "failed"})
        check = run_ltx2(["daemon", "--check"], env)
    return {
        "raised": (Path(env["LTX2_FAULT_DIR"]) / "executor-raised").exists(),
        "job": job,
        "restarted": restarted_pid,
        "check": check,
        "daemon_log": supervised.daemon_log(),
        "supervisord_log": (supervised.var / "supervisord.log").read_text(),
    }


def test_daemon_whose_executor_thread_dies_exits_and_supervisord_restarts_it_to_run_the_job(ran_ahead: dict):
    job, check = ran_ahead["job"], ran_ahead["check"]
    assert ran_ahead["raised"]
    assert job["state"] == "done", job["error"]
    assert probe_mp4(Path(job["output"]))["frames"] == 17
    assert "executor thread died" in ran_ahead["daemon_log"]
    supervisord_log = ran_ahead["supervisord_log"]
    assert "exited: ltx2d (exit status 1; not expected)" in supervisord_log, supervisord_log
    assert check.returncode == 0 and f"pid {ran_ahead['restarted']}" in check.stdout, check.stderr


def test_daemon_check_exits_0_for_a_healthy_daemon_and_non_zero_without_one(daemon_env: dict, tmp_path: Path):
    with DaemonProcess(daemon_env, tmp_path / "daemon.log") as daemon:
        healthy = run_ltx2(["daemon", "--check"], daemon_env)
        with daemon.client() as client:
            ping = client.request(jobs.Ping(""))
    down = run_ltx2(["daemon", "--check"], daemon_env)
    assert healthy.returncode == 0, healthy.stderr
    assert f"pid {daemon.pid}" in healthy.stdout
    assert ping["executor_alive"] is True
    assert down.returncode != 0
    assert len(down.stderr.strip().splitlines()) == 1, down.stderr


def test_worker_sockets_of_dead_processes_are_removed_at_start_and_live_ones_stay(daemon_env: dict, tmp_path: Path):
    runtime = Path(daemon_env["XDG_RUNTIME_DIR"]) / f"ltx2-stages-{os.getuid()}"
    runtime.mkdir(mode=0o700)
    # A live process holding a worker socket of its own, as another `ltx2 generate` would.
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import os, socket, sys\n"
            "s = socket.socket(socket.AF_UNIX)\n"
            "s.bind(f'{sys.argv[1]}/workers-{os.getpid()}.sock')\n"
            "s.listen()\n"
            "print('bound', flush=True)\n"
            "sys.stdin.read()\n",
            str(runtime),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        with DaemonProcess(daemon_env, tmp_path / "killed.log") as killed:
            stale = runtime / f"workers-{killed.pid}.sock"
            wait_until_exists(stale)
            killed.process.send_signal(signal.SIGKILL)
            killed.process.wait()
        assert holder.stdout is not None and holder.stdout.readline().strip() == "bound"
        live = runtime / f"workers-{holder.pid}.sock"
        unrelated = runtime / "workers-notapid.sock"
        unrelated.touch()
        stale_decoders = runtime / f"workers-{killed.pid}-1-decoders.sock"  # a lane's decoder link (stage overlap)
        stale_decoders.touch()
        assert stale.exists() and live.exists()
        with DaemonProcess(daemon_env, tmp_path / "daemon.log") as daemon:
            own = runtime / f"workers-{daemon.pid}.sock"
            wait_until_exists(own)
            assert not stale.exists() and not stale_decoders.exists()
            assert live.exists() and unrelated.exists()
    finally:
        holder.kill()
        holder.wait()


def daemon_dies_beside_a_waiting_worker(root: Path, hf_home: Path) -> dict[str, object]:
    """A daemon SIGKILLed while its job's diffusion worker is paused and the audio worker started ahead
    of it waits for GO, their fork server stopped (SIGSTOP) so that it cannot take them along: whether
    the waiting worker still ran after FILE_WAIT_S, and the paused worker's parent then."""
    env = {**daemon_environment(hf_home, root), "LTX2_FAULT_PAUSE": "encode_diffuse:denoise:2"}
    server = 0
    try:
        with DaemonProcess(env, root / "daemon.log") as daemon:
            submit(env, "--num-frames", "9")
            worker = int(wait_for_file(Path(env["LTX2_FAULT_DIR"]) / "paused-encode_diffuse.pid").read_text())
            server = parent_of(worker)
            (waiting,) = [pid for pid in children_of(server) if pid != worker]  # audio, waiting for GO
            os.kill(server, signal.SIGSTOP)
            daemon.process.kill()
            daemon.process.wait()
            deadline = time.monotonic() + FILE_WAIT_S
            while is_running(waiting) and time.monotonic() < deadline:
                time.sleep(0.2)
            return {
                "waiting": waiting,
                "still_waits": is_running(waiting),
                "server": server,
                "parent": parent_of(worker),
            }
    finally:
        if server:
            kill_group(server)
        kill_workers_left_in(Path(env["LTX2_STATE_DIR"]))


def test_a_worker_waiting_for_go_exits_when_its_daemon_dies_though_its_fork_server_lives_on(ran_ahead: dict):
    """A prestarted worker's parent is the fork server, not the daemon: it must also notice the
    daemon itself is gone (here the server is stopped, so it cannot exit with the daemon)."""
    assert not ran_ahead["still_waits"], f"worker {ran_ahead['waiting']} still waits for a GO from a dead daemon"
    assert ran_ahead["parent"] == ran_ahead["server"]  # the stopped server never let its children go


# The daemon scenes above run ahead (conftest's `runs_ahead`), one at a time from the module's first test
# on, each with daemons of its own: a scene mostly waits (on a pause, a refusal, a restart, a worker's
# exit), leaving a core to the tests before it.
RUNS_AHEAD: dict[str, RunAhead] = {
    "test_second_daemon_on_the_same_state_dir_refuses_to_start_and_a_dead_ones_lock_is_taken_over": (
        second_daemon_on_the_same_state_dir
    ),
    "test_daemon_whose_executor_thread_dies_exits_and_supervisord_restarts_it_to_run_the_job": executor_thread_dies,
    "test_a_worker_waiting_for_go_exits_when_its_daemon_dies_though_its_fork_server_lives_on": (
        daemon_dies_beside_a_waiting_worker
    ),
}
