"""The routes that name their source video outside the body's directing fields, as create requests: OpenAI's
`POST /v1/videos/{video_id}/remix` and `POST /v1/videos/extensions`, and `POST /v1/videos/{video_id}/extend`.

Each becomes the fields of `POST /v1/videos` (app.build_app sends them through the one create path), so every
check, error, idempotency and ownership rule is the create's:

- `/extend` is `extend` = the path's video; `seconds` is how long the new part after the overlap lasts (OpenAI's
  extensions count it so; orchestrator.run.jobspec.extension_frames_for_seconds).
- `/extensions` is OpenAI's shape: `video` is the video to extend, a video id (text, or `{"id": ...}` in JSON, or
  the form field `video[id]`) or, as the official client sends it, an MP4/MOV file part, which is extended as
  `ltx2 extend FILE.mp4` extends a file.
- `/remix` is a retake of the path's video (protocol/retake.py): `from_frame`..`to_frame` regenerated, every other
  latent frame the source's bit for bit. OpenAI's client sends only `prompt`; a remix without a range retakes the
  whole clip: a new render of the prompt at the source's model, size, frames and frame rate (nothing of the
  source is kept then; a range keeps the rest).
"""

from __future__ import annotations

import json
from typing import Any

from orchestrator.gateway.directing_fields import SOURCE_FIELDS
from orchestrator.gateway.request_errors import RequestError, shown
from orchestrator.run.jobdir import JOB_ID_PATTERN
from protocol.extension import EXTEND_FIELD
from protocol.retake import FROM_FIELD, TO_FIELD

#: OpenAI's field of POST /v1/videos/extensions naming the video to extend.
VIDEO_FIELD = "video"
#: `video` as a form flattens OpenAI's `{"id": ...}`.
VIDEO_ID_FORM_FIELD = "video[id]"
VIDEO_SHAPE = (
    'video must be the id of one of this key\'s completed videos (text, or {"id": ...}), or an MP4 or QuickTime video'
    " file part"
)
#: A form's uploads: part name -> (bytes, the suffix its first bytes call for), as app.Uploads.
Uploads = dict[str, tuple[bytes, str]]


def path_source_fields(
    fields: dict[str, Any], uploads: Uploads, field: str, video_id: str, route: str
) -> dict[str, Any]:
    """The create fields of a route whose path names the source: `field` (extend or retake) is the path's video;
    a body that names a source of its own is refused rather than one of the two silently winning."""
    for name in SOURCE_FIELDS:
        if name in fields or name in uploads:
            raise RequestError(name, f"{route} takes its video from the path; leave {name} out of the body")
    return {**fields, field: video_id}


def has_range(fields: dict[str, Any]) -> bool:
    """Whether a remix names its frames (either end: one alone is the retake's own refusal, naming the other)."""
    return fields.get(FROM_FIELD) is not None or fields.get(TO_FIELD) is not None


def whole_clip(fields: dict[str, Any], frames: int) -> dict[str, Any]:
    """A remix without a range: every frame of a clip of `frames`, from 0 to the last."""
    return {**fields, FROM_FIELD: 0, TO_FIELD: frames - 1}


def extension_fields(fields: dict[str, Any], uploads: Uploads) -> tuple[dict[str, Any], Uploads]:
    """OpenAI's extension request as a create's fields and uploads: `video` (an id, `{"id": ...}`, the form's
    `video[id]`, or a file part) becomes `extend` (the id as text, a file as the file part `extend`)."""
    for name in SOURCE_FIELDS:
        if name in fields or name in uploads:
            raise RequestError(name, f"POST /v1/videos/extensions names its video as {VIDEO_FIELD}; leave {name} out")
    fields, uploads = dict(fields), dict(uploads)
    given = [name for name in (VIDEO_FIELD, VIDEO_ID_FORM_FIELD) if name in fields or name in uploads]
    if len(given) != 1:
        raise RequestError(VIDEO_FIELD, "give the video to extend once, as video: " + VIDEO_SHAPE)
    if VIDEO_FIELD in uploads:
        data, suffix = uploads.pop(VIDEO_FIELD)
        if suffix != "mp4":
            raise RequestError(VIDEO_FIELD, VIDEO_SHAPE)
        uploads[EXTEND_FIELD] = (data, suffix)
        return fields, uploads
    fields[EXTEND_FIELD] = video_id_of(fields.pop(given[0]))
    return fields, uploads


def video_id_of(value: object) -> str:
    """The id in OpenAI's `video` reference: the text itself, or `{"id": ...}` (a JSON object, or its text in a
    form); a path, a file name or anything else no video id looks like is refused naming `video`."""
    given = value
    if isinstance(value, str) and value.lstrip().startswith("{"):
        try:
            value = json.loads(value)
        except (ValueError, RecursionError):
            raise RequestError(VIDEO_FIELD, f"{VIDEO_SHAPE}; got {shown(given)}") from None
    if isinstance(value, dict) and set(value) == {"id"}:
        value = value["id"]
    if not isinstance(value, str) or not JOB_ID_PATTERN.fullmatch(value.strip()):
        raise RequestError(VIDEO_FIELD, f"{VIDEO_SHAPE} (as POST /v1/videos answered it); got {shown(given)}")
    return value.strip()
