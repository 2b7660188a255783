"""Audio-to-video: a soundtrack the clip is generated to fit (`--audio PATH`).

Followed: Lightricks' ltx-pipelines `A2VidPipelineTwoStage`
(packages/ltx-pipelines/src/ltx_pipelines/a2vid_two_stage.py, with ltx-core's `encode_audio` and
`AudioProcessor` in packages/ltx-core/src/ltx_core/model/audio_vae/ and `decode_audio_from_file` in
packages/ltx-pipelines/src/ltx_pipelines/utils/media_io/decode.py). What it does decides what is checked:

- **The track is read from its start for the clip's duration** (`num_frames / fps`, its
  `audio_max_duration` default): a longer track is trimmed to it (a notice says so when the header tells).
- **A shorter track is refused.** The reference asserts that the encoded latents have the clip's audio
  shape (ltx-core `LatentTools.create_initial_state`); it neither pads nor loops. Padding with silence
  would hold the clip's end to a silence nobody asked for. The orchestrator reads no audio (it imports
  no decoder), so this is refused by the diffusion stage, which decodes the file (exit code 2, naming
  `--audio` and the file).
- **The audio is held, not generated.** Its latents are the audio VAE's encoding of the track's log-mel
  spectrogram; they stay fixed through every step of both stages (the reference's `frozen=True,
  noise_scale=0.0`: denoise mask 0, audio timestep and sigma 0) while the video is denoised attending
  to them (services/held_audio.py).
- **The MP4 carries the track itself**, trimmed, not the VAE's reconstruction: the reference returns
  "the original input audio instead of VAE-decoded audio to preserve fidelity".
- **Not with --extend or --retake**: both already decide the clip's audio (the source's encoded audio held
  over the overlap, the source's own latents outside the range); combining them with a soundtrack is left
  for later.

Torch-free: the orchestrator checks and copies the file; the worker reads protocol.job_record.ResolvedAudio.
"""

from __future__ import annotations

import re
from pathlib import Path

from protocol.spec_rules import SpecError, require_path_text

AUDIO_FIELD = "audio"
# What PyAV is asked to read: WAV, MP3, FLAC, Ogg, and AAC (or any codec) in an MP4/M4A/MOV; the first
# audio stream of anything FFmpeg opens is used, so this is advice for the message, not a filter.
AUDIO_FORMATS = "WAV, MP3, FLAC, Ogg, or AAC in an MP4/M4A"
# Header bytes of the formats above (RIFF/WAVE, ID3-tagged or bare MPEG audio, FLAC, Ogg, ISO media):
# a file that starts with none of them is refused before a job exists.
AUDIO_MAGIC = (b"RIFF", b"ID3", b"\xff\xfb", b"\xff\xf3", b"\xff\xf2", b"\xff\xf1", b"\xff\xf9", b"fLaC", b"OggS")
ISO_MEDIA_BOX = b"ftyp"  # at offset 4 in MP4/M4A/MOV


def require_audio(source: str, field: str = AUDIO_FIELD) -> None:
    """The field's own shape: a path (`field`: the declared field's name, which the rules are called with)."""
    if not isinstance(source, str) or not source.strip():
        raise SpecError(field, f"needs a path to an audio file ({AUDIO_FORMATS})")
    require_path_text(source, field)


def require_audio_fits_request(source: str | None, extend: str | None, retake: str | None) -> None:
    """The refusals that need other fields (see above)."""
    if source is None:
        return
    for flag, value in (("--extend", extend), ("--retake", retake)):
        if value is not None:
            raise SpecError(
                AUDIO_FIELD,
                f"{source}: a soundtrack cannot be combined with {flag}, which already decides the clip's audio",
            )


def looks_like_audio(head: bytes) -> bool:
    """Whether a file's first bytes are those of a format PyAV reads a soundtrack from."""
    return head.startswith(AUDIO_MAGIC) or head[4:8] == ISO_MEDIA_BOX


def audio_suffix(head: bytes) -> str:
    """A file suffix for an upload of this format (for people reading the uploads folder; PyAV reads the bytes)."""
    for magic, suffix in ((b"RIFF", "wav"), (b"fLaC", "flac"), (b"OggS", "ogg")):
        if head.startswith(magic):
            return suffix
    return "m4a" if head[4:8] == ISO_MEDIA_BOX else "mp3"


def stored_audio_name(source: str) -> str:
    """The file a job keeps its soundtrack under (the source's suffix kept, for people reading the folder)."""
    suffix = Path(source).suffix.lower()
    return f"input_audio{suffix if re.fullmatch(r'[.][a-z0-9]{1,8}', suffix) else ''}"


def clip_samples(num_frames: int, fps: float, sample_rate: int) -> int:
    """How many samples at `sample_rate` cover the clip (`round(num_frames / fps * sample_rate)`, the
    reference's `max_samples = round(max_duration * sample_rate)`)."""
    return round(num_frames / fps * sample_rate)
