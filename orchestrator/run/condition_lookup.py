"""A request's keyframes (`--condition`) checked and placed before any job exists.

Each condition's file must lie inside the input roots and be an image or an MP4/QuickTime video
(orchestrator/run/inputs.py reads only its header); its pixel frame must be where a latent frame of
this model's VAE starts, inside the clip, and a video must end inside the clip (protocol/conditions.py).
What comes out is recorded in job.json as protocol.job_record.ResolvedCondition: the file's copy in the
job, its SHA-256 (for the request digest and the sidecar), its start and latent index. So the diffusion
stage does no frame math and reads nothing outside its job directory (DESIGN.md rule 12).

`--image` given together with conditions is the first of them, at frame 0 with strength 1: one
pipeline (diffusers' LTX2ConditionPipeline) then encodes them all. Alone it stays image-to-video
(LTX2ImageToVideoPipeline), so its renders are what they were before conditions existed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from orchestrator.run.inputs import inspect_condition
from orchestrator.run.model_lookup import ResolvedModel
from orchestrator.run.request_digest import FileHashes
from protocol.conditions import (
    CRF_FIELD,
    describe_entry,
    frames_used,
    latent_index,
    resolve_start,
    stored_name,
)
from protocol.families import vae_temporal_ratio
from protocol.files import INPUT_IMAGE_FILE
from protocol.job_record import ResolvedCondition
from protocol.spec import JobSpec
from protocol.spec_rules import SpecError

#: A checked condition: its file (to copy into the job) and what job.json records of it.
CheckedCondition = tuple[Path, ResolvedCondition]


def resolve_conditions(
    spec: JobSpec,
    model: ResolvedModel,
    image: Path | None,
    roots: tuple[Path, ...],
    hashes: FileHashes,
    notices: list[str],
) -> tuple[CheckedCondition, ...]:
    """The spec's conditions (with the image first when both are given), checked and placed; a
    notice for each video of which diffusers uses fewer frames than it has."""
    if not spec.conditions and spec.reference_video is None:  # with a control video, the image is a condition
        return ()
    ratio = vae_temporal_ratio(model.path)
    checked = []
    if image is not None:
        checked.append((image, image_condition(spec.image or "", image, hashes)))
    for index, entry in enumerate(spec.conditions):
        checked.append(check_condition(entry, index, spec.num_frames, ratio, roots, hashes, notices))
    return tuple(checked)


def image_condition(source: str, image: Path, hashes: FileHashes) -> ResolvedCondition:
    """`--image` as the condition it is beside keyframes: frame 0, full strength, the family's CRF."""
    return ResolvedCondition(
        source=source,
        file=INPUT_IMAGE_FILE,
        sha256=hashes.of(image),
        kind="image",
        frames=1,
        frame=0,
        latent_index=0,
        strength=1.0,
    )


def check_condition(
    entry: dict[str, Any],
    index: int,
    num_frames: int,
    ratio: int,
    roots: tuple[Path, ...],
    hashes: FileHashes,
    notices: list[str],
) -> CheckedCondition:
    """One condition's file inspected, its start resolved and checked against the clip and the VAE."""
    found = inspect_condition(entry["source"], roots)
    if found.kind == "video" and entry.get("crf") is not None:
        raise SpecError(CRF_FIELD, f"{describe_entry(entry)} is a video; only single images are re-compressed")
    start = resolve_start(entry, found.frames, num_frames, ratio)
    used = frames_used(found.frames, ratio)
    if used < found.frames:
        notices.append(
            f"--condition {describe_entry(entry)}: uses the first {used} of its {found.frames} frames (a video"
            f" condition covers {ratio}·m+1 frames, as diffusers trims it)"
        )
    record = ResolvedCondition(
        source=entry["source"],
        file=stored_name(index, entry["source"]),
        sha256=hashes.of(found.path),
        kind=found.kind,
        frames=found.frames,
        frame=start,
        latent_index=latent_index(start, ratio),
        strength=float(entry.get("strength", 1.0)),
        crf=entry.get("crf"),
    )
    return found.path, record
