"""The `ltx2` command line (torch-free: it starts in a fraction of a second).

`ltx2 generate` runs a job with an embedded orchestrator: the same stage processes, job
directory and protocol the daemon uses, without needing the daemon. So do `decode`, `batch`, and
`resume` when no daemon answers: it goes on with a job from its first unfinished stage.
"""

from __future__ import annotations

import argparse
import difflib
import functools
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import zmq

from config.settings import ConfigError, Settings, layered_config, load_settings
from orchestrator.command_line.batch import BatchError, StageReport, run_batch, write_summary
from orchestrator.command_line.cli_flags import add_declared_flag, add_spec_flags
from orchestrator.command_line.progress import ProgressView
from orchestrator.command_line.stop_signals import StopOnSignals
from orchestrator.command_line.terminal import fail, notice
from orchestrator.placement.lane_links import open_lanes
from orchestrator.placement.worker_link import UnsafeRuntimeDir, WorkerLink
from orchestrator.run import reuse
from orchestrator.run.job_end import JobBusy, JobStopped, JobWaiting, take_job
from orchestrator.run.job_hooks import JobHooks
from orchestrator.run.jobdir import JobDir
from orchestrator.run.jobspec import build_spec, spec_request
from orchestrator.run.model_lookup import resolve_model
from orchestrator.run.request_digest import identify
from orchestrator.run.runner import StageOutcome
from orchestrator.run.stage_major import run_across_lanes, run_job_stage_major
from orchestrator.run.states import JobState
from protocol.errors import ExitCode, Failure, ModelNotFound, cli_exit_code, is_no_space
from protocol.extension import AUDIO_NOTE, EXTEND_FIELD
from protocol.files import JOB_FILE, LATENTS_FILE, STAGE_ORDER, Stage, read_safetensors_metadata
from protocol.job_record import JobRecordError
from protocol.model_ids import TINY_REPO_IDS
from protocol.retake import RETAKE_AUDIO_NOTE, RETAKE_FIELD
from protocol.spec import SPEC_FIELDS, JobSpec
from protocol.spec_rules import SpecError

# The decode settings `ltx2 decode` takes, as their declarations describe them (protocol/spec.py).
DECODE_FLAGS = ("vae_chunk_frames", "vae_tiling", "compile_decoder")


class SuggestingParser(argparse.ArgumentParser):
    """argparse, plus the nearest known flag for each unknown one in its error (`--promt` -> `--prompt`).

    argparse reports a missing required flag before an unknown one, so `--promt x` alone said only
    that --prompt is required; Python 3.14's `suggest_on_error` is not available on the 3.11 we support.
    """

    #: the command line being parsed (main sets it), so a subcommand's parser can name what it did not know
    argv: tuple[str, ...] = ()

    def error(self, message: str) -> NoReturn:
        parser = self.command_parser()
        listed = message.removeprefix("unrecognized arguments: ").split() if message.startswith("unrecognized") else []
        known = [option for option in parser._option_string_actions if option.startswith("--")]
        hints = []
        for token in listed or SuggestingParser.argv:
            flag = token.split("=", 1)[0]
            if flag.startswith("--") and flag not in parser._option_string_actions:
                nearest = difflib.get_close_matches(flag, known, n=1)
                hint = f"; did you mean {nearest[0]}?" if nearest else ""
                hints.append(f"{flag} is not a flag of {parser.prog}{hint}")
        if choice := re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message):
            nearest = difflib.get_close_matches(choice[1], re.findall(r"'([^']*)'", choice[2]), n=1)
            hints += [f"did you mean {nearest[0]}?"] if nearest else []
        super().error("; ".join([message, *hints]) if choice else "; ".join([*hints, message]))

    def command_parser(self) -> argparse.ArgumentParser:
        """The parser of the subcommand named on the command line (this one if none, or if this is it)."""
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                for token in SuggestingParser.argv:
                    if token in action.choices:
                        return action.choices[token]
        return self


def build_parser() -> argparse.ArgumentParser:
    parser = SuggestingParser(
        prog="ltx2", description="LTX-2 video+audio generation in isolated stages.", allow_abbrev=False
    )
    parser.add_argument(
        "--config", type=Path, help="config file (default: $LTX2_CONFIG or ~/.config/ltx2-stages/config.toml)"
    )
    parser.add_argument("--state-dir", type=Path, help="job directories live here (default from config)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log orchestrator details")
    commands = parser.add_subparsers(dest="command", required=True)
    # `--output` must never be read as an abbreviation of `--output-dir` (or any flag of another).
    add_command = functools.partial(commands.add_parser, allow_abbrev=False)

    generate = add_command("generate", help="generate one clip now (no daemon needed)")
    add_spec_flags(generate)
    add_output_flags(generate)
    add_reuse_flag(generate, "print its MP4")

    add_extend_command(add_command)
    add_retake_command(add_command)

    submit = add_command("submit", help="queue a clip on the daemon; prints its job id")
    add_spec_flags(submit)
    add_reuse_flag(submit, "print its job id")
    submit.add_argument(
        "--after",
        metavar="JOB_ID",
        help="extend this job's video (as --extend does) even before it is done: the new job waits (state waiting)"
        " while it is queued, running or waiting, is queued once it is done, and fails if it fails or is cancelled",
    )
    for name, text in (
        ("status", "a job's state, attempts and progress"),
        ("watch", "follow a job live until it ends"),
        ("cancel", "stop a queued or running job"),
        ("resume", "continue an interrupted, failed or cancelled job (the daemon's, or here without one)"),
        ("logs", "a job's events and worker log"),
    ):
        command = add_command(name, help=text)
        command.add_argument("job_id", nargs="?" if name == "status" else None, help="job id (see `ltx2 jobs`)")
        if name in ("status", "jobs"):
            command.add_argument("--json", action="store_true", help="print the raw reply as JSON")
        if name == "logs":
            command.add_argument("--lines", type=int, default=40, help="lines of each log (default 40)")
            command.add_argument("--json", action="store_true", help="print events.log's lines as stored (JSON)")
        if name == "resume":
            command.add_argument(
                "--output-dir", type=Path, help="without a daemon: where the MP4 goes (default: ./outputs)"
            )
            command.add_argument("--quiet", action="store_true", help="without a daemon: no progress bars")
    jobs = add_command("jobs", help="list recent jobs")
    jobs.add_argument("--limit", type=int, default=20, help="how many (default 20)")
    jobs.add_argument("--json", action="store_true", help="print the raw reply as JSON")
    daemon = add_command("daemon", help="run the orchestrator daemon in the foreground (supervisord does this)")
    daemon.add_argument(
        "--check",
        action="store_true",
        help="only ping the configured daemon: exit 0 if it answers and its executor runs (for health checks)",
    )
    keys = add_command("keys", help="create CURVE key pairs for a tcp:// daemon endpoint, or an HTTP API key")
    which = keys.add_mutually_exclusive_group(required=True)
    which.add_argument("directory", nargs="?", type=Path, help="folder for the CURVE keys (created, mode 0700)")
    which.add_argument(
        "--http", metavar="NAME", help="create an API key for `ltx2 serve` called NAME; prints the key once"
    )
    serve = add_command("serve", help="run the OpenAI-style HTTP gateway (a client of the daemon)")
    serve.add_argument("--host", help="address to bind (default: http.host, 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to bind (default: http.port, 8000)")

    add_local_commands(add_command)
    return parser


def add_extend_command(add_command: Callable[..., argparse.ArgumentParser]) -> None:
    """`ltx2 extend SOURCE`: `generate --extend SOURCE`, with the output flags generate has."""
    extend = add_command(
        "extend",
        help="continue a finished job's video or an MP4: a new clip whose first --overlap frames are its last",
        description="Render a clip that continues SOURCE (a finished job's id or an MP4/MOV file): its first"
        " --overlap frames are SOURCE's last, held at full strength; model, size and fps default to SOURCE's."
        " Publishes <stem>.mp4 (SOURCE, then the new frames after the overlap) and <stem>_new.mp4 (the new part"
        f" alone). Audio: {AUDIO_NOTE}.",
    )
    extend.add_argument(
        "source",
        nargs="?",
        metavar="JOB_ID_OR_MP4",
        help="the finished job (its id) or video file to continue (with --chain: optional; without it the first"
        " prompt starts a new video)",
    )
    add_spec_flags(extend, leave_out=(EXTEND_FIELD,))
    for action in extend._actions:
        if "--prompt" in action.option_strings:
            action.required = False  # --chain gives the prompts instead: extend() asks for one of the two
    extend.add_argument(
        "--chain",
        type=Path,
        metavar="PROMPTS_FILE",
        help="render one long video: a segment per prompt of the file (one a line; # comments), each extending the"
        " one before; running it again skips the segments that are done",
    )
    add_output_flags(extend)
    add_reuse_flag(extend, "print its MP4")


def add_retake_command(add_command: Callable[..., argparse.ArgumentParser]) -> None:
    """`ltx2 retake SOURCE --from-frame A --to-frame B`: `generate --retake SOURCE`, with generate's output flags."""
    retake = add_command(
        "retake",
        help="regenerate frames A..B of a finished job's clip or an MP4, keeping its other latent frames bit for bit",
        description="Render SOURCE (a finished job's id, or an MP4/MOV file) again with frames --from-frame A to"
        " --to-frame B (whole latent frames) regenerated from the prompt and every other latent frame held at"
        " SOURCE's latents, as ltx-pipelines' retake does: a job's latents as they are, a file's as the VAEs"
        " encode it (8n+1 frames, width and height multiples of 32; nothing is resampled). Size, frames and fps"
        f" are SOURCE's (a job's model too). Publishes one MP4 of SOURCE's length. Audio: {RETAKE_AUDIO_NOTE}; a"
        " file without audio gets a new track throughout.",
    )
    retake.add_argument(
        "source", metavar="JOB_ID_OR_MP4", help="the finished job, or the MP4/MOV file, whose clip is retaken"
    )
    add_spec_flags(retake, leave_out=(RETAKE_FIELD,))
    add_output_flags(retake)
    add_reuse_flag(retake, "print its MP4")


def add_output_flags(command: argparse.ArgumentParser) -> None:
    """Where a command that renders now puts its MP4 (--output-dir or --output), and --quiet."""
    where = command.add_mutually_exclusive_group()
    where.add_argument("--output-dir", type=Path, help="where the MP4 goes (default: ./outputs)")
    where.add_argument(
        "--output",
        type=Path,
        metavar="PATH.mp4",
        help="folder and file stem of the MP4, timestamp appended: /outputs/video.mp4 -> /outputs/video_<stamp>.mp4",
    )
    command.add_argument("--quiet", action="store_true", help="no progress bars")


def add_local_commands(add_command: Callable[..., argparse.ArgumentParser]) -> None:
    """The commands that work on files here without the daemon: decode, batch, config, tiny-model."""
    decode = add_command("decode", help="decode saved latents (job dir or latents.safetensors) to an MP4")
    decode.add_argument("--input", type=Path, required=True, help="a job directory or a latents.safetensors file")
    decode.add_argument("--output", type=Path, required=True, help="the MP4 to write (PNGs and .json beside it)")
    for declared in SPEC_FIELDS:  # the decode settings a saved job's latents may be decoded with anew
        if declared.name in DECODE_FLAGS:
            add_declared_flag(decode, declared)
    decode.add_argument("--quiet", action="store_true", help="no progress bars")

    batch = add_command("batch", help="render every clip of a TOML or JSONL batch file (resumable)")
    batch.add_argument("file", type=Path, help="batch file: [defaults] + [[clips]] (TOML) or JSON Lines")
    batch.add_argument("--output-dir", type=Path, help="where the MP4s and the summary go (default: ./outputs)")
    batch.add_argument("--quiet", action="store_true", help="no progress bars")

    config = add_command("config", help="print the settings in effect and where each value came from")
    config.add_argument("--json", action="store_true", help="print them as JSON: {setting: {value, from}}")

    tiny = add_command("tiny-model", help="build the tiny random LTX-2 model (for tests and demos)")
    target = tiny.add_mutually_exclusive_group(required=True)
    target.add_argument("directory", nargs="?", type=Path, help="write a diffusers folder here")
    target.add_argument(
        "--hf-cache",
        action="store_true",
        help=f"write it into the HF cache as {', '.join(f'{repo} ({name})' for name, repo in TINY_REPO_IDS.items())}",
    )
    tiny.add_argument(
        "--family", choices=sorted(TINY_REPO_IDS), default="2.0", help="model family to build (default 2.0)"
    )


def add_reuse_flag(command: argparse.ArgumentParser, returns: str) -> None:
    command.add_argument(
        "--reuse",
        action="store_true",
        help=f"if a finished job rendered exactly this request (the same request digest: spec with --seed, model"
        f" files, LoRA and image bytes, plans, software versions, GPU model), {returns} instead of rendering again",
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    SuggestingParser.argv = tuple(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if getattr(args, "output", None) is not None and args.command in ("generate", "extend", "retake"):
        split_output_path(parser, args)
    configure_logging(args.command, args.verbose)
    try:
        return dispatch(args, load_settings(args.config, overrides=cli_overrides(args)))
    except ConfigError as exc:
        return fail(f"config: {exc}", ExitCode.INVALID_INPUT)
    except SpecError as exc:
        return fail(str(exc), ExitCode.INVALID_INPUT)
    except ModelNotFound as exc:
        return fail(str(exc), ExitCode.MODEL_NOT_FOUND)
    except BatchError as exc:
        return fail(str(exc), ExitCode.INVALID_INPUT)
    except UnsafeRuntimeDir as exc:
        return fail(str(exc), ExitCode.OTHER)
    except (JobBusy, JobWaiting) as exc:
        return fail(str(exc), ExitCode.OTHER)


def configure_logging(command: str, verbose: bool) -> None:
    """Warnings (everything with -v); the daemon and the gateway, whose logs are read later
    (var/ltx2d.log), stamp each line with its time and say what happened to each job by default."""
    service = command in ("daemon", "serve")
    stamp = "%(asctime)s " if service else ""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format=f"{stamp}%(name)s: %(message)s")
    if service:  # other libraries stay at warnings
        logging.getLogger("ltx2").setLevel(logging.INFO)


def dispatch(args: argparse.Namespace, settings: Settings) -> int:
    """Run the command; returns its exit status. A disk the orchestrator itself finds full is exit 5
    in one line, as a stage's full disk is."""
    try:
        return run_command(args, settings)
    except OSError as exc:
        if not is_no_space(exc):
            raise
        return fail(describe_full_disk(exc, settings.state_dir), ExitCode.NO_SPACE)


def run_command(args: argparse.Namespace, settings: Settings) -> int:
    if args.command == "tiny-model":
        return build_tiny_model(args)
    if args.command == "config":
        return print_config(args)
    if args.command == "generate":
        return generate(args, settings)
    if args.command == "extend":
        return extend(args, settings)
    if args.command == "retake":
        return retake(args, settings)
    if args.command == "decode":
        return decode(args, settings)
    if args.command == "batch":
        return render_batch(args, settings)
    if args.command == "serve":
        return serve(args, settings)
    if args.command == "resume":
        return resume(args, settings)
    from orchestrator.command_line import client_commands

    return client_commands.run(args, settings)


def describe_full_disk(exc: OSError, state_dir: Path) -> str:
    """One line for a disk found full by the orchestrator itself (a job.json, an events.log of the
    state dir): what it could not write and what to do. Stage workers report their own (exit 5)."""
    where = exc.filename or state_dir  # a write that fails after its open names no file
    return (
        f"no space left on the disk of {where} ({exc.strerror or exc}); free space there, then run the command"
        " again (a job it created goes on with: ltx2 resume JOB_ID; `ltx2 jobs` lists them)"
    )


def serve(args: argparse.Namespace, settings: Settings) -> int:
    """`ltx2 serve`: the HTTP gateway (the `[serve]` extra: Starlette, uvicorn, prometheus-client)."""
    try:
        from orchestrator.gateway.server import serve as run_gateway
        from orchestrator.gateway.server import serving_notices
    except ImportError as exc:
        return fail(f"serve needs the [serve] extra ({exc}): pip install 'ltx2-stages[serve]'", ExitCode.ENVIRONMENT)
    host, port = args.host or settings.http.host, args.port or settings.http.port
    for line in serving_notices(settings, host, port):
        notice(f"serve: {line}")
    return run_gateway(settings, host, port)


def split_output_path(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """`generate --output DIR/STEM.mp4` (the seed script's flag): the MP4 goes to DIR as
    `STEM_<YYYYmmdd-HHMMSS>.mp4` (the job id's stamp), i.e. it sets the output folder and the name,
    never an exact file."""
    output = args.output.expanduser()
    if output.suffix.lower() != ".mp4":
        parser.error(f"--output: {output} must end in .mp4 (the timestamp goes before it)")
    if args.name is not None:
        parser.error("--output already names the file; give either --output or --name")
    args.output_dir, args.name = output.parent, output.stem


def cli_overrides(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    overrides: dict[str, dict[str, Any]] = {"paths": {}}
    if args.state_dir:
        overrides["paths"]["state_dir"] = str(args.state_dir)
    if getattr(args, "output_dir", None):
        overrides["paths"]["output_dir"] = str(args.output_dir)
    return overrides


def generate(args: argparse.Namespace, settings: Settings) -> int:
    """`ltx2 generate`: run one job in this process's embedded orchestrator."""
    check_output_dir(settings.output_dir, "output" if args.output is not None else "output_dir")
    built = build_spec(spec_request(vars(args)), settings)
    for line in built.notices:
        notice(line)
    spec, model = built.spec, built.model
    if args.reuse and built.identity and (found := reuse.find(built.identity.digest, settings)) is not None:
        notice(f"{reuse.describe(found)}: nothing rendered")
        sys.stdout.write(f"{reuse.published_video(found)}\n")
        return 0
    job = JobDir.create(
        settings.jobs_dir,
        spec,
        model,
        loras=built.loras,
        image=built.image,
        conditions=built.conditions,
        extension=built.extension,
        reference=built.reference,
        retake=built.retake,
        audio=built.audio,
        stage2_lora=built.stage2_lora,
        identity=built.identity,
        owner="generate",
    )
    _, _, width, height = spec.crop_box
    size = f"{width}x{height}x{spec.num_frames}"
    if (width, height) != (spec.width, spec.height):
        size += f", centre of {spec.width}x{spec.height}"
    notice(f"job {job.id} (seed {spec.seed}, {size}, model {model.name})")
    return run_embedded(job, settings, args.quiet, "generate", named_output_dir=args.output_dir)


def extend(args: argparse.Namespace, settings: Settings) -> int:
    """`ltx2 extend SOURCE`: `ltx2 generate --extend SOURCE`, or with --chain one segment per prompt of a
    file; what is wrong with SOURCE names it as the command line gave it."""
    try:
        if args.chain is not None:
            return extend_chain(args, settings)
        if args.source is None or args.prompt is None:
            missing = "JOB_ID_OR_MP4" if args.source is None else "--prompt"
            return fail(
                f"extend: needs {missing} (or --chain PROMPTS_FILE, for one segment a prompt)", ExitCode.INVALID_INPUT
            )
        args.extend = args.source
        return generate(args, settings)
    except SpecError as exc:
        if exc.field != EXTEND_FIELD:
            raise
        return fail(f"extend: {args.source}: {exc.reason}", ExitCode.INVALID_INPUT)


def retake(args: argparse.Namespace, settings: Settings) -> int:
    """`ltx2 retake SOURCE`: `ltx2 generate --retake SOURCE`; what is wrong with SOURCE names it as given."""
    args.retake = args.source
    try:
        return generate(args, settings)
    except SpecError as exc:
        if exc.field != RETAKE_FIELD:
            raise
        return fail(f"retake: {args.source}: {exc.reason}", ExitCode.INVALID_INPUT)


def extend_chain(args: argparse.Namespace, settings: Settings) -> int:
    """`ltx2 extend [SOURCE] --chain PROMPTS_FILE` (orchestrator.command_line.chain): when a daemon answers,
    one job a segment on its queue, each waiting for the one before (prints the job ids); else the segments
    one after another in this process's embedded orchestrator, on one fork server (prints the last one's MP4)."""
    from orchestrator.command_line import client_commands
    from orchestrator.command_line.chain import run_chain_here

    for given, why in (
        ("prompt", "the --chain file gives the prompts"),
        ("image", "segments after the first start with the frames before them"),
        ("reuse", "each segment is looked up by itself"),
    ):
        if getattr(args, given):
            raise SpecError(given, f"not with --chain: {why}")
    base = {key: value for key, value in spec_request(vars(args)).items() if key != EXTEND_FIELD}
    queued = client_commands.chain_through_daemon(args, settings, base)
    if queued is not None:
        return queued
    check_output_dir(settings.output_dir, "output" if args.output is not None else "output_dir")
    try:
        output = run_chain_here(args.chain.expanduser(), base, args.source, settings, args.quiet)
    except JobStopped as exc:
        again = "run the same ltx2 extend --chain command again to go on from this segment"
        if exc.failure is Failure.INTERRUPTED:
            return fail(f"interrupted; {again}", ExitCode.INTERRUPTED)
        return fail(f"{exc}; the chain stopped there; {again}", cli_exit_code(exc.failure))
    sys.stdout.write(f"{output}\n")
    return 0


def check_output_dir(folder: Path, field: str) -> None:
    """Before any stage runs: the output folder exists (or is created) and takes a new file.

    Only the folder itself is created, never its parents: `--output-dir /nonexistent/dir` is far more
    often a typo than a wish for a new tree under /. A file in the way, a read-only or pseudo filesystem
    (/proc), a missing parent: a SpecError naming the flag of `field` (exit 2), instead of a failed
    publish after the whole run.
    """
    folder = folder.expanduser()
    if not folder.exists() and not folder.absolute().parent.is_dir():
        parent = folder.absolute().parent
        raise SpecError(field, f"{folder}: its parent folder {parent} does not exist; create it first or pick another")
    try:
        folder.mkdir(exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".ltx2-write-check-"):
            pass
    except OSError as exc:
        raise SpecError(field, f"cannot write the video into {folder}: {exc.strerror or exc}") from None


def run_embedded(
    job: JobDir,
    settings: Settings,
    quiet: bool,
    owner: str,
    target: Path | None = None,
    named_output_dir: Path | None = None,
) -> int:
    """Run a job in this process's embedded orchestrator, as `ltx2 <owner>`; print the MP4 path; return
    the exit code. A job another live process runs is refused (JobBusy).

    Ctrl-C (or SIGTERM) stops the running worker (SIGTERM, then SIGKILL after the grace period),
    leaves the job resumable and exits 130 with one line saying how to resume: the command that ends
    the job as this one would have (`named_output_dir`: the output folder the command line named).
    """
    view = ProgressView(enabled=not quiet)
    context = zmq.Context()
    link = WorkerLink(context, fork_server=settings.fork_server, mps_setting=settings.cuda_mps)
    with StopOnSignals() as stop:
        try:
            take_job(job, owner)
            output = run_job_stage_major(
                job, settings, link, JobHooks(listener=view, should_stop=stop.reason), target=target
            )
        except JobStopped as exc:
            view.close()
            return report_job_stopped(exc, job, resume_command(job, target, named_output_dir))
        finally:
            link.close()
            context.term()
    view.close()
    sys.stdout.write(f"{output}\n")
    return 0


def resume_command(job: JobDir, target: Path | None, output_dir: Path | None) -> str:
    """The command that goes on with an interrupted run to the video it was making: `ltx2 decode` again
    for an exact target, else `ltx2 resume ID` (with the output folder the command line had named)."""
    if target is not None:
        return f"ltx2 decode --input {job.path} --output {target}"
    folder = f" --output-dir {output_dir.expanduser().absolute()}" if output_dir is not None else ""
    return f"ltx2 resume {job.id}{folder}"


def report_job_stopped(exc: JobStopped, job: JobDir, resume_with: str) -> int:
    """One error for a job that ended without a video; returns the exit code. An interrupted job is
    resumable, and the line says how: `resume_with`."""
    if exc.failure is Failure.INTERRUPTED:
        return fail(f"interrupted; job {job.id} stopped and left resumable: {resume_with}", ExitCode.INTERRUPTED)
    return fail(f"{exc}; {where_to_look(exc, job)}", cli_exit_code(exc.failure))


def where_to_look(exc: JobStopped, job: JobDir) -> str:
    """Where the details of a failed job are: the failed attempt's worker log (its traceback stays
    there, never on the terminal: the error line already says what failed), else the job directory."""
    attempts = len(job.stage_record(exc.stage).attempts) if exc.stage else 0
    log_path = job.log_path(exc.stage, attempts) if exc.stage and attempts else None
    if log_path is not None and log_path.is_file() and exc.outcome.returncode:
        return f"worker log: {log_path}"
    return f"job directory: {job.path}"


def decode(args: argparse.Namespace, settings: Settings) -> int:
    """`ltx2 decode`: run the decode stages on saved latents (the crash-recovery path)."""
    check_output_dir(args.output.expanduser().absolute().parent, "output")
    job = recovery_job(args.input.expanduser(), settings)
    overrides = {name: getattr(args, name) for name in DECODE_FLAGS if getattr(args, name) is not None}
    changed = job.spec.with_changes(**overrides)
    if changed != job.spec:
        job.replace_spec(changed)
        job.invalidate(Stage.VIDEO_DECODE)  # a video decoded with the old settings is not this request's
    notice(f"decoding job {job.id} ({job.path})")
    return run_embedded(job, settings, args.quiet, "decode", target=args.output.expanduser())


def resume(args: argparse.Namespace, settings: Settings) -> int:
    """`ltx2 resume ID`: the daemon queues the job again when one answers; without one, this process
    goes on with it from its first unfinished stage (finished stages' files verify and are kept), as
    the `ltx2 generate` that was interrupted would have."""
    from orchestrator.command_line import client_commands

    answered = client_commands.resume_through_daemon(args, settings)
    if answered is not None:
        return answered
    return resume_here(args, settings, f"no daemon answered at {client_commands.daemon_endpoint(settings)}")


def resume_here(args: argparse.Namespace, settings: Settings, why: str) -> int:
    """Run an interrupted, failed or cancelled job on in this process (`why` here, for the notice); a
    done job, an unknown id or a job another live process runs is one line (exit 1)."""
    from orchestrator.daemon.job_views import UnknownJob, job_path

    try:
        job = load_job_file(job_path(settings.jobs_dir, args.job_id))
    except UnknownJob as exc:
        return fail(str(exc), ExitCode.OTHER)
    if job.state is JobState.DONE:
        return fail(f"job {job.id} is already done; its video: {job.record.output}; nothing to resume", ExitCode.OTHER)
    if job.live_runner() is not None:
        raise JobBusy(job)
    if job.record.waits_for is not None:
        raise JobWaiting(job, job.record.waits_for.job)
    check_output_dir(settings.output_dir, "output_dir")
    done = [stage.value for stage in STAGE_ORDER if job.has_outputs(stage)]
    kept = f"; its finished stages are kept: {', '.join(done)}" if done else ""
    notice(f"{why}; resuming job {job.id} in this process from its first unfinished stage{kept}")
    return run_embedded(job, settings, args.quiet, "resume", named_output_dir=args.output_dir)


def recovery_job(source: Path, settings: Settings) -> JobDir:
    """The job to decode: an existing job directory, or a new one around a latents file."""
    if source.is_dir():
        if not (source / JOB_FILE).is_file():
            raise SpecError("input", f"{source} is not a job directory (no {JOB_FILE})")
        return load_job_file(source)
    try:
        metadata = read_safetensors_metadata(source)
        spec = JobSpec.from_dict(json.loads(metadata["spec"]))
    except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
        raise SpecError("input", f"{source} is not a latents file written by ltx2-stages ({exc})") from None
    model = resolve_model(spec.model)
    # Its latents come from the file, not from rendering the request: the digest is kept for the record, and
    # the adopted stage's plan ({}) tells the sidecar that the output is not the request's own render.
    job = JobDir.create(settings.jobs_dir, spec, model, identity=identify(spec, model, settings), owner="decode")
    shutil.copyfile(source, job.path / LATENTS_FILE)
    job.adopt_outputs(Stage.ENCODE_DIFFUSE, f"copied from {source}")
    return job


def load_job_file(source: Path) -> JobDir:
    """A job directory given to `ltx2 decode`; a corrupt or foreign job.json is invalid input that
    names the file (never a JSON traceback, nor a spec error about a flag the user never passed)."""
    try:
        job = JobDir.load(source)
        job.state  # noqa: B018 - the status must be one the lifecycle knows
    except SpecError as exc:
        reason = f"its spec field {exc.field!r} {str(exc).split(': ', 1)[-1]}"
    except JobRecordError as exc:
        reason = exc.problem
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        reason = f"{type(exc).__name__}: {exc}"
    else:
        return job
    raise SpecError("input", f"{source / JOB_FILE} is not a readable ltx2-stages job file ({reason})")


def render_batch(args: argparse.Namespace, settings: Settings) -> int:
    """`ltx2 batch`: every clip through the embedded orchestrator, stage-major, on every lane
    (orchestrator.placement.lanes: the clips split into one contiguous run per lane), forked from one fork
    server shared by the lanes locally, or on a Ray farm's lanes (`[cluster] backend = "ray"`)."""
    check_output_dir(settings.output_dir, "output_dir")
    context = zmq.Context()
    try:
        source = open_lanes(settings, context)
    except BaseException:
        context.term()
        raise
    view = ProgressView(enabled=not args.quiet)
    shared = threading.Lock()  # the lanes' threads share the progress view and the batch's tally

    def render(jobs: dict[str, JobDir], stage_ended: StageReport) -> dict[str, Path | JobStopped]:
        labels = {job.id: key for key, job in jobs.items()}
        for job in jobs.values():
            take_job(job, "batch")

        def hooks_for(job: JobDir) -> JobHooks:
            show = view.labelled(labels[job.id])

            def on_attempt(stage: Stage, _attempt: int, _plan: dict[str, Any], outcome: StageOutcome) -> None:
                with shared:
                    stage_ended(job, stage, outcome)

            def listener(event: Any) -> None:
                with shared:
                    show(event)

            return JobHooks(listener=listener, should_stop=stop.reason, on_attempt=on_attempt)

        return run_across_lanes(list(jobs.values()), settings, source, hooks_for)

    with StopOnSignals() as stop:
        try:
            # A farm's head may have no GPU: there each lane's first group encodes its own prompts.
            prepare = prepare_prompts if settings.backend == "local" else lambda jobs: None
            rows = run_batch(args.file.expanduser(), settings, render, notice, prepare, len(source.lanes))
        finally:
            view.close()
            source.close()
            context.term()
    if stop.reason() is not None:
        return fail(f"interrupted; run `ltx2 batch {args.file}` again to resume", ExitCode.INTERRUPTED)
    summary_path = settings.output_dir / f"{args.file.stem}_summary.txt"
    sys.stdout.write(write_summary(summary_path, rows))
    failed = sum(1 for row in rows if row["status"] == "failed")
    if failed:
        return fail(f"{failed} of {len(rows)} clips failed; see {summary_path}", ExitCode.OTHER)
    return 0


def prepare_prompts(jobs: list[JobDir]) -> None:
    """Encode every job's prompt in one process (one text-encoder load) into the embedding cache."""
    command = [sys.executable, "-m", "services.prepare_prompts", *(str(job.path) for job in jobs)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode == 0:
        notice(f"batch: {result.stdout.strip()}")
    else:  # not fatal: each clip then encodes its own prompt
        notice(f"warning: batch prompt pre-encoding failed; clips encode their own prompts:\n{result.stderr[-2000:]}")


# Sections of scalar settings `ltx2 config` lists (presets, families, cameras, model aliases and profiles are tables
# of data).
CONFIG_SECTIONS = ("paths", "models", "worker", "policy", "decode", "daemon", "cluster", "http")


def print_config(args: argparse.Namespace) -> int:
    """`ltx2 config`: every setting in effect as TOML a config file could hold, each with the layer it came
    from (the shipped defaults, a config file, an LTX2_* variable, a flag); `--json` for scripts."""
    data, origins = layered_config(args.config, os.environ, cli_overrides(args))
    rows = {
        f"{section}.{key}": {"value": value, "from": origins.get(f"{section}.{key}", "default")}
        for section in CONFIG_SECTIONS
        for key, value in data[section].items()
    }
    if args.json:
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
        return 0
    lines: list[str] = []
    for section in CONFIG_SECTIONS:
        lines.append(f"\n[{section}]")
        for key in data[section]:
            row = rows[f"{section}.{key}"]
            lines.append(f"{key} = {json.dumps(row['value'])}  # {row['from']}")
    sys.stdout.write("\n".join(lines).lstrip("\n") + "\n")
    return 0


def build_tiny_model(args: argparse.Namespace) -> int:
    """`ltx2 tiny-model`: delegate to the torch-side builder in a child process."""
    command = [sys.executable, "-m", "services.tiny_model", "--family", args.family]
    command += ["--hf-cache"] if args.hf_cache else [str(args.directory)]
    return subprocess.run(command, check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
