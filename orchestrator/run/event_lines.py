"""events.log lines as a person reads them: `06:22:40.838  stage_progress  encode_diffuse  denoise 1/8`.

events.log is JSON Lines (one object per event, orchestrator/run/jobdir.log_event) so that tools can
parse it; `ltx2 logs` and the gateway's `GET /v1/videos/{id}/log` (the job page's log) show it this
way instead, and `ltx2 logs --json` prints the lines as stored. It lives in run/, beside the writer of
events.log, so both the command line and the gateway (rooms above it) can use it.
"""

from __future__ import annotations

import json
from typing import Any

# Fields shown in their own columns (the rest follow as key=value).
SHOWN_FIRST = ("t", "event", "stage", "phase", "step", "total")


def format_event_line(line: str) -> str:
    """One stored line, formatted; a line that is not a JSON object is shown as it is."""
    try:
        event = json.loads(line)
    except ValueError:
        return line
    if not isinstance(event, dict):
        return line
    when = str(event.get("t", ""))
    clock = when[11:23] if len(when) >= 23 else when  # HH:MM:SS.mmm of an ISO time
    columns = [clock, str(event.get("event", "?"))]
    if event.get("stage"):
        columns.append(str(event["stage"]))
    if event.get("phase"):
        total = event.get("total") or 0
        columns.append(f"{event['phase']} {event.get('step', 0)}/{total}" if total else str(event["phase"]))
    rest = " ".join(f"{key}={shown(value)}" for key, value in event.items() if key not in SHOWN_FIRST)
    if rest:
        columns.append(rest)
    return "  ".join(columns)


def shown(value: Any) -> str:
    """A field's value: a map as k=v,k=v; text in quotes only where it holds spaces."""
    if isinstance(value, dict):
        return ",".join(f"{key}={shown(item)}" for key, item in value.items())
    if isinstance(value, str):
        return json.dumps(value) if (" " in value or not value) else value
    return json.dumps(value)
