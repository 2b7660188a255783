"""Publishing is one recorded step: all files or none, never repeated for a job already published.

The crashes are real: `LTX2_FAULT_PUBLISH_KILL` makes the publishing process (the CLI's embedded
orchestrator, `ltx2 batch`, or the daemon) SIGKILL itself at a point of the publish; then the job
is run again the way a user (or supervisord) would.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT, TINY_ARGS, RunAhead, daemon_environment, ltx2_environment, probe_mp4, run_ltx2
from supervised import Supervised, wait_for_file

from config.settings import load_settings
from orchestrator.run.job_end import take_job
from orchestrator.run.jobdir import JobDir, new_job_id
from orchestrator.run.model_lookup import ResolvedModel
from orchestrator.run.pipeline import JobHooks, finish_job
from protocol.fault_points import PUBLISH_KILL_POINTS
from protocol.files import FIRST_FRAME_FILE, LAST_FRAME_FILE, VIDEO_FILE
from protocol.spec import JobSpec

TINY = ["--model", "ltx2-stages/tiny-random-ltx2", "--quiet", *TINY_ARGS]
# A job spec for the in-process tests; their jobs never run a stage (the files are put in place).
SPEC = {"prompt": "x", "model": "m", "width": 64, "height": 64, "num_frames": 9, "steps": 8, "seed": 1}


def published_set(video: Path) -> set[str]:
    """The names one published video comes with."""
    return {video.name, f"{video.stem}_first.png", f"{video.stem}_last.png", f"{video.stem}.json"}


def assert_complete_set(video: Path) -> None:
    """The MP4 and its PNGs and sidecar are all there, and the sidecar names this MP4."""
    assert published_set(video) <= {p.name for p in video.parent.iterdir()}
    assert json.loads(video.with_suffix(".json").read_text())["video"] == video.name
    assert video.stat().st_mode & 0o777 == 0o644


def assert_every_mp4_has_its_companions(folder: Path) -> None:
    """The invariant that holds at every moment: an MP4 in the output folder is never alone."""
    assert mp4s_without_companions(folder) == [], "MP4s without PNGs/JSON"


def mp4s_without_companions(folder: Path) -> list[str]:
    """The MP4s of the output folder that are there without their PNGs and sidecar."""
    names = {p.name for p in folder.iterdir()}
    return [video.name for video in folder.glob("*.mp4") if not published_set(video) <= names]


def settings_for(root: Path):  # noqa: ANN201 - Settings, as the CLI builds it from the environment
    return load_settings(
        environ={"LTX2_STATE_DIR": str(root / "state"), "LTX2_OUTPUT_DIR": str(root / "outputs"), "HOME": str(root)}
    )


@pytest.fixture
def finished_job(tmp_path: Path) -> JobDir:
    """A job whose stages are done: its video and frames are in place (publishing only copies them)."""
    spec = JobSpec.from_dict({**SPEC, "prompt": "a lighthouse"})
    model = ResolvedModel("ltx2-stages/tiny-random-ltx2", tmp_path / "model", "local")
    job = JobDir.create(settings_for(tmp_path).jobs_dir, spec, model)
    (job.path / VIDEO_FILE).write_bytes(b"not really an mp4 " * 1000)
    (job.path / FIRST_FRAME_FILE).write_bytes(b"first frame")
    (job.path / LAST_FRAME_FILE).write_bytes(b"last frame")
    return job


def test_finishing_a_published_job_again_returns_the_same_path_and_one_set(finished_job: JobDir, tmp_path: Path):
    settings = settings_for(tmp_path)
    take_job(finished_job)  # finishing is the last step of a running job
    first = finish_job(finished_job, settings, JobHooks())
    again = JobDir.load(finished_job.path)
    take_job(again)  # done -> queued -> running: a re-run of a finished job
    second = finish_job(again, settings, JobHooks())
    assert second == first
    assert {p.name for p in settings.output_dir.iterdir()} == published_set(first)
    assert first.read_bytes() == (finished_job.path / VIDEO_FILE).read_bytes()
    assert_complete_set(first)


# Finishes the job in another process, which the fault switch may kill.
FINISH_IN_CHILD = """
import sys
from pathlib import Path
from config.settings import load_settings
from orchestrator.run.jobdir import JobDir
from orchestrator.run.job_end import take_job
from orchestrator.run.pipeline import JobHooks, finish_job
from protocol.fault_points import PUBLISH_KILL_POINTS
root = Path(sys.argv[2])
settings = load_settings(environ={"LTX2_STATE_DIR": str(root / "state"), "LTX2_OUTPUT_DIR": str(root / "outputs"),
                                  "HOME": str(root)})
job = JobDir.load(Path(sys.argv[1]))
take_job(job)
print(finish_job(job, settings, JobHooks()))
"""


@pytest.mark.parametrize("point", PUBLISH_KILL_POINTS)
def test_publish_killed_at_each_point_then_run_again_leaves_one_set(finished_job: JobDir, tmp_path: Path, point: str):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "LTX2_FAULT_PUBLISH_KILL": point}
    command = [sys.executable, "-c", FINISH_IN_CHILD, str(finished_job.path), str(tmp_path)]
    killed = subprocess.run(command, env=env, cwd=REPO_ROOT, capture_output=True, text=True, check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    outputs = settings_for(tmp_path).output_dir
    assert_every_mp4_has_its_companions(outputs)
    video = finish_job(JobDir.load(finished_job.path), settings_for(tmp_path), JobHooks())
    assert {p.name for p in outputs.iterdir()} == published_set(video)  # no second copy, no temp file
    assert_complete_set(video)
    assert JobDir.load(finished_job.path).record.status == "done"


def generate_killed_as_its_first_output_lands(root: Path, hf_home: Path) -> dict[str, object]:
    """`generate` SIGKILLed as the first file of its publish gets its final name, then `ltx2 decode` of
    its job directory to an exact target: both results, the output folder between them, the job."""
    env = ltx2_environment(hf_home, root)
    request = ["generate", "--prompt", "a crane over a harbour", "--seed", "3", *TINY]
    killed = run_ltx2(request, {**env, "LTX2_FAULT_PUBLISH_KILL": "first-file"})
    outputs = Path(env["LTX2_OUTPUT_DIR"])
    alone = mp4s_without_companions(outputs)
    (job_dir,) = (Path(env["LTX2_STATE_DIR"]) / "jobs").iterdir()
    target = outputs / "recovered.mp4"
    rerun = run_ltx2(["decode", "--input", str(job_dir), "--output", str(target), "--quiet"], env)
    return {"killed": killed, "alone": alone, "job_dir": job_dir, "target": target, "rerun": rerun}


def test_generate_killed_as_its_first_output_lands_is_recovered_by_decode_to_one_set(ran_ahead: dict):
    killed, rerun, target = ran_ahead["killed"], ran_ahead["rerun"], ran_ahead["target"]
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert ran_ahead["alone"] == [], "MP4s without PNGs/JSON"
    assert rerun.returncode == 0, rerun.stderr
    assert Path(rerun.stdout.strip()) == target.resolve()
    assert {p.name for p in target.parent.iterdir()} == published_set(target)  # nothing else, no `.*.tmp*`
    assert_complete_set(target)
    assert probe_mp4(target)["frames"] == 17
    record = json.loads((ran_ahead["job_dir"] / "job.json").read_text())
    assert (record["status"], record["output"]) == ("done", str(target.resolve()))


def daemon_killed_as_the_mp4_lands(root: Path, hf_home: Path) -> dict[str, object]:
    """A supervised daemon that SIGKILLs itself as a job's MP4 gets its final name, and the daemon
    supervisord starts next: the job as it ended and the output folder."""
    env = {**daemon_environment(hf_home, root), "LTX2_FAULT_PUBLISH_KILL": "video"}
    with Supervised(root, env) as supervised:
        submitted = run_ltx2(["submit", "--prompt", "a forge at night", "--seed", "12", *TINY_ARGS], env)
        assert submitted.returncode == 0, submitted.stderr
        job_id = submitted.stdout.strip()
        marker = wait_for_file(Path(env["LTX2_FAULT_DIR"]) / "publish-killed-video", timeout_s=300)
        supervised.wait_until_serving(previous_pid=int(marker.read_text()))
        job = supervised.wait_for_state(job_id, {"done", "failed"})
    return {"job": job, "outputs": Path(env["LTX2_OUTPUT_DIR"])}


def test_daemon_killed_as_the_mp4_lands_publishes_once_after_its_restart(ran_ahead: dict):
    job = ran_ahead["job"]
    assert job["state"] == "done", job["error"]
    video = Path(job["output"])
    assert {p.name for p in ran_ahead["outputs"].iterdir()} == published_set(video)
    assert_complete_set(video)
    assert probe_mp4(video)["frames"] == 17


def batch_killed_right_after_a_clip_publishes(root: Path, hf_home: Path) -> dict[str, object]:
    """The tiny demo batch SIGKILLed as its first clip's publish is done, then run again: both results,
    the MP4s between them, and the output folder."""
    env = ltx2_environment(hf_home, root)
    demo = REPO_ROOT / "examples" / "batches" / "tiny-demo.toml"
    killed = run_ltx2(["batch", str(demo), "--quiet"], {**env, "LTX2_FAULT_PUBLISH_KILL": "done"})
    outputs = Path(env["LTX2_OUTPUT_DIR"])
    published = [p.name.split("_")[0] for p in outputs.glob("*.mp4")]
    rerun = run_ltx2(["batch", str(demo), "--quiet"], env)
    return {"killed": killed, "published": published, "rerun": rerun, "outputs": outputs}


def test_batch_killed_right_after_a_clip_publishes_reruns_to_one_set_per_clip(ran_ahead: dict):
    killed, rerun, outputs = ran_ahead["killed"], ran_ahead["rerun"], ran_ahead["outputs"]
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert ran_ahead["published"] == ["demo-one"]
    assert rerun.returncode == 0, rerun.stderr
    videos = sorted(outputs.glob("*.mp4"))
    assert [v.name.split("_")[0] for v in videos] == ["demo-one", "demo-two"]
    expected = published_set(videos[0]) | published_set(videos[1]) | {"tiny-demo_summary.txt"}
    assert {p.name for p in outputs.iterdir()} == expected
    for video in videos:
        assert_complete_set(video)
        assert str(video) in rerun.stdout


# The three runs above that a publishing process is killed in start ahead (conftest's `runs_ahead`), two
# at a time, each in a root of its own: the tests before them need no process of their own.
RUNS_AHEAD: dict[str, RunAhead] = {
    "test_generate_killed_as_its_first_output_lands_is_recovered_by_decode_to_one_set": (
        generate_killed_as_its_first_output_lands
    ),
    "test_daemon_killed_as_the_mp4_lands_publishes_once_after_its_restart": daemon_killed_as_the_mp4_lands,
    "test_batch_killed_right_after_a_clip_publishes_reruns_to_one_set_per_clip": (
        batch_killed_right_after_a_clip_publishes
    ),
}
RUNS_AHEAD_AT_ONCE = 2


def test_two_jobs_in_the_same_second_get_their_own_names_and_a_target_is_replaced(tmp_path: Path):
    from orchestrator.run.publishing import publish_job  # imported here: the fault tests also run against older code

    settings = settings_for(tmp_path)
    spec = JobSpec.from_dict({**SPEC, "name": "same"})
    made = dt.datetime(2026, 1, 2, 3, 4, 5)
    model = ResolvedModel("m", tmp_path, "local")
    jobs = [JobDir.create(settings.jobs_dir, spec, model, job_id=new_job_id(made)) for _ in range(2)]
    for number, job in enumerate(jobs):
        for name in (VIDEO_FILE, FIRST_FRAME_FILE, LAST_FRAME_FILE):
            (job.path / name).write_text(f"{name} of job {number}")
    videos = [publish_job(job, settings.output_dir) for job in jobs]
    # The stamp is the job id's (when the job was made), not the time of the publish.
    assert [v.name for v in videos] == ["same_20260102-030405.mp4", "same_20260102-030405_1.mp4"]
    assert all(job.id.startswith("20260102-030405-") for job in jobs)
    assert [v.read_text() for v in videos] == ["video.mp4 of job 0", "video.mp4 of job 1"]
    assert [publish_job(JobDir.load(job.path), settings.output_dir) for job in jobs] == videos
    target = tmp_path / "elsewhere" / "exact.mp4"
    target.parent.mkdir()
    target.write_text("an older file the user asked to replace")
    assert publish_job(jobs[0], settings.output_dir, target=target) == target.resolve()
    assert target.read_text() == "video.mp4 of job 0"
    assert {p.name for p in target.parent.iterdir()} == published_set(target)
    assert all(v.is_file() for v in videos)  # the earlier complete publish stays


def test_a_job_whose_video_changed_is_published_anew_and_the_earlier_publish_stays(
    finished_job: JobDir, tmp_path: Path
):
    from orchestrator.run.publishing import publish_job

    output_dir = settings_for(tmp_path).output_dir
    first = publish_job(finished_job, output_dir)
    (finished_job.path / VIDEO_FILE).write_bytes(b"decoded again, differently")  # the video stage ran again
    second = publish_job(JobDir.load(finished_job.path), output_dir)
    stamp = finished_job.id[: len("YYYYmmdd-HHMMSS")]  # the job's stamp, kept by every publish of it
    assert (first.name, second.name) == (f"video_{stamp}.mp4", f"video_{stamp}_1.mp4")
    assert {p.name for p in output_dir.iterdir()} == published_set(first) | published_set(second)
    assert second.read_bytes() == b"decoded again, differently"
    assert publish_job(JobDir.load(finished_job.path), output_dir) == second
