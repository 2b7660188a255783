"""Files are the truth: a re-run skips stages whose outputs verify and redoes the rest."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import zmq
from conftest import run_ltx2

from config.settings import load_settings
from orchestrator.placement.fork_client import ForkServer
from orchestrator.placement.worker_link import WorkerLink
from orchestrator.run.jobdir import JobDir
from orchestrator.run.model_lookup import resolve_model
from orchestrator.run.pipeline import JobHooks, StageEvent
from orchestrator.run.stage_major import run_job_stage_major
from protocol.files import AUDIO_FILE, LATENTS_FILE, VIDEO_FILE
from protocol.spec import JobSpec


def run(job: JobDir, state: Path, fork_server: ForkServer) -> list[tuple[str, str]]:
    settings = load_settings(
        environ={"LTX2_STATE_DIR": str(state), "LTX2_OUTPUT_DIR": str(state / "out"), "HOME": str(state)}
    )
    events: list[tuple[str, str]] = []
    context = zmq.Context()
    link = WorkerLink(context, shared_fork_server=fork_server)
    try:
        hooks = JobHooks(listener=lambda e: events.append((e.stage, e.kind)) if isinstance(e, StageEvent) else None)
        run_job_stage_major(job, settings, link, hooks)
    finally:
        link.close()
        context.term()
    return events


def test_rerun_redoes_only_stages_whose_outputs_are_missing_or_changed(
    tiny_model_dir: Path, tmp_path: Path, fork_server: ForkServer
):
    spec = JobSpec.from_dict(
        {
            "prompt": "waves",
            "model": str(tiny_model_dir),
            "width": 64,
            "height": 64,
            "num_frames": 9,
            "steps": 8,
            "seed": 9,
        }
    )
    job = JobDir.create(tmp_path / "jobs", spec, resolve_model(str(tiny_model_dir)))
    run(job, tmp_path, fork_server)
    latents_before = (job.path / LATENTS_FILE).read_bytes()
    (job.path / VIDEO_FILE).unlink()
    with (job.path / AUDIO_FILE).open("ab") as handle:
        handle.write(b"\0")
    events = run(JobDir.load(job.path), tmp_path, fork_server)
    assert events == [
        ("encode_diffuse", "skipped"),
        ("audio_decode", "started"),
        ("audio_decode", "succeeded"),
        ("video_decode", "started"),
        ("video_decode", "succeeded"),
    ]
    assert (job.path / LATENTS_FILE).read_bytes() == latents_before
    assert (job.path / VIDEO_FILE).is_file()
    # A job is published once: a re-decoded video equal to the published one is not copied again.
    published = [path.read_bytes() for path in (tmp_path / "out").glob("*.mp4")]
    assert published.count((job.path / VIDEO_FILE).read_bytes()) == 1


def test_failed_stage_reports_one_line_naming_its_log_and_its_exit_code(
    tiny_model_dir: Path, tmp_path: Path, ltx2_env: dict
):
    broken = tmp_path / "no-vae-model"
    shutil.copytree(tiny_model_dir, broken)
    shutil.rmtree(broken / "vae")
    result = run_ltx2(
        ["generate", "--prompt", "x", "--model", str(broken), "--width", "64", "--height", "64", "--num-frames", "9"],
        ltx2_env,
    )
    assert result.returncode == 4
    assert "stage encode_diffuse failed (model_not_found)" in result.stderr
    assert "has no 'vae' component" in result.stderr
    (job_dir,) = (tmp_path / "state" / "jobs").iterdir()
    # One line: the worker's log is named, its traceback stays there.
    assert "Traceback" not in result.stderr
    assert f"worker log: {job_dir / 'logs' / 'encode_diffuse-1.log'}" in result.stderr
    record = json.loads((job_dir / "job.json").read_text())
    assert record["status"] == "failed"
    assert record["stages"]["encode_diffuse"]["attempts"][0]["returncode"] == 4
