"""--image: first-frame conditioning through diffusers' LTX2ImageToVideoPipeline, validated up front."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_ltx2
from diffusers import FlowMatchEulerDiscreteScheduler, LTX2ImageToVideoPipeline
from diffusers.pipelines.ltx2.utils import DISTILLED_SIGMA_VALUES
from PIL import Image
from test_loras import encode

from protocol.families import detect_family
from services.guidance import guidance_off


@pytest.fixture(scope="module")
def picture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("images") / "gradient.png"
    ramp = np.linspace(0, 255, 96, dtype=np.uint8)
    Image.fromarray(
        np.stack([np.tile(ramp, (96, 1)), np.tile(ramp[:, None], (1, 96)), np.full((96, 96), 90, np.uint8)], -1)
    ).save(path)
    return path


def reference_i2v(model_dir: Path, picture: Path, **extra: object) -> tuple[torch.Tensor, torch.Tensor]:
    """LTX2ImageToVideoPipeline's latents for `encode`'s tiny request, guidance off for the model's family."""
    pipe = LTX2ImageToVideoPipeline.from_pretrained(model_dir, dtype=torch.float32)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(
        pipe.scheduler.config, use_dynamic_shifting=False, shift_terminal=None
    )
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        return pipe(
            image=Image.open(picture).convert("RGB"),
            prompt="a dolly in",
            negative_prompt="",
            width=64,
            height=64,
            num_frames=9,
            frame_rate=24.0,
            num_inference_steps=8,
            sigmas=list(DISTILLED_SIGMA_VALUES),
            generator=torch.Generator().manual_seed(4),
            output_type="latent",
            return_dict=False,
            **guidance_off(detect_family(model_dir)),
            **extra,
        )


def test_image_to_video_latents_equal_the_single_process_i2v_pipeline(
    tiny_model_dir: Path, tmp_path: Path, picture: Path
):
    staged = encode(tiny_model_dir, tmp_path, "i2v", image=str(picture))
    video, audio = reference_i2v(tiny_model_dir, picture)
    assert float((staged["video"] - video).abs().max()) <= 1e-5
    assert float((staged["audio"] - audio).abs().max()) <= 1e-5
    text_only = encode(tiny_model_dir, tmp_path, "t2v")
    assert float((staged["video"] - text_only["video"]).abs().max()) > 1e-3


def test_ltx2_5_image_is_recompressed_at_its_crf_18_as_the_single_process_pipeline_does(
    tiny_25_model_dir: Path, tmp_path: Path, picture: Path
):
    """With a Gemma 4 encoder LTX2ImageToVideoPipeline re-compresses the image at CRF 18 (LTX-2.5's),
    not 33; the denoising process has no encoder, so it takes the CRF from the recorded family."""
    staged = encode(tiny_25_model_dir, tmp_path, "i2v", image=str(picture))
    video, audio = reference_i2v(tiny_25_model_dir, picture)
    assert float((staged["video"] - video).abs().max()) <= 1e-5
    assert float((staged["audio"] - audio).abs().max()) <= 1e-5
    at_crf_33, _ = reference_i2v(tiny_25_model_dir, picture, image_crf=33)
    assert float((staged["video"] - at_crf_33).abs().max()) > 1e-5


@pytest.mark.parametrize(
    ("image", "message"),
    [
        ("missing.png", "--image: "),
        ("notes.png", "cannot decode"),
    ],
)
def test_bad_images_are_refused_before_any_work(ltx2_env: dict, tmp_path: Path, image: str, message: str):
    (tmp_path / "notes.png").write_text("this is not a picture")
    result = run_ltx2(
        ["generate", "--prompt", "x", "--model", "ltx2-stages/tiny-random-ltx2", "--image", str(tmp_path / image)],
        ltx2_env,
    )
    assert result.returncode == 2
    assert message in result.stderr
    assert not (Path(ltx2_env["LTX2_STATE_DIR"]) / "jobs").exists()


def test_generate_with_a_non_square_image_crops_it_and_finishes(ltx2_env: dict, tmp_path: Path):
    wide = tmp_path / "wide.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 160, 3), dtype=np.uint8)).save(wide)
    result = run_ltx2(
        [
            "generate",
            "--prompt",
            "a wide shot",
            "--model",
            "ltx2-stages/tiny-random-ltx2",
            "--quiet",
            "--image",
            str(wide),
            "--width",
            "64",
            "--height",
            "64",
            "--num-frames",
            "9",
        ],
        ltx2_env,
    )
    assert result.returncode == 0, result.stderr
    (job_dir,) = (Path(ltx2_env["LTX2_STATE_DIR"]) / "jobs").iterdir()
    with Image.open(job_dir / "input_image.png") as stored:
        assert stored.size == (160, 64)  # stored as given; the worker crops it to the clip's shape
    assert "load video VAE for the conditioning image" in (job_dir / "logs" / "encode_diffuse-1.log").read_text()
