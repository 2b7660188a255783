"""Local input files named by a job (LoRA files, the conditioning image): where they may come from.

A daemon serves whoever can reach its socket, so a job may only read files inside the configured
input roots (`paths.input_roots`). The roots are checked before the file system is touched, so a
path outside them gets the same error whether or not it exists: error messages cannot be used
to probe which files the daemon's user can see.

The daemon only reads an image's header (format and size); its pixels are decoded by the worker,
so a large image never swells the long-lived daemon.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

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
    resolved = require_inside_roots(path, roots, "image")
    if not resolved.is_file():
        raise SpecError("image", f"{path} does not exist or is not a file")
    try:
        with Image.open(resolved) as image:  # reads the header; the pixels stay undecoded
            width, height = image.size
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as exc:
        raise SpecError("image", f"cannot decode {path} as an image: {exc}") from None
    if width * height > MAX_IMAGE_PIXELS:
        raise SpecError("image", f"{path} is {width}x{height}; at most 8192x8192 is allowed")
    return resolved


def store_image(source: Path, target: Path) -> None:
    """Copy the image file into the job directory as it is, so the job never depends on the
    original; the worker decodes it (any format PIL reads, whatever the target's suffix)."""
    shutil.copyfile(source, target)
