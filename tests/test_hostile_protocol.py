"""Hostile peers and environments: multipart floods, listings larger than a frame, a runtime dir
someone else owns, tcp without CURVE, readable secret keys. Real daemons, real sockets, the real CLI."""

from __future__ import annotations

import os
import shutil
import signal
import socket as pysocket
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq
from conftest import RunAhead, daemon_environment, run_ltx2, submit_tiny
from daemon_process import DaemonProcess, children_of, cmdline, is_running
from zmq.utils.monitor import recv_monitor_message

from orchestrator.daemon.replies import LIST_TEXT_CHARS, encode_reply, fit_listing
from protocol import codec, jobs
from protocol.codec import MAX_MESSAGE_BYTES, ErrorCode

# The flood: 1,000 frames just under the per-frame limit, about 1 GiB in one message.
FLOOD_FRAMES = 1000
# The daemon's peak RSS through the flood: it never sees the flood (its client front does), so it
# stays near its idle ~35 MiB; a daemon that read clients itself peaked at 1,036 MiB.
DAEMON_PEAK_LIMIT = 200 * 1024 * 1024
# How long a replacement client front may take to start, and an orphaned one to notice it is alone.
FRONT_WAIT_S = 30.0
# A hang guard for one reply, not a measurement: a 1 GiB message takes a few seconds on two cores.
REPLY_WAIT_MS = 120_000
# Enough 32,000-byte prompts that a listing of all of them with full prompts exceeds one frame.
LONG_PROMPT_JOBS = 40
# 8,000 four-byte characters: within the per-prompt byte limit, 40 of them make 1.3 MB.
LONG_PROMPT = "\U0001f30a" * 8000
# A hang guard for a CLI command that should refuse at once (an unfixed `ltx2 daemon` serves forever).
REFUSAL_TIMEOUT_S = 60.0
# `nobody`: a uid that is not ours, to play the other local user.
OTHER_UID = 65534


@pytest.fixture
def runtime_parent(tmp_path: Path) -> Iterator[Path]:
    """An XDG_RUNTIME_DIR short enough for ipc:// paths (108 bytes), removed afterwards."""
    parent = Path(f"/tmp/ltx2-hostile-{os.getpid()}-{tmp_path.name[-12:]}")
    parent.mkdir(mode=0o700)
    yield parent
    shutil.rmtree(parent, ignore_errors=True)


@pytest.fixture
def daemon_env(ltx2_env: dict, runtime_parent: Path) -> dict[str, str]:
    return {**ltx2_env, "XDG_RUNTIME_DIR": str(runtime_parent)}


def peak_rss_bytes(pid: int) -> int:
    """The process's peak resident set size so far, from /proc/PID/status (VmHWM, in kB)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM for {pid}")


def client_fronts(daemon_pid: int) -> list[int]:
    """The daemon's running client front processes (one, normally)."""
    return [pid for pid in children_of(daemon_pid) if "client_front" in cmdline(pid) and is_running(pid)]


def front_of(daemon_pid: int) -> int:
    """The daemon's client front process."""
    fronts = client_fronts(daemon_pid)
    assert len(fronts) == 1, f"daemon {daemon_pid} has client fronts {fronts}"
    return fronts[0]


def wait_for_front(daemon_pid: int, other_than: int) -> int:
    """The daemon's next client front, once it has replaced `other_than`."""
    deadline = time.monotonic() + FRONT_WAIT_S
    while time.monotonic() < deadline:
        fronts = client_fronts(daemon_pid)
        if fronts and fronts != [other_than]:
            return fronts[0]
        time.sleep(0.1)
    pytest.fail(f"daemon {daemon_pid} started no new client front after {other_than} died")


def run_cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """The real CLI; a command that should refuse but keeps running fails the test instead of hanging it."""
    try:
        return run_ltx2(args, env, timeout=REFUSAL_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"`ltx2 {' '.join(args)}` did not refuse; it ran on:\n{exc.stderr}")


def multipart_flood(root: Path, hf_home: Path) -> dict[str, object]:
    """A client sends FLOOD_FRAMES frames of almost 1 MiB as one message, then the CLI submits a job and
    lists the jobs: what the flooding client got back, the daemon's peak RSS, the CLI's answers, the
    daemon's client fronts before the flood and whether the first still runs, and the daemon's log."""
    env = daemon_environment(hf_home, root)
    with DaemonProcess(env, root / "daemon.log") as daemon:
        seen: dict[str, object] = {"fronts": client_fronts(daemon.pid)}
        context = zmq.Context()
        dealer = context.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        monitor = dealer.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        dealer.connect(daemon.endpoint)
        frame = b"\x00" * (MAX_MESSAGE_BYTES - 1)  # sent zero-copy: the test itself stays small
        for _ in range(FLOOD_FRAMES - 1):
            dealer.send(frame, flags=zmq.SNDMORE, copy=False)
        dealer.send(frame, copy=False)
        # Under its memory bound the front refuses the message; past it, it drops the connection.
        poller = zmq.Poller()
        poller.register(dealer, zmq.POLLIN)
        poller.register(monitor, zmq.POLLIN)
        events = dict(poller.poll(REPLY_WAIT_MS))
        seen["answered"] = bool(events)
        seen["reply"] = codec.decode(dealer.recv()) if dealer in events else None
        seen["monitor_event"] = recv_monitor_message(monitor)["event"] if monitor in events else None
        dealer.disable_monitor()
        monitor.close()
        dealer.close()
        context.term()
        seen["peak"] = peak_rss_bytes(daemon.pid)
        seen["job_id"] = submit_tiny(env, "after the flood")
        seen["listed"] = run_cli(["jobs"], env)
        with daemon.client() as client:
            seen["pinged"] = client.request(jobs.Ping(""))["pid"]
        seen |= {"daemon": daemon.pid, "log": daemon.log()}
        seen["first_front_running"] = bool(seen["fronts"]) and is_running(seen["fronts"][0])
    return seen


def test_multipart_flood_never_reaches_the_daemon_and_the_cli_still_works(ran_ahead: dict):
    seen = ran_ahead
    assert seen["answered"], f"no reply and no disconnect after the flood; daemon log:\n{seen['log'][-3000:]}"
    if seen["reply"] is not None:
        reply = seen["reply"]
        assert isinstance(reply, jobs.Error) and reply.code in (ErrorCode.MALFORMED, ErrorCode.TOO_LARGE)
    else:
        assert seen["monitor_event"] == zmq.EVENT_DISCONNECTED
    peak = seen["peak"]
    assert peak < DAEMON_PEAK_LIMIT, f"daemon peak RSS {peak >> 20} MiB after a {FLOOD_FRAMES} MiB message"
    listed = seen["listed"]
    assert listed.returncode == 0 and seen["job_id"] in listed.stdout, listed.stderr
    assert seen["pinged"] == seen["daemon"]
    fronts = seen["fronts"]
    assert len(fronts) == 1, f"daemon {seen['daemon']} has client fronts {fronts}"
    if not seen["first_front_running"]:  # it died of the flood (libzmq aborts where it cannot allocate)
        assert "client front" in seen["log"] and "died" in seen["log"]


def client_fronts_that_die(root: Path, hf_home: Path) -> dict[str, object]:
    """A daemon's client front SIGKILLed (as libzmq's abort would), the CLI then, the daemon stopped; a
    second daemon SIGKILLed, leaving its front alone. Which fronts ran after what, the CLI's answer."""
    env = daemon_environment(hf_home, root)
    with DaemonProcess(env, root / "daemon.log") as daemon:
        first = front_of(daemon.pid)
        os.kill(first, signal.SIGKILL)  # as libzmq's abort would
        second = wait_for_front(daemon.pid, other_than=first)
        listed = run_cli(["jobs"], env)
        died = [line for line in daemon.log().splitlines() if f"client front {first} died" in line]
        log = daemon.log()
    seen: dict[str, object] = {"second": second, "listed": listed, "died": died, "log": log}
    seen["second_running"] = is_running(second)
    with DaemonProcess(env, root / "daemon2.log") as daemon:
        orphan = front_of(daemon.pid)
        daemon.process.kill()  # no chance to stop its front: the front notices on its own
        daemon.process.wait()
        deadline = time.monotonic() + FRONT_WAIT_S
        while is_running(orphan) and time.monotonic() < deadline:
            time.sleep(0.1)
    return seen | {"orphan": orphan, "orphan_running": is_running(orphan)}


def test_a_client_front_that_dies_is_replaced_and_none_outlives_the_daemon(ran_ahead: dict):
    seen = ran_ahead
    assert seen["listed"].returncode == 0, seen["listed"].stderr
    assert len(seen["died"]) == 1, seen["log"]
    assert not seen["second_running"], f"client front {seen['second']} outlived its daemon"
    assert not seen["orphan_running"], f"client front {seen['orphan']} outlived its SIGKILLed daemon"


def jobs_with_long_prompts(root: Path, hf_home: Path) -> dict[str, object]:
    """LONG_PROMPT_JOBS jobs of long prompts submitted and cancelled, then listed and shown by the CLI,
    and a prompt over the byte limit submitted: the ids and the CLI's answers."""
    env = daemon_environment(hf_home, root)
    with DaemonProcess(env, root / "daemon.log") as daemon:
        ids = []
        with daemon.client(timeout_s=60) as client:
            for n in range(LONG_PROMPT_JOBS):
                spec = {"prompt": f"{n} {LONG_PROMPT}", "width": 64, "height": 64, "num_frames": 9, "seed": n}
                ids.append(client.request(jobs.Submit("", spec))["id"])
            for job_id in ids:  # nothing here needs them to run
                client.request(jobs.Cancel(job_id))
        return {
            "ids": ids,
            "listed": run_ltx2(["jobs", "--limit", "100"], env),
            "as_json": run_ltx2(["jobs", "--limit", "100", "--json"], env),
            "shown": run_ltx2(["status", ids[-1]], env),
            "too_long": run_ltx2(["submit", "--prompt", "\U0001f30a" * 20_000], env),
        }


def test_listing_and_status_of_jobs_with_long_prompts_fit_in_one_frame(ran_ahead: dict):
    listed, as_json, shown, too_long = (ran_ahead[key] for key in ("listed", "as_json", "shown", "too_long"))
    assert listed.returncode == 0, listed.stderr
    assert all(job_id in listed.stdout for job_id in ran_ahead["ids"])
    assert as_json.returncode == 0, as_json.stderr
    assert shown.returncode == 0, shown.stderr
    assert f"prompt: {LONG_PROMPT_JOBS - 1} \U0001f30a" in shown.stdout
    assert too_long.returncode == 2, too_long.stderr
    assert "--prompt" in too_long.stderr and "bytes" in too_long.stderr
    assert "Traceback" not in too_long.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a directory to another uid")
def test_runtime_dir_of_another_user_or_open_to_others_is_refused(ltx2_env: dict, runtime_parent: Path, tmp_path: Path):
    runtime = runtime_parent / f"ltx2-stages-{os.getuid()}"
    runtime.mkdir(mode=0o700)
    env = {**ltx2_env, "XDG_RUNTIME_DIR": str(runtime_parent)}
    os.chown(runtime, OTHER_UID, OTHER_UID)
    os.chmod(runtime, 0o777)
    for args in (["daemon"], ["jobs"]):
        refused = run_cli(args, env)
        assert refused.returncode != 0
        assert "Traceback" not in refused.stderr
        assert str(runtime) in refused.stderr and f"owned by uid {OTHER_UID}" in refused.stderr, refused.stderr
    os.chown(runtime, os.getuid(), os.getgid())
    os.chmod(runtime, 0o755)
    refused = run_cli(["daemon"], env)
    assert refused.returncode != 0
    assert str(runtime) in refused.stderr and "chmod 700" in refused.stderr, refused.stderr
    os.chmod(runtime, 0o700)
    with DaemonProcess(env, tmp_path / "daemon.log"):
        listed = run_cli(["jobs"], env)
        assert listed.returncode == 0, listed.stderr


def free_port() -> int:
    with pysocket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_daemon_on_tcp_without_curve_keys_exits_2_with_one_line(daemon_env: dict, tmp_path: Path):
    env = {**daemon_env, "LTX2_DAEMON_ENDPOINT": f"tcp://127.0.0.1:{free_port()}"}
    refused = run_cli(["daemon"], env)
    assert refused.returncode == 2, refused.stderr
    assert "Traceback" not in refused.stderr
    errors = [line for line in refused.stderr.splitlines() if line.startswith("ltx2: error:")]
    assert len(errors) == 1 and "daemon.curve_server_secret_key" in errors[0], refused.stderr
    config = tmp_path / "config.toml"
    config.write_text(
        f'[daemon]\ncurve_server_secret_key = "{tmp_path}/missing.key_secret"\n'
        f'curve_authorized_keys_dir = "{tmp_path}"\n'
    )
    missing = run_cli(["daemon"], {**env, "LTX2_CONFIG": str(config)})
    assert missing.returncode == 2, missing.stderr
    assert "Traceback" not in missing.stderr and "missing.key_secret" in missing.stderr, missing.stderr


def test_keys_writes_secret_keys_readable_by_the_owner_only(ltx2_env: dict, tmp_path: Path):
    made = run_cli(["keys", str(tmp_path / "keys")], ltx2_env)
    assert made.returncode == 0, made.stderr
    secrets = sorted((tmp_path / "keys").glob("*.key_secret"))
    assert [path.name for path in secrets] == ["client.key_secret", "server.key_secret"]
    for path in secrets:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == 0o600, f"{path.name} is {mode:o}"


def test_a_listing_too_long_for_one_frame_keeps_the_newest_jobs_and_counts_the_rest():
    rows = [
        {"id": f"job-{n:04d}", "state": "queued", "prompt": "\U0001f30a" * 20_000, "error": "x" * 10_000}
        for n in range(2000)
    ]
    data = fit_listing(rows)
    frame = codec.encode(jobs.Ok("", data))
    assert len(frame) <= MAX_MESSAGE_BYTES
    assert data["omitted"] > 0 and len(data["jobs"]) + data["omitted"] == len(rows)
    assert data["jobs"][-1]["id"] == "job-1999"
    assert all(len(job["prompt"]) <= LIST_TEXT_CHARS and len(job["error"]) <= LIST_TEXT_CHARS for job in data["jobs"])


def test_a_reply_over_one_frame_becomes_a_too_large_error():
    reply = codec.decode(encode_reply(jobs.Ok("job-1", {"blob": b"\x00" * (MAX_MESSAGE_BYTES + 1)})))
    assert isinstance(reply, jobs.Error) and reply.code == ErrorCode.TOO_LARGE and reply.id == "job-1"


def client_front_that_cannot_restart(root: Path, hf_home: Path) -> dict[str, object]:
    """A daemon's client front SIGKILLed while a starting front refuses (LTX2_FAULT_FRONT_REFUSE), until
    two restarts failed; then the refusal lifted: the CLI's answer and whether the daemon lived on."""
    blocker = root / "front-refuses"
    env = {**daemon_environment(hf_home, root), "LTX2_FAULT_FRONT_REFUSE": str(blocker)}
    with DaemonProcess(env, root / "daemon.log") as daemon:
        first = front_of(daemon.pid)
        blocker.touch()  # from now on a starting front refuses, as if its port were taken
        os.kill(first, signal.SIGKILL)
        deadline = time.monotonic() + FRONT_WAIT_S
        while daemon.log().count("client front could not start") < 2:  # retried, with backoff
            assert daemon.process.poll() is None, daemon.log()[-3000:]
            assert time.monotonic() < deadline, daemon.log()[-3000:]
            time.sleep(0.2)
        blocker.unlink()
        wait_for_front(daemon.pid, other_than=first)
        listed = run_cli(["jobs"], env)
        return {"listed": listed, "daemon_alive": daemon.process.poll() is None}


def test_a_client_front_that_cannot_restart_is_retried_and_the_daemon_lives_on(ran_ahead: dict):
    assert ran_ahead["listed"].returncode == 0, ran_ahead["listed"].stderr
    assert ran_ahead["daemon_alive"]


def test_another_process_on_the_daemons_private_socket_is_never_answered(daemon_env: dict, tmp_path: Path):
    """The daemon's private socket (daemon-core-<pid>.sock) is in the 0700 runtime dir, but any process
    of the same user can connect to it: it must get no reply, neither to its own requests nor to
    other clients', and the clients of the client front must all be answered meanwhile."""
    with DaemonProcess(daemon_env, tmp_path / "daemon.log") as daemon:
        core = Path(daemon_env["XDG_RUNTIME_DIR"]) / f"ltx2-stages-{os.getuid()}" / f"daemon-core-{daemon.pid}.sock"
        assert core.exists()
        context = zmq.Context()
        rogue = context.socket(zmq.DEALER)
        rogue.setsockopt(zmq.LINGER, 0)
        rogue.connect(f"ipc://{core}")
        try:
            ping = codec.encode(jobs.Ping(""))
            rogue.send_multipart([b"rogue", ping])  # what the front forwards
            rogue.send_multipart([os.urandom(32), b"rogue", ping])  # with a guessed token
            for _ in range(6):  # a DEALER in the daemon would deal some of these replies to the rogue
                with daemon.client() as client:
                    assert client.request(jobs.Ping(""))["pid"] == daemon.pid
            assert rogue.poll(2000) == 0, rogue.recv_multipart()
        finally:
            context.destroy(linger=0)
        assert "did not come from its client front" in daemon.log()


# The daemon scenes above run ahead (conftest's `runs_ahead`), two at a time from the module's first test
# on, each with a daemon of its own: a scene mostly waits (on a front's restart, on the CLI).
RUNS_AHEAD: dict[str, RunAhead] = {
    "test_multipart_flood_never_reaches_the_daemon_and_the_cli_still_works": multipart_flood,
    "test_a_client_front_that_dies_is_replaced_and_none_outlives_the_daemon": client_fronts_that_die,
    "test_listing_and_status_of_jobs_with_long_prompts_fit_in_one_frame": jobs_with_long_prompts,
    "test_a_client_front_that_cannot_restart_is_retried_and_the_daemon_lives_on": client_front_that_cannot_restart,
}
RUNS_AHEAD_AT_ONCE = 2
