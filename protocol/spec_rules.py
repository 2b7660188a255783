"""The rules one request field's value must keep, and the limits they hold it to.

Each rule raises SpecError with a message naming the CLI flag, the value given and what is
allowed. Nothing is rounded silently: a frame count that is not 8n+1 is an error that names the
two nearest valid counts, so the user decides. The field declarations (protocol/spec.py) name
these rules; rules that relate one field to another are JobSpec's own methods.
"""

from __future__ import annotations

import math
import re
import unicodedata
from typing import Any

from protocol.request_fields import Declared, flag_of

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
# The output stem a request without a name gets (orchestrator/run/jobspec.py): the prompt's first
# words, so `ls outputs/` says what each clip shows. A few words, bounded, in characters every file
# system and shell takes as they are; "video" when the prompt has none of them (e.g. all CJK).
NAME_WORDS, NAME_FROM_PROMPT_CHARS = 5, 40
FALLBACK_NAME = "video"
DTYPES = ("auto", "bfloat16", "float32")
LORA_KEYS = frozenset({"source", "weight_name", "scale"})
# Dev two-stage's stage-2 distilled LoRA (services/two_stage.py): always fused at 1.0, as Lightricks' recipe does.
STAGE2_LORA_KEYS = frozenset({"source", "weight_name"})
SCHEDULES = ("distilled", "default")
NOT_UTF8 = "must be valid UTF-8 text (it holds bytes that are not UTF-8)"
# The distilled checkpoint was trained on one fixed 8-sigma schedule.
DISTILLED_STEPS = 8
# Normalized Attention Guidance (services/nag.py): phi = 1 is exactly off; the ComfyUI LTX-2 node uses 11,
# so 30 (the CFG ceiling) leaves room without admitting values that only produce noise.
MAX_NAG_SCALE = 30.0
# How the latents are made (services/two_stage.py): one pass at the full size, or Lightricks' two-stage recipe
# (half size, the latent upsampler x2, three distilled refining steps at the full size; with a dev schedule those
# three steps run with the distilled LoRA `stage2_lora` fused into the transformer).
ONE_STAGE, TWO_STAGE = "one-stage", "two-stage"
PIPELINES = (ONE_STAGE, TWO_STAGE)
# Video decoders (`--decoder`): the video VAE, or LTX-2.5's diffusion video decoder where the checkpoint
# ships one (services/diffusion_decode.py).
VAE_DECODER = "vae"
DIFFUSION_DECODER_NAME = "diffusion"
DECODERS = (VAE_DECODER, DIFFUSION_DECODER_NAME)
# Two-stage runs stage 1 at half the width and height, which must itself be a multiple of 32 and
# at least MIN_SIZE; so the full size is a multiple of 64 and at least 128.
TWO_STAGE_SIZE_MULTIPLE = 2 * SIZE_MULTIPLE
TWO_STAGE_MIN_SIZE = 2 * MIN_SIZE
# diffusers puts no bound on these; the bounds keep a typo from running a useless clip. LTX-2.3 uses
# STG 1 and modality 3 (LTX2Pipeline.__call__ defaults), so 10 leaves room for experiments.
MAX_STG_SCALE = 10.0
# An hour of video: far beyond what one clip can hold (MAX_FRAMES), so the frame limit gives the message.
MAX_SECONDS = 3600.0
MAX_MODALITY_SCALE = 10.0
# Processes of one context-parallel diffusion: up to a host's GPUs (8 on the largest machines it runs on),
# in powers of two, since each process takes an equal share of the prompt's 1024 tokens and of the heads.
CONTEXT_PARALLEL_SIZES = (1, 2, 4, 8)
# A delivered (cropped) side is even: H.264's 4:2:0 chroma covers 2x2 pixels, so x264 refuses an odd
# side. At least one macroblock (16 px): nothing smaller is a picture anyone asked for.
CROP_MULTIPLE = 2
MIN_CROP_SIZE = 16


class SpecError(ValueError):
    """A spec field broke a rule; `flag` is the CLI flag a user would change."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.flag = flag_of(field)
        self.reason = message  #: the message without the flag, for a front door that names the field its own way
        super().__init__(f"{self.flag}: {message}")


def require_text(value: str, field: str, *, allow_empty: bool) -> None:
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


def require_frames(value: int, field: str = "num_frames") -> None:
    if value % FRAME_MULTIPLE == 1 and MIN_FRAMES <= value <= MAX_FRAMES:
        return
    raise SpecError(
        "num_frames",
        f"must be 8n+1 between {MIN_FRAMES} and {MAX_FRAMES} (e.g. 97, 121, 161); got {value}"
        f" (nearest allowed: {' or '.join(map(str, nearest_frames(value)))})",
    )


def require_lora(lora: dict[str, Any]) -> None:
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


def require_stage2_lora(lora: dict[str, Any], field: str = "stage2_lora") -> None:
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


def require_range(field: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise SpecError(field, f"must be between {low} and {high}; got {value}")


def require_choice(field: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise SpecError(field, f"must be one of {', '.join(allowed)}; got {value!r}")


def describe(annotation: object) -> str:
    return getattr(annotation, "__name__", None) or str(annotation)


def require_prompt(value: str, field: str) -> None:
    require_text(value, field, allow_empty=False)


def require_negative_prompt(value: str, field: str) -> None:
    require_text(value, field, allow_empty=True)


def require_model(value: str, field: str) -> None:
    if not value.strip():
        raise SpecError(field, "must name a Hugging Face repo id or a local folder")
    require_path_text(value, field)


def require_size(value: int, field: str) -> None:
    if value % SIZE_MULTIPLE or not MIN_SIZE <= value <= MAX_SIZE:
        raise SpecError(
            field,
            f"must be a multiple of {SIZE_MULTIPLE} between {MIN_SIZE} and {MAX_SIZE}; got {value}"
            f" (nearest allowed: {' or '.join(map(str, nearest_sizes(value)))})",
        )


def require_crop_side(value: int, field: str) -> None:
    if value % CROP_MULTIPLE or not MIN_CROP_SIZE <= value <= MAX_SIZE:
        raise SpecError(
            field,
            f"must be an even number of pixels (H.264 stores colour per 2x2 pixels) between {MIN_CROP_SIZE} and"
            f" {MAX_SIZE}; got {value}",
        )


def require_name(value: str, field: str) -> None:
    if not NAME_PATTERN.fullmatch(value):
        raise SpecError(field, f"must match {NAME_PATTERN.pattern} (used in the output file name); got {value!r}")


def require_loras(value: list[dict[str, Any]], field: str) -> None:
    for lora in value:
        require_lora(lora)


def require_image(value: str, field: str) -> None:
    if not value.strip():
        raise SpecError(field, "must be a path to an image file")
    require_path_text(value, field)


def require_extend_source(value: str, field: str) -> None:
    if not value.strip():
        raise SpecError(field, "must name a finished job's id or a video file")
    require_path_text(value, field)


def require_nag_tau(value: float, field: str) -> None:
    if not (0.0 < value and math.isfinite(value)):
        raise SpecError(field, f"must be a finite number above 0; got {value}")


def require_nag_steps(value: int, field: str) -> None:
    if value < 0:
        raise SpecError(field, f"must be 0 or more (NAG applies in the first N steps); got {value}")


def require_context_parallel(value: int, field: str) -> None:
    if value not in CONTEXT_PARALLEL_SIZES:
        sizes = ", ".join(map(str, CONTEXT_PARALLEL_SIZES))
        raise SpecError(field, f"must be one of {sizes} (processes share the prompt's 1024 tokens evenly); got {value}")


def require_declared(declared: Declared, value: Any) -> None:
    """A value's own checks, as its declaration states them (its rule, its range, its choices)."""
    if declared.rule is not None:
        declared.rule(value, declared.name)
    if declared.low is not None and declared.high is not None:
        require_range(declared.name, value, declared.low, declared.high)
    if declared.choices:
        require_choice(declared.name, value, declared.choices)


def frames_lasting(seconds: float, fps: float) -> int:
    """The fewest valid frames (8n+1) whose clip lasts at least `seconds` at `fps`; SpecError naming
    `seconds` when no clip can (not a finite duration above 0, or more frames than MAX_FRAMES)."""
    if not math.isfinite(seconds) or not 0 < seconds <= MAX_SECONDS:
        raise SpecError("seconds", f"must be above 0 and at most {MAX_SECONDS:g}; got {seconds:g}")
    # Checked before rounding, which would overflow on 3600 s at 1e308 fps (MAX_FRAMES is 8n+1, so a count
    # up to it never rounds past it).
    if not seconds * fps <= MAX_FRAMES:
        raise SpecError(
            "seconds", f"{seconds:g} s at {fps:g} fps needs more than {MAX_FRAMES} frames, the most allowed"
        )
    wanted = math.ceil(seconds * fps - 1e-9)
    return max(MIN_FRAMES, math.ceil((wanted - 1) / FRAME_MULTIPLE) * FRAME_MULTIPLE + 1)


def describe_duration(seconds: float, fps: float, frames: int) -> str:
    """How a requested duration became a frame count, as a notice and the HTTP video object say it."""
    return f"{seconds:g} s at {fps:g} fps -> {frames} frames ({frames / fps:.3f} s)"


def name_from_prompt(prompt: str) -> str:
    """The default output stem of a clip: the prompt's first NAME_WORDS words as a lowercase ASCII slug
    (`A slow dolly-in, at night` -> `a-slow-dolly-in-at`), at most NAME_FROM_PROMPT_CHARS characters,
    cut at a word; FALLBACK_NAME when no ASCII letter or digit is left. Accents are dropped
    (`café` -> `cafe`) rather than the letter, so a Latin prompt keeps its words. The result always
    matches NAME_PATTERN, so it passes the same check as a `--name`."""
    ascii_text = unicodedata.normalize("NFKD", prompt).encode("ascii", "ignore").decode().lower()
    slug = ""
    for word in re.findall(r"[a-z0-9]+", ascii_text)[:NAME_WORDS]:
        longer = f"{slug}-{word}" if slug else word
        if len(longer) > NAME_FROM_PROMPT_CHARS:
            slug = slug or word[:NAME_FROM_PROMPT_CHARS]  # one long first word is cut, not dropped
            break
        slug = longer
    return slug or FALLBACK_NAME
