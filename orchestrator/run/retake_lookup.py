"""The clip a request retakes (`--retake SOURCE`, `ltx2 retake SOURCE`), found and checked before any job exists.

SOURCE is a finished job's id or a video file. A job's latents file (latents.safetensors) is what the retake
starts from: the latent frames outside the range are held at those values, so they come out bit for bit the
source's. An extension's job is refused: its latents are the new part only, not the joined video it published.
A video file (inside the input roots, an MP4/QuickTime whose frames, size, frame rate and audio track its header
gives: orchestrator/run/video_header.py, the daemon decodes nothing) is encoded with the VAEs by the diffusion
stage first, and those latents are held instead (protocol/retake.py says what the file must be, as ltx-pipelines'
retake.py requires it).

The source lends the retake its size, frame count and frame rate (a job its model and crop too); a request that
gives another is refused, since the held latents have the source's shape. The range's frame math is
protocol/retake.py's; what comes out is recorded in job.json as protocol.job_record.ResolvedRetake, with the
SHA-256 of the latents' bytes (a file's own bytes) for the request digest (DESIGN.md rule 12), and the source is
put into the job by JobDir.create: a job's latents hard-linked (a finished job's latents are replaced by rename,
never rewritten in place), a file copied.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from config.settings import Settings
from orchestrator.run.extension_lookup import FPS_TOLERANCE
from orchestrator.run.inputs import require_file, require_pixels
from orchestrator.run.jobdir import JOB_ID_PATTERN, finished_job_record
from orchestrator.run.request_digest import FileHashes
from orchestrator.run.video_header import VideoHeader, VideoHeaderError, read_video_header
from protocol.files import JOINED_FILE, LATENTS_FILE, RETAKE_SOURCE_FILE, RETAKE_SOURCE_VIDEO_FILE
from protocol.job_record import JobRecord, ResolvedRetake
from protocol.retake import (
    LATENTS_SOURCE,
    RETAKE_FIELD,
    VIDEO_SOURCE,
    latent_span,
    require_range,
    require_retake_file,
)
from protocol.spec import JobSpec
from protocol.spec_rules import SpecError

# What a job source lends the retake; the retake must keep each (its latents have the source's shape and timing).
SOURCE_FIELDS = ("model", "width", "height", "crop_width", "crop_height", "num_frames", "fps")


@dataclasses.dataclass(frozen=True)
class RetakeSource:
    """A clip to retake: a finished job's latents file and its record, or a video file and its header."""

    path: Path  #: the job's latents, or the video file (resolved, inside the input roots)
    job: JobRecord | None = None  #: the job's record (None: a file)
    header: VideoHeader | None = None  #: the file's header (None: a job)

    @property
    def lent(self) -> dict[str, Any]:
        """The fields the source decides, by name: the job's spec's, or the file's header's."""
        if self.job is not None:
            return {name: getattr(self.job.spec, name) for name in SOURCE_FIELDS}
        header = self.header
        size = {"width": header.width, "height": header.height, "crop_width": None, "crop_height": None}
        return {**size, "num_frames": header.frames, "fps": header.fps}


def find_retake_source(source: object, settings: Settings) -> RetakeSource:
    """The finished job or the video file `source` names; SpecError naming --retake when there is none to retake."""
    if not isinstance(source, str) or not source.strip():
        raise SpecError(
            RETAKE_FIELD, f"must name a finished job's id (ltx2 jobs lists them) or a video file; got {source!r}"
        )
    if not JOB_ID_PATTERN.fullmatch(source):
        return file_source(source, settings)
    folder = settings.jobs_dir / source
    record = finished_job_record(settings.jobs_dir, source, RETAKE_FIELD, "only a finished job can be retaken")
    if record.extension is not None:
        raise SpecError(
            RETAKE_FIELD,
            f"job {source} is an extension: its latents hold only its new part, not the joined video it published"
            f" (retake the joined video as a file: {folder / JOINED_FILE})",
        )
    latents = folder / LATENTS_FILE
    if not latents.is_file():
        raise SpecError(RETAKE_FIELD, f"job {source} is done but its latents {latents} are gone")
    return RetakeSource(latents, job=record)


def file_source(source: str, settings: Settings) -> RetakeSource:
    """A video file inside the input roots whose header says its frames, size and frame rate."""
    path = require_file(Path(source).expanduser(), settings.input_roots, RETAKE_FIELD)
    try:
        header = read_video_header(path)
    except (VideoHeaderError, OSError) as exc:
        raise SpecError(RETAKE_FIELD, f"cannot read {source} as an MP4/MOV video: {exc}") from None
    require_pixels(header.width, header.height, path, RETAKE_FIELD)
    require_retake_file(header.frames, header.width, header.height)
    return RetakeSource(path, header=header)


def retake_defaults(found: RetakeSource, request: dict[str, Any]) -> dict[str, Any]:
    """The source's fields (a job's model, size, crop, frame count and frame rate; a file's size, frame count and
    frame rate) for those the request leaves out."""
    return {name: value for name, value in found.lent.items() if request.get(name) is None and value is not None}


def resolve_retake(spec: JobSpec, found: RetakeSource, ratio: int, hashes: FileHashes) -> ResolvedRetake:
    """The retake checked against its source (same shape and timing; a file the VAE encodes as it is; the range
    whole latent frames) and recorded."""
    require_source_shape(spec, found)
    frames = spec.num_frames
    first, last = spec.from_frame or 0, spec.to_frame or 0
    require_range(first, last, ratio, frames)
    start, stop = latent_span(first, last, ratio)
    is_file = found.job is None
    return ResolvedRetake(
        source=spec.retake or "",
        file=RETAKE_SOURCE_VIDEO_FILE if is_file else RETAKE_SOURCE_FILE,
        sha256=hashes.of(found.path),
        frames=frames,
        from_frame=first,
        to_frame=last,
        start=start,
        stop=stop,
        kind=VIDEO_SOURCE if is_file else LATENTS_SOURCE,
        has_audio=found.header.has_audio if found.header is not None else True,
    )


def require_source_shape(spec: JobSpec, found: RetakeSource) -> None:
    """SpecError naming the field the request gave otherwise than the source: the held latents have the source's
    shape and timing."""
    lent = found.lent
    whose = "source job's" if found.job is not None else "source file's"
    kept = "model, size, frames and fps" if found.job is not None else "size, frames and fps"
    for name, value in lent.items():
        given = getattr(spec, name)
        if name == "fps" and (value is None or abs(given - value) <= FPS_TOLERANCE):
            continue  # a header without a frame rate lends none; a rate within rounding is the source's
        if given != value:
            shown = "none" if value is None else value
            raise SpecError(
                name,
                f"{given} differs from the {whose} {shown}; a retake keeps the source's latents outside the range, so"
                f" it has the source's {kept} (leave it out)",
            )
