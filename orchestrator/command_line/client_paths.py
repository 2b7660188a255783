"""The file paths of a request `ltx2 submit` sends, made absolute where the user typed them.

The daemon reads a request's files itself, and it resolves a relative path against its own working
directory (supervisord's, or wherever `ltx2 daemon` was started), not the user's: `ltx2 submit
--reference-video depth.mp4` from a project folder was refused, or found another file of that name. So
the client makes each relative path absolute before the request leaves; what the daemon checks of it
(inside paths.input_roots, a file of the right kind) is unchanged, and a missing file is named where it
was looked for. A field that may also hold a name (--extend and --retake a job id, --lora and
--stage2-lora a Hugging Face repo id) is made absolute only when it names something here, else sent as
typed, as `generate` would read it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from protocol.control_video import REFERENCE_FIELD, reference_request
from protocol.soundtrack import AUDIO_FIELD


def with_absolute_paths(request: dict[str, Any], cwd: Path) -> dict[str, Any]:
    """`request` with its relative paths made absolute against `cwd` (nothing else changes)."""
    fixed = dict(request)
    for field in ("image", AUDIO_FIELD):  # files only
        if isinstance(fixed.get(field), str):
            fixed[field] = absolute(fixed[field], cwd)
    for field in ("extend", "retake"):  # a job id or a file
        if isinstance(fixed.get(field), str):
            fixed[field] = absolute(fixed[field], cwd, only_if_here=True)
    if isinstance(fixed.get("conditions"), list):
        fixed["conditions"] = [with_absolute_source(entry, cwd) for entry in fixed["conditions"]]
    if isinstance(fixed.get("loras"), list):
        fixed["loras"] = [with_absolute_source(entry, cwd, only_if_here=True) for entry in fixed["loras"]]
    if fixed.get("stage2_lora") is not None:
        fixed["stage2_lora"] = with_absolute_source(fixed["stage2_lora"], cwd, only_if_here=True)
    if isinstance(fixed.get(REFERENCE_FIELD), str):  # the flag's PATH[:STRENGTH], read as the daemon reads it
        fixed[REFERENCE_FIELD] = with_absolute_source(reference_request(fixed[REFERENCE_FIELD]), cwd)
    return fixed


def with_absolute_source(entry: object, cwd: Path, only_if_here: bool = False) -> object:
    """An entry ({source, ...}) with its source absolute; anything else is the daemon's to refuse."""
    if not isinstance(entry, dict) or not isinstance(entry.get("source"), str):
        return entry
    return {**entry, "source": absolute(entry["source"], cwd, only_if_here)}


def absolute(value: str, cwd: Path, only_if_here: bool = False) -> str:
    """`value` under `cwd` when it is a relative path (with `only_if_here`: one naming something there),
    else as given (`~` is the daemon's to expand: it runs as the same user)."""
    path = Path(value)
    if not value or path.is_absolute() or value.startswith("~") or (only_if_here and not (cwd / path).exists()):
        return value
    return str(cwd / path)
