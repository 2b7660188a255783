"""The video a request extends (`--extend SOURCE`, `ltx2 extend SOURCE`), found and checked before any job exists.

SOURCE is a finished job's id or a video file. A job's video is the file its job directory holds (what it
published): the joined video of a job that was itself an extension, so extending it continues the whole
thing; else its video.mp4. A file must lie inside the input roots and be an MP4/QuickTime video whose frames,
size and frame rate its header gives (orchestrator/run/video_header.py: the daemon decodes nothing).

A job source lends the new clip its model, size (with its crop) and frame rate, a file its size and frame
rate, for whatever the request leaves out (`source_defaults`); the clip must then deliver the source's size
at the source's frame rate, or the two could not be one video. The overlap's frame math is
protocol/extension.py's; what comes out is recorded in job.json as protocol.job_record.ResolvedExtension,
with the SHA-256 of the source's bytes for the request digest (DESIGN.md rule 12), and the file is copied
(hard-linked where it can be: nothing rewrites a finished video in place) into the job by JobDir.create.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

from config.settings import Settings
from orchestrator.run.inputs import require_file, require_pixels
from orchestrator.run.jobdir import JOB_ID_PATTERN, finished_job_record
from orchestrator.run.request_digest import FileHashes
from orchestrator.run.video_header import VideoHeader, VideoHeaderError, read_video_header
from protocol.conditions import describe_entry
from protocol.extension import EXTEND_FIELD, default_overlap, require_overlap
from protocol.files import EXTEND_SOURCE_FILE, JOINED_FILE, VIDEO_FILE
from protocol.job_record import JobRecord, ResolvedCondition, ResolvedExtension
from protocol.spec import JobSpec
from protocol.spec_rules import SIZE_MULTIPLE, SpecError

# Fields a job source lends the new clip when the request leaves them out (the crop with the size: a clip the
# gateway delivered at 720 rows was rendered at 736 and cropped, and its extension is made the same way).
JOB_DEFAULTS = ("model", "width", "height", "crop_width", "crop_height", "fps")
# Two frame rates closer than this are one (a header's rate is a ratio of its time scale and durations).
FPS_TOLERANCE = 1e-3


@dataclasses.dataclass(frozen=True)
class ExtensionSource:
    """A source found: its video file, what its header says, and its job's record when it is a job."""

    path: Path
    header: VideoHeader
    job: JobRecord | None = None


def find_source(source: object, settings: Settings) -> ExtensionSource:
    """The video `source` names (a job id or a file); SpecError naming --extend when there is none."""
    if not isinstance(source, str) or not source.strip():
        raise SpecError(EXTEND_FIELD, f"must name a finished job's id or a video file; got {source!r}")
    if JOB_ID_PATTERN.fullmatch(source):
        return job_source(source, settings.jobs_dir)
    path = require_file(Path(source).expanduser(), settings.input_roots, EXTEND_FIELD)
    return ExtensionSource(path, read_header(path, source))


def job_source(job_id: str, jobs_dir: Path) -> ExtensionSource:
    """A finished job's video: the joined one of an extension, else its video.mp4."""
    folder = jobs_dir / job_id
    record = finished_job_record(jobs_dir, job_id, EXTEND_FIELD, "only a finished job's video can be extended")
    video = folder / (JOINED_FILE if record.extension is not None else VIDEO_FILE)
    if not video.is_file():
        raise SpecError(EXTEND_FIELD, f"job {job_id} is done but its video {video} is gone")
    return ExtensionSource(video, read_header(video, job_id), record)


def read_header(path: Path, shown: str) -> VideoHeader:
    try:
        header = read_video_header(path)
    except (VideoHeaderError, OSError) as exc:
        raise SpecError(EXTEND_FIELD, f"cannot read {shown} as an MP4/MOV video: {exc}") from None
    require_pixels(header.width, header.height, path, EXTEND_FIELD)
    return header


def source_defaults(found: ExtensionSource, request: dict[str, Any]) -> dict[str, Any]:
    """The fields the source lends a request that leaves them out: a job's model, size, crop and frame
    rate; a file's size (rendered at the next multiple of 32, cropped back to it) and frame rate."""
    if found.job is not None:
        spec = found.job.spec
        lent = {name: getattr(spec, name) for name in JOB_DEFAULTS}
    else:
        width, height = found.header.width, found.header.height
        lent = {"width": rendered_side(width), "height": rendered_side(height), "fps": found.header.fps}
        lent["crop_width"] = width if width != lent["width"] else None
        lent["crop_height"] = height if height != lent["height"] else None
    if request.get("width") is not None or request.get("height") is not None:
        lent.pop("crop_width", None)  # a size of the request's own is delivered whole unless it crops itself
        lent.pop("crop_height", None)
    return {name: value for name, value in lent.items() if request.get(name) is None and value is not None}


def rendered_side(side: int) -> int:
    """The side a source's `side` renders at: the next multiple the VAE takes (the rest is cropped off)."""
    return max(SIZE_MULTIPLE, math.ceil(side / SIZE_MULTIPLE) * SIZE_MULTIPLE)


def default_overlap_for(found: ExtensionSource, ratio: int, num_frames: object) -> int | None:
    """The overlap a request without --overlap gets (None when --num-frames is not a number yet: the spec's
    own check names it)."""
    if not isinstance(num_frames, int) or isinstance(num_frames, bool):
        return None
    return default_overlap(ratio, num_frames, found.header.frames)


def resolve_extension(
    spec: JobSpec,
    found: ExtensionSource,
    ratio: int,
    conditions: tuple[ResolvedCondition, ...],
    hashes: FileHashes,
) -> ResolvedExtension:
    """The extension checked against the clip (size, frame rate, overlap, keyframes) and recorded."""
    header = found.header
    overlap = spec.overlap if spec.overlap is not None else 0
    require_overlap(overlap, ratio, spec.num_frames, header.frames)
    _, _, width, height = spec.crop_box
    if (width, height) != (header.width, header.height):
        raise SpecError(
            "width" if width != header.width else "height",
            f"the clip delivers {width}x{height} but the source is {header.width}x{header.height}; the joined"
            " video has one size (leave --width and --height out to take the source's)",
        )
    if header.fps is not None and abs(header.fps - spec.fps) > FPS_TOLERANCE:
        raise SpecError(
            "fps",
            f"{spec.fps:g} differs from the source's {header.fps:g}; the joined video has one frame rate (leave"
            " --fps out to take the source's)",
        )
    for condition in conditions:
        if condition.frame < overlap:
            entry = {"source": condition.source, "frame": condition.frame, "strength": condition.strength}
            raise SpecError(
                "condition",
                f"{describe_entry(entry)}: frame {condition.frame} lies in the overlap (frames 0 to {overlap - 1} are"
                " the source's); place keyframes at or after --overlap",
            )
    return ResolvedExtension(
        source=spec.extend or "",
        source_job=found.job.id if found.job is not None else None,
        file=EXTEND_SOURCE_FILE,
        sha256=hashes.of(found.path),
        frames=header.frames,
        width=header.width,
        height=header.height,
        fps=header.fps if header.fps is not None else spec.fps,
        overlap=overlap,
    )
