"""The orchestrator's own parts crash: Ctrl-C of the CLI, a corrupt or lost job store, a job store
damaged under a running daemon, job directories deleted behind its back."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import REPO_ROOT, TINY_ARGS, ltx2_environment, probe_mp4, run_ltx2, selected_in_module, submit_tiny
from daemon_process import DaemonProcess
from supervised import wait_for_file

from orchestrator.daemon.client import DaemonClient, DaemonError
from orchestrator.daemon.transport import DaemonAddress
from protocol.files import JOB_FILE
from protocol.jobs import ListJobs


def is_running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def start_cli(args: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    """The CLI as a terminal runs it: the leader of its own process group."""
    return subprocess.Popen(
        [sys.executable, "-m", "orchestrator.cli", *args],
        env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip


@pytest.fixture
def fault_env(ltx2_env: dict, tmp_path: Path) -> dict[str, str]:
    (tmp_path / "faults").mkdir()
    return {**ltx2_env, "LTX2_FAULT_DIR": str(tmp_path / "faults"), "LTX2_FAULT_PAUSE": "encode_diffuse:denoise:2"}


def test_ctrl_c_during_generate_stops_the_worker_and_leaves_the_job_resumable(fault_env: dict, tmp_path: Path):
    cli = start_cli(["generate", "--prompt", "a lighthouse", "--seed", "5", *TINY_ARGS, "--quiet"], fault_env)
    worker = int(wait_for_file(tmp_path / "faults" / "paused-encode_diffuse.pid").read_text())
    os.killpg(cli.pid, signal.SIGINT)  # what Ctrl-C does: the terminal's whole foreground group
    out, err = cli.communicate(timeout=60)
    assert cli.returncode == 130, err
    assert "Traceback" not in err and "interrupted" in err
    deadline = time.monotonic() + 15
    while is_running(worker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not is_running(worker)
    (job_dir,) = (tmp_path / "state" / "jobs").iterdir()
    record = json.loads((job_dir / JOB_FILE).read_text())
    assert record["status"] == "queued"
    assert [a["result"] for a in record["stages"]["encode_diffuse"]["attempts"]] == ["interrupted"]
    resumed = run_ltx2(
        ["decode", "--input", str(job_dir), "--output", str(tmp_path / "clip.mp4"), "--quiet"], fault_env
    )
    assert resumed.returncode == 0, resumed.stderr
    assert probe_mp4(tmp_path / "clip.mp4")["frames"] == 17
    assert json.loads((job_dir / JOB_FILE).read_text())["status"] == "done"


def test_ctrl_c_during_a_batch_stops_the_worker_and_a_rerun_finishes(fault_env: dict, tmp_path: Path):
    batch = tmp_path / "clips.toml"
    batch.write_text(
        '[defaults]\nwidth = 64\nheight = 64\nnum_frames = 17\n\n[[clips]]\nprompt = "one"\nseed = 1\n\n'
        '[[clips]]\nprompt = "two"\nseed = 2\n'
    )
    cli = start_cli(["batch", str(batch), "--quiet"], fault_env)
    worker = int(wait_for_file(tmp_path / "faults" / "paused-encode_diffuse.pid").read_text())
    os.killpg(cli.pid, signal.SIGINT)
    _, err = cli.communicate(timeout=60)
    assert cli.returncode == 130, err
    assert "Traceback" not in err
    assert not is_running(worker)
    rerun = run_ltx2(["batch", str(batch), "--quiet"], fault_env)
    assert rerun.returncode == 0, rerun.stderr
    assert sorted(p.name.split("_")[0] for p in (tmp_path / "outputs").glob("*.mp4")) == ["video", "video"]


def start_daemon(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as handle:
        return subprocess.Popen(
            [sys.executable, "-m", "orchestrator.cli", "daemon"], env=env, cwd=REPO_ROOT, stdout=handle, stderr=handle
        )


def wait_for_states(env: dict[str, str], wanted: set[str], count: int, timeout_s: float = 240.0) -> list[dict]:
    """`ltx2 jobs --json` once `count` jobs are all in `wanted` states. Until then the daemon is asked
    from this process: a CLI process per poll would take a core for a third of a second, twice a second,
    from the workers it waits for."""
    address = DaemonAddress(f"ipc://{env['XDG_RUNTIME_DIR']}/ltx2-stages-{os.getuid()}/daemon.sock")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with DaemonClient(address, timeout_s=2.0) as client:
                listed = client.request(ListJobs(""))["jobs"]
        except DaemonError:  # not serving yet (restarting)
            listed = []
        if len(listed) == count and all(job["state"] in wanted for job in listed):
            break
        time.sleep(0.5)
    listed = run_ltx2(["jobs", "--json"], env)
    if listed.returncode == 0:
        jobs = json.loads(listed.stdout)
        if len(jobs) == count and all(job["state"] in wanted for job in jobs):
            return jobs
    raise TimeoutError(f"jobs never all reached {wanted}: {run_ltx2(['jobs'], env).stdout}")


CORRUPTIONS = {
    "garbage": lambda path: path.write_bytes(os.urandom(8192)),
    "zeroed_header": lambda path: path.write_bytes(b"\0" * 100 + path.read_bytes()[100:]),
    "half_truncated": lambda path: path.write_bytes(path.read_bytes()[: path.stat().st_size // 2]),
    "empty": lambda path: path.write_bytes(b""),
}


def corrupt_store_run(root: Path, hf_home: Path, corruption: str) -> dict[str, object]:
    """A daemon killed while the first of its two jobs is paused in diffusion, its job store damaged by
    `corruption`, then a new daemon on the same state dir until both jobs end; what the test checks."""
    (root / "faults").mkdir()
    runtime = Path(f"/tmp/ltx2-test-{os.getpid()}-{corruption[:6]}")
    runtime.mkdir(mode=0o700, exist_ok=True)
    env = {
        **ltx2_environment(hf_home, root),
        "LTX2_FAULT_DIR": str(root / "faults"),
        "LTX2_FAULT_PAUSE": "encode_diffuse:denoise:2",
        "XDG_RUNTIME_DIR": str(runtime),
    }
    log = root / "daemon.log"
    daemon = start_daemon(env, log)
    try:
        ids = []
        for seed in ("1", "2"):
            for _ in range(100):
                submitted = run_ltx2(["submit", "--prompt", "a mill", "--seed", seed, *TINY_ARGS], env)
                if submitted.returncode == 0:
                    break
                time.sleep(0.2)
            ids.append(submitted.stdout.strip())
        worker = int(wait_for_file(root / "faults" / "paused-encode_diffuse.pid").read_text())
        daemon.kill()
        daemon.wait()
        store = root / "state" / "jobs.sqlite"
        for suffix in ("-wal", "-shm"):  # the damage is to the main file alone
            store.with_name(store.name + suffix).unlink(missing_ok=True)
        CORRUPTIONS[corruption](store)
        daemon = start_daemon(env, log)
        jobs = wait_for_states(env, {"done", "failed", "cancelled"}, count=2)
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=60)
    return {"ids": ids, "jobs": jobs, "log": log, "store": store, "worker_running": is_running(worker)}


@pytest.fixture(scope="module")
def corrupt_store_runs(
    request: pytest.FixtureRequest, hf_home: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Future]]:
    """The run of each corruption this session tests (`corrupt_store_run`), two at a time: a run waits on
    its daemons' imports and on tiny stages that leave a core idle, so two take little longer than one on
    CI's two cores. Each has its own state dir, runtime dir and daemons; a test gets its own run's result,
    or its exception."""
    selected = {
        item.callspec.params["corruption"]
        for item in selected_in_module(request)
        if item.originalname == "test_a_corrupt_job_store_is_rebuilt_from_the_job_directories"
    }
    with ThreadPoolExecutor(max_workers=2) as pool:
        yield {
            corruption: pool.submit(corrupt_store_run, tmp_path_factory.mktemp(corruption), hf_home, corruption)
            for corruption in sorted(selected)
        }


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_a_corrupt_job_store_is_rebuilt_from_the_job_directories(corrupt_store_runs: dict, corruption: str):
    run = corrupt_store_runs[corruption].result()
    jobs, ids, log_tail = run["jobs"], run["ids"], run["log"].read_text()[-3000:]
    assert [(job["id"], job["state"]) for job in jobs] == [(ids[0], "done"), (ids[1], "done")], log_tail
    assert not run["worker_running"]
    for job in jobs:
        assert probe_mp4(Path(job["output"]))["frames"] == 17
    if corruption in ("garbage", "zeroed_header"):  # unreadable to sqlite: kept aside for a post-mortem
        assert list(run["store"].parent.glob("jobs.sqlite.corrupt-*"))


def test_a_job_whose_directory_was_deleted_is_gone_from_the_store_after_a_restart(daemon_env: dict, tmp_path: Path):
    with DaemonProcess(daemon_env, tmp_path / "first.log") as daemon:
        ids = [submit_tiny(daemon_env, "a mill", "--num-frames", "9", "--seed", seed) for seed in ("1", "2")]
        for job_id in ids:  # nothing needs to render: queued or running, each ends cancelled
            assert run_ltx2(["cancel", job_id], daemon_env).returncode == 0
            daemon.wait_for_state(job_id, {"cancelled"})
    kept, deleted = ids
    shutil.rmtree(Path(daemon_env["LTX2_STATE_DIR"]) / "jobs" / deleted)
    with DaemonProcess(daemon_env, tmp_path / "second.log"):
        listed = json.loads(run_ltx2(["jobs", "--json"], daemon_env).stdout)
        status = run_ltx2(["status", deleted], daemon_env)
    assert [(job["id"], job["state"]) for job in listed] == [(kept, "cancelled")]
    assert status.returncode == 1 and f"no job '{deleted}'" in status.stderr


def test_a_store_overwritten_under_a_running_job_is_rebuilt_and_the_job_finishes(fault_env: dict, tmp_path: Path):
    runtime = Path(f"/tmp/ltx2-test-{os.getpid()}-garbage")
    runtime.mkdir(mode=0o700, exist_ok=True)
    env = {**fault_env, "XDG_RUNTIME_DIR": str(runtime)}
    store = tmp_path / "state" / "jobs.sqlite"
    with DaemonProcess(env, tmp_path / "daemon.log") as daemon:
        job_id = submit_tiny(env, "a mill", "--num-frames", "9")
        worker = int(wait_for_file(tmp_path / "faults" / "paused-encode_diffuse.pid").read_text())
        # What a backup tool's checkpoint, then `cat garbage > jobs.sqlite`, does to the file.
        with sqlite3.connect(store) as external:
            assert external.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] == 0  # not busy
        store.write_bytes(os.urandom(8192))
        os.kill(worker, signal.SIGKILL)  # the job goes on (a retry) over the damaged store
        job = daemon.wait_for_state(job_id, {"done", "failed", "cancelled"})
        listed = json.loads(run_ltx2(["jobs", "--json"], env).stdout)
        log = daemon.log()
    assert job["state"] == "done", job["error"]
    assert probe_mp4(Path(job["output"]))["frames"] == 9
    assert [(row["id"], row["state"]) for row in listed] == [(job_id, "done")]
    assert "damaged under the daemon" in log
    assert list(store.parent.glob("jobs.sqlite.corrupt-*"))  # the garbage is kept for a post-mortem
