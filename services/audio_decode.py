"""audio_decode -> audio.wav: mel latents through the audio VAE and the vocoder.

Loads only the audio VAE and the vocoder (a few hundred MB at full size) and mirrors the decode
branch of diffusers' LTX2Pipeline (0.42.1): `audio_vae.decode` on the denormalized latents, then
the vocoder on the mel spectrogram. A group process (stage-major) loads them once for all its jobs.
"""

from __future__ import annotations

from typing import NoReturn

import diffusers.pipelines.ltx2.vocoder  # noqa: F401
import numpy as np
import torch

# Imported at module level on purpose: a prestarted worker pays this before READY.
from diffusers import AutoencoderKLLTX2Audio  # noqa: F401

from protocol.errors import InvalidInput
from protocol.files import AUDIO_FILE, LATENTS_FILE, Stage
from services import model_loading
from services.latents import read_latents
from services.media import write_wav
from services.runtime import WorkerContext, run_worker
from services.soundtrack import read_job_track


def run(ctx: WorkerContext) -> list[str]:
    """The stage: latents file -> float WAV at the vocoder's output rate."""
    # The lower-memory plan moves this small decoder to the CPU.
    device = torch.device("cpu") if ctx.plan.get("device") == "cpu" else model_loading.resolve_device()
    dtype = model_loading.resolve_dtype(ctx.spec.dtype, device)
    if ctx.request.audio is not None:  # audio-to-video: the soundtrack itself (protocol/soundtrack.py)
        return deliver_soundtrack(ctx)
    tensors, _ = read_latents(ctx.job_dir / LATENTS_FILE, ctx.spec.latents_digest())
    latents = tensors["audio"]
    if latents.ndim != 4 or latents.shape[0] != 1:
        raise InvalidInput(f"audio latents must be [1, C, L, M], got {list(latents.shape)}")
    if "audio_decoder" not in ctx.shared:
        ctx.progress("load audio decoder")
        ctx.shared["audio_decoder"] = model_loading.load_audio_decoder(ctx.model_root, dtype, device)
    audio_vae, vocoder = ctx.shared["audio_decoder"]
    ctx.progress("decode audio", 0, 1)
    with torch.no_grad():
        mel = audio_vae.decode(latents.to(device, audio_vae.dtype), return_dict=False)[0]
        waveform = vocoder(mel)[0]
    ctx.progress("decode audio", 1, 1)
    write_wav(ctx.job_dir / AUDIO_FILE, waveform.float().cpu().numpy(), int(vocoder.config.output_sampling_rate))
    return [AUDIO_FILE]


def deliver_soundtrack(ctx: WorkerContext) -> list[str]:
    """audio.wav as the given track's first `num_frames / fps` seconds at its own rate (at most two channels),
    not the audio VAE's reconstruction of the held latents: ltx-pipelines' A2VidPipelineTwoStage returns "the
    original input audio instead of VAE-decoded audio to preserve fidelity", and the latents were never
    changed, so decoding them would only add the VAE's and the vocoder's losses."""
    ctx.progress("deliver the soundtrack", 0, 1)
    waveform, rate = read_job_track(ctx.job_dir, ctx.request.audio, ctx.spec.num_frames, ctx.spec.fps)
    write_wav(ctx.job_dir / AUDIO_FILE, np.ascontiguousarray(waveform[:2]), rate)
    ctx.progress("deliver the soundtrack", 1, 1)
    return [AUDIO_FILE]


def main(argv: list[str] | None = None) -> NoReturn:
    """Entry point of `python -m services.audio_decode` and of the fork server's children."""
    run_worker(Stage.AUDIO_DECODE, run, argv)


if __name__ == "__main__":
    main()
