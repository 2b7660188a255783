"""retake_encoded.safetensors: a video file's VAE encoding, the latents the retake of that file holds.

Followed: Lightricks' ltx-pipelines `RetakePipeline.__call__` (packages/ltx-pipelines/src/ltx_pipelines/
retake.py, at 400fd31), which starts from `video_latent_from_file` and `audio_latent_from_file`
(ltx_pipelines/utils/helpers.py). The video: every frame of the file from its start, at its own size
(`video_preprocess` resizes to the output size, which is the file's, so nothing changes), mapped to [-1, 1]
(`normalize_images`: x / 127.5 - 1, in float32 before the cast), through the video VAE's encoder. ltx-core's
encoder keeps the posterior's mean and normalizes it with the per-channel statistics; diffusers'
`vae.encode(x).latent_dist.mode()` is that mean unnormalized, which is how LTX2ConditionPipeline (0.42.1)
encodes a condition (`sample_mode="argmax"`) and the form our latents files hold (the pipeline normalizes
them). The audio: the file's first audio stream over the clip's duration through the audio VAE
(services/soundtrack.py makes the log-mel it reads, as ltx-core's AudioProcessor does), its latents cut, or
padded with zeros in ltx-core's normalized space (the per-channel mean here), to the clip's audio latent
frames (`_conform_latent_length`). A file without an audio stream has none (`audio_latent_from_file` returns
None): the retake then holds no audio and generates the whole track.

The encoding is written into the job before the denoising starts, so what the held frames equal is a file,
not something that lived only in memory (DESIGN.md rule 12); tests compare the retake's latents with it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from protocol.errors import InvalidInput
from protocol.files import RETAKE_ENCODED_FILE
from protocol.job_record import ResolvedRetake
from protocol.retake import RETAKE_FIELD
from services import media, soundtrack
from services.latents import write_latents


def encode_video_file(vae: Any, path: Path, device: torch.device) -> torch.Tensor:
    """The file's frames as video latents (`[1, C, F, H, W]`, unnormalized, float32): the VAE posterior's mean of
    the frames mapped to [-1, 1] as ltx-pipelines maps them."""
    try:
        frames = media.read_video_frames(path)
    except ValueError as exc:
        raise InvalidInput(f"--{RETAKE_FIELD}: {exc}") from exc
    pixels = torch.from_numpy(frames).to(torch.float32).permute(3, 0, 1, 2)[None]  # [1, 3, F, H, W]
    pixels = (pixels / 127.5 - 1.0).to(device=device, dtype=vae.dtype)
    with torch.no_grad():
        return vae.encode(pixels).latent_dist.mode().float()


def read_file_track(path: Path, seconds: float) -> tuple[np.ndarray, int] | None:
    """(`[channels, samples]` float32, rate) of the file's first audio stream over its first `seconds` (all of it
    when shorter, as ltx-pipelines' decode_audio_from_file reads it); None when it has no audio to read."""
    import av

    try:
        found = media.read_audio(path, seconds)
    except (av.error.FFmpegError, ValueError) as exc:
        raise InvalidInput(f"--{RETAKE_FIELD}: cannot decode the audio of {path.name}: {exc}") from exc
    return found if found is not None and found[0].shape[1] > 0 else None


def encode_audio_file(
    audio_vae: Any, path: Path, seconds: float, latent_frames: int, device: torch.device
) -> torch.Tensor | None:
    """The file's audio over `seconds` as audio latents (`[1, C, latent_frames, M]`, unnormalized, float32), or
    None when it has no audio stream; a short track is padded with the audio VAE's per-channel mean (normalized
    zeros, as ltx-pipelines pads)."""
    track = read_file_track(path, seconds)
    if track is None:
        return None
    waveform, rate = track
    config = audio_vae.config
    samples = soundtrack.resample(torch.from_numpy(soundtrack.two_channels(waveform)), rate, config.sample_rate)
    mel = soundtrack.log_mel(samples, config.sample_rate, config.mel_bins, config.mel_hop_length)
    with torch.no_grad():
        latents = audio_vae.encode(mel.to(device, audio_vae.dtype)).latent_dist.mode().float()
    return conform_audio_length(latents, latent_frames, audio_vae.latents_mean)


def conform_audio_length(latents: torch.Tensor, frames: int, mean: torch.Tensor) -> torch.Tensor:
    """`latents` ([1, C, L, M]) cut or padded to `frames` along L; the padding is `mean` ([C * M], the order
    diffusers packs audio latents in), which normalizes to zero."""
    if latents.shape[2] >= frames:
        return latents[:, :, :frames]
    _, channels, length, bins = latents.shape
    pad = mean.to(latents).reshape(1, channels, 1, bins).expand(1, channels, frames - length, bins)
    return torch.cat([latents, pad], dim=2)


def write_encoded(job_dir: Path, retake: ResolvedRetake, video: torch.Tensor, audio: torch.Tensor | None) -> None:
    """The encoding as the job keeps it: retake_encoded.safetensors, beside the file it encodes."""
    tensors = {"video": video, **({"audio": audio} if audio is not None else {})}
    write_latents(job_dir / RETAKE_ENCODED_FILE, tensors, {"source_sha256": retake.sha256, "source": retake.file})
