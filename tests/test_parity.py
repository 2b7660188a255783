"""Same seed, same result: the staged pipeline equals diffusers' single-process LTX2Pipeline.

The staged side runs the real worker processes on the tiny model of each family (fp32, CPU); the
reference is `LTX2Pipeline.from_pretrained` on the same folder with the same prompt, seed and
settings, its guidance arguments written out here per family rather than taken from our code.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FAMILY_MODEL_FIXTURES, probe_mp4, render_in_process
from diffusers import FlowMatchEulerDiscreteScheduler, LTX2Pipeline
from diffusers.pipelines.ltx2.utils import DISTILLED_SIGMA_VALUES

from config.settings import load_settings
from orchestrator.placement.fork_client import ForkServer
from orchestrator.run.jobdir import JobDir
from orchestrator.run.lora_lookup import resolve_lora
from orchestrator.run.model_lookup import resolve_model
from orchestrator.run.policy import initial_plan
from protocol.files import AUDIO_FILE, LATENTS_FILE, Stage
from protocol.plans import DecodePlan
from protocol.spec import JobSpec
from services.latents import read_latents
from services.media import read_wav
from services.model_loading import load_video_vae
from services.video_decode import configure_vae, decode_frames

TOLERANCE = 1e-5
PROMPT = "a slow dolly in through a rainy neon alley"
# What each family's trained model needs, from diffusers 0.42.1's LTX2Pipeline.__call__ docstring:
# STG blocks [29] for LTX-2.0 and [28] for 2.3; cross-timestep off for 2.0 ("legacy"), on for 2.3 and 2.5
# ("the LTX-2.3/2.5 behavior"). No docstring names 2.5's STG block: [28] is the modular LTX-2.5 blocks' guider default.
FAMILY_CALL = {
    "2.0": {"spatio_temporal_guidance_blocks": [29], "use_cross_timestep": False},
    "2.3": {"spatio_temporal_guidance_blocks": [28], "use_cross_timestep": True},
    "2.5": {"spatio_temporal_guidance_blocks": [28], "use_cross_timestep": True},
}
# The rate each tiny vocoder writes: 2.0's upsamples 160x to 16 kHz; the BWE of 2.3 and 2.5 ends at 48 kHz.
AUDIO_RATE = {"2.0": 16000, "2.3": 48000, "2.5": 48000}


def run_staged(
    model_dir: Path, state: Path, fork_server: ForkServer, stage2_lora: Path | None = None, **changes: object
) -> JobDir:
    """Run a whole job through real worker processes, forked by the session's `fork_server`, and
    return its directory; `stage2_lora` (a .safetensors file): dev two-stage's distilled LoRA,
    resolved as `ltx2 generate --stage2-lora` does."""
    settings = load_settings(
        environ={"LTX2_STATE_DIR": str(state), "LTX2_OUTPUT_DIR": str(state / "out"), "HOME": str(state)}
    )
    fields = {
        "prompt": PROMPT,
        "model": str(model_dir),
        "width": 64,
        "height": 64,
        "num_frames": 17,
        "steps": 8,
        "seed": 1234,
        "schedule": "distilled",
        "dtype": "float32",
        **changes,
    }
    resolved = None
    if stage2_lora is not None:
        fields["stage2_lora"] = {"source": str(stage2_lora)}
        resolved = resolve_lora({**fields["stage2_lora"], "scale": 1.0}, settings.input_roots, "stage2_lora")
    spec = JobSpec.from_dict(fields)
    job = JobDir.create(settings.jobs_dir, spec, resolve_model(str(model_dir)), stage2_lora=resolved)
    render_in_process(job, settings, fork_server)
    return job


def reference_call(
    pipe: LTX2Pipeline,
    spec: JobSpec,
    output_type: str,
    family: str = "2.0",
    generator: torch.Generator | None = None,
    **overrides: object,
) -> tuple:
    """One single-process call with every guidance argument pinned from the spec and the family.

    `generator` defaults to a fresh one seeded with the spec's seed; `overrides` replace or add call
    arguments (a two-stage reference's size, latents and sigmas)."""
    audio_cfg = spec.guidance_scale if spec.audio_guidance_scale is None else spec.audio_guidance_scale
    pinned = {
        "guidance_scale": spec.guidance_scale,
        "audio_guidance_scale": audio_cfg,
        "stg_scale": spec.stg_scale,
        "audio_stg_scale": spec.stg_scale,
        "modality_scale": spec.modality_scale,
        "audio_modality_scale": spec.modality_scale,
        "guidance_rescale": spec.guidance_rescale,
        "audio_guidance_rescale": spec.guidance_rescale,
        **FAMILY_CALL[family],
    }
    arguments = {
        "prompt": spec.prompt,
        "negative_prompt": spec.negative_prompt,
        "width": spec.width,
        "height": spec.height,
        "num_frames": spec.num_frames,
        "frame_rate": spec.fps,
        "num_inference_steps": spec.steps,
        "sigmas": list(DISTILLED_SIGMA_VALUES) if spec.schedule == "distilled" else None,
        "generator": generator or torch.Generator().manual_seed(spec.seed),
        "output_type": output_type,
        "return_dict": False,
        "max_sequence_length": 1024,
        **pinned,
        **overrides,
    }
    with torch.no_grad():
        return pipe(**arguments)


def load_reference(model_dir: Path, schedule: str) -> LTX2Pipeline:
    pipe = LTX2Pipeline.from_pretrained(model_dir, dtype=torch.float32)
    if schedule == "distilled":
        pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(
            pipe.scheduler.config, use_dynamic_shifting=False, shift_terminal=None
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def max_diff(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


@pytest.fixture(scope="module")
def distilled_job(family_model_dir: Path, tmp_path_factory: pytest.TempPathFactory, fork_server: ForkServer) -> JobDir:
    return run_staged(family_model_dir, tmp_path_factory.mktemp("distilled"), fork_server)


@pytest.fixture(scope="module")
def distilled_reference(family: str, family_model_dir: Path, distilled_job: JobDir) -> dict[str, object]:
    pipe = load_reference(family_model_dir, "distilled")
    video_latents, audio_latents = reference_call(pipe, distilled_job.spec, "latent", family)
    frames, audio = reference_call(pipe, distilled_job.spec, "np", family)
    return {"video_latents": video_latents, "audio_latents": audio_latents, "frames": frames, "audio": audio}


def test_staged_latents_equal_single_process_latents(distilled_job: JobDir, distilled_reference: dict):
    tensors, metadata = read_latents(distilled_job.path / LATENTS_FILE, distilled_job.spec.latents_digest())
    assert tensors["video"].shape == distilled_reference["video_latents"].shape == (1, 4, 5, 16, 16)
    assert max_diff(tensors["video"], distilled_reference["video_latents"]) <= TOLERANCE
    assert max_diff(tensors["audio"], distilled_reference["audio_latents"]) <= TOLERANCE
    assert metadata["seed"] == "1234" and metadata["dtype"] == "float32"


def test_staged_audio_waveform_equals_single_process_audio(
    family: str, distilled_job: JobDir, distilled_reference: dict
):
    waveform, rate = read_wav(distilled_job.path / AUDIO_FILE)
    reference = distilled_reference["audio"][0].numpy()
    vocoder_config = json.loads((Path(distilled_job.record.model_path) / "vocoder" / "config.json").read_text())
    assert rate == vocoder_config["output_sampling_rate"] == AUDIO_RATE[family]
    assert waveform.shape == reference.shape
    assert max_diff(waveform, reference) <= TOLERANCE


def test_mp4_holds_every_frame_and_aac_at_the_vocoder_rate(family: str, distilled_job: JobDir):
    info = probe_mp4(Path(distilled_job.record.output))
    assert (info["frames"], info["width"], info["height"]) == (17, 64, 64)
    assert (info["video_codec"], info["audio_codec"]) == ("h264", "aac")
    assert info["audio_rate"] == AUDIO_RATE[family]
    assert info["audio_seconds"] == pytest.approx(info["video_seconds"], abs=0.07)


def test_job_json_and_sidecar_record_the_detected_family(family: str, distilled_job: JobDir):
    recorded = JobDir.load(distilled_job.path).record.family
    sidecar = json.loads(Path(distilled_job.record.output).with_suffix(".json").read_text())
    assert recorded.name == sidecar["family"]["name"] == family
    assert recorded.audio_sample_rate == sidecar["family"]["audio_sample_rate"] == AUDIO_RATE[family]


def test_staged_decoded_frames_equal_single_process_frames(distilled_job: JobDir, distilled_reference: dict):
    plan = DecodePlan.from_dict(
        initial_plan(Stage.VIDEO_DECODE, distilled_job.spec, load_settings(environ={}))["decode"]
    )
    assert plan.label == "single pass"
    vae = load_video_vae(Path(distilled_job.record.model_path), torch.float32, torch.device("cpu"))
    configure_vae(vae, plan)
    tensors, _ = read_latents(distilled_job.path / LATENTS_FILE)
    frames = torch.cat(list(decode_frames(vae, tensors["video"], plan))).permute(0, 2, 3, 1).numpy()
    assert frames.shape == distilled_reference["frames"][0].shape == (17, 64, 64, 3)
    assert max_diff(frames, distilled_reference["frames"][0]) <= TOLERANCE


def test_distilled_run_makes_one_transformer_call_per_step(family: str, distilled_job: JobDir):
    _, metadata = read_latents(distilled_job.path / LATENTS_FILE)
    assert int(metadata["transformer_calls"]) == distilled_job.spec.steps == 8
    assert metadata["family"] == family


def test_diffusers_defaults_would_make_three_calls_per_step(tiny_model_dir: Path):
    """Why guidance is pinned: 0.42.1's defaults run CFG, STG and modality passes even at scale 1."""
    pipe = load_reference(tiny_model_dir, "default")
    calls = []
    pipe.transformer.register_forward_pre_hook(lambda module, args: calls.append(1))
    with torch.no_grad():
        pipe(
            prompt=PROMPT,
            width=64,
            height=64,
            num_frames=9,
            num_inference_steps=2,
            guidance_scale=1.0,
            generator=torch.Generator().manual_seed(0),
            output_type="latent",
            max_sequence_length=1024,
        )
    assert len(calls) == 3 * 2


def test_cfg_run_with_negative_prompt_matches_and_batches_one_call_per_step(
    tiny_model_dir: Path, tmp_path: Path, fork_server: ForkServer
):
    job = run_staged(
        tiny_model_dir,
        tmp_path,
        fork_server,
        guidance_scale=3.0,
        schedule="default",
        steps=3,
        negative_prompt="blurry, low quality",
        num_frames=9,
    )
    tensors, metadata = read_latents(job.path / LATENTS_FILE)
    video, audio = reference_call(load_reference(tiny_model_dir, "default"), job.spec, "latent")
    assert max_diff(tensors["video"], video) <= TOLERANCE
    assert max_diff(tensors["audio"], audio) <= TOLERANCE
    assert int(metadata["transformer_calls"]) == 3


@pytest.mark.parametrize("dev_family", ["2.3", "2.5"])
def test_dev_preset_matches_and_makes_cfg_stg_and_modality_calls_each_step(
    dev_family: str, request: pytest.FixtureRequest, tmp_path: Path, fork_server: ForkServer
):
    """The 2.3 and 2.5 dev presets (audio CFG 7, STG, modality guidance, rescale) through the stages equal
    the single-process pipeline, at three transformer calls per step: CFG (batched), STG, modality. On 2.5
    the prompt's cross-attention modulation is the static per-layer table (no `prompt_adaln`)."""
    model_dir = request.getfixturevalue(FAMILY_MODEL_FIXTURES[dev_family])
    dev = load_settings(environ={}).families[dev_family].dev
    assert (dev.guidance_scale, dev.audio_guidance_scale, dev.stg_scale, dev.modality_scale) == (3.0, 7.0, 1.0, 3.0)
    guidance = {k: v for k, v in dev.spec_fields().items() if k not in ("steps", "schedule")}
    job = run_staged(model_dir, tmp_path, fork_server, **guidance, schedule="default", steps=2, num_frames=9)
    tensors, metadata = read_latents(job.path / LATENTS_FILE)
    video, audio = reference_call(load_reference(model_dir, "default"), job.spec, "latent", dev_family)
    assert max_diff(tensors["video"], video) <= TOLERANCE
    assert max_diff(tensors["audio"], audio) <= TOLERANCE
    assert int(metadata["transformer_calls"]) == 3 * 2
