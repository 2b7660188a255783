#!/usr/bin/env python3
"""GPU benchmark: full-size LTX-2.0 (random weights), single-process diffusers vs the staged pipeline.

One entry point, several sub-commands; `all` runs everything on one machine and is what
bench/run_on_device.sh calls (docs/benchmarks.md has the commands and the results):

    python bench/gpu_bench.py all --out DIR [--budget-s 560] [--scale full|smoke|tiny] [--plan v1|fork]
                                  [--phases build,baseline_large] [--sequence staged_small,baseline,staged_large]

`build` (unless a finished folder is already there) builds every LTX-2.0 component at full size
with random bf16 weights directly on the accelerator, checks the parameter counts and saves a
diffusers folder (safetensors, 5 GB shards, model_index.json through LTX2Pipeline.save_config),
then `sync`s. Then the runs of --sequence, in order, each in fresh processes:

- staged_small / staged_large: `python -m orchestrator.cli generate ...` (the project's pipeline)
  at --small / --large, workers forked from the fork server (LTX2_FORK_SERVER=true); per-stage
  times from job.json and events.log (bench/event_timings.py). staged_small_nofork / staged_large_nofork:
  the same with LTX2_FORK_SERVER=false (every worker a fresh `python -m services.<stage>`). Once a
  fork-server run fails, later fork-server runs of the small clip are skipped and the large clip
  runs without the fork server; a failed run prints the tails of its worker logs.
- baseline: one process: LTX2Pipeline.from_pretrained + .to(cuda), the small clip twice (cold =
  first call of a fresh process, warm = the second call; only the cold one if `phases` holds
  baseline_cold_only), then the large clip once if `phases` holds baseline_large and time is left.
- imports: import times of torch / transformers / diffusers in two fresh interpreters.

--plan picks --phases / --sequence (and the small-clip timeout) unless they are given:
  v1   (default) build,baseline_large / staged_small,baseline,staged_large: docs/benchmarks.md version 1
  fork build,baseline_cold_only / staged_small,baseline,staged_small,staged_small_nofork,staged_large:
       the fork server's measurement (version 2), about 480 s after the wheels are installed

Every run writes into DIR/results.json as soon as it ends; the last thing printed is a table.
`--scale smoke` runs the same code with the real component configs but 1 transformer / 1 Gemma
layer (for a CPU check with small clips); `--scale tiny` uses the project's tiny model.
"""

# The entry point is only the command line; the work is split by concern into modules beside it
# (on sys.path as this script's folder, as batch_bench.py imports them):
#   gpu_common    clock (T_PROCESS), clip settings, log and JSON helpers
#   gpu_configs   LTX-2.0 / 2.3 component configs, parameter targets, FLOPs per step
#   gpu_storage   where the weights can go (disks, tmpfs, host RAM)
#   gpu_build     `build`: the random full-size folder
#   gpu_baseline  `baseline`: diffusers' LTX2Pipeline in one process
#   gpu_staged    one staged run through the CLI; event_timings reads its job directory
#   gpu_run       `all`: probe, build, the --sequence runs, the GPU memory sampler
#   gpu_report    derived numbers and the table

from __future__ import annotations

from gpu_common import T_PROCESS  # first: process start + interpreter + imports are measured from here

# isort: split
import argparse
import json
import os
import sys
from typing import Any

from gpu_baseline import cmd_baseline
from gpu_build import cmd_build
from gpu_common import MAX_SEQUENCE_LENGTH, parse_size
from gpu_configs import TRANSFORMER_CONFIG, transformer_flops
from gpu_run import cmd_all

__all__ = ["T_PROCESS", "main"]

PLANS: dict[str, dict[str, Any]] = {
    "v1": {
        "phases": "build,baseline_large",
        "sequence": "staged_small,baseline,staged_large",
        "stage_timeout_s": 240.0,
    },
    "fork": {
        "phases": "build,baseline_cold_only",
        "sequence": "staged_small,baseline,staged_small,staged_small_nofork,staged_large",
        "stage_timeout_s": 150.0,
    },
}


def add_all_arguments(p_all: argparse.ArgumentParser) -> None:
    """The options of `all`."""
    p_all.add_argument("--out", default=os.environ.get("OUT", "/tmp/bench-out"))
    p_all.add_argument("--work", default="/tmp/bench-work", help="job dirs, MP4s, intermediate JSON")
    p_all.add_argument("--root", default="auto", help="model folder to build and load (auto: see choose_root)")
    p_all.add_argument("--scale", choices=["full", "smoke", "tiny"], default="full")
    p_all.add_argument("--small", default="768x512x121")
    p_all.add_argument("--large", default="1920x1088x161")
    p_all.add_argument("--plan", choices=sorted(PLANS), default="v1", help="preset of --phases/--sequence (see top)")
    p_all.add_argument(
        "--phases",
        default=None,
        help="build: build the model; baseline_large: the baseline process also runs the large clip; "
        "baseline_cold_only: no warm call (default: the plan's)",
    )
    p_all.add_argument(
        "--sequence",
        default=None,
        help="measured runs in order: staged_small, staged_large, staged_small_nofork, staged_large_nofork, "
        "baseline, imports (repeats allowed; default: the plan's)",
    )
    p_all.add_argument("--budget-s", type=float, default=560.0, help="wall-clock budget of this command")
    p_all.add_argument("--build-timeout-s", type=float, default=330.0)
    p_all.add_argument("--stage-timeout-s", type=float, default=None, help="small staged clip (default: the plan's)")
    p_all.add_argument("--min-small-staged-s", type=float, default=90.0, help="skip a small staged run with less left")
    p_all.add_argument("--reserve-large-staged-s", type=float, default=0.0)
    p_all.add_argument("--min-large-staged-s", type=float, default=150.0)
    p_all.add_argument("--profile", default="", help="LTX2_PROFILE for the staged runs (default: the config's)")
    p_all.add_argument("--staged-dtype", default="", help="--dtype for the staged CLI (default: its auto)")
    p_all.add_argument("--host-ram-gib", type=float, default=0.0, help="RAM of the machine (default MemTotal)")


def build_parser() -> argparse.ArgumentParser:
    """The command line: all, build, baseline, flops."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    add_all_arguments(sub.add_parser("all", help="build, staged, baseline, staged-large; results under --out"))

    p_build = sub.add_parser("build")
    p_build.add_argument("--root", required=True)
    p_build.add_argument("--scale", choices=["full", "smoke", "tiny"], default="full")
    p_build.add_argument("--family", choices=["2.0", "2.3"], default="2.0", help="LTX-2 family of the folder")
    p_build.add_argument("--result", required=True)
    p_build.add_argument("--host-ram-gib", type=float, default=0.0)

    p_base = sub.add_parser("baseline")
    p_base.add_argument("--root", required=True)
    p_base.add_argument("--runs", required=True, help="WxHxN:label,... (first is the cold one)")
    p_base.add_argument("--result", required=True)
    p_base.add_argument("--work", required=True)
    p_base.add_argument("--deadline", type=float, default=float("inf"))

    p_flops = sub.add_parser("flops", help="print the FLOP formula's numbers for the LTX-2.0 config")
    p_flops.add_argument("sizes", nargs="*", default=["768x512x121", "1920x1088x161"])
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run the sub-command; returns the exit status."""
    args = build_parser().parse_args(argv)
    if args.command == "all":
        for name, value in PLANS[args.plan].items():
            if getattr(args, name) is None:
                setattr(args, name, value)
        return cmd_all(args)
    if args.command == "build":
        return cmd_build(args)
    if args.command == "baseline":
        return cmd_baseline(args)
    return cmd_flops(args)


def cmd_flops(args: argparse.Namespace) -> int:
    """`flops`: the FLOP formula's numbers for the LTX-2.0 config at each size."""
    for size in args.sizes:
        sys.stdout.write(
            f"{size}: {json.dumps(transformer_flops(TRANSFORMER_CONFIG, *parse_size(size), MAX_SEQUENCE_LENGTH))}\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
