"""Turn a user's request (flags, or a client's partial spec) into a validated JobSpec.

`spec_request` makes the request from a front door's values (the command line's flags, the
gateway's fields: the same names); `build_spec` makes the spec from it. Shared by `ltx2 generate`
(embedded), `ltx2 submit`, the daemon and the gateway, so all fill defaults, resolve the model and
warn the same way.
"""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from config.presets import DISTILLED_SCHEDULE
from config.settings import Settings
from orchestrator.run.condition_lookup import CheckedCondition, resolve_conditions
from orchestrator.run.extension_lookup import (
    ExtensionSource,
    default_overlap_for,
    find_source,
    resolve_extension,
    source_defaults,
)
from orchestrator.run.inputs import require_image
from orchestrator.run.lora_lookup import resolve_lora
from orchestrator.run.model_lookup import ResolvedModel, ensure_tiny_model, is_cached, resolve_model
from orchestrator.run.reference_lookup import CheckedReference, resolve_reference
from orchestrator.run.request_digest import FileHashes, RequestIdentity, identify
from orchestrator.run.retake_lookup import RetakeSource, find_retake_source, resolve_retake, retake_defaults
from orchestrator.run.soundtrack_lookup import CheckedAudio, resolve_audio
from protocol.codec import is_instance_of
from protocol.conditions import parse_condition_flag
from protocol.control_video import reference_request
from protocol.errors import ModelNotFound
from protocol.extension import default_overlap, describe_extension_duration, extension_frames_lasting
from protocol.families import DIFFUSION_DECODER, LATENT_UPSAMPLER, LEGACY_FAMILY, vae_temporal_ratio
from protocol.job_record import ResolvedExtension, ResolvedRetake
from protocol.model_ids import TINY_REPO_ID, TINY_REPO_IDS
from protocol.request_fields import flag_of
from protocol.spec import REQUEST_ONLY, SPEC_FIELDS, JobSpec
from protocol.spec_rules import (
    DECODERS,
    DIFFUSION_DECODER_NAME,
    MAX_FRAMES,
    NOT_UTF8,
    ONE_STAGE,
    SCHEDULES,
    TWO_STAGE,
    VAE_DECODER,
    SpecError,
    describe_duration,
    frames_lasting,
    name_from_prompt,
    require_path_text,
)

# Random seeds stay below 2**31 so they are easy to retype and fit every tool's int.
RANDOM_SEED_LIMIT = 2**31
# List fields whose messages name the flag that adds one entry (`--lora`, `--condition`).
FLAG_FIELDS = {"loras": "lora", "conditions": "condition"}
# NAG settings that only matter when --nag-scale turns NAG on.
NAG_TUNING = ("nag_tau", "nag_alpha", "nag_steps")


# What a request may give, at any front door: every spec field and the inputs resolved into them
# (camera, seconds).
REQUEST_FIELDS = (*SPEC_FIELDS, *REQUEST_ONLY)


@dataclasses.dataclass(frozen=True)
class BuiltSpec:
    """A validated spec, its resolved model and lines the user should see."""

    spec: JobSpec
    model: ResolvedModel
    notices: tuple[str, ...]
    loras: tuple[dict[str, Any], ...] = ()  #: the spec's LoRAs with local `path` and `revision`
    image: Path | None = None  #: the validated conditioning image
    #: dev two-stage: the spec's stage-2 distilled LoRA with local `path`, `revision` and scale 1.0
    stage2_lora: dict[str, Any] | None = None
    #: the request's digest and what it was computed from (orchestrator.run.request_digest)
    identity: RequestIdentity | None = None
    #: the keyframes checked and placed (with the image first when both were given): copied into the job
    conditions: tuple[CheckedCondition, ...] = ()
    #: the video it extends (its file, to copy into the job, and what job.json records of it)
    extension: tuple[Path, ResolvedExtension] | None = None
    #: the IC-LoRA control video checked: copied into the job
    reference: CheckedReference | None = None
    #: the clip it retakes (its latents file, to link into the job, and what job.json records of it)
    retake: tuple[Path, ResolvedRetake] | None = None
    #: the soundtrack of audio-to-video, checked: copied into the job
    audio: CheckedAudio | None = None


def resolve_requested_model(requested: str | None, settings: Settings) -> tuple[ResolvedModel, list[str]]:
    """The model to run: as asked, else the default if cached, else the fallback (with a notice).

    Only an absent model means the default: an empty one (`--model ''`, an unset variable in a
    script) is an error, so a typo never runs a different model than the user meant.
    """
    if requested is not None:
        if not requested.strip():
            raise SpecError("model", "must name a Hugging Face repo id or a local folder; got an empty string")
        require_path_text(requested, "model")
        return resolve_local(requested), []
    if is_cached(settings.default_model):
        return resolve_model(settings.default_model), []
    fallback = settings.fallback_model
    using = f"the tiny random model {fallback} (output is noise; " if fallback == TINY_REPO_ID else f"{fallback} ("
    notice = (
        f"no weights for {settings.default_model} in the Hugging Face cache; using {using}"
        f"get the real one with: hf download {settings.default_model})"
    )
    return resolve_local(fallback), [notice]


def resolve_local(name: str) -> ResolvedModel:
    """`resolve_model`, except that a tiny model is built locally when missing."""
    return ensure_tiny_model(name) if name in TINY_REPO_IDS.values() else resolve_model(name)


def build_spec(request: dict[str, Any], settings: Settings) -> BuiltSpec:
    """Fill preset defaults, a random seed and a name from the prompt into `request`, resolve the model, validate."""
    if not isinstance(request, dict):
        raise SpecError("spec", "must be a map of fields")
    found = find_source(request["extend"], settings) if request.get("extend") is not None else None
    if found is not None:  # the source's model, size and frame rate unless the request gives its own
        request = {**request, **source_defaults(found, request)}
    retaken = find_retake_source(request["retake"], settings) if request.get("retake") is not None else None
    if retaken is not None:  # the source's size, frames and frame rate (a job's model too): its latents' shape
        request = {**request, **retake_defaults(retaken, request)}
    model_name = request.get("model")
    if model_name is not None and not isinstance(model_name, str):
        raise SpecError("model", f"must be a string, got {model_name!r}")
    model, notices = resolve_requested_model(model_name, settings)
    family = model.family.name if model.family else LEGACY_FAMILY
    fields = settings.preset_fields(model.name, family, request.get("schedule"))
    fields["seed"] = secrets.randbelow(RANDOM_SEED_LIMIT)
    fields["context_parallel"] = settings.context_parallel  # the request's own wins (below)
    fields.update({key: value for key, value in request.items() if value is not None})
    fields["model"] = model.name
    if fields.get("name") is None and isinstance(fields.get("prompt"), str):
        # No --name: the files are named after what they show (a prompt of the wrong type is left
        # for the spec's validation to name).
        fields["name"] = name_from_prompt(fields["prompt"])
    write_entries_as_maps(fields)
    seconds = fields.pop("seconds", None)
    if seconds is not None and found is not None:  # the length of what the extension adds
        fields["num_frames"] = extension_frames_for_seconds(found, model, seconds, request, fields, notices)
    elif seconds is not None:
        fields["num_frames"] = frames_for_seconds(seconds, request, fields["fps"], notices)
    if fields.get("pipeline") is None:
        size = (fields.get("width"), fields.get("height"))
        fields["pipeline"] = settings.preset_pipeline(family, fields["schedule"], *size)
    if found is not None and fields.get("overlap") is None:
        fields["overlap"] = extension_overlap(found, model, fields.get("num_frames"), notices)
    if retaken is not None and request.get("pipeline") is None:
        fields["pipeline"] = ONE_STAGE  # the only pipeline a retake runs (protocol/spec.py)
    camera = fields.pop("camera", None)
    if camera is not None:
        fields["loras"] = [camera_lora(camera, settings), *fields.get("loras", [])]
    if needs_stage2_lora(fields) and fields.get("stage2_lora") is None:
        fields["stage2_lora"] = family_stage2_lora(settings, family, fields["schedule"])
    spec = JobSpec.from_dict(fields)
    require_checkpoint_parts(spec, model)
    notices += unused_field_warnings(spec, request)
    return resolve_files(spec, model, settings, notices, found, retaken)


def unused_field_warnings(spec: JobSpec, request: dict[str, Any]) -> list[str]:
    """Warnings for fields the request set that the spec's other fields leave without effect."""
    warnings = []
    if spec.negative_prompt and not spec.uses_negative_prompt:
        warnings.append(
            "warning: --negative-prompt has no effect with --guidance-scale 1.0 (CFG is off) unless --nag-scale > 1"
        )
    if spec.audio is not None and request.get("audio_guidance_scale") is not None:
        warnings.append(
            "warning: --audio-guidance-scale has no effect with --audio (the soundtrack is held, not generated)"
        )
    unused_nag = [name for name in NAG_TUNING if name in request and request[name] is not None]
    if unused_nag and not spec.uses_nag:
        flags = ", ".join(map(flag_of, unused_nag))
        warnings.append(f"warning: {flags} has no effect without --nag-scale > 1 (NAG is off)")
    return warnings


def resolve_files(
    spec: JobSpec,
    model: ResolvedModel,
    settings: Settings,
    notices: list[str],
    found: ExtensionSource | None,
    retaken: RetakeSource | None = None,
) -> BuiltSpec:
    """The spec's files looked up and checked (LoRAs, image, keyframes, the video it extends, the clip it
    retakes), and the request's digest over them."""
    loras = tuple(resolve_lora(lora, settings.input_roots) for lora in spec.loras)
    stage2_lora = None
    if spec.stage2_lora is not None:
        stage2_lora = resolve_lora({**spec.stage2_lora, "scale": 1.0}, settings.input_roots, "stage2_lora")
    image = require_image(spec.image, settings.input_roots) if spec.image is not None else None
    hashes = FileHashes(settings.state_dir / "file-hashes")
    conditions = resolve_conditions(spec, model, image, settings.input_roots, hashes, notices)
    records = tuple(record for _, record in conditions)
    extension = None
    if found is not None:
        record = resolve_extension(spec, found, vae_temporal_ratio(model.path), records, hashes)
        extension = (found.path, record)
    retake = None
    if retaken is not None:
        retake = (retaken.path, resolve_retake(spec, retaken, vae_temporal_ratio(model.path), hashes))
    spec, reference = resolve_reference(spec, model, loras, settings.input_roots, hashes, notices)
    audio = resolve_audio(spec, settings.input_roots, hashes)
    identity = identify(
        spec,
        model,
        settings,
        loras,
        stage2_lora,
        image,
        records,
        extension[1] if extension is not None else None,
        reference[1] if reference is not None else None,
        retake[1] if retake is not None else None,
        audio[1] if audio is not None else None,
    )
    return BuiltSpec(
        spec,
        model,
        tuple(notices),
        loras,
        image,
        stage2_lora,
        identity,
        conditions,
        extension,
        reference,
        retake,
        audio,
    )


def extension_overlap(
    found: ExtensionSource, model: ResolvedModel, num_frames: object, notices: list[str]
) -> int | None:
    """The default --overlap of an extension, with a notice saying what it became."""
    ratio = vae_temporal_ratio(model.path)
    overlap = default_overlap_for(found, ratio, num_frames)
    if overlap is not None:
        notices.append(
            f"--overlap {overlap}: the clip's first {overlap} frames are the source's last (of its"
            f" {found.header.frames}; {ratio}·m+1 frames for this model's VAE)"
        )
    return overlap


def write_entries_as_maps(fields: dict[str, Any]) -> None:
    """Keyframes and the control video as maps: a batch file or a client may write them as the flags do."""
    if "conditions" in fields:
        fields["conditions"] = conditions_request(fields["conditions"])
    if fields.get("reference_video") is not None:
        fields["reference_video"] = reference_request(fields["reference_video"])


def frames_for_seconds(seconds: object, request: dict[str, Any], fps: object, notices: list[str]) -> int:
    """The frame count a `seconds` request asks for at the clip's fps (the request's or the preset's),
    with a notice saying how it was rounded; SpecError naming `seconds` for a bad or doubled length."""
    if request.get("num_frames") is not None:
        raise SpecError("seconds", "give --seconds or --num-frames, not both")
    if not is_instance_of(seconds, float):
        raise SpecError("seconds", f"must be a number of seconds; got {seconds!r}")
    if not is_instance_of(fps, float):
        raise SpecError("fps", f"must be of type float, got {fps!r}")
    frames = frames_lasting(float(seconds), float(fps))  # type: ignore[arg-type]
    notices.append(f"--seconds: {describe_duration(float(seconds), float(fps), frames)}")  # type: ignore[arg-type]
    return frames


def extension_frames_for_seconds(
    found: ExtensionSource,
    model: ResolvedModel,
    seconds: object,
    request: dict[str, Any],
    fields: dict[str, Any],
    notices: list[str],
) -> int:
    """An extension's frame count for `seconds` of new video after its overlap (the request's --overlap, or the
    default one, which a render this long always fits), with a notice; SpecError naming `seconds` as
    frames_for_seconds gives it. A malformed --overlap counts as the default here and is refused by the spec."""
    frames_for_seconds(seconds, request, fields["fps"], [])  # the same checks and messages as any clip's
    overlap = fields.get("overlap")
    if not isinstance(overlap, int) or isinstance(overlap, bool):
        ratio = vae_temporal_ratio(model.path)
        overlap = default_overlap(ratio, MAX_FRAMES, found.header.frames) or 0
    frames = extension_frames_lasting(float(seconds), float(fields["fps"]), overlap)  # type: ignore[arg-type]
    duration = describe_extension_duration(float(seconds), float(fields["fps"]), overlap, frames)  # type: ignore[arg-type]
    notices.append(f"--seconds: {duration}")
    return frames


def needs_stage2_lora(fields: dict[str, Any]) -> bool:
    """Whether the run is two-stage with a dev schedule, the one kind that fuses a stage-2 LoRA."""
    schedule = fields.get("schedule")
    return fields.get("pipeline") == TWO_STAGE and schedule in SCHEDULES and schedule != DISTILLED_SCHEDULE


def family_stage2_lora(settings: Settings, family: str, schedule: object) -> dict[str, Any]:
    """The family's stage-2 distilled LoRA ({source, weight_name}) for a dev two-stage run; SpecError
    naming --pipeline when the family has none (LTX-2.5: config/defaults.toml names no file for it)."""
    lora = settings.families[family].dev.stage2_lora()
    if lora is None:
        raise SpecError(
            "pipeline",
            f"two-stage with --schedule {schedule} fuses a distilled LoRA for stage 2, and none is known for"
            f' LTX-{family} (config/defaults.toml [families."{family}".dev] names no stage2_lora_repo); name one'
            " with --stage2-lora, or use --schedule distilled or --pipeline one-stage",
        )
    return lora


def require_checkpoint_parts(spec: JobSpec, model: ResolvedModel) -> None:
    """The checkpoint holds what the spec runs beside the pipeline's own models: the latent upsampler of
    a two-stage run, the diffusion video decoder of `--decoder diffusion`."""
    if spec.pipeline == TWO_STAGE:
        require_latent_upsampler(model)
    if spec.decoder == DIFFUSION_DECODER_NAME:
        require_diffusion_decoder(model)


def require_latent_upsampler(model: ResolvedModel) -> None:
    """ModelNotFound (exit 4), in one line naming the folder looked for, when a two-stage run's
    checkpoint has no latent upsampler; checked before any stage runs, not after stage 1."""
    folder = model.path / LATENT_UPSAMPLER
    if (folder / "config.json").is_file():
        return
    fetch = (
        f"put the checkpoint's {LATENT_UPSAMPLER} folder there"
        if model.revision == "local"
        else f"download it (hf download {model.name} --include '{LATENT_UPSAMPLER}/*')"
    )
    raise ModelNotFound(
        f"--pipeline two-stage needs the latent upsampler, but {folder} does not exist or holds no config.json;"
        f" {fetch} or use --pipeline one-stage"
    )


def require_diffusion_decoder(model: ResolvedModel) -> None:
    """SpecError naming --decoder (exit 2, nothing queued) when the checkpoint ships no diffusion video
    decoder: LTX-2.0 and 2.3 have none, and a 2.5 checkpoint may lack the folder."""
    folder = model.path / DIFFUSION_DECODER
    if (folder / "config.json").is_file():
        return
    label = f" ({model.family.label})" if model.family else ""
    raise SpecError(
        "decoder",
        f"--decoder {DIFFUSION_DECODER_NAME} needs the checkpoint's diffusion video decoder, and {model.name}{label}"
        f" has none ({folder} holds no config.json; LTX-2.5 checkpoints ship one); allowed: {', '.join(DECODERS)},"
        f" use --decoder {VAE_DECODER}",
    )


def camera_lora(name: object, settings: Settings) -> dict[str, Any]:
    """The LoRA entry for a camera move name (see [cameras] in config/defaults.toml)."""
    if not isinstance(name, str) or name not in settings.cameras:
        raise SpecError("camera", f"must be one of {', '.join(sorted(settings.cameras))}; got {name!r}")
    repo_id, weight_name = settings.cameras[name]
    return {"source": repo_id, "weight_name": weight_name, "scale": 1.0}


def spec_request(values: Mapping[str, Any]) -> dict[str, Any]:
    """The spec fields given (the rest come from the preset), from the command line's values
    (`vars(args)`) or the gateway's, which use the same names.

    Raises SpecError for text that is not UTF-8: Python hands undecodable argv bytes over as lone
    surrogates, which no protocol frame or job.json can carry (`ltx2 submit` died encoding them).
    """
    request = {
        declared.name: values[declared.name]
        for declared in REQUEST_FIELDS
        if declared.name != "stage2_lora" and values.get(declared.name) is not None
    }
    stage2_lora = stage2_lora_request(values)
    if stage2_lora is not None:
        request["stage2_lora"] = stage2_lora
    for name, value in request.items():
        require_utf8(FLAG_FIELDS.get(name, name), value)
    return request


def conditions_request(value: object) -> list[Any]:
    """The `conditions` field with each entry a map: a batch file or a client may write an entry as the
    flag does (`"key.png@48:0.8"`); the entries' own checks are the spec's."""
    if not isinstance(value, list):
        wanted = "a list of keyframes (maps, or PATH@FRAME:STRENGTH as the flag takes it)"
        raise SpecError("condition", f"conditions must be {wanted}; got {value!r}")
    return [parse_condition_flag(entry) if isinstance(entry, str) else entry for entry in value]


def stage2_lora_request(values: Mapping[str, Any]) -> dict[str, Any] | None:
    """The `stage2_lora` field from --stage2-lora and --stage2-lora-weight-name (None when neither is given)."""
    source = values.get("stage2_lora")
    weight_name = values.get("stage2_lora_weight_name")
    if source is None:
        if weight_name is not None:
            raise SpecError("stage2_lora_weight_name", "needs --stage2-lora (the repo or folder holding the file)")
        return None
    return {"source": source, **({"weight_name": weight_name} if weight_name is not None else {})}


def require_utf8(field: str, value: Any) -> None:
    """SpecError naming `field` if `value` (or any text inside it) cannot be encoded as UTF-8."""
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list):
        for item in value:
            require_utf8(field, item)
    elif isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise SpecError(field, NOT_UTF8) from None
