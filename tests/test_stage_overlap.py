"""Stage overlap on one lane (issue 28 item 1): the next group diffuses while the last group's decoders
run, in their own processes; the clips are the same bits as without it, and an attempt that runs out of
memory while overlapped is retried alone."""

from __future__ import annotations

import datetime as dt
import json
import re
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    RunAhead,
    daemon_environment,
    ltx2_environment,
    probe_mp4,
    run_ltx2,
    start_mps_stand_in,
    submit_tiny,
)
from safetensors.torch import load_file
from supervised import Supervised

from orchestrator.placement.lane_links import DECODERS_BESIDE_NICENESS
from orchestrator.run.jobdir import JobDir
from orchestrator.run.stage_overlap import OVERLAP_MARGIN, MeasuredPeaks, OverlapGate
from protocol.errors import Failure
from protocol.files import LATENTS_FILE

CLIPS = 3


def write_batch(path: Path) -> Path:
    """Three tiny clips of one model: with group_size 1, three waves."""
    lines = ['[defaults]\nmodel = "ltx2-stages/tiny-random-ltx2"\nwidth = 64\nheight = 64\nnum_frames = 17\n']
    for index in range(1, CLIPS + 1):
        lines.append(f'[[clips]]\nname = "wave{index}"\nprompt = "a kite over dunes, take {index}"\nseed = {index}\n')
    path.write_text("\n".join(lines))
    return path


def batch_run(overlap: str, mps: str = "", **extra: str) -> RunAhead:
    """`ltx2 batch` of the three clips, one clip per group, with `[worker] overlap_stages = overlap`, beside a stand-in
    for a running CUDA MPS control daemon (conftest.start_mps_stand_in) whose pipe directory the orchestrator
    exports; `mps` "daemon" leaves `[worker] cuda_mps` at its default, "auto" (which joins that daemon), "off" sets
    it (which must keep every worker out of it)."""

    def run(root: Path, hf_home: Path) -> dict[str, Any]:
        env = {**ltx2_environment(hf_home, root), "LTX2_GROUP_SIZE": "1", "LTX2_OVERLAP_STAGES": overlap, **extra}
        stand_in = start_mps_stand_in(root / "mps") if mps else None
        if stand_in is not None:
            env["CUDA_MPS_PIPE_DIRECTORY"] = str(root / "mps")
            if mps != "daemon":
                env["LTX2_CUDA_MPS"] = mps
        try:
            result = run_ltx2(["batch", str(write_batch(root / "waves.toml")), "--quiet"], env)
        finally:
            if stand_in is not None:
                stand_in.kill()
                stand_in.wait()
        jobs = {}
        for job_dir in (root / "state" / "jobs").iterdir():
            record = json.loads((job_dir / "job.json").read_text())
            jobs[record["spec"]["name"]] = {"dir": job_dir, "record": record}
        outputs = sorted((root / "outputs").glob("wave*.mp4"))
        return {
            "result": result,
            "jobs": jobs,
            "outputs": outputs,
            "mps": root / "mps",
            "mps_pid": stand_in.pid if stand_in is not None else None,
        }

    return run


def daemon_run(root: Path, hf_home: Path) -> dict[str, Any]:
    """Three jobs submitted at once to a supervised daemon, one job per claim, overlap on."""
    env = {**daemon_environment(hf_home, root), "LTX2_GROUP_SIZE": "1", "LTX2_OVERLAP_STAGES": "on"}
    with Supervised(root, env) as supervised:
        ids = [submit_tiny(env, f"a kite over dunes, take {index}", "--seed", str(index)) for index in (1, 2, 3)]
        done = [supervised.wait_for_state(job_id, {"done", "failed"}) for job_id in ids]
    jobs = {}
    for index, job in enumerate(done, start=1):
        jobs[f"wave{index}"] = {"record": json.loads((Path(job["job_dir"]) / "job.json").read_text()), **job}
    return {"jobs": jobs}


RUNS_AHEAD: dict[str, RunAhead] = {
    "test_the_daemon_diffuses_the_next_claim_beside_the_last_claims_decoders": daemon_run,
    "overlapped": batch_run("on", mps="daemon"),
    "auto": batch_run("auto", mps="off"),
    "test_an_overlapped_attempt_out_of_memory_is_retried_alone": batch_run("on", LTX2_FAULT_OOM="video_decode:1"),
}
RUNS_AHEAD_AT_ONCE = 2


@pytest.fixture
def overlapped(runs_ahead: dict) -> dict[str, Any]:
    """The batch with `overlap_stages = "on"`."""
    return runs_ahead["overlapped"][0].result()


@pytest.fixture
def auto(runs_ahead: dict) -> dict[str, Any]:
    """The batch with `overlap_stages = "auto"`: on a CPU lane its waves ran one after the other."""
    return runs_ahead["auto"][0].result()


def when(stamp: str) -> dt.datetime:
    return dt.datetime.fromisoformat(stamp)


def span(run: dict[str, Any], clip: int, stage: str, attempt: int = 1) -> tuple[dt.datetime, dt.datetime]:
    """When attempt `attempt` of `stage` of clip `clip` started and ended (job.json)."""
    record = run["jobs"][f"wave{clip}"]["record"]
    entry = record["stages"][stage]["attempts"][attempt - 1]
    return when(entry["started"]), when(entry["ended"])


def decoders_span(run: dict[str, Any], clip: int) -> tuple[dt.datetime, dt.datetime]:
    return span(run, clip, "audio_decode")[0], span(run, clip, "video_decode")[1]


def side_by_side(run: dict[str, Any], clip: int) -> bool:
    """Whether clip `clip`'s diffusion and clip `clip - 1`'s decoders ran at the same time."""
    diffusion, decoders = span(run, clip, "encode_diffuse"), decoders_span(run, clip - 1)
    return diffusion[0] < decoders[1] and decoders[0] < diffusion[1]


def assert_rendered(run: dict[str, Any]) -> None:
    assert run["result"].returncode == 0, run["result"].stderr
    assert len(run["outputs"]) == CLIPS
    assert all(probe_mp4(path)["frames"] == 17 for path in run["outputs"])


def test_overlapped_waves_make_the_same_clips_as_waves_run_alone(overlapped: dict, auto: dict):
    assert_rendered(overlapped)
    assert_rendered(auto)
    # Each later wave's diffusion ran while the wave before it was decoded ...
    for clip in range(2, CLIPS + 1):
        assert side_by_side(overlapped, clip), clip
    # ... which "auto" on a CPU lane never does (test_auto_never_overlaps_on_a_cpu_lane).
    assert not any(side_by_side(auto, clip) for clip in range(2, CLIPS + 1))
    # Same request, same bits (DESIGN.md rule 6): overlap changes when a stage runs, not what it computes.
    for name, job in overlapped["jobs"].items():
        other = auto["jobs"][name]
        beside, alone = load_file(job["dir"] / LATENTS_FILE), load_file(other["dir"] / LATENTS_FILE)
        assert all(bool((beside[key] == alone[key]).all()) for key in ("video", "audio")), name
    for beside_mp4, alone_mp4 in zip(overlapped["outputs"], auto["outputs"], strict=True):
        assert beside_mp4.read_bytes() == alone_mp4.read_bytes(), beside_mp4.name
    # Decoders run over the lane's decoder link ("on", and "auto" whether or not a wave overlaps) yield the CPU
    # to the diffusion beside them (their x264 threads starved its weight placement); the diffusion keeps its own.
    for run in (overlapped, auto):
        for name, job in run["jobs"].items():
            for stage in ("encode_diffuse", "audio_decode", "video_decode"):
                log = (job["dir"] / "logs" / f"{stage}-1.log").read_text()
                niced = f"CPU niceness {DECODERS_BESIDE_NICENESS}" in log
                assert niced == (stage != "encode_diffuse"), (name, stage, niced)
                # Under a CUDA MPS daemon the decoders beside the diffusion are its clients at the below-normal
                # priority, so the diffusion's kernels go first; with cuda_mps "off" no worker joins a daemon.
                if run is overlapped:
                    priority = "normal" if stage == "encode_diffuse" else "below normal"
                    joined = f"CUDA MPS: client of the control daemon (pid {run['mps_pid']}) in {run['mps']}"
                    assert f"{joined}, priority {priority}\n" in log, (name, stage)
                else:  # "off", with the daemon's directory exported to the orchestrator
                    assert re.search(r"CUDA MPS: none \(no control daemon in \S+/no-cuda-mps\)\n", log), (name, stage)
                    assert str(run["mps"]) not in log, (name, stage)
                # and every worker starts with its imports' objects out of the collector's passes (gc_pauses)
                frozen = re.search(r"gc: (\d+) objects of the imports frozen", log)
                assert frozen is not None and int(frozen[1]) > 100_000, (name, stage)
    # Every attempt reports the memory its peaks count against (the host's RAM here), which "auto" plans with.
    stages = [stage for job in overlapped["jobs"].values() for stage in job["record"]["stages"].values()]
    attempts = [attempt for stage in stages for attempt in stage["attempts"]]
    assert all(attempt["device_memory_bytes"] > attempt["peak_rss_bytes"] > 0 for attempt in attempts)


def test_auto_never_overlaps_on_a_cpu_lane(auto: dict):
    """On the CPU both sides would share the same cores (nothing idles): "auto" measures only GPU peaks, so
    here it runs the waves one after the other (when it overlaps on a GPU: the MeasuredPeaks tests below)."""
    assert_rendered(auto)
    for clip in range(2, CLIPS + 1):
        assert span(auto, clip, "encode_diffuse")[0] >= decoders_span(auto, clip - 1)[1], clip


def test_an_overlapped_attempt_out_of_memory_is_retried_alone(ran_ahead: dict):
    assert_rendered(ran_ahead)
    for clip in range(1, CLIPS + 1):
        attempts = ran_ahead["jobs"][f"wave{clip}"]["record"]["stages"]["video_decode"]["attempts"]
        assert [a["result"] for a in attempts] == ["cuda_oom", "ok"], clip
    # Wave 1's decode ran out of memory beside wave 2's diffusion: its retry waited for that diffusion's end.
    assert span(ran_ahead, 1, "video_decode", 2)[0] >= span(ran_ahead, 2, "encode_diffuse")[1]
    # From then on the run was not overlapped: wave 3 diffused after wave 2 was decoded.
    assert span(ran_ahead, 3, "encode_diffuse")[0] >= decoders_span(ran_ahead, 2)[1]
    assert side_by_side(ran_ahead, 2)  # (wave 2 still diffused beside wave 1's first decode attempt)


def test_peaks_count_gpu_memory_only(overlapped: dict):
    """The "on" batch's attempts report host peaks and RAM (CPU lane): no GPU peak, so nothing fits."""
    peaks = MeasuredPeaks()
    peaks.add([JobDir.load(job["dir"]) for job in overlapped["jobs"].values()])
    assert (peaks.diffusion, peaks.decoders, peaks.device_memory) == (0, 0, 0) and not peaks.fit()


def test_peaks_fit_only_when_both_sides_are_measured_and_leave_the_margin():
    peaks = MeasuredPeaks(diffusion=60, decoders=0, device_memory=100)
    assert not peaks.fit()  # the decoders' peak is not known yet
    peaks.decoders = int(100 * (1 - OVERLAP_MARGIN)) - 60
    assert peaks.fit()
    peaks.decoders += 1
    assert not peaks.fit()


def test_a_side_waiting_to_run_alone_waits_for_the_other_sides_wave_and_decoders_go_first():
    gate = OverlapGate()
    order: list[str] = []
    with gate.running("diffusion"), gate.running("decoders"):
        waiter = threading.Thread(target=lambda: (gate.wait_alone("diffusion", lambda: None), order.append("d")))
        waiter.start()
        time.sleep(0.3)
        assert waiter.is_alive()  # the decoders' wave is still running
        # Both sides now want to run alone: the decoders go first, diffusion goes on waiting.
        gate.wait_alone("decoders", lambda: None)
        order.append("decoders")
        assert waiter.is_alive()
    waiter.join(timeout=5)
    assert order == ["decoders", "d"] and gate.memory_failed
    # A stop request ends a wait at once.
    with gate.running("decoders"):
        gate.wait_alone("diffusion", lambda: Failure.CANCELLED)


def test_the_daemon_diffuses_the_next_claim_beside_the_last_claims_decoders(ran_ahead: dict):
    jobs = ran_ahead["jobs"]
    assert [job["state"] for job in jobs.values()] == ["done"] * 3, [job["error"] for job in jobs.values()]
    assert all(probe_mp4(Path(job["output"]))["frames"] == 17 for job in jobs.values())
    # Each claim's diffusion ran while the claim before it was decoded (claims of one job: group_size 1).
    for clip in (2, 3):
        assert side_by_side(ran_ahead, clip), clip
    for name, job in jobs.items():  # the daemon's decoder link nices its workers as `ltx2 batch`'s does
        logs = Path(job["job_dir"]) / "logs"
        for stage in ("audio_decode", "video_decode"):
            assert f"CPU niceness {DECODERS_BESIDE_NICENESS}" in (logs / f"{stage}-1.log").read_text(), (name, stage)
