"""Presets: the defaults a run takes for flags the user did not give.

Two layers, both data in config/defaults.toml. A *family* preset (`[families."2.3".dev]`) holds a
model family's guidance recipe for one kind of run, distilled or dev; the family itself is read
from the checkpoint (protocol/families.py). A *model* preset (`[presets."<repo id>"]`) holds what
belongs to one published checkpoint: its size, length and fps, and the steps, CFG and schedule it
was released with. A flag beats a model preset, which beats the family preset.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from protocol.spec_rules import ONE_STAGE, TWO_STAGE, TWO_STAGE_SIZE_MULTIPLE

# The schedule name that selects a family's distilled preset; every other schedule runs the dev one.
DISTILLED_SCHEDULE = "distilled"
# A model without a preset of its own runs its family's distilled preset: one transformer call per
# step, the cheapest run (and what every unknown model got before families existed).
FALLBACK_SCHEDULE = DISTILLED_SCHEDULE


@dataclasses.dataclass(frozen=True)
class Preset:
    """Defaults a published model brings for flags the user did not give."""

    steps: int
    guidance_scale: float
    schedule: str
    width: int
    height: int
    num_frames: int
    fps: float


@dataclasses.dataclass(frozen=True)
class GuidancePreset:
    """One family's guidance for one kind of run; each field but `two_stage_min_width` and the stage-2
    LoRA's repo and file is a JobSpec field of the same name."""

    steps: int
    schedule: str
    guidance_scale: float
    stg_scale: float
    modality_scale: float
    guidance_rescale: float
    audio_guidance_scale: float | None = None  #: None: audio CFG follows guidance_scale
    #: clips at least this wide run two-stage unless --pipeline says otherwise; None: always one-stage
    two_stage_min_width: int | None = None
    #: dev two-stage: the repo id and file of the distilled LoRA fused for stage 2; None: the family has none
    stage2_lora_repo: str | None = None
    stage2_lora_file: str | None = None

    def spec_fields(self) -> dict[str, Any]:
        """The preset as JobSpec fields."""
        fields = dataclasses.asdict(self)
        for not_a_field in ("two_stage_min_width", "stage2_lora_repo", "stage2_lora_file"):
            fields.pop(not_a_field)
        return fields

    def stage2_lora(self) -> dict[str, str] | None:
        """The spec's `stage2_lora` entry for a dev two-stage run, None when the family names no LoRA."""
        if self.stage2_lora_repo is None:
            return None
        return {
            "source": self.stage2_lora_repo,
            **({"weight_name": self.stage2_lora_file} if self.stage2_lora_file else {}),
        }

    def pipeline_for(self, width: int, height: int) -> str:
        """The pipeline a `width` x `height` clip runs when the user did not pick one: two-stage from
        `two_stage_min_width` on, where the size suits it (both sides multiples of 64, as its half-size
        first stage needs); one-stage otherwise, so a default never turns a valid size into an error."""
        wide = self.two_stage_min_width is not None and width >= self.two_stage_min_width
        fits = width % TWO_STAGE_SIZE_MULTIPLE == 0 and height % TWO_STAGE_SIZE_MULTIPLE == 0
        return TWO_STAGE if wide and fits else ONE_STAGE


@dataclasses.dataclass(frozen=True)
class FamilyPresets:
    """A model family's two guidance presets."""

    distilled: GuidancePreset
    dev: GuidancePreset

    def for_schedule(self, schedule: str) -> GuidancePreset:
        """The distilled preset for the distilled schedule, else the dev one."""
        return self.distilled if schedule == DISTILLED_SCHEDULE else self.dev


def build_family_presets(data: Mapping[str, Any]) -> dict[str, FamilyPresets]:
    """`[families]` of the merged config as FamilyPresets; TypeError/KeyError name what is wrong."""
    families = {}
    for name, tables in data.items():
        unknown = set(tables) - {"distilled", "dev"}
        if unknown:
            raise KeyError(f'families."{name}" has unknown table {sorted(unknown)[0]!r}; expected distilled and dev')
        families[name] = FamilyPresets(
            distilled=GuidancePreset(**tables["distilled"]), dev=GuidancePreset(**tables["dev"])
        )
    return families


def resolve_preset_fields(
    own: Preset | None, fallback: Preset, family: FamilyPresets, requested_schedule: str | None
) -> dict[str, Any]:
    """JobSpec defaults for a model: its own preset (`own`, None for a local folder or an unknown
    repo id) over its family's preset for the schedule the run will use.

    `fallback` (the default model's preset) gives the size, length and fps of a model without its own.
    """
    schedule = requested_schedule or (own.schedule if own else FALLBACK_SCHEDULE)
    fields = family.for_schedule(schedule).spec_fields()
    sized = own or fallback
    fields.update(width=sized.width, height=sized.height, num_frames=sized.num_frames, fps=sized.fps)
    if own is not None:
        fields.update(steps=own.steps, guidance_scale=own.guidance_scale, schedule=own.schedule)
    return fields


def resolve_pipeline(family: FamilyPresets, schedule: str, width: object, height: object) -> str:
    """The default `pipeline` of a run: its family preset's for the schedule and size it will use.

    A size of the wrong type is left for the spec's validation to name; it gets one-stage here.
    """
    if not all(isinstance(side, int) and not isinstance(side, bool) for side in (width, height)):
        return ONE_STAGE
    return family.for_schedule(schedule).pipeline_for(width, height)  # type: ignore[arg-type]
