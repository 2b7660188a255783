"""Control video (IC-LoRA): a reference clip the transformer attends to beside the clip it denoises.

An IC-LoRA ("in-context" LoRA: depth, pose, edges, camera...) was trained with the latent tokens of a
control clip appended to the noisy ones; at inference diffusers' `LTX2InContextPipeline`
(pipeline_ltx2_ic_lora.py, 0.42.1) appends them the same way (`LTX2ReferenceCondition(frames,
strength)`), as Lightricks' ltx-pipelines do (packages/ltx-pipelines/src/ltx_pipelines/ic_lora.py and
iclora_utils.py; packages/ltx-core/.../conditioning/types/reference_video_cond.py). What the pipeline
does with the control clip decides what is checked here, before any job exists:

- **Size: resampled.** The pipeline resizes and centre-crops every frame to the clip's size divided by
  `reference_downscale_factor` (`preprocess_video(..., resize_mode="crop")`), so any picture size
  works. That reduced size must itself be a multiple of the VAE's spatial compression: diffusers
  rounds a size that is not down to one, and the tokens' positions, scaled back up by the factor,
  would then no longer cover the clip. Refused otherwise, naming `--reference-downscale`.
- **Frames: trimmed, never stretched.** The pipeline keeps the control clip's first `num_frames`
  frames (`ref_pixels[:, :, :num_frames]`). A longer clip is trimmed (a notice says so); a shorter one
  is refused: it would encode to fewer latent frames, leaving the clip's end without control, and an
  IC-LoRA is trained on control and target clips of equal length (ltx-trainer's reference videos).
  Resampling its frame rate would change the motion the control describes, so it is not done.
- **Downscale factor.** IC-LoRAs trained on reduced references store it in their safetensors metadata
  (`reference_downscale_factor`, which ltx-pipelines reads and diffusers' docstring points to); when the
  request gives none, the LoRAs' value is used, else 1 (diffusers' default). A request that names
  another factor than a LoRA states, or LoRAs that disagree, are refused (ltx-pipelines refuses the latter).
- **Needs a LoRA.** The base model was never trained to read appended control tokens; without an
  IC-LoRA they cost attention and steer nothing. Refused, so no GPU time is spent on a no-op.
- **Two-stage: the control at stage 1 only.** Lightricks' two-stage IC-LoRA recipe (ltx-pipelines'
  `ICLoraPipeline`, packages/ltx-pipelines/src/ltx_pipelines/ic_lora.py) runs stage 1 at half the width
  and height with the IC-LoRA and the control clip, encoded at stage 1's size divided by the factor (its
  `_create_conditionings(height=stage_1 height, ...)`), beside the image and keyframes at that size; the
  latent upsampler doubles the result; stage 2 refines it on the transformer *without* any of the job's
  LoRAs (`stage_2 = DiffusionStage(..., loras=())`) and without the control clip, the image and keyframes
  encoded again at the full size (`combined_image_conditionings`). diffusers 0.42.1 has no two-stage IC-LoRA
  recipe; each stage here is one of its pipelines (`LTX2InContextPipeline` at stage 1, as one-stage runs
  it; `LTX2ConditionPipeline` or `LTX2Pipeline` at stage 2, as two-stage runs them), and stage 2 loads the
  transformer again without the LoRAs (services/two_stage.py). So the factor must put stage 1's control
  size on the VAE's grid: the clip's size / 2 / factor.

Torch-free: the orchestrator checks it; the worker reads protocol.job_record.ResolvedReference.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from protocol.files import read_safetensors_metadata
from protocol.spec_rules import TWO_STAGE, SpecError, require_path_text

REFERENCE_FIELD = "reference_video"
DOWNSCALE_FIELD = "reference_downscale"
REFERENCE_KEYS = frozenset({"source", "strength"})
# The LoRA metadata key ltx-pipelines reads the factor from (iclora_utils.read_lora_reference_downscale_factor).
DOWNSCALE_METADATA_KEY = "reference_downscale_factor"
# diffusers' default factor (LTX2InContextPipeline.__call__'s `reference_downscale_factor=1`).
DEFAULT_DOWNSCALE = 1
# Known IC-LoRAs use 1 or 2; 8 reduces a 4K clip's control to 480 px, below which no IC-LoRA is trained.
MAX_DOWNSCALE = 8
# PATH[:STRENGTH], the strength read from the right so a path may itself hold ":" elsewhere.
FLAG_PATTERN = re.compile(r"(?P<source>.+?)(?::(?P<strength>[0-9]*\.?[0-9]+))?")


def parse_reference_flag(text: str) -> dict[str, Any]:
    """`--reference-video PATH[:STRENGTH]` as the spec's entry ({source, strength?})."""
    match = FLAG_PATTERN.fullmatch(text)
    if match is None or not match["source"].strip():
        raise SpecError(REFERENCE_FIELD, f"must be PATH[:STRENGTH] (e.g. depth.mp4:0.8); got {text!r}")
    entry: dict[str, Any] = {"source": match["source"]}
    if match["strength"] is not None:
        entry["strength"] = float(match["strength"])
    return entry


def reference_request(value: object) -> dict[str, Any]:
    """The field as a map: a batch file or a client may write it as the flag does (`"depth.mp4:0.8"`)."""
    return parse_reference_flag(value) if isinstance(value, str) else value  # type: ignore[return-value]


def require_reference(entry: dict[str, Any], field: str = REFERENCE_FIELD) -> None:
    """The entry's own shape: a path and a strength from 0 to 1."""
    unknown = set(entry) - REFERENCE_KEYS
    if unknown:
        raise SpecError(REFERENCE_FIELD, f"unknown key {sorted(unknown)[0]!r}; allowed: source, strength")
    source = entry.get("source")
    if not isinstance(source, str) or not source.strip():
        raise SpecError(REFERENCE_FIELD, "needs a path to a video file (MP4 or MOV)")
    require_path_text(source, REFERENCE_FIELD)
    strength = entry.get("strength", 1.0)
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0.0 <= strength <= 1.0:
        raise SpecError(REFERENCE_FIELD, f"{source}: the strength must be between 0.0 and 1.0; got {strength!r}")


def require_reference_fits_request(entry: dict[str, Any] | None, loras: list[Any]) -> None:
    """The refusal that needs another field: no LoRA to read the control (see above)."""
    if entry is None:
        return
    if not loras:
        raise SpecError(
            REFERENCE_FIELD,
            f"{describe_reference(entry)}: a control video needs an IC-LoRA to read it (add --lora with one); the"
            " base model was not trained on control tokens, so they would cost attention and steer nothing",
        )


def describe_reference(entry: dict[str, Any]) -> str:
    """The entry as the flag writes it (`depth.mp4:0.8`), for messages."""
    return f"{entry.get('source')}:{entry.get('strength', 1.0):g}"


def require_reference_frames(entry: dict[str, Any], frames: int, num_frames: int) -> None:
    """A control clip covers the whole clip: SpecError naming --reference-video when it is shorter."""
    if frames < num_frames:
        raise SpecError(
            REFERENCE_FIELD,
            f"{describe_reference(entry)}: it has {frames} frames and the clip {num_frames}; the pipeline uses the"
            f" control clip's first {num_frames} frames and never stretches it (its motion would change); give a"
            f" control clip of at least {num_frames} frames, or a shorter clip (--num-frames)",
        )


def control_size(width: int, height: int, pipeline: str, downscale: int) -> tuple[int, int]:
    """The size the control clip is encoded at: the size of the pass it conditions (two-stage: stage 1, half the
    clip's), divided by the factor."""
    stage = 2 if pipeline == TWO_STAGE else 1
    return width // stage // downscale, height // stage // downscale


def require_downscale_fits(downscale: int, width: int, height: int, spatial_ratio: int, pipeline: str) -> None:
    """The control clip's size, the conditioned pass's divided by `downscale`, on the VAE's grid (see above)."""
    stage = 2 if pipeline == TWO_STAGE else 1
    where = " (two-stage conditions stage 1, at half the size)" if stage == 2 else ""
    for side, value in (("--width", width), ("--height", height)):
        multiple = stage * downscale * spatial_ratio
        if value % multiple:
            raise SpecError(
                DOWNSCALE_FIELD,
                f"{downscale} needs {side} to be a multiple of {multiple} (the control clip is encoded at {side}"
                f"{' / 2' if stage == 2 else ''} / {downscale}, which must be a multiple of the VAE's"
                f" {spatial_ratio}{where}); got {value}",
            )


def lora_downscale(paths: list[Path]) -> int | None:
    """The `reference_downscale_factor` the LoRAs' metadata states (None: none does); SpecError when
    two state different ones, or one is no whole number from 1 to MAX_DOWNSCALE."""
    stated: dict[int, Path] = {}
    for path in paths:
        try:
            raw = read_safetensors_metadata(path).get(DOWNSCALE_METADATA_KEY)
        except (OSError, ValueError):
            raw = None  # not this check's to refuse: fusing the LoRA reports a broken file
        if raw is None:
            continue
        if not str(raw).isdigit() or not 1 <= int(raw) <= MAX_DOWNSCALE:
            raise SpecError(DOWNSCALE_FIELD, f"{path.name} states {DOWNSCALE_METADATA_KEY}={raw!r}, not 1 to 8")
        stated.setdefault(int(raw), path)
    if len(stated) > 1:
        names = ", ".join(f"{path.name}: {factor}" for factor, path in stated.items())
        raise SpecError(DOWNSCALE_FIELD, f"the LoRAs state different {DOWNSCALE_METADATA_KEY} values ({names})")
    return next(iter(stated), None)


def resolve_downscale(requested: int | None, stated: int | None) -> int:
    """The factor to run: the request's, else the LoRAs', else diffusers' default; SpecError on a conflict."""
    if requested is not None and stated is not None and requested != stated:
        raise SpecError(
            DOWNSCALE_FIELD,
            f"{requested} differs from the {stated} the IC-LoRA was trained with ({DOWNSCALE_METADATA_KEY} in its"
            " metadata); leave --reference-downscale out to use it",
        )
    return requested if requested is not None else stated if stated is not None else DEFAULT_DOWNSCALE


def stored_reference_name(source: str) -> str:
    """The file a job keeps its control clip under (the source's suffix kept, for people reading the folder)."""
    suffix = Path(source).suffix.lower()
    return f"reference_video{suffix if re.fullmatch(r'[.][a-z0-9]{1,8}', suffix) else ''}"
