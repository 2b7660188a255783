"""Audio-to-video's soundtrack: the file decoded, resampled, turned into the log-mel spectrogram the audio
VAE reads, and encoded into the audio latents the diffusion holds (protocol/soundtrack.py says why each).

diffusers 0.42.1 has the audio VAE's encoder (`AutoencoderKLLTX2Audio.encode`) but nothing that makes
its input: Lightricks' ltx-core makes it with torchaudio (`AudioProcessor` in
packages/ltx-core/src/ltx_core/model/audio_vae/ops.py: `torchaudio.functional.resample`, then
`MelSpectrogram(n_fft=1024, hop=160, f_min=0, f_max=sr/2, hann window, center=True, reflect padding,
power=1, mel_scale="slaney", norm="slaney")`, `log(clamp(mel, 1e-5))`, as [batch, channels, time, mels]).
torchaudio is no dependency here, so both are written below in torch to torchaudio's definitions
(`_get_sinc_resample_kernel` with its defaults, `melscale_fbanks`), and tests/test_audio_to_video.py pins
them to those formulas written out independently.
"""

from __future__ import annotations

import math
from pathlib import Path

import av
import numpy as np
import torch

from protocol.errors import InvalidInput
from protocol.job_record import ResolvedAudio
from protocol.soundtrack import AUDIO_FORMATS, clip_samples
from services import media

# ltx-core's AudioEncoderConfigurator reads the FFT size from the checkpoint's stft `filter_length`,
# default 1024, which LTX-2's audio VAEs use; diffusers' config does not carry it.
N_FFT = 1024
# torchaudio.functional.resample's defaults, which ltx-core calls it with.
LOWPASS_FILTER_WIDTH = 6
ROLLOFF = 0.99
# The floor under the mel energies before the log (ltx-core's AudioProcessor.waveform_to_mel).
LOG_FLOOR = 1e-5
# The audio VAE reads two channels (its `in_channels`).
VAE_CHANNELS = 2


def read_track(path: Path, num_frames: int, fps: float, shown: str | None = None) -> tuple[np.ndarray, int]:
    """(`[channels, samples]` float32, sample rate) of the first audio stream over the clip's duration
    (`num_frames / fps` seconds from its start), at the file's own rate. InvalidInput naming --audio and the
    file when it does not decode or is shorter (ltx-pipelines' decode_audio_from_file: from 0 s, at most the
    clip's duration; shorter: refused). `shown`: the file as messages name it (the user's, not the job's copy)."""
    shown = shown or path.name
    try:
        found = media.read_audio(path, num_frames / fps)
    except (av.error.FFmpegError, ValueError) as exc:
        raise InvalidInput(f"--audio: cannot decode {shown} as audio ({AUDIO_FORMATS}): {exc}") from exc
    if found is None:
        raise InvalidInput(f"--audio: {shown} has no audio stream ({AUDIO_FORMATS})")
    if found[0].shape[1] == 0:
        raise InvalidInput(f"--audio: {shown} holds no decodable audio")
    waveform, rate = found
    wanted = clip_samples(num_frames, fps, rate)
    if waveform.shape[1] < wanted:
        raise InvalidInput(
            f"--audio: {shown} lasts {waveform.shape[1] / rate:.3f} s, shorter than the clip's"
            f" {num_frames / fps:.3f} s;"
            " the video is generated to fit the track and never past its end (give a longer track, or fewer"
            " --num-frames)"
        )
    return waveform[:, :wanted], rate


def read_job_track(job_dir: Path, audio: ResolvedAudio, num_frames: int, fps: float) -> tuple[np.ndarray, int]:
    """read_track of a job's copy of its soundtrack, its messages naming the file the user gave."""
    return read_track(job_dir / audio.file, num_frames, fps, Path(audio.source).name)


def two_channels(waveform: np.ndarray) -> np.ndarray:
    """The track as the audio VAE's two channels: a mono track on both, the first two of more (front L/R)."""
    if waveform.shape[0] == 1:
        return np.repeat(waveform, VAE_CHANNELS, axis=0)
    return waveform[:VAE_CHANNELS]


def sinc_resample_kernel(orig: int, new: int) -> tuple[torch.Tensor, int]:
    """torchaudio's `_get_sinc_resample_kernel` (sinc_interp_hann, width 6, rolloff 0.99) in float32, for
    rates already divided by their gcd: ([new, 1, taps] kernel, padding width)."""
    base = min(orig, new) * ROLLOFF
    width = math.ceil(LOWPASS_FILTER_WIDTH * orig / base)
    index = torch.arange(-width, width + orig, dtype=torch.float32)[None, None] / orig
    t = torch.arange(0, -new, -1, dtype=torch.float32)[:, None, None] / new + index
    t = (t * base).clamp(-LOWPASS_FILTER_WIDTH, LOWPASS_FILTER_WIDTH)
    window = torch.cos(t * math.pi / LOWPASS_FILTER_WIDTH / 2) ** 2
    t = t * math.pi
    kernel = torch.where(t == 0, torch.tensor(1.0), t.sin() / t)
    return kernel * window * (base / orig), width


def resample(waveform: torch.Tensor, orig_rate: int, new_rate: int) -> torch.Tensor:
    """`[channels, samples]` from `orig_rate` to `new_rate` as torchaudio.functional.resample does it."""
    if orig_rate == new_rate:
        return waveform
    gcd = math.gcd(orig_rate, new_rate)
    orig, new = orig_rate // gcd, new_rate // gcd
    kernel, width = sinc_resample_kernel(orig, new)
    length = waveform.shape[-1]
    padded = torch.nn.functional.pad(waveform, (width, width + orig))
    out = torch.nn.functional.conv1d(padded[:, None], kernel.to(waveform), stride=orig)
    out = out.transpose(1, 2).reshape(waveform.shape[0], -1)
    return out[..., : math.ceil(new * length / orig)]


def hz_to_slaney_mel(hz: torch.Tensor) -> torch.Tensor:
    """The Slaney mel scale (torchaudio's `_hz_to_mel(mel_scale="slaney")`): linear below 1 kHz, log above."""
    linear = hz / (200.0 / 3)
    log_part = 15.0 + torch.log(torch.clamp(hz, min=1e-10) / 1000.0) / (math.log(6.4) / 27.0)
    return torch.where(hz >= 1000.0, log_part, linear)


def slaney_mel_to_hz(mel: torch.Tensor) -> torch.Tensor:
    """The inverse of hz_to_slaney_mel (torchaudio's `_mel_to_hz(mel_scale="slaney")`)."""
    return torch.where(mel >= 15.0, 1000.0 * torch.exp((math.log(6.4) / 27.0) * (mel - 15.0)), mel * (200.0 / 3))


def mel_filterbank(sample_rate: int, n_mels: int, n_fft: int = N_FFT) -> torch.Tensor:
    """`[n_fft // 2 + 1, n_mels]` triangles on the Slaney scale from 0 Hz to sample_rate / 2, each scaled
    to unit area (torchaudio's `melscale_fbanks(..., norm="slaney", mel_scale="slaney")`)."""
    freqs = torch.linspace(0, sample_rate // 2, n_fft // 2 + 1)
    edges = torch.linspace(
        float(hz_to_slaney_mel(torch.tensor(0.0))), float(hz_to_slaney_mel(torch.tensor(sample_rate / 2.0))), n_mels + 2
    )
    points = slaney_mel_to_hz(edges)
    gaps = points[1:] - points[:-1]
    slopes = points[None, :] - freqs[:, None]
    falling = -slopes[:, :-2] / gaps[:-1]
    rising = slopes[:, 2:] / gaps[1:]
    bank = torch.clamp(torch.minimum(falling, rising), min=0.0)
    return bank * (2.0 / (points[2 : n_mels + 2] - points[:n_mels]))[None, :]


def log_mel(waveform: torch.Tensor, sample_rate: int, n_mels: int, hop: int, n_fft: int = N_FFT) -> torch.Tensor:
    """`[channels, samples]` -> `[1, channels, time, n_mels]` log-mel, as ltx-core's AudioProcessor makes it."""
    spectrum = torch.stft(
        waveform,
        n_fft=n_fft,
        hop_length=hop,
        win_length=n_fft,
        window=torch.hann_window(n_fft, dtype=waveform.dtype, device=waveform.device),
        center=True,
        pad_mode="reflect",
        normalized=False,
        onesided=True,
        return_complex=True,
    ).abs()
    bank = mel_filterbank(sample_rate, n_mels, n_fft).to(waveform)
    mel = torch.matmul(spectrum.transpose(-1, -2), bank)  # [channels, time, n_mels]
    return torch.log(torch.clamp(mel, min=LOG_FLOOR))[None]


def clip_audio_latents(audio_vae: torch.nn.Module, num_frames: int, fps: float) -> int:
    """How many audio latents a clip of `num_frames` at `fps` has: LTX2Pipeline's `audio_num_frames`, from the
    audio VAE's sample rate, mel hop and temporal compression (the soundtrack, an extension's overlap and a
    retaken file's audio are all encoded to this count)."""
    config = audio_vae.config
    per_second = config.sample_rate / config.mel_hop_length / audio_vae.temporal_compression_ratio
    return round(num_frames / fps * per_second)


def encode_track(
    audio_vae: torch.nn.Module, waveform: np.ndarray, rate: int, latent_frames: int, device: torch.device
) -> torch.Tensor:
    """The track's audio latents as diffusers' pipelines take `audio_latents=` (denormalized, `[1, C, L, M]`,
    float32), cut to the clip's `latent_frames` (the reference's `[:, :, :frames]`)."""
    latents = encode_waveform(audio_vae, waveform, rate, device)
    if latents.shape[2] < latent_frames:
        raise InvalidInput(
            f"--audio: the track encodes to {latents.shape[2]} audio latent frames, fewer than the clip's"
            f" {latent_frames}"
        )
    return latents[:, :, :latent_frames]


def encode_waveform(audio_vae: torch.nn.Module, waveform: np.ndarray, rate: int, device: torch.device) -> torch.Tensor:
    """`[channels, samples]` at `rate` as the audio VAE encodes it (ltx-core's `encode_audio`): resampled to its
    rate, a log-mel spectrogram, the posterior's mean (`mode()`, ltx-core's encoder keeps the first half of its
    channels likewise); `[1, C, L, M]` float32, every latent the spectrogram gives."""
    config = audio_vae.config
    samples = resample(torch.from_numpy(two_channels(waveform)), rate, config.sample_rate)
    mel = log_mel(samples, config.sample_rate, config.mel_bins, config.mel_hop_length)
    with torch.no_grad():
        latents = audio_vae.encode(mel.to(device, audio_vae.dtype)).latent_dist.mode()
    return latents.float()
