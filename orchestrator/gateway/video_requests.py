"""An OpenAI `POST /v1/videos` request -> the spec fields of a daemon `submit`, or an error naming the field.

The gateway checks only what it must before the daemon sees the request: the HTTP shape of each
field (size "WxH", seconds, numbers), the model against our ids and aliases (never a path), LoRAs
as Hugging Face cache names (never paths), keyframes as the names of file parts of the same form
(never paths), and the prompt's size (a 1 MB prompt would not fit in one protocol frame).
Everything else (multiples of 32, 8n+1 frames, ranges, keyframe frames) is the daemon's JobSpec
validation, whose field names `param_of` maps back to the HTTP fields. Which fields exist, their
HTTP names and kinds come from the fields' declarations (protocol/spec.py); the spec is built by
`orchestrator.run.jobspec.spec_request`, exactly as `ltx2 submit` builds it from its flags.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Collection
from typing import Any

from config.settings import Settings
from orchestrator.gateway.directing_fields import REFERENCE_FIELD, SOURCE_FIELDS, parse_reference, source_ids
from orchestrator.gateway.request_errors import RequestError, shown
from orchestrator.run.jobspec import spec_request
from protocol.conditions import MAX_CONDITIONS, parse_condition_flag
from protocol.extension import EXTEND_FIELD
from protocol.request_fields import flag_of
from protocol.spec import REQUEST_ONLY, SPEC_FIELDS
from protocol.spec_rules import (
    MAX_PROMPT_BYTES,
    MAX_PROMPT_CHARS,
    SIZE_MULTIPLE,
    TWO_STAGE,
    TWO_STAGE_SIZE_MULTIPLE,
    SpecError,
    describe_duration,
    frames_lasting,
)

SIZE_PATTERN = re.compile(r"([1-9][0-9]{1,4})x([1-9][0-9]{1,4})")
# A Hugging Face repo id: `owner/name`, never anything a file system could read as a path.
REPO_PART = r"[A-Za-z0-9][A-Za-z0-9_-]*(\.[A-Za-z0-9_-]+)*"  # dots only between other characters: no ".."
REPO_ID_PATTERN = re.compile(f"{REPO_PART}/{REPO_PART}")
WEIGHT_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*\.safetensors")
DECLARED = (*SPEC_FIELDS, *REQUEST_ONLY)
# Form fields the gateway reads; anything else is refused so a typo is never silently ignored. Text:
# the fields declared as such, and those the gateway parses itself from text (model, size, seconds).
TEXT_FIELDS = (*(declared.name for declared in DECLARED if declared.http == "text"), "model", "size", "seconds")
# Numbers as the CLI flags of the same names take them; their ranges are the daemon's JobSpec checks,
# so a refusal here carries the message `ltx2 generate` gives for the flag.
NUMBER_FIELDS = {declared.name: declared.kind for declared in DECLARED if declared.http == "number"}
KNOWN_FIELDS = frozenset(
    {*TEXT_FIELDS, *NUMBER_FIELDS, "loras", "stage2_lora", "input_reference", "conditions", "reuse"}
    | {*SOURCE_FIELDS, REFERENCE_FIELD}
)
# The name of a form's file part holding a keyframe, as `conditions` refers to it.
UPLOAD_NAME_PATTERN = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,63}")
CONDITION_ENTRY_KEYS = frozenset({"upload", "frame", "strength", "crf"})
CONDITIONS_SHAPE = (
    'conditions must be a JSON list of keyframes, each "NAME@FRAME:STRENGTH" or {upload, frame, strength, crf},'
    " NAME a file part of this form"
)
# `reuse` as a form sends it (JSON clients send true or false).
FORM_BOOLEANS = {"true": True, "1": True, "false": False, "0": False}
MAX_LORAS = 8
# The whole numbers a request frame can carry (msgpack's signed 64 bits); the daemon's own ranges
# are narrower and give the message, but a larger number would not even reach it.
WHOLE_RANGE = (-(2**63), 2**63 - 1)
NOT_UTF8 = "must be valid UTF-8 text (it holds bytes that are not UTF-8, or a lone surrogate)"


@dataclasses.dataclass(frozen=True)
class VideoRequest:
    """What one create request asks for: the daemon spec fields and what the video object reports."""

    spec: dict[str, Any]
    seconds: str | None  #: as the client asked, when it did
    fps: float
    seconds_note: str  #: how `seconds` became a frame count, or ""
    #: return this key's finished video of exactly this request instead of rendering it again (orchestrator.run.reuse)
    reuse: bool = False


def parse_video_request(
    fields: dict[str, Any], settings: Settings, uploads: Collection[str] = (), file_parts: Collection[str] = ()
) -> VideoRequest:
    """Check and translate the request's fields (already decoded from JSON or the form); `uploads` names the
    form's file parts (keyframes, a control video), which `conditions` and `reference_video` must name (their
    paths are filled in at submit); `file_parts` the uploads that fill a field of their own name (app.FIELD_FILES:
    a video file to extend, or to retake, a soundtrack)."""
    values = typed_fields(fields)
    if "prompt" not in values or not values["prompt"].strip():
        raise RequestError("prompt", "prompt is required and must not be empty", "missing_required_parameter")
    for name in ("prompt", "negative_prompt"):
        if name in values:
            require_prompt_size(values[name], name)
    if "model" in values:
        model = known_model(values.pop("model"), settings)
        if model is not None:
            values["model"] = model
    if "size" in values:
        values.update(size_fields(values.pop("size"), values.get("pipeline"), settings.http.exact_sizes))
    preset = settings.preset_for(values.get("model", settings.default_model))
    fps = float(values.get("fps", preset.fps))
    if fps <= 0 or not math.isfinite(fps):
        raise RequestError("fps", f"fps must be a positive number; got {fps}")
    seconds = values.pop("seconds", None)
    extending = fields.get(EXTEND_FIELD) is not None or EXTEND_FIELD in file_parts
    note = seconds_fields(values, seconds, fps, extending) if seconds is not None else ""
    if fields.get("loras") is not None:
        values["loras"] = parse_loras(fields["loras"])
    if fields.get("stage2_lora") is not None:
        values["stage2_lora"], values["stage2_lora_weight_name"] = parse_stage2_lora(fields["stage2_lora"])
    values.update(file_fields(fields, uploads))
    values.update(source_ids(fields))
    return VideoRequest(spec_of(values), seconds, fps, note, boolean(fields.get("reuse", False), "reuse"))


def seconds_fields(values: dict[str, Any], seconds: str, fps: float, extending: bool) -> str:
    """`seconds` into `values`: a clip's frame count, with the note saying how it was rounded; an extension's is
    how long its new part after the overlap lasts, which the daemon counts knowing the source's frame rate and the
    overlap (orchestrator.run.jobspec.extension_frames_for_seconds; the note then comes from its record)."""
    if "num_frames" in values:
        raise RequestError("seconds", "give seconds or num_frames, not both")
    if extending:
        values["seconds"] = number(seconds, "seconds", float)
        return ""
    values["num_frames"], note = frames_for(seconds, fps)
    return note


def spec_of(values: dict[str, Any]) -> dict[str, Any]:
    """The spec fields, built as `ltx2 submit` builds them from its flags, and refused as it refuses them."""
    try:
        return spec_request(values)
    except SpecError as exc:  # text that is not UTF-8
        raise RequestError(param_of(exc.field, None), http_message(exc.field, str(exc), None)) from None


def typed_fields(fields: dict[str, Any]) -> dict[str, Any]:
    """The known fields, each of its type (numbers from a form's text too); unknown fields are refused."""
    unknown = sorted(set(fields) - KNOWN_FIELDS)
    if unknown:
        raise RequestError(unknown[0], f"unknown field {unknown[0]!r}; known: {', '.join(sorted(KNOWN_FIELDS))}")
    values: dict[str, Any] = {}
    for name in TEXT_FIELDS:
        value = fields.get(name)
        if name == "seconds" and isinstance(value, (int, float)) and not isinstance(value, bool):
            value = f"{number(value, name, float):g}"  # OpenAI sends "4"; a JSON client may well send 4
        if value is not None:
            values[name] = text(value, name)
    for name, kind in NUMBER_FIELDS.items():
        if fields.get(name) is not None:
            values[name] = number(fields[name], name, kind)
    return values


def text(value: object, name: str) -> str:
    """A string field that UTF-8 can carry: a JSON lone surrogate, or a form's bytes that were not
    UTF-8 (read as surrogates, see gateway.forms), is refused as `ltx2 submit` refuses such text."""
    if not isinstance(value, str):
        raise RequestError(name, f"{name} must be a string; got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise RequestError(name, f"{name} {NOT_UTF8}") from None
    return value


def boolean(value: object, name: str) -> bool:
    """true or false from JSON, or its text from a form."""
    if isinstance(value, str) and value.strip().lower() in FORM_BOOLEANS:
        return FORM_BOOLEANS[value.strip().lower()]
    if not isinstance(value, bool):
        raise RequestError(name, f"{name} must be true or false; got {value!r}")
    return value


def number(value: object, name: str, kind: type) -> int | float:
    """A number from JSON or from a form's text; booleans, fractions of whole fields, and numbers no
    request frame can carry (a float beyond 1.8e308, a whole number beyond 64 bits) are refused."""
    wanted = f"a{' whole' if kind is int else ''} number"
    if isinstance(value, bool):
        raise RequestError(name, f"{name} must be a number; got {value!r}")
    try:
        parsed = kind(value.strip()) if isinstance(value, str) else value
    except ValueError:
        raise RequestError(name, f"{name} must be {wanted}; got {shown(value)}") from None
    if not isinstance(parsed, (int, float)) or (kind is int and not isinstance(parsed, int)):
        raise RequestError(name, f"{name} must be {wanted}; got {shown(value)}")
    if kind is int and not WHOLE_RANGE[0] <= parsed <= WHOLE_RANGE[1]:
        raise RequestError(name, f"{name} must be a whole number of at most 64 bits; got {shown(value)}")
    try:
        parsed = kind(parsed)
    except OverflowError:  # an integer far beyond any float
        parsed = math.inf
    if not math.isfinite(parsed):
        raise RequestError(name, f"{name} must be finite; got {shown(value)}")
    return parsed


def require_prompt_size(value: str, name: str) -> None:
    """The daemon's limits, checked here too: a larger prompt would not even fit into one request frame."""
    size = len(value.encode("utf-8", "surrogatepass"))
    if len(value) > MAX_PROMPT_CHARS or size > MAX_PROMPT_BYTES:
        raise RequestError(
            name,
            f"{name} is {len(value)} characters ({size} bytes of UTF-8); at most {MAX_PROMPT_CHARS} characters"
            f" and {MAX_PROMPT_BYTES} bytes are allowed",
            "string_above_max_length",
        )


def known_model(name: str, settings: Settings) -> str | None:
    """The repo id a request's `model` names: a repo id with a preset, or an alias of one
    (`[model_aliases]`); never a local folder (a client names no paths).

    None for an alias of the default model: the request then leaves `model` out, so the daemon runs
    the default if its weights are cached and else the fallback with a notice, as `ltx2 generate`
    without --model does; the example of docs/http-api.md (`ltx-2-distilled`) and OpenAI's (`sora-2`)
    thus run on a machine without the real weights. A repo id given in full is taken as `--model` takes it:
    the client named exact weights, so their absence is an error, not another model.
    """
    asked = name.strip()
    model = settings.model_aliases.get(asked, asked)
    if model not in settings.presets:
        known = sorted({*settings.presets, *settings.model_aliases})
        raise RequestError("model", f"unknown model {name!r}; known: {', '.join(known)}", "model_not_found")
    if asked in settings.model_aliases and model == settings.default_model:
        return None
    return model


def size_fields(size: str, pipeline: object, exact_sizes: tuple[str, ...]) -> dict[str, int]:
    """`size` ("WxH") as the spec's width and height; a size of `http.exact_sizes` (OpenAI's 720x1280,
    whose 720 is no multiple of 32) as the size it renders at and the crop that delivers it (render_size;
    JobSpec.crop_box says why a crop). Any other size is taken as --width and --height take it."""
    match = SIZE_PATTERN.fullmatch(size.strip())
    if match is None:
        raise RequestError("size", "size must be WIDTHxHEIGHT in pixels, e.g. 768x512")
    width, height = int(match[1]), int(match[2])
    if match[0] in exact_sizes:
        return render_size(width, height, pipeline)
    return {"width": width, "height": height}


def render_size(width: int, height: int, pipeline: object) -> dict[str, int]:
    """The spec's size fields for a size to deliver exactly: rendered at the next size up that the pipeline
    takes (multiples of 32; of 64 for two-stage, whose first stage runs at half the size), and cropped back
    to the size asked on a side where that differs. Up, never down: a crop never enlarges."""
    multiple = TWO_STAGE_SIZE_MULTIPLE if pipeline == TWO_STAGE else SIZE_MULTIPLE
    fields = {"width": math.ceil(width / multiple) * multiple, "height": math.ceil(height / multiple) * multiple}
    if fields["width"] != width:
        fields["crop_width"] = width
    if fields["height"] != height:
        fields["crop_height"] = height
    return fields


def frames_for(seconds_text: str, fps: float) -> tuple[int, str]:
    """The smallest valid frame count (8n+1) whose clip lasts at least `seconds` at `fps`."""
    try:
        seconds = float(seconds_text)
    except ValueError:
        raise RequestError("seconds", f"seconds must be a number of seconds; got {seconds_text!r}") from None
    try:
        frames = frames_lasting(seconds, fps)
    except SpecError as exc:
        raise RequestError("seconds", f"seconds: {exc.reason}") from None
    return frames, describe_duration(seconds, fps, frames)


def parse_loras(raw: object) -> list[dict[str, Any]]:
    """`loras`: a JSON list (or its text in a form) of cache names, or of {name, weight_name, scale}."""
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except (ValueError, RecursionError):  # RecursionError: nested deeper than Python's stack
            raise RequestError("loras", "loras must be a JSON list of Hugging Face repo ids") from None
    if not isinstance(raw, list) or len(raw) > MAX_LORAS:
        raise RequestError("loras", f"loras must be a list of at most {MAX_LORAS} Hugging Face repo ids")
    loras = []
    for item in raw:
        entry = {"name": item} if isinstance(item, str) else item
        if not isinstance(entry, dict) or set(entry) - {"name", "weight_name", "scale"}:
            raise RequestError("loras", "each LoRA is a repo id or {name, weight_name, scale}")
        name = entry.get("name")
        if not isinstance(name, str) or not REPO_ID_PATTERN.fullmatch(name) or name.endswith(".safetensors"):
            raise RequestError("loras", f"{name!r} is not a Hugging Face repo id (owner/name); paths are not accepted")
        lora: dict[str, Any] = {"source": name}
        if entry.get("weight_name") is not None:
            weight = entry["weight_name"]
            if not isinstance(weight, str) or not WEIGHT_NAME_PATTERN.fullmatch(weight):
                raise RequestError("loras", f"weight_name must be a .safetensors file name; got {weight!r}")
            lora["weight_name"] = weight
        if entry.get("scale") is not None:
            lora["scale"] = number(entry["scale"], "loras", float)
        loras.append(lora)
    return loras


def parse_stage2_lora(raw: object) -> tuple[str, str | None]:
    """`stage2_lora` (dev two-stage): a cache repo id, or {name, weight_name} (as JSON text in a form);
    (repo id, weight name or None), as --stage2-lora and --stage2-lora-weight-name take them."""
    if isinstance(raw, str) and raw.lstrip().startswith("{"):
        try:
            raw = json.loads(raw)
        except (ValueError, RecursionError):
            raise RequestError("stage2_lora", "stage2_lora must be a repo id or JSON {name, weight_name}") from None
    entry = {"name": raw} if isinstance(raw, str) else raw
    if not isinstance(entry, dict) or set(entry) - {"name", "weight_name"}:
        raise RequestError("stage2_lora", "stage2_lora is a repo id or {name, weight_name}")
    name, weight = entry.get("name"), entry.get("weight_name")
    if not isinstance(name, str) or not REPO_ID_PATTERN.fullmatch(name) or name.endswith(".safetensors"):
        raise RequestError(
            "stage2_lora", f"{name!r} is not a Hugging Face repo id (owner/name); paths are not accepted"
        )
    if weight is not None and (not isinstance(weight, str) or not WEIGHT_NAME_PATTERN.fullmatch(weight)):
        raise RequestError("stage2_lora", f"weight_name must be a .safetensors file name; got {weight!r}")
    return name, weight


def parse_conditions(raw: object, uploads: Collection[str]) -> list[dict[str, Any]]:
    """`conditions`: a JSON list (its text in a form) of keyframes, each `"NAME@FRAME:STRENGTH"` (the
    flag's form, NAME a file part) or {upload, frame, strength, crf}; the spec entries, sourced from the
    part names. Every named part must be uploaded, and every uploaded part named."""
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except (ValueError, RecursionError):
            raise RequestError("conditions", CONDITIONS_SHAPE) from None
    if not isinstance(raw, list) or len(raw) > MAX_CONDITIONS:
        raise RequestError("conditions", f"{CONDITIONS_SHAPE}; at most {MAX_CONDITIONS}")
    entries = [condition_entry(item) for item in raw]
    named = {entry["source"] for entry in entries}
    if missing := sorted(named - set(uploads)):
        raise RequestError("conditions", f"{missing[0]!r} names no file part of this form; upload each keyframe as one")
    return entries


def file_fields(fields: dict[str, Any], uploads: Collection[str]) -> dict[str, Any]:
    """`conditions` and `reference_video`, each naming file parts of the form. Every part must be named by
    one of them: a part named by nothing would be a file uploaded for no purpose, most likely a typo."""
    values: dict[str, Any] = {}
    if fields.get("conditions") is not None:
        values["conditions"] = parse_conditions(fields["conditions"], uploads)
    if fields.get(REFERENCE_FIELD) is not None:
        values[REFERENCE_FIELD] = parse_reference(fields[REFERENCE_FIELD], uploads)
    named = {entry["source"] for entry in values.get("conditions", [])}
    if REFERENCE_FIELD in values:
        named.add(values[REFERENCE_FIELD]["source"])
    if unnamed := sorted(set(uploads) - named):
        raise RequestError(
            unnamed[0], f"the file part {unnamed[0]!r} is no keyframe named in conditions and no reference_video"
        )
    return values


def condition_entry(item: object) -> dict[str, Any]:
    """One keyframe of `conditions` as a spec entry whose source is the file part's name."""
    if isinstance(item, str):
        try:
            entry = parse_condition_flag(item)
        except SpecError:
            raise RequestError("conditions", CONDITIONS_SHAPE) from None
    elif isinstance(item, dict) and not set(item) - CONDITION_ENTRY_KEYS and "upload" in item:
        entry = {"source": item["upload"], **{key: value for key, value in item.items() if key != "upload"}}
    else:
        raise RequestError("conditions", CONDITIONS_SHAPE)
    if not isinstance(entry["source"], str) or not UPLOAD_NAME_PATTERN.fullmatch(entry["source"]):
        raise RequestError("conditions", f"{entry['source']!r} is not the name of a file part; paths are not accepted")
    return entry


# The daemon's JobSpec fields, as the HTTP request names them (the LoRA checks name sub-fields of their own).
SPEC_TO_PARAM = {
    **{declared.name: declared.http_field for declared in DECLARED if declared.http_name},
    "lora": "loras",
    "lora_scale": "loras",
    "lora_weight_name": "loras",
    "stage2_lora_weight_name": "stage2_lora",
    "condition": "conditions",
    "condition_crf": "conditions",
}


# The CLI's flags as the HTTP request names their fields, for messages written for the command line.
FLAG_TO_PARAM = {
    **{declared.flag: declared.http_field for declared in DECLARED if declared.http != "none"},
    "--lora-weight-name": "loras",
    "--lora-scale": "loras",
    "--stage2-lora-weight-name": "stage2_lora",
    "--condition-crf": "conditions",
}
FLAG_PATTERN = re.compile(r"--[a-z0-9][a-z0-9-]*")


def http_message(field: str, message: str, request: VideoRequest | None) -> str:
    """A spec error as an HTTP client reads it: led by the HTTP field, with the HTTP field's name
    wherever the message (written for the command line) names a flag the gateway takes as a field.

    `size` carries two fields, so its message says which side: "size: height must be ...".
    """
    param = param_of(field, request)
    reason = message.removeprefix(f"{flag_of(field)}: ")
    if reason != message:
        reason = f"{param}: {field} {reason}" if param == "size" else f"{param}: {reason}"
    return FLAG_PATTERN.sub(lambda match: FLAG_TO_PARAM.get(match[0], match[0]), reason)


def param_of(field: str, request: VideoRequest | None) -> str:
    """The HTTP field a daemon error's spec field came from."""
    if field == "num_frames" and request is not None and request.seconds is not None:
        return "seconds"
    return SPEC_TO_PARAM.get(field, field)
