"""The audio an extension's clip starts with: the source's track under the overlap, encoded by the audio VAE
into the latents the new clip's first audio tokens hold (protocol/extension.py says which tokens and why).

As ltx-pipelines reads a clip's audio for retake (`audio_latent_from_file` in
packages/ltx-pipelines/src/ltx_pipelines/utils/helpers.py: the track from a start time for a duration,
encoded by the audio VAE), the track is read from where the overlap starts, (S - K) / fps, for the overlap's
K / fps seconds, and encoded alone (services/soundtrack.py's spectrogram and encoder). Samples are counted
from the track's first decoded one, as services/joined_video.py counts them, so the held latents encode the
very samples the joined video plays under the overlap. A track that ends early is padded with silence there
(the joined video plays silence there too); a source without audio holds nothing, as the reference
conditions no audio when the file has none, and the new audio is generated freely.
"""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import torch

from protocol.errors import InvalidInput
from protocol.extension import held_audio_latents
from protocol.job_record import ResolvedExtension
from services import media, soundtrack


def read_overlap_track(path: Path, first: int, frames: int, fps: float) -> tuple[np.ndarray, int] | None:
    """(`[channels, samples]` float32, sample rate) of the first audio stream under video frames
    first..first + frames - 1, at the file's own rate and layout, padded with silence past the track's end;
    None when the file has no audio stream."""
    try:
        found = media.read_audio(path, (first + frames) / fps)
    except (av.error.FFmpegError, ValueError) as exc:
        raise InvalidInput(f"--extend: cannot decode the source video's audio: {exc}") from exc
    if found is None:
        return None
    track, rate = found
    start, stop = round(first / fps * rate), round((first + frames) / fps * rate)
    track = track[:, start:stop]
    return np.pad(track, ((0, 0), (0, stop - start - track.shape[1]))), rate


def overlap_audio_latents(
    audio_vae: torch.nn.Module,
    job_dir: Path,
    extension: ResolvedExtension,
    num_frames: int,
    fps: float,
    device: torch.device,
) -> torch.Tensor | None:
    """The latents the new clip's first audio tokens hold (`[1, C, held, M]`, denormalized, float32): the
    source's audio under the overlap, encoded, cut to the latents wholly inside the overlap; None when the
    source has no audio."""
    found = read_overlap_track(job_dir / extension.file, extension.skipped, extension.overlap, fps)
    if found is None:
        return None
    waveform, rate = found
    config = audio_vae.config
    mel_per_second = config.sample_rate / config.mel_hop_length
    total = soundtrack.clip_audio_latents(audio_vae, num_frames, fps)
    held = held_audio_latents(extension.overlap, num_frames, fps, total, mel_per_second)
    latents = soundtrack.encode_waveform(audio_vae, waveform, rate, device)
    if latents.shape[2] < held:
        raise RuntimeError(f"the overlap's audio encodes to {latents.shape[2]} latents, fewer than the {held} held")
    return latents[:, :, :held]
