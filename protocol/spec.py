"""The job spec: every input of one clip, validated before any process starts.

A rule broken here fails fast with a message naming the CLI flag, the value given and what is
allowed. Nothing is rounded silently: a frame count that is not 8n+1 is an error that names the
two nearest valid counts, so the user decides.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import re
import typing
from typing import Any

from protocol.codec import is_instance_of

# LTX-2's VAE compresses 8x in time with a causal first frame: a clip has 8n+1 frames.
FRAME_MULTIPLE = 8
# Height and width must be divisible by 32 (the VAE's spatial compression); diffusers checks this too.
SIZE_MULTIPLE = 32
MIN_SIZE, MAX_SIZE = 64, 4096
MIN_FRAMES, MAX_FRAMES = 9, 1025
MAX_STEPS = 500
MAX_SEED = 2**63 - 1
# Long enough for the seed project's paragraph prompts, short enough to bound job.json.
MAX_PROMPT_CHARS = 20_000
# Characters are not bytes: 20,000 emoji are 80 kB of UTF-8, and 14 such jobs made a job listing
# overflow one protocol frame. 32 KiB still holds any 20,000-character ASCII prompt and keeps a
# spec (prompt and negative prompt) far below protocol.codec.MAX_MESSAGE_BYTES.
MAX_PROMPT_BYTES = 32 * 1024
# Matched with fullmatch: `$` would also accept a trailing newline, which breaks "stdout is only
# the output path" and puts a line break into the file name.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
DTYPES = ("auto", "bfloat16", "float32")
LORA_KEYS = frozenset({"source", "weight_name", "scale"})
# Dev two-stage's stage-2 distilled LoRA (services/two_stage.py): always fused at 1.0, as Lightricks' recipe does.
STAGE2_LORA_KEYS = frozenset({"source", "weight_name"})
# Fields that do not change the latents (see JobSpec.latents_digest).
DECODE_ONLY_FIELDS = frozenset({"name", "vae_chunk_frames", "vae_tiling", "drop_caches"})
SCHEDULES = ("distilled", "default")
NOT_UTF8 = "must be valid UTF-8 text (it holds bytes that are not UTF-8)"
# The distilled checkpoint was trained on one fixed 8-sigma schedule.
DISTILLED_STEPS = 8
# Normalized Attention Guidance (services/nag.py): phi = 1 is exactly off; the ComfyUI LTX-2 node uses 11,
# so 30 (the CFG ceiling) leaves room without admitting values that only produce noise.
MAX_NAG_SCALE = 30.0
# Defaults of the NAG paper's reference code for other models (tau: norm-ratio clamp, alpha: blend).
NAG_DEFAULTS = {"nag_scale": 1.0, "nag_tau": 2.5, "nag_alpha": 0.25, "nag_steps": None}
# Guidance beyond CFG (LTX-2.3's recipe: config/defaults.toml [families]); these values switch it off, as
# LTX-2.0 ran before the fields existed. None: audio CFG follows --guidance-scale.
GUIDANCE_DEFAULTS = {"audio_guidance_scale": None, "stg_scale": 0.0, "modality_scale": 1.0, "guidance_rescale": 0.0}
# How the latents are made (services/two_stage.py): one pass at the full size, or Lightricks' two-stage recipe
# (half size, the latent upsampler x2, three distilled refining steps at the full size; with a dev schedule those
# three steps run with the distilled LoRA `stage2_lora` fused into the transformer).
ONE_STAGE, TWO_STAGE = "one-stage", "two-stage"
PIPELINES = (ONE_STAGE, TWO_STAGE)
# Two-stage runs stage 1 at half the width and height, which must itself be a multiple of 32 and
# at least MIN_SIZE; so the full size is a multiple of 64 and at least 128.
TWO_STAGE_SIZE_MULTIPLE = 2 * SIZE_MULTIPLE
TWO_STAGE_MIN_SIZE = 2 * MIN_SIZE
# Fields left out of the latents digest at their default, so latents written before they existed still match.
LATER_FIELD_DEFAULTS = {**NAG_DEFAULTS, **GUIDANCE_DEFAULTS, "pipeline": ONE_STAGE, "stage2_lora": None}
# diffusers puts no bound on these; the bounds keep a typo from running a useless clip. LTX-2.3 uses
# STG 1 and modality 3 (LTX2Pipeline.__call__ defaults), so 10 leaves room for experiments.
MAX_STG_SCALE = 10.0
MAX_MODALITY_SCALE = 10.0


class SpecError(ValueError):
    """A spec field broke a rule; `flag` is the CLI flag a user would change."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.flag = "--" + field.replace("_", "-")
        super().__init__(f"{self.flag}: {message}")


@dataclasses.dataclass(frozen=True)
class JobSpec:
    """One clip's inputs; `model` is a Hugging Face repo id or a local diffusers folder."""

    prompt: str
    model: str
    width: int
    height: int
    num_frames: int
    steps: int
    seed: int
    negative_prompt: str = ""
    fps: float = 24.0
    guidance_scale: float = 1.0
    audio_guidance_scale: float | None = None
    stg_scale: float = 0.0
    modality_scale: float = 1.0
    guidance_rescale: float = 0.0
    schedule: str = "distilled"
    dtype: str = "auto"
    name: str = "video"
    vae_chunk_frames: int | None = None
    vae_tiling: bool | None = None
    loras: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    fp8: bool = False
    fp8_matmul: bool = False
    compile: bool = False
    sequential_offload: bool = False
    drop_caches: bool = False
    image: str | None = None
    nag_scale: float = 1.0
    nag_tau: float = 2.5
    nag_alpha: float = 0.25
    nag_steps: int | None = None
    pipeline: str = ONE_STAGE
    #: dev two-stage only: {source, weight_name} of the distilled LoRA fused (at 1.0) for stage 2
    stage2_lora: dict[str, Any] | None = None

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> JobSpec:
        """Build and validate a spec from plain data (a msgpack map, job.json or CLI flags)."""
        if not isinstance(raw, dict):
            raise SpecError("spec", "the job spec must be a map of fields")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        hints = typing.get_type_hints(cls)
        unknown = sorted(set(raw) - set(fields))
        if unknown:
            nearest = difflib.get_close_matches(str(unknown[0]), fields, n=1)
            hint = f"did you mean {nearest[0]}? " if nearest else ""
            raise SpecError(str(unknown[0]), f"unknown field; {hint}allowed fields are {', '.join(sorted(fields))}")
        for name, field in fields.items():
            if name not in raw:
                if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
                    raise SpecError(name, "is required")
                continue
            if not is_instance_of(raw[name], hints[name]):
                raise SpecError(name, f"must be of type {_describe(hints[name])}, got {raw[name]!r}")
        spec = cls(**raw)
        spec.require_valid()
        return spec

    def to_dict(self) -> dict[str, Any]:
        """Plain data for job.json and messages."""
        return dataclasses.asdict(self)

    def with_changes(self, **changes: Any) -> JobSpec:
        """A validated copy with some fields replaced."""
        return JobSpec.from_dict({**self.to_dict(), **changes})

    def require_valid(self) -> None:
        """Raise SpecError for the first rule this spec breaks."""
        _require_text(self.prompt, "prompt", allow_empty=False)
        _require_text(self.negative_prompt, "negative_prompt", allow_empty=True)
        if not self.model.strip():
            raise SpecError("model", "must name a Hugging Face repo id or a local folder")
        require_path_text(self.model, "model")
        for field, value in (("width", self.width), ("height", self.height)):
            if value % SIZE_MULTIPLE or not MIN_SIZE <= value <= MAX_SIZE:
                raise SpecError(
                    field,
                    f"must be a multiple of {SIZE_MULTIPLE} between {MIN_SIZE} and {MAX_SIZE}; got {value}"
                    f" (nearest allowed: {' or '.join(map(str, nearest_sizes(value)))})",
                )
        _require_frames(self.num_frames)
        _require_range("steps", self.steps, 1, MAX_STEPS)
        _require_range("seed", self.seed, 0, MAX_SEED)
        _require_range("fps", self.fps, 1.0, 240.0)
        _require_range("guidance_scale", self.guidance_scale, 1.0, 30.0)
        if self.audio_guidance_scale is not None:
            _require_range("audio_guidance_scale", self.audio_guidance_scale, 1.0, 30.0)
        _require_range("stg_scale", self.stg_scale, 0.0, MAX_STG_SCALE)
        _require_range("modality_scale", self.modality_scale, 1.0, MAX_MODALITY_SCALE)
        _require_range("guidance_rescale", self.guidance_rescale, 0.0, 1.0)
        _require_choice("schedule", self.schedule, SCHEDULES)
        if self.schedule == "distilled" and self.steps != DISTILLED_STEPS:
            raise SpecError(
                "steps",
                f"the distilled schedule has exactly {DISTILLED_STEPS} steps; got {self.steps}"
                " (use --schedule default for another step count)",
            )
        _require_choice("dtype", self.dtype, DTYPES)
        if not NAME_PATTERN.fullmatch(self.name):
            raise SpecError(
                "name", f"must match {NAME_PATTERN.pattern} (used in the output file name); got {self.name!r}"
            )
        if self.fp8 and self.fp8_matmul:
            raise SpecError("fp8_matmul", "choose one of --fp8 (FP8 storage, bf16 compute) and --fp8-matmul")
        if self.vae_chunk_frames is not None:
            _require_range("vae_chunk_frames", self.vae_chunk_frames, 2, self.latent_frames)
        for lora in self.loras:
            _require_lora(lora)
        if self.image is not None and not self.image.strip():
            raise SpecError("image", "must be a path to an image file")
        if self.image is not None:
            require_path_text(self.image, "image")
        self._require_valid_nag()
        self._require_valid_pipeline()

    def _require_valid_pipeline(self) -> None:
        """Two-stage's sizes and schedule, and the stage-2 LoRA a dev schedule needs.

        Stage 2 is three steps on the distilled sigmas with guidance off. A distilled model was trained
        for them; a dev (non-distilled) one was not, so with a dev schedule stage 2 runs on the transformer
        with Lightricks' distilled LoRA fused at 1.0 (diffusers' LTX-2 docs, "Two-stages Generation").
        Which LoRA is `stage2_lora`, which orchestrator/jobspec.py fills from the model family's dev preset
        (config/defaults.toml) unless --stage2-lora names one; a dev two-stage spec without it is refused
        (a family with no known distilled LoRA, LTX-2.5), as is a stage-2 LoRA that no stage would use.
        """
        _require_choice("pipeline", self.pipeline, PIPELINES)
        if self.stage2_lora is not None:
            _require_stage2_lora(self.stage2_lora)
            if self.pipeline != TWO_STAGE or self.schedule == "distilled":
                raise SpecError(
                    "stage2_lora",
                    "only two-stage with a dev schedule (--pipeline two-stage --schedule default) fuses a stage-2"
                    f" LoRA; got --pipeline {self.pipeline} --schedule {self.schedule}",
                )
        if self.pipeline != TWO_STAGE:
            return
        if self.schedule != "distilled" and self.stage2_lora is None:
            raise SpecError(
                "pipeline",
                "two-stage refines at the full size with three distilled steps and guidance off; with"
                f" --schedule {self.schedule} that needs a distilled LoRA fused for stage 2, and none is set;"
                " name one with --stage2-lora, or use --schedule distilled or --pipeline one-stage",
            )
        for field, value in (("width", self.width), ("height", self.height)):
            if value % TWO_STAGE_SIZE_MULTIPLE or value < TWO_STAGE_MIN_SIZE:
                nearest = nearest_sizes(value, TWO_STAGE_SIZE_MULTIPLE, TWO_STAGE_MIN_SIZE)
                raise SpecError(
                    field,
                    f"two-stage needs a multiple of {TWO_STAGE_SIZE_MULTIPLE} between {TWO_STAGE_MIN_SIZE} and"
                    f" {MAX_SIZE} (stage 1 runs at half the size, in multiples of {SIZE_MULTIPLE}); got {value}"
                    f" (nearest allowed: {' or '.join(map(str, nearest))}; or --pipeline one-stage)",
                )

    def _require_valid_nag(self) -> None:
        """NAG's ranges, and its refusal next to CFG.

        NAG with CFG > 1 is refused rather than combined: CFG already spends a second (batched) pass
        on the negative prompt, so NAG there would apply the same prompt twice in two different ways,
        a combination no LTX-2 reference tunes or checks; NAG exists for the CFG = 1 (distilled) case.
        """
        _require_range("nag_scale", self.nag_scale, 1.0, MAX_NAG_SCALE)
        if not (0.0 < self.nag_tau and math.isfinite(self.nag_tau)):
            raise SpecError("nag_tau", f"must be a finite number above 0; got {self.nag_tau}")
        _require_range("nag_alpha", self.nag_alpha, 0.0, 1.0)
        if self.nag_steps is not None and self.nag_steps < 0:
            raise SpecError("nag_steps", f"must be 0 or more (NAG applies in the first N steps); got {self.nag_steps}")
        if self.uses_nag and self.uses_cfg:
            raise SpecError(
                "nag_scale",
                f"NAG is for CFG off (got --guidance-scale {self.guidance_scale}, --audio-guidance-scale"
                f" {self.effective_audio_guidance_scale}): with CFG on the negative prompt already acts through"
                " CFG's second pass; use one of the two",
            )

    @property
    def latent_frames(self) -> int:
        """Frames of the video latent: the first frame alone, then one per 8."""
        return (self.num_frames - 1) // FRAME_MULTIPLE + 1

    @property
    def effective_audio_guidance_scale(self) -> float:
        """Audio CFG: its own value when given, else the video CFG (what LTX2Pipeline does with a falsy value)."""
        return self.guidance_scale if self.audio_guidance_scale is None else self.audio_guidance_scale

    @property
    def uses_cfg(self) -> bool:
        """Classifier-free guidance runs when either modality's scale is above 1.0 (LTX2Pipeline then
        makes its batched negative+positive call); otherwise a negative prompt has no effect."""
        return self.guidance_scale > 1.0 or self.effective_audio_guidance_scale > 1.0

    @property
    def uses_nag(self) -> bool:
        """Normalized Attention Guidance runs when its scale is above 1.0 and at least one step uses it."""
        return self.nag_scale > 1.0 and self.nag_steps != 0

    @property
    def uses_negative_prompt(self) -> bool:
        """Whether the negative prompt is encoded and acts on the latents (through CFG or NAG)."""
        return self.uses_cfg or self.uses_nag

    @property
    def nag_step_count(self) -> int:
        """How many leading denoising steps NAG guides (0 when off)."""
        if not self.uses_nag:
            return 0
        return self.steps if self.nag_steps is None else min(self.nag_steps, self.steps)

    def digest(self) -> str:
        """SHA-256 of the canonical JSON of the whole spec; fields added later count only when set,
        so a batch re-run after an upgrade still recognises the clips it finished before."""
        return _sha256_json(self.fields_set_since_added())

    def latents_digest(self) -> str:
        """SHA-256 of the fields that shape the latents; decoders check it before using them.

        Decode and output settings are left out, so saved latents can be decoded again with
        another decode plan or name (`ltx2 decode`).
        """
        # NAG and guidance fields at their defaults are left out, so latents written before they existed still match.
        return _sha256_json({k: v for k, v in self.fields_set_since_added().items() if k not in DECODE_ONLY_FIELDS})

    def fields_set_since_added(self) -> dict[str, Any]:
        """`to_dict()` without the fields added in later versions (LATER_FIELD_DEFAULTS) that hold their
        default: what a spec of the version before them had, which the digests are computed from."""
        return {
            k: v for k, v in self.to_dict().items() if not (k in LATER_FIELD_DEFAULTS and v == LATER_FIELD_DEFAULTS[k])
        }


def _sha256_json(data: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _require_text(value: str, field: str, *, allow_empty: bool) -> None:
    if not allow_empty and not value.strip():
        raise SpecError(field, "must not be empty")
    if len(value) > MAX_PROMPT_CHARS:
        raise SpecError(field, f"is {len(value)} characters; at most {MAX_PROMPT_CHARS} are allowed")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:  # lone surrogates, e.g. undecodable bytes from a command line
        raise SpecError(field, NOT_UTF8) from None
    if size > MAX_PROMPT_BYTES:
        raise SpecError(field, f"is {size} bytes in UTF-8; at most {MAX_PROMPT_BYTES} are allowed")


def require_path_text(value: str, field: str) -> None:
    """A path or repo id holds no NUL byte: no file name can, and the OS refuses one with a ValueError
    deep in the lookup, which a client must see as an invalid field, never as an internal error."""
    if "\0" in value:
        raise SpecError(field, "must not contain a NUL byte (\\0); no file name or repo id can hold one")


def nearest_sizes(value: int, multiple: int = SIZE_MULTIPLE, low: int = MIN_SIZE) -> list[int]:
    """The allowed sizes nearest to an invalid `value`: the multiples of `multiple` either side of
    it, clamped into `low`..MAX_SIZE, so every suggestion is itself valid (one when they meet)."""
    below = value // multiple * multiple
    candidates = (below, below + multiple) if below != value else (value,)
    return sorted({min(MAX_SIZE, max(low, size)) for size in candidates})


def nearest_frames(value: int) -> list[int]:
    """The allowed frame counts nearest to an invalid `value`: the 8n+1 counts either side of it,
    clamped into the allowed range, so every suggestion is itself valid (one when they meet)."""
    below = (value - 1) // FRAME_MULTIPLE * FRAME_MULTIPLE + 1
    candidates = (below, below + FRAME_MULTIPLE) if below != value else (value,)
    return sorted({min(MAX_FRAMES, max(MIN_FRAMES, frames)) for frames in candidates})


def _require_frames(value: int) -> None:
    if value % FRAME_MULTIPLE == 1 and MIN_FRAMES <= value <= MAX_FRAMES:
        return
    raise SpecError(
        "num_frames",
        f"must be 8n+1 between {MIN_FRAMES} and {MAX_FRAMES} (e.g. 97, 121, 161); got {value}"
        f" (nearest allowed: {' or '.join(map(str, nearest_frames(value)))})",
    )


def _require_lora(lora: dict[str, Any]) -> None:
    unknown = set(lora) - LORA_KEYS
    if unknown:
        raise SpecError("lora", f"unknown LoRA key {sorted(unknown)[0]!r}; allowed: {', '.join(sorted(LORA_KEYS))}")
    source = lora.get("source")
    if not isinstance(source, str) or not source.strip():
        raise SpecError("lora", "needs a repo id or a path to a .safetensors file")
    require_path_text(source, "lora")
    weight_name = lora.get("weight_name")
    if weight_name is not None and (not isinstance(weight_name, str) or "/" in weight_name):
        raise SpecError("lora_weight_name", f"must be a file name inside the LoRA repo or folder; got {weight_name!r}")
    if weight_name is not None:
        require_path_text(weight_name, "lora_weight_name")
    scale = lora.get("scale", 1.0)
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not 0.0 <= scale <= 1.0:
        raise SpecError("lora_scale", f"must be between 0.0 and 1.0; got {scale!r}")


def _require_stage2_lora(lora: dict[str, Any]) -> None:
    unknown = set(lora) - STAGE2_LORA_KEYS
    if unknown:
        raise SpecError(
            "stage2_lora", f"unknown key {sorted(unknown)[0]!r}; allowed: {', '.join(sorted(STAGE2_LORA_KEYS))}"
        )
    source = lora.get("source")
    if not isinstance(source, str) or not source.strip():
        raise SpecError("stage2_lora", "needs a repo id or a path to a .safetensors file")
    require_path_text(source, "stage2_lora")
    weight_name = lora.get("weight_name")
    if weight_name is not None and (not isinstance(weight_name, str) or not weight_name or "/" in weight_name):
        raise SpecError(
            "stage2_lora_weight_name", f"must be a file name inside the LoRA repo or folder; got {weight_name!r}"
        )
    if weight_name is not None:
        require_path_text(weight_name, "stage2_lora_weight_name")


def _require_range(field: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise SpecError(field, f"must be between {low} and {high}; got {value}")


def _require_choice(field: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise SpecError(field, f"must be one of {', '.join(allowed)}; got {value!r}")


def _describe(annotation: object) -> str:
    return getattr(annotation, "__name__", None) or str(annotation)
