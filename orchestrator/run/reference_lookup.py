"""A request's IC-LoRA control video (`--reference-video`) checked before any job exists.

The file must lie inside the input roots and be an MP4/QuickTime video whose header gives its frames
and size (orchestrator/run/video_header.py; no decoder in the orchestrator); it must have at least the
clip's frames, and the downscale factor (the request's, else the LoRAs' metadata, else 1) must put the
reduced size on the VAE's grid (protocol/control_video.py says why each is refused or resampled).
What comes out is recorded in job.json as protocol.job_record.ResolvedReference, and the factor is
written into the spec, so the diffusion stage does no lookup and reads nothing outside its job
directory (DESIGN.md rule 12).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from orchestrator.run.inputs import require_file
from orchestrator.run.model_lookup import ResolvedModel
from orchestrator.run.request_digest import FileHashes
from orchestrator.run.video_header import VideoHeaderError, read_video_header
from protocol.control_video import (
    REFERENCE_FIELD,
    control_size,
    describe_reference,
    lora_downscale,
    require_downscale_fits,
    require_reference_frames,
    resolve_downscale,
    stored_reference_name,
)
from protocol.families import vae_spatial_ratio
from protocol.job_record import ResolvedReference
from protocol.spec import JobSpec
from protocol.spec_rules import TWO_STAGE, SpecError

#: A checked control video: its file (to copy into the job) and what job.json records of it.
CheckedReference = tuple[Path, ResolvedReference]


def resolve_reference(
    spec: JobSpec,
    model: ResolvedModel,
    loras: tuple[dict[str, Any], ...],
    roots: tuple[Path, ...],
    hashes: FileHashes,
    notices: list[str],
) -> tuple[JobSpec, CheckedReference | None]:
    """(the spec with its downscale factor resolved, the checked control video); the spec unchanged and
    None without one. A notice says when the clip is trimmed or its pictures resized."""
    entry = spec.reference_video
    if entry is None:
        return spec, None
    downscale = resolve_downscale(spec.reference_downscale, lora_downscale([Path(lora["path"]) for lora in loras]))
    require_downscale_fits(downscale, spec.width, spec.height, vae_spatial_ratio(model.path), spec.pipeline)
    path = require_file(Path(entry["source"]).expanduser(), roots, REFERENCE_FIELD)
    try:
        header = read_video_header(path)
    except (VideoHeaderError, OSError) as exc:
        raise SpecError(REFERENCE_FIELD, f"cannot read {entry['source']} as an MP4/MOV video: {exc}") from None
    require_reference_frames(entry, header.frames, spec.num_frames)
    record = ResolvedReference(
        source=entry["source"],
        file=stored_reference_name(entry["source"]),
        sha256=hashes.of(path),
        frames=header.frames,
        width=header.width,
        height=header.height,
        frames_used=spec.num_frames,
        strength=float(entry.get("strength", 1.0)),
        downscale=downscale,
    )
    size = control_size(spec.width, spec.height, spec.pipeline, downscale)
    notices.extend(resampling_notices(entry, record, *size, spec.pipeline == TWO_STAGE))
    return spec.with_changes(reference_downscale=downscale), (path, record)


def resampling_notices(
    entry: dict[str, Any], record: ResolvedReference, width: int, height: int, two_stage: bool
) -> list[str]:
    """What the pipeline does to the control clip that the user may not expect: trimming and resizing."""
    shown = f"--reference-video {describe_reference(entry)}"
    notices = []
    if record.frames > record.frames_used:
        notices.append(f"{shown}: uses the first {record.frames_used} of its {record.frames} frames")
    if (record.width, record.height) != (width, height):
        notices.append(
            f"{shown}: its {record.width}x{record.height} frames are resized and centre-cropped to {width}x{height}"
            f" ({'stage 1' if two_stage else 'the clip'}'s size / {record.downscale})"
        )
    return notices
