"""Guidance and sigma settings for LTX-2.0, pinned explicitly for every call.

diffusers 0.42.1's LTX2Pipeline defaults are LTX-2.3/2.5 settings (audio CFG 7, STG 1, modality
guidance 3, cross-timestep on): with them every step makes three transformer calls even at
guidance_scale=1. Passing all eight guidance values, the STG blocks and `use_cross_timestep`
here keeps a distilled run at exactly one transformer call per step and a CFG run at one
batched call.
"""

from __future__ import annotations

from typing import Any

# Prompt tokens fed to Gemma; LTX-2's connectors were trained with 1024.
MAX_SEQUENCE_LENGTH = 1024
# Spatio-temporal guidance blocks recommended for LTX-2.0 (2.3 uses [28]); unused while STG is off.
LTX2_0_STG_BLOCKS = [29]


def pinned_guidance(guidance_scale: float) -> dict[str, Any]:
    """Every guidance argument of LTX2Pipeline.__call__: CFG at `guidance_scale`, STG and modality off.

    Audio CFG follows video CFG, because the pipeline substitutes `guidance_scale` for a falsy
    audio scale anyway and LTX-2.0's reference uses one CFG scale for both.
    """
    return {
        "guidance_scale": guidance_scale,
        "audio_guidance_scale": guidance_scale,
        "stg_scale": 0.0,
        "audio_stg_scale": 0.0,
        "modality_scale": 1.0,
        "audio_modality_scale": 1.0,
        "guidance_rescale": 0.0,
        "audio_guidance_rescale": 0.0,
        "spatio_temporal_guidance_blocks": LTX2_0_STG_BLOCKS,
        "use_cross_timestep": False,
        "max_sequence_length": MAX_SEQUENCE_LENGTH,
    }


def resolve_schedule(schedule: str, scheduler: Any) -> tuple[Any, list[float] | None]:
    """(scheduler, sigmas) for a schedule name.

    "distilled" is the distilled checkpoint's fixed 8-sigma schedule with dynamic shifting off
    (the shift would move sigmas the model was distilled on); "default" keeps the checkpoint's
    scheduler and lets the pipeline use linspace sigmas with its resolution-dependent shift.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.ltx2.utils import DISTILLED_SIGMA_VALUES

    if schedule == "distilled":
        fixed = FlowMatchEulerDiscreteScheduler.from_config(
            scheduler.config, use_dynamic_shifting=False, shift_terminal=None
        )
        return fixed, list(DISTILLED_SIGMA_VALUES)
    return scheduler, None
