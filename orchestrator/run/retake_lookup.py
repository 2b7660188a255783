"""The clip a request retakes (`--retake SOURCE`, `ltx2 retake SOURCE`), found and checked before any job exists.

SOURCE is a finished job's id. Its latents file (latents.safetensors) is what the retake starts from: the
latent frames outside the range are held at those values, so they come out bit for bit the source's. An
extension's job is refused: its latents are the new part only, not the joined video it published. A video file
is refused too for now: it would have to be VAE-encoded first (then "bit for bit" would hold against that
encoding), which the diffusion stage does not do yet.

The source lends the retake its model, size (with its crop), frame count and frame rate; a request that gives
another is refused, since the held latents have the source's shape. The range's frame math is
protocol/retake.py's; what comes out is recorded in job.json as protocol.job_record.ResolvedRetake, with the
SHA-256 of the latents' bytes for the request digest (DESIGN.md rule 12), and the file is hard-linked into the
job by JobDir.create (a finished job's latents are replaced by rename, never rewritten in place).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from config.settings import Settings
from orchestrator.run.jobdir import JOB_ID_PATTERN, finished_job_record
from orchestrator.run.request_digest import FileHashes
from protocol.files import LATENTS_FILE, RETAKE_SOURCE_FILE
from protocol.job_record import JobRecord, ResolvedRetake
from protocol.retake import RETAKE_FIELD, latent_span, require_range
from protocol.spec import JobSpec
from protocol.spec_rules import SpecError

# What the source lends the retake; the retake must keep each (its latents have the source's shape and timing).
SOURCE_FIELDS = ("model", "width", "height", "crop_width", "crop_height", "num_frames", "fps")


@dataclasses.dataclass(frozen=True)
class RetakeSource:
    """A finished job to retake: its latents file and its record."""

    latents: Path
    job: JobRecord


def find_retake_source(source: object, settings: Settings) -> RetakeSource:
    """The finished job `source` names; SpecError naming --retake when there is none to retake."""
    if not isinstance(source, str) or not JOB_ID_PATTERN.fullmatch(source):
        raise SpecError(
            RETAKE_FIELD,
            f"must name a finished job's id (ltx2 jobs lists them); got {source!r} (retaking a video file is not"
            " supported yet: it would first have to be encoded with the VAE)",
        )
    folder = settings.jobs_dir / source
    record = finished_job_record(settings.jobs_dir, source, RETAKE_FIELD, "only a finished job can be retaken")
    if record.extension is not None:
        raise SpecError(
            RETAKE_FIELD,
            f"job {source} is an extension: its latents hold only its new part, not the joined video it published",
        )
    latents = folder / LATENTS_FILE
    if not latents.is_file():
        raise SpecError(RETAKE_FIELD, f"job {source} is done but its latents {latents} are gone")
    return RetakeSource(latents, record)


def retake_defaults(found: RetakeSource, request: dict[str, Any]) -> dict[str, Any]:
    """The source's model, size, crop, frame count and frame rate for the fields the request leaves out."""
    spec = found.job.spec
    lent = {name: getattr(spec, name) for name in SOURCE_FIELDS}
    return {name: value for name, value in lent.items() if request.get(name) is None and value is not None}


def resolve_retake(spec: JobSpec, found: RetakeSource, ratio: int, hashes: FileHashes) -> ResolvedRetake:
    """The retake checked against its source (same shape and timing; the range whole latent frames) and recorded."""
    source = found.job.spec
    for name in SOURCE_FIELDS:
        if getattr(spec, name) != getattr(source, name):
            raise SpecError(
                name,
                f"{getattr(spec, name)} differs from the source job's {getattr(source, name)}; a retake keeps the"
                " source's latents outside the range, so it has the source's model, size, frames and fps (leave"
                " it out)",
            )
    first, last = spec.from_frame or 0, spec.to_frame or 0
    require_range(first, last, ratio, source.num_frames)
    start, stop = latent_span(first, last, ratio)
    return ResolvedRetake(
        source=found.job.id,
        file=RETAKE_SOURCE_FILE,
        sha256=hashes.of(found.latents),
        frames=source.num_frames,
        from_frame=first,
        to_frame=last,
        start=start,
        stop=stop,
    )
