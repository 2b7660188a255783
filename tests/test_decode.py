"""`ltx2 decode`: recover a video from a job directory or a bare latents file (the crash path)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import FAMILY_MODEL_FIXTURES, TINY_ARGS, RunAhead, ltx2_environment, probe_mp4, run_ltx2

from orchestrator.run.pipeline import drop_page_cache
from protocol.files import LATENTS_FILE, VIDEO_FILE
from protocol.model_ids import TINY_REPO_ID
from protocol.plans import DecodePlan, piece_ranges


def max_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


def frames(path: Path) -> np.ndarray:
    import av

    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


# The request the tests below recover videos of, and deliver cropped.
REQUEST = ["generate", "--prompt", "recover me", "--seed", "8", *TINY_ARGS, "--model", TINY_REPO_ID]
# The test whose cropped render of it starts ahead, beside the whole one.
CROP_TEST = "test_a_crop_delivers_the_exact_centre_of_the_rendered_frames"


def finished_run(root: Path, hf_home: Path) -> subprocess.CompletedProcess[str]:
    return run_ltx2([*REQUEST, "--quiet", "--drop-caches"], ltx2_environment(hf_home, root))


def cropped_run(root: Path, hf_home: Path) -> subprocess.CompletedProcess[str]:
    return run_ltx2([*REQUEST, "--crop-width", "48", "--crop-height", "40", "--quiet"], ltx2_environment(hf_home, root))


# Started ahead (conftest's `runs_ahead`), side by side as the first of them is needed: two
# independent processes keep CI's two cores busy.
RUNS_AHEAD: dict[str, RunAhead] = {"finished_job": finished_run, CROP_TEST: cropped_run}
RUNS_AHEAD_AT_ONCE = 2


@pytest.fixture(scope="module")
def finished_job(runs_ahead: dict) -> dict:
    """One `ltx2 generate` run that the tests below recover videos from; they only read it (a test
    that changes the job directory changes its own copy, see `job_dir_copy`)."""
    future, root = runs_ahead["finished_job"]
    result = future.result()
    assert result.returncode == 0, result.stderr
    (job_dir,) = (root / "state" / "jobs").iterdir()
    return {"job_dir": job_dir, "video": Path(result.stdout.strip()), "stderr": result.stderr}


def job_dir_copy(finished_job: dict, ltx2_env: dict) -> Path:
    """The finished job's directory copied into this test's own state dir, as a user moves a job
    directory to recover it elsewhere: the test may change it without touching the shared run."""
    return Path(
        shutil.copytree(
            finished_job["job_dir"], Path(ltx2_env["LTX2_STATE_DIR"]) / "jobs" / finished_job["job_dir"].name
        )
    )


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
    job_dir = job_dir_copy(finished_job, ltx2_env)
    (job_dir / VIDEO_FILE).unlink()
    target = tmp_path / "again.mp4"
    result = run_ltx2(["decode", "--input", str(job_dir), "--output", str(target), "--vae-chunk-frames", "3"], ltx2_env)
    assert result.returncode == 0, result.stderr
    assert "decode video (temporal pieces of 3" in result.stderr
    assert "encode_diffuse: skipped" in result.stderr and "audio_decode: skipped" in result.stderr
    assert probe_mp4(target)["frames"] == 17


def test_decode_of_a_finished_job_with_other_decode_settings_decodes_it_again_with_them(
    finished_job: dict, ltx2_env: dict, tmp_path: Path
):
    """A finished job's video was decoded with its old settings: `ltx2 decode --vae-chunk-frames 3` once
    republished that video unchanged while recording pieces of 3 in the job and its sidecar (a hostile test).
    Now the video stage runs again with the new settings; the same command again republishes its result."""
    job_dir = job_dir_copy(finished_job, ltx2_env)
    target = tmp_path / "pieces.mp4"
    command = ["decode", "--input", str(job_dir), "--output", str(target), "--vae-chunk-frames", "3", "--quiet"]
    result = run_ltx2(command, ltx2_env)
    assert result.returncode == 0, result.stderr
    attempts = json.loads((job_dir / "job.json").read_text())["stages"]["video_decode"]["attempts"]
    assert [attempt["plan"]["decode"]["chunk_latent_frames"] for attempt in attempts] == [None, 3], attempts
    assert probe_mp4(target)["frames"] == 17
    assert not np.array_equal(frames(target), frames(finished_job["video"]))  # cross-faded pieces, not one pass
    again = run_ltx2([*command[:4], str(tmp_path / "again.mp4"), *command[5:]], ltx2_env)
    assert again.returncode == 0, again.stderr
    assert len(json.loads((job_dir / "job.json").read_text())["stages"]["video_decode"]["attempts"]) == 2
    assert np.array_equal(frames(tmp_path / "again.mp4"), frames(target))


def test_decode_refuses_a_file_that_is_not_ltx2_latents(ltx2_env: dict, tmp_path: Path):
    bogus = tmp_path / "notes.safetensors"
    bogus.write_bytes(b"not a safetensors file")
    result = run_ltx2(["decode", "--input", str(bogus), "--output", str(tmp_path / "x.mp4")], ltx2_env)
    assert result.returncode == 2
    assert "--input:" in result.stderr and "not a latents file" in result.stderr


def test_a_crop_delivers_the_exact_centre_of_the_rendered_frames(
    finished_job: dict, ran_ahead: subprocess.CompletedProcess[str]
):
    """--crop-width/--crop-height (how the gateway delivers OpenAI's 720-pixel sides): the same request
    cropped gives the same latents, and its lossless PNGs are exactly the centre of the uncropped ones."""
    from PIL import Image

    result = ran_ahead
    assert result.returncode == 0, result.stderr
    assert "48x40x17, centre of 64x64" in result.stderr
    video = Path(result.stdout.strip())
    probe = probe_mp4(video)
    assert (probe["width"], probe["height"], probe["frames"]) == (48, 40, 17)
    whole = finished_job["video"]
    for suffix in ("_first.png", "_last.png"):
        rendered = np.asarray(Image.open(whole.with_name(whole.stem + suffix)))
        delivered = np.asarray(Image.open(video.with_name(video.stem + suffix)))
        assert delivered.shape == (40, 48, 3) and np.array_equal(delivered, rendered[12:52, 8:56]), suffix
    sidecar = json.loads(video.with_suffix(".json").read_text())
    assert sidecar["size"] == {"rendered": [64, 64], "delivered": [48, 40], "crop_box": [8, 12, 48, 40]}
    assert (sidecar["spec"]["crop_width"], sidecar["spec"]["crop_height"]) == (48, 40)


def test_drop_caches_flag_flushes_or_warns_without_failing(finished_job: dict):
    warning = drop_page_cache()
    assert warning == "" or "needs root" in warning
    spec = json.loads((finished_job["job_dir"] / "job.json").read_text())["spec"]
    assert spec["drop_caches"] is True
    assert (warning in finished_job["stderr"]) if warning else "drop-caches" not in finished_job["stderr"]


# ---------------------------------------------------------------------------------------------
# The video_decode stage's decode plans against diffusers' own AutoencoderKLLTX2Video.decode, on the
# tiny 2.0 VAE (every level spatiotemporal) and on the 2.3 one (spatiotemporal, temporal-only and
# spatial-only upsamplers: the layout 2.5 shares), with latents of the shape the pipeline makes for
# 33 frames at 128x128.
# ---------------------------------------------------------------------------------------------
DECODE_TOLERANCE = 1e-5  # as tests/test_parity.py
LATENT_SHAPE = (1, 4, 9, 32, 32)
# Tiles of 64 px overlapping by 16 (3 x 3 tiles over 128 px); pieces of 4 latent frames sharing 1 or 2.
DECODE_PLANS = {
    "tiled": DecodePlan(True, None, 1, 64, 16),
    "pieces": DecodePlan(False, 4, 1, 64, 16),
    "pieces-overlap-2": DecodePlan(False, 4, 2, 64, 16),
    "pieces+tiled": DecodePlan(True, 4, 1, 64, 16),
}


@pytest.fixture(scope="module", params=["2.0", "2.3"])
def decode_case(request: pytest.FixtureRequest) -> dict:
    """Our loaded VAE and diffusers' own, on one family's tiny model, with seeded latents."""
    import torch
    from diffusers import AutoencoderKLLTX2Video

    from services.model_loading import load_video_vae

    model_dir = request.getfixturevalue(FAMILY_MODEL_FIXTURES[request.param])
    generator = torch.Generator().manual_seed(21)
    return {
        "family": request.param,
        "ours": load_video_vae(model_dir, torch.float32, torch.device("cpu")),
        "diffusers": AutoencoderKLLTX2Video.from_pretrained(model_dir, subfolder="vae").eval(),
        "latents": torch.randn(LATENT_SHAPE, generator=generator),
    }


def reference_frames(vae: object, latents: object, plan: DecodePlan) -> np.ndarray:
    """diffusers' decode of `latents` ([n, H, W, 3] in [0, 1] as the pipeline postprocesses), tiled as the
    plan says with diffusers' own `enable_tiling`."""
    import torch
    from diffusers.video_processor import VideoProcessor

    vae.use_tiling = False
    if plan.tiling:
        stride = plan.tile_size - plan.tile_overlap
        vae.enable_tiling(plan.tile_size, plan.tile_size, None, stride, stride)
    with torch.no_grad():
        video = vae.decode(latents, return_dict=False)[0]
    return VideoProcessor(vae_scale_factor=4).postprocess_video(video, output_type="np")[0]


def stitched_reference(vae: object, latents: object, plan: DecodePlan) -> np.ndarray:
    """diffusers' decode of each temporal piece alone, laid out by pixel frame: a piece starting at latent
    frame `a` shows pixel frames 4a..; where two pieces show a frame, the later one's weight rises
    linearly over the shared frames (1/(n+1) .. n/(n+1))."""
    latent_frames = latents.shape[2]
    pieces = [
        (4 * start, reference_frames(vae, latents[:, :, start:end], plan))
        for start, end in piece_ranges(latent_frames, plan.chunk_latent_frames, plan.overlap_latent_frames)
    ]
    frames = []
    for t in range(4 * (latent_frames - 1) + 1):
        showing = [(first, piece) for first, piece in pieces if first <= t < first + len(piece)]
        if len(showing) == 1:
            ((first, piece),) = showing
            frames.append(piece[t - first])
            continue
        (first_a, a), (first_b, b) = showing
        shared = first_a + len(a) - first_b
        weight = (t - first_b + 1) / (shared + 1)
        frames.append(a[t - first_a] * (1 - weight) + b[t - first_b] * weight)
    return np.stack(frames)


def staged_frames(vae: object, latents: object, plan: DecodePlan) -> np.ndarray:
    import torch

    from services.video_decode import configure_vae, decode_frames

    configure_vae(vae, plan)
    return torch.cat(list(decode_frames(vae, latents, plan))).permute(0, 2, 3, 1).numpy()


def test_single_pass_decode_equals_diffusers_and_keeps_the_causal_first_frame(decode_case: dict):
    single = DecodePlan(False, None, 1, 64, 16)
    ours = staged_frames(decode_case["ours"], decode_case["latents"], single)
    assert ours.shape == (33, 128, 128, 3)  # (33 - 1) / 4 + 1 = 9 latent frames
    reference = reference_frames(decode_case["diffusers"], decode_case["latents"], single)
    assert max_diff(ours, reference) <= DECODE_TOLERANCE


@pytest.mark.parametrize("plan_name", ["tiled", "pieces+tiled"])
def test_tiled_decode_equals_diffusers_tiled_decode(decode_case: dict, plan_name: str):
    plan = DECODE_PLANS[plan_name]
    ours = staged_frames(decode_case["ours"], decode_case["latents"], plan)
    if plan.chunk_latent_frames is None:
        reference = reference_frames(decode_case["diffusers"], decode_case["latents"], plan)
        untiled = reference_frames(decode_case["diffusers"], decode_case["latents"], DECODE_PLANS["pieces"])
        assert max_diff(reference, untiled) > 1e-3  # the tiles really are decoded apart
    else:
        reference = stitched_reference(decode_case["diffusers"], decode_case["latents"], plan)
    assert ours.shape == reference.shape == (33, 128, 128, 3)
    assert max_diff(ours, reference) <= DECODE_TOLERANCE


@pytest.mark.parametrize("plan_name", ["pieces", "pieces-overlap-2"])
def test_temporal_pieces_equal_diffusers_pieces_cross_faded_by_pixel_frame(decode_case: dict, plan_name: str):
    plan = DECODE_PLANS[plan_name]
    ours = staged_frames(decode_case["ours"], decode_case["latents"], plan)
    reference = stitched_reference(decode_case["diffusers"], decode_case["latents"], plan)
    assert ours.shape == reference.shape == (33, 128, 128, 3)
    assert max_diff(ours, reference) <= DECODE_TOLERANCE
