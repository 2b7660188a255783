"""--pipeline two-stage: half size, the latent upsampler x2, three distilled steps at full size.

The staged side runs the real worker processes on each family's tiny model (fp32, CPU); the
reference is diffusers' own composition from its LTX-2 docs, written out here: LTX2Pipeline at
half size with `output_type="latent"`, LTX2LatentUpsamplePipeline, then LTX2Pipeline again on the
upsampled latents with STAGE_2_DISTILLED_SIGMA_VALUES and all guidance off, one generator
passed to both calls. With a dev schedule (the docs' "Two-stages Generation"), stage 2 runs with
the distilled LoRA loaded as an adapter at 1.0 and the scheduler rebuilt without dynamic shifting;
the tiny stand-in for that LoRA is `ltx2 tiny-model --stage2-lora`'s, in a cache of the tests' own.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT, ltx2_environment, probe_mp4, run_ltx2, run_ltx2_two_at_a_time
from cpu_drift import check_equal_latents, kernel_lines, unequal_embeddings
from diffusers import FlowMatchEulerDiscreteScheduler, LTX2ImageToVideoPipeline, LTX2LatentUpsamplePipeline
from diffusers.pipelines.ltx2.latent_upsampler import LTX2LatentUpsamplerModel
from diffusers.pipelines.ltx2.utils import STAGE_2_DISTILLED_SIGMA_VALUES
from PIL import Image
from supervised import wait_for_file
from test_image_to_video import picture  # noqa: F401  (a module-scoped fixture)
from test_loras import encode, lora_files  # noqa: F401  (lora_files is a module-scoped fixture)
from test_parity import (
    AUDIO_RATE,
    TOLERANCE,
    load_reference,
    max_diff,
    reference_call,
    run_staged,
)

from config.settings import load_settings
from orchestrator.cli import build_parser
from orchestrator.placement.fork_client import ForkServer
from orchestrator.run.jobdir import JobDir
from orchestrator.run.jobspec import build_spec
from orchestrator.run.model_lookup import ensure_tiny_model
from protocol.errors import ExitCode
from protocol.files import AUDIO_FILE, LATENTS_FILE, STAGE1_LATENTS_FILE
from protocol.model_ids import TINY_REPO_IDS, TINY_REVISION
from protocol.spec import JobSpec
from protocol.spec_rules import SpecError
from services.latents import read_latents
from services.media import read_wav
from services.tiny_model import write_tiny_stage2_lora_to_hf_cache

# Stage 1 at 64x64 (the tiny VAE compresses 4x: 16x16 latents), stage 2 at 128x128 (32x32).
TWO_STAGE = {"width": 128, "height": 128, "pipeline": "two-stage"}
GUIDANCE_OFF = {
    "guidance_scale": 1.0,
    "audio_guidance_scale": 1.0,
    "stg_scale": 0.0,
    "audio_stg_scale": 0.0,
    "modality_scale": 1.0,
    "audio_modality_scale": 1.0,
    "guidance_rescale": 0.0,
    "audio_guidance_rescale": 0.0,
}


def reference_two_stage(
    pipe: object,
    model_dir: Path,
    spec: JobSpec,
    family: str,
    stage2_lora: Path | None = None,
    stage2_scheduler: bool = False,
    output_types: tuple[str, ...] = ("latent", "np"),
    **inputs: object,
) -> dict:
    """diffusers' two-stage composition: stage 1's latents, the upsampled ones, and stage 2's
    latents and decoded frames and waveform (each from the same generator state).

    `stage2_lora`: the dev recipe, whose stage 2 loads that LoRA as adapter "stage_2_distilled" at 1.0
    and rebuilds the scheduler with from_config(use_dynamic_shifting=False, shift_terminal=None);
    `stage2_scheduler` rebuilds it without loading the LoRA (the recipe less the LoRA). Both change `pipe`."""
    generator = torch.Generator().manual_seed(spec.seed)
    half = {"width": spec.width // 2, "height": spec.height // 2}
    video, audio = reference_call(pipe, spec, "latent", family, generator, **half, **inputs)
    upsampler = LTX2LatentUpsamplerModel.from_pretrained(model_dir, subfolder="latent_upsampler", dtype=torch.float32)
    with torch.no_grad():
        (upsampled,) = LTX2LatentUpsamplePipeline(vae=pipe.vae, latent_upsampler=upsampler)(
            latents=video, output_type="latent", return_dict=False
        )
    state = generator.get_state()
    if stage2_lora is not None:
        pipe.load_lora_weights(str(stage2_lora.parent), adapter_name="stage_2_distilled", weight_name=stage2_lora.name)
        pipe.set_adapters("stage_2_distilled", 1.0)
    if stage2_lora is not None or stage2_scheduler:
        pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(
            pipe.scheduler.config, use_dynamic_shifting=False, shift_terminal=None
        )
    stage2 = {
        "latents": upsampled,
        "audio_latents": audio,
        "noise_scale": STAGE_2_DISTILLED_SIGMA_VALUES[0],
        "sigmas": list(STAGE_2_DISTILLED_SIGMA_VALUES),
        "num_inference_steps": len(STAGE_2_DISTILLED_SIGMA_VALUES),
        **GUIDANCE_OFF,
        **inputs,
    }
    results = {"stage1": (video, audio), "upsampled": upsampled}
    for output_type in output_types:
        generator.set_state(state)
        results[output_type] = reference_call(pipe, spec, output_type, family, generator, **stage2)
    return results


@pytest.fixture(scope="module")
def two_stage_job(family_model_dir: Path, tmp_path_factory: pytest.TempPathFactory, fork_server: ForkServer) -> JobDir:
    return run_staged(family_model_dir, tmp_path_factory.mktemp("two-stage"), fork_server, **TWO_STAGE)


@pytest.fixture(scope="module")
def two_stage_reference(family: str, family_model_dir: Path, two_stage_job: JobDir) -> dict:
    pipe = load_reference(family_model_dir, "distilled")
    return reference_two_stage(pipe, family_model_dir, two_stage_job.spec, family)


def test_two_stage_latents_equal_diffusers_composition(two_stage_job: JobDir, two_stage_reference: dict):
    tensors, metadata = read_latents(two_stage_job.path / LATENTS_FILE, two_stage_job.spec.latents_digest())
    video, audio = two_stage_reference["latent"]
    assert tensors["video"].shape == video.shape == (1, 4, 5, 32, 32)
    assert max_diff(tensors["video"], video) <= TOLERANCE
    assert max_diff(tensors["audio"], audio) <= TOLERANCE
    stage1, _ = read_latents(two_stage_job.path / STAGE1_LATENTS_FILE, two_stage_job.spec.latents_digest())
    assert stage1["video"].shape == (1, 4, 5, 16, 16)
    assert max_diff(stage1["video"], two_stage_reference["stage1"][0]) <= TOLERANCE
    assert metadata["pipeline"] == "two-stage" and metadata["stage1_reused"] == "false"


def test_two_stage_audio_waveform_equals_diffusers_composition(
    family: str, two_stage_job: JobDir, two_stage_reference: dict
):
    waveform, rate = read_wav(two_stage_job.path / AUDIO_FILE)
    reference = two_stage_reference["np"][1][0].numpy()
    assert rate == AUDIO_RATE[family]
    assert waveform.shape == reference.shape
    assert max_diff(waveform, reference) <= TOLERANCE


def test_two_stage_mp4_has_full_size_frames_and_audio_at_the_vocoder_rate(family: str, two_stage_job: JobDir):
    info = probe_mp4(Path(two_stage_job.record.output))
    assert (info["frames"], info["width"], info["height"]) == (17, 128, 128)
    assert (info["video_codec"], info["audio_codec"]) == ("h264", "aac")
    assert info["audio_rate"] == AUDIO_RATE[family]


def test_two_stage_makes_stage_1_steps_plus_three_unguided_calls(two_stage_job: JobDir):
    _, metadata = read_latents(two_stage_job.path / LATENTS_FILE)
    assert json.loads(metadata["stage_calls"]) == [8, 3]
    assert int(metadata["transformer_calls"]) == 8 + 3


def test_job_json_and_sidecar_record_the_pipeline(two_stage_job: JobDir):
    sidecar = json.loads(Path(two_stage_job.record.output).with_suffix(".json").read_text())
    assert JobDir.load(two_stage_job.path).spec.pipeline == "two-stage"
    assert sidecar["pipeline"] == sidecar["spec"]["pipeline"] == "two-stage"


def test_image_to_video_two_stage_equals_diffusers_composition_and_keeps_the_first_frame(
    tiny_model_dir: Path,
    tmp_path: Path,
    picture: Path,  # noqa: F811
):
    """diffusers conditions stage 2 through LTX2ImageToVideoPipeline given 5-D latents: their first
    latent frame (the upsampled image) is held clean and unnoised through the three steps."""
    request = {"image": str(picture), "num_frames": 9, "pipeline": "two-stage", "width": 128, "height": 128}
    staged = encode(tiny_model_dir, tmp_path, "i2v", **request)
    pipe = LTX2ImageToVideoPipeline.from_pretrained(tiny_model_dir, dtype=torch.float32)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(
        pipe.scheduler.config, use_dynamic_shifting=False, shift_terminal=None
    )
    pipe.set_progress_bar_config(disable=True)
    spec = JobSpec.from_dict({"prompt": "a dolly in", "model": str(tiny_model_dir), "steps": 8, "seed": 4, **request})
    reference = reference_two_stage(pipe, tiny_model_dir, spec, "2.0", image=Image.open(picture).convert("RGB"))
    video, audio = reference["latent"]
    assert max_diff(staged["video"], video) <= TOLERANCE
    assert max_diff(staged["audio"], audio) <= TOLERANCE
    assert max_diff(staged["video"][:, :, 0], reference["upsampled"][:, :, 0]) <= TOLERANCE
    text_only = encode(tiny_model_dir, tmp_path, "t2v", **{k: v for k, v in request.items() if k != "image"})
    assert max_diff(staged["video"], text_only["video"]) > 1e-3


def start_cli(args: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "orchestrator.cli", *args],
        env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def test_sigkill_after_stage_1_resumes_at_stage_2_with_the_undisturbed_latents(ltx2_env: dict, tmp_path: Path):
    faults = tmp_path / "faults"
    faults.mkdir()
    args = ["generate", "--prompt", "a lighthouse", "--seed", "5", "--model", TINY_REPO_IDS["2.0"], "--quiet"]
    args += ["--width", "128", "--height", "128", "--num-frames", "9", "--pipeline", "two-stage"]
    pause = {"LTX2_FAULT_DIR": str(faults), "LTX2_FAULT_PAUSE": "encode_diffuse:upsample latents:0"}
    # The undisturbed run, in a state dir of its own, goes beside the one that is killed and resumed.
    undisturbed = start_cli(args, {**ltx2_env, "LTX2_STATE_DIR": str(tmp_path / "undisturbed")})
    try:
        cli = start_cli(args, {**ltx2_env, **pause})
        worker = int(wait_for_file(faults / "paused-encode_diffuse.pid").read_text())
        os.kill(worker, signal.SIGKILL)  # as the kernel's OOM killer would, after latents_stage1.safetensors
        _, err = cli.communicate(timeout=300)
    finally:
        _, undisturbed_err = undisturbed.communicate(timeout=300)
    assert cli.returncode == 0, err
    (job_dir,) = (tmp_path / "state" / "jobs").iterdir()
    record = json.loads((job_dir / "job.json").read_text())
    assert [a["result"] for a in record["stages"]["encode_diffuse"]["attempts"]] == ["host_oom", "ok"]
    events = [json.loads(line) for line in (job_dir / "events.log").read_text().splitlines()]
    phases = [e["phase"] for e in events if e["event"] == "stage_progress" and e["stage"] == "encode_diffuse"]
    retry = phases[phases.index("upsample latents") + 1 :]  # the second attempt's phases
    assert "stage 1 latents verified, skipped" in retry and "denoise stage 1" not in retry
    resumed, metadata = read_latents(job_dir / LATENTS_FILE)
    assert metadata["stage1_reused"] == "true" and json.loads(metadata["stage_calls"]) == [8, 3]

    assert undisturbed.returncode == 0, undisturbed_err
    (other_dir,) = (tmp_path / "undisturbed" / "jobs").iterdir()
    expected, _ = read_latents(other_dir / LATENTS_FILE)
    assert torch.equal(resumed["video"], expected["video"]) and torch.equal(resumed["audio"], expected["audio"])


@pytest.mark.parametrize(
    ("size", "flag", "nearest"), [(("96", "128"), "--width", "128"), (("128", "160"), "--height", "128 or 192")]
)
def test_two_stage_size_not_a_multiple_of_64_exits_2_naming_the_flag(
    ltx2_env: dict, size: tuple[str, str], flag: str, nearest: str
):
    result = run_ltx2(
        ["generate", "--prompt", "x", "--model", TINY_REPO_IDS["2.0"], "--pipeline", "two-stage",
         "--width", size[0], "--height", size[1]],
        ltx2_env,
    )  # fmt: skip
    assert result.returncode == ExitCode.INVALID_INPUT
    assert f"{flag}: two-stage needs a multiple of 64" in result.stderr
    assert f"nearest allowed: {nearest}; or --pipeline one-stage" in result.stderr


def test_two_stage_with_a_dev_schedule_needs_a_stage_2_lora_and_only_it_takes_one():
    """A dev two-stage spec without its stage-2 LoRA is refused naming --pipeline and --stage2-lora (the
    orchestrator fills the LoRA from the family, so only a family without one gets here); with one it is
    valid; a stage-2 LoRA that no stage would fuse (distilled, one-stage) is refused naming its flag."""
    dev = {"prompt": "x", "model": "m", "width": 128, "height": 128, "num_frames": 9, "steps": 30, "seed": 1,
           "schedule": "default", "pipeline": "two-stage"}  # fmt: skip
    with pytest.raises(SpecError, match="--stage2-lora, or use --schedule distilled or --pipeline one-stage") as caught:
        JobSpec.from_dict(dev)
    assert caught.value.flag == "--pipeline"
    lora = {"source": "Lightricks/LTX-2", "weight_name": "ltx-2-19b-distilled-lora-384.safetensors"}
    assert JobSpec.from_dict({**dev, "stage2_lora": lora}).stage2_lora == lora
    for unused in ({"schedule": "distilled", "steps": 8}, {"pipeline": "one-stage"}):
        with pytest.raises(SpecError, match="only two-stage with a dev schedule") as caught:
            JobSpec.from_dict({**dev, **unused, "stage2_lora": lora})
        assert caught.value.flag == "--stage2-lora"


def test_a_checkpoint_without_a_latent_upsampler_exits_4_naming_the_folder(
    ltx2_env: dict, tiny_model_dir: Path, tmp_path: Path
):
    model = tmp_path / "no-upsampler"
    shutil.copytree(tiny_model_dir, model, ignore=shutil.ignore_patterns("latent_upsampler"))
    args = ["generate", "--prompt", "x", "--model", str(model), "--width", "128", "--height", "128"]
    result = run_ltx2([*args, "--pipeline", "two-stage"], ltx2_env)
    assert result.returncode == ExitCode.MODEL_NOT_FOUND
    (line,) = result.stderr.strip().splitlines()
    assert f"{model / 'latent_upsampler'} does not exist" in line and "--pipeline one-stage" in line
    assert not (tmp_path / "state" / "jobs").exists() or not any((tmp_path / "state" / "jobs").iterdir())


def test_the_preset_picks_two_stage_only_for_ltx2_3_distilled_from_1280_px_wide(tmp_path: Path):
    settings = load_settings(environ={"HOME": str(tmp_path)})
    assert settings.families["2.3"].distilled.two_stage_min_width == 1280
    picks = {
        (name, schedule, width): settings.preset_pipeline(name, schedule, width, 1088)
        for name in ("2.0", "2.3")
        for schedule in ("distilled", "default")
        for width in (768, 1216, 1280, 1920)
    }
    two_stage = {key for key, pipeline in picks.items() if pipeline == "two-stage"}
    assert two_stage == {("2.3", "distilled", 1280), ("2.3", "distilled", 1920)}


def test_a_size_two_stage_cannot_take_defaults_to_one_stage_instead_of_an_error(tmp_path: Path):
    """1280x736 is a valid one-stage size (multiples of 32) but not a two-stage one (64): the preset's
    default must not turn it into a refusal; asked for explicitly, two-stage still refuses it."""
    settings = load_settings(environ={"HOME": str(tmp_path)})
    assert settings.preset_pipeline("2.3", "distilled", 1280, 736) == "one-stage"
    assert settings.preset_pipeline("2.3", "distilled", 1344, 768) == "two-stage"
    with pytest.raises(SpecError, match="two-stage needs a multiple of 64"):
        JobSpec.from_dict(
            {"prompt": "x", "model": "m", "width": 1280, "height": 736, "num_frames": 9, "steps": 8, "seed": 1,
             "pipeline": "two-stage"}
        )  # fmt: skip


def test_build_spec_defaults_the_pipeline_from_the_preset_and_a_flag_overrides_it(
    hf_home: Path, tiny_23_model_dir: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    settings = load_settings(environ={"HOME": str(tmp_path)})
    wide = {"prompt": "x", "model": TINY_REPO_IDS["2.3"], "width": 1280, "height": 704}
    assert build_spec(wide, settings).spec.pipeline == "two-stage"
    assert build_spec({**wide, "pipeline": "one-stage"}, settings).spec.pipeline == "one-stage"
    assert build_spec({**wide, "width": 1216}, settings).spec.pipeline == "one-stage"
    assert build_spec({**wide, "model": TINY_REPO_IDS["2.0"]}, settings).spec.pipeline == "one-stage"


def test_a_cached_tiny_model_of_an_older_revision_is_rebuilt_with_its_upsampler(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    """Revision 1 of the tiny models had no latent_upsampler; a cache holding it gets the current one."""
    old = older_tiny_cache(tmp_path, monkeypatch, "2.0", "1")
    shutil.copytree(tiny_model_dir, old, ignore=shutil.ignore_patterns("latent_upsampler"))
    rebuilt = ensure_tiny_model(TINY_REPO_IDS["2.0"])
    assert rebuilt.revision == TINY_REVISION != old.name
    assert (rebuilt.path / "latent_upsampler" / "config.json").is_file()
    assert (old / "model_index.json").is_file()  # jobs recorded with it keep it


def older_tiny_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, family: str, revision: str) -> Path:
    """The snapshot folder of an older tiny build (revision `0…0<revision>`, left for the caller to
    fill), made the cache's `main` in an HF_HOME of the test's own."""
    repo = tmp_path / "hub" / ("models--" + TINY_REPO_IDS[family].replace("/", "--"))
    old = "0" * 39 + revision
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(old)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    return repo / "snapshots" / old


def test_a_cached_2_3_tiny_model_of_revision_2_is_rebuilt_with_ltx2_3s_vae_layout(
    tiny_model_dir: Path, tiny_23_model_dir: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    """Revision 2 gave every family 2.0's video VAE; a cache holding that 2.3 build gets revision 3's."""
    old = older_tiny_cache(tmp_path, monkeypatch, "2.3", "2")
    shutil.copytree(tiny_23_model_dir, old, ignore=shutil.ignore_patterns("vae"))
    shutil.copytree(tiny_model_dir / "vae", old / "vae")
    rebuilt = ensure_tiny_model(TINY_REPO_IDS["2.3"])
    assert rebuilt.revision == TINY_REVISION != old.name
    vae_config = json.loads((rebuilt.path / "vae" / "config.json").read_text())
    assert "temporal" in vae_config["upsample_type"] and vae_config["decoder_spatial_padding_mode"] == "zeros"


def test_loras_act_in_both_stages_and_scale_zero_reproduces_the_base_exactly(
    tiny_model_dir: Path,
    tmp_path: Path,
    lora_files: dict[str, Path],  # noqa: F811
):
    request = {"num_frames": 9, "pipeline": "two-stage", "width": 128, "height": 128}
    base = encode(tiny_model_dir, tmp_path, "base", **request)
    lora = {"source": str(lora_files["original"])}
    zero = encode(tiny_model_dir, tmp_path, "zero", loras=[{**lora, "scale": 0.0}], **request)
    full = encode(tiny_model_dir, tmp_path, "full", loras=[{**lora, "scale": 1.0}], **request)
    assert torch.equal(zero["video"], base["video"]) and torch.equal(zero["audio"], base["audio"])
    assert max_diff(full["video"], base["video"]) > 1e-3


def test_two_stage_jobs_of_one_group_share_the_upsampler_and_match_jobs_run_alone(tiny_model_dir: Path, tmp_path: Path):
    request = {"num_frames": 9, "pipeline": "two-stage", "width": 128, "height": 128}
    shared: dict = {}
    grouped = [encode(tiny_model_dir, tmp_path, f"g{seed}", shared, seed=seed, **request) for seed in (1, 2)]
    upsampler = shared["latent_upsampler"]
    alone = encode(tiny_model_dir, tmp_path, "alone", seed=2, **request)
    assert shared["latent_upsampler"] is upsampler
    assert torch.equal(grouped[1]["video"], alone["video"]) and torch.equal(grouped[1]["audio"], alone["audio"])
    assert max_diff(grouped[0]["video"], grouped[1]["video"]) > 1e-3


def test_nag_guides_stage_1_only_and_adds_no_transformer_call(tiny_model_dir: Path, tmp_path: Path):
    request = {"num_frames": 9, "pipeline": "two-stage", "width": 128, "height": 128, "negative_prompt": "blurry"}
    plain = encode(tiny_model_dir, tmp_path, "plain", **request)
    guided = encode(tiny_model_dir, tmp_path, "nag", nag_scale=11.0, **request)
    (job_dir,) = (tmp_path / "nag").iterdir()
    _, metadata = read_latents(job_dir / LATENTS_FILE)
    assert json.loads(metadata["stage_calls"]) == [8, 3]
    assert max_diff(guided["video"], plain["video"]) > 1e-3


# Dev two-stage: 2 dev steps with CFG at half size, then the 3 distilled steps with the stage-2 LoRA.
DEV_TWO_STAGE = {**TWO_STAGE, "schedule": "default", "steps": 2, "guidance_scale": 3.0}
# The dev families of the tiny models whose dev preset names a stage-2 LoRA (2.5 names none).
DEV_FAMILIES = ("2.0", "2.3")


def hf_home_with_tiny_models(hf_home: Path, home: Path, families: tuple[str, ...]) -> Path:
    """A fresh HF_HOME whose hub cache links the session's tiny models of `families` (built already),
    so a stage-2 LoRA written into it stays out of the session's cache."""
    (home / "hub").mkdir(parents=True)
    for name in families:
        repo = "models--" + TINY_REPO_IDS[name].replace("/", "--")
        (home / "hub" / repo).symlink_to(hf_home / "hub" / repo, target_is_directory=True)
    return home


@pytest.fixture(scope="module")
def dev_hf_home(hf_home: Path, tiny_model_dir: Path, tiny_23_model_dir: Path, tmp_path_factory) -> Path:
    """The tiny 2.0 and 2.3 models plus each family's tiny stage-2 LoRA, under the repo ids and file
    names of config/defaults.toml, in an HF_HOME of these tests' own."""
    home = hf_home_with_tiny_models(hf_home, tmp_path_factory.mktemp("dev-hf-home"), DEV_FAMILIES)
    for name in DEV_FAMILIES:
        dev = load_settings(environ={"LTX2_CONFIG": ""}).families[name].dev
        write_tiny_stage2_lora_to_hf_cache(home / "hub", dev.stage2_lora_repo, dev.stage2_lora_file)
    return home


def stage2_lora_file(hf_home: Path, family: str) -> Path:
    """The tiny stage-2 LoRA of `family` in `hf_home`'s cache (the snapshot's file under its repo id)."""
    dev = load_settings(environ={"HOME": "/nonexistent"}).families[family].dev
    repo = hf_home / "hub" / ("models--" + dev.stage2_lora_repo.replace("/", "--"))
    (path,) = (repo / "snapshots").glob(f"*/{dev.stage2_lora_file}")
    return path


@pytest.fixture(scope="module", params=DEV_FAMILIES)
def dev_family(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def dev_two_stage(
    dev_family: str, dev_hf_home: Path, tmp_path_factory: pytest.TempPathFactory, fork_server: ForkServer
) -> dict:
    """The staged dev two-stage job (real workers) and diffusers' compositions with and without the LoRA."""
    model_dir = dev_hf_home / "hub" / ("models--" + TINY_REPO_IDS[dev_family].replace("/", "--"))
    (model_dir,) = (model_dir / "snapshots").iterdir()
    lora = stage2_lora_file(dev_hf_home, dev_family)
    job = run_staged(
        model_dir, tmp_path_factory.mktemp("dev-two-stage"), fork_server, stage2_lora=lora, **DEV_TWO_STAGE
    )
    compose = {"output_types": ("latent",)}
    with_lora = reference_two_stage(load_reference(model_dir, "default"), model_dir, job.spec, dev_family,
                                    stage2_lora=lora, **compose)  # fmt: skip
    without = reference_two_stage(load_reference(model_dir, "default"), model_dir, job.spec, dev_family,
                                  stage2_scheduler=True, **compose)  # fmt: skip
    return {"job": job, "lora": lora, "reference": with_lora, "without_lora": without}


def test_dev_two_stage_latents_equal_diffusers_recipe_with_the_distilled_lora(dev_two_stage: dict):
    job = dev_two_stage["job"]
    tensors, metadata = read_latents(job.path / LATENTS_FILE, job.spec.latents_digest())
    video, audio = dev_two_stage["reference"]["latent"]
    assert tensors["video"].shape == video.shape == (1, 4, 5, 32, 32)
    assert max_diff(tensors["video"], video) <= TOLERANCE
    assert max_diff(tensors["audio"], audio) <= TOLERANCE
    stage1, _ = read_latents(job.path / STAGE1_LATENTS_FILE, job.spec.latents_digest())
    assert max_diff(stage1["video"], dev_two_stage["reference"]["stage1"][0]) <= TOLERANCE
    assert json.loads(metadata["stage_calls"])[1] == 3 and metadata["stage1_reused"] == "false"
    assert json.loads(metadata["stage2_lora"])["source"] == str(dev_two_stage["lora"])


def test_dev_two_stage_without_the_lora_would_differ(dev_two_stage: dict):
    """The recipe less load_lora_weights gives other latents, so the parity above needs the LoRA."""
    tensors, _ = read_latents(dev_two_stage["job"].path / LATENTS_FILE)
    video, audio = dev_two_stage["without_lora"]["latent"]
    assert max_diff(dev_two_stage["without_lora"]["stage1"][0], dev_two_stage["reference"]["stage1"][0]) == 0
    assert max_diff(tensors["video"], video) > 1e-3


def test_dev_two_stage_job_json_and_sidecar_record_the_stage_2_lora(dev_two_stage: dict):
    job = JobDir.load(dev_two_stage["job"].path)
    lora = dev_two_stage["lora"]
    assert job.record.stage2_lora.path == str(lora.resolve())
    assert job.record.stage2_lora.source == str(lora) and job.record.stage2_lora.revision == "local"
    sidecar = json.loads(Path(job.record.output).with_suffix(".json").read_text())
    assert sidecar["stage2_lora"]["source"] == str(lora) and "path" not in sidecar["stage2_lora"]
    assert sidecar["stage2_lora"]["scale"] == 1.0


def test_missing_stage_2_lora_is_refused_before_any_job_naming_the_flag_repo_and_file(
    hf_home: Path, tiny_model_dir: Path, tmp_path: Path
):
    env = ltx2_environment(hf_home_with_tiny_models(hf_home, tmp_path / "hf", ("2.0",)), tmp_path)
    args = ["generate", "--prompt", "x", "--model", TINY_REPO_IDS["2.0"], "--width", "128", "--height", "128",
            "--num-frames", "9", "--steps", "2", "--schedule", "default", "--pipeline", "two-stage"]  # fmt: skip
    result = run_ltx2(args, env)
    missing_lora = run_ltx2(["generate", "--prompt", "x", "--model", TINY_REPO_IDS["2.0"], "--lora", "a/b"], env)
    assert result.returncode == missing_lora.returncode == ExitCode.MODEL_NOT_FOUND
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(
        "ltx2: error: --stage2-lora: 'Lightricks/LTX-2' is neither a local file nor in the Hugging Face"
    )
    assert line.endswith("hf download Lightricks/LTX-2 ltx-2-19b-distilled-lora-384.safetensors")
    assert not (tmp_path / "state" / "jobs").exists() or not any((tmp_path / "state" / "jobs").iterdir())
    named = run_ltx2([*args, "--stage2-lora", str(tmp_path / "absent.safetensors")], env)
    assert named.returncode == ExitCode.MODEL_NOT_FOUND
    assert f"--stage2-lora: {tmp_path / 'absent.safetensors'} does not exist" in named.stderr


def test_dev_two_stage_of_ltx2_5_is_refused_naming_the_family_and_the_flag(
    hf_home: Path, tiny_25_model_dir: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    settings = load_settings(environ={"HOME": str(tmp_path)})
    request = {"prompt": "x", "model": TINY_REPO_IDS["2.5"], "width": 128, "height": 128, "num_frames": 9,
               "schedule": "default", "steps": 2, "pipeline": "two-stage"}  # fmt: skip
    with pytest.raises(SpecError, match="none is known for LTX-2.5") as caught:
        build_spec(request, settings)
    assert caught.value.flag == "--pipeline" and "--stage2-lora" in str(caught.value)
    assert build_spec({**request, "pipeline": None}, settings).spec.pipeline == "one-stage"  # never a default


def test_a_group_of_dev_two_stage_jobs_loads_each_transformer_once_and_matches_jobs_run_alone(
    dev_hf_home: Path, tmp_path: Path
):
    batch = tmp_path / "clips.toml"
    batch.write_text(
        f'[defaults]\nmodel = "{TINY_REPO_IDS["2.0"]}"\npipeline = "two-stage"\nschedule = "default"\nsteps = 2\n'
        "guidance_scale = 3.0\nwidth = 128\nheight = 128\nnum_frames = 9\n"
        '[[clips]]\nprompt = "a lighthouse"\nseed = 1\nname = "a"\n'
        '[[clips]]\nprompt = "a harbour at night"\nseed = 2\nname = "b"\n'
    )
    latents = {}
    runs = (("grouped", "8"), ("alone", "1"))
    for run, _ in runs:
        (tmp_path / run).mkdir(exist_ok=True)  # --output-dir makes only its last folder, never a parent
    commands = [
        (
            ["batch", str(batch), "--quiet", "--output-dir", str(tmp_path / run / "out")],
            {**ltx2_environment(dev_hf_home, tmp_path / run), "LTX2_GROUP_SIZE": group_size},
        )
        for run, group_size in runs
    ]
    for (run, _), result in zip(runs, run_ltx2_two_at_a_time(commands), strict=True):  # independent: side by side
        assert result.returncode == 0, result.stderr
        jobs = sorted((tmp_path / run / "state" / "jobs").iterdir(), key=lambda d: JobDir.load(d).spec.seed)
        latents[run] = [read_latents(job / LATENTS_FILE) for job in jobs]
    log = (jobs[0] / "logs" / "encode_diffuse-1.log").read_text()  # the alone run: one process per job
    assert log.count("load transformer 0/0") == log.count("load transformer with stage-2 distilled LoRA") == 1
    grouped_jobs = list((tmp_path / "grouped" / "state" / "jobs").iterdir())
    log = (grouped_jobs[0] / "logs" / "encode_diffuse-1.log").read_text()  # the group's one process
    assert log.count("job started") == 2
    assert log.count("load transformer 0/0") == log.count("load transformer with stage-2 distilled LoRA") == 1
    assert log.index("write stage 1 latents") < log.rindex("write stage 1 latents") < log.index("job started 1/2")

    def evidence() -> list[str]:  # the group encoded its prompts in its worker, the alone run before its jobs
        states = [tmp_path / run / "state" for run, _ in runs]
        logs = [log for state in states for log in sorted(state.glob("jobs/*/logs/encode_diffuse-*.log"))]
        return [*kernel_lines(logs), f"unequal prompt embeddings: {unequal_embeddings(*states)}"]

    for (grouped, metadata), (alone, _) in zip(latents["grouped"], latents["alone"], strict=True):
        check_equal_latents(grouped, alone, evidence, "a grouped job and the same job alone")  # tests/cpu_drift.py
        assert metadata["stage1_reused"] == "false"
    assert max_diff(latents["grouped"][0][0]["video"], latents["grouped"][1][0]["video"]) > 1e-3


def test_the_cli_flags_and_the_gateway_field_give_the_stage2_lora_spec_field(tmp_path: Path):
    from orchestrator.gateway.video_requests import RequestError, parse_video_request
    from orchestrator.run.jobspec import spec_request

    generate = build_parser()._subparsers._group_actions[0].choices["generate"]
    args = generate.parse_args(["--prompt", "x", "--stage2-lora", "a/b", "--stage2-lora-weight-name", "c.safetensors"])
    assert spec_request(vars(args))["stage2_lora"] == {"source": "a/b", "weight_name": "c.safetensors"}
    with pytest.raises(SpecError, match="needs --stage2-lora") as caught:
        spec_request(vars(generate.parse_args(["--prompt", "x", "--stage2-lora-weight-name", "c.safetensors"])))
    assert caught.value.flag == "--stage2-lora-weight-name"
    settings = load_settings(environ={"HOME": str(tmp_path)})
    field = '{"name": "Lightricks/LTX-2", "weight_name": "ltx-2-19b-distilled-lora-384.safetensors"}'
    spec = parse_video_request({"prompt": "x", "stage2_lora": field}, settings).spec
    assert spec["stage2_lora"] == {
        "source": "Lightricks/LTX-2",
        "weight_name": "ltx-2-19b-distilled-lora-384.safetensors",
    }
    assert parse_video_request({"prompt": "x", "stage2_lora": "a/b"}, settings).spec["stage2_lora"] == {"source": "a/b"}
    with pytest.raises(RequestError, match="paths are not accepted") as refused:
        parse_video_request({"prompt": "x", "stage2_lora": "/tmp/evil.safetensors"}, settings)
    assert refused.value.param == "stage2_lora"
