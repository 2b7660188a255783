"""The frames an extension's clip starts with: the last `overlap` frames of the source it continues.

They become diffusers' video condition at latent index 0 with strength 1 (protocol/extension.py), which
the pipeline resizes and centre-crops to the clip's size. A source delivered smaller than the clip
renders (a 720-row video: rendered at 736 rows, cropped back) is padded, not scaled, to the rendered
size, around the crop box, so the delivered part of the condition is the source's pixels where the
clip will deliver them; the padding repeats the edge rows and columns.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from protocol.errors import InvalidInput
from protocol.job_record import ResolvedExtension
from protocol.spec import JobSpec
from services import media


def load_overlap_frames(job_dir: Path, extension: ResolvedExtension, spec: JobSpec) -> np.ndarray:
    """`[overlap, height, width, 3]` uint8 RGB: the source's last frames at the clip's rendered size;
    InvalidInput when the job's copy of the source does not decode to the frames its header promised."""
    try:
        frames = media.read_video_tail(job_dir / extension.file, extension.skipped)
    except ValueError as exc:
        raise InvalidInput(f"--extend: cannot decode the source video: {exc}") from exc
    if len(frames) != extension.overlap:
        raise InvalidInput(
            f"--extend: the source video decodes to {extension.skipped + len(frames)} frames, not the"
            f" {extension.frames} its header counts; remux it (ffmpeg -i IN -c copy OUT.mp4) or give another"
        )
    left, top, width, height = spec.crop_box
    if frames.shape[1:3] != (height, width):
        found = f"{frames.shape[2]}x{frames.shape[1]}"
        raise InvalidInput(f"--extend: the source's frames are {found}, not the {width}x{height} its header says")
    padding = ((0, 0), (top, spec.height - height - top), (left, spec.width - width - left), (0, 0))
    return np.pad(frames, padding, mode="edge")
