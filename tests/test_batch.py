"""`ltx2 batch`: whole-file validation first, rendering, resuming, summary; the shipped examples parse."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from conftest import REPO_ROOT, probe_mp4, run_ltx2
from daemon_process import environment_of, fork_servers

from config.settings import load_settings
from orchestrator.command_line.batch import read_batch
from protocol.spec import JobSpec

EXAMPLES = sorted((REPO_ROOT / "examples" / "batches").iterdir())


def test_invalid_clip_stops_the_batch_before_any_job(ltx2_env: dict, tmp_path: Path):
    batch = tmp_path / "bad.toml"
    batch.write_text(
        '[defaults]\nmodel = "ltx2-stages/tiny-random-ltx2"\n\n[[clips]]\nprompt = "ok"\n\n'
        '[[clips]]\nname = "broken"\nprompt = "bad"\nnum_frames = 100\n'
    )
    result = run_ltx2(["batch", str(batch)], ltx2_env)
    assert result.returncode == 2
    assert "clip 2 (broken): --num-frames: must be 8n+1" in result.stderr
    assert not (Path(ltx2_env["LTX2_STATE_DIR"]) / "jobs").exists()
    # The lanes' fork server, warming since the lanes opened, went with the run (not left importing).
    deadline = time.monotonic() + 2.0
    while fork_servers_with(f"LTX2_STATE_DIR={ltx2_env['LTX2_STATE_DIR']}"):
        assert time.monotonic() < deadline, "a fork server outlived the batch that started it"
        time.sleep(0.05)


def fork_servers_with(variable: str) -> list[int]:
    """Running fork servers whose environment holds `variable` (NAME=value)."""
    return [pid for pid in fork_servers() if variable in environment_of(pid)]


def test_batch_renders_every_clip_then_a_rerun_skips_them(ltx2_env: dict):
    demo = REPO_ROOT / "examples" / "batches" / "tiny-demo.toml"
    first = run_ltx2(["batch", str(demo), "--quiet"], ltx2_env)
    assert first.returncode == 0, first.stderr
    outputs = Path(ltx2_env["LTX2_OUTPUT_DIR"])
    videos = sorted(outputs.glob("demo-*.mp4"))
    assert [v.name.split("_")[0] for v in videos] == ["demo-one", "demo-two"]
    assert all(probe_mp4(v)["frames"] == 17 for v in videos)
    assert "ETA for the rest" in first.stderr
    # One diffusion process for both clips: it encodes both prompts with one text-encoder load
    # before loading the transformer, so no separate pre-encoding process runs.
    assert "batch: encoded" not in first.stderr
    for job_dir in (Path(ltx2_env["LTX2_STATE_DIR"]) / "jobs").iterdir():
        log = (job_dir / "logs" / "encode_diffuse-1.log").read_text()
        assert log.count("load text encoder for 2 prompt(s)") == 1
        assert log.count("prompt embeddings from cache") == 2
    summary = (outputs / "tiny-demo_summary.txt").read_text().splitlines()
    assert summary[0].split() == ["clip", "seconds", "status", "output"]
    assert [line.split()[2] for line in summary[1:]] == ["rendered", "rendered"]
    jobs = sorted((Path(ltx2_env["LTX2_STATE_DIR"]) / "jobs").iterdir())
    second = run_ltx2(["batch", str(demo), "--quiet"], ltx2_env)
    assert second.returncode == 0, second.stderr
    assert second.stderr.count("done earlier, skipped") == 2
    assert sorted((Path(ltx2_env["LTX2_STATE_DIR"]) / "jobs").iterdir()) == jobs
    assert sorted(outputs.glob("demo-*.mp4")) == videos


def test_jsonl_batch_with_defaults_line_keeps_generated_seeds_across_runs(ltx2_env: dict, tmp_path: Path):
    batch = tmp_path / "seedless.jsonl"
    batch.write_text(
        json.dumps({"defaults": {"model": "ltx2-stages/tiny-random-ltx2", "width": 64, "height": 64, "num_frames": 9}})
        + "\n"
        + json.dumps({"prompt": "a kite"})
        + "\n"
    )
    result = run_ltx2(["batch", str(batch), "--quiet"], ltx2_env)
    assert result.returncode == 0, result.stderr
    (state_file,) = (Path(ltx2_env["LTX2_STATE_DIR"]) / "batches").iterdir()
    state = json.loads(state_file.read_text())
    (seed,) = state["seeds"].values()
    (job_dir,) = (Path(ltx2_env["LTX2_STATE_DIR"]) / "jobs").iterdir()
    assert json.loads((job_dir / "job.json").read_text())["spec"]["seed"] == seed


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_shipped_example_batches_are_valid(example: Path):
    settings = load_settings(environ={"HOME": "/nonexistent"})
    defaults, clips = read_batch(example)
    assert clips
    for clip in clips:
        fields = {
            "model": "m",
            "steps": 8,
            "seed": 1,
            "width": 768,
            "height": 512,
            "num_frames": 121,
            **defaults,
            **clip,
        }
        camera = fields.pop("camera", None)
        assert camera is None or camera in settings.cameras
        JobSpec.from_dict(fields)
