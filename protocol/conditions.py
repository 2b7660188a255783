"""Conditions (keyframes): files placed at pixel frames of the clip, and the frame math that places them.

A condition is an image (one frame) or a video (a run of frames) that the clip must show from a given
pixel frame on, with a strength from 0 to 1. The request speaks pixel frames; diffusers'
`LTX2VideoCondition.index` (pipeline_ltx2_condition.py, 0.42.1) is a *latent* index, and only a
latent frame's first pixel frame can hold a keyframe: the VAE compresses the first frame alone and
then every r frames (its `temporal_compression_ratio`, 8 for LTX-2; 4 for the tiny test models) into
one latent frame, so latent 0 is pixel frame 0 and latent k >= 1 starts at pixel frame (k - 1) * r + 1.
A frame that is no such start is refused with the nearest ones that are, never moved silently.

`-1` names the last start a condition can take: the last latent frame's for an image, the last one
from which a video still fits inside the clip for a video. A video covers r * m + 1 frames of the clip
(diffusers trims it to that, from its start); one that runs past the clip's end is refused.

Torch-free: the orchestrator checks conditions before any job exists; workers read the resolved
ones from job.json (protocol.job_record.ResolvedCondition).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from protocol.spec_rules import SpecError, require_path_text

# The flag's field name: SpecError("condition") names `--condition`, the flag a user repeats.
CONDITION_FIELD = "condition"
CRF_FIELD = "condition_crf"
CONDITION_KEYS = frozenset({"source", "frame", "strength", "crf"})
# Each condition adds its latent tokens to every transformer call; 16 is already far past any keyframe recipe.
MAX_CONDITIONS = 16
LAST_START = -1
# x264's CRF range; 0 skips the re-compression (diffusers' own switch).
MAX_CRF = 51
# PATH[@FRAME][:STRENGTH], read from the right so a path may itself hold "@" or ":" elsewhere.
FLAG_PATTERN = re.compile(r"(?P<source>.+?)(?:@(?P<frame>-?[0-9]+))?(?::(?P<strength>[0-9]*\.?[0-9]+))?")


def parse_condition_flag(text: str) -> dict[str, Any]:
    """One `--condition PATH[@FRAME][:STRENGTH]` as a spec entry ({source, frame?, strength?})."""
    match = FLAG_PATTERN.fullmatch(text)
    if match is None or not match["source"].strip():
        raise SpecError(CONDITION_FIELD, f"must be PATH[@FRAME][:STRENGTH] (e.g. key.png@48:0.8); got {text!r}")
    entry: dict[str, Any] = {"source": match["source"]}
    if match["frame"] is not None:
        entry["frame"] = int(match["frame"])
    if match["strength"] is not None:
        entry["strength"] = float(match["strength"])
    return entry


def describe_entry(entry: dict[str, Any]) -> str:
    """A condition as the flag writes it (`key.png@48:0.8`), for messages."""
    return f"{entry.get('source')}@{entry.get('frame', 0)}:{entry.get('strength', 1.0):g}"


def require_conditions(value: list[Any], field: str = CONDITION_FIELD) -> None:
    """Each entry's own shape: a source path, a frame of -1 or more, a strength 0-1, a CRF 0-51."""
    if len(value) > MAX_CONDITIONS:
        raise SpecError(CONDITION_FIELD, f"at most {MAX_CONDITIONS} conditions are allowed; got {len(value)}")
    for entry in value:
        require_condition(entry)


def require_condition(entry: object) -> None:
    if not isinstance(entry, dict):
        keys = ", ".join(sorted(CONDITION_KEYS))
        raise SpecError(CONDITION_FIELD, f"each condition is a map of {keys}; got {entry!r}")
    unknown = set(entry) - CONDITION_KEYS
    if unknown:
        keys = ", ".join(sorted(CONDITION_KEYS))
        raise SpecError(CONDITION_FIELD, f"unknown condition key {sorted(unknown)[0]!r}; allowed: {keys}")
    source = entry.get("source")
    if not isinstance(source, str) or not source.strip():
        raise SpecError(CONDITION_FIELD, "needs a path to an image or a video file")
    require_path_text(source, CONDITION_FIELD)
    frame = entry.get("frame", 0)
    if not is_whole(frame) or frame < LAST_START:
        wanted = "a pixel frame, 0 or more, or -1 (the last start)"
        raise SpecError(CONDITION_FIELD, f"{source}: the frame must be {wanted}; got {frame!r}")
    strength = entry.get("strength", 1.0)
    if not is_number(strength) or not 0.0 <= strength <= 1.0:
        raise SpecError(CONDITION_FIELD, f"{source}: the strength must be between 0.0 and 1.0; got {strength!r}")
    crf = entry.get("crf")
    if crf is not None and (not is_whole(crf) or not 0 <= crf <= MAX_CRF):
        raise SpecError(CRF_FIELD, f"must be a whole number from 0 (no re-compression) to {MAX_CRF}; got {crf!r}")


def require_frames_inside(conditions: list[dict[str, Any]], num_frames: int) -> None:
    """Every condition's frame lies inside a clip of `num_frames` (or is -1)."""
    for entry in conditions:
        frame = entry.get("frame", 0)
        if frame >= num_frames:
            raise SpecError(
                CONDITION_FIELD,
                f"{describe_entry(entry)}: frame {frame} is outside the clip (frames 0 to {num_frames - 1}, or -1 for"
                " the last start)",
            )


def is_whole(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def latent_frames(num_frames: int, ratio: int) -> int:
    """Latent frames of a clip: the first pixel frame alone, then one per `ratio`."""
    return (num_frames - 1) // ratio + 1


def latent_index(frame: int, ratio: int) -> int:
    """The latent frame that starts at pixel `frame` (an allowed start: 0, or (k - 1) * ratio + 1)."""
    return 0 if frame == 0 else (frame - 1) // ratio + 1


def start_of(index: int, ratio: int) -> int:
    """The pixel frame latent frame `index` starts at."""
    return 0 if index == 0 else (index - 1) * ratio + 1


def is_start(frame: int, ratio: int) -> bool:
    return frame == 0 or (frame - 1) % ratio == 0


def frames_used(count: int, ratio: int) -> int:
    """How many of a condition's `count` frames diffusers uses: ratio * m + 1 (its trim_conditioning_sequence)."""
    return (count - 1) // ratio * ratio + 1


def last_start(num_frames: int, ratio: int, count: int = 1) -> int | None:
    """The last allowed start from which `count` frames fit inside the clip (None: none does)."""
    for index in range(latent_frames(num_frames, ratio) - 1, -1, -1):
        if start_of(index, ratio) + count <= num_frames:
            return start_of(index, ratio)
    return None


def nearest_starts(frame: int, num_frames: int, ratio: int) -> list[int]:
    """The allowed starts either side of `frame`, inside the clip (one when they meet)."""
    starts = [start_of(index, ratio) for index in range(latent_frames(num_frames, ratio))]
    below = [start for start in starts if start < frame]
    above = [start for start in starts if start > frame]
    return [*below[-1:], *above[:1]]


def resolve_start(entry: dict[str, Any], count: int, num_frames: int, ratio: int) -> int:
    """The pixel frame a condition of `count` frames starts at in a clip of `num_frames`, checked against
    the VAE's temporal compression `ratio` and the clip's end; SpecError naming --condition otherwise."""
    shown = describe_entry(entry)
    frame = entry.get("frame", 0)
    if frame == LAST_START:
        start = last_start(num_frames, ratio, count)
        if start is None:
            raise SpecError(CONDITION_FIELD, f"{shown}: its {count} frames are longer than the clip's {num_frames}")
        return start
    if frame >= num_frames:
        raise SpecError(CONDITION_FIELD, f"{shown}: frame {frame} is outside the clip (frames 0 to {num_frames - 1})")
    if not is_start(frame, ratio):
        nearest = " or ".join(map(str, nearest_starts(frame, num_frames, ratio)))
        raise SpecError(
            CONDITION_FIELD,
            f"{shown}: frame {frame} is not where a latent frame starts (the VAE packs frame 0 alone, then every"
            f" {ratio} frames into one latent frame: keyframes start at 0, 1, {1 + ratio}, {1 + 2 * ratio}, ...);"
            f" nearest allowed: {nearest}",
        )
    last = last_start(num_frames, ratio)
    if frame > (last if last is not None else 0):
        raise SpecError(
            CONDITION_FIELD, f"{shown}: frame {frame} is past the last keyframe start {last} (the last latent frame's)"
        )
    if frame + count > num_frames:
        latest = last_start(num_frames, ratio, count)
        hint = f"the latest start for its {count} frames is {latest}" if latest is not None else "trim the video"
        raise SpecError(
            CONDITION_FIELD,
            f"{shown}: its {count} frames from frame {frame} run to frame {frame + count - 1}, past the clip's last"
            f" frame {num_frames - 1}; {hint}",
        )
    return frame


def stored_name(index: int, source: str) -> str:
    """The file a job keeps its condition `index` under (the source's suffix kept, for people reading the folder)."""
    suffix = Path(source).suffix.lower()
    if not re.fullmatch(r"\.[a-z0-9]{1,8}", suffix):
        suffix = ""
    return f"condition_{index}{suffix}"
