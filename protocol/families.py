"""Which LTX-2 family a diffusers checkpoint belongs to, read from its own configs, never its name.

A folder called `LTX-2.3-finetune` may hold LTX-2.0 weights, and a repo id says nothing about a
local copy, so the family is read from what diffusers itself builds the models from:
`model_index.json` (the vocoder and text encoder classes) and `transformer/config.json` (the
flags that switch on 2.3's gated attention, cross-attention modulation and per-modality prompt
projections, and 2.5's bias-free feed-forward and static prompt modulation). Torch-free: the
orchestrator decides a job's family before any worker starts.

A family is a row of FAMILIES. Its guidance *preferences* (steps, CFG, STG scale...) are data in
config/defaults.toml `[families]`; the facts here are what the trained model needs whatever the
preference: which block STG perturbs and whether the cross-modality timestep modulates the a2v/v2a
cross-attention.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from protocol.errors import ModelNotFound
from protocol.spec_rules import SpecError

MODEL_INDEX = "model_index.json"
TRANSFORMER_CONFIG = "transformer/config.json"
VOCODER_CONFIG = "vocoder/config.json"
VIDEO_VAE_CONFIG = "vae/config.json"
# AutoencoderKLLTX2Video.__init__'s defaults (diffusers 0.42.1) for a config that leaves these out.
VAE_DEFAULT_PATCH_SIZE_T = 1
# diffusers AutoencoderKLLTX2Video's default spatial patch size (its `patch_size=4`).
VAE_DEFAULT_PATCH_SIZE = 4
VAE_DEFAULT_SCALING = (True, True, True, True)
# The latent upsampler of two-stage runs (LTX2LatentUpsamplerModel): a subfolder of the checkpoint that
# model_index.json does not list (Lightricks/LTX-2 and diffusers' examples load it by subfolder).
LATENT_UPSAMPLER = "latent_upsampler"
# LTX-2.5's diffusion video decoder (diffusers' LTX2VideoDiffusionDecoderModel), a subfolder of the
# checkpoint under the name diffusers' modular 2.5 pipeline gives the component; `--decoder diffusion`
# decodes with it (services/diffusion_decode.py).
DIFFUSION_DECODER = "diffusion_decoder"
# The LTX2VideoTransformer3DModel.__init__ defaults (diffusers 0.42.1) of the flags FAMILIES look at:
# a config written by an older converter leaves out flags that did not exist yet, and diffusers then
# builds the model with these values (tests/test_families.py checks them against the signature).
TRANSFORMER_DEFAULTS: Mapping[str, Any] = {
    "gated_attn": False,
    "cross_attn_mod": False,
    "audio_gated_attn": False,
    "audio_cross_attn_mod": False,
    "use_prompt_embeddings": True,
    "perturbed_attn": False,
    "ff_bias": True,
    "use_prompt_adaln_single": True,
}


@dataclasses.dataclass(frozen=True)
class FamilySignature:
    """What a family's checkpoint looks like, and the facts its trained model needs at inference."""

    name: str  #: short name used in config and job.json ("2.3")
    label: str  #: what a user reads ("LTX-2.3")
    vocoder: str  #: model_index.json class of `vocoder`
    text_encoder: str  #: model_index.json class of `text_encoder`
    transformer: Mapping[str, Any]  #: transformer/config.json flags that must hold (absent: TRANSFORMER_DEFAULTS)
    stg_blocks: tuple[int, ...]  #: `spatio_temporal_guidance_blocks`: the block STG perturbs
    cross_timestep: bool  #: `use_cross_timestep` of LTX2Pipeline.__call__
    #: the family's checkpoints ship a diffusion video decoder (DIFFUSION_DECODER); a given checkpoint
    #: may still lack the folder, which is what `--decoder diffusion` checks
    diffusion_decoder: bool = False


# Transformer flags: diffusers' LTX-2 conversion configs (get_ltx2_transformer_config, versions "2.0" and
# "2.3", in the huggingface/diffusers repository; not shipped in the 0.42.1 wheel).
# stg_blocks: LTX2Pipeline.__call__'s docstring (0.42.1), `spatio_temporal_guidance_blocks`: "[29] is
# recommended for LTX-2.0 and [28] is recommended for LTX-2.3".
# cross_timestep: the same docstring, `use_cross_timestep`: "True is the LTX-2.3/2.5 behavior; False is the
# legacy LTX-2.0 behavior".
#
# LTX-2.5, from the installed diffusers 0.42.1 and transformers 5.24 (the conversion config for "2.5" is not
# in the wheel, so only what the installed code states is required here):
# - text_encoder: LTX2Pipeline.__init__ takes `Gemma3ForConditionalGeneration | Gemma4UnifiedForConditionalGeneration`,
#   and pipelines/ltx2/utils.py `resolve_default_image_crf`: "LTX-2.5 uses a Gemma 4 (`gemma4_unified` / `gemma4`)
#   text encoder". LTX2Pipeline._get_gemma_prompt_embeds has no branch on the encoder's type: both are encoded alike.
# - ff_bias=False: LTX2VideoTransformer3DModel's docstring, `ff_bias`: "`False` for LTX-2.5".
# - use_prompt_adaln_single=False with cross_attn_mod: transformer_ltx2.py, "When `use_prompt_adaln_single=False`
#   (LTX-2.5 KV-cacheable cross-attention), this MLP is dropped so the cross-attention K/V modulation becomes
#   timestep-independent (static per-layer table only)"; that table exists only with cross_attn_mod, so 2.5 sets it.
# - Not confirmed by the installed code, taken from 2.3 (the generation 2.5 follows): gated_attn, audio_gated_attn,
#   audio_cross_attn_mod, use_prompt_embeddings=False, perturbed_attn; the vocoder class LTX2VocoderWithBWE (the
#   pipeline accepts both vocoders; vocoder.py calls the BWE one the "LTX-2.X vocoder"); stg_blocks [28] (the
#   LTX-2.5 modular blocks, modular_pipelines/ltx2/modular_blocks_ltx25.py, reuse LTX2AutoCoreDenoiseStep, whose
#   guider defaults to spatio_temporal_guidance_blocks=[28]; no docstring names a block for 2.5).
# - use_keyframes_abs_pos_embedding ("LTX-2.5 and later") is not required: its docstring calls the argument
#   optional and says omitting it "leaves the distilled forward path unchanged".
LTX_2_3_TRANSFORMER: Mapping[str, Any] = {
    "gated_attn": True,
    "cross_attn_mod": True,
    "audio_gated_attn": True,
    "audio_cross_attn_mod": True,
    "use_prompt_embeddings": False,
    "perturbed_attn": True,
    "ff_bias": True,
    "use_prompt_adaln_single": True,
}
FAMILIES: tuple[FamilySignature, ...] = (
    FamilySignature(
        name="2.0",
        label="LTX-2.0",
        vocoder="LTX2Vocoder",
        text_encoder="Gemma3ForConditionalGeneration",
        transformer={"cross_attn_mod": False, "audio_cross_attn_mod": False, "use_prompt_embeddings": True},
        stg_blocks=(29,),
        cross_timestep=False,
    ),
    FamilySignature(
        name="2.3",
        label="LTX-2.3",
        vocoder="LTX2VocoderWithBWE",
        text_encoder="Gemma3ForConditionalGeneration",
        transformer=LTX_2_3_TRANSFORMER,
        stg_blocks=(28,),
        cross_timestep=True,
    ),
    FamilySignature(
        name="2.5",
        label="LTX-2.5",
        vocoder="LTX2VocoderWithBWE",
        text_encoder="Gemma4UnifiedForConditionalGeneration",
        transformer={**LTX_2_3_TRANSFORMER, "ff_bias": False, "use_prompt_adaln_single": False},
        stg_blocks=(28,),
        cross_timestep=True,
        diffusion_decoder=True,
    ),
)
# Jobs recorded before families existed ran LTX-2.0 (the only family then supported).
LEGACY_FAMILY = "2.0"


class UnsupportedCheckpoint(SpecError):
    """The folder is a diffusers checkpoint, but of no family this version can run (exit 2)."""

    def __init__(self, message: str) -> None:
        super().__init__("model", message)


@dataclasses.dataclass(frozen=True)
class CheckpointFamily:
    """A checkpoint's family plus what was read from its configs; recorded in job.json."""

    name: str
    label: str
    vocoder: str
    text_encoder: str
    audio_sample_rate: int  #: the vocoder's `output_sampling_rate`: the rate of audio.wav and the MP4's AAC
    stg_blocks: tuple[int, ...]
    cross_timestep: bool

    def to_record(self) -> dict[str, Any]:
        """Plain data for job.json and the sidecar."""
        return {**dataclasses.asdict(self), "stg_blocks": list(self.stg_blocks)}

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> CheckpointFamily:
        """Read back what `to_record` wrote."""
        return cls(**{**record, "stg_blocks": tuple(record["stg_blocks"])})


def supported_labels() -> str:
    """ "LTX-2.0, LTX-2.3, LTX-2.5": for error messages and help."""
    return ", ".join(family.label for family in FAMILIES)


def family_named(name: str) -> FamilySignature:
    """The FAMILIES row called `name` (KeyError naming the known ones)."""
    for family in FAMILIES:
        if family.name == name:
            return family
    raise KeyError(f"unknown model family {name!r}; known: {', '.join(f.name for f in FAMILIES)}")


def detect_family(folder: Path) -> CheckpointFamily:
    """The family of the diffusers checkpoint in `folder`.

    Raises ModelNotFound when a config file is missing or unreadable (an incomplete download) and
    UnsupportedCheckpoint, one line naming the files read, when the configs match no family.
    """
    index = read_config(folder, MODEL_INDEX)
    transformer = read_config(folder, TRANSFORMER_CONFIG)
    seen = {
        "vocoder": component_class(index, "vocoder"),
        "text_encoder": component_class(index, "text_encoder"),
        **{key: transformer.get(key, default) for key, default in TRANSFORMER_DEFAULTS.items()},
    }
    mismatches = {family.name: differences(family, seen) for family in FAMILIES}
    match = next((family for family in FAMILIES if not mismatches[family.name]), None)
    if match is None:
        nearest = min(FAMILIES, key=lambda family: len(mismatches[family.name]))
        raise UnsupportedCheckpoint(
            f"{folder} is no LTX-2 checkpoint this version can run: its {MODEL_INDEX} and {TRANSFORMER_CONFIG}"
            f" match no supported family ({supported_labels()}); nearest is {nearest.label}, which needs"
            f" {mismatches[nearest.name][0]}"
        )
    return CheckpointFamily(
        name=match.name,
        label=match.label,
        vocoder=match.vocoder,
        text_encoder=match.text_encoder,
        audio_sample_rate=vocoder_sample_rate(folder),
        stg_blocks=match.stg_blocks,
        cross_timestep=match.cross_timestep,
    )


def differences(family: FamilySignature, seen: Mapping[str, Any]) -> list[str]:
    """What `seen` would need to be `family`, as 'key=value (found other)' phrases."""
    wanted = {"vocoder": family.vocoder, "text_encoder": family.text_encoder, **family.transformer}
    return [f"{key}={value} (found {seen[key]})" for key, value in wanted.items() if seen[key] != value]


def read_config(folder: Path, name: str) -> dict[str, Any]:
    """A JSON config of the checkpoint, or ModelNotFound naming it."""
    path = folder / name
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelNotFound(f"cannot read {path} ({exc}); is the model complete? re-download it") from None
    if not isinstance(data, dict):
        raise ModelNotFound(f"{path} is not a JSON object; re-download the model")
    return data


def component_class(index: Mapping[str, Any], name: str) -> str | None:
    """The class model_index.json records for component `name` (None if absent or optional)."""
    entry = index.get(name)
    return str(entry[1]) if isinstance(entry, list) and len(entry) == 2 and entry[1] else None


def vocoder_sample_rate(folder: Path) -> int:
    """The rate the vocoder's waveform comes out at (24 kHz for LTX2Vocoder, 48 kHz after BWE), from its config."""
    rate = read_config(folder, VOCODER_CONFIG).get("output_sampling_rate")
    if not isinstance(rate, int) or isinstance(rate, bool) or rate <= 0:
        raise UnsupportedCheckpoint(f"{folder / VOCODER_CONFIG} has no valid output_sampling_rate (got {rate!r})")
    return rate


def vae_temporal_ratio(folder: Path) -> int:
    """How many pixel frames the checkpoint's video VAE packs into one latent frame (after the first):
    where keyframes may start (protocol/conditions.py).

    Read as diffusers builds it: `temporal_compression_ratio` when the config sets it (the real
    checkpoints: 8), else `patch_size_t * 2 ** sum(spatio_temporal_scaling)`.
    """
    config = read_config(folder, VIDEO_VAE_CONFIG)
    ratio = config.get("temporal_compression_ratio")
    if ratio is None:
        scaling = config.get("spatio_temporal_scaling", VAE_DEFAULT_SCALING)
        scaling = scaling if isinstance(scaling, list | tuple) else [scaling] * len(VAE_DEFAULT_SCALING)
        ratio = config.get("patch_size_t", VAE_DEFAULT_PATCH_SIZE_T) * 2 ** sum(bool(step) for step in scaling)
    if not isinstance(ratio, int) or isinstance(ratio, bool) or ratio <= 0:
        raise UnsupportedCheckpoint(
            f"{folder / VIDEO_VAE_CONFIG} has no valid temporal_compression_ratio (got {ratio!r})"
        )
    return ratio


def vae_spatial_ratio(folder: Path) -> int:
    """How many pixels of a side the checkpoint's video VAE packs into one latent (32 for LTX-2; 4 for
    the tiny test models): the grid a control video's reduced size must lie on (protocol/control_video.py).

    Read as diffusers builds it: `spatial_compression_ratio` when the config sets it, else
    `patch_size * 2 ** sum(spatio_temporal_scaling)`.
    """
    config = read_config(folder, VIDEO_VAE_CONFIG)
    ratio = config.get("spatial_compression_ratio")
    if ratio is None:
        scaling = config.get("spatio_temporal_scaling", VAE_DEFAULT_SCALING)
        scaling = scaling if isinstance(scaling, list | tuple) else [scaling] * len(VAE_DEFAULT_SCALING)
        ratio = config.get("patch_size", VAE_DEFAULT_PATCH_SIZE) * 2 ** sum(bool(step) for step in scaling)
    if not isinstance(ratio, int) or isinstance(ratio, bool) or ratio <= 0:
        raise UnsupportedCheckpoint(
            f"{folder / VIDEO_VAE_CONFIG} has no valid spatial_compression_ratio (got {ratio!r})"
        )
    return ratio
