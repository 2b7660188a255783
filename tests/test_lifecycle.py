"""One lifecycle, one writer: the state tables, their only writer, and the policy's one decision."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import REPO_ROOT

from config.settings import load_settings
from orchestrator.run.jobdir import JobDir
from orchestrator.run.model_lookup import ResolvedModel
from orchestrator.run.policy import Attempt, decide, initial_plan
from orchestrator.run.states import AttemptResult, JobState, TransitionError, render_markdown
from protocol.errors import Failure
from protocol.files import Stage, publish, temp_path_for
from protocol.spec import JobSpec

SETTINGS = load_settings(environ={})
SPEC = JobSpec.from_dict(
    {"prompt": "p", "model": "m", "width": 64, "height": 64, "num_frames": 9, "steps": 8, "seed": 1}
)
# Files that may spell a state: the tables themselves, and the job directory that writes them.
STATE_OWNERS = {"orchestrator/run/states.py"}


def make_job(root: Path) -> JobDir:
    return JobDir.create(root, SPEC, ResolvedModel("m", root / "model", "abc"))


def test_docs_states_md_is_generated_from_states_py():
    assert (REPO_ROOT / "docs" / "states.md").read_text() == render_markdown()


def test_every_failure_is_an_attempt_result():
    assert {failure.value for failure in Failure} <= {result.value for result in AttemptResult}


def test_no_bare_state_strings_outside_states_py():
    """A job, stage or attempt state is spelled through the enums, never as a string literal (the
    orchestrator and the benchmarks that read its files)."""
    states = {"queued", "running", "done", "cancelled", "succeeded", "pending", "interrupted"}
    pattern = re.compile(r"""(==|!=|\bin\b|status=|result=|"status":|"result":)\s*["'](\w+)["']""")
    offenders = []
    for path in sorted([*(REPO_ROOT / "orchestrator").rglob("*.py"), *(REPO_ROOT / "bench").glob("*.py")]):
        relative = path.relative_to(REPO_ROOT).as_posix()
        if relative in STATE_OWNERS:
            continue
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            offenders += [f"{relative}:{number}: {line.strip()}" for m in pattern.finditer(line) if m[2] in states]
    assert offenders == []


def test_job_transition_is_checked_saved_logged_and_mirrored(tmp_path: Path):
    mirrored: list[str] = []
    job = JobDir.load(make_job(tmp_path).path, mirror=lambda j: mirrored.append(j.record.status))
    job.transition(JobState.RUNNING)
    job.transition(JobState.FAILED, error="boom")
    with pytest.raises(TransitionError, match="a failed job cannot become done"):
        job.transition(JobState.DONE)
    on_disk = json.loads((job.path / "job.json").read_text())
    assert (on_disk["status"], on_disk["error"], mirrored) == ("failed", "boom", ["running", "failed"])
    events = [json.loads(line)["event"] for line in (job.path / "events.log").read_text().splitlines()]
    assert events == ["job_queued", "job_running", "job_failed"]


def test_a_cancel_and_a_claim_of_one_queued_job_cannot_both_win(tmp_path: Path):
    """Two holders of one job (the daemon's request loop and its executor): the second change
    is checked against the state on disk, not against its stale copy."""
    created = make_job(tmp_path)
    request_loop, executor = JobDir.load(created.path), JobDir.load(created.path)
    request_loop.transition(JobState.CANCELLED, error="cancelled on request")
    with pytest.raises(TransitionError, match="a cancelled job cannot become running"):
        executor.transition(JobState.RUNNING)
    assert json.loads((created.path / "job.json").read_text())["status"] == "cancelled"


def test_two_threads_of_one_process_saving_one_job_never_lose_each_others_file(tmp_path: Path):
    """The daemon's request loop (a cancel) and its executor save job.json from two threads of one
    process: each writes its own temp file, so neither rename finds its file gone (CI, 2026-12-06: a
    delete through the gateway answered 502 FileNotFoundError)."""
    created = make_job(tmp_path)
    holders = [JobDir.load(created.path) for _ in range(2)]
    start = threading.Barrier(len(holders))
    errors: list[BaseException] = []

    def save_often(job: JobDir) -> None:
        start.wait()
        try:
            for _ in range(300):
                job.save()
        except OSError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=save_often, args=(job,)) for job in holders]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert json.loads((created.path / "job.json").read_text())["status"] == "queued"
    assert list(created.path.glob(".*.tmp-*")) == []


def test_cleaning_a_killed_workers_files_leaves_a_save_under_way_in_another_thread(tmp_path: Path):
    """The executor cleans a job's partial files (before starting its worker ahead) while the request loop
    saves the job (a cancel): the save's temp file is this process's, so it stays for its rename (CI,
    2026-12-06, after the per-thread temp names: a gateway delete still answered 502 FileNotFoundError).
    A dead process's temp file, another pid's, goes."""
    created = make_job(tmp_path)
    killed = created.path / ".video.tmp-999999999-1.mp4"  # a worker killed mid-write
    killed.write_bytes(b"half")
    under_way = temp_path_for(created.path / "job.json")  # written, not yet renamed, by another thread
    under_way.write_text(created.record.to_text())
    JobDir.load(created.path).clean_partial_files()
    assert not killed.exists() and under_way.exists()
    publish(under_way, created.path / "job.json")  # the save goes on as it would have
    assert JobDir.load(created.path).state is JobState.QUEUED


def test_an_attempt_result_is_set_once(tmp_path: Path):
    job = make_job(tmp_path)
    job.start_attempt(Stage.AUDIO_DECODE, {"device": "auto"})
    job.finish_attempt(Stage.AUDIO_DECODE, AttemptResult.CRASH, reason="exit 1")
    with pytest.raises(TransitionError):
        job.finish_attempt(Stage.AUDIO_DECODE, AttemptResult.OK)


def test_interrupting_returns_the_recorded_worker_pid_and_closes_the_attempt(tmp_path: Path):
    job = make_job(tmp_path)
    job.start_attempt(Stage.ENCODE_DIFFUSE, {"weights": "native"})
    job.note_worker(Stage.ENCODE_DIFFUSE, 4242)
    assert job.close_running_attempts(Failure.INTERRUPTED, "daemon died") == [4242]
    attempt = JobDir.load(job.path).stage_record(Stage.ENCODE_DIFFUSE).attempts[-1]
    assert (attempt.result, attempt.reason) == ("interrupted", "daemon died")


@pytest.mark.parametrize(
    "failure, job_state",
    [
        (Failure.CANCELLED, JobState.CANCELLED),
        (Failure.INTERRUPTED, JobState.QUEUED),
        (Failure.INVALID_INPUT, JobState.FAILED),
    ],
)
def test_the_policy_ends_stopped_and_hopeless_attempts_in_their_own_state(failure: Failure, job_state: JobState):
    plan = initial_plan(Stage.AUDIO_DECODE, SPEC, SETTINGS)
    decision = decide(Stage.AUDIO_DECODE, [Attempt(plan, failure)], "why", SPEC, SETTINGS)
    assert (decision.plan, decision.job_state) == (None, job_state)


def test_the_policy_retries_a_crash_with_the_same_plan_then_fails_with_the_ladder_spent():
    plan = initial_plan(Stage.AUDIO_DECODE, SPEC, SETTINGS)
    history = [Attempt(plan, Failure.CUDA_OOM)]
    lower = decide(Stage.AUDIO_DECODE, history, "oom", SPEC, SETTINGS)
    assert lower.plan == {"device": "cpu"} and lower.job_state is None
    history.append(Attempt(lower.plan, Failure.CUDA_OOM))
    spent = decide(Stage.AUDIO_DECODE, history, "oom", SPEC, SETTINGS)
    assert spent.job_state is JobState.FAILED and "no lower-memory plan left" in spent.reason


def test_states_module_imports_nothing_of_the_project_but_the_failure_vocabulary():
    """A failed attempt's result is a protocol.errors.Failure; nothing else of the project comes with it."""
    project = "('orchestrator', 'protocol', 'config')"
    code = f"import sys, orchestrator.run.states; print(sorted(m for m in sys.modules if m.split('.')[0] in {project}))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, check=True)
    expected = ["orchestrator", "orchestrator.run", "orchestrator.run.states", "protocol", "protocol.errors"]
    assert result.stdout.strip() == str(expected)
