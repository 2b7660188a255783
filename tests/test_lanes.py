"""Lanes (DESIGN.md rule 8): one stage process at a time per device, every device at work.

CPU lanes (`LTX2_DEVICES=cpu,cpu`) stand in for GPUs: their workers start with an empty
`CUDA_VISIBLE_DEVICES`, and the scheduling is the same as for `cuda:N` lanes.
"""

from __future__ import annotations

import datetime as dt
import heapq
import json
import os
import threading
import time
from collections import defaultdict
from pathlib import Path

import pytest
import torch
import zmq
from conftest import RunAhead, daemon_environment, run_ltx2, run_ltx2_two_at_a_time
from daemon_process import DaemonProcess, children_of, cmdline, is_running, kill_group, running_writers_into
from safetensors.torch import load_file
from supervised import Supervised, wait_for_file
from test_daemon import submit
from test_stage_major import TINY, TINY_FLAGS, clip_flags, jobs_by_name, make_job, write_batch

from config.settings import ConfigError, load_settings
from orchestrator.daemon.executor import Executor, ProgressBoard
from orchestrator.daemon.lane_occupancy import LaneOccupancy
from orchestrator.daemon.store import JobStore
from orchestrator.placement.fork_client import worker_environment
from orchestrator.placement.lane_links import LocalLanes
from orchestrator.placement.lanes import Lane, lane_width, resolve_lanes, runs_here, split_for_lanes, widest_lane
from orchestrator.run.jobdir import JobDir
from orchestrator.run.states import JobState
from protocol.files import LATENTS_FILE, Stage


def settings_with(devices: object = None, environ: dict[str, str] | None = None):
    overrides = {"cluster": {"devices": devices}} if devices is not None else None
    return load_settings(environ={"LTX2_CONFIG": "", **(environ or {})}, overrides=overrides)


def test_devices_setting_accepts_auto_a_count_a_list_and_the_environment():
    assert settings_with().devices == "auto"
    assert settings_with(1).devices == 1
    assert settings_with(["cuda:0", "cuda:2"]).devices == ("cuda:0", "cuda:2")
    assert settings_with(environ={"LTX2_DEVICES": "cpu,cpu"}).devices == ("cpu", "cpu")
    assert settings_with(environ={"LTX2_DEVICES": "1"}).devices == 1
    assert settings_with(environ={"LTX2_DEVICES": "auto"}).devices == "auto"


@pytest.mark.parametrize(
    "devices, message",
    [
        (0, "cluster.devices must be at least 1 lane"),
        (True, "cluster.devices must be"),
        ([], "cluster.devices must be"),
        ("cuda", "cluster.devices must be"),
        (["gpu:1"], "cluster.devices: 'gpu:1' is not a device"),
        (["cuda:0", "cuda:0"], "cluster.devices names a device twice"),
        (["cuda:0", "cuda:1+0"], "cluster.devices names a device twice"),
        (["cuda:0+"], "cluster.devices: 'cuda:0\\+' is not a device"),
        ([0, 1], "cluster.devices must be"),
    ],
)
def test_bad_devices_setting_is_an_error_naming_the_key(devices: object, message: str):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        settings_with(devices)


def test_bad_devices_variable_fails_the_command_with_exit_2(ltx2_env: dict):
    result = run_ltx2(["batch", "nothing.toml"], {**ltx2_env, "LTX2_DEVICES": "cuda:0,tpu:1"})
    assert result.returncode == 2
    assert "cluster.devices: 'tpu:1' is not a device" in result.stderr


def test_lanes_follow_cuda_visible_devices():
    def lanes(devices: object, visible: str) -> list[tuple[str, str | None]]:
        found = resolve_lanes(settings_with(devices), {"CUDA_VISIBLE_DEVICES": visible})
        return [(lane.device, lane.visible_devices) for lane in found]

    # The orchestrator's cuda:N is the Nth entry of its own CUDA_VISIBLE_DEVICES.
    assert lanes("auto", "2,3") == [("cuda:0", "2"), ("cuda:1", "3")]
    assert lanes(["cuda:1"], "2,3") == [("cuda:1", "3")]
    assert lanes(2, "GPU-a,GPU-b,GPU-c") == [("cuda:0", "GPU-a"), ("cuda:1", "GPU-b")]
    assert lanes("auto", "0,-1,2") == [("cuda:0", "0")]  # CUDA stops at the first invalid entry
    assert lanes("auto", "") == [("", None)]  # no GPU: one lane, as before lanes existed
    assert lanes(1, "0,1") == [("", None)]  # one lane that sees every GPU
    assert lanes(["cpu", "cpu"], "0") == [("cpu", ""), ("cpu", "")]
    # A lane of several GPUs (context parallel: one process per GPU) sees all of them.
    assert lanes(["cuda:0", "cuda:1+2"], "4,5,6") == [("cuda:0", "4"), ("cuda:1+2", "5,6")]
    with pytest.raises(ConfigError, match="cluster.devices names cuda:1\\+3, but only 3"):
        lanes(["cuda:1+3"], "4,5,6")
    with pytest.raises(ConfigError, match="cluster.devices names cuda:2, but only 2 CUDA devices are visible"):
        lanes(["cuda:2"], "0,1")
    with pytest.raises(ConfigError, match="cluster.devices = 3, but only 2"):
        lanes(3, "0,1")


def test_a_lanes_device_reaches_an_execd_workers_environment():
    assert worker_environment("")["CUDA_VISIBLE_DEVICES"] == ""
    assert worker_environment("3")["CUDA_VISIBLE_DEVICES"] == "3"
    assert worker_environment("3", 4)["OMP_NUM_THREADS"] == "4"


def lane_share() -> int:
    """Each of two lanes' share of the CPUs this process may run on."""
    return max(1, len(os.sched_getaffinity(0)) // 2)


def test_several_lanes_share_the_cpus_and_one_lane_keeps_torchs_default():
    def threads(lane_threads: object, visible: str, **environ: str) -> list[int | None]:
        settings = settings_with(environ={"LTX2_LANE_THREADS": str(lane_threads)})
        return [lane.threads for lane in resolve_lanes(settings, {"CUDA_VISIBLE_DEVICES": visible, **environ})]

    assert threads("auto", "0,1") == [lane_share()] * 2
    assert threads("auto", "0") == [None]  # one lane: every core, as before lanes existed
    assert threads("auto", "") == [None]
    assert threads("auto", "0,1", OMP_NUM_THREADS="3") == [None, None]  # the user's setting wins
    assert threads(5, "0,1") == [5, 5]
    assert threads(2, "0") == [2]
    assert settings_with().lane_threads == "auto"


@pytest.mark.parametrize("value", ["0", "many", "-2", "1.5"])
def test_bad_lane_threads_is_an_error_naming_the_key(value: str):
    with pytest.raises(ConfigError, match="cluster.lane_threads must be"):
        settings_with(environ={"LTX2_LANE_THREADS": value})


def test_jobs_split_into_contiguous_runs_in_order():
    assert split_for_lanes([1, 2, 3, 4], 2) == [[1, 2], [3, 4]]
    assert split_for_lanes([1, 2, 3], 2) == [[1, 2], [3]]
    assert split_for_lanes([1], 3) == [[1]]


def queued_job(store: JobStore, root: Path, name: str) -> JobDir:
    job = make_job(root, name)
    job.mirror = store.mirror
    store.mirror(job)
    return job


def claims_only_settings(state_dir: Path):
    """Settings for lanes that only claim jobs: no fork server (one would be started, and outlive
    the test, for workers that never come)."""
    return load_settings(environ={"LTX2_STATE_DIR": str(state_dir), "LTX2_CONFIG": "", "LTX2_FORK_SERVER": "false"})


def claiming_executors(state_dir: Path, lanes: int) -> list[Executor]:
    """One claim-only executor per CPU lane over `state_dir`'s job store, sharing one LaneOccupancy
    as a daemon's executors do (never started: the tests call `claim` themselves)."""
    settings = claims_only_settings(state_dir)
    source, occupancy = LocalLanes(settings, zmq.Context.instance()), LaneOccupancy(lanes)
    store_path, stop = state_dir / "jobs.sqlite", threading.Event()
    return [
        Executor(settings, store_path, source, ProgressBoard(), stop, Lane(n, "cpu", ""), occupancy)
        for n in range(lanes)
    ]


def test_two_lanes_never_both_claim_a_job(tmp_path: Path):
    store_path = tmp_path / "jobs.sqlite"
    executors = claiming_executors(tmp_path, 2)
    main_store = JobStore(store_path)
    rounds = 12
    barrier = threading.Barrier(3)  # both lanes and this thread, which queues each round's job
    claims: dict[int, list[list[str]]] = defaultdict(list)

    def claim_each_round(index: int) -> None:
        store = JobStore(store_path)
        for _ in range(rounds):
            barrier.wait()  # the round's job is queued; both lanes claim at once
            claims[index].append([job.id for job in executors[index].claim(store)])
            barrier.wait()
        store.close()

    threads = [threading.Thread(target=claim_each_round, args=(n,)) for n in range(2)]
    for thread in threads:
        thread.start()
    for number in range(rounds):
        job = queued_job(main_store, tmp_path / "jobs", f"job{number}")
        barrier.wait()
        barrier.wait()
        winners = [lane for lane in range(2) if claims[lane][number] == [job.id]]
        assert len(winners) == 1, (number, claims)
        assert JobDir.load(job.path).state is JobState.RUNNING
        events = (job.path / "events.log").read_text().splitlines()
        assert sum(json.loads(line)["event"] == "job_running" for line in events) == 1
    for thread in threads:
        thread.join()
    main_store.close()


def test_a_lane_claims_its_share_of_the_queue(tmp_path: Path):
    store = JobStore(tmp_path / "jobs.sqlite")
    jobs = [queued_job(store, tmp_path / "jobs", f"job{n}") for n in range(5)]
    lane = claiming_executors(tmp_path, 2)[0]
    assert [job.id for job in lane.claim(store)] == [job.id for job in jobs[:3]]  # 5 queued, 2 lanes
    assert [job.id for job in lane.claim(store)] == [jobs[3].id]
    store.close()


# A simulated burst on 8 lanes (issue 17's CPU part: no 4- or 8-GPU machine is lent). Each lane is a
# real Executor claiming from the real job store; running a claimed group is simulated as taking a
# diffusion process's fixed cost plus a cost per clip, run 6's figures for one lane of two H200s
# (docs/benchmarks.md, version 9): 27.9 s to the first step, then 2.2 s per clip.
FIXED_S, PER_CLIP_S = 27.9, 2.2


def simulate_lanes(tmp_path: Path, lanes: int, queued: int) -> tuple[list[tuple[float, int, list[str]]], list[str]]:
    """(claims as (time, lane, job ids) in the order they were made, the jobs in submission order)."""
    store = JobStore(tmp_path / "jobs.sqlite")
    jobs = [queued_job(store, tmp_path / "jobs", f"job{n:03d}") for n in range(queued)]
    executors = claiming_executors(tmp_path, lanes)
    occupancy = executors[0].occupancy
    free_at = [(0.0, lane) for lane in range(lanes)]  # (when the lane is free, lane), earliest first
    claims: list[tuple[float, int, list[str]]] = []
    while free_at:
        now, lane = heapq.heappop(free_at)
        occupancy.release(lane)  # its simulated run has ended
        claimed = [job.id for job in executors[lane].claim(store)]
        if not claimed:
            assert not store.queued(1), f"lane {lane} idle at {now:.1f} s while jobs wait"
            continue
        claims.append((now, lane, claimed))
        heapq.heappush(free_at, (now + FIXED_S + PER_CLIP_S * len(claimed), lane))
    store.close()
    return claims, [job.id for job in jobs]


def test_eight_lanes_take_a_burst_in_submission_order_one_full_group_each(tmp_path: Path):
    """64 jobs queued at once on 8 lanes: claimed in submission order, every lane a full group of 8
    in one round (a lane's share counts only the lanes free to take work), no lane idle while jobs
    wait; the simulated batch ends after one group's time."""
    claims, submitted = simulate_lanes(tmp_path, lanes=8, queued=64)
    assert [job for _, _, ids in claims for job in ids] == submitted
    assert sorted(lane for _, lane, _ in claims) == list(range(8))
    assert [len(ids) for _, _, ids in claims] == [8] * 8
    assert max(when for when, _, _ in claims) == 0.0
    # And a burst that does not divide: 20 jobs on 8 lanes, every lane busy at once, none idle.
    claims, submitted = simulate_lanes(tmp_path / "uneven", lanes=8, queued=20)
    assert [job for _, _, ids in claims for job in ids] == submitted
    assert [len(ids) for _, _, ids in claims] == [3, 3, 3, 3, 2, 2, 2, 2]


def attempts_of(records: list[dict]) -> list[tuple[str, dict]]:
    return [(stage, a) for r in records for stage, s in r["stages"].items() for a in s["attempts"]]


def assert_each_lane_runs_one_process_at_a_time(records: list[dict]) -> None:
    """From the attempts' lane, pid and times: a lane's stage processes (a group's members share
    one pid) never overlap, each spanning its members' first start to their last end."""
    spans: dict[tuple[int, int, str], list[dt.datetime]] = {}
    for stage, attempt in attempts_of(records):
        times = [dt.datetime.fromisoformat(attempt[key]) for key in ("started", "ended")]
        key = (attempt["lane"], attempt["pid"], stage)
        span = spans.setdefault(key, times)
        spans[key] = [min(span[0], times[0]), max(span[1], times[1])]
    by_lane: dict[int, list[list[dt.datetime]]] = defaultdict(list)
    for (lane, _, _), span in spans.items():
        by_lane[lane].append(span)
    for lane, lane_spans in by_lane.items():
        ordered = sorted(lane_spans)
        for (_, end), (start, _) in zip(ordered, ordered[1:], strict=False):
            assert end <= start, (lane, ordered)


def test_batch_on_two_cpu_lanes_runs_them_at_once_one_process_each_with_clips_equal_to_generate(
    ltx2_env: dict, tmp_path: Path
):
    clips = [{"name": f"clip{n}", "prompt": f"a lighthouse, take {n}", "seed": n} for n in range(1, 5)]
    env = {**ltx2_env, "LTX2_DEVICES": "cpu,cpu"}
    result = run_ltx2(["batch", str(write_batch(tmp_path / "four.toml", clips)), "--quiet"], env, timeout=600)
    assert result.returncode == 0, result.stderr
    jobs = jobs_by_name(env)
    records = [jobs[clip["name"]].record.to_json() for clip in clips]
    # The lanes take contiguous runs of the clips, in order; a clip stays on one lane.
    lanes = [{(a["lane"], a["device"]) for _, a in attempts_of([record])} for record in records]
    assert lanes == [{(0, "cpu")}, {(0, "cpu")}, {(1, "cpu")}, {(1, "cpu")}]

    # Both lanes' diffusion ran at the same time (from events.log)...
    def diffusion_span(name: str) -> tuple[str, str]:
        events = [json.loads(line) for line in (jobs[name].path / "events.log").read_text().splitlines()]
        times = {e["event"]: e["t"] for e in events if e.get("stage") == "encode_diffuse"}
        return times["stage_started"], times["stage_finished"]

    first, second = diffusion_span("clip1"), diffusion_span("clip3")
    assert first[0] < second[1] and second[0] < first[1], (first, second)
    # ... while each lane ran one stage process at a time, on its share of the CPUs.
    assert_each_lane_runs_one_process_at_a_time(records)
    assert {a["cpu_threads"] for _, a in attempts_of(records)} == {lane_share()}
    # Every worker of a CPU lane saw no GPU.
    log = jobs["clip3"].log_path(Stage.VIDEO_DECODE, 1).read_text()
    assert "CUDA_VISIBLE_DEVICES=''" in log
    # A clip's latents are the bits `ltx2 generate` makes of it alone: the second clip of lane 0 (after another in
    # its group process) and the first of lane 1 (two generates, not four: ~10 s of CI).
    checked = [clips[1], clips[2]]
    alone_envs = [{**ltx2_env, "LTX2_STATE_DIR": str(tmp_path / "alone" / clip["name"])} for clip in checked]
    commands = [["generate", "--model", TINY, *TINY_FLAGS, *clip_flags(clip), "--quiet"] for clip in checked]
    singles = run_ltx2_two_at_a_time(list(zip(commands, alone_envs, strict=True)))
    for clip, single, alone_env in zip(checked, singles, alone_envs, strict=True):
        assert single.returncode == 0, single.stderr
        alone = load_file(jobs_by_name(alone_env)[clip["name"]].path / LATENTS_FILE)
        laned = load_file(jobs[clip["name"]].path / LATENTS_FILE)
        assert alone.keys() == laned.keys()
        for key in alone:
            assert torch.equal(alone[key], laned[key]), (clip["name"], key)


def test_daemon_refuses_lanes_it_cannot_see(daemon_env: dict):  # noqa: F811
    env = {**daemon_env, "LTX2_DEVICES": "cuda:0,cuda:1", "CUDA_VISIBLE_DEVICES": ""}
    result = run_ltx2(["daemon"], env, timeout=60)
    assert result.returncode == 2
    assert "cluster.devices names cuda:0, but only 0 CUDA devices are visible" in result.stderr


def daemon_with_two_cpu_lanes(root: Path, hf_home: Path) -> dict[str, object]:
    """Four jobs queued on a supervised daemon of two CPU lanes: the jobs as they ended, and what
    `ltx2 status` says of the first."""
    env = {**daemon_environment(hf_home, root), "LTX2_DEVICES": "cpu,cpu"}
    with Supervised(root, env) as supervised:
        ids = [submit(env, "--seed", str(seed)) for seed in range(21, 25)]
        done = [supervised.wait_for_state(job_id, {"done", "failed"}) for job_id in ids]
        status = run_ltx2(["status", ids[0]], env).stdout
    return {"done": done, "status": status}


def test_daemon_runs_queued_jobs_on_every_lane_one_process_at_a_time(ran_ahead: dict):
    done, status = ran_ahead["done"], ran_ahead["status"]
    assert [job["state"] for job in done] == ["done"] * 4, [job["error"] for job in done]
    assert "encode_diffuse attempt 1 [" in status and "] on cpu (lane " in status, status
    records = [json.loads((Path(job["job_dir"]) / "job.json").read_text()) for job in done]
    assert {(a["lane"], a["device"]) for _, a in attempts_of(records)} == {(0, "cpu"), (1, "cpu")}
    for record in records:  # a job stays on the lane that claimed it
        assert len({a["lane"] for _, a in attempts_of([record])}) == 1
    assert_each_lane_runs_one_process_at_a_time(records)


def fork_servers_of(pid: int) -> list[int]:
    return [child for child in children_of(pid) if "services.forkserver" in cmdline(child)]


def wait_for_fork_servers_of(pid: int, deadline_s: float = 30.0) -> list[int]:
    """The process's fork servers once there is one: the lanes start theirs from a thread
    (ForkServer.warm), which a loaded machine may run only after the daemon answers."""
    deadline = time.monotonic() + deadline_s
    while not (servers := fork_servers_of(pid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return servers


def daemon_whose_lanes_share_a_fork_server(root: Path, hf_home: Path) -> dict[str, object]:
    """A daemon of two CPU lanes: its fork servers before any job, two jobs as they ended, its fork
    servers after them, and whether the first still ran once the daemon had stopped."""
    env = {**daemon_environment(hf_home, root), "LTX2_DEVICES": "cpu,cpu", "LTX2_FORK_SERVER": "true"}
    with DaemonProcess(env, root / "daemon.log") as daemon:
        seen: dict[str, object] = {"before": wait_for_fork_servers_of(daemon.pid)}  # no job submitted yet
        seen["log"] = daemon.log()[-2000:]
        ids = [submit(env, "--seed", str(seed)) for seed in (31, 32)]
        seen["done"] = [daemon.wait_for_state(job_id, {"done", "failed"}) for job_id in ids]
        seen["after"] = fork_servers_of(daemon.pid)
    seen["still_running"] = [pid for pid in seen["before"] if is_running(pid)]
    return seen


def test_the_lanes_of_a_daemon_share_one_fork_server_started_before_any_job(ran_ahead: dict):
    """The imports (10 s on a GPU host) overlap the daemon's idle start, once for all lanes, not
    per lane at its first job."""
    servers, done = ran_ahead["before"], ran_ahead["done"]
    assert len(servers) == 1, (servers, ran_ahead["log"])
    assert [job["state"] for job in done] == ["done"] * 2, [job["error"] for job in done]
    records = [json.loads((Path(job["job_dir"]) / "job.json").read_text()) for job in done]
    assert {a["lane"] for _, a in attempts_of(records)} == {0, 1}  # both lanes forked workers
    # A forked worker's torch pool is sized in the child, for its lane (the server's is the host's).
    assert {a["cpu_threads"] for _, a in attempts_of(records)} == {lane_share()}
    assert ran_ahead["after"] == servers  # from that one server
    assert ran_ahead["still_running"] == []  # and it stopped with the daemon


def test_a_worker_started_ahead_for_a_job_another_lane_claimed_is_stopped(daemon_env: dict, tmp_path: Path):  # noqa: F811
    """A lane starts the next queued job's first worker while its own job's last stage runs; when
    another lane claims that job, the worker must go then, not when this lane's job ends. Holds
    (LTX2_FAULT_HOLD) put each job where the scene needs it."""
    holds = "publish@zero,before-audio_decode@one,before-video_decode@one,before-encode_diffuse@two,publish@one"
    env = {**daemon_env, "LTX2_DEVICES": "cpu,cpu", "LTX2_FAULT_HOLD": holds}
    faults = Path(env["LTX2_FAULT_DIR"])

    def held(entry: str) -> str:
        return wait_for_file(faults / f"held-{entry}").read_text()

    with DaemonProcess(env, tmp_path / "daemon.log"):
        try:
            zero = submit(env, "--num-frames", "9", "--name", "zero")
            assert held("publish@zero") == zero  # one lane busy until released
            one = submit(env, "--num-frames", "9", "--name", "one", "--seed", "12")
            assert held("before-audio_decode@one") == one  # claimed by the other lane
            two = submit(env, "--num-frames", "9", "--name", "two", "--seed", "13")
            (faults / "release-before-audio_decode@one").touch()  # job two is queued before one's last stage
            assert held("before-video_decode@one") == one  # its lane started job two's first worker
            two_dir = Path(env["LTX2_STATE_DIR"]) / "jobs" / two
            assert len(running_writers_into(two_dir)) == 1
            (faults / "release-publish@zero").touch()  # the first lane is free: it claims job two
            assert held("before-encode_diffuse@two") == two  # and has started no worker for it yet
            (faults / "release-before-video_decode@one").touch()
            assert held("publish@one") == one  # job one ran its last stage and is not done yet
            deadline = time.monotonic() + 15
            while running_writers_into(two_dir) and time.monotonic() < deadline:
                time.sleep(0.2)
            assert running_writers_into(two_dir) == []
        finally:
            for entry in holds.split(","):
                (faults / f"release-{entry}").touch()
            for pid in running_writers_into(Path(env["LTX2_STATE_DIR"])):
                kill_group(pid)


# The two daemon scenes above run ahead (conftest's `runs_ahead`), one at a time from the module's first
# test on, each with a daemon of its own: beside the tests before them, which mostly wait on a core.
RUNS_AHEAD: dict[str, RunAhead] = {
    "test_daemon_runs_queued_jobs_on_every_lane_one_process_at_a_time": daemon_with_two_cpu_lanes,
    "test_the_lanes_of_a_daemon_share_one_fork_server_started_before_any_job": daemon_whose_lanes_share_a_fork_server,
}


def test_a_context_parallel_job_goes_to_a_lane_wide_enough_and_waits_for_none_that_cannot_come():
    """The daemon picks a lane per job (issue 30): a lane of one GPU leaves a two-process job to the daemon's
    lane of two; where no lane is that wide, any lane takes it (its stage then fails naming the setting)
    rather than leave it queued for ever; CPU lanes and the single lane that pins nothing set no bound."""
    single, pair = Lane(0, "cuda:0", "4"), Lane(1, "cuda:1+2", "5,6")
    assert [lane_width(lane) for lane in (single, pair, Lane(0, "cpu", ""), Lane(0, "", None))] == [1, 2, None, None]
    assert widest_lane([single, pair]) == 2 and widest_lane([single, Lane(1, "cpu", "")]) is None
    widest = widest_lane([single, pair])
    assert runs_here(pair, widest, 2) and not runs_here(single, widest, 2)
    assert runs_here(single, widest, 1) and runs_here(pair, widest, 1)  # the default stays throughput
    assert runs_here(single, widest_lane([single, Lane(1, "cuda:1", "5")]), 2)  # no lane can: fail, not wait
    assert not runs_here(single, None, 2)  # a CPU lane beside it can hold it
