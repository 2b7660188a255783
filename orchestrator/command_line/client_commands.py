"""The daemon side of the CLI: `daemon`, `keys` and the client commands that talk to it.

`status`, `jobs` and `logs` only read: when no daemon answers they read the state dir's job
directories themselves (orchestrator.daemon.state_reader), say so once on stderr, and print the same
lines. `resume` asks the daemon when one answers; without one, orchestrator/cli.py runs the job on in
its own process (`resume_through_daemon` tells it which).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import signal
import sys
import time
from pathlib import Path
from typing import Any, Protocol

from config.settings import Settings
from orchestrator.command_line.client_paths import absolute, with_absolute_paths
from orchestrator.command_line.progress import ProgressView
from orchestrator.command_line.terminal import fail, notice
from orchestrator.daemon.client import DaemonClient, DaemonError
from orchestrator.daemon.state_reader import StateDirReader
from orchestrator.daemon.transport import DaemonNotListening, TransportError, address_from_settings, create_keys
from orchestrator.run.event_lines import format_event_line
from orchestrator.run.job_hooks import StageEvent
from orchestrator.run.jobspec import spec_request
from orchestrator.run.states import AttemptResult, JobState, StageEventKind
from protocol import codec, jobs, stages
from protocol.codec import ErrorCode
from protocol.errors import ExitCode, cli_exit_code
from protocol.job_record import DAEMON_OWNER

# How often `watch` asks for progress: live enough for a bar, negligible load on the daemon.
WATCH_INTERVAL_S = 0.5
ERROR_EXIT = {ErrorCode.INVALID_SPEC: ExitCode.INVALID_INPUT, ErrorCode.NOT_FOUND: ExitCode.OTHER}
#: Commands that only read: with no daemon answering they read the state dir directly.
READ_ONLY = frozenset({"status", "jobs", "logs"})


class Answerer(Protocol):
    """What a client command asks: the daemon (DaemonClient), or the state dir read directly (StateDirReader)."""

    def request(self, message: codec.Message) -> dict[str, Any]: ...


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Dispatch a daemon-related command; returns the exit status."""
    if args.command == "daemon":
        return check_daemon(settings) if args.check else run_daemon(settings)
    if args.command == "keys":
        return make_keys(args, settings)
    try:
        with DaemonClient(address_from_settings(settings.daemon), settings.daemon.request_timeout_s) as client:
            return COMMANDS[args.command](client, args)
    except (DaemonError, TransportError) as exc:
        if args.command in READ_ONLY and no_daemon_answers(exc):
            return read_state_dir(args, settings)
        return report_error(exc)


def daemon_endpoint(settings: Settings) -> str:
    """Where the configured daemon listens."""
    return address_from_settings(settings.daemon).endpoint


def no_daemon_answers(exc: DaemonError | TransportError) -> bool:
    """No daemon listens at the endpoint, or none replied in time (an error reply is an answer)."""
    return isinstance(exc, DaemonNotListening) or (isinstance(exc, DaemonError) and exc.code == ErrorCode.UNREACHABLE)


def report_error(exc: DaemonError | TransportError) -> int:
    """The one error line for a failed request; returns the exit status its code maps to."""
    code = getattr(exc, "code", ErrorCode.UNREACHABLE)
    if code == ErrorCode.NOT_FOUND and getattr(exc, "field", "") in ("model", "lora"):
        return fail(str(exc), ExitCode.MODEL_NOT_FOUND)
    return fail(str(exc), ERROR_EXIT.get(code, ExitCode.OTHER))


def read_state_dir(args: argparse.Namespace, settings: Settings) -> int:
    """A read-only command answered from the state dir's files, after one notice saying why."""
    notice(f"no daemon answered at {daemon_endpoint(settings)}; reading the state dir {settings.state_dir} directly")
    try:
        return COMMANDS[args.command](StateDirReader(settings.jobs_dir), args)
    except DaemonError as exc:
        return report_error(exc)


def resume_through_daemon(args: argparse.Namespace, settings: Settings) -> int | None:
    """`ltx2 resume ID` asked of the daemon: its exit status, or None when no daemon answers (the job is
    then resumed in this process)."""
    try:
        with DaemonClient(address_from_settings(settings.daemon), settings.daemon.request_timeout_s) as client:
            data = client.request(jobs.Resume(args.job_id))
    except (DaemonError, TransportError) as exc:
        return None if no_daemon_answers(exc) else report_error(exc)
    if args.output_dir is not None:
        notice("--output-dir is for a resume without a daemon; the daemon publishes into its own output folder")
    sys.stdout.write(f"{args.job_id}: {data['state']}\n")
    return 0


def chain_through_daemon(args: argparse.Namespace, settings: Settings, base: dict[str, Any]) -> int | None:
    """`ltx2 extend --chain` on the daemon's queue, one job a segment, each after the one before
    (orchestrator.command_line.chain.submit_chain): its exit status, having printed the job ids, or None
    when no daemon answers (the chain then runs in this process). A ping decides first, so a daemon that
    stops answering half-way is an error, not a second chain run here."""
    from orchestrator.command_line.chain import submit_chain

    source = absolute(args.source, Path.cwd(), only_if_here=True) if args.source is not None else None
    answered = False
    try:
        with DaemonClient(address_from_settings(settings.daemon), settings.daemon.request_timeout_s) as client:
            client.request(jobs.Ping(""))
            answered = True
            if args.output_dir is not None:
                notice("--output-dir is for a chain without a daemon; the daemon publishes into its own output folder")
            request = with_absolute_paths(base, Path.cwd())
            ids = submit_chain(args.chain.expanduser(), request, source, client.request, notice)
    except (DaemonError, TransportError) as exc:
        return None if not answered and no_daemon_answers(exc) else report_error(exc)
    sys.stdout.write("".join(f"{job_id}\n" for job_id in ids))
    return 0


def run_daemon(settings: Settings) -> int:
    """Serve until SIGTERM/SIGINT (supervisord stops it with SIGTERM); exit non-zero if another
    daemon holds the state dir, or if the executor thread died (supervisord then restarts it)."""
    from orchestrator.daemon.server import Daemon, ExecutorDied
    from orchestrator.daemon.state_lock import StateDirLocked

    logging.getLogger().setLevel(logging.INFO)
    daemon = Daemon(settings, address_from_settings(settings.daemon))
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: daemon.stop.set())
    try:
        daemon.serve()
    except StateDirLocked as exc:
        return fail(str(exc), ExitCode.OTHER)
    except ExecutorDied as exc:
        return fail(f"{exc}; exiting so that supervisord restarts the daemon", ExitCode.OTHER)
    except TransportError as exc:  # an endpoint or key configuration the daemon cannot serve
        return fail(str(exc), ExitCode.INVALID_INPUT)
    return 0


def check_daemon(settings: Settings) -> int:
    """`ltx2 daemon --check`, for health checks: exit 0 only if the configured daemon answers a ping
    and its executor thread (the one that runs the jobs) is alive."""
    try:
        with DaemonClient(address_from_settings(settings.daemon), settings.daemon.request_timeout_s) as client:
            data = client.request(jobs.Ping(""))
    except (DaemonError, TransportError) as exc:
        return fail(str(exc), ExitCode.OTHER)
    if not data.get("executor_alive"):
        return fail(f"daemon pid {data['pid']} answers, but its executor thread is not running", ExitCode.OTHER)
    sys.stdout.write(f"daemon pid {data['pid']}: serving, executor alive\n")
    return 0


def make_keys(args: argparse.Namespace, settings: Settings) -> int:
    """`ltx2 keys DIR` (CURVE pairs) or `ltx2 keys --http NAME` (a gateway API key, shown only now)."""
    if args.http is not None:
        from orchestrator.gateway.keys import KeyFileError, create_key

        try:
            key = create_key(settings.http_keys_file, args.http)
        except (KeyFileError, OSError) as exc:
            return fail(str(exc), ExitCode.INVALID_INPUT)
        notice(f"HTTP API key {args.http!r} added to {settings.http_keys_file}; it is shown only this once")
        sys.stdout.write(f"{key}\n")
        return 0
    paths = create_keys(args.directory)
    for name, path in paths.items():
        sys.stdout.write(f"{name}: {path}\n")
    return 0


def submit(client: Answerer, args: argparse.Namespace) -> int:
    """Queue the request (with --after, waiting for that job); its files' relative paths are sent absolute,
    as the daemon runs elsewhere."""
    request = with_absolute_paths(spec_request(vars(args)), Path.cwd())
    data = client.request(jobs.Submit("", request, reuse=args.reuse, after=args.after or ""))
    for line in data["notices"]:
        sys.stderr.write(f"ltx2: {line}\n")
    sys.stdout.write(f"{data['id']}\n")
    return 0


def on_lane(attempt: dict[str, Any]) -> str:
    """Where an attempt ran, when its lane pins a device: " on cuda:1 (lane 1)", or on a farm
    " on ray (lane 1, host gpu-07)"."""
    if not attempt.get("device"):
        return ""
    host = f", host {attempt['host']}" if attempt.get("host") else ""
    return f" on {attempt['device']} (lane {attempt.get('lane', 0)}{host})"


def status(client: Answerer, args: argparse.Namespace) -> int:
    if args.job_id is None:
        return list_jobs(client, argparse.Namespace(limit=20, json=args.json))
    job = client.request(jobs.Status(args.job_id))["job"]
    if args.json:
        sys.stdout.write(json.dumps(job, indent=2) + "\n")
        return 0
    lines = [
        f"job {job['id']}: {job['state']}",
        f"  prompt: {job.get('prompt', '')}",
        f"  model: {job.get('model', '')}  size: {job.get('size', '')}  seed: {job.get('seed', '')}",
    ]
    if job.get("waits_for"):
        lines.append(waiting_line(job))
    if job.get("request_digest"):
        lines.append(f"  request digest: {job['request_digest']}{reproducible_note(job.get('reproducible'))}")
    for attempt in job["attempts"]:
        lines.append(
            f"  {attempt['stage']} attempt {attempt['attempt']} [{attempt['plan']}]"
            f"{on_lane(attempt)}: {attempt['result']}"
            f" {attempt_seconds(attempt)}{waited(attempt)} {attempt['reason']}".rstrip()
        )
    if job.get("progress"):
        p = job["progress"]
        lines.append(f"  now: {p.get('stage')} {p.get('phase')} {p.get('step', 0)}/{p.get('total', 0)}")
    if job["error"]:
        lines.append(f"  error: {job['error']}{f' ({failure})' if (failure := job.get('failure')) else ''}")
    if job["output"]:
        lines.append(f"  output: {job['output']}")
    sys.stdout.write("\n".join([*lines, *runner_lines(job)]) + "\n")
    return 0


def waiting_line(job: dict[str, Any]) -> str:
    """What a job made to extend another waits for, or waited for when it never got further."""
    source = job["waits_for"]
    if job["state"] == JobState.WAITING:
        return f"  waits for: job {source}; it is built and queued once that job is done"
    return f"  waited for: job {source} (ltx2 resume {job['id']} waits for it again)"


def runner_lines(job: dict[str, Any]) -> list[str]:
    """Who runs a job that is not simply one of the daemon's queue (an `ltx2 generate` running it in its
    own process, whether that process still runs), and the command that goes on with a job left
    behind: one an interrupted command queued, or one whose orchestrator died while running it."""
    runner = job.get("runner")
    if not runner:
        return []
    lines = []
    if runner["command"] != DAEMON_OWNER:
        lines.append(f"  run by: {runner['described']}" + ("" if runner["alive"] else ", which has exited"))
    orphaned = job["state"] == JobState.RUNNING and not runner["alive"]
    if orphaned or (job["state"] == JobState.QUEUED and runner["command"] != DAEMON_OWNER):
        lines.append(f"  continue it with: ltx2 resume {job['id']}")
    return lines


def attempt_seconds(attempt: dict[str, Any]) -> str:
    """ "12.3 s" for an ended attempt; "for 4.2 s so far" for a running one, whose seconds are
    recorded only when it ends (it would otherwise read "running 0.0 s")."""
    if attempt["result"] != AttemptResult.RUNNING:
        return f"{attempt['seconds']:.1f} s"
    try:
        started = dt.datetime.fromisoformat(attempt.get("started", ""))
    except ValueError:
        return "(started at an unknown time)"
    return f"for {(dt.datetime.now(dt.UTC) - started).total_seconds():.1f} s so far"


def waited(attempt: dict[str, Any]) -> str:
    """ " (after 12.8 s waiting for GO)" for a worker started ahead of its turn; its seconds count from GO."""
    seconds = float(attempt.get("waited_s") or 0.0)
    return f" (after {seconds:.1f} s waiting for GO)" if seconds >= 0.1 else ""


def reproducible_note(reproducible: dict[str, Any] | None) -> str:
    """ " (not reproducible: why)" for a job whose files are not what a fresh render of its request makes."""
    if not reproducible or reproducible.get("exact") or not reproducible.get("why"):
        return ""
    return f" (not reproducible: {reproducible['why']})"


def list_jobs(client: Answerer, args: argparse.Namespace) -> int:
    data = client.request(jobs.ListJobs("", args.limit))
    listed = data["jobs"]
    if data.get("omitted"):  # the daemon keeps a listing within one protocol frame
        notice(f"{data['omitted']} older jobs left out to fit the reply; ask for a smaller --limit")
    if args.json:
        sys.stdout.write(json.dumps(listed, indent=2) + "\n")
        return 0
    for job in listed:
        prompt = job.get("prompt", "")
        prompt = prompt if len(prompt) <= 50 else prompt[:47] + "..."
        if job.get("waits_for") and job["state"] == JobState.WAITING:
            prompt = f"(after {job['waits_for']}) {prompt}"
        sys.stdout.write(f"{job['id']}  {job['state']:<9}  {job.get('size', ''):<14}  {prompt}\n")
    return 0


def watch(client: Answerer, args: argparse.Namespace) -> int:
    """Render a job's progress until it ends; exit 0 only if it is done."""
    view = ProgressView()
    shown: tuple[Any, ...] = ()
    while True:
        job = client.request(jobs.Status(args.job_id))["job"]
        progress = job.get("progress")
        if progress:
            key = (progress.get("stage"), progress.get("phase"), progress.get("step"), progress.get("attempt"))
            if key != shown:
                shown = key
                view(to_event(args.job_id, progress))
        if JobState(job["state"]).is_terminal:
            view.close()
            if job["state"] == JobState.DONE:
                sys.stdout.write(f"{job['output']}\n")
                return 0
            return fail(f"job {job['id']} {job['state']}: {job['error']}", cli_exit_code(job.get("failure")))
        time.sleep(WATCH_INTERVAL_S)


def to_event(job_id: str, progress: dict[str, Any]) -> stages.Progress | StageEvent:
    """Turn a progress-board entry back into the event the view renders."""
    if progress.get("phase") in set(StageEventKind):
        kind = StageEventKind(progress["phase"])
        return StageEvent(progress["stage"], kind, progress.get("attempt", 0), progress.get("detail", ""))
    return stages.Progress(
        job_id,
        progress["stage"],
        progress["phase"],
        progress.get("step", 0),
        progress.get("total", 0),
        progress.get("gpu_bytes", 0),
        progress.get("rss_bytes", 0),
    )


def cancel(client: Answerer, args: argparse.Namespace) -> int:
    data = client.request(jobs.Cancel(args.job_id))
    sys.stdout.write(f"{args.job_id}: {data['state']}\n")
    return 0


def logs(client: Answerer, args: argparse.Namespace) -> int:
    """A job's last events (formatted; `--json`: as stored) and the tail of its latest worker log."""
    data = client.request(jobs.Logs(args.job_id, args.lines))
    events = data["events"] if args.json else "\n".join(map(format_event_line, data["events"].splitlines()))
    sys.stdout.write(f"--- events ---\n{events}\n")
    if data["worker_log_name"]:
        sys.stdout.write(f"--- {data['worker_log_name']} ---\n{data['worker_log']}\n")
    return 0


COMMANDS = {
    "submit": submit,
    "status": status,
    "jobs": list_jobs,
    "watch": watch,
    "cancel": cancel,
    "logs": logs,
}
