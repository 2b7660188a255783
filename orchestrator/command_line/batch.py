"""`ltx2 batch FILE`: render a list of clips unattended, resumably (replaces the seed's batch*.sh).

A batch file is TOML (`[defaults]` plus `[[clips]]` tables) or JSON Lines (one clip per line, an
optional first line `{"defaults": {...}}`). Each clip is a map of `ltx2 generate` flags in
snake_case (`prompt`, `camera`, `seed`, `num_frames`, `name`, `loras`, `image`, ...). The whole
file is validated before the first clip runs. Progress is recorded in a state file, so running
the same batch again skips finished clips and resumes an interrupted one at its first
unfinished stage. A summary table (clip, seconds, output) is printed and saved beside the videos.

Clips render stage-major (orchestrator.run.stage_major): every prompt is encoded first with one
text-encoder load, then diffusion runs for all clips in one process per group of clips that share
model and LoRAs, then audio decoding, then video decoding, each model loaded once per group.
With several lanes (GPUs: orchestrator.placement.lanes) the clips are split into one contiguous run per
lane, each rendered this way on its own lane at the same time (stage_major.run_across_lanes).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import secrets
import time
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from config.settings import Settings
from orchestrator.placement.lanes import split_for_lanes
from orchestrator.run.job_end import JobStopped
from orchestrator.run.jobdir import JobDir
from orchestrator.run.jobspec import RANDOM_SEED_LIMIT, BuiltSpec, build_spec
from orchestrator.run.pipeline import first_unfinished
from orchestrator.run.runner import StageOutcome
from orchestrator.run.stage_major import diffusion_processes
from orchestrator.run.states import JobState
from protocol.files import STAGE_ORDER, Stage, publish, temp_path_for
from protocol.spec_rules import SpecError

#: Called after each attempt of a clip's stage: (job, stage, how it ended).
StageReport = Callable[[JobDir, Stage, StageOutcome], None]
#: Renders jobs (by clip key) to their MP4s stage-major, calling the StageReport as stages end;
#: returns each job's (by job id) MP4 path or failure.
Render = Callable[[dict[str, JobDir], StageReport], dict[str, Path | JobStopped]]


class BatchError(ValueError):
    """The batch file cannot be used; the message names the clip and the flag."""


@dataclasses.dataclass
class Clip:
    """One validated clip of a batch."""

    key: str  #: stable identity within the batch: its position and name
    built: BuiltSpec


def read_batch(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(defaults, clips) from a TOML or JSON Lines batch file."""
    try:
        text = path.read_text(encoding="utf-8")  # not the locale's: prompts are UTF-8 wherever the batch runs
    except OSError as exc:
        raise BatchError(f"cannot read {path}: {exc}") from None
    except UnicodeDecodeError as exc:
        bad = exc.object[exc.start]
        raise BatchError(f"{path} must be UTF-8 text; byte {exc.start} (0x{bad:02x}) is not") from None
    try:
        if path.suffix in (".jsonl", ".ndjson"):
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
            defaults = rows.pop(0)["defaults"] if rows and "defaults" in rows[0] else {}
            return defaults, rows
        data = tomllib.loads(text)
    except (ValueError, KeyError) as exc:
        raise BatchError(f"{path} is not valid {'JSON Lines' if path.suffix != '.toml' else 'TOML'}: {exc}") from None
    unknown = set(data) - {"defaults", "clips"}
    if unknown:
        raise BatchError(f"{path}: unknown top-level key {sorted(unknown)[0]!r}; use [defaults] and [[clips]]")
    return data.get("defaults", {}), data.get("clips", [])


def validate_batch(path: Path, settings: Settings, seeds: dict[str, int]) -> list[Clip]:
    """Build every clip's spec (defaults < clip); any error stops the batch before it starts.

    Clips without a seed get one that is recorded in the state file, so a re-run keeps it.
    """
    defaults, rows = read_batch(path)
    if not rows:
        raise BatchError(f"{path} has no clips")
    clips = []
    for index, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise BatchError(f"clip {index}: must be a table of flags")
        request = {**defaults, **row}
        key = f"{index:03d}-{request.get('name', 'clip')}"
        if request.get("seed") is None:
            request["seed"] = seeds.setdefault(key, secrets.randbelow(RANDOM_SEED_LIMIT))
        try:
            clips.append(Clip(key, build_spec(request, settings)))
        except SpecError as exc:
            raise BatchError(f"clip {index} ({request.get('name', 'unnamed')}): {exc}") from None
    return clips


class BatchState:
    """Which job renders which clip, and which clips are done; survives crashes (atomic writes)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {"seeds": {}, "clips": {}}

    @classmethod
    def for_batch(cls, batch_file: Path, settings: Settings) -> BatchState:
        key = hashlib.sha256(str(batch_file.resolve()).encode()).hexdigest()[:16]
        return cls(settings.state_dir / "batches" / f"{batch_file.stem}-{key}.json")

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temp = temp_path_for(self.path)
        temp.write_text(json.dumps(self.data, indent=2, sort_keys=True))
        publish(temp, self.path)

    def entry(self, clip: Clip) -> dict[str, Any]:
        return self.data["clips"].setdefault(clip.key, {})


def prompts_to_prepare(jobs: list[JobDir], settings: Settings, lanes: int) -> list[JobDir]:
    """The jobs whose prompts a batch encodes before it starts: those of each lane whose diffusion
    needs more than one process (split as run_across_lanes splits them)."""
    unprepared = []
    for run in split_for_lanes(jobs, lanes):
        undiffused = [job for job in run if not job.has_outputs(Stage.ENCODE_DIFFUSE)]
        if diffusion_processes(undiffused, settings) > 1:
            unprepared += undiffused
    return unprepared


def run_batch(
    path: Path,
    settings: Settings,
    render: Render,
    report: Callable[[str], None],
    prepare_prompts: Callable[[list[JobDir]], None] = lambda jobs: None,
    lanes: int = 1,
) -> list[dict[str, Any]]:
    """Render every unfinished clip; returns the summary rows (clip, seconds, output, status).

    `render` runs the clips stage-major, split into one contiguous run per lane. When a lane's
    diffusion needs more than one process (clips with different LoRAs, or more clips than
    `[worker] group_size`), `prepare_prompts` first encodes that lane's prompts with one
    text-encoder load; a lane whose clips form a single diffusion group encodes its own prompts
    up front, on its own device and at the same time as the other lanes, which saves starting that
    extra process. A clip's seconds are the time its stages spent on it (a group worker's model
    loading counts for the group's first clip).
    """
    state = BatchState.for_batch(path, settings)
    clips = validate_batch(path, settings, state.data["seeds"])
    state.save()
    for line in dict.fromkeys(notice for clip in clips for notice in clip.built.notices):
        report(line)
    report(f"batch {path.name}: {len(clips)} clips validated; state in {state.path}")
    jobs: dict[str, JobDir] = {}
    for clip in clips:
        entry = state.entry(clip)
        spec_digest = clip.built.spec.digest()
        if (
            entry.get("status") == JobState.DONE
            and entry.get("digest") == spec_digest
            and Path(entry["output"]).is_file()
        ):
            continue
        jobs[clip.key] = resume_or_create(entry, clip, spec_digest, settings)
        entry.update(
            job_id=jobs[clip.key].id, job_dir=str(jobs[clip.key].path), digest=spec_digest, status=JobState.QUEUED.value
        )
    for clip in clips:
        if clip.key in jobs:
            state.entry(clip).update(status=JobState.RUNNING.value)
    state.save()
    if unprepared := prompts_to_prepare(list(jobs.values()), settings, lanes):
        prepare_prompts(unprepared)
    tracker = BatchProgress(jobs, report)
    results = render(jobs, tracker.stage_ended) if jobs else {}
    rows = []
    for number, clip in enumerate(clips, start=1):
        entry = state.entry(clip)
        if clip.key not in jobs:
            report(f"clip {number}/{len(clips)} {clip.key}: done earlier, skipped")
            rows.append({"clip": clip.key, "seconds": entry["seconds"], "output": entry["output"], "status": "skipped"})
            continue
        job = jobs[clip.key]
        result = results[job.id]
        seconds = round(tracker.seconds.get(job.id, 0.0), 1)
        if isinstance(result, JobStopped) and result.job_state is JobState.QUEUED:  # Ctrl-C: resumes on a rerun
            entry.update(status=JobState.QUEUED.value)
            report(f"clip {number}/{len(clips)} {clip.key}: interrupted (job {job.path})")
            rows.append({"clip": clip.key, "seconds": seconds, "output": "", "status": "stopped"})
        elif isinstance(result, JobStopped):  # unattended: recorded, the other clips went on
            entry.update(status=JobState.FAILED.value, error=str(result))
            report(f"clip {number}/{len(clips)} {clip.key}: FAILED: {result} (job {job.path})")
            rows.append({"clip": clip.key, "seconds": seconds, "output": str(result), "status": "failed"})
        else:
            entry.update(status=JobState.DONE.value, output=str(result), seconds=seconds)
            report(f"clip {number}/{len(clips)} {clip.key}: {seconds:.1f} s -> {result}")
            rows.append({"clip": clip.key, "seconds": seconds, "output": str(result), "status": "rendered"})
        state.save()
    return rows


class BatchProgress:
    """Overall progress of a stage-major batch: one line per finished clip stage, with an ETA.

    Units of work are (clip, stage) pairs; the ETA assumes the remaining ones take as long on
    average as the finished ones, which holds because each stage's model loads once per group.
    """

    def __init__(self, jobs: dict[str, JobDir], report: Callable[[str], None]) -> None:
        self.keys = {job.id: key for key, job in jobs.items()}
        self.report = report
        self.started = time.monotonic()
        self.total = sum(len(STAGE_ORDER) - first_unfinished(job) for job in jobs.values())
        self.finished = 0
        self.seconds: dict[str, float] = {}  #: job id -> seconds its stages took

    def stage_ended(self, job: JobDir, stage: Stage, outcome: StageOutcome) -> None:
        self.seconds[job.id] = self.seconds.get(job.id, 0.0) + outcome.seconds
        if not outcome.ok:
            return
        self.finished += 1
        elapsed = time.monotonic() - self.started
        eta = elapsed / self.finished * max(self.total - self.finished, 0)
        self.report(
            f"batch: {self.keys.get(job.id, job.id)} {stage.value} done in {outcome.seconds:.1f} s "
            f"({self.finished}/{self.total} clip stages, ETA for the rest {eta:.0f} s)"
        )


def resume_or_create(entry: dict[str, Any], clip: Clip, spec_digest: str, settings: Settings) -> JobDir:
    """The clip's earlier job if it is for the same spec (it resumes), else a new job."""
    job_dir = Path(entry.get("job_dir", ""))
    if entry.get("digest") == spec_digest and (job_dir / "job.json").is_file():
        return JobDir.load(job_dir)
    built = clip.built
    return JobDir.create(
        settings.jobs_dir,
        built.spec,
        built.model,
        loras=built.loras,
        image=built.image,
        conditions=built.conditions,
        extension=built.extension,
        reference=built.reference,
        retake=built.retake,
        audio=built.audio,
        stage2_lora=built.stage2_lora,
        identity=built.identity,
        owner="batch",
    )


def write_summary(path: Path, rows: list[dict[str, Any]]) -> str:
    """The summary as an aligned text table, also written to `path`."""
    width = max([len("clip")] + [len(row["clip"]) for row in rows])
    lines = [f"{'clip':<{width}}  {'seconds':>8}  {'status':<8}  output"]
    lines += [f"{row['clip']:<{width}}  {row['seconds']:>8.1f}  {row['status']:<8}  {row['output']}" for row in rows]
    text = "\n".join(lines) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = temp_path_for(path)
    temp.write_text(text)
    publish(temp, path)
    return text
