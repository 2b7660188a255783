"""Audio held fixed while diffusers' LTX-2 pipelines denoise the video (audio-to-video).

ltx-pipelines' A2VidPipelineTwoStage gives the audio `ModalitySpec(frozen=True, noise_scale=0.0,
initial_latent=encoded)` in both stages: the audio latents start as the encoded track with no noise,
their denoise mask is 0 (so their timestep, `sigma * mask`, is 0) and their `Modality.sigma` is forced to
0 (the prompt AdaLN and the audio-to-video gate read it), and after every step `denoised * mask +
clean * (1 - mask)` puts them back: the video attends to a clean soundtrack throughout.

diffusers 0.42.1 has no frozen modality: its pipelines noise given audio latents by the call's one
`noise_scale`, embed the video's timestep for the audio, and step the audio with the scheduler. Three
small changes make the same loop, for every LTX-2 pipeline class this project runs:
- `held_audio_pipeline(cls)`: a subclass whose `prepare_audio_latents` always starts from the given
  latents at noise 0 (a two-stage run's stage 2 passes its first sigma for the video);
- a forward pre-hook gives the transformer `audio_timestep = audio_sigma = 0` on every call (CFG, STG and
  modality-isolation calls alike);
- a forward hook zeroes the audio velocity the transformer returns, so each Euler step
  `x + (sigma_next - sigma) * 0` leaves the audio latents exactly as they were (the reference's blend with
  mask 0 gives the clean latents back, the same values). With the audio's guidance off (`held_guidance`)
  no guidance term can move them either: the x0 the pipeline derives is the latents themselves.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

# The audio's guidance off, as the reference's audio guider (`MultiModalGuiderParams()`: CFG 1, STG 0,
# modality 1, rescale 0); its deltas would be zero anyway, and rescale 0 keeps the x0 bit-exact.
HELD_AUDIO_GUIDANCE = {
    "audio_guidance_scale": 1.0,
    "audio_stg_scale": 0.0,
    "audio_modality_scale": 1.0,
    "audio_guidance_rescale": 0.0,
}
_SUBCLASSES: dict[type, type] = {}


def held_guidance(guidance: dict[str, Any]) -> dict[str, Any]:
    """The pass's guidance keywords with the audio's turned off (the video's kept)."""
    return {**guidance, **HELD_AUDIO_GUIDANCE}


def held_audio_pipeline(cls: type) -> type:
    """`cls` (an LTX-2 pipeline class) whose given audio latents are never noised."""
    if cls not in _SUBCLASSES:

        def prepare_audio_latents(self: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
            kwargs["noise_scale"] = 0.0
            return super(subclass, self).prepare_audio_latents(*args, **kwargs)

        subclass = type(f"{cls.__name__}HeldAudio", (cls,), {"prepare_audio_latents": prepare_audio_latents})
        _SUBCLASSES[cls] = subclass
    return _SUBCLASSES[cls]


@contextlib.contextmanager
def audio_held(transformer: torch.nn.Module) -> Iterator[None]:
    """While open, every transformer call sees the audio at timestep 0 and returns no audio velocity."""

    def clean_audio(_module: Any, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        batch = kwargs["audio_hidden_states"].shape[0]
        zero = torch.zeros(batch, device=kwargs["audio_hidden_states"].device, dtype=torch.float32)
        return args, {**kwargs, "audio_timestep": zero, "audio_sigma": zero}

    def no_audio_velocity(_module: Any, _args: tuple, _kwargs: dict[str, Any], output: Any) -> Any:
        video, audio = output[0], output[1]
        return (video, torch.zeros_like(audio), *output[2:])

    before = transformer.register_forward_pre_hook(clean_audio, with_kwargs=True)
    after = transformer.register_forward_hook(no_audio_velocity, with_kwargs=True)
    try:
        yield
    finally:
        before.remove()
        after.remove()
