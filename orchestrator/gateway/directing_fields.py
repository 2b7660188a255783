"""The directing fields of `POST /v1/videos` that name something other than text: the video a request extends
or retakes (`extend`, `retake`: a video id of the same key, never a path) and the IC-LoRA control video
(`reference_video`: a file part of the same form, never a path). A video file to retake is the form's file part
`retake` itself (app.form_fields; its stored path becomes the spec's `retake`, as ltx2 retake FILE.mp4 takes it).

The spec's own names are the HTTP fields (DESIGN.md rule 11): `extend` and `overlap`, `retake` with
`from_frame` and `to_frame`, `reference_video` and `reference_downscale`. The numbers are checked as the
flags are (protocol/spec.py declares them `http="number"`), the frame math against the source by the daemon,
whose messages the gateway passes on with the HTTP field's name. What is checked here is only what the
gateway alone knows: that a source is a video id at all (the key's ownership is checked against the
gateway's store, app.Gateway.require_own_sources), and that `reference_video` names an uploaded part.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from typing import Any

from orchestrator.gateway.request_errors import RequestError, shown
from orchestrator.run.jobdir import JOB_ID_PATTERN
from protocol.control_video import parse_reference_flag
from protocol.spec_rules import SpecError

#: The fields that name an earlier video of the same key, by its id (a video's id is its daemon job's).
SOURCE_FIELDS = ("extend", "retake")
REFERENCE_FIELD = "reference_video"
REFERENCE_ENTRY_KEYS = frozenset({"upload", "strength"})
REFERENCE_SHAPE = (
    'reference_video must be "NAME[:STRENGTH]" or {upload, strength}, NAME a file part of this form holding an MP4'
    " or MOV video (STRENGTH 0.0 to 1.0)"
)


def source_ids(fields: dict[str, Any]) -> dict[str, str]:
    """`extend` and `retake` as given: each the id of a video (what `POST /v1/videos` answered with); a path,
    a file name or anything else no video id looks like is refused here, so none reaches the daemon."""
    found = {}
    for name in SOURCE_FIELDS:
        value = fields.get(name)
        if value is None:
            continue
        if not isinstance(value, str) or not JOB_ID_PATTERN.fullmatch(value.strip()):
            raise RequestError(
                name,
                f"{name} must be the id of one of this key's completed videos (as POST /v1/videos answered it,"
                f" e.g. 20261206-181500-a1b2c3); got {shown(value)} (files and paths are not accepted"
                + ("; send a video file as the multipart file part retake" if name == "retake" else "")
                + ")",
            )
        found[name] = value.strip()
    return found


def parse_reference(raw: object, uploads: Collection[str]) -> dict[str, Any]:
    """`reference_video` as the spec's entry {source, strength?}, its source the name of a file part of the
    form (its stored path replaces it at submit): `"NAME[:STRENGTH]"` as the flag writes `PATH[:STRENGTH]`,
    or {upload, strength} (as JSON text in a form)."""
    if isinstance(raw, str) and raw.lstrip().startswith("{"):
        try:
            raw = json.loads(raw)
        except (ValueError, RecursionError):
            raise RequestError(REFERENCE_FIELD, REFERENCE_SHAPE) from None
    if isinstance(raw, str):
        try:
            entry = parse_reference_flag(raw)
        except SpecError:
            raise RequestError(REFERENCE_FIELD, REFERENCE_SHAPE) from None
    elif isinstance(raw, dict) and "upload" in raw and not set(raw) - REFERENCE_ENTRY_KEYS:
        entry = {"source": raw["upload"], **({"strength": raw["strength"]} if "strength" in raw else {})}
    else:
        raise RequestError(REFERENCE_FIELD, REFERENCE_SHAPE)
    if not isinstance(entry["source"], str) or entry["source"] not in uploads:
        raise RequestError(
            REFERENCE_FIELD,
            f"{shown(entry['source'])} names no file part of this form; upload the control video as one"
            " (paths are not accepted)",
        )
    return entry
