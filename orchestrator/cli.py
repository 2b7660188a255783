"""The `ltx2` command line (torch-free: it starts in a fraction of a second).

`ltx2 generate` runs a job with an embedded orchestrator: the same stage processes, job
directory and protocol the daemon uses, without needing the daemon.
"""

from __future__ import annotations

import argparse
import logging
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any

import zmq

from config.settings import ConfigError, Settings, load_settings
from orchestrator.jobdir import JobDir
from orchestrator.models import ResolvedModel, ensure_tiny_model, is_cached, resolve_model
from orchestrator.pipeline import JobFailed, run_job
from orchestrator.progress import ProgressView
from orchestrator.runner import WorkerLink
from protocol.errors import ExitCode, Failure, ModelNotFound
from protocol.models import TINY_REPO_ID
from protocol.spec import JobSpec, SpecError

# Exit status of the CLI for a failed job, by how its last stage failed.
FAILURE_EXIT = {
    Failure.INVALID_INPUT: ExitCode.INVALID_INPUT,
    Failure.CUDA_OOM: ExitCode.OUT_OF_MEMORY,
    Failure.HOST_OOM: ExitCode.OUT_OF_MEMORY,
    Failure.MODEL_NOT_FOUND: ExitCode.MODEL_NOT_FOUND,
}
# Random seeds stay below 2**31 so they are easy to retype and fit every tool's int.
RANDOM_SEED_LIMIT = 2**31


def add_spec_flags(parser: argparse.ArgumentParser) -> None:
    """Flags that become JobSpec fields (defaults None: the model's preset fills them in)."""
    parser.add_argument("--prompt", required=True, help="what the clip shows (a paragraph works best)")
    parser.add_argument("--negative-prompt", help="what to avoid; only has an effect with --guidance-scale > 1")
    parser.add_argument(
        "--model",
        help="HF repo id or local diffusers folder (default: the distilled model if "
        "cached, else the tiny offline model)",
    )
    parser.add_argument("--width", type=int, help="multiple of 32 (preset default)")
    parser.add_argument("--height", type=int, help="multiple of 32 (preset default)")
    parser.add_argument("--num-frames", type=int, help="8n+1: 9, 17, ..., 121, 161, 257 (preset default)")
    parser.add_argument("--fps", type=float, help="frames per second (default 24)")
    parser.add_argument("--steps", type=int, help="denoising steps (preset default: 8 distilled, 40 dev)")
    parser.add_argument("--guidance-scale", type=float, help="CFG scale; 1.0 turns CFG off (preset default)")
    parser.add_argument("--schedule", choices=["distilled", "default"], help="sigma schedule (preset default)")
    parser.add_argument("--seed", type=int, help="random when absent; always recorded")
    parser.add_argument("--name", help="output file stem (default: video)")
    parser.add_argument("--dtype", choices=["auto", "bfloat16", "float32"], help="auto: bf16 on GPU, fp32 on CPU")
    parser.add_argument("--vae-chunk-frames", type=int, help="decode in temporal pieces of N latent frames")
    parser.add_argument(
        "--vae-tiling",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="force spatial tiling on/off (default: chosen from the size)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ltx2", description="LTX-2 video+audio generation in isolated stages.")
    parser.add_argument(
        "--config", type=Path, help="config file (default: $LTX2_CONFIG or ~/.config/ltx2-stages/config.toml)"
    )
    parser.add_argument("--state-dir", type=Path, help="job directories live here (default from config)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log orchestrator details")
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser("generate", help="generate one clip now (no daemon needed)")
    add_spec_flags(generate)
    generate.add_argument("--output-dir", type=Path, help="where the MP4 goes (default: ./outputs)")
    generate.add_argument("--quiet", action="store_true", help="no progress bars")

    tiny = commands.add_parser("tiny-model", help="build the tiny random LTX-2 model (for tests and demos)")
    target = tiny.add_mutually_exclusive_group(required=True)
    target.add_argument("directory", nargs="?", type=Path, help="write a diffusers folder here")
    target.add_argument("--hf-cache", action="store_true", help=f"write it into the HF cache as {TINY_REPO_ID}")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    try:
        settings = load_settings(args.config, overrides=cli_overrides(args))
        if args.command == "tiny-model":
            return build_tiny_model(args)
        return generate(args, settings)
    except ConfigError as exc:
        return fail(f"config: {exc}", ExitCode.INVALID_INPUT)
    except SpecError as exc:
        return fail(str(exc), ExitCode.INVALID_INPUT)
    except ModelNotFound as exc:
        return fail(str(exc), ExitCode.MODEL_NOT_FOUND)


def cli_overrides(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    overrides: dict[str, dict[str, Any]] = {"paths": {}}
    if args.state_dir:
        overrides["paths"]["state_dir"] = str(args.state_dir)
    if getattr(args, "output_dir", None):
        overrides["paths"]["output_dir"] = str(args.output_dir)
    return overrides


def fail(message: str, code: int) -> int:
    sys.stderr.write(f"ltx2: error: {message}\n")
    return int(code)


def notice(message: str) -> None:
    sys.stderr.write(f"ltx2: {message}\n")


def resolve_requested_model(requested: str | None, settings: Settings) -> ResolvedModel:
    """The model to run: as asked, else the default if cached, else the tiny model (with a notice)."""
    if requested == TINY_REPO_ID:
        return ensure_tiny_model()
    if requested:
        return resolve_model(requested)
    if is_cached(settings.default_model):
        return resolve_model(settings.default_model)
    notice(
        f"no weights for {settings.default_model} in the Hugging Face cache; using the tiny random model "
        f"{TINY_REPO_ID} (output is noise; get the real one with: hf download {settings.default_model})"
    )
    return ensure_tiny_model()


def spec_from_args(args: argparse.Namespace, model: ResolvedModel, settings: Settings) -> JobSpec:
    """Preset defaults overlaid with the flags the user gave, validated."""
    preset = settings.preset_for(model.name)
    fields = {
        "prompt": args.prompt,
        "model": model.name,
        "width": preset.width,
        "height": preset.height,
        "num_frames": preset.num_frames,
        "fps": preset.fps,
        "steps": preset.steps,
        "guidance_scale": preset.guidance_scale,
        "schedule": preset.schedule,
        "seed": secrets.randbelow(RANDOM_SEED_LIMIT),
    }
    for name in (
        "negative_prompt",
        "width",
        "height",
        "num_frames",
        "fps",
        "steps",
        "guidance_scale",
        "schedule",
        "seed",
        "name",
        "dtype",
        "vae_chunk_frames",
        "vae_tiling",
    ):
        value = getattr(args, name)
        if value is not None:
            fields[name] = value
    spec = JobSpec.from_dict(fields)
    if spec.negative_prompt and not spec.uses_cfg:
        notice("warning: --negative-prompt has no effect with --guidance-scale 1.0 (CFG is off)")
    return spec


def generate(args: argparse.Namespace, settings: Settings) -> int:
    """`ltx2 generate`: run one job in this process's embedded orchestrator."""
    model = resolve_requested_model(args.model, settings)
    spec = spec_from_args(args, model, settings)
    job = JobDir.create(settings.jobs_dir, spec, model)
    notice(f"job {job.id} (seed {spec.seed}, {spec.width}x{spec.height}x{spec.num_frames}, model {model.name})")
    view = ProgressView(enabled=not args.quiet)
    context = zmq.Context()
    link = WorkerLink(context)
    try:
        output = run_job(job, settings, link, view)
    except JobFailed as exc:
        view.close()
        details = (
            f"\n--- last lines of the {exc.stage.value} log ---\n{exc.outcome.log_tail}" if exc.outcome.log_tail else ""
        )
        return fail(f"{exc}{details}\njob directory: {job.path}", FAILURE_EXIT.get(exc.failure, ExitCode.OTHER))
    finally:
        link.close()
        context.term()
    view.close()
    sys.stdout.write(f"{output}\n")
    return 0


def build_tiny_model(args: argparse.Namespace) -> int:
    """`ltx2 tiny-model`: delegate to the torch-side builder in a child process."""
    command = [sys.executable, "-m", "services.tiny_model"]
    command += ["--hf-cache"] if args.hf_cache else [str(args.directory)]
    return subprocess.run(command, check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
