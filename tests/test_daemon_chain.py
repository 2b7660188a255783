"""Chains on the daemon: a job that extends one not done yet waits (WAITING), and is built and queued once
that one is done, or fails naming it when it failed or was cancelled; a restarted daemon goes on.

One real daemon under the repo's supervisord.conf for the module, the tiny model, 64x64x17 clips of two
steps. A source that must still be running while its next segment is submitted, cancelled or the daemon
killed is held before its first stage by the daemon itself (LTX2_FAULT_HOLD, protocol/fault_points.py), so
each scene is the same every time. The record-level rules (the one writer refusing to queue an unbuilt
job, the record's round trip) are checked on job directories made here.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import probe_mp4, run_ltx2
from daemon_process import supervised_with_holds
from supervised import Supervised, wait_for_file

from orchestrator.gateway.app import STATUS
from orchestrator.run.job_end import cancel_waiting, fail_waiting
from orchestrator.run.jobdir import JobDir
from orchestrator.run.model_lookup import ResolvedModel
from orchestrator.run.states import EventKind, JobState, TransitionError
from protocol import jobs
from protocol.errors import Failure
from protocol.files import JOB_FILE
from protocol.job_record import WAITING_SCHEMA_VERSION, WaitRecord, load_record
from protocol.spec import JobSpec

CHEAP = ["--width", "64", "--height", "64", "--num-frames", "17", "--steps", "2", "--schedule", "default"]
FRAMES, OVERLAP = 17, 5
# Sources held before their first stage, by --name: running, nothing rendered yet, until released.
HOLDS = "before-encode_diffuse@cancelled-source,before-encode_diffuse@restart-source"
SPEC = JobSpec.from_dict(
    {"prompt": "p", "model": "m", "width": 64, "height": 64, "num_frames": 9, "steps": 8, "seed": 1}
)


@pytest.fixture(scope="module")
def daemon(hf_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Supervised]:
    with supervised_with_holds(hf_home, tmp_path_factory.mktemp("chain"), "chain", HOLDS) as supervised:
        yield supervised


def ltx2_ok(daemon: Supervised, *args: str) -> str:
    result = run_ltx2(list(args), daemon.env)
    assert result.returncode == 0, result.stderr
    return result.stdout


def held_at(daemon: Supervised, entry: str) -> str:
    """Wait until the daemon holds a job at `entry`; its job id."""
    return wait_for_file(Path(daemon.env["LTX2_FAULT_DIR"]) / f"held-{entry}").read_text()


def release_hold(daemon: Supervised, entry: str) -> None:
    (Path(daemon.env["LTX2_FAULT_DIR"]) / f"release-{entry}").touch()


def events_of(job: dict) -> list[str]:
    lines = (Path(job["job_dir"]) / "events.log").read_text().splitlines()
    return [json.loads(line)["event"] for line in lines]


def test_a_two_segment_chain_on_the_daemon_ends_done_with_the_joined_video(daemon: Supervised, tmp_path: Path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# a chain\na tide pool at dawn\nthe tide comes in\n")
    first, second = ltx2_ok(daemon, "extend", "--chain", str(prompts), *CHEAP, "--overlap", str(OVERLAP)).split()
    ends = [daemon.wait_for_state(job_id, {"done", "failed", "cancelled"}) for job_id in (first, second)]
    assert [job["state"] for job in ends] == ["done", "done"], [job["error"] for job in ends]
    assert probe_mp4(Path(ends[0]["output"]))["frames"] == FRAMES
    assert probe_mp4(Path(ends[1]["output"]))["frames"] == FRAMES + FRAMES - OVERLAP  # the whole chain
    record = load_record(Path(ends[1]["job_dir"]) / JOB_FILE)
    assert record.extension is not None and record.extension.source_job == first and record.waits_for is None
    assert events_of(ends[1])[:2] == [EventKind.JOB_WAITING, EventKind.JOB_QUEUED]


def test_a_segment_whose_source_is_cancelled_while_it_waits_fails_naming_the_source(daemon: Supervised):
    source = ltx2_ok(daemon, "submit", "--prompt", "a heron", *CHEAP, "--name", "cancelled-source").strip()
    assert held_at(daemon, "before-encode_diffuse@cancelled-source") == source
    waiting = ltx2_ok(daemon, "submit", "--prompt", "the heron flies", *CHEAP, "--after", source).strip()
    assert f"waits for: job {source}" in ltx2_ok(daemon, "status", waiting)
    assert f"waiting    64x64x17        (after {source})" in ltx2_ok(daemon, "jobs")
    behind = ltx2_ok(daemon, "submit", "--prompt", "dusk", *CHEAP, "--after", waiting).strip()  # waits on a waiter
    dropped = ltx2_ok(daemon, "submit", "--prompt", "night", *CHEAP, "--after", waiting).strip()
    assert ltx2_ok(daemon, "cancel", dropped).strip() == f"{dropped}: cancelled"  # a waiting job: at once
    assert ltx2_ok(daemon, "cancel", source).strip() == f"{source}: cancelling"
    release_hold(daemon, "before-encode_diffuse@cancelled-source")
    assert daemon.wait_for_state(source, {"done", "failed", "cancelled"})["state"] == "cancelled"
    job, last = (
        daemon.wait_for_state(job_id, {"queued", "done", "failed", "cancelled"}) for job_id in (waiting, behind)
    )
    assert (job["state"], job["failure"]) == ("failed", Failure.INVALID_INPUT)
    assert f"its source job {source} was cancelled" in job["error"]
    assert not (Path(job["job_dir"]) / "video.mp4").exists()
    assert last["state"] == "failed" and f"its source job {waiting} failed: its source job {source}" in last["error"]
    refused = run_ltx2(["submit", "--prompt", "more", *CHEAP, "--after", source], daemon.env)
    assert refused.returncode == 1 and f"job {source} is cancelled: it has no video to extend" in refused.stderr
    # A resume makes it wait again (never run unbuilt); its source still cancelled, it fails again at once.
    assert ltx2_ok(daemon, "resume", waiting).strip() == f"{waiting}: waiting"
    assert daemon.wait_for_state(waiting, {"queued", "done", "failed", "cancelled"})["state"] == "failed"
    assert events_of(job).count(EventKind.JOB_WAITING) == 2


def test_a_submit_after_an_unknown_job_is_refused_naming_the_nearest(daemon: Supervised):
    unknown = run_ltx2(["submit", "--prompt", "more", *CHEAP, "--after", "20990101-000000-abcdef"], daemon.env)
    assert unknown.returncode == 1 and "no job '20990101-000000-abcdef'" in unknown.stderr


def test_a_segment_waiting_while_the_daemon_is_killed_is_built_after_supervisord_restarts_it(daemon: Supervised):
    source = ltx2_ok(daemon, "submit", "--prompt", "a lantern", *CHEAP, "--name", "restart-source").strip()
    assert held_at(daemon, "before-encode_diffuse@restart-source") == source
    waiting = ltx2_ok(daemon, "submit", "--prompt", "the lantern dims", *CHEAP, "--after", source).strip()
    with daemon.client() as client:
        old_pid = client.request(jobs.Ping(""))["pid"]
    os.kill(old_pid, signal.SIGKILL)  # the hold fires once per fault dir: the restarted daemon runs the source on
    daemon.wait_until_serving(previous_pid=old_pid)
    ends = [daemon.wait_for_state(job_id, {"done", "failed", "cancelled"}) for job_id in (source, waiting)]
    assert [job["state"] for job in ends] == ["done", "done"], [job["error"] for job in ends]
    assert probe_mp4(Path(ends[1]["output"]))["frames"] == FRAMES + FRAMES - 13  # the default overlap: 3·4+1


def test_the_gateway_shows_a_waiting_job_as_queued():
    assert set(STATUS) == set(JobState)
    assert STATUS[JobState.WAITING] == "queued"


def waiting_job(root: Path) -> JobDir:
    waits = WaitRecord(job="20990101-000000-abcdef", request={"prompt": "p", "seed": 1})
    return JobDir.create(root, SPEC, ResolvedModel("m", root / "model", "abc"), waits_for=waits)


def test_a_waiting_job_is_never_queued_or_run_before_it_is_built(tmp_path: Path):
    job = waiting_job(tmp_path)
    assert load_record(job.path / JOB_FILE).waits_for == job.record.waits_for
    # A build from before waiting jobs refuses it rather than run its provisional spec as a plain clip.
    assert json.loads((job.path / JOB_FILE).read_text())["schema_version"] == WAITING_SCHEMA_VERSION
    for target in (JobState.QUEUED, JobState.RUNNING):
        with pytest.raises(TransitionError):
            job.transition(target)
    assert JobDir.load(job.path).state is JobState.WAITING


def test_a_waiting_job_fails_or_is_cancelled_through_job_end(tmp_path: Path):
    failed, cancelled = waiting_job(tmp_path), waiting_job(tmp_path)
    fail_waiting(failed, "its source job X failed: a reason")
    assert (failed.state, failed.record.failure, failed.record.error) == (
        JobState.FAILED,
        Failure.INVALID_INPUT,
        "its source job X failed: a reason",
    )
    assert cancel_waiting(cancelled) and cancelled.state is JobState.CANCELLED
    failed.transition(JobState.WAITING)  # a person's resume: it waits again, still unbuilt
    assert JobDir.load(failed.path).record.waits_for is not None


def test_resume_without_a_daemon_refuses_a_waiting_job_in_one_line(ltx2_env: dict[str, str]):
    job = waiting_job(Path(ltx2_env["LTX2_STATE_DIR"]) / "jobs")
    result = run_ltx2(["resume", job.id], ltx2_env)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert f"job {job.id} is not built yet: it extends job 20990101-000000-abcdef" in result.stderr
    assert JobDir.load(job.path).state is JobState.WAITING
