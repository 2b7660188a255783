"""Retake on diffusers: LTX2ConditionPipeline (0.42.1) with the source's latent frames outside the range held.

ltx-pipelines' RetakePipeline (retake.py) gives every video token outside the window denoise mask 0
(ltx-core's TemporalRegionMask): it starts at the source's clean latent, its timestep is mask * sigma = 0, and
after each step `denoised * mask + clean * (1 - mask)` puts it back. diffusers' LTX2ConditionPipeline runs that
same loop with a conditioning mask (its `1 - denoise_mask`): per-token timesteps `t * (1 - mask)` and the blend
`denoised * (1 - mask) + clean * mask`. What it lacks is a way to set that mask over the clip's own tokens from
given latents (its conditions are pixels, and those at a latent index above 0 are appended as extra tokens). So
`prepare_latents` is extended by one step: after the parent has normalized and noised the given latents, the
held frames' tokens are set back to the clean source with mask 1.

The audio is held as ltx-pipelines holds it: its audio `ModalitySpec` starts at the source's audio latents with
the same TemporalRegionMask, whose audio tokens are regenerated where their time span meets the window
[A / fps, (B + 1) / fps) (protocol/retake.py's `audio_latent_span`) and held everywhere else. So the class also
holds audio tokens (services/held_audio_tokens.py, the mask True outside that span): the new audio inside the
range is denoised beside the source's clean audio around it, at timestep 0 on the held tokens, as the new video
frames are beside the held ones. A source without audio (a video file with no audio stream) holds none, and
the whole track is generated afresh (ltx-pipelines: no audio conditioning).

The latents the loop returns for held tokens, video and audio, are the held values normalized and denormalized
again (equal up to float rounding), so the source's own values are written back over them, which makes them bit
for bit the source's.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from diffusers import LTX2ConditionPipeline

from protocol.retake import audio_latent_span
from services.held_audio_tokens import HeldAudioTokens, HeldTokensMixin


@dataclasses.dataclass(frozen=True)
class RetakeRegion:
    """What a retake regenerates: latent frames [start, stop) of the source's video latents, and the pixel
    frames first..last they cover (for the audio's window)."""

    video: torch.Tensor  #: the source's video latents, denormalized, [1, C, F, H, W]
    audio: torch.Tensor | None  #: the source's audio latents, denormalized, [1, C, L, M]; None: it has no audio
    start: int
    stop: int
    first: int
    last: int


class LTX2RetakePipeline(HeldTokensMixin, LTX2ConditionPipeline):
    """LTX2ConditionPipeline whose call takes `retake=RetakeRegion` and regenerates only its frames (and the
    audio over their window)."""

    _region: RetakeRegion | None = None

    def __call__(self, *args: Any, retake: RetakeRegion, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """The pipeline's call from the source's latents (return_dict=False, output_type="latent"), with the
        source's own values written back over the held video frames and audio tokens."""
        held = self.held_audio(retake, kwargs["frame_rate"])
        video, audio = self.call_retake(retake, held, *args, **kwargs)
        video = hold_outside(video, retake.video, retake.start, retake.stop, dim=2)
        return video, audio if held is None else held.written_back(audio)

    def call_retake(
        self, retake: RetakeRegion, held: HeldAudioTokens | None, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The loop's own result, the held video and audio normalized and denormalized again (nothing written
        back); `held`: the audio tokens held (held_audio), None to generate the whole track."""
        kwargs["latents"] = retake.video
        self._region = retake
        try:
            if held is None:
                return LTX2ConditionPipeline.__call__(self, *args, **kwargs)
            return self.call_holding(held, *args, **kwargs)
        finally:
            self._region = None

    def held_audio(self, retake: RetakeRegion, fps: float) -> HeldAudioTokens | None:
        """The source's audio latents, held everywhere but over the range's window (TemporalRegionMask's audio
        rule, protocol/retake.py); None when the source has no audio."""
        if retake.audio is None:
            return None
        count = retake.audio.shape[2]
        mel_per_second = self.audio_sampling_rate / self.audio_hop_length
        start, stop = audio_latent_span(retake.first, retake.last, fps, count, mel_per_second)
        held = torch.ones(count, dtype=torch.bool)
        held[start:stop] = False
        return HeldAudioTokens(retake.audio, held)

    def prepare_latents(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, ...]:
        """The parent's noisy latents, mask and clean latents, with every token outside the region clean
        (the source's normalized latent) and masked 1: held for the whole loop."""
        latents, mask, clean, coords = super().prepare_latents(*args, **kwargs)
        region = self._region
        if region is None:
            return latents, mask, clean, coords
        source = self._normalize_latents(
            region.video.to(latents.device, torch.float32),
            self.vae.latents_mean,
            self.vae.latents_std,
            self.vae.config.scaling_factor,
        )
        packed = self._pack_latents(source, self.transformer_spatial_patch_size, self.transformer_temporal_patch_size)
        per_frame = packed.shape[1] // source.shape[2]  # tokens are ordered frame by frame
        held = torch.ones(packed.shape[1], dtype=torch.bool, device=latents.device)
        held[region.start * per_frame : region.stop * per_frame] = False
        latents[:, held] = packed[:, held].to(latents.dtype)
        clean[:, held] = packed[:, held].to(clean.dtype)
        mask[:, held] = 1.0
        return latents, mask, clean, coords


def hold_outside(new: torch.Tensor, source: torch.Tensor, start: int, stop: int, dim: int) -> torch.Tensor:
    """`source` with its slices [start, stop) along `dim` taken from `new`: bit for bit the source elsewhere."""
    result = source.to(device=new.device, dtype=new.dtype).clone()
    inside = [slice(None)] * new.dim()
    inside[dim] = slice(start, stop)
    result[tuple(inside)] = new[tuple(inside)]
    return result
