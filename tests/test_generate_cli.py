"""`ltx2 generate` end to end: real CLI, real worker processes, the MP4 checked with PyAV."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import TINY_ARGS, ltx2_environment, probe_mp4, run_ltx2, selected_in_module

from protocol.files import AUDIO_FILE, LATENTS_FILE, VIDEO_FILE

# Each decode plan's flags and the phase its video decode shows.
DECODE_PLANS = {"spatial tiling": ["--vae-tiling"], "temporal pieces of 3": ["--vae-chunk-frames", "3"]}


def generate_with_decode_plan(root: Path, hf_home: Path, flags: list[str]) -> subprocess.CompletedProcess[str]:
    """`ltx2 generate` of a tiny clip with `flags`, tiles and pieces small enough for its 64x64x17,
    with state and outputs under `root`."""
    config = root / "small-tiles.toml"
    config.write_text("[decode]\ntile_size = 32\ntile_overlap = 8\nchunk_overlap_latent_frames = 1\n")
    request = ["generate", "--prompt", "a jib up over ruins", "--seed", "3", "--model", "ltx2-stages/tiny-random-ltx2"]
    return run_ltx2(["--config", str(config), *request, *TINY_ARGS, *flags], ltx2_environment(hf_home, root))


@pytest.fixture(scope="module")
def decode_plan_runs(
    request: pytest.FixtureRequest, hf_home: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, tuple[Future, Path]]]:
    """The run of each decode plan this session tests, started in the background one after the other
    as the module's first run starts (`generated`): each is a process on one core most of the time
    (its fork server's imports, the tiny stages), so two runs at a time keep CI's two cores busy."""
    selected = {
        item.callspec.params["label"]
        for item in selected_in_module(request)
        if item.originalname == "test_every_decode_plan_yields_exactly_the_requested_frames"
    }
    with ThreadPoolExecutor(max_workers=1) as beside:
        started = {}
        for label in (label for label in DECODE_PLANS if label in selected):
            root = tmp_path_factory.mktemp("decode-plan")
            started[label] = (beside.submit(generate_with_decode_plan, root, hf_home, DECODE_PLANS[label]), root)
        yield started


@pytest.fixture(scope="module")
def generated(
    hf_home: Path, tmp_path_factory: pytest.TempPathFactory, decode_plan_runs: dict[str, tuple[Future, Path]]
) -> dict[str, object]:
    """One default-model run (no weights cached, so the tiny model) shared by the assertions below; the
    decode plans' runs go beside it (`decode_plan_runs`)."""
    root = tmp_path_factory.mktemp("generate")
    env = ltx2_environment(hf_home, root)
    result = run_ltx2(
        [
            "generate",
            "--prompt",
            "a puppy in the mud",
            "--negative-prompt",
            "blurry",
            "--seed",
            "5",
            "--name",
            "pup",
            *TINY_ARGS,
        ],
        env,
    )
    return {"result": result, "root": root}


def test_generate_without_weights_says_so_in_one_line_and_uses_the_tiny_model(generated: dict):
    result = generated["result"]
    assert result.returncode == 0, result.stderr
    notices = [line for line in result.stderr.splitlines() if "no weights for" in line]
    assert len(notices) == 1
    assert "hf download rootonchair/LTX-2-19b-distilled" in notices[0]
    assert "tiny-random-ltx2" in notices[0]


def test_generate_writes_a_timestamped_mp4_with_exact_frames_and_audio(generated: dict):
    output = Path(generated["result"].stdout.strip())
    assert output.parent == (generated["root"] / "outputs").resolve()
    (job_dir,) = (generated["root"] / "state" / "jobs").iterdir()
    assert re.fullmatch(r"\d{8}-\d{6}-[0-9a-f]{6}", job_dir.name)
    assert output.name == f"pup_{job_dir.name[:15]}.mp4"  # --name, and the stamp of the job id: one search finds both
    info = probe_mp4(output)
    assert info["video_codec"] == "h264" and info["audio_codec"] == "aac"
    assert (info["width"], info["height"], info["frames"]) == (64, 64, 17)
    assert info["fps"] == 24.0
    assert info["audio_rate"] == 16000
    assert info["audio_seconds"] == pytest.approx(info["video_seconds"], abs=0.07)
    assert info["audio_seconds"] >= info["video_seconds"] - 1 / 24


def test_generate_leaves_a_complete_job_directory(generated: dict):
    (job_dir,) = (generated["root"] / "state" / "jobs").iterdir()
    record = json.loads((job_dir / "job.json").read_text())
    assert record["status"] == "done"
    assert record["spec"]["seed"] == 5 and record["spec"]["model"] == "ltx2-stages/tiny-random-ltx2"
    for stage, output in (("encode_diffuse", LATENTS_FILE), ("audio_decode", AUDIO_FILE), ("video_decode", VIDEO_FILE)):
        assert record["stages"][stage]["status"] == "succeeded"
        assert record["stages"][stage]["outputs"][output]["size"] == (job_dir / output).stat().st_size
        assert [a["result"] for a in record["stages"][stage]["attempts"]] == ["ok"]
    assert not [p.name for p in job_dir.iterdir() if ".tmp" in p.name]
    events = [json.loads(line)["event"] for line in (job_dir / "events.log").read_text().splitlines()]
    assert events.count("stage_finished") == 3 and events[-1] == "job_done"


def test_progress_shows_each_stage_and_denoise_steps(generated: dict):
    stderr = generated["result"].stderr
    for stage in ("encode_diffuse", "audio_decode", "video_decode"):
        assert f"{stage}: succeeded" in stderr
    assert "encode_diffuse: denoise" in stderr and "8/8" in stderr


def test_invalid_frame_count_exits_2_naming_the_flag(ltx2_env: dict):
    result = run_ltx2(
        ["generate", "--prompt", "x", "--num-frames", "20", "--model", "ltx2-stages/tiny-random-ltx2"], ltx2_env
    )
    assert result.returncode == 2
    assert "--num-frames: must be 8n+1" in result.stderr and "17 or 25" in result.stderr


def test_missing_model_exits_4_with_the_download_command(ltx2_env: dict):
    result = run_ltx2(["generate", "--prompt", "x", "--model", "Lightricks/LTX-2"], ltx2_env)
    assert result.returncode == 4
    assert "hf download Lightricks/LTX-2" in result.stderr


def test_negative_prompt_without_cfg_warns(generated: dict):
    assert "--negative-prompt has no effect with --guidance-scale 1.0" in generated["result"].stderr


@pytest.mark.parametrize("label", DECODE_PLANS)
def test_every_decode_plan_yields_exactly_the_requested_frames(decode_plan_runs: dict, label: str):
    run, root = decode_plan_runs[label]
    result = run.result()
    assert result.returncode == 0, result.stderr
    assert f"decode video ({label})" in result.stderr
    output = Path(result.stdout.strip())
    (job_dir,) = (root / "state" / "jobs").iterdir()
    assert output.name == f"a-jib-up-over-ruins_{job_dir.name[:15]}.mp4"  # no --name: the prompt's first words
    info = probe_mp4(output)
    assert (info["frames"], info["width"], info["height"]) == (17, 64, 64)


def test_generate_publishes_first_and_last_frames_and_a_sidecar(generated: dict):
    from PIL import Image

    output = Path(generated["result"].stdout.strip())
    for suffix in ("_first.png", "_last.png"):
        with Image.open(output.with_name(output.stem + suffix)) as image:
            assert image.size == (64, 64) and image.mode == "RGB"
    sidecar = json.loads(output.with_suffix(".json").read_text())
    assert sidecar["video"] == output.name and sidecar["seed"] == 5
    assert sidecar["model"]["name"] == "ltx2-stages/tiny-random-ltx2" and sidecar["model"]["revision"]
    assert sidecar["versions"]["diffusers"] == "0.42.1" and sidecar["versions"]["torch"]
    for stage in ("encode_diffuse", "audio_decode", "video_decode"):
        assert sidecar["stages"][stage]["attempts"] == 1 and sidecar["stages"][stage]["seconds"] > 0
        assert sidecar["stages"][stage]["peak_rss_bytes"] > 0
