"""Local input files named by a job (LoRA files, the conditioning image, keyframes): where they may come from.

A daemon serves whoever can reach its socket, so a job may only read files inside the configured
input roots (`paths.input_roots`). The roots are checked before the file system is touched, so a
path outside them gets the same error whether or not it exists: error messages cannot be used
to probe which files the daemon's user can see.

The daemon only reads an image's header (format and size), or a video's (its frame count, from its
MP4 boxes: orchestrator/run/video_header.py); their pixels are decoded by the worker, so a large file
never swells the long-lived daemon.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

from orchestrator.run.video_header import VideoHeaderError, read_video_header
from protocol.conditions import CONDITION_FIELD
from protocol.spec_rules import SpecError

# Larger images are refused from their header, before anything decodes them: 8K x 8K.
MAX_IMAGE_PIXELS = 8192 * 8192


def require_inside_roots(path: Path, roots: tuple[Path, ...], flag: str) -> Path:
    """The resolved path, or SpecError naming `flag` if it lies outside every root.

    First a lexical check (no file system access) of the absolute path, then, for a path inside,
    a check of its symlinks' target: both failures give the same message.
    """
    allowed = [os.path.abspath(root.expanduser()) for root in roots]
    allowed += [str(Path(root).resolve()) for root in allowed]  # a root may itself be a symlink
    absolute = Path(os.path.abspath(path.expanduser()))
    if is_inside(absolute, allowed):
        resolved = absolute.resolve()
        if is_inside(resolved, allowed):
            return resolved
    shown = ", ".join(str(root) for root in roots)
    raise SpecError(flag, f"{path} is outside the allowed input folders ({shown}; see paths.input_roots)")


def is_inside(path: Path, roots: list[str]) -> bool:
    return any(path.is_relative_to(root) for root in roots)


def require_image(source: str, roots: tuple[Path, ...]) -> Path:
    """A readable image inside the input roots, judged by its header only (format and size)."""
    from PIL import Image, UnidentifiedImageError

    path = Path(source).expanduser()
    resolved = require_file(path, roots, "image")
    try:
        with Image.open(resolved) as image:  # reads the header; the pixels stay undecoded
            width, height = image.size
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as exc:
        raise SpecError("image", f"cannot decode {path} as an image: {exc}") from None
    require_pixels(width, height, path, "image")
    return resolved


def require_file(path: Path, roots: tuple[Path, ...], field: str) -> Path:
    """The resolved path of a file inside the input roots, or SpecError naming `field`."""
    resolved = require_inside_roots(path, roots, field)
    if not resolved.is_file():
        raise SpecError(field, f"{path} does not exist or is not a file")
    return resolved


def require_pixels(width: int, height: int, path: Path, field: str) -> None:
    if width * height > MAX_IMAGE_PIXELS:
        raise SpecError(field, f"{path} is {width}x{height}; at most 8192x8192 is allowed")


@dataclasses.dataclass(frozen=True)
class ConditionFile:
    """A keyframe's file as its header describes it."""

    path: Path  #: resolved, inside the input roots
    kind: str  #: "image" or "video"
    frames: int  #: 1 for an image


def inspect_condition(source: str, roots: tuple[Path, ...]) -> ConditionFile:
    """A readable image or MP4/QuickTime video inside the input roots, judged by its header only."""
    from PIL import Image, UnidentifiedImageError

    path = Path(source).expanduser()
    resolved = require_file(path, roots, CONDITION_FIELD)
    try:
        with Image.open(resolved) as image:  # an image: one frame (an animated one counts by its first)
            require_pixels(*image.size, path, CONDITION_FIELD)
            return ConditionFile(resolved, "image", 1)
    except UnidentifiedImageError:
        pass  # not an image: a video?
    except (OSError, Image.DecompressionBombError) as exc:
        raise SpecError(CONDITION_FIELD, f"cannot read {path}: {exc}") from None
    try:
        header = read_video_header(resolved)
    except (VideoHeaderError, OSError) as exc:
        raise SpecError(CONDITION_FIELD, f"cannot read {path} as an image or an MP4/MOV video: {exc}") from None
    require_pixels(header.width, header.height, path, CONDITION_FIELD)
    return ConditionFile(resolved, "video", header.frames)


def store_image(source: Path, target: Path) -> None:
    """Copy an input file (the image, a keyframe) into the job directory as it is, so the job never
    depends on the original; the worker decodes it (any format PIL or PyAV reads, whatever the suffix)."""
    shutil.copyfile(source, target)


def store_video(source: Path, target: Path) -> None:
    """Put a video to extend into the job directory: a hard link where both lie on one file system (a
    finished job's video is never rewritten in place, and a chain's growing joined video would otherwise
    be copied whole by every segment), else a copy."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)
