"""What the CLI shows a person about a job: formatted events, a running attempt's time, a bar
that attaches mid-stage (issue 26, item 8)."""

from __future__ import annotations

import datetime as dt
import io
import json
import re

from orchestrator.command_line.client_commands import attempt_seconds
from orchestrator.command_line.progress import ProgressView
from orchestrator.run.event_lines import format_event_line
from protocol import stages


def test_an_event_line_is_shown_as_time_event_stage_and_phase_then_the_other_fields():
    stored = {
        "t": "2026-12-06T06:22:28.405+00:00",
        "event": "stage_started",
        "stage": "encode_diffuse",
        "attempt": 1,
        "plan": {"compile": "regional", "offload": "none"},
    }
    assert format_event_line(json.dumps(stored)) == (
        "06:22:28.405  stage_started  encode_diffuse  attempt=1 plan=compile=regional,offload=none"
    )
    progress = {"t": "2026-12-06T06:23:53.002+00:00", "event": "stage_progress", "stage": "encode_diffuse"}
    assert format_event_line(json.dumps({**progress, "phase": "denoise", "step": 1, "total": 8})) == (
        "06:23:53.002  stage_progress  encode_diffuse  denoise 1/8"
    )
    warning = {"t": "2026-12-06T06:23:54.000+00:00", "event": "warning", "message": "no page cache flush"}
    assert format_event_line(json.dumps(warning)) == '06:23:54.000  warning  message="no page cache flush"'
    assert format_event_line("half a line {") == "half a line {"  # a torn or foreign line as it is


def test_a_running_attempt_shows_how_long_it_has_run_not_zero_seconds():
    started = (dt.datetime.now(dt.UTC) - dt.timedelta(seconds=42)).isoformat(timespec="milliseconds")
    shown = attempt_seconds({"result": "running", "seconds": 0.0, "started": started})
    assert re.fullmatch(r"for 4[2-9]\.\d s so far", shown), shown
    assert attempt_seconds({"result": "ok", "seconds": 3.25, "started": started}) == "3.2 s"


def test_a_bar_that_attaches_mid_phase_counts_its_rate_from_the_steps_it_saw():
    stream = io.StringIO()
    view = ProgressView(stream=stream)
    view(stages.Progress("j", "encode_diffuse", "denoise", 5, 8, 0, 1 << 30))
    first_frame = stream.getvalue()
    assert "5/8" in first_frame
    assert not re.search(r"\d+\.\d+step/s", first_frame), first_frame  # no steps watched yet: no rate
