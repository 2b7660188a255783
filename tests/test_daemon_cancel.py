"""Cancels that race a job's stages and its publish, workers started ahead, and stage times.

One real daemon under the repo's supervisord.conf for the module. Where a cancel must land in a
window of milliseconds (between two stages, just before or after publishing begins), the daemon
holds the job there itself (LTX2_FAULT_HOLD, protocol/fault_points.py) until the test has sent
its cancel, so every race is reproduced each time with real workers.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import run_ltx2, submit_tiny
from daemon_process import running_writers_into, supervised_with_holds
from supervised import Supervised, wait_for_file

from protocol.files import JOB_FILE

# The cheapest clip the tiny model renders (9 frames: 3 latent frames).
SMALL = ("--num-frames", "9")
# How long the workers of an ended job may take to be gone (SIGTERM, then reaping).
GONE_WITHIN_S = 15.0
HOLDS = "before-video_decode@between,publish@before,publishing@after"


@pytest.fixture(scope="module")
def daemon(hf_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Supervised]:
    with supervised_with_holds(hf_home, tmp_path_factory.mktemp("cancel"), "cancel", HOLDS) as supervised:
        yield supervised


def held(daemon: Supervised, entry: str) -> str:
    """Wait until the daemon holds a job at `entry`; its job id."""
    return wait_for_file(Path(daemon.env["LTX2_FAULT_DIR"]) / f"held-{entry}").read_text()


def release(daemon: Supervised, entry: str) -> None:
    (Path(daemon.env["LTX2_FAULT_DIR"]) / f"release-{entry}").touch()


def wait_until_no_process_writes_into(job_dir: Path) -> list[int]:
    """The processes still writing into the job's logs once GONE_WITHIN_S has passed ([] if none)."""
    deadline = time.monotonic() + GONE_WITHIN_S
    while (left := running_writers_into(job_dir)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def log_of(pid: int) -> str:
    return os.readlink(f"/proc/{pid}/fd/1")


def test_a_cancel_between_two_stages_stops_the_worker_started_ahead_for_the_next(daemon: Supervised):
    job_id = submit_tiny(daemon.env, "a kite over dunes", *SMALL, "--name", "between")
    assert held(daemon, "before-video_decode@between") == job_id
    job_dir = Path(daemon.env["LTX2_STATE_DIR"]) / "jobs" / job_id
    # Audio succeeded; the video worker started while it ran waits for its GO.
    waiting = running_writers_into(job_dir)
    assert [Path(log_of(pid)).name for pid in waiting] == ["video_decode-1.log"], waiting
    cancelled = run_ltx2(["cancel", job_id], daemon.env)
    assert (cancelled.returncode, cancelled.stdout.strip()) == (0, f"{job_id}: cancelling"), cancelled.stderr
    release(daemon, "before-video_decode@between")
    job = daemon.wait_for_state(job_id, {"done", "failed", "cancelled"})
    assert job["state"] == "cancelled", job["error"]
    assert wait_until_no_process_writes_into(job_dir) == []
    assert not (job_dir / "video.mp4").exists()


def test_a_cancel_before_publishing_wins_though_every_stage_succeeded(daemon: Supervised):
    job_id = submit_tiny(daemon.env, "a barn in snow", *SMALL, "--name", "before")
    assert held(daemon, "publish@before") == job_id
    cancelled = run_ltx2(["cancel", job_id], daemon.env)
    assert (cancelled.returncode, cancelled.stdout.strip()) == (0, f"{job_id}: cancelling"), cancelled.stderr
    release(daemon, "publish@before")
    job = daemon.wait_for_state(job_id, {"done", "failed", "cancelled"})
    ended = (job["state"], job["error"], job["output"], job["failure"])
    assert ended == ("cancelled", "cancelled on request", "", "cancelled")
    job_dir = Path(job["job_dir"])
    assert (job_dir / "video.mp4").is_file()  # finished stages stay in the job
    assert not list((Path(daemon.env["LTX2_OUTPUT_DIR"])).glob("before_*"))  # nothing was published
    events = [json.loads(line)["event"] for line in (job_dir / "events.log").read_text().splitlines()]
    assert events[-2:] == ["cancel_requested", "job_cancelled"]
    assert not (job_dir / "cancel-requested").exists()


@pytest.fixture(scope="module")
def too_late(daemon: Supervised) -> tuple[str, object, dict]:
    """A job held just after publishing began, a cancel sent then, the job let go to its end:
    (job id, the cancel's completed process, the job's final status)."""
    job_id = submit_tiny(daemon.env, "a quarry at dusk", *SMALL, "--name", "after")
    assert held(daemon, "publishing@after") == job_id
    cancelled = run_ltx2(["cancel", job_id], daemon.env)
    release(daemon, "publishing@after")
    return job_id, cancelled, daemon.wait_for_state(job_id, {"done", "failed", "cancelled"})


def test_a_cancel_after_publishing_began_is_answered_too_late_and_the_job_is_done(too_late: tuple):
    job_id, cancelled, job = too_late
    assert cancelled.returncode == 1 and cancelled.stdout == ""
    assert f"too late: job {job_id} is done with its stages" in cancelled.stderr
    assert job["state"] == "done", job["error"]
    assert Path(job["output"]).is_file()


def test_a_prestarted_stage_reports_its_seconds_from_go_and_its_wait_apart(daemon: Supervised, too_late: tuple):
    job_id, _, job = too_late
    record = json.loads((Path(job["job_dir"]) / JOB_FILE).read_text())
    (audio,) = record["stages"]["audio_decode"]["attempts"]
    # The audio worker was started as diffusion began and waited for its GO all through it.
    diffusion = record["stages"]["encode_diffuse"]["attempts"][-1]["seconds"]
    assert audio["waited_s"] >= diffusion
    ran = (dt.datetime.fromisoformat(audio["ended"]) - dt.datetime.fromisoformat(audio["started"])).total_seconds()
    assert audio["seconds"] <= ran + 0.1, audio  # its own time, not its time since it was started
    status = run_ltx2(["status", job_id], daemon.env).stdout
    line = next(line for line in status.splitlines() if "audio_decode attempt 1" in line)
    assert f"ok {audio['seconds']:.1f} s (after {audio['waited_s']:.1f} s waiting for GO)" in line
    sidecar = json.loads(Path(job["output"]).with_suffix(".json").read_text())
    assert sidecar["stages"]["audio_decode"]["seconds"] == audio["seconds"]
    assert sidecar["stages"]["audio_decode"]["waited_s"] == audio["waited_s"]
