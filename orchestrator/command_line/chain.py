"""`ltx2 extend [SOURCE] --chain PROMPTS_FILE`: one long video from a list of prompts, each segment
extending the one before, resumable per segment.

The file holds one prompt per line (blank lines and lines starting with `#` are skipped). Segment 1
extends SOURCE, or without one is a plain clip of the first prompt; segment k extends segment k-1's job,
whose video is its joined one, so the last segment's published MP4 is the whole chain (each segment's
frames are copied into the next joined video as they are: services/joined_video.py). The other flags
apply to every segment; `--name STEM` names them `STEM-01`, `STEM-02`, ...

A segment is built only when the one before it is done (its source must be a finished job), so the
segments run one after another, each a job of its own. Progress is kept in a state file under
`<state dir>/chains/`, so running the same command again skips the segments that are done (a segment
whose request is unchanged: the same prompt, flags and source), goes on with an interrupted one from its
first unfinished stage, and renders the rest; seeds drawn for segments are kept there too. A segment
that fails stops the chain: the ones after it have nothing to extend.

When a daemon answers, the chain goes to its queue instead (`submit_chain`): one job per segment, each
submitted with `after` naming the segment before, so each waits (JobState.WAITING) until that one is done
and is then built and queued by the daemon (orchestrator/daemon/waiting_jobs.py); a segment whose source
failed or was cancelled fails, naming it. The command prints the job ids and returns at once; the last
job's MP4 is the whole chain (`ltx2 watch LAST_ID`).
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq

from config.settings import Settings
from orchestrator.command_line.progress import ProgressView
from orchestrator.command_line.stop_signals import StopOnSignals
from orchestrator.command_line.terminal import notice
from orchestrator.daemon.client import DaemonError
from orchestrator.placement.worker_link import WorkerLink
from orchestrator.run.job_end import take_job
from orchestrator.run.job_hooks import JobHooks
from orchestrator.run.jobdir import JOB_ID_PATTERN, JobDir
from orchestrator.run.jobspec import RANDOM_SEED_LIMIT, BuiltSpec, build_spec
from orchestrator.run.stage_major import run_job_stage_major
from orchestrator.run.states import JobState
from protocol import jobs
from protocol.extension import EXTEND_FIELD, OVERLAP_FIELD
from protocol.files import JOB_FILE, publish, temp_path_for
from protocol.spec_rules import SpecError

#: Runs one segment's job to its published MP4 (raising JobStopped when it ends without one).
RunJob = Callable[[JobDir], Path]
#: Sends one request to the daemon and returns its reply's data (DaemonClient.request).
Ask = Callable[[jobs.Submit], dict[str, Any]]
# The flag a chain's errors name.
CHAIN_FIELD = "chain"
# Room for a two-digit segment number after a --name.
SEGMENT_SUFFIX = "-{:02d}"


def read_prompts(path: Path) -> list[str]:
    """The prompts of a chain file; SpecError naming --chain for a file without any, or not UTF-8 text."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SpecError(CHAIN_FIELD, f"cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise SpecError(CHAIN_FIELD, f"{path} must be UTF-8 text; byte {exc.start} is not") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise SpecError(CHAIN_FIELD, f"{path} holds no prompt (one a line; blank lines and # comments are skipped)")
    return prompts


class ChainState:
    """Which job renders which segment, the seeds drawn, and which segments are done; written atomically."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {"seeds": {}, "segments": {}}

    @classmethod
    def for_chain(cls, prompts_file: Path, source: str | None, settings: Settings) -> ChainState:
        """One state per prompts file and source: the same command run again finds it."""
        key = hashlib.sha256(json.dumps([str(prompts_file.resolve()), source]).encode()).hexdigest()[:16]
        return cls(settings.state_dir / "chains" / f"{prompts_file.stem}-{key}.json")

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temp = temp_path_for(self.path)
        temp.write_text(json.dumps(self.data, indent=2, sort_keys=True))
        publish(temp, self.path)

    def entry(self, number: int) -> dict[str, Any]:
        return self.data["segments"].setdefault(str(number), {})

    def seed(self, number: int) -> int:
        return self.data["seeds"].setdefault(str(number), secrets.randbelow(RANDOM_SEED_LIMIT))


def segment_request(base: dict[str, Any], prompt: str, number: int, extends: str | None) -> dict[str, Any]:
    """Segment `number`'s request: the chain's flags, its prompt, what it extends (none: a plain clip,
    which takes no --overlap), its name."""
    request = {**base, "prompt": prompt}
    if extends is None:
        request.pop(OVERLAP_FIELD, None)
    else:
        request[EXTEND_FIELD] = extends
    if base.get("name"):
        request["name"] = base["name"] + SEGMENT_SUFFIX.format(number)
    return request


def run_chain(
    prompts_file: Path,
    base: dict[str, Any],
    source: str | None,
    settings: Settings,
    run_job: RunJob,
    report: Callable[[str], None],
) -> Path:
    """Render every segment not done yet, in order; returns the last one's published MP4 (the whole chain).

    `base` is the request of the command's flags (no prompt). A segment's job stopping without a video
    raises JobStopped out of `run_job`, after the state says where the chain stands.
    """
    prompts = read_prompts(prompts_file)
    state = ChainState.for_chain(prompts_file, source, settings)
    report(f"chain {prompts_file.name}: {len(prompts)} segments; state in {state.path}")
    extends, output = source, Path()
    for number, prompt in enumerate(prompts, start=1):
        request = segment_request(base, prompt, number, extends)
        if request.get("seed") is None:
            request["seed"] = state.seed(number)
        try:
            built = build_spec(request, settings)
        except SpecError as exc:
            raise SpecError(exc.field, f"segment {number} ({prompt[:40]!r}): {exc.reason}") from None
        for line in built.notices:
            report(f"segment {number}: {line}")
        entry = state.entry(number)
        digest = built.spec.digest()
        if entry.get("status") == JobState.DONE and entry.get("digest") == digest and Path(entry["output"]).is_file():
            report(f"segment {number}/{len(prompts)}: done earlier (job {entry['job_id']}), skipped")
        else:
            job = segment_job(entry, built, digest, settings)
            entry.update(job_id=job.id, job_dir=str(job.path), digest=digest, status=JobState.RUNNING.value)
            state.save()
            report(f"segment {number}/{len(prompts)}: job {job.id} ({built.spec.prompt[:60]})")
            try:
                entry.update(output=str(run_job(job)), status=JobState.DONE.value)
            finally:
                entry["status"] = JobDir.load(job.path).state.value
                state.save()
        extends, output = entry["job_id"], Path(entry["output"])
    return output


def segment_job(entry: dict[str, Any], built: BuiltSpec, digest: str, settings: Settings) -> JobDir:
    """The segment's earlier job when it was made for the same request (it goes on), else a new one."""
    job_dir = Path(entry.get("job_dir", ""))
    if entry.get("digest") == digest and (job_dir / JOB_FILE).is_file():
        return JobDir.load(job_dir)
    return JobDir.create(
        settings.jobs_dir,
        built.spec,
        built.model,
        loras=built.loras,
        conditions=built.conditions,
        extension=built.extension,
        stage2_lora=built.stage2_lora,
        identity=built.identity,
        owner="extend",
    )


def submit_chain(
    prompts_file: Path, base: dict[str, Any], source: str | None, ask: Ask, report: Callable[[str], None]
) -> list[str]:
    """Queue every segment on the daemon, each after the one before; returns the job ids in order.

    Segment 1 extends SOURCE: a job id is waited for like any segment (the daemon extends it at once when
    it is done), a file is extended as `ltx2 submit --extend` does. Seeds are the daemon's to draw, and a
    segment refused (its request is wrong) stops the submission there, the segments before it queued.
    """
    prompts = read_prompts(prompts_file)
    ids: list[str] = []
    after = source if source is not None and JOB_ID_PATTERN.fullmatch(source) else None
    for number, prompt in enumerate(prompts, start=1):
        extends = after or (source if number == 1 else None)
        request = segment_request(base, prompt, number, extends)
        try:
            data = ask(jobs.Submit("", request, after=after or ""))
        except DaemonError as exc:  # the segments before it stay queued: say which one was refused
            raise DaemonError(f"segment {number} ({prompt[:40]!r}): {exc}", exc.code, exc.field) from None
        for line in data["notices"]:
            report(f"segment {number}: {line}")
        waits = f", after job {data['waits_for']}" if data.get("waits_for") else ""
        report(f"segment {number}/{len(prompts)}: job {data['id']}{waits} ({prompt[:60]})")
        ids.append(data["id"])
        after = data["id"]
    return ids


def run_chain_here(
    prompts_file: Path, base: dict[str, Any], source: str | None, settings: Settings, quiet: bool
) -> Path:
    """run_chain in this process's embedded orchestrator, every segment's workers forked from one fork
    server, with progress bars and Ctrl-C handling as `ltx2 generate` has them; JobStopped when a segment
    ends without its video."""
    view = ProgressView(enabled=not quiet)
    context = zmq.Context()
    link = WorkerLink(context, fork_server=settings.fork_server, mps_setting=settings.cuda_mps)
    with StopOnSignals() as stop:

        def run_job(job: JobDir) -> Path:
            take_job(job, "extend")
            return run_job_stage_major(job, settings, link, JobHooks(listener=view, should_stop=stop.reason))

        try:
            return run_chain(prompts_file, base, source, settings, run_job, notice)
        finally:
            view.close()
            link.close()
            context.term()
