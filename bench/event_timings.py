"""Per-stage timings of one job, read from what the orchestrator records: events.log and job.json.

The benchmarks used to time stages with regexes over the worker logs' text, which broke whenever a
log line changed and mixed the workers' local-time stamps with the orchestrator's UTC ones. The
orchestrator already records every attempt: events.log has one JSON line per event (`t`, `event`:
stage_started / stage_finished / stage_skipped / stage_adopted / job_done / job_failed ..., and
fields such as `stage`, `attempt`, `result`, `seconds`, `peak_gpu_bytes`, `peak_rss_bytes`), and
job.json's `stages.<stage>.attempts[]` carry `started`, `ended`, `seconds`, the peaks, `plan` and
`result`. This module turns those into start/end/seconds/peaks per stage and nothing more; it
imports only the standard library and the import-free orchestrator.run.states (the state names).

Start and end come from events.log (the stage_started of the attempt, the stage_finished after
it); job.json's own stamps stand in when an event is missing (an adopted stage, an orchestrator
that died mid-stage). `seconds` is the orchestrator's monotonic measure of the attempt.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from pathlib import Path
from typing import Any

from orchestrator.run.states import AttemptResult

STAGE_ORDER = ("encode_diffuse", "audio_decode", "video_decode")
JOB_END_EVENTS = ("job_done", "job_failed", "job_cancelled", "job_interrupted")


def parse_time(text: str) -> float:
    """ISO-8601 with offset ("2026-11-30T15:25:31.123+00:00") -> UNIX seconds."""
    return dt.datetime.fromisoformat(text).timestamp()


def optional_time(text: str | None) -> float | None:
    return None if not text else parse_time(text)


def read_events(job_dir: Path) -> list[dict[str, Any]]:
    """Every complete line of the job's events.log, in order (a line still being written is left out)."""
    path = job_dir / "events.log"
    if not path.is_file():
        return []
    events = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and "event" in event and "t" in event:
            events.append(event)
    return events


@dataclasses.dataclass
class AttemptTiming:
    """One attempt of a stage: when it started and ended (UNIX seconds), how it ended, its peaks."""

    attempt: int
    started: float | None = None
    ended: float | None = None
    seconds: float | None = None
    result: str | None = None
    reason: str | None = None
    plan: dict[str, Any] | None = None
    peak_gpu_bytes: int | None = None
    peak_rss_bytes: int | None = None
    group: list[str] | None = None  #: the jobs of a stage-major group worker, when it ran in one
    lane: int = 0  #: the lane that ran it (orchestrator.placement.lanes; 0 for the single lane)

    @property
    def wall_s(self) -> float | None:
        """End minus start on the orchestrator's wall clock."""
        return None if self.started is None or self.ended is None else self.ended - self.started


@dataclasses.dataclass
class StageTiming:
    """A stage of one job: its attempts in order; the numbers of the stage are the last attempt's."""

    stage: str
    attempts: list[AttemptTiming] = dataclasses.field(default_factory=list)
    skipped: bool = False  #: outputs of an earlier run verified, no attempt this time

    @property
    def last(self) -> AttemptTiming | None:
        return self.attempts[-1] if self.attempts else None

    def value(self, name: str) -> Any:
        """A field of the last attempt (None without one)."""
        return getattr(self.last, name) if self.last else None

    @property
    def started(self) -> float | None:
        return self.value("started")

    @property
    def ended(self) -> float | None:
        return self.value("ended")

    @property
    def seconds(self) -> float | None:
        return self.value("seconds")


@dataclasses.dataclass
class JobTiming:
    """One job: its stages in run order and the job's own marks (created, ended)."""

    job_id: str
    name: str | None  #: the spec's name (a batch's clip name)
    status: str
    created: float | None
    ended: float | None  #: the last job_done / job_failed / ... event
    output: str | None
    stages: dict[str, StageTiming]

    def lead_in_s(self, stage: str) -> float | None:
        """Time from the end of the stage before (the job's creation for the first) to this start."""
        names = list(self.stages)
        current = self.stages.get(stage)
        if current is None or current.started is None:
            return None
        before = self.stages[names[names.index(stage) - 1]].ended if names.index(stage) else self.created
        return None if before is None else current.started - before


def attempts_from_events(events: list[dict[str, Any]]) -> dict[str, dict[int, dict[str, Any]]]:
    """stage -> attempt number -> {"started": t, "ended": t, **stage_finished fields}.

    stage_finished carries no attempt number: it closes the latest stage_started of its stage.
    """
    found: dict[str, dict[int, dict[str, Any]]] = {}
    for event in events:
        stage, kind = event.get("stage"), event["event"]
        if kind == "stage_started" and stage:
            found.setdefault(stage, {})[int(event.get("attempt", 0))] = {"started": parse_time(event["t"])}
        elif kind == "stage_finished" and found.get(stage):
            latest = found[stage][max(found[stage])]
            latest.update({k: v for k, v in event.items() if k not in ("t", "event", "stage")})
            latest["ended"] = parse_time(event["t"])
    return found


def merge_attempt(record: dict[str, Any], seen: dict[str, Any]) -> AttemptTiming:
    """One job.json attempt, its start and end replaced by the events' when they were logged."""

    def pick(name: str) -> Any:
        return seen[name] if seen.get(name) is not None else record.get(name)

    return AttemptTiming(
        attempt=int(record.get("attempt", 0)),
        started=seen.get("started", optional_time(record.get("started"))),
        ended=seen.get("ended", optional_time(record.get("ended"))),
        seconds=pick("seconds"),
        result=pick("result"),
        reason=pick("reason"),
        plan=record.get("plan"),
        peak_gpu_bytes=pick("peak_gpu_bytes"),
        peak_rss_bytes=pick("peak_rss_bytes"),
        group=record.get("group"),
        lane=int(record.get("lane", 0)),
    )


def skipped_stages(events: list[dict[str, Any]]) -> set[str]:
    """Stages whose latest event is stage_skipped (verified outputs of an earlier run)."""
    latest: dict[str, str] = {}
    for event in events:
        if event.get("stage"):
            latest[event["stage"]] = event["event"]
    return {stage for stage, kind in latest.items() if kind == "stage_skipped"}


def read_job(job_dir: Path) -> JobTiming:
    """The job's timings from its events.log and job.json; stages in pipeline order."""
    record = json.loads((job_dir / "job.json").read_text())
    events = read_events(job_dir)
    logged = attempts_from_events(events)
    skipped = skipped_stages(events)
    names = [s for s in STAGE_ORDER if s in record["stages"]] + [s for s in record["stages"] if s not in STAGE_ORDER]
    stages = {}
    for name in names:
        attempts = [
            merge_attempt(a, logged.get(name, {}).get(int(a.get("attempt", 0)), {}))
            for a in record["stages"][name].get("attempts", [])
        ]
        stages[name] = StageTiming(name, attempts, skipped=name in skipped)
    ends = [parse_time(e["t"]) for e in events if e["event"] in JOB_END_EVENTS]
    return JobTiming(
        job_id=record["id"],
        name=record.get("spec", {}).get("name"),
        status=record["status"],
        created=optional_time(record.get("created")),
        ended=ends[-1] if ends else optional_time(record.get("finished")),
        output=record.get("output"),
        stages=stages,
    )


def finish_times(job: JobTiming) -> dict[str, float]:
    """Stage -> end of its last attempt, for stages whose last attempt succeeded."""
    return {
        name: stage.ended
        for name, stage in job.stages.items()
        if stage.ended is not None and stage.value("result") == AttemptResult.OK
    }


def progress_rows(events: list[dict[str, Any]], stage: str) -> list[tuple[float, str, int]]:
    """(time, phase, step) of each progress event of the stage's last attempt, in order."""
    rows: list[tuple[float, str, int]] = []
    for event in events:
        if event.get("stage") != stage:
            continue
        if event["event"] == "stage_started":
            rows = []  # a retry: only the last attempt's progress counts
        elif event["event"] == "stage_progress":
            rows.append((parse_time(event["t"]), str(event.get("phase", "")), int(event.get("step", 0))))
    return rows


def first_mark(rows: list[tuple[float, str, int]], prefix: str, step: int | None = None) -> float | None:
    """When the stage first reported a phase starting with `prefix` (at `step`, if given)."""
    return next((t for t, phase, at in rows if phase.startswith(prefix) and (step is None or at == step)), None)
