"""`ltx2 decode`: recover a video from a job directory or a bare latents file (the crash path)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_ARGS, probe_mp4, run_ltx2

from orchestrator.pipeline import drop_page_cache
from protocol.files import LATENTS_FILE, VIDEO_FILE


def frames(path: Path) -> np.ndarray:
    import av

    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


@pytest.fixture
def finished_job(ltx2_env: dict) -> dict:
    result = run_ltx2(
        [
            "generate",
            "--prompt",
            "recover me",
            "--seed",
            "8",
            "--quiet",
            "--drop-caches",
            *TINY_ARGS,
            "--model",
            "ltx2-stages/tiny-random-ltx2",
        ],
        ltx2_env,
    )
    assert result.returncode == 0, result.stderr
    (job_dir,) = (Path(ltx2_env["LTX2_STATE_DIR"]) / "jobs").iterdir()
    return {"job_dir": job_dir, "video": Path(result.stdout.strip()), "stderr": result.stderr}


def test_decode_from_a_bare_latents_file_reproduces_the_video(finished_job: dict, ltx2_env: dict, tmp_path: Path):
    saved = tmp_path / "saved_latents.safetensors"
    shutil.copyfile(finished_job["job_dir"] / LATENTS_FILE, saved)
    target = tmp_path / "recovered" / "clip.mp4"
    result = run_ltx2(["decode", "--input", str(saved), "--output", str(target), "--quiet"], ltx2_env)
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()) == target.resolve()
    assert np.array_equal(frames(target), frames(finished_job["video"]))
    assert probe_mp4(target)["audio_codec"] == "aac"
    sidecar = json.loads(target.with_suffix(".json").read_text())
    assert sidecar["stages"]["encode_diffuse"]["results"] == ["ok"]  # adopted, not recomputed
    assert sidecar["stages"]["encode_diffuse"]["seconds"] == 0.0
    assert target.with_name("clip_first.png").is_file() and target.with_name("clip_last.png").is_file()


def test_decode_of_a_job_dir_reruns_only_the_missing_stage_with_a_new_plan(
    finished_job: dict, ltx2_env: dict, tmp_path: Path
):
    job_dir = finished_job["job_dir"]
    (job_dir / VIDEO_FILE).unlink()
    target = tmp_path / "again.mp4"
    result = run_ltx2(["decode", "--input", str(job_dir), "--output", str(target), "--vae-chunk-frames", "3"], ltx2_env)
    assert result.returncode == 0, result.stderr
    assert "decode video (temporal pieces of 3" in result.stderr
    assert "encode_diffuse: skipped" in result.stderr and "audio_decode: skipped" in result.stderr
    assert probe_mp4(target)["frames"] == 17


def test_decode_refuses_a_file_that_is_not_ltx2_latents(ltx2_env: dict, tmp_path: Path):
    bogus = tmp_path / "notes.safetensors"
    bogus.write_bytes(b"not a safetensors file")
    result = run_ltx2(["decode", "--input", str(bogus), "--output", str(tmp_path / "x.mp4")], ltx2_env)
    assert result.returncode == 2
    assert "--input:" in result.stderr and "not a latents file" in result.stderr


def test_drop_caches_flag_flushes_or_warns_without_failing(finished_job: dict):
    warning = drop_page_cache()
    assert warning == "" or "needs root" in warning
    spec = json.loads((finished_job["job_dir"] / "job.json").read_text())["spec"]
    assert spec["drop_caches"] is True
    assert (warning in finished_job["stderr"]) if warning else "drop-caches" not in finished_job["stderr"]
