"""Model families: read from a checkpoint's own configs, each with its guidance preset.

Detection reads only JSON configs, so most checks here copy the tiny models' configs into
folders named to mislead; running the families end to end is in tests/test_parity.py.
"""

from __future__ import annotations

import inspect
import json
import shutil
from pathlib import Path

import pytest
from conftest import ltx2_environment, run_ltx2
from diffusers import LTX2VideoTransformer3DModel

from config.settings import ConfigError, load_settings
from orchestrator.run.jobspec import build_spec
from protocol.errors import ExitCode
from protocol.families import (
    MODEL_INDEX,
    TRANSFORMER_CONFIG,
    TRANSFORMER_DEFAULTS,
    VOCODER_CONFIG,
    UnsupportedCheckpoint,
    detect_family,
)
from protocol.model_ids import TINY_REPO_IDS

CONFIGS = (MODEL_INDEX, TRANSFORMER_CONFIG, VOCODER_CONFIG)


def copy_configs(source: Path, target: Path) -> Path:
    """A folder holding only `source`'s config files (no weights): all detection reads."""
    for name in CONFIGS:
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / name, target / name)
    return target


def edit_config(folder: Path, name: str, **changes: object) -> None:
    path = folder / name
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_family_comes_from_the_configs_not_from_the_folder_name(
    tiny_model_dir: Path, tiny_23_model_dir: Path, tmp_path: Path
):
    looks_new = copy_configs(tiny_model_dir, tmp_path / "LTX-2.3-Distilled-Diffusers")
    looks_old = copy_configs(tiny_23_model_dir, tmp_path / "LTX-2-19b-distilled")
    old, new = detect_family(looks_new), detect_family(looks_old)
    assert (old.name, old.vocoder, old.audio_sample_rate, old.cross_timestep) == ("2.0", "LTX2Vocoder", 16000, False)
    assert (new.name, new.vocoder, new.audio_sample_rate, new.cross_timestep) == (
        "2.3",
        "LTX2VocoderWithBWE",
        48000,
        True,
    )
    assert (old.stg_blocks, new.stg_blocks) == ((29,), (28,))


def test_the_sample_rate_is_read_from_the_vocoder_config(tiny_23_model_dir: Path, tmp_path: Path):
    folder = copy_configs(tiny_23_model_dir, tmp_path / "m")
    edit_config(folder, VOCODER_CONFIG, output_sampling_rate=44100)
    assert detect_family(folder).audio_sample_rate == 44100


def test_flags_an_older_converter_left_out_take_diffusers_defaults(tiny_model_dir: Path, tmp_path: Path):
    folder = copy_configs(tiny_model_dir, tmp_path / "m")
    config = json.loads((folder / TRANSFORMER_CONFIG).read_text())
    for key in TRANSFORMER_DEFAULTS:
        config.pop(key, None)
    (folder / TRANSFORMER_CONFIG).write_text(json.dumps(config))
    assert detect_family(folder).name == "2.0"


def test_transformer_defaults_are_those_of_the_installed_diffusers():
    signature = inspect.signature(LTX2VideoTransformer3DModel.__init__).parameters
    assert {key: signature[key].default for key in TRANSFORMER_DEFAULTS} == TRANSFORMER_DEFAULTS


def test_a_checkpoint_of_no_supported_family_is_named_with_the_nearest_difference(
    tiny_23_model_dir: Path, tmp_path: Path
):
    folder = copy_configs(tiny_23_model_dir, tmp_path / "ltx-2.3-without-ff-bias")
    edit_config(folder, TRANSFORMER_CONFIG, ff_bias=False)
    with pytest.raises(UnsupportedCheckpoint) as caught:
        detect_family(folder)
    message = str(caught.value)
    assert message.startswith("--model: ") and "\n" not in message
    assert MODEL_INDEX in message and TRANSFORMER_CONFIG in message and "LTX-2.0, LTX-2.3" in message
    assert "nearest is LTX-2.3, which needs ff_bias=True (found False)" in message


def test_generate_with_an_unsupported_checkpoint_exits_2_in_one_line(
    hf_home: Path, tiny_23_model_dir: Path, tmp_path: Path
):
    folder = copy_configs(tiny_23_model_dir, tmp_path / "gemma4")
    index = json.loads((folder / MODEL_INDEX).read_text())
    index["text_encoder"] = ["transformers", "Gemma4UnifiedForConditionalGeneration"]
    (folder / MODEL_INDEX).write_text(json.dumps(index))
    result = run_ltx2(["generate", "--prompt", "x", "--model", str(folder)], ltx2_environment(hf_home, tmp_path))
    assert result.returncode == ExitCode.INVALID_INPUT
    (line,) = result.stderr.strip().splitlines()
    assert f"{folder} is no LTX-2 checkpoint" in line and "LTX-2.0, LTX-2.3" in line
    assert "text_encoder=Gemma3ForConditionalGeneration (found Gemma4UnifiedForConditionalGeneration)" in line
    assert not (tmp_path / "state" / "jobs").exists() or not any((tmp_path / "state" / "jobs").iterdir())


def test_generate_with_a_checkpoint_missing_its_transformer_config_exits_4(
    hf_home: Path, tiny_model_dir: Path, tmp_path: Path
):
    folder = copy_configs(tiny_model_dir, tmp_path / "partial")
    (folder / TRANSFORMER_CONFIG).unlink()
    result = run_ltx2(["generate", "--prompt", "x", "--model", str(folder)], ltx2_environment(hf_home, tmp_path))
    assert result.returncode == ExitCode.MODEL_NOT_FOUND
    assert TRANSFORMER_CONFIG in result.stderr


def test_each_family_preset_switches_guidance_by_schedule(tmp_path: Path):
    settings = load_settings(environ={"HOME": str(tmp_path)})
    distilled = settings.preset_fields("/some/local/folder", "2.3")
    dev = settings.preset_fields("/some/local/folder", "2.3", "default")
    assert (distilled["steps"], distilled["schedule"], distilled["stg_scale"], distilled["modality_scale"]) == (
        8,
        "distilled",
        0.0,
        1.0,
    )
    assert distilled["audio_guidance_scale"] is None and distilled["guidance_scale"] == 1.0
    expected_dev = {"guidance_scale": 3.0, "audio_guidance_scale": 7.0, "stg_scale": 1.0, "modality_scale": 3.0}
    assert {key: dev[key] for key in expected_dev} == expected_dev
    assert (dev["guidance_rescale"], dev["steps"], dev["schedule"]) == (0.7, 30, "default")
    assert settings.preset_fields("/some/local/folder", "2.0", "default")["stg_scale"] == 0.0


def test_a_model_preset_overrides_its_family_preset(tmp_path: Path):
    settings = load_settings(environ={"HOME": str(tmp_path)})
    fields = settings.preset_fields("diffusers/LTX-2.3-Diffusers", "2.3")
    assert (fields["steps"], fields["guidance_scale"], fields["audio_guidance_scale"]) == (30, 3.0, 7.0)
    assert (fields["width"], fields["height"], fields["num_frames"]) == (768, 512, 121)


def test_a_config_file_may_change_one_value_of_a_family_preset(tmp_path: Path):
    config = tmp_path / "config.toml"
    config.write_text('[families."2.3".dev]\nstg_scale = 0.5\n')
    settings = load_settings(environ={"LTX2_CONFIG": str(config)})
    assert settings.families["2.3"].dev.stg_scale == 0.5
    assert settings.families["2.3"].dev.audio_guidance_scale == 7.0
    config.write_text('[families."2.3".dev]\nstg_sclae = 0.5\n')
    with pytest.raises(ConfigError, match="stg_sclae"):
        load_settings(environ={"LTX2_CONFIG": str(config)})


def test_the_tiny_2_3_model_gets_its_family_preset_from_its_configs(
    hf_home: Path, tiny_23_model_dir: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    settings = load_settings(environ={"HOME": str(tmp_path)})
    built = build_spec({"prompt": "x", "model": TINY_REPO_IDS["2.3"], "schedule": "default", "steps": 2}, settings)
    assert built.model.path == tiny_23_model_dir and built.model.family.name == "2.3"
    spec = built.spec
    assert (spec.guidance_scale, spec.audio_guidance_scale, spec.stg_scale, spec.modality_scale) == (1.0, 7.0, 1.0, 3.0)
    assert spec.uses_cfg  # audio CFG 7 alone runs CFG, so the negative prompt is encoded


def test_tiny_model_without_family_builds_ltx2_0(tmp_path: Path, hf_home: Path):
    result = run_ltx2(["tiny-model", str(tmp_path / "tiny")], ltx2_environment(hf_home, tmp_path))
    assert result.returncode == 0, result.stderr
    assert detect_family(tmp_path / "tiny").name == "2.0"


def test_ltx2_5_is_read_from_its_gemma_4_encoder_and_transformer_flags(tiny_25_model_dir: Path, tmp_path: Path):
    family = detect_family(copy_configs(tiny_25_model_dir, tmp_path / "LTX-2.3-Distilled-Diffusers"))
    assert (family.name, family.label) == ("2.5", "LTX-2.5")
    assert family.text_encoder == "Gemma4UnifiedForConditionalGeneration"
    assert (family.vocoder, family.audio_sample_rate) == ("LTX2VocoderWithBWE", 48000)
    assert (family.stg_blocks, family.cross_timestep) == ((28,), True)


def test_a_2_5_checkpoint_missing_its_static_prompt_flag_names_ltx2_5_as_nearest(
    tiny_25_model_dir: Path, tmp_path: Path
):
    folder = copy_configs(tiny_25_model_dir, tmp_path / "m")
    config = json.loads((folder / TRANSFORMER_CONFIG).read_text())
    del config["use_prompt_adaln_single"]  # an older converter: diffusers then builds the timestep MLP (True)
    (folder / TRANSFORMER_CONFIG).write_text(json.dumps(config))
    with pytest.raises(UnsupportedCheckpoint) as caught:
        detect_family(folder)
    message = str(caught.value)
    assert "LTX-2.0, LTX-2.3, LTX-2.5" in message
    assert "nearest is LTX-2.5, which needs use_prompt_adaln_single=False (found True)" in message


def test_ltx2_5_presets_run_one_stage_even_for_a_wide_distilled_clip(tmp_path: Path):
    settings = load_settings(environ={"HOME": str(tmp_path)})
    distilled = settings.preset_fields("/some/local/folder", "2.5")
    assert (distilled["steps"], distilled["schedule"], distilled["guidance_scale"], distilled["stg_scale"]) == (
        8,
        "distilled",
        1.0,
        0.0,
    )
    assert settings.preset_pipeline("2.5", "distilled", 1280, 704) == "one-stage"
    dev = settings.preset_fields("/some/local/folder", "2.5", "default")
    expected_dev = {"guidance_scale": 3.0, "audio_guidance_scale": 7.0, "stg_scale": 1.0, "modality_scale": 3.0}
    assert {key: dev[key] for key in expected_dev} == expected_dev
    assert (dev["guidance_rescale"], dev["steps"]) == (0.7, 30)


# The real LTX-2.3 video VAE's kinds of blocks (bench/gpu_configs.VAE_CONFIG_2_3, from diffusers' conversion script).
LTX2_3_VAE_BLOCKS = {
    "upsample_type": ("spatiotemporal", "spatiotemporal", "temporal", "spatial"),
    "upsample_factor": (2, 2, 1, 2),
    "upsample_residual": (False, False, False, False),
    "down_block_types": ("LTX2VideoDownBlock3D",) * 4,
    "downsample_type": ("spatial", "temporal", "spatiotemporal", "spatiotemporal"),
}


def test_the_2_3_and_2_5_tiny_video_vaes_have_ltx2_3s_decoder_layout(
    tiny_model_dir: Path, tiny_23_model_dir: Path, tiny_25_model_dir: Path
):
    """2.3's kinds of decoder blocks (bench/gpu_configs.VAE_CONFIG_2_3) at the tiny model's 4x, so a build
    cannot fall back to 2.0's layout unnoticed; 2.0 keeps its own."""
    import torch
    from diffusers import AutoencoderKLLTX2Video

    def vae_config(model_dir: Path) -> dict:
        return json.loads((model_dir / "vae" / "config.json").read_text())

    two_three, two_five, two_oh = (vae_config(d) for d in (tiny_23_model_dir, tiny_25_model_dir, tiny_model_dir))
    assert two_five == two_three
    assert {"temporal", "spatial"} <= set(two_three["upsample_type"])
    assert two_three["decoder_spatial_padding_mode"] == two_three["encoder_spatial_padding_mode"] == "zeros"
    for key, real in LTX2_3_VAE_BLOCKS.items():
        assert tuple(two_three[key]) == real, key
    assert set(two_oh["upsample_type"]) == {"spatiotemporal"} and two_oh["decoder_spatial_padding_mode"] == "reflect"

    vae = AutoencoderKLLTX2Video.from_pretrained(tiny_23_model_dir, subfolder="vae").eval()
    strides = [block.upsamplers[0].stride for block in vae.decoder.up_blocks if block.upsamplers is not None]
    assert sorted(strides) == [(1, 2, 2), (2, 1, 1), (2, 2, 2)]  # spatial, temporal and spatiotemporal
    assert (vae.spatial_compression_ratio, vae.temporal_compression_ratio) == (4, 4)
    assert not torch.equal(vae.latents_mean, torch.zeros(4)) and not torch.equal(vae.latents_std, torch.ones(4))
    with torch.no_grad():
        for latent_frames in (1, 2, 5):  # the causal first frame: F latent frames -> 4 (F - 1) + 1 frames
            decoded = vae.decode(torch.randn(1, 4, latent_frames, 4, 6), return_dict=False)[0]
            assert decoded.shape == (1, 3, 4 * (latent_frames - 1) + 1, 16, 24)
