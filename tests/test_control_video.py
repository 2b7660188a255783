"""--reference-video (IC-LoRA control video) through diffusers' LTX2InContextPipeline.

The staged side runs the encode_diffuse stage on the tiny models of LTX-2.0 and 2.3 (fp32, CPU) with a
tiny LoRA fused; the reference is LTX2InContextPipeline itself, with the same LoRA fused the same way
and the control clip's frames as `load_video` gives them. The control clip is longer (21 frames) and
of another shape (48x80) than the 17-frame 64x64 clip: the pipeline trims and resizes it.
"""

from __future__ import annotations

import json
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from conftest import FAMILY_MODEL_FIXTURES, TINY_ARGS, run_ltx2
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    LTX2ConditionPipeline,
    LTX2InContextPipeline,
    LTX2LatentUpsamplePipeline,
)
from diffusers.pipelines.ltx2.latent_upsampler import LTX2LatentUpsamplerModel
from diffusers.pipelines.ltx2.pipeline_ltx2_condition import LTX2VideoCondition
from diffusers.pipelines.ltx2.pipeline_ltx2_ic_lora import LTX2ReferenceCondition
from diffusers.pipelines.ltx2.utils import STAGE_2_DISTILLED_SIGMA_VALUES
from PIL import Image
from safetensors.torch import save_file
from test_keyframes import CHEAP, GUIDANCE_OFF, gradient, write_video

from config.settings import load_settings
from orchestrator.run.jobdir import JobDir
from orchestrator.run.jobspec import build_spec
from orchestrator.run.policy import initial_plan
from protocol.control_video import parse_reference_flag
from protocol.families import detect_family
from protocol.files import LATENTS_FILE, STAGE1_LATENTS_FILE, Stage
from protocol.spec_rules import SpecError
from protocol.stage_request import StageRequest
from services import encode_diffuse
from services.guidance import guidance_off
from services.latents import read_latents
from services.runtime import Reporter, WorkerContext
from services.tiny_model import lora_tensors

TOLERANCE = 1e-5
# Per family: the control's strength, whether the LoRA's metadata asks for half-size control, an --image.
CASES = {"2.0": (1.0, True, True), "2.3": (0.5, False, False)}


@pytest.fixture(scope="module")
def control_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 21-frame 80x48 control clip, a first-frame image, and the tiny LoRA with and without
    `reference_downscale_factor` metadata (as Lightricks' reduced-reference IC-LoRAs carry it)."""
    folder = tmp_path_factory.mktemp("control")
    files = {
        "clip": folder / "control.mp4",
        "first": folder / "first.png",
        "lora": folder / "ic.safetensors",
        "lora_half": folder / "ic_half.safetensors",
    }
    write_video(files["clip"], np.stack([np.roll(gradient((48, 80), 90), 4 * step, axis=1) for step in range(21)]))
    Image.fromarray(gradient((64, 64), 30)).save(files["first"])
    save_file(lora_tensors("diffusion_model."), str(files["lora"]))
    save_file(lora_tensors("diffusion_model."), str(files["lora_half"]), metadata={"reference_downscale_factor": "2"})
    return files


def control_request(files: dict[str, Path], family: str) -> dict[str, object]:
    strength, half, image = CASES[family]
    request: dict[str, object] = {
        "reference_video": f"{files['clip']}:{strength:g}",
        "loras": [{"source": str(files["lora_half" if half else "lora"])}],
    }
    if image:
        request["image"] = str(files["first"])
    return request


def render(model_dir: Path, state: Path, **request: object) -> tuple[JobDir, dict[str, torch.Tensor]]:
    """The encode_diffuse stage, in this process, on a fresh job built and created as `ltx2 generate` does."""
    settings = load_settings(environ={"LTX2_STATE_DIR": str(state), "HOME": str(state)})
    fields = {"prompt": "a bird takes off", "model": str(model_dir), "dtype": "float32", **CHEAP, **GUIDANCE_OFF}
    built = build_spec({**fields, **request}, settings)
    job = JobDir.create(
        settings.jobs_dir, built.spec, built.model, loras=built.loras, image=built.image,
        conditions=built.conditions, reference=built.reference, identity=built.identity,
        stage2_lora=built.stage2_lora,
    )  # fmt: skip
    plan = initial_plan(Stage.ENCODE_DIFFUSE, built.spec, settings)
    reporter = Reporter(Stage.ENCODE_DIFFUSE, job.id, None)
    ctx = WorkerContext(Stage.ENCODE_DIFFUSE, job.path, StageRequest.of(job.record), plan, 1, reporter, {})
    encode_diffuse.run(ctx)
    return job, read_latents(job.path / LATENTS_FILE)[0]


def first_frames(path: Path, count: int) -> list[Image.Image]:
    """The clip's first frames as diffusers' `load_video` hands them over: RGB PIL images."""
    with av.open(str(path)) as container:
        return [frame.to_image() for _, frame in zip(range(count), container.decode(video=0), strict=False)]


def fused(pipe: object, lora: Path) -> object:
    """`pipe` with the LoRA loaded, scaled and fused as services/lora_fusing.py does."""
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(lora.parent), weight_name=lora.name, adapter_name="fused")
    pipe.set_adapters(["fused"], adapter_weights=[1.0])
    pipe.fuse_lora(adapter_names=["fused"], lora_scale=1.0)
    pipe.unload_lora_weights()
    return pipe


def keyframes_of(files: dict[str, Path], family: str) -> list[LTX2VideoCondition] | None:
    """The case's frame conditions: its --image at frame 0, if it has one."""
    return [LTX2VideoCondition(frames=Image.open(files["first"]).convert("RGB"), index=0)] if CASES[family][2] else None


def in_context_reference(model_dir: Path, files: dict[str, Path], family: str) -> tuple[torch.Tensor, ...]:
    """LTX2InContextPipeline with the IC-LoRA fused, at CHEAP's size (two-stage's stage 1 of a clip twice as
    large, too)."""
    strength, half, _ = CASES[family]
    pipe = fused(
        LTX2InContextPipeline.from_pretrained(model_dir, dtype=torch.float32), files["lora_half" if half else "lora"]
    )
    control = LTX2ReferenceCondition(frames=first_frames(files["clip"], CHEAP["num_frames"]), strength=strength)
    with torch.no_grad():
        return pipe(
            prompt="a bird takes off",
            negative_prompt="",
            reference_conditions=[control],
            conditions=keyframes_of(files, family),
            reference_downscale_factor=2 if half else 1,
            width=CHEAP["width"],
            height=CHEAP["height"],
            num_frames=CHEAP["num_frames"],
            frame_rate=24.0,
            num_inference_steps=CHEAP["steps"],
            generator=torch.Generator().manual_seed(CHEAP["seed"]),
            output_type="latent",
            return_dict=False,
            **guidance_off(detect_family(model_dir)),
        )


@pytest.fixture(scope="module", params=tuple(CASES))
def control_render(
    request: pytest.FixtureRequest, control_files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, object]:
    """One controlled render per family and diffusers' own, shared by the asserts below."""
    model_dir = request.getfixturevalue(FAMILY_MODEL_FIXTURES[request.param])
    state = tmp_path_factory.mktemp(f"ic-{request.param}")
    job, staged = render(model_dir, state, **control_request(control_files, request.param))
    video, audio = in_context_reference(model_dir, control_files, request.param)
    return {"family": request.param, "job": job, "staged": staged, "video": video, "audio": audio}


def test_controlled_latents_equal_ltx2_in_context_pipeline(control_render: dict):
    staged = control_render["staged"]
    assert staged["video"].shape == control_render["video"].shape == (1, 4, 5, 16, 16)
    assert float((staged["video"] - control_render["video"]).abs().max()) <= TOLERANCE
    assert float((staged["audio"] - control_render["audio"]).abs().max()) <= TOLERANCE


def test_job_json_records_the_control_video_resolved_and_copied(control_render: dict, control_files: dict):
    job = control_render["job"]
    strength, half, image = CASES[control_render["family"]]
    reference = job.record.reference
    assert (reference.frames, reference.width, reference.height, reference.frames_used) == (21, 80, 48, 17)
    assert (reference.strength, reference.downscale) == (strength, 2 if half else 1)
    assert job.spec.reference_downscale == reference.downscale  # the LoRA's metadata, resolved into the spec
    assert (job.path / reference.file).read_bytes() == control_files["clip"].read_bytes()
    assert job.record.digest_inputs["reference_video"] == {"sha256": reference.sha256, "strength": strength}
    assert [condition.kind for condition in job.record.conditions or ()] == (["image"] if image else [])


def test_the_digest_covers_the_control_files_bytes_and_strength(
    tiny_model_dir: Path, tmp_path: Path, control_files: dict
):
    settings = load_settings(environ={"LTX2_STATE_DIR": str(tmp_path / "state"), "HOME": str(tmp_path)})
    copy = tmp_path / "control.mp4"
    copy.write_bytes(control_files["clip"].read_bytes())
    base = {"prompt": "x", "model": str(tiny_model_dir), **CHEAP, "loras": [{"source": str(control_files["lora"])}]}
    before = build_spec({**base, "reference_video": str(copy)}, settings).identity
    weaker = build_spec({**base, "reference_video": f"{copy}:0.5"}, settings).identity
    write_video(copy, np.stack([gradient((48, 80), 91)] * 21))
    after = build_spec({**base, "reference_video": str(copy)}, settings).identity
    plain = build_spec(base, settings).identity
    assert len({before.digest, weaker.digest, after.digest, plain.digest}) == 4
    assert "reference_video" not in plain.inputs  # a request without one keeps the digest it had before them


@pytest.mark.parametrize(
    ("change", "flag", "message"),
    [
        ({"loras": []}, "--reference-video", "needs an IC-LoRA to read it (add --lora"),
        ({"num_frames": 25}, "--reference-video", "it has 21 frames and the clip 25"),
        ({"reference_video": "<first>"}, "--reference-video", "cannot read"),
        ({"reference_video": "<clip>:1.5"}, "--reference-video", "between 0.0 and 1.0; got 1.5"),
        (
            {
                "pipeline": "two-stage",
                "width": 128,
                "height": 128,
                "schedule": "distilled",
                "steps": 8,
                "reference_downscale": 3,
            },
            "--reference-downscale",
            "needs --width to be a multiple of 24 (the control clip is encoded at --width / 2 / 3",
        ),
        ({"reference_downscale": 3}, "--reference-downscale", "needs --width to be a multiple of 12"),
        ({"reference_downscale": 9}, "--reference-downscale", "9"),
        ({"reference_downscale": 1, "loras": [{"source": "<lora_half>"}]}, "--reference-downscale", "differs from"),
    ],
)
def test_bad_control_requests_are_refused_naming_the_flag(
    tiny_model_dir: Path, tmp_path: Path, control_files: dict, change: dict, flag: str, message: str
):
    settings = load_settings(environ={"LTX2_STATE_DIR": str(tmp_path / "state"), "HOME": str(tmp_path)})
    paths = {name: str(path) for name, path in control_files.items()}
    request = {
        "prompt": "x", "model": str(tiny_model_dir), **CHEAP, **GUIDANCE_OFF, "reference_video": paths["clip"],
        "loras": [{"source": paths["lora"]}],
    }  # fmt: skip
    for key, value in change.items():  # "<name>" in a value: that control file's path
        text = json.dumps(value)
        for name, path in paths.items():
            text = text.replace(f"<{name}>", path)
        request[key] = json.loads(text)
    with pytest.raises(SpecError) as refused:
        build_spec(request, settings)
    assert str(refused.value).startswith(f"{flag}: ") and message in str(refused.value), str(refused.value)


def test_a_reference_flag_is_read_from_the_right():
    assert parse_reference_flag("a:b/clip.mp4:0.25") == {"source": "a:b/clip.mp4", "strength": 0.25}
    assert parse_reference_flag("clip.mp4") == {"source": "clip.mp4"}


def test_generate_with_a_control_video_publishes_the_clip_and_records_it(ltx2_env: dict, control_files: dict):
    result = run_ltx2(
        ["generate", "--prompt", "a bird", "--model", "ltx2-stages/tiny-random-ltx2", "--quiet", *TINY_ARGS,
         "--reference-video", f"{control_files['clip']}:0.8", "--lora", str(control_files["lora_half"]),
         "--steps", "2", "--schedule", "default"],
        ltx2_env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "uses the first 17 of its 21 frames" in result.stderr
    video = Path(result.stdout.strip())
    with av.open(str(video)) as container:
        assert sum(1 for _ in container.decode(video=0)) == 17
    sidecar = json.loads(video.with_suffix(".json").read_text())
    control = sidecar["reference_video"]
    assert (control["source"], control["strength"], control["downscale"], control["frames_used"]) == (
        "control.mp4", 0.8, 2, 17
    )  # fmt: skip
    (job_dir,) = (Path(ltx2_env["LTX2_STATE_DIR"]) / "jobs").iterdir()
    assert "load video VAE for the control video" in (job_dir / "logs" / "encode_diffuse-1.log").read_text()


# Two-stage (Lightricks' ICLoraPipeline, ltx-pipelines' ic_lora.py), on LTX-2.0's case (a half-size control and
# an image): stage 1 at half the size is the one-stage in-context run above, at CHEAP's size; stage 2 refines the
# upsampled latents on the transformer without the IC-LoRA (here: with the dev recipe's stage-2 LoRA alone) and
# without the control clip, the image alone conditioning it, as diffusers' LTX2ConditionPipeline runs two-stage's
# stage 2. diffusers' stage 1 is control_render's reference; its stage 2 starts from the generator state the
# staged stage 1 left (its latents equal the reference's, so it drew the same noise).


# Two-stage control is pinned on LTX-2.0's case (the in-context pipeline on both families above).
TWO_STAGE_CASE = pytest.mark.parametrize("control_render", ["2.0"], indirect=True)


@pytest.fixture(scope="module")
def two_stage_control(
    control_render: dict, control_files: dict, tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path
) -> dict[str, object]:
    """A dev two-stage controlled render of CHEAP twice as large, and diffusers' stage 2 of it (its tests take
    control_render's LTX-2.0 case only: TWO_STAGE_CASE)."""
    assert control_render["family"] == "2.0"
    stage2_lora = tmp_path_factory.mktemp("stage2") / "distilled.safetensors"
    save_file(lora_tensors("diffusion_model.", seed=5), str(stage2_lora))
    size = {"width": 2 * CHEAP["width"], "height": 2 * CHEAP["height"]}
    fields = {**control_request(control_files, "2.0"), **size, "pipeline": "two-stage"}
    state = control_render["job"].path.parents[1]  # the one-stage run's: its prompt embeddings are cached there
    job, staged = render(tiny_model_dir, state, stage2_lora={"source": str(stage2_lora)}, **fields)
    stage1, _ = read_latents(job.path / STAGE1_LATENTS_FILE)
    generator = torch.Generator()
    generator.set_state(stage1["generator_state"])
    upsampler = LTX2LatentUpsamplerModel.from_pretrained(
        tiny_model_dir, subfolder="latent_upsampler", dtype=torch.float32
    )
    pipe = fused(LTX2ConditionPipeline.from_pretrained(tiny_model_dir, dtype=torch.float32), stage2_lora)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(
        pipe.scheduler.config, use_dynamic_shifting=False, shift_terminal=None
    )
    with torch.no_grad():
        (upsampled,) = LTX2LatentUpsamplePipeline(vae=pipe.vae, latent_upsampler=upsampler)(
            latents=control_render["video"], output_type="latent", return_dict=False
        )
        final = pipe(
            prompt="a bird takes off", negative_prompt="", latents=upsampled, audio_latents=control_render["audio"],
            conditions=keyframes_of(control_files, "2.0"), noise_scale=STAGE_2_DISTILLED_SIGMA_VALUES[0],
            sigmas=list(STAGE_2_DISTILLED_SIGMA_VALUES), num_inference_steps=len(STAGE_2_DISTILLED_SIGMA_VALUES),
            num_frames=CHEAP["num_frames"], frame_rate=24.0, generator=generator, output_type="latent",
            return_dict=False, **size, **guidance_off(detect_family(tiny_model_dir)),
        )  # fmt: skip
    return {"job": job, "staged": staged, "stage1": stage1, "reference": final}


@TWO_STAGE_CASE
def test_two_stage_control_stage_1_equals_ltx2_in_context_pipeline_at_half_size(
    two_stage_control: dict, control_render: dict
):
    stage1 = two_stage_control["stage1"]
    assert stage1["video"].shape == control_render["video"].shape == (1, 4, 5, 16, 16)
    assert float((stage1["video"] - control_render["video"]).abs().max()) <= TOLERANCE
    assert float((stage1["audio"] - control_render["audio"]).abs().max()) <= TOLERANCE


@TWO_STAGE_CASE
def test_two_stage_control_stage_2_refines_without_the_ic_lora_or_the_control(two_stage_control: dict):
    staged, (video, audio) = two_stage_control["staged"], two_stage_control["reference"]
    assert staged["video"].shape == video.shape == (1, 4, 5, 32, 32)  # 17 frames at 128x128
    assert float((staged["video"] - video).abs().max()) <= TOLERANCE
    assert float((staged["audio"] - audio).abs().max()) <= TOLERANCE
