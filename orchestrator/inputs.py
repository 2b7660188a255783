"""Local input files named by a job (LoRA files, the conditioning image): where they may come from.

A daemon serves whoever can reach its socket, so a job may only read files inside the configured
input roots (`paths.input_roots`), and an image must decode before the job is accepted.
"""

from __future__ import annotations

from pathlib import Path

from protocol.spec import SpecError

# Larger images are refused before decoding (a decompression bomb guard): 8K x 8K.
MAX_IMAGE_PIXELS = 8192 * 8192


def require_inside_roots(path: Path, roots: tuple[Path, ...], flag: str) -> Path:
    """The resolved path, or SpecError naming `flag` if it lies outside every root."""
    resolved = path.expanduser().resolve()
    if not any(resolved.is_relative_to(root.expanduser().resolve()) for root in roots):
        allowed = ", ".join(str(root) for root in roots)
        raise SpecError(flag, f"{path} is outside the allowed input folders ({allowed}; see paths.input_roots)")
    return resolved


def require_image(source: str, roots: tuple[Path, ...]) -> Path:
    """A readable, decodable image inside the input roots."""
    from PIL import Image, UnidentifiedImageError

    path = Path(source).expanduser()
    if not path.is_file():
        raise SpecError("image", f"{path} does not exist or is not a file")
    resolved = require_inside_roots(path, roots, "image")
    try:
        with Image.open(resolved) as image:
            if image.width * image.height > MAX_IMAGE_PIXELS:
                raise SpecError("image", f"{path} is {image.width}x{image.height}; at most 8192x8192 is allowed")
            image.load()
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as exc:
        raise SpecError("image", f"cannot decode {path} as an image: {exc}") from None
    return resolved


def store_image(source: Path, target: Path) -> None:
    """Copy the image into the job directory as RGB PNG, so the job never depends on the original."""
    from PIL import Image

    with Image.open(source) as image:
        image.convert("RGB").save(target, format="PNG")
