"""The orchestrator's own parts crash: Ctrl-C of the CLI, a corrupt or lost job store, a job store
damaged under a running daemon, job directories deleted behind its back."""

from __future__ import annotations

import json
import os
import re
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
from conftest import (
    REPO_ROOT,
    TINY_ARGS,
    RunAhead,
    daemon_environment,
    ltx2_environment,
    probe_mp4,
    run_ltx2,
    selected_in_module,
    submit_tiny,
)
from daemon_process import DaemonProcess
from supervised import STATUS_POLL_S, wait_for_file

from orchestrator.daemon.client import DaemonClient, DaemonError
from orchestrator.daemon.transport import DaemonAddress, DaemonNotListening
from orchestrator.placement.stale_sockets import accepts_connections
from protocol.files import EVENTS_FILE, JOB_FILE
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


def files_of(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under `folder` with its size and modification time: what a reader must leave as it was."""
    return {str(path): (path.stat().st_size, path.stat().st_mtime_ns) for path in folder.rglob("*") if path.is_file()}


def timed_ltx2(args: list[str], env: dict[str, str]) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    result = run_ltx2(args, env)
    return result, time.monotonic() - started


@pytest.fixture(scope="module")
def interrupted_generate(hf_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    """One `ltx2 generate` paused mid-diffusion, and what every command said about its job as it went:

    1. while it runs, with no daemon: `status`, `resume`;
    2. a daemon started on the same state dir while it runs: the worker's fate, `status`, `jobs`, `resume`;
    3. Ctrl-C of the generate while the daemon is up, then a second of the daemon's idle polls: the job;
    4. `resume` asked of the daemon (which holds its executor before the stage, LTX2_FAULT_HOLD), `status`
       as the daemon runs it, `cancel`; then the daemon SIGKILLed, leaving its socket file behind;
    5. no daemon: `status`, `jobs`, `logs`, and the state dir's files before and after them;
    6. `resume` with no daemon, which renders the clip; then `resume` again, and of a mistyped id.
    """
    root = tmp_path_factory.mktemp("interrupted")
    runtime = Path(f"/tmp/ltx2-test-{os.getpid()}-ctrlc")
    runtime.mkdir(mode=0o700, exist_ok=True)
    (root / "faults").mkdir()
    env = {
        **ltx2_environment(hf_home, root),
        "XDG_RUNTIME_DIR": str(runtime),
        "LTX2_FAULT_DIR": str(root / "faults"),
        "LTX2_FAULT_PAUSE": "encode_diffuse:denoise:2",
    }
    cli = start_cli(["generate", "--prompt", "a lighthouse", "--seed", "5", *TINY_ARGS, "--quiet"], env)
    try:
        worker = int(wait_for_file(root / "faults" / "paused-encode_diffuse.pid").read_text())
        (job_dir,) = (root / "state" / "jobs").iterdir()
        seen: dict[str, object] = {"root": root, "id": job_dir.name, "generate_pid": cli.pid}
        seen["running_alone"] = {cmd: run_ltx2([cmd, job_dir.name], env) for cmd in ("status", "resume")}
        seen.update(beside_a_daemon(env, job_dir, cli, worker))
        seen.update(without_a_daemon(env, job_dir))
        seen["worker_alive_at_the_end"] = is_running(worker)
        yield seen
    finally:
        if cli.poll() is None:
            os.killpg(cli.pid, signal.SIGKILL)
            cli.wait()


def beside_a_daemon(env: dict[str, str], job_dir: Path, cli: subprocess.Popen[str], worker: int) -> dict[str, object]:
    """Steps 2 to 4 of `interrupted_generate`, with a daemon started while the generate runs."""
    job_id, faults, seen = job_dir.name, Path(env["LTX2_FAULT_DIR"]), {}
    holding = {**env, "LTX2_FAULT_HOLD": "before-encode_diffuse"}  # its executor waits before the stage
    with DaemonProcess(holding, job_dir.parents[2] / "daemon.log") as daemon:
        seen["daemon_pid"] = daemon.pid
        seen["worker_alive_beside_the_daemon"] = is_running(worker)
        seen["running_beside_the_daemon"] = {cmd: run_ltx2([cmd, job_id], env) for cmd in ("status", "resume")}
        seen["running_beside_the_daemon"]["jobs"] = run_ltx2(["jobs"], env)
        os.killpg(cli.pid, signal.SIGINT)  # what Ctrl-C does: the terminal's whole foreground group
        _, seen["generate_stderr"] = cli.communicate(timeout=60)
        seen["generate_exit"] = cli.returncode
        time.sleep(1.0)  # five of the executor's idle polls: a queued job of its own would be claimed
        seen["interrupted_record"] = json.loads((job_dir / JOB_FILE).read_text())
        seen["interrupted_status"] = run_ltx2(["status", job_id], env)
        seen["interrupted_status_json"] = json.loads(run_ltx2(["status", job_id, "--json"], env).stdout)
        seen["resume_by_daemon"] = run_ltx2(["resume", job_id], env)
        seen["held"] = wait_for_file(faults / "held-before-encode_diffuse").read_text()
        seen["taken_over"] = json.loads(run_ltx2(["status", job_id, "--json"], env).stdout)
        seen["cancel"] = run_ltx2(["cancel", job_id], env)
        (faults / "release-before-encode_diffuse").touch()
        daemon.wait_for_state(job_id, {"cancelled"})
        # The cancel is saved in job.json, then appended to events.log: killed between the two, the daemon
        # would leave the event out (CI saw it), and this test is of a daemon gone after its cancel.
        wait_for_event(job_dir, "job_cancelled")
        daemon.process.kill()  # its socket file stays behind: nothing listens there any more
        daemon.process.wait()
    return seen


def wait_for_event(job_dir: Path, event: str, timeout_s: float = 30.0) -> None:
    """Block until the job's events.log holds an `event` line."""
    deadline = time.monotonic() + timeout_s
    while f'"event": "{event}"' not in (job_dir / EVENTS_FILE).read_text():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {event} in {job_dir / EVENTS_FILE} after {timeout_s} s")
        time.sleep(0.05)


def without_a_daemon(env: dict[str, str], job_dir: Path) -> dict[str, object]:
    """Steps 5 and 6 of `interrupted_generate`: the daemon is dead, its socket file left behind."""
    job_id, state, seen = job_dir.name, job_dir.parents[1], {}
    socket_file = Path(env["XDG_RUNTIME_DIR"]) / f"ltx2-stages-{os.getuid()}" / "daemon.sock"
    seen["stale_socket_left"] = socket_file.exists()
    deadline = time.monotonic() + 10
    while accepts_connections(socket_file) and time.monotonic() < deadline:  # its client front exits after it
        time.sleep(0.1)
    before = files_of(state)
    seen["alone"] = {
        "status": timed_ltx2(["status", job_id], env),
        "status_json": timed_ltx2(["status", job_id, "--json"], env),
        "jobs": timed_ltx2(["jobs"], env),
        "logs": timed_ltx2(["logs", job_id], env),
    }
    seen["state_unchanged"] = files_of(state) == before
    seen["resume"] = run_ltx2(["resume", job_id, "--quiet"], env)
    seen["record"] = json.loads((job_dir / JOB_FILE).read_text())
    seen["resume_again"] = run_ltx2(["resume", job_id], env)
    seen["typo"] = job_id[:-1] + ("0" if job_id[-1] != "0" else "1")
    seen["resume_typo"] = run_ltx2(["resume", seen["typo"]], env)
    return seen


def test_ctrl_c_during_generate_stops_the_worker_and_names_ltx2_resume(interrupted_generate: dict):
    seen = interrupted_generate
    assert seen["generate_exit"] == 130, seen["generate_stderr"]
    err = seen["generate_stderr"]
    assert "Traceback" not in err
    assert f"interrupted; job {seen['id']} stopped and left resumable: ltx2 resume {seen['id']}" in err
    assert "decode" not in err
    assert not seen["worker_alive_at_the_end"]


def test_status_jobs_and_logs_without_a_daemon_read_the_state_dir_and_write_nothing(interrupted_generate: dict):
    seen, job_id = interrupted_generate, interrupted_generate["id"]
    running = seen["running_alone"]["status"]
    assert running.returncode == 0, running.stderr
    assert running.stderr.count("ltx2: no daemon answered at ipc://") == 1
    assert "reading the state dir" in running.stderr
    assert f"job {job_id}: running" in running.stdout
    assert f"run by: `ltx2 generate` (pid {seen['generate_pid']})\n" in running.stdout
    results = {name: result for name, (result, _) in seen["alone"].items()}
    for name, (result, seconds) in seen["alone"].items():
        assert result.returncode == 0, (name, result.stderr)
        assert result.stderr.count("reading the state dir") == 1, (name, result.stderr)
        assert seconds < 10, f"{name} waited {seconds:.1f} s for a daemon whose socket file is stale"
    assert seen["stale_socket_left"]
    assert results["status"].stdout.startswith(f"job {job_id}: cancelled\n")
    assert re.search(rf"^{job_id}  cancelled  64x64x17 +a lighthouse$", results["jobs"].stdout, re.M)
    events = results["logs"].stdout
    assert events.startswith("--- events ---") and "result=interrupted" in events and "job_cancelled" in events
    # The same shape as the daemon's reply, read from the files alone.
    assert set(json.loads(results["status_json"].stdout)) == set(seen["interrupted_status_json"])
    assert seen["state_unchanged"]


def test_a_daemon_lists_a_generate_job_and_never_runs_it_on_its_own(interrupted_generate: dict):
    seen, job_id = interrupted_generate, interrupted_generate["id"]
    # Started while the generate ran, the daemon left its worker and its job alone, and sees the job.
    assert seen["worker_alive_beside_the_daemon"]
    beside = seen["running_beside_the_daemon"]
    assert beside["status"].returncode == 0 and "reading the state dir" not in beside["status"].stderr
    assert f"job {job_id}: running" in beside["status"].stdout
    assert re.search(rf"^{job_id}  running ", beside["jobs"].stdout, re.M), beside["jobs"].stdout
    # Interrupted while the daemon was up: left queued for `ltx2 resume`, not taken into the daemon's queue.
    record = seen["interrupted_record"]
    assert record["status"] == "queued" and record["owner"]["command"] == "generate"
    assert [a["result"] for a in record["stages"]["encode_diffuse"]["attempts"]] == ["interrupted"]
    assert f"continue it with: ltx2 resume {job_id}" in seen["interrupted_status"].stdout


def test_resume_refuses_a_job_another_process_runs(interrupted_generate: dict):
    seen, job_id = interrupted_generate, interrupted_generate["id"]
    running_in = f"job {job_id} is running in `ltx2 generate` (pid {seen['generate_pid']})"
    for result in (seen["running_alone"]["resume"], seen["running_beside_the_daemon"]["resume"]):
        assert result.returncode == 1 and running_in in result.stderr, result.stderr
        assert "Traceback" not in result.stderr


def test_the_daemon_takes_over_an_interrupted_generate_job_asked_to_resume_it(interrupted_generate: dict):
    seen, job_id = interrupted_generate, interrupted_generate["id"]
    assert seen["resume_by_daemon"].returncode == 0, seen["resume_by_daemon"].stderr
    assert seen["resume_by_daemon"].stdout == f"{job_id}: queued\n"
    assert seen["held"] == job_id  # its executor claimed it
    runner = seen["taken_over"]["runner"]
    assert (seen["taken_over"]["state"], runner["command"], runner["pid"]) == ("running", "daemon", seen["daemon_pid"])
    assert seen["cancel"].stdout == f"{job_id}: cancelling\n"


def test_resume_without_a_daemon_finishes_the_job_and_explains_what_it_cannot_resume(interrupted_generate: dict):
    seen, job_id = interrupted_generate, interrupted_generate["id"]
    resumed = seen["resume"]
    assert resumed.returncode == 0, resumed.stderr
    assert "no daemon answered at ipc://" in resumed.stderr
    assert f"resuming job {job_id} in this process" in resumed.stderr
    output = Path(resumed.stdout.strip())
    assert output.parent == seen["root"] / "outputs" and probe_mp4(output)["frames"] == 17
    record = seen["record"]
    assert (record["status"], record["output"], record["owner"]["command"]) == ("done", str(output), "resume")
    attempts = [a["result"] for a in record["stages"]["encode_diffuse"]["attempts"]]
    assert attempts[0] == "interrupted" and attempts[-1] == "ok"
    again, typo = seen["resume_again"], seen["resume_typo"]
    assert again.returncode == 1 and f"job {job_id} is already done; its video: {output}" in again.stderr
    assert typo.returncode == 1 and f"no job '{seen['typo']}'" in typo.stderr and f"nearest: {job_id}" in typo.stderr
    assert "ltx2 jobs" in typo.stderr


def ctrl_c_during_a_batch(root: Path, hf_home: Path) -> dict[str, object]:
    """A two-clip batch interrupted as Ctrl-C does while its first clip's diffusion is paused, then run
    again: the interrupted run's exit and stderr, whether its worker lived on, the rerun, the MP4s."""
    (root / "faults").mkdir()
    env = {
        **ltx2_environment(hf_home, root),
        "LTX2_FAULT_DIR": str(root / "faults"),
        "LTX2_FAULT_PAUSE": "encode_diffuse:denoise:2",
    }
    batch = root / "clips.toml"
    batch.write_text(
        '[defaults]\nwidth = 64\nheight = 64\nnum_frames = 17\n\n[[clips]]\nprompt = "one"\nseed = 1\n\n'
        '[[clips]]\nprompt = "two"\nseed = 2\n'
    )
    cli = start_cli(["batch", str(batch), "--quiet"], env)
    try:
        worker = int(wait_for_file(root / "faults" / "paused-encode_diffuse.pid").read_text())
        os.killpg(cli.pid, signal.SIGINT)
        _, err = cli.communicate(timeout=60)
    finally:
        if cli.poll() is None:
            os.killpg(cli.pid, signal.SIGKILL)
            cli.wait()
    seen: dict[str, object] = {"exit": cli.returncode, "stderr": err, "worker_running": is_running(worker)}
    seen["rerun"] = run_ltx2(["batch", str(batch), "--quiet"], env)
    seen["outputs"] = sorted(p.name.split("_")[0] for p in (root / "outputs").glob("*.mp4"))  # the prompts
    return seen


def test_ctrl_c_during_a_batch_stops_the_worker_and_a_rerun_finishes(ran_ahead: dict):
    assert ran_ahead["exit"] == 130, ran_ahead["stderr"]
    assert "Traceback" not in ran_ahead["stderr"]
    assert not ran_ahead["worker_running"]
    assert ran_ahead["rerun"].returncode == 0, ran_ahead["rerun"].stderr
    assert ran_ahead["outputs"] == ["one", "two"]


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
        except (DaemonError, DaemonNotListening):  # not serving yet (restarting: its socket may not exist yet)
            listed = []
        if len(listed) == count and all(job["state"] in wanted for job in listed):
            break
        time.sleep(STATUS_POLL_S)
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


def job_directory_deleted(root: Path, hf_home: Path) -> dict[str, object]:
    """Two jobs cancelled, the daemon stopped, one job's directory deleted, a daemon started again:
    the jobs, then what that daemon lists and says of the deleted one."""
    # The first job the daemon takes waits before its first stage until released, the other queued behind
    # it: both are cancelled before anything renders (a tiny job once finished before its cancel came).
    env = {**daemon_environment(hf_home, root), "LTX2_FAULT_HOLD": "before-encode_diffuse"}
    faults = Path(env["LTX2_FAULT_DIR"])
    with DaemonProcess(env, root / "first.log") as daemon:
        ids = [submit_tiny(env, "a mill", "--num-frames", "9", "--seed", seed) for seed in ("1", "2")]
        wait_for_file(faults / "held-before-encode_diffuse")
        for job_id in ids:
            assert run_ltx2(["cancel", job_id], env).returncode == 0
        (faults / "release-before-encode_diffuse").touch()
        for job_id in ids:
            daemon.wait_for_state(job_id, {"cancelled"})
    kept, deleted = ids
    shutil.rmtree(Path(env["LTX2_STATE_DIR"]) / "jobs" / deleted)
    with DaemonProcess(env, root / "second.log"):
        listed = json.loads(run_ltx2(["jobs", "--json"], env).stdout)
        status = run_ltx2(["status", deleted], env)
    return {"kept": kept, "deleted": deleted, "listed": listed, "status": status}


def test_a_job_whose_directory_was_deleted_is_gone_from_the_store_after_a_restart(ran_ahead: dict):
    deleted, status = ran_ahead["deleted"], ran_ahead["status"]
    assert [(job["id"], job["state"]) for job in ran_ahead["listed"]] == [(ran_ahead["kept"], "cancelled")]
    assert status.returncode == 1 and f"no job '{deleted}'" in status.stderr


def store_overwritten_under_a_running_job(root: Path, hf_home: Path) -> dict[str, object]:
    """A job paused in diffusion; the job store checkpointed and overwritten with garbage, the worker
    SIGKILLed so that the job goes on (a retry) over the damaged store: the job as it ended, the
    listing after it, the daemon's log and the store's path."""
    env = {**daemon_environment(hf_home, root), "LTX2_FAULT_PAUSE": "encode_diffuse:denoise:2"}
    store = root / "state" / "jobs.sqlite"
    with DaemonProcess(env, root / "daemon.log") as daemon:
        job_id = submit_tiny(env, "a mill", "--num-frames", "9")
        worker = int(wait_for_file(root / "faults" / "paused-encode_diffuse.pid").read_text())
        # What a backup tool's checkpoint, then `cat garbage > jobs.sqlite`, does to the file.
        with sqlite3.connect(store) as external:
            assert external.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] == 0  # not busy
        store.write_bytes(os.urandom(8192))
        os.kill(worker, signal.SIGKILL)  # the job goes on (a retry) over the damaged store
        job = daemon.wait_for_state(job_id, {"done", "failed", "cancelled"})
        listed = json.loads(run_ltx2(["jobs", "--json"], env).stdout)
        log = daemon.log()
    return {"job_id": job_id, "job": job, "listed": listed, "log": log, "store": store}


def test_a_store_overwritten_under_a_running_job_is_rebuilt_and_the_job_finishes(ran_ahead: dict):
    job, store = ran_ahead["job"], ran_ahead["store"]
    assert job["state"] == "done", job["error"]
    assert probe_mp4(Path(job["output"]))["frames"] == 9
    assert [(row["id"], row["state"]) for row in ran_ahead["listed"]] == [(ran_ahead["job_id"], "done")]
    assert "damaged under the daemon" in ran_ahead["log"]
    assert list(store.parent.glob("jobs.sqlite.corrupt-*"))  # the garbage is kept for a post-mortem


# These scenes run ahead (conftest's `runs_ahead`), one at a time from the module's first test on, each
# in a root of its own: beside the interrupted generate, which mostly waits on one core.
RUNS_AHEAD: dict[str, RunAhead] = {
    "test_ctrl_c_during_a_batch_stops_the_worker_and_a_rerun_finishes": ctrl_c_during_a_batch,
    "test_a_job_whose_directory_was_deleted_is_gone_from_the_store_after_a_restart": job_directory_deleted,
    "test_a_store_overwritten_under_a_running_job_is_rebuilt_and_the_job_finishes": (
        store_overwritten_under_a_running_job
    ),
}
