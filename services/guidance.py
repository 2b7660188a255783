"""Guidance and sigma settings, pinned explicitly for every call.

diffusers 0.42.1's LTX2Pipeline defaults are LTX-2.3/2.5 settings (audio CFG 7, STG 1, modality
guidance 3, cross-timestep on): left to them, every step of an LTX-2.0 run would make three
transformer calls even at guidance_scale=1. So every guidance argument is passed here, from the
job's spec (the scales, filled in from its family's preset) and its checkpoint's family (the STG
blocks and cross-timestep, protocol/families.py). A distilled run is then exactly one transformer
call per step, a CFG-only run one batched call.
"""

from __future__ import annotations

from typing import Any

from protocol.families import LEGACY_FAMILY, CheckpointFamily, family_named
from protocol.spec import JobSpec

# Prompt tokens fed to Gemma; LTX-2's connectors were trained with 1024.
MAX_SEQUENCE_LENGTH = 1024
# Two-stage's refining pass: STAGE_2_DISTILLED_SIGMA_VALUES (diffusers 0.42.1 pipelines/ltx2/utils.py, "reduced
# schedule for super-resolution stage 2"), which no pipeline of the wheel uses itself; never a JobSpec schedule.
STAGE_2_SCHEDULE = "stage 2"


def family_facts(family: CheckpointFamily | None) -> tuple[list[int], bool]:
    """(STG blocks, use_cross_timestep) of the family job.json recorded; a job recorded before
    families existed ran LTX-2.0."""
    if family is not None:
        return list(family.stg_blocks), family.cross_timestep
    legacy = family_named(LEGACY_FAMILY)
    return list(legacy.stg_blocks), legacy.cross_timestep


def pinned_guidance(spec: JobSpec, family: CheckpointFamily | None) -> dict[str, Any]:
    """Every guidance argument of LTX2Pipeline.__call__ for this job and its recorded family.

    STG, modality guidance and rescale take one value for both modalities, as LTX-2.3's recipe
    does; audio CFG has its own (LTX-2.3 dev: 7 against video's 3) and otherwise follows video CFG.
    """
    return guidance_arguments(
        (spec.guidance_scale, spec.effective_audio_guidance_scale),
        stg=spec.stg_scale,
        modality=spec.modality_scale,
        rescale=spec.guidance_rescale,
        family=family,
    )


def guidance_off(family: CheckpointFamily | None = None) -> dict[str, Any]:
    """Every guidance argument with all guidance off: one transformer call per step (the distilled
    recipe); for references and benchmarks that call LTX2Pipeline without a job."""
    return guidance_arguments((1.0, 1.0), stg=0.0, modality=1.0, rescale=0.0, family=family)


def guidance_arguments(
    cfg: tuple[float, float], *, stg: float, modality: float, rescale: float, family: CheckpointFamily | None
) -> dict[str, Any]:
    """LTX2Pipeline.__call__'s guidance keywords: CFG as (video, audio), the rest shared by both."""
    stg_blocks, cross_timestep = family_facts(family)
    return {
        "guidance_scale": cfg[0],
        "audio_guidance_scale": cfg[1],
        "stg_scale": stg,
        "audio_stg_scale": stg,
        "modality_scale": modality,
        "audio_modality_scale": modality,
        "guidance_rescale": rescale,
        "audio_guidance_rescale": rescale,
        "spatio_temporal_guidance_blocks": stg_blocks,
        "use_cross_timestep": cross_timestep,
        "max_sequence_length": MAX_SEQUENCE_LENGTH,
    }


def resolve_schedule(schedule: str, scheduler: Any) -> tuple[Any, list[float] | None]:
    """(scheduler, sigmas) for a schedule name.

    "distilled" is the distilled checkpoint's fixed 8-sigma schedule with dynamic shifting off
    (the shift would move sigmas the model was distilled on); "default" keeps the checkpoint's
    scheduler and lets the pipeline use linspace sigmas with its resolution-dependent shift.
    STAGE_2_SCHEDULE is two-stage's refining pass: the last three distilled sigmas, fixed the same way.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.ltx2.utils import DISTILLED_SIGMA_VALUES, STAGE_2_DISTILLED_SIGMA_VALUES

    fixed_sigmas = {"distilled": DISTILLED_SIGMA_VALUES, STAGE_2_SCHEDULE: STAGE_2_DISTILLED_SIGMA_VALUES}
    if schedule in fixed_sigmas:
        fixed = FlowMatchEulerDiscreteScheduler.from_config(
            scheduler.config, use_dynamic_shifting=False, shift_terminal=None
        )
        return fixed, list(fixed_sigmas[schedule])
    return scheduler, None
