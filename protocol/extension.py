"""Extension: a new clip whose first K frames are the last K frames of a source video, and the frame
math that says which K are allowed and which audio latents the overlap holds.

The source's last K frames become a video condition at pixel frame 0 with strength 1 (diffusers'
`LTX2VideoCondition(frames, index=0, strength=1.0)` in pipeline_ltx2_condition.py, 0.42.1; Lightricks'
`VideoConditionByLatentIndex` in ltx-core's conditioning/types/latent_cond.py): the pipeline encodes
them with the VAE and holds the first latent frames of the new clip at those clean latents for the
whole denoising. The VAE packs frame 0 alone and then every r frames (its temporal compression: 8 for
LTX-2, 4 for the tiny test models) into one latent frame, so a video condition covers r * m + 1
frames; an overlap that is no such count is refused with the nearest that are, never trimmed silently.

The audio continues the same way. The source's audio under the overlap (K / fps seconds from its frame
S - K) is encoded by the audio VAE, and the new clip's first audio latents hold that encoding while the
rest are generated: ltx-pipelines has no extension pipeline, so this follows its nearest definition,
`RetakePipeline` (packages/ltx-pipelines/src/ltx_pipelines/retake.py), whose audio `ModalitySpec` starts at
the encoded track and takes ltx-core's `TemporalRegionMask` (conditioning/types/noise_mask_cond.py) over the
window it regenerates. An extension regenerates the new part after the overlap, frames K to N - 1, so the
window is [K / fps, N / fps): an audio latent whose time span meets it is generated (denoise mask 1), every
one before it is held (mask 0). Audio latent l spans mel frames [max(0, 4l - 3), 4l + 1) (the audio
patchifier's causal timing; 100 mel frames a second at 16 kHz with hop 160, so 25 latents a second), and it
is held when (4l + 1) / 100 <= K / fps: the held count is rounded down to the latents wholly inside the
overlap (held_audio_latents). A 25-frame overlap at 24 fps (1.042 s) holds 26 latents (1.01 s); the latent
that straddles the overlap's end is generated.

The new part renders N frames. The joined video is the source's S frames followed by the new part's
frames after the overlap (K to N - 1): S + N - K frames. Its audio is the source's up to where the
overlap starts, then an equal-power crossfade over the overlap from the source's audio into the new
part's, then the new part's (AUDIO_NOTE says why the crossfade stays).

Torch-free: the orchestrator checks an extension before any job exists; workers read the resolved
one from job.json (protocol.job_record.ResolvedExtension).
"""

from __future__ import annotations

import math

from protocol.retake import audio_latent_span
from protocol.spec_rules import FRAME_MULTIPLE, MAX_FRAMES, MIN_FRAMES, SpecError, frames_lasting

# The fields' names: SpecError("extend") names `--extend` (`ltx2 extend SOURCE`), SpecError("overlap") `--overlap`.
EXTEND_FIELD = "extend"
OVERLAP_FIELD = "overlap"
# The default overlap holds 3 latent frames after the first (25 frames at LTX-2's 8: about a second at 24 fps):
# enough motion for the new part to carry on, short enough to leave most of a 121-frame clip new.
DEFAULT_OVERLAP_LATENTS = 3
#: What the new part's audio is, said once for --help, the docs and the sidecar.
AUDIO_NOTE = (
    "the new audio continues the source's: the source's audio under the overlap is encoded by the audio VAE and"
    " the new clip's audio latents wholly inside the overlap are held at that encoding while the rest are"
    " generated (ltx-pipelines' retake mask over the new part); the joined video keeps the source's audio up to"
    " the overlap, crossfades (equal power) over the overlap into the new audio, then plays the new audio: the held"
    " latents decode to the vocoder's own waveform of the same sound, not the source's samples"
)


def is_allowed(overlap: int, ratio: int) -> bool:
    """Whether `overlap` frames are a whole video condition: r * m + 1."""
    return overlap >= 1 and (overlap - 1) % ratio == 0


def nearest_overlaps(overlap: int, ratio: int) -> list[int]:
    """The allowed overlaps either side of `overlap` (one below 1 is none)."""
    below = (overlap - 1) // ratio * ratio + 1
    return [count for count in (below, below + ratio) if count >= 1]


def default_overlap(ratio: int, num_frames: int, source_frames: int) -> int | None:
    """The longest allowed overlap up to DEFAULT_OVERLAP_LATENTS latent frames after the first that
    leaves the new part a frame of its own and fits inside the source (None: none fits)."""
    wanted = DEFAULT_OVERLAP_LATENTS * ratio + 1
    limit = min(wanted, num_frames - 1, source_frames)
    if limit < 1:
        return None
    return (limit - 1) // ratio * ratio + 1


def extension_frames_lasting(seconds: float, fps: float, overlap: int) -> int:
    """The fewest valid frames (8n+1) an extension renders so that its part after the `overlap` lasts at least
    `seconds` at `fps`: an extension's --seconds (and OpenAI's `seconds` of POST /v1/videos/extensions) is the
    length of what it adds, as the joined video grows by the frames after the overlap. SpecError naming
    `seconds` when no render can (frames_lasting's bounds, or more than MAX_FRAMES with the overlap)."""
    frames_lasting(seconds, fps)  # the duration's own bounds, with their message
    wanted = overlap + max(1, math.ceil(seconds * fps - 1e-9))  # at least one frame of its own
    frames = max(MIN_FRAMES, math.ceil((wanted - 1) / FRAME_MULTIPLE) * FRAME_MULTIPLE + 1)
    if frames > MAX_FRAMES:
        raise SpecError(
            "seconds",
            f"{seconds:g} s at {fps:g} fps after the {overlap}-frame overlap needs {frames} frames; at most"
            f" {MAX_FRAMES} are allowed",
        )
    return frames


def describe_extension_duration(seconds: float, fps: float, overlap: int, frames: int) -> str:
    """How an extension's requested duration became its render's frame count (a notice, the HTTP video object)."""
    added = frames - overlap
    return (
        f"{seconds:g} s at {fps:g} fps after the {overlap}-frame overlap -> {frames} frames, {added} of them new"
        f" ({added / fps:.3f} s)"
    )


def require_overlap(overlap: int, ratio: int, num_frames: int, source_frames: int) -> None:
    """SpecError naming --overlap unless `overlap` is r * m + 1, below --num-frames and inside the source."""
    if not is_allowed(overlap, ratio):
        nearest = " or ".join(map(str, nearest_overlaps(overlap, ratio)))
        raise SpecError(
            OVERLAP_FIELD,
            f"{overlap} frames cannot be a video condition: the VAE packs frame 0 alone, then every {ratio} frames"
            f" into one latent frame, so an overlap is {ratio}·m+1 frames (1, {ratio + 1}, {2 * ratio + 1}, ...);"
            f" nearest allowed: {nearest}",
        )
    if overlap >= num_frames:
        raise SpecError(
            OVERLAP_FIELD,
            f"{overlap} must be below --num-frames {num_frames}: the new part renders --num-frames frames, of which"
            " the first --overlap are the source's",
        )
    if overlap > source_frames:
        raise SpecError(OVERLAP_FIELD, f"{overlap} is more than the source's {source_frames} frames")


def joined_frames(source_frames: int, num_frames: int, overlap: int) -> int:
    """Frames of the joined video: the whole source, then the new part after the overlap."""
    return source_frames + num_frames - overlap


def held_audio_latents(overlap: int, num_frames: int, fps: float, audio_latents: int, mel_per_second: float) -> int:
    """How many of the new clip's `audio_latents` (from its start) hold the source's audio: those before the
    first whose time span meets the regenerated window [overlap / fps, num_frames / fps), as
    TemporalRegionMask marks a retake of frames overlap..num_frames - 1 (`mel_per_second`: the audio VAE's
    sample rate / hop length)."""
    return audio_latent_span(overlap, num_frames - 1, fps, audio_latents, mel_per_second)[0]
