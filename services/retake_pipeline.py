"""Retake on diffusers: LTX2ConditionPipeline (0.42.1) with the source's latent frames outside the range held.

ltx-pipelines' RetakePipeline (retake.py) gives every video token outside the window denoise mask 0
(ltx-core's TemporalRegionMask): it starts at the source's clean latent, its timestep is mask * sigma = 0, and
after each step `denoised * mask + clean * (1 - mask)` puts it back. diffusers' LTX2ConditionPipeline runs that
same loop with a conditioning mask (its `1 - denoise_mask`): per-token timesteps `t * (1 - mask)` and the blend
`denoised * (1 - mask) + clean * mask`. What it lacks is a way to set that mask over the clip's own tokens from
given latents (its conditions are pixels, and those at a latent index above 0 are appended as extra tokens). So
`prepare_latents` is extended by one step: after the parent has normalized and noised the given latents, the
held frames' tokens are set back to the clean source with mask 1.

Two things stay outside the loop, applied to its result. The video latents it returns are the held values
normalized and denormalized again (equal up to float rounding), so the source's own values are written back
into the held frames, which makes them bit for bit the source's. The audio cannot be masked in diffusers 0.42.1
(its audio latents are one whole starting point), so the whole track is generated afresh and only its latents
over the range (TemporalRegionMask's audio rule, protocol/retake.py) replace the source's; a source without
audio (a video file with no audio stream) keeps the new track whole.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from diffusers import LTX2ConditionPipeline

from protocol.retake import audio_latent_span


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


class LTX2RetakePipeline(LTX2ConditionPipeline):
    """LTX2ConditionPipeline whose call takes `retake=RetakeRegion` and regenerates only its frames."""

    _region: RetakeRegion | None = None

    def __call__(self, *args: Any, retake: RetakeRegion, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """The pipeline's call from the source's latents (return_dict=False, output_type="latent"), with the
        held frames and the audio outside the range put back to the source's."""
        kwargs["latents"] = retake.video
        self._region = retake
        try:
            video, audio = super().__call__(*args, **kwargs)
        finally:
            self._region = None
        video = hold_outside(video, retake.video, retake.start, retake.stop, dim=2)
        if retake.audio is None:  # nothing to keep: the new track throughout (ltx-pipelines: no audio conditioning)
            return video, audio
        mel_per_second = self.audio_sampling_rate / self.audio_hop_length
        span = audio_latent_span(retake.first, retake.last, kwargs["frame_rate"], audio.shape[2], mel_per_second)
        return video, hold_outside(audio, retake.audio, *span, dim=2)

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
