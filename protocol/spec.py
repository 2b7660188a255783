"""The job spec: every input of one clip, each field declared once, validated before any process starts.

A field's declaration (protocol.request_fields.declare) says how every front door offers it and
which rules of protocol/spec_rules.py check it; a rule broken fails fast with a message naming the
CLI flag, the value given and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import typing
from typing import Any

from protocol.codec import is_instance_of
from protocol.conditions import require_conditions, require_frames_inside
from protocol.control_video import MAX_DOWNSCALE, require_reference, require_reference_fits_request
from protocol.extension import AUDIO_NOTE, OVERLAP_FIELD
from protocol.request_fields import Declared, declare, fields_of
from protocol.retake import FROM_FIELD, RETAKE_AUDIO_NOTE, RETAKE_FIELD, TO_FIELD
from protocol.soundtrack import AUDIO_FORMATS, require_audio, require_audio_fits_request
from protocol.spec_rules import (
    DECODERS,
    DISTILLED_STEPS,
    DTYPES,
    FALLBACK_NAME,
    FRAME_MULTIPLE,
    MAX_FRAMES,
    MAX_MODALITY_SCALE,
    MAX_NAG_SCALE,
    MAX_PROMPT_BYTES,
    MAX_PROMPT_CHARS,
    MAX_SEED,
    MAX_SIZE,
    MAX_STEPS,
    MAX_STG_SCALE,
    MIN_CROP_SIZE,
    MIN_FRAMES,
    MIN_SIZE,
    NAME_PATTERN,
    ONE_STAGE,
    PIPELINES,
    SCHEDULES,
    SIZE_MULTIPLE,
    TWO_STAGE,
    TWO_STAGE_MIN_SIZE,
    TWO_STAGE_SIZE_MULTIPLE,
    VAE_DECODER,
    SpecError,
    describe,
    nearest_sizes,
    require_context_parallel,
    require_crop_side,
    require_declared,
    require_extend_source,
    require_frames,
    require_image,
    require_loras,
    require_model,
    require_nag_steps,
    require_nag_tau,
    require_name,
    require_negative_prompt,
    require_prompt,
    require_range,
    require_size,
    require_stage2_lora,
)


def _sha256_json(data: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@dataclasses.dataclass(frozen=True)
class JobSpec:
    """One clip's inputs; `model` is a Hugging Face repo id or a local diffusers folder.

    Each field is declared here once (protocol.request_fields): the CLI flags, the HTTP fields, the
    per-field checks and docs/request-fields.md are derived from these declarations.
    """

    prompt: str = declare(
        help="what the clip shows (a paragraph works best)",
        default_from="required",
        rule=require_prompt,
        allowed=f"non-empty text, at most {MAX_PROMPT_CHARS} characters and {MAX_PROMPT_BYTES} bytes of UTF-8",
        http="text",
        doc="what the clip shows; a paragraph works best; at most 20,000 characters and 32 KiB of UTF-8 (also for "
        "`--negative-prompt`)",
        default_doc="required",
        metavar="TEXT",
    )
    model: str = declare(
        help="HF repo id or local diffusers folder (default: the distilled model if cached, else the tiny offline"
        " model)",
        default_from="settings",
        rule=require_model,
        allowed="a repo id in the Hugging Face cache or a folder",
        http="own",
        doc="Hugging Face repo id (from the local cache) or a local diffusers folder",
        default_doc="distilled if cached, else tiny",
        metavar="ID_OR_DIR",
    )
    width: int = declare(
        help="multiple of 32 (preset default)",
        default_from="model preset",
        rule=require_size,
        allowed=f"multiple of {SIZE_MULTIPLE}, {MIN_SIZE} to {MAX_SIZE} (two-stage: of {TWO_STAGE_SIZE_MULTIPLE})",
        http="own",
        http_name="size",
        doc="multiples of 32, 64–4096",
        default_doc="preset (768×512; tiny 128×128)",
        metavar="N",
    )
    height: int = declare(
        help="multiple of 32 (preset default)",
        default_from="model preset",
        rule=require_size,
        allowed=f"multiple of {SIZE_MULTIPLE}, {MIN_SIZE} to {MAX_SIZE} (two-stage: of {TWO_STAGE_SIZE_MULTIPLE})",
        http="own",
        http_name="size",
        doc="multiples of 32, 64–4096",
        default_doc="preset (768×512; tiny 128×128)",
        metavar="N",
    )
    num_frames: int = declare(
        help="8n+1: 9, 17, ..., 121, 161, 257 (preset default)",
        default_from="model preset",
        rule=require_frames,
        allowed=f"8n+1, {MIN_FRAMES} to {MAX_FRAMES}",
        http="number",
        doc="8n+1 (9, 17, …, 121, 161, 257); never rounded silently: the error names the nearest valid counts",
        default_doc="preset (121; tiny 33)",
        metavar="N",
    )
    steps: int = declare(
        help="denoising steps (preset default: 8 distilled, 40 dev)",
        default_from="model preset",
        low=1,
        high=MAX_STEPS,
        allowed=f"1 to {MAX_STEPS}; exactly {DISTILLED_STEPS} with the distilled schedule",
        http="number",
        doc="denoising steps; the distilled schedule has exactly 8",
        default_doc="preset (8 distilled, 40 dev)",
        metavar="N",
    )
    seed: int = declare(
        help="random when absent; always recorded",
        default_from="random",
        low=0,
        high=MAX_SEED,
        http="number",
        doc="always recorded in job.json, the latents and the output's record",
        default_doc="random",
        metavar="N",
    )
    negative_prompt: str = declare(
        "",
        help="what to avoid; has an effect with --guidance-scale > 1 or with --nag-scale > 1",
        rule=require_negative_prompt,
        allowed=f"text, at most {MAX_PROMPT_CHARS} characters",
        http="text",
        doc="has an effect with CFG on (`--guidance-scale` > 1) or with NAG on (`--nag-scale` > 1); a warning says "
        "so otherwise",
        default_doc='`""`',
        metavar="TEXT",
    )
    fps: float = declare(
        24.0,
        help="frames per second (default 24)",
        default_from="model preset",
        low=1.0,
        high=240.0,
        http="number",
        doc="frame rate of the video and of the model's conditioning",
        default_doc="24",
        metavar="F",
    )
    guidance_scale: float = declare(
        1.0,
        help="CFG scale; 1.0 turns CFG off (preset default)",
        default_from="model preset",
        low=1.0,
        high=30.0,
        http="number",
        doc="CFG scale; 1.0 turns CFG off (one transformer call per step)",
        default_doc="preset (1.0 distilled, 3.5 dev)",
        metavar="F",
    )
    # Guidance beyond CFG (LTX-2.3's recipe: config/defaults.toml [families]); the defaults switch it off, as
    # LTX-2.0 ran before these fields existed. None: audio CFG follows --guidance-scale.
    audio_guidance_scale: float | None = declare(
        None,
        help="CFG scale of the audio (family preset: 7.0 for LTX-2.3 and 2.5 dev; else follows --guidance-scale)",
        default_from="family preset",
        low=1.0,
        high=30.0,
        http="number",
        added_later=True,
        doc="CFG scale of the audio, 1.0–30.0; above 1.0 CFG runs (and the negative prompt acts) even at "
        "`--guidance-scale` 1.0",
        default_doc="family preset (7.0 for LTX-2.3 and 2.5 dev; else follows `--guidance-scale`)",
        metavar="F",
    )
    stg_scale: float = declare(
        0.0,
        help="spatio-temporal guidance, one extra transformer call per step; 0.0 is off (family preset)",
        default_from="family preset",
        low=0.0,
        high=MAX_STG_SCALE,
        http="number",
        added_later=True,
        doc="spatio-temporal guidance on the family's STG block, 0.0–10.0; above 0 it costs one more transformer "
        "call per step",
        default_doc="family preset (1.0 for LTX-2.3 and 2.5 dev, else 0.0)",
        metavar="F",
    )
    modality_scale: float = declare(
        1.0,
        help="modality isolation guidance, one extra transformer call per step; 1.0 is off (family preset)",
        default_from="family preset",
        low=1.0,
        high=MAX_MODALITY_SCALE,
        http="number",
        added_later=True,
        doc="modality isolation guidance, 1.0–10.0; above 1 it costs one more transformer call per step",
        default_doc="family preset (3.0 for LTX-2.3 and 2.5 dev, else 1.0)",
        metavar="F",
    )
    guidance_rescale: float = declare(
        0.0,
        help="CFG rescale 0.0-1.0; 0.0 is off (family preset)",
        default_from="family preset",
        low=0.0,
        high=1.0,
        http="number",
        added_later=True,
        doc="CFG rescale, 0.0–1.0 (video and audio)",
        default_doc="family preset (0.7 for LTX-2.3 and 2.5 dev, else 0.0)",
        metavar="F",
    )
    # NAG's tau and alpha default to the NAG paper's reference code for other models (tau: norm-ratio clamp,
    # alpha: blend).
    nag_scale: float = declare(
        1.0,
        help="Normalized Attention Guidance: the negative prompt acts at CFG 1.0 in the text cross-attention"
        " (1.0-30.0; 1.0, the default, is off; ComfyUI's LTX-2 node uses 11)",
        low=1.0,
        high=MAX_NAG_SCALE,
        metavar="PHI",
        http="number",
        added_later=True,
        doc="Normalized Attention Guidance (see [NAG](rendering.md#normalized-attention-guidance-nag)): the negative"
        " prompt acts at CFG 1.0 through the text cross-attention, still one transformer call per step; 1.0–30.0,"
        " where 1.0 is exactly off (ComfyUI's LTX-2 node uses 11); refused with `--guidance-scale` > 1",
        default_doc="1.0 (off)",
    )
    nag_tau: float = declare(
        2.5,
        help="NAG's clamp on the norm ratio (default 2.5)",
        rule=require_nag_tau,
        allowed="a finite number above 0",
        metavar="TAU",
        http="number",
        added_later=True,
        doc="NAG's clamp: per token the guided attention output's L1 norm may grow to at most TAU times the "
        "prompt's; > 0",
        default_doc="2.5",
    )
    nag_alpha: float = declare(
        0.25,
        help="NAG's blend of guided and plain attention, 0-1 (default 0.25)",
        low=0.0,
        high=1.0,
        metavar="A",
        http="number",
        added_later=True,
        doc="NAG's blend: A × guided + (1 − A) × the prompt's plain attention output; 0–1",
        default_doc="0.25",
    )
    nag_steps: int | None = declare(
        None,
        help="apply NAG in the first N steps only (default all)",
        rule=require_nag_steps,
        allowed="0 or more",
        metavar="N",
        http="number",
        added_later=True,
        doc="apply NAG in the first N denoising steps only (0 turns it off; more than `--steps` means all)",
        default_doc="all",
    )
    schedule: str = declare(
        "distilled",
        help="sigma schedule (preset default)",
        default_from="model preset",
        choices=SCHEDULES,
        http="text",
        doc="`distilled`: the 8 distilled sigmas, no shift; `default`: linspace sigmas with the resolution shift",
        default_doc="preset",
    )
    pipeline: str = declare(
        ONE_STAGE,
        help="two-stage: half size, latent upsampler x2, 3 refining steps at full size (sizes divide by 64;"
        " distilled schedule); preset default: two-stage for LTX-2.3 distilled at >= 1280 px wide",
        default_from="family preset",
        choices=PIPELINES,
        http="text",
        added_later=True,
        doc="`two-stage`: denoise at half width and height, upsample the latents ×2, refine at full size in 3 "
        "distilled steps (see [Two-stage pipeline](rendering.md#two-stage-pipeline)); width and height must be"
        " multiples of 64 (at least 128); with a dev schedule stage 2 fuses the family's distilled LoRA"
        " (`--stage2-lora`)",
        default_doc="preset (two-stage for LTX-2.3 distilled at ≥ 1280 px wide, sides multiples of 64)",
    )
    #: dev two-stage only: {source, weight_name} of the distilled LoRA fused (at 1.0) for stage 2
    stage2_lora: dict[str, Any] | None = declare(
        None,
        help="dev two-stage: the distilled LoRA fused for stage 2 (HF repo id in the cache or .safetensors file;"
        " default: the model family's, e.g. Lightricks/LTX-2's ltx-2-19b-distilled-lora-384.safetensors)",
        default_from="family preset",
        rule=require_stage2_lora,
        allowed="{source, weight_name}",
        cli="own",
        http="own",
        added_later=True,
        doc="dev two-stage only (`--pipeline two-stage --schedule default`): the distilled LoRA fused at 1.0 for "
        "stage 2, an HF repo id in the local cache, folder or `.safetensors` file (inside "
        "`paths.input_roots`), found as `--lora` is; missing: exit 4 before any job, naming the flag and the "
        "`hf download` command; `stage2_lora = {source, weight_name}` in a batch file",
        default_doc="the family's (LTX-2.0: `Lightricks/LTX-2`, LTX-2.3: `Lightricks/LTX-2.3`)",
        metavar="REPO_OR_PATH",
    )
    #: the output file stem; a request without one gets the prompt's first words (spec_rules.name_from_prompt,
    #: filled in by orchestrator/run/jobspec.build_spec); "video" only for a spec built without a request
    name: str = declare(
        FALLBACK_NAME,
        help="output file stem (default: the prompt's first words, e.g. a-slow-dolly-in-through)",
        rule=require_name,
        allowed=NAME_PATTERN.pattern,
        latents=False,
        digest=False,
        doc="output file stem: `<stem>_<YYYYmmdd-HHMMSS>.mp4`, the stamp of its job id (`ltx2 jobs`); by default"
        " the prompt's first words in lowercase ASCII, hyphenated (at most 5 words, 40 characters; `video` when"
        " none are left)",
        default_doc="the prompt's first words",
        metavar="STEM",
    )
    dtype: str = declare(
        "auto",
        help="auto: bf16 on GPU, fp32 on CPU",
        choices=DTYPES,
        doc="auto = bf16 on GPU, fp32 on CPU",
        default_doc="`auto`",
    )
    image: str | None = declare(
        None,
        help="first-frame image for image-to-video (centre-cropped to the clip's shape)",
        default_from="none",
        rule=require_image,
        allowed="an image file",
        http="own",
        http_name="input_reference",
        doc="image-to-video: the first frame (diffusers' `LTX2ImageToVideoPipeline`); must lie inside "
        "`paths.input_roots` and be an image of at most 8192×8192 (the daemon reads only its header; the "
        "worker decodes it); copied into the job as it is and centre-cropped to the clip's aspect ratio (never "
        "stretched), then resized by the pipeline; H.264 re-compressed at the CRF the family was trained with, "
        "as diffusers picks it: 33 through LTX-2.3, 18 for LTX-2.5 (Gemma 4 encoder); with `--condition` it is the"
        " first keyframe (`PATH@0`, diffusers' `LTX2ConditionPipeline` then crops and resizes it)",
        default_doc="none",
        metavar="PATH",
    )
    #: keyframes: {source, frame, strength, crf} each (protocol/conditions.py); the image above, if any, joins them
    conditions: list[dict[str, Any]] = declare(
        factory=list,
        help="a keyframe: an image (one frame) or a video (its frames from FRAME on) the clip shows at pixel frame"
        " FRAME (default 0; -1: the last start) with STRENGTH 0-1 (default 1); repeatable",
        rule=require_conditions,
        allowed="image or video files; FRAME a latent frame's start (0, 1, 9, 17, ... for LTX-2), inside the clip;"
        " STRENGTH 0.0 to 1.0",
        cli="own",
        http="own",
        added_later=True,
        doc="keyframes (diffusers' `LTX2ConditionPipeline`): `PATH[@FRAME][:STRENGTH]`, repeatable; an image is one"
        " frame, a video its run of frames from FRAME on (trimmed to r·m+1 frames, r the VAE's temporal"
        " compression: 8); FRAME a pixel frame where a latent frame starts (0, 1, 9, 17, …; `-1`: the last start;"
        " refused with the nearest allowed otherwise, or when outside the clip or a video runs past its end);"
        " files inside `paths.input_roots`, copied into the job and hashed into its digest; `--image` with"
        " conditions is the condition `PATH@0`; `conditions = [{source, frame, strength, crf}]` in a batch file",
        default_doc="none",
        metavar="PATH[@FRAME][:STRENGTH]",
        cli_flag="--condition",
    )
    #: extension (protocol/extension.py): a finished job's id or a video file whose last `overlap` frames the clip
    #: starts with; the joined video (source + the new frames) is published beside the new part
    extend: str | None = declare(
        None,
        help="continue a video: a finished job's id or an MP4/MOV file; the clip's first --overlap frames are its last"
        " (model, size and fps default to the source's); published joined to the source, and alone as _new.mp4;"
        " the new audio continues the source's (its first audio latents held at the source's audio under the overlap)",
        default_from="none",
        rule=require_extend_source,
        allowed="a finished job's id, or an MP4/MOV file inside paths.input_roots",
        http="own",
        added_later=True,
        doc="extension (`ltx2 extend SOURCE` is `generate --extend SOURCE`; see [Extension](rendering.md#extension)):"
        " a finished job's id (its video: the joined one of an extension) or an MP4/MOV file inside"
        " `paths.input_roots`, copied into the job and hashed into its digest; the clip's first `--overlap` frames"
        " are the source's last, held at strength 1 (a video keyframe at frame 0); `--model`, `--width`, `--height`"
        " and `--fps` default to the source job's (a file: its size and frame rate), and the delivered size and"
        " frame rate must be the source's; published as `<stem>.mp4` (the source, then the new frames after the"
        " overlap: source + N − K frames) and `<stem>_new.mp4` (the new part alone); " + AUDIO_NOTE,
        default_doc="none",
        metavar="JOB_ID_OR_MP4",
    )
    overlap: int | None = declare(
        None,
        help="frames the new clip shares with the source's end: r*m+1, r the VAE's temporal compression (LTX-2: 1, 9,"
        " 17, 25, ...; default 25, or the longest that fits)",
        default_from="none",
        low=1,
        high=MAX_FRAMES,
        allowed="r·m+1 (1, 9, 17, 25, ... for LTX-2), below --num-frames, at most the source's frames",
        http="number",
        added_later=True,
        doc="with `--extend`: how many of the clip's first frames are the source's last; r·m+1 with r the VAE's"
        " temporal compression (LTX-2: 1, 9, 17, 25, …; refused with the nearest allowed otherwise), below"
        " `--num-frames` and at most the source's frame count",
        default_doc="3r+1 (25 for LTX-2), or the longest that fits",
        metavar="K",
    )
    #: retake (protocol/retake.py): a finished job's id or a video file whose frames from_frame..to_frame are
    #: regenerated, the rest of its latents (a file's: its VAE encoding) kept bit for bit
    retake: str | None = declare(
        None,
        help="regenerate frames --from-frame..--to-frame of a finished job's clip (its id) or of an MP4/MOV file"
        " (8n+1 frames, sides multiples of 32), keeping its other latent frames bit for bit (size, frames and fps"
        " are the source's, a job's model too); " + RETAKE_AUDIO_NOTE,
        default_from="none",
        rule=require_extend_source,
        allowed="a finished job's id (not an extension's), or an MP4/MOV file inside the input folders with 8n+1"
        " frames and a width and height that are multiples of 32",
        http="own",
        added_later=True,
        doc="retake (`ltx2 retake SOURCE` is `generate --retake SOURCE`; see [Retake](rendering.md#retake)): a"
        " finished job's id, or an MP4/MOV file (8n+1 frames, width and height multiples of 32: encoded as it"
        " is, never resampled); a job's latents, or the file, are copied into the job and hashed into its"
        " digest, the diffusion stage encodes a file with the video VAE (and its audio track with the audio"
        " VAE), the latent frames of `--from-frame`..`--to-frame` are regenerated from noise and every other one"
        " is held at the source's latents (ltx-pipelines' `TemporalRegionMask`), so the MP4 has the source's"
        " frame count; `--width`, `--height`, `--num-frames` and `--fps` are the source's (a job's `--model`"
        " too); " + RETAKE_AUDIO_NOTE + " (a file without an audio stream: a new track throughout)",
        default_doc="none",
        metavar="JOB_ID_OR_MP4",
    )
    from_frame: int | None = declare(
        None,
        help="with --retake: the first pixel frame to regenerate, where a latent frame starts (0, 1, 9, 17, ... for"
        " LTX-2)",
        default_from="none",
        low=0,
        high=MAX_FRAMES,
        allowed="0 or r·m+1 (0, 1, 9, 17, ... for LTX-2), at most --to-frame",
        http="number",
        added_later=True,
        doc="with `--retake`: the first pixel frame regenerated; where a latent frame starts (0, 1, 9, 17, … with"
        " r = 8; refused with the nearest allowed otherwise)",
        default_doc="none",
        metavar="A",
    )
    to_frame: int | None = declare(
        None,
        help="with --retake: the last pixel frame to regenerate, where a latent frame ends (0, 8, 16, 24, ... for"
        " LTX-2)",
        default_from="none",
        low=0,
        high=MAX_FRAMES,
        allowed="0 or r·m (0, 8, 16, 24, ... for LTX-2), inside the source",
        http="number",
        added_later=True,
        doc="with `--retake`: the last pixel frame regenerated; where a latent frame ends (0, 8, 16, 24, … with"
        " r = 8; refused with the nearest allowed otherwise), inside the source's frames",
        default_doc="none",
        metavar="B",
    )
    #: IC-LoRA control video: {source, strength} (protocol/control_video.py); the flag writes PATH[:STRENGTH]
    reference_video: dict[str, Any] | None = declare(
        None,
        help="control video for an IC-LoRA (--lora), PATH[:STRENGTH] (strength 0-1, default 1); with --pipeline"
        " two-stage it conditions stage 1, and stage 2 refines without it and without the LoRAs",
        default_from="none",
        rule=require_reference,
        allowed="an MP4/MOV video of at least --num-frames frames (its first ones are used, resized and"
        " centre-cropped); STRENGTH 0.0 to 1.0; needs a LoRA",
        http="own",
        added_later=True,
        doc="IC-LoRA control video (diffusers' `LTX2InContextPipeline`): `PATH[:STRENGTH]`; its first"
        " `--num-frames` frames are resized and centre-cropped to the clip's size / `--reference-downscale` and"
        " appended as clean tokens (STRENGTH 1: kept clean; lower: starts that far into the noise); a shorter"
        " one is refused; needs `--lora` (the IC-LoRA); two-stage: it and the LoRAs act at stage 1 (half size,"
        " the control at that size / N), stage 2 refines without either (ltx-pipelines' `ICLoraPipeline`);"
        " inside `paths.input_roots`, copied into"
        ' the job and hashed into its digest; `reference_video = "depth.mp4:0.8"` in a batch file',
        default_doc="none",
        metavar="PATH[:STRENGTH]",
    )
    reference_downscale: int | None = declare(
        None,
        help="the control video is encoded at the clip's size / N (default: the IC-LoRA's metadata, else 1)",
        default_from="none",
        low=1,
        high=MAX_DOWNSCALE,
        allowed=f"1 to {MAX_DOWNSCALE}; --width and --height multiples of 32·N (two-stage: 64·N)",
        http="number",
        added_later=True,
        doc="the control video is encoded at the clip's width and height / N (two-stage: stage 1's, half the"
        " clip's, / N), its positions scaled back by N"
        " (diffusers' `reference_downscale_factor`); must match the IC-LoRA's training: when absent, its"
        " `reference_downscale_factor` metadata (as ltx-pipelines reads it), else 1; a value the LoRA contradicts"
        " is refused",
        default_doc="the IC-LoRA's metadata, else 1",
        metavar="N",
    )
    #: audio-to-video (protocol/soundtrack.py): a soundtrack encoded by the audio VAE and held while the video is
    #: generated to fit it; the MP4 carries the track itself
    audio: str | None = declare(
        None,
        help="audio-to-video: a soundtrack (WAV, MP3, AAC in MP4, ...) the video is generated to fit; its first"
        " --num-frames/--fps seconds are held as the audio and carried by the MP4 (a shorter track is refused)",
        default_from="none",
        rule=require_audio,
        allowed="an audio file (" + AUDIO_FORMATS + ") at least as long as the clip, inside paths.input_roots;"
        " not with --extend or --retake",
        added_later=True,
        doc="audio-to-video (Lightricks' ltx-pipelines `A2VidPipelineTwoStage`; see"
        " [Audio-to-video](rendering.md#audio-to-video)): an audio file whose first `--num-frames / --fps` seconds"
        " are resampled to the audio VAE's rate, encoded from their log-mel spectrogram and held fixed (audio"
        " timestep 0) through every step of both stages while the video is denoised; the MP4 carries that stretch"
        " of the original track, not the VAE's reconstruction; a track shorter than the clip is refused (exit code"
        " 2); inside `paths.input_roots`, copied into the job and hashed into its digest;"
        ' `audio = "song.wav"` in a batch file, a file part `audio` over HTTP; not with `--extend` or `--retake`',
        default_doc="none",
        metavar="PATH",
    )
    loras: list[dict[str, Any]] = declare(
        factory=list,
        help="a LoRA (HF repo id in the cache, folder or .safetensors file); repeatable",
        rule=require_loras,
        allowed="repo ids in the cache, folders or .safetensors files; scale 0.0 to 1.0",
        cli="own",
        http="own",
        doc="a LoRA: HF repo id (local cache), folder or `.safetensors` file; repeatable; Lightricks' original "
        "keys and diffusers keys both load",
        default_doc="none",
        metavar="REPO_OR_PATH",
        cli_flag="--lora",
    )
    fp8: bool = declare(
        False,
        help="store transformer weights in FP8 (bf16 compute; LoRAs are fused first)",
        cli="toggle",
        doc="store transformer weights in float8_e4m3fn, compute in bf16 (LoRAs are fused first)",
        default_doc="off",
    )
    fp8_matmul: bool = declare(
        False,
        help="FP8 weights and FP8 matmuls (rowwise scales) in the transformer blocks; fastest with --compile",
        cli="switch",
        doc="FP8 weights *and* FP8 matmuls in the transformer blocks' linear layers (per-row scales for weights "
        "and activations, `torch._scaled_mm`); about half the weight memory like `--fp8`, but faster, not "
        "slower; not with `--fp8`",
        default_doc="off",
    )
    fp8_attention: bool = declare(
        False,
        help="FP8 self-attention in the transformer (cuDNN's FP8 kernel on Hopper; bf16 where it cannot run)",
        cli="switch",
        doc="the transformer blocks' video and audio self-attention in FP8 (cuDNN's FP8 attention through "
        "`pip install nvidia-cudnn-frontend`, Hopper GPUs; per-tensor scales from each call's own q, k, v); "
        "opt-in until its quality is shown (docs/benchmarks.md); bf16 attention, with a notice in the stage "
        "log, where the kernel cannot run (no such GPU or package)",
        default_doc="off",
        added_later=True,
    )
    compile: bool = declare(
        False,
        help="compile the transformer's repeated blocks (torch.compile; the compiled code is cached on disk)",
        cli="toggle",
        doc="regional `torch.compile` of the transformer's repeated blocks (compiled at the first step; inductor's "
        "cache is kept in `<state>/compile-cache`, or `LTX2_COMPILE_CACHE_DIR`, so later workers reuse it); "
        "eager again on lower-memory retries",
        default_doc="off",
    )
    # One clip's diffusion over N processes (issue 30). Not bit-equal to one process (the sharded matmuls and
    # attention add in another order: within 1e-4 on the tiny model), so it shapes the latents and the digest.
    context_parallel: int = declare(
        1,
        help="run the diffusion stage as N processes, each holding the model and 1/N of the video tokens "
        "(N GPUs of the lane; gloo processes on the CPU); 1 is off (default: [cluster] context_parallel)",
        default_from="settings",
        rule=require_context_parallel,
        allowed="1, 2, 4 or 8",
        http="number",
        added_later=True,
        doc="context parallel (see [Context parallel](rendering.md#context-parallel)): the diffusion stage runs as"
        " N processes joined in one `torch.distributed` group (NCCL on GPUs, gloo on the CPU), each holding the"
        " whole model and 1/N of the video and text tokens (diffusers' Ulysses attention); one stage attempt,"
        " stopped together; the latents match one process's within 1e-4, not bit for bit; N must also divide"
        " the video tokens and the attention heads (exit 2 otherwise)",
        default_doc="`[cluster] context_parallel` (1: off)",
        metavar="N",
    )
    sequential_offload: bool = declare(
        False,
        help="keep transformer layers in host memory, moving each to the GPU as it runs",
        cli="switch",
        doc="keep the transformer's layers in host memory and move each to the GPU while it runs (slowest, least "
        "GPU memory)",
        default_doc="off",
    )
    vae_chunk_frames: int | None = declare(
        None,
        help="decode in temporal pieces of N latent frames",
        default_from="none",
        allowed="2 to the clip's latent frames",
        latents=False,
        doc="decode in temporal pieces of N latent frames (cross-faded; fewer pieces, fewer seams)",
        default_doc="auto",
        metavar="N",
    )
    vae_tiling: bool | None = declare(
        None,
        help="force spatial tiling on/off (default: chosen from the size)",
        default_from="none",
        cli="toggle",
        latents=False,
        doc="force spatial tiling of the VAE decode on or off",
        default_doc="auto",
    )
    # Issue 28 item 3: the decoder compiled (Inductor, channels-last-3d) decoded 1080p x 121 in 1.11 s against the
    # eager 1.60 on an H100 (docs/benchmarks.md version 12), but a process pays the compile per shape (19-21 s
    # cold, 3.7 s with Inductor's cache warm), so it is opt-in; its frames differ from eager's in the last levels,
    # so it is a field of the request (and its digest), not a setting.
    compile_decoder: bool = declare(
        False,
        help="compile the video VAE's decoder (torch.compile, channels-last-3d; the compiled code is cached on disk)",
        cli="toggle",
        latents=False,
        added_later=True,
        doc="`torch.compile` of the video VAE's decoder with its weights and inputs in channels-last-3d (1.11 s"
        " against 1.60 s eager per 1920x1088x121 decode on an H100, docs/benchmarks.md version 12; a process pays"
        " the compile once per input shape, one for a single pass, one per tile or piece shape otherwise: inductor's"
        " cache in `<state>/compile-cache` as `--compile`'s, and Dynamo's package with `LTX2_COMPILE_PACKAGES=1`);"
        " frames within a few levels of the eager decode, equal run to run with `[worker] deterministic`; eager"
        " again on lower-memory retries; not with `--decoder diffusion`",
        default_doc="off",
    )
    decoder: str = declare(
        "vae",
        help="video decoder: vae, or diffusion (LTX-2.5's diffusion video decoder; the checkpoint must ship one)",
        choices=DECODERS,
        http="text",
        latents=False,
        added_later=True,
        doc="the video decoder: `vae` (the video VAE), or `diffusion`, LTX-2.5's diffusion video decoder (a"
        " one-step neighbourhood-attention model, seeded by `--seed`), for a checkpoint with a `diffusion_decoder`"
        " folder (exit 2 otherwise)",
        default_doc="vae",
    )
    # The frames delivered, centre-cropped from the rendered ones: how a size that is no multiple of 32
    # (OpenAI's 720x1280) is delivered exactly (see crop_box for why a crop and not a resize).
    crop_width: int | None = declare(
        None,
        help="deliver frames N pixels wide, centre-cropped from the rendered --width (even; at most --width)",
        default_from="none",
        rule=require_crop_side,
        allowed=f"even, {MIN_CROP_SIZE} to --width",
        http="own",
        http_name="size",
        latents=False,
        added_later=True,
        doc="deliver the video and PNGs N pixels wide, centre-cropped from the rendered `--width` (never scaled):"
        " how the gateway delivers OpenAI's 720-pixel sides, rendered at 736; even, at most `--width`",
        default_doc="none (`--width`)",
        metavar="N",
    )
    crop_height: int | None = declare(
        None,
        help="deliver frames N pixels high, centre-cropped from the rendered --height (even; at most --height)",
        default_from="none",
        rule=require_crop_side,
        allowed=f"even, {MIN_CROP_SIZE} to --height",
        http="own",
        http_name="size",
        latents=False,
        added_later=True,
        doc="deliver the video and PNGs N pixels high, centre-cropped from the rendered `--height`; even, at most"
        " `--height`",
        default_doc="none (`--height`)",
        metavar="N",
    )
    drop_caches: bool = declare(
        False,
        help="flush the kernel page cache after the video is written (needs root; warns otherwise)",
        cli="switch",
        latents=False,
        digest=False,
        doc="after the video is written, flush the kernel page cache (`/proc/sys/vm/drop_caches`; needs root, "
        "warns otherwise)",
        default_doc="off",
    )

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> JobSpec:
        """Build and validate a spec from plain data (a msgpack map, job.json or CLI flags)."""
        if not isinstance(raw, dict):
            raise SpecError("spec", "the job spec must be a map of fields")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        hints = typing.get_type_hints(cls)
        unknown = sorted(set(raw) - set(fields))
        if unknown:
            nearest = difflib.get_close_matches(str(unknown[0]), fields, n=1)
            hint = f"did you mean {nearest[0]}? " if nearest else ""
            raise SpecError(str(unknown[0]), f"unknown field; {hint}allowed fields are {', '.join(sorted(fields))}")
        for name, field in fields.items():
            if name not in raw:
                if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
                    raise SpecError(name, "is required")
                continue
            if not is_instance_of(raw[name], hints[name]):
                raise SpecError(name, f"must be of type {describe(hints[name])}, got {raw[name]!r}")
        spec = cls(**raw)
        spec.require_valid()
        return spec

    def to_dict(self) -> dict[str, Any]:
        """Plain data for job.json and messages."""
        return dataclasses.asdict(self)

    def with_changes(self, **changes: Any) -> JobSpec:
        """A validated copy with some fields replaced."""
        return JobSpec.from_dict({**self.to_dict(), **changes})

    def require_valid(self) -> None:
        """Raise SpecError for the first rule this spec breaks: each field's declared checks in
        declaration order, then the rules that relate fields to each other."""
        for declared in SPEC_FIELDS:
            value = getattr(self, declared.name)
            if value is not None:
                require_declared(declared, value)
        if self.schedule == "distilled" and self.steps != DISTILLED_STEPS:
            raise SpecError(
                "steps",
                f"the distilled schedule has exactly {DISTILLED_STEPS} steps; got {self.steps}"
                " (use --schedule default for another step count)",
            )
        if self.fp8 and self.fp8_matmul:
            raise SpecError("fp8_matmul", "choose one of --fp8 (FP8 storage, bf16 compute) and --fp8-matmul")
        if self.vae_chunk_frames is not None:
            require_range("vae_chunk_frames", self.vae_chunk_frames, 2, self.latent_frames)
        for crop, side, name in (("crop_width", self.width, "width"), ("crop_height", self.height, "height")):
            value = getattr(self, crop)
            if value is not None and value > side:
                raise SpecError(
                    crop, f"must be at most --{name} {side} (a crop of the rendered frames never enlarges); got {value}"
                )
        require_frames_inside(self.conditions, self.num_frames)
        self._require_valid_extension()
        self._require_valid_retake()
        require_reference_fits_request(self.reference_video, self.loras)
        require_audio_fits_request(self.audio, self.extend, self.retake)
        self._require_valid_nag()
        self._require_valid_pipeline()
        if self.compile_decoder and self.decoder != VAE_DECODER:
            raise SpecError(
                "compile_decoder",
                f"compiles the video VAE's decoder; --decoder {self.decoder} runs another (its attention is compiled"
                " on a GPU already)",
            )

    def _require_valid_pipeline(self) -> None:
        """Two-stage's sizes and schedule, and the stage-2 LoRA a dev schedule needs.

        Stage 2 is three steps on the distilled sigmas with guidance off. A distilled model was trained
        for them; a dev (non-distilled) one was not, so with a dev schedule stage 2 runs on the transformer
        with Lightricks' distilled LoRA fused at 1.0 (diffusers' LTX-2 docs, "Two-stages Generation").
        Which LoRA is `stage2_lora`, which orchestrator/run/jobspec.py fills from the model family's dev preset
        (config/defaults.toml) unless --stage2-lora names one; a dev two-stage spec without it is refused
        (a family with no known distilled LoRA, LTX-2.5), as is a stage-2 LoRA that no stage would use.
        """
        if self.stage2_lora is not None:
            if self.pipeline != TWO_STAGE or self.schedule == "distilled":
                raise SpecError(
                    "stage2_lora",
                    "only two-stage with a dev schedule (--pipeline two-stage --schedule default) fuses a stage-2"
                    f" LoRA; got --pipeline {self.pipeline} --schedule {self.schedule}",
                )
        if self.pipeline != TWO_STAGE:
            return
        if self.schedule != "distilled" and self.stage2_lora is None:
            raise SpecError(
                "pipeline",
                "two-stage refines at the full size with three distilled steps and guidance off; with"
                f" --schedule {self.schedule} that needs a distilled LoRA fused for stage 2, and none is set;"
                " name one with --stage2-lora, or use --schedule distilled or --pipeline one-stage",
            )
        for field, value in (("width", self.width), ("height", self.height)):
            if value % TWO_STAGE_SIZE_MULTIPLE or value < TWO_STAGE_MIN_SIZE:
                nearest = nearest_sizes(value, TWO_STAGE_SIZE_MULTIPLE, TWO_STAGE_MIN_SIZE)
                raise SpecError(
                    field,
                    f"two-stage needs a multiple of {TWO_STAGE_SIZE_MULTIPLE} between {TWO_STAGE_MIN_SIZE} and"
                    f" {MAX_SIZE} (stage 1 runs at half the size, in multiples of {SIZE_MULTIPLE}); got {value}"
                    f" (nearest allowed: {' or '.join(map(str, nearest))}; or --pipeline one-stage)",
                )

    def _require_valid_extension(self) -> None:
        """--overlap belongs to an extension and leaves the new part frames of its own; an extension's first
        frames are the source's, so no --image replaces them (the frame math against the VAE and the source
        is orchestrator/run/extension_lookup.py's, which knows both)."""
        if self.overlap is not None and self.extend is None:
            raise SpecError(OVERLAP_FIELD, "needs --extend SOURCE (or ltx2 extend SOURCE): the video it overlaps")
        if self.overlap is not None and self.overlap >= self.num_frames:
            raise SpecError(OVERLAP_FIELD, f"{self.overlap} must be below --num-frames {self.num_frames}")
        if self.extend is not None and self.image is not None:
            raise SpecError(
                "image",
                "an extension starts with the source's last frames, which --image would replace; give keyframes"
                " after the overlap with --condition",
            )

    def _require_valid_retake(self) -> None:
        """A retake's range comes with its source and is in order; the retake regenerates part of a clip with
        one pass at its size, so nothing else may place frames in it (the latent-grid and source checks are
        orchestrator/run/retake_lookup.py's, which knows the VAE and the source)."""
        given = [name for name in (FROM_FIELD, TO_FIELD) if getattr(self, name) is not None]
        if self.retake is None:
            if given:
                raise SpecError(given[0], "needs --retake SOURCE (or ltx2 retake SOURCE): the clip to retake")
            return
        if len(given) < 2:
            missing = TO_FIELD if FROM_FIELD in given else FROM_FIELD
            raise SpecError(missing, "a retake needs both --from-frame A and --to-frame B (the frames regenerated)")
        if self.from_frame > self.to_frame:
            raise SpecError(FROM_FIELD, f"{self.from_frame} is after --to-frame {self.to_frame}; A must be <= B")
        taken = {"extend": self.extend, "image": self.image, "condition": self.conditions or None}
        taken["reference_video"] = self.reference_video
        for name, value in taken.items():
            if value is not None:
                raise SpecError(name, "cannot be combined with --retake: the frames outside the range are the source's")
        if self.pipeline == TWO_STAGE:
            raise SpecError(
                RETAKE_FIELD,
                "a retake is one pass at the source's size (its latents are held as they are); use --pipeline"
                " one-stage",
            )

    def _require_valid_nag(self) -> None:
        """NAG's refusal next to CFG.

        NAG with CFG > 1 is refused rather than combined: CFG already spends a second (batched) pass
        on the negative prompt, so NAG there would apply the same prompt twice in two different ways,
        a combination no LTX-2 reference tunes or checks; NAG exists for the CFG = 1 (distilled) case.
        """
        if self.uses_nag and self.uses_cfg:
            raise SpecError(
                "nag_scale",
                f"NAG is for CFG off (got --guidance-scale {self.guidance_scale}, --audio-guidance-scale"
                f" {self.effective_audio_guidance_scale}): with CFG on the negative prompt already acts through"
                " CFG's second pass; use one of the two",
            )

    @property
    def crop_box(self) -> tuple[int, int, int, int]:
        """(left, top, width, height) of the delivered frames inside the rendered ones; the whole frame
        when no crop is set.

        Centred, and a crop rather than a resize: rendering at the next size the VAE accepts and
        cutting off at most 31 px of margin keeps every delivered pixel as the VAE decoded it, with no
        resampling blur and no change of aspect (scaling 736 to 720 squeezes the picture by 2 %).
        """
        width = self.width if self.crop_width is None else self.crop_width
        height = self.height if self.crop_height is None else self.crop_height
        return (self.width - width) // 2, (self.height - height) // 2, width, height

    @property
    def latent_frames(self) -> int:
        """Frames of the video latent: the first frame alone, then one per 8."""
        return (self.num_frames - 1) // FRAME_MULTIPLE + 1

    @property
    def effective_audio_guidance_scale(self) -> float:
        """Audio CFG: its own value when given, else the video CFG (what LTX2Pipeline does with a falsy value)."""
        return self.guidance_scale if self.audio_guidance_scale is None else self.audio_guidance_scale

    @property
    def uses_cfg(self) -> bool:
        """Classifier-free guidance runs when either modality's scale is above 1.0 (LTX2Pipeline then
        makes its batched negative+positive call); otherwise a negative prompt has no effect."""
        return self.guidance_scale > 1.0 or self.effective_audio_guidance_scale > 1.0

    @property
    def uses_nag(self) -> bool:
        """Normalized Attention Guidance runs when its scale is above 1.0 and at least one step uses it."""
        return self.nag_scale > 1.0 and self.nag_steps != 0

    @property
    def uses_negative_prompt(self) -> bool:
        """Whether the negative prompt is encoded and acts on the latents (through CFG or NAG)."""
        return self.uses_cfg or self.uses_nag

    @property
    def nag_step_count(self) -> int:
        """How many leading denoising steps NAG guides (0 when off)."""
        if not self.uses_nag:
            return 0
        return self.steps if self.nag_steps is None else min(self.nag_steps, self.steps)

    def digest(self) -> str:
        """SHA-256 of the canonical JSON of the whole spec; fields added later count only when set,
        so a batch re-run after an upgrade still recognises the clips it finished before."""
        return _sha256_json(self.fields_set_since_added())

    def latents_digest(self) -> str:
        """SHA-256 of the fields that shape the latents; decoders check it before using them.

        Decode and output settings are left out, so saved latents can be decoded again with
        another decode plan or name (`ltx2 decode`).
        """
        # NAG and guidance fields at their defaults are left out, so latents written before they existed still match.
        return _sha256_json({k: v for k, v in self.fields_set_since_added().items() if k not in DECODE_ONLY_FIELDS})

    def fields_set_since_added(self) -> dict[str, Any]:
        """`to_dict()` without the fields added in later versions (LATER_FIELD_DEFAULTS) that hold their
        default: what a spec of the version before them had, which the digests are computed from."""
        return {
            k: v for k, v in self.to_dict().items() if not (k in LATER_FIELD_DEFAULTS and v == LATER_FIELD_DEFAULTS[k])
        }


#: Every spec field's declaration, in declaration order.
SPEC_FIELDS = fields_of(JobSpec)
# Fields that do not change the latents (see JobSpec.latents_digest).
DECODE_ONLY_FIELDS = frozenset(declared.name for declared in SPEC_FIELDS if not declared.latents)
# Fields left out of the spec digests at their default, so latents written before they existed still match.
# (A declaration's default is the field's, a factory's value included: `conditions` defaults to [].)
LATER_FIELD_DEFAULTS = {declared.name: declared.default for declared in SPEC_FIELDS if declared.added_later}

#: Inputs a request may carry that are resolved into spec fields before validation
#: (orchestrator/run/jobspec.py) and never stored: a camera move becomes a LoRA, seconds a frame count.
REQUEST_ONLY = (
    Declared(
        name="camera",
        doc="camera-control LoRA: `dolly-in`, `dolly-out`, `dolly-left`, `dolly-right`, `jib-up`, `jib-down`, "
        "`static` (`Lightricks/LTX-2-19b-LoRA-Camera-Control-*` from the HF cache)",
        default_doc="none",
        metavar="NAME",
        help="camera-control LoRA by name: dolly-in, dolly-out, dolly-left, dolly-right, jib-up, jib-down, static",
        default_from="none",
        allowed="a name under [cameras] in config/defaults.toml",
        http="text",
    ),
    Declared(
        name="seconds",
        kind=float,
        help="clip length in seconds instead of --num-frames: the fewest 8n+1 frames lasting at least that long"
        " at the clip's fps (5 s at 24 fps: 121 frames, 5.042 s); with --extend, how long the new part after the"
        " overlap lasts (4 s at 24 fps after 25 frames: 121 frames)",
        default_from="none",
        allowed=f"above 0, at most {MAX_FRAMES} frames at the clip's fps",
        metavar="S",
        doc="clip length in seconds instead of `--num-frames`: the fewest 8n+1 frames that last at least that"
        " long at the clip's fps (`--seconds 5` at 24 fps: 121 frames, 5.042 s); with `--extend`, how long the"
        " part after the overlap lasts, the length the joined video grows by (`--seconds 4` at 24 fps after the"
        " default 25-frame overlap: 121 frames, 96 of them new, 4.000 s), as OpenAI's extensions count it; a"
        " notice says what it became; not with `--num-frames`",
        default_doc="none",
        http="own",
    ),
)
