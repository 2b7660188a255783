"""The IC-LoRA control video as diffusers' LTX2InContextPipeline takes it (pipeline_ltx2_ic_lora.py, 0.42.1).

The orchestrator checked the file and resolved the downscale factor (orchestrator/run/reference_lookup.py);
here its first frames are decoded into the pictures the pipeline resizes and centre-crops itself, and the
keyframes (with `--image` first) ride along as the pipeline's frame conditions, as it allows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import av
from diffusers.pipelines.ltx2.pipeline_ltx2_ic_lora import LTX2ReferenceCondition

from protocol.errors import InvalidInput
from protocol.job_record import ResolvedReference
from services import media


def in_context_inputs(job_dir: Path, reference: ResolvedReference, keyframes: list[Any]) -> dict[str, Any]:
    """The pipeline's conditioning keywords: the control clip, its factor, and any keyframes."""
    frames = read_first_frames(job_dir / reference.file, reference.frames_used)
    return {
        "reference_conditions": [LTX2ReferenceCondition(frames=frames, strength=reference.strength)],
        "reference_downscale_factor": reference.downscale,
        "conditions": keyframes or None,
    }


def read_first_frames(path: Path, count: int) -> list[Any]:
    """The first `count` frames as RGB PIL images, the form diffusers' `load_video` gives the pipeline
    (it trims to the clip's frames itself; decoding no more than those keeps a long clip out of memory).
    InvalidInput when the file does not decode that far: the orchestrator read only its header."""
    frames: list[Any] = []
    try:
        with av.open(str(path)) as container:
            for frame in container.decode(media.video_stream(container)):
                frames.append(frame.to_image())
                if len(frames) == count:
                    break
    except (av.error.FFmpegError, IndexError) as exc:  # IndexError: no video stream at all
        raise InvalidInput(f"--reference-video: cannot decode {path.name}: {exc}") from exc
    if len(frames) < count:
        raise InvalidInput(f"--reference-video: {path.name} decodes to {len(frames)} frames, fewer than {count}")
    return frames
