"""Every run of a job ends in one place (orchestrator/run/job_end.py), in one failure vocabulary.

The rule is checked on the source: no other module of the orchestrator moves a job to FAILED,
CANCELLED or DONE, asks the policy how a run ends, or closes attempts a run left open. The ends that
need no worker are run here on real job directories; the ends through a worker are the daemon's,
`generate`'s and the batch's own tests (their job.json `failure` is asserted in test_daemon_cancel).
"""

from __future__ import annotations

import ast
import errno
import json
from pathlib import Path

import pytest
from conftest import REPO_ROOT

from orchestrator.gateway.app import video_object
from orchestrator.run.job_end import (
    JobStopped,
    cancel_waiting,
    internal_error,
    publish_failed,
    requeue_orphan,
    take_job,
)
from orchestrator.run.jobdir import JobDir
from orchestrator.run.model_lookup import ResolvedModel
from orchestrator.run.states import AttemptResult, JobState, attempt_result
from protocol.errors import ExitCode, Failure, InvalidInput, LoraNotFound, classify_exit, cli_exit_code, exit_code_of
from protocol.files import JOB_FILE, Stage
from protocol.spec import JobSpec

SPEC = JobSpec.from_dict(
    {"prompt": "p", "model": "m", "width": 64, "height": 64, "num_frames": 9, "steps": 8, "seed": 1}
)
ORCHESTRATOR = REPO_ROOT / "orchestrator"
THE_PLACE = ORCHESTRATOR / "run" / "job_end.py"
# A job enters these states, and only these, outside job_end: RUNNING when an orchestrator claims it,
# QUEUED when a person resumes it (the daemon's `resume`). Neither ends a run.
STARTS = {
    "RUNNING": None,
    "QUEUED": ORCHESTRATOR / "daemon" / "server.py",
    "WAITING": ORCHESTRATOR / "daemon" / "server.py",
}
ENDING_CALLS = {"decide", "decide_run_end", "close_running_attempts"}


def running_job(root: Path, pid: int = 0) -> JobDir:
    """A job whose orchestrator is running its diffusion stage (worker `pid`)."""
    job = JobDir.create(root, SPEC, ResolvedModel("m", root / "model", "abc"))
    take_job(job)
    job.start_attempt(Stage.ENCODE_DIFFUSE, {"weights": "native"})
    if pid:
        job.note_worker(Stage.ENCODE_DIFFUSE, pid)
    return job


def on_disk(job: JobDir) -> dict:
    return json.loads((job.path / JOB_FILE).read_text())


def ending_calls(path: Path) -> list[str]:
    """`file:line what` for each call in `path` that ends a run or asks how one ends."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.Call):
            continue
        name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
        where = f"{path.relative_to(REPO_ROOT)}:{node.lineno}"
        if name in ENDING_CALLS:
            found.append(f"{where} {name}()")
        elif name == "transition" and node.args:
            target = ast.unparse(node.args[0]).removeprefix("JobState.")
            if target not in STARTS or STARTS[target] not in (None, path):
                found.append(f"{where} transition({target})")
    return found


def test_no_module_but_job_end_ends_a_run():
    offenders = [
        call
        for path in sorted(ORCHESTRATOR.rglob("*.py"))
        if path != THE_PLACE and path.name != "jobdir.py"  # jobdir.py: the writer itself
        for call in ending_calls(path)
    ]
    assert offenders == []
    assert len(ending_calls(THE_PLACE)) >= 4  # the check sees the calls where they belong


def test_an_attempt_result_is_running_ok_or_a_failure_by_the_same_name():
    assert [result.value for result in AttemptResult] == ["running", "ok", *(failure.value for failure in Failure)]
    for failure in Failure:
        assert attempt_result(failure).value == failure.value and attempt_result(failure).name == failure.name
    assert attempt_result(None) is AttemptResult.OK


@pytest.mark.parametrize(
    ("exc", "failure"),
    [
        (InvalidInput("a stale latents file"), Failure.INVALID_INPUT),
        (LoraNotFound("no such LoRA"), Failure.MODEL_NOT_FOUND),
        (OSError(errno.ENOSPC, "No space left on device"), Failure.NO_SPACE),
        (RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), Failure.CUDA_OOM),
        (ImportError("no module named diffusers"), Failure.ENVIRONMENT),
        (ValueError("a bug"), Failure.CRASH),
    ],
)
def test_a_workers_exception_becomes_one_failure_through_its_exit_code(exc: BaseException, failure: Failure):
    assert classify_exit(exit_code_of(exc)) is failure


def test_a_worker_that_fails_before_ready_failed_its_environment_not_the_plan():
    assert classify_exit(ExitCode.OTHER, ready=False) is Failure.ENVIRONMENT
    assert classify_exit(ExitCode.INVALID_INPUT, ready=False) is Failure.INVALID_INPUT  # it said why


def test_an_internal_error_fails_the_run_and_closes_its_attempt_as_internal(tmp_path: Path):
    job = running_job(tmp_path)
    internal_error(job, "orchestration error: KeyError 'x'")
    record = on_disk(job)
    attempt = record["stages"]["encode_diffuse"]["attempts"][-1]
    assert (record["status"], record["failure"], record["error"]) == (
        "failed",
        "internal",
        "orchestration error: KeyError 'x'",
    )
    assert (attempt["result"], attempt["reason"]) == ("internal", "orchestration error: KeyError 'x'")
    internal_error(job, "a second error after the end")  # an ended run keeps its end
    assert on_disk(job)["error"] == "orchestration error: KeyError 'x'"


def test_an_orphaned_run_is_requeued_and_its_worker_named(tmp_path: Path):
    job = running_job(tmp_path, pid=4242)
    assert requeue_orphan(job, "the daemon stopped during this attempt") == [4242]
    record = on_disk(job)
    assert (record["status"], record["failure"]) == ("queued", "interrupted")
    assert record["error"].startswith("interrupted (the daemon stopped during this attempt); resumes")
    assert record["stages"]["encode_diffuse"]["attempts"][-1]["result"] == "interrupted"
    take_job(job)  # the next run starts clean
    assert (on_disk(job)["status"], on_disk(job).get("failure"), on_disk(job)["error"]) == ("running", None, "")


def test_an_orphaned_run_a_person_cancelled_ends_cancelled(tmp_path: Path):
    job = running_job(tmp_path, pid=4242)
    assert job.request_cancel()
    assert requeue_orphan(job, "the daemon stopped during this attempt") == [4242]
    record = on_disk(job)
    assert (record["status"], record["failure"], record["error"]) == ("cancelled", "cancelled", "cancelled on request")


def died(job: JobDir) -> JobDir:
    """The job as another process finds it after its orchestrator died (the owner's start time no longer
    matches its pid: a pid gone or reused)."""
    record = on_disk(job)
    record["owner"]["pid_started"] = -1
    (job.path / JOB_FILE).write_text(json.dumps(record))
    return JobDir.load(job.path)


def test_take_job_ends_a_dead_orchestrators_run_before_starting_its_own(tmp_path: Path):
    job = running_job(tmp_path, pid=4242)
    take_job(died(job))
    events = [json.loads(line)["event"] for line in (job.path / "events.log").read_text().splitlines()]
    assert events[-3:] == ["job_interrupted", "job_queued", "job_running"]
    assert on_disk(job)["stages"]["encode_diffuse"]["attempts"][-1]["result"] == "interrupted"


def test_a_waiting_job_is_cancelled_at_once_and_a_running_one_is_not(tmp_path: Path):
    waiting = JobDir.create(tmp_path, SPEC, ResolvedModel("m", tmp_path / "model", "abc"))
    assert cancel_waiting(waiting)
    assert (on_disk(waiting)["status"], on_disk(waiting)["failure"]) == ("cancelled", "cancelled")
    running = running_job(tmp_path)
    assert not cancel_waiting(running) and on_disk(running)["status"] == "running"


def test_a_failed_publish_fails_the_run_naming_the_folder_and_the_recovery(tmp_path: Path):
    job = running_job(tmp_path)
    job.close_running_attempts(Failure.INTERRUPTED, "not under test")
    error = OSError(
        errno.EROFS, "Read-only file system", str(tmp_path / "video.mp4"), None, str(tmp_path / "out" / "v.mp4")
    )
    stopped = publish_failed(job, error, tmp_path / "out")
    assert isinstance(stopped, JobStopped) and (stopped.job_state, stopped.failure) == (
        JobState.FAILED,
        Failure.INVALID_INPUT,
    )
    assert str(stopped) == (
        f"cannot publish the video to {tmp_path / 'out'}: Read-only file system; it is kept in the job, "
        f"recover it with: ltx2 decode --input {job.path} --output PATH.mp4"
    )
    assert (on_disk(job)["status"], on_disk(job)["failure"]) == ("failed", "invalid_input")
    full = running_job(tmp_path)
    publish_failed(full, OSError(errno.ENOSPC, "No space left on device"), tmp_path / "out")
    assert on_disk(full)["failure"] == "no_space"


def test_the_http_error_of_a_failed_video_carries_the_same_failure():
    record = {"id": "v", "state": "failed", "created_at": 0, "model": "m", "size": "64x64", "prompt": "p",
              "seconds": "", "num_frames": 9, "fps": 24}  # fmt: skip
    job = {"error": "stage encode_diffuse failed (cuda_oom): out of memory", "failure": "cuda_oom"}
    error = video_object(record, job)["error"]
    assert (error["code"], error["failure"]) == ("generation_failed", "cuda_oom")


def test_the_cli_exits_with_the_failures_code_whichever_command_saw_it():
    assert [cli_exit_code(failure) for failure in ("invalid_input", "cuda_oom", "host_oom", "no_space")] == [2, 3, 3, 5]
    assert cli_exit_code(Failure.MODEL_NOT_FOUND) == ExitCode.MODEL_NOT_FOUND
    assert cli_exit_code(None) == cli_exit_code("a failure of a newer version") == ExitCode.OTHER


def test_only_jobdir_changes_a_job_record():
    """Nothing outside orchestrator/run/jobdir.py assigns into a job's record (publishing once did)."""
    offenders = []
    for path in sorted(ORCHESTRATOR.rglob("*.py")):
        if path.name == "jobdir.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = (
                node.targets
                if isinstance(node, ast.Assign)
                else [node.target]
                if isinstance(node, ast.AugAssign | ast.AnnAssign)
                else []
            )
            for target in targets:
                if isinstance(target, ast.Attribute) and ".record" in f".{ast.unparse(target.value)}":
                    offenders.append(f"{path.relative_to(REPO_ROOT)}:{node.lineno} {ast.unparse(target)}")
    assert offenders == []
