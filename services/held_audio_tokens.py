"""Some audio tokens held, the rest denoised: the per-token audio denoise mask diffusers 0.42.1 lacks.

Which tokens is a boolean per token (True: held), as TemporalRegionMask's denoise mask is a value per token: an
extension holds the first ones (the overlap), a retake every one outside its range.

Followed: Lightricks' ltx-pipelines `RetakePipeline` (packages/ltx-pipelines/src/ltx_pipelines/retake.py), whose
audio `ModalitySpec` starts at encoded latents and carries ltx-core's `TemporalRegionMask`
(packages/ltx-core/src/ltx_core/conditioning/types/noise_mask_cond.py): a denoise mask per audio token, 0 on
the tokens kept, 1 on those regenerated. The loop then treats a token with mask 0 as ltx-pipelines' helpers do
(packages/ltx-pipelines/src/ltx_pipelines/utils/helpers.py, samplers.py):
- it starts at its clean latent (`GaussianNoiser`: `lerp(clean, lerp(latent, noise, noise_scale), mask)`);
- the transformer sees it at timestep `sigma * mask = 0` (`timesteps_from_mask`) while the modality's sigma, which
  the prompt AdaLN and the cross-modal gates read, stays the step's (the audio is not frozen);
- its x0 is `latent - velocity * timestep = latent` (ltx-core's `to_denoised` with per-token timesteps);
- after guidance, `denoised * mask + clean * (1 - mask)` (`post_process_latent`) puts it back before the Euler
  step, so it stays at its clean latent to the end.

diffusers' LTX-2 pipelines noise the given audio latents by one `noise_scale`, give the transformer one audio
timestep a step and step every token. `held_tokens_pipeline(cls)` makes the same loop out of the places every
LTX-2 pipeline class routes the audio through: `prepare_audio_latents` (the held tokens set back to the clean
latent after the parent's noise: the generator draws what it always draws), a transformer pre-hook (the audio
timestep per token, `t * mask`), `convert_velocity_to_x0` (per-token sigma) and `convert_x0_to_velocity` (the
blend after guidance and rescale). The pipelines pass their video scheduler itself to those two methods and
the audio's copy of it otherwise, which is how the audio calls are told apart. With velocity 0 on the held
tokens each Euler step `x + dt * 0` leaves them bit for bit at their clean latent; the denormalized output is
that latent normalized and back (equal up to rounding), so the source's own values are written back after the
call, as retake writes back its held video frames.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import torch

_SUBCLASSES: dict[type, type] = {}


@dataclasses.dataclass(frozen=True)
class HeldAudioTokens:
    """Audio tokens of a clip held at given latents (the rest denoised as usual).

    `latents` are the clip's first `L` audio latents (`L` at most the clip's); `held` says which of those are held
    (None: all of them, the first `L` tokens of the clip). Tokens past `L` are denoised."""

    latents: torch.Tensor  #: `[1, C, L, M]`, denormalized: the clip's first `L` audio latents (the held ones count)
    held: torch.Tensor | None = None  #: `[L]` bool, True where the token is held; None: every one of the `L`

    def mask(self, tokens: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """`[tokens]` bool, True on the held tokens of a clip of `tokens` audio tokens."""
        length = self.latents.shape[2]
        if length > tokens:
            raise RuntimeError(f"{length} audio latents given to hold, but the clip has {tokens} audio tokens")
        mask = torch.zeros(tokens, dtype=torch.bool, device=device)
        mask[:length] = True if self.held is None else self.held.to(device=device, dtype=torch.bool)
        return mask

    def written_back(self, audio: torch.Tensor) -> torch.Tensor:
        """`audio` (`[1, C, T, M]`) with the held latents themselves in place of the loop's normalized-and-back copy."""
        audio = audio.clone()
        mask = self.mask(audio.shape[2], audio.device)
        length = self.latents.shape[2]
        audio[:, :, mask] = self.latents.to(audio)[:, :, mask[:length]]
        return audio


def held_tokens_pipeline(cls: type) -> type:
    """`cls` (an LTX-2 pipeline class) whose call takes `held_audio=HeldAudioTokens` and holds those tokens."""
    if cls not in _SUBCLASSES:
        _SUBCLASSES[cls] = type(f"{cls.__name__}HeldAudioTokens", (HeldTokensMixin, cls), {})
    return _SUBCLASSES[cls]


class HeldTokensMixin:
    """The overrides held_tokens_pipeline puts before an LTX-2 pipeline class (module docstring)."""

    _held: HeldAudioTokens | None = None
    _held_mask: torch.Tensor | None = None  #: `[T]` bool over the clip's audio tokens, True where held
    _held_clean: torch.Tensor | None = None  #: the given latents normalized and packed, `[1, T, C * M]` (held ones)

    def __call__(self, *args: Any, held_audio: HeldAudioTokens, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """The pipeline's call (return_dict=False, output_type="latent") with the audio tokens held; the
        returned audio carries the held latents themselves."""
        video, audio = self.call_holding(held_audio, *args, **kwargs)
        return video, held_audio.written_back(audio)

    def call_holding(self, held_audio: HeldAudioTokens, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """The parent's call with the tokens held, its audio as the loop leaves it (the held tokens normalized
        and denormalized again)."""
        self._held = held_audio
        hook = self.transformer.register_forward_pre_hook(
            functools.partial(per_token_audio_timestep, self), with_kwargs=True
        )
        try:
            return super().__call__(*args, **kwargs)
        finally:
            hook.remove()
            self._held, self._held_mask, self._held_clean = None, None, None

    def prepare_audio_latents(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The parent's starting audio latents (noise, or given latents noised), the held tokens clean."""
        latents = super().prepare_audio_latents(*args, **kwargs)
        if self._held is None:
            return latents
        mask = self._held.mask(latents.shape[1], latents.device)
        given = self._pack_audio_latents(self._held.latents.to(latents.device, torch.float32))
        given = self._normalize_audio_latents(given, self.audio_vae.latents_mean, self.audio_vae.latents_std)
        clean = torch.zeros_like(latents)
        clean[:, : given.shape[1]] = given.to(latents.dtype)
        self._held_mask, self._held_clean = mask, clean
        return torch.where(mask[None, :, None], clean, latents)

    def convert_velocity_to_x0(
        self, sample: torch.Tensor, denoised_output: torch.Tensor, step_idx: int, scheduler: Any | None = None
    ) -> torch.Tensor:
        """x0 with the audio's per-token sigma: the held tokens' x0 is their latent."""
        if not self.is_held_audio(scheduler):
            return super().convert_velocity_to_x0(sample, denoised_output, step_idx, scheduler)
        sigma = torch.full(sample.shape[:2], float(scheduler.sigmas[step_idx]), device=sample.device)
        sigma[:, self._held_mask] = 0.0
        return sample - denoised_output * sigma[..., None].to(denoised_output.dtype)

    def convert_x0_to_velocity(
        self, sample: torch.Tensor, denoised_output: torch.Tensor, step_idx: int, scheduler: Any | None = None
    ) -> torch.Tensor:
        """The parent's velocity after the held tokens' x0 is set back to their clean latent."""
        if self.is_held_audio(scheduler):
            clean = self._held_clean.to(denoised_output.dtype)
            denoised_output = torch.where(self._held_mask[None, :, None], clean, denoised_output)
        return super().convert_x0_to_velocity(sample, denoised_output, step_idx, scheduler)

    def is_held_audio(self, scheduler: Any | None) -> bool:
        """Whether a conversion is of the audio with tokens held (the pipelines pass the video's scheduler
        itself, and the audio's copy of it)."""
        return self._held_clean is not None and scheduler is not None and scheduler is not self.scheduler


def per_token_audio_timestep(
    pipe: HeldTokensMixin, _module: Any, args: tuple, kwargs: dict[str, Any]
) -> tuple[tuple, dict[str, Any]]:
    """The transformer's keywords with the audio timestep per token: 0 on the held ones, the step's elsewhere
    (the pipelines pass the step's as `audio_sigma` too, which stays)."""
    timestep = kwargs["audio_timestep"]
    per_token = timestep.reshape(-1, 1).expand(-1, kwargs["audio_hidden_states"].shape[1]).clone()
    per_token[:, pipe._held_mask.to(per_token.device)] = 0
    return args, {**kwargs, "audio_timestep": per_token}
