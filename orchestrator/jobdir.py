"""A job directory and its `job.json`: the durable record of one clip.

Only the orchestrator writes job.json (atomically); workers read it. It holds the validated spec,
the resolved model, each stage's attempts (plan, result, time, peak memory) and the fingerprints
of finished outputs, which is how a re-run knows which stages to skip (DESIGN.md rule 1).
`events.log` beside it gets one JSON line per event, for `ltx2 logs` and post-mortems.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import secrets
from pathlib import Path
from typing import Any

from orchestrator.inputs import store_image
from orchestrator.model_lookup import ResolvedModel
from protocol.files import (
    EVENTS_FILE,
    INPUT_IMAGE_FILE,
    JOB_FILE,
    Stage,
    fingerprint_file,
    matches_fingerprint,
    publish,
    temp_path_for,
)
from protocol.spec import JobSpec


def new_job_id(now: dt.datetime | None = None) -> str:
    """Sortable and unique: `YYYYmmdd-HHMMSS-<6 hex>`."""
    now = now or dt.datetime.now()
    return f"{now:%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


def utc_now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")


class JobDir:
    """Read and update one job's directory."""

    def __init__(self, path: Path, record: dict[str, Any]) -> None:
        self.path = path
        self.record = record
        self.spec = JobSpec.from_dict(record["spec"])

    @property
    def id(self) -> str:
        return str(self.record["id"])

    @classmethod
    def create(
        cls,
        jobs_dir: Path,
        spec: JobSpec,
        model: ResolvedModel,
        job_id: str | None = None,
        loras: tuple[dict[str, Any], ...] = (),
        image: Path | None = None,
    ) -> JobDir:
        """Make the directory, copy the conditioning image in, write the first job.json."""
        job_id = job_id or new_job_id()
        path = jobs_dir / job_id
        (path / "logs").mkdir(parents=True, exist_ok=False)
        if image is not None:
            store_image(image, path / INPUT_IMAGE_FILE)
        record = {
            "id": job_id,
            "created": utc_now(),
            "spec": spec.to_dict(),
            "spec_digest": spec.digest(),
            "model_path": str(model.path),
            "revision": model.revision,
            "loras": list(loras),
            # Prompt embeddings are cached beside the jobs (services/embedding_cache.py).
            "embeddings_dir": str(jobs_dir.parent / "embeddings"),
            # Code compiled by --compile is cached beside them, shared by every later job.
            "compile_cache_dir": str(jobs_dir.parent / "compile-cache"),
            "status": "queued",
            "stages": {stage.value: {"status": "pending", "attempts": [], "outputs": {}} for stage in Stage},
        }
        job = cls(path, record)
        job.save()
        return job

    @classmethod
    def load(cls, path: Path) -> JobDir:
        """Open an existing job directory."""
        return cls(path, json.loads((path / JOB_FILE).read_text()))

    def save(self) -> None:
        """Write job.json atomically."""
        target = self.path / JOB_FILE
        temp = temp_path_for(target)
        temp.write_text(json.dumps(self.record, indent=2, sort_keys=True))
        publish(temp, target)

    def log_event(self, kind: str, **fields: Any) -> None:
        """Append one line to events.log (appends of one short line are atomic on POSIX)."""
        line = json.dumps({"t": utc_now(), "event": kind, **fields}, sort_keys=True)
        with (self.path / EVENTS_FILE).open("a") as handle:
            handle.write(line + "\n")

    def stage_record(self, stage: Stage) -> dict[str, Any]:
        return self.record["stages"][stage.value]

    def has_outputs(self, stage: Stage) -> bool:
        """True when the stage succeeded earlier and its outputs still match their fingerprints."""
        record = self.stage_record(stage)
        recorded = record.get("outputs", {})
        if record.get("status") != "succeeded" or set(recorded) != set(stage.outputs):
            return False
        return all(matches_fingerprint(self.path / name, recorded[name]) for name in stage.outputs)

    def clean_partial_files(self) -> None:
        """Delete temp files a killed worker left behind (call only while no worker of the job runs)."""
        for partial in self.path.glob(".*.tmp-*"):
            partial.unlink(missing_ok=True)
            self.log_event("partial_file_removed", name=partial.name)

    def start_attempt(self, stage: Stage, plan: dict[str, Any], clean: bool = True, **details: Any) -> int:
        """Record a new attempt as running; returns its number (1-based). `details` (e.g. the
        group a stage-major attempt ran in) are kept in the attempt's record.

        With `clean`, temp files of a killed earlier worker are removed first; a group's later
        members pass False because their worker is already running (it cleans up front instead).
        """
        if clean:
            self.clean_partial_files()
        record = self.stage_record(stage)
        attempt = len(record["attempts"]) + 1
        record["attempts"].append(
            {"attempt": attempt, "plan": plan, "started": utc_now(), "result": "running", **details}
        )
        record["status"] = "running"
        self.record["status"] = "running"
        self.save()
        self.log_event("stage_started", stage=stage.value, attempt=attempt, plan=plan, **details)
        return attempt

    def finish_attempt(self, stage: Stage, result: str, **details: Any) -> None:
        """Close the latest attempt with `result` ("ok" or a failure name) and details."""
        record = self.stage_record(stage)
        record["attempts"][-1].update({"result": result, "ended": utc_now(), **details})
        if result == "ok":
            record["status"] = "succeeded"
            record["outputs"] = {name: fingerprint_file(self.path / name) for name in stage.outputs}
        else:
            record["status"] = "failed"
        self.save()
        self.log_event("stage_finished", stage=stage.value, result=result, **details)

    def adopt_outputs(self, stage: Stage, note: str) -> None:
        """Record outputs placed in the directory by hand (e.g. saved latents) as the stage's result."""
        record = self.stage_record(stage)
        record["attempts"].append(
            {
                "attempt": len(record["attempts"]) + 1,
                "plan": {},
                "result": "ok",
                "reason": note,
                "started": utc_now(),
                "ended": utc_now(),
                "seconds": 0.0,
            }
        )
        record["status"] = "succeeded"
        record["outputs"] = {name: fingerprint_file(self.path / name) for name in stage.outputs}
        self.save()
        self.log_event("stage_adopted", stage=stage.value, note=note)

    def replace_spec(self, spec: JobSpec) -> None:
        """Change decode-only settings of an existing job (the latents stay valid)."""
        self.record["spec"] = spec.to_dict()
        self.record["spec_digest"] = spec.digest()
        self.spec = spec
        self.save()

    def invalidate(self, stage: Stage) -> None:
        """Forget a stage's recorded outputs: it is about to run again (attempts are kept)."""
        record = self.stage_record(stage)
        if record["status"] == "succeeded":
            record.update(status="pending", outputs={})
            self.save()

    def interrupt_running_attempts(self) -> None:
        """Close attempts left "running" by an orchestrator that died mid-stage."""
        for stage in Stage:
            for attempt in self.stage_record(stage)["attempts"]:
                if attempt["result"] == "running":
                    attempt.update(result="interrupted", ended=utc_now(), reason="orchestrator stopped")
        self.save()
        self.log_event("job_interrupted")

    def mark_skipped(self, stage: Stage) -> None:
        self.log_event("stage_skipped", stage=stage.value, reason="outputs verified")

    def finish(self, status: str, **details: Any) -> None:
        """Set the job's final status (done, failed, cancelled) and details such as the output path."""
        self.record.update({"status": status, "finished": utc_now(), **details})
        self.save()
        self.log_event("job_" + status, **details)

    def log_path(self, stage: Stage, attempt: int) -> Path:
        return self.path / "logs" / f"{stage.value}-{attempt}.log"


def tail(path: Path, lines: int) -> str:
    """The last `lines` lines of a text file (empty if it does not exist)."""
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - 64 * 1024))
            text = handle.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])
