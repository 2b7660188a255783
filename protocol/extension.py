"""Extension: a new clip whose first K frames are the last K frames of a source video, and the frame
math that says which K are allowed.

The source's last K frames become a video condition at pixel frame 0 with strength 1 (diffusers'
`LTX2VideoCondition(frames, index=0, strength=1.0)` in pipeline_ltx2_condition.py, 0.42.1; Lightricks'
`VideoConditionByLatentIndex` in ltx-core's conditioning/types/latent_cond.py): the pipeline encodes
them with the VAE and holds the first latent frames of the new clip at those clean latents for the
whole denoising. The VAE packs frame 0 alone and then every r frames (its temporal compression: 8 for
LTX-2, 4 for the tiny test models) into one latent frame, so a video condition covers r * m + 1
frames; an overlap that is no such count is refused with the nearest that are, never trimmed silently.

The new part renders N frames. The joined video is the source's S frames followed by the new part's
frames after the overlap (K to N - 1): S + N - K frames. Its audio is the source's up to where the
overlap starts, then an equal-power crossfade over the overlap from the source's audio into the new
part's, then the new part's: diffusers 0.42.1 has no way to condition the new audio on the source's
(AUDIO_NOTE), so the two soundtracks do not continue each other sample for sample and the crossfade
hides the change.

Torch-free: the orchestrator checks an extension before any job exists; workers read the resolved
one from job.json (protocol.job_record.ResolvedExtension).
"""

from __future__ import annotations

from protocol.spec_rules import SpecError

# The fields' names: SpecError("extend") names `--extend` (`ltx2 extend SOURCE`), SpecError("overlap") `--overlap`.
EXTEND_FIELD = "extend"
OVERLAP_FIELD = "overlap"
# The default overlap holds 3 latent frames after the first (25 frames at LTX-2's 8: about a second at 24 fps):
# enough motion for the new part to carry on, short enough to leave most of a 121-frame clip new.
DEFAULT_OVERLAP_LATENTS = 3
#: What the new part's audio is, said once for --help, the docs and the sidecar.
AUDIO_NOTE = (
    "the new audio is generated with the new video (its first frames held to the source's), not conditioned on the"
    " source's audio: diffusers 0.42.1's LTX-2 pipelines take audio latents only as a whole starting point with one"
    " noise level and no mask; the joined video keeps the source's audio up to the overlap, crossfades (equal power)"
    " over the overlap into the new audio, then plays the new audio"
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
