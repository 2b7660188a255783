"""Retake: regenerate pixel frames A..B of a finished clip and keep the rest, and the frame math that says
which ranges are whole latent frames.

Lightricks defines retake in ltx-pipelines' `retake.py` (`RetakePipeline`) with ltx-core's
`TemporalRegionMask` (conditioning/types/noise_mask_cond.py): every token whose time span meets the window
[start, end) gets denoise mask 1 and is regenerated from noise; every other token has mask 0, so it starts at
the source's clean latent, is denoised at timestep 0 and blended back to that latent after every step. Video
latent frame k spans pixel frames [(k-1)*r + 1, k*r + 1) (latent 0: frame 0 alone; r the VAE's temporal
compression, 8 for LTX-2, 4 on the tiny test models); audio latent l spans mel frames
[max(0, 4l - 3), 4l + 1) (the audio patchifier's causal offset). The window of frames A..B is
[A / fps, (B + 1) / fps).

SOURCE is a finished job's id (its latents are held as they are) or a video file, as ltx-pipelines' retake takes
one (`RetakePipeline.__call__(video_path=...)`): the diffusion stage first encodes the file's frames with the
video VAE and its audio with the audio VAE (ltx-pipelines' `video_latent_from_file` and `audio_latent_from_file`),
then holds those latents as it holds a job's. The file must be what the VAE encodes as it is, which
ltx-pipelines' `main()` checks too: 8n+1 frames and a size that is a multiple of 32 (nothing is resampled; it
refuses the rest with the frame count to cut to), and the clip keeps its frame rate. A file without an audio
stream has no audio to keep: as ltx-pipelines does then (no audio conditioning), the whole track is generated
afresh with the retaken video.

A range that is not whole latent frames is refused with the nearest ranges that are, as keyframes are: the
tokens are latent frames, so regenerating frame 6 alone would regenerate frames 5 to 8, and widening the range
silently would change frames the user asked to keep.

Torch-free: the orchestrator checks a retake before any job exists; workers read the resolved one from
job.json (protocol.job_record.ResolvedRetake).
"""

from __future__ import annotations

from protocol.spec_rules import (
    FRAME_MULTIPLE,
    MAX_FRAMES,
    MAX_SIZE,
    MIN_FRAMES,
    MIN_SIZE,
    SIZE_MULTIPLE,
    SpecError,
    nearest_frames,
    nearest_sizes,
)

# The fields' names: SpecError names `--retake` (`ltx2 retake SOURCE`), `--from-frame` and `--to-frame`.
RETAKE_FIELD = "retake"
FROM_FIELD = "from_frame"
TO_FIELD = "to_frame"
# What a retake's source is (protocol.job_record.ResolvedRetake.kind): a finished job's latents, or a video file
# the diffusion stage encodes first.
LATENTS_SOURCE = "latents"
VIDEO_SOURCE = "video"
# The audio VAE packs 4 mel frames into one latent (AutoencoderKLLTX2Audio's LATENT_DOWNSAMPLE_FACTOR in
# diffusers 0.42.1; ltx-core's AudioPatchifier.audio_latent_downsample_factor).
AUDIO_LATENT_MEL_FRAMES = 4
#: What the retake's audio is, said once for --help, the docs and the sidecar.
RETAKE_AUDIO_NOTE = (
    "the audio is retaken as the video is (ltx-pipelines' TemporalRegionMask for audio): the audio latents whose"
    " time span meets the range's window are generated afresh, denoised beside the source's audio latents around"
    " them, which are held through the denoising and kept bit for bit"
)

#: What the retake of a video file without an audio stream does with the audio.
RETAKE_NO_AUDIO_NOTE = (
    "the source file has no audio stream, so there is no audio to keep: the whole track is generated afresh with"
    " the retaken video (as ltx-pipelines' retake does when its source has no audio)"
)


def require_retake_file(frames: int, width: int, height: int) -> None:
    """SpecError naming --retake unless a video file is what the VAE encodes as it is and a clip may be: 8n+1
    frames and sides that are multiples of 32, within the spec's bounds (ltx-pipelines' retake refuses the rest
    likewise; nothing is resampled, since the frames outside the range must stay the file's)."""
    if frames % FRAME_MULTIPLE != 1 or not MIN_FRAMES <= frames <= MAX_FRAMES:
        raise SpecError(
            RETAKE_FIELD,
            f"the video has {frames} frames; a retake encodes the file as it is, so it needs {FRAME_MULTIPLE}n+1"
            f" frames between {MIN_FRAMES} and {MAX_FRAMES} (the VAE packs frame 0 alone, then every"
            f" {FRAME_MULTIPLE}): cut it to {' or '.join(map(str, nearest_frames(frames)))} frames",
        )
    for side, value in (("width", width), ("height", height)):
        if value % SIZE_MULTIPLE or not MIN_SIZE <= value <= MAX_SIZE:
            raise SpecError(
                RETAKE_FIELD,
                f"the video is {width}x{height}; a retake encodes the file as it is, so its width and height must be"
                f" multiples of {SIZE_MULTIPLE} between {MIN_SIZE} and {MAX_SIZE} (crop or scale its {side} to"
                f" {' or '.join(map(str, nearest_sizes(value)))})",
            )


def latent_of(frame: int, ratio: int) -> int:
    """The latent frame that holds pixel `frame`."""
    return 0 if frame <= 0 else (frame - 1) // ratio + 1


def first_frame_of(latent: int, ratio: int) -> int:
    """The first pixel frame of latent frame `latent`."""
    return 0 if latent == 0 else (latent - 1) * ratio + 1


def last_frame_of(latent: int, ratio: int) -> int:
    """The last pixel frame of latent frame `latent`."""
    return latent * ratio


def latent_span(first: int, last: int, ratio: int) -> tuple[int, int]:
    """The latent frames [start, stop) that pixel frames first..last touch: the ones TemporalRegionMask
    regenerates for the window [first / fps, (last + 1) / fps)."""
    return latent_of(first, ratio), latent_of(last, ratio) + 1


def nearest_starts(frame: int, ratio: int) -> list[int]:
    """The latent frames' first frames either side of `frame`."""
    start = latent_of(frame, ratio)
    return sorted({first_frame_of(start, ratio), first_frame_of(start + 1, ratio)})


def nearest_ends(frame: int, ratio: int, num_frames: int) -> list[int]:
    """The latent frames' last frames either side of `frame`, inside the clip."""
    end = latent_of(frame, ratio)
    found = {last_frame_of(max(end - 1, 0), ratio), last_frame_of(end, ratio)}
    return sorted(value for value in found if value < num_frames)


def require_range(first: int, last: int, ratio: int, num_frames: int) -> None:
    """SpecError naming --from-frame or --to-frame unless first..last (in order: JobSpec checks that) lies in
    the clip and is whole latent frames."""
    if last >= num_frames:
        raise SpecError(TO_FIELD, f"{last} is outside the source's {num_frames} frames (0 to {num_frames - 1})")
    grid = f"the VAE packs frame 0 alone, then every {ratio} frames into one latent frame"
    if first != first_frame_of(latent_of(first, ratio), ratio):
        nearest = " or ".join(map(str, nearest_starts(first, ratio)))
        raise SpecError(
            FROM_FIELD,
            f"{first} is not where a latent frame starts ({grid}: 0, 1, {ratio + 1}, {2 * ratio + 1}, ...); nearest"
            f" allowed: {nearest}",
        )
    if last != last_frame_of(latent_of(last, ratio), ratio):
        nearest = " or ".join(map(str, nearest_ends(last, ratio, num_frames)))
        raise SpecError(
            TO_FIELD,
            f"{last} is not where a latent frame ends ({grid}: 0, {ratio}, {2 * ratio}, ...); nearest allowed:"
            f" {nearest}",
        )


def audio_latent_span(first: int, last: int, fps: float, count: int, mel_per_second: float) -> tuple[int, int]:
    """The audio latents [start, stop) of a track of `count` whose time span meets frames first..last's window,
    as TemporalRegionMask marks them (`mel_per_second`: the audio VAE's sample rate / hop length)."""
    window_start, window_end = first / fps, (last + 1) / fps
    inside = [
        index
        for index in range(count)
        if (AUDIO_LATENT_MEL_FRAMES * index + 1) / mel_per_second > window_start
        and max(0, AUDIO_LATENT_MEL_FRAMES * index + 1 - AUDIO_LATENT_MEL_FRAMES) / mel_per_second < window_end
    ]
    return (inside[0], inside[-1] + 1) if inside else (count, count)
