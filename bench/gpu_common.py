"""What every part of the GPU benchmark shares: the process clock, the clip settings, logging.

It exists so the split modules of bench/gpu_bench.py agree on one start time (T_PROCESS: the
entry point imports this module first, so process start + interpreter + imports are measured from
here), one prompt/seed/step count for both pipelines, and one way to log and write JSON. It imports
only the standard library: a baseline child's start-up time must not include anything else.
"""

from __future__ import annotations

import time

T_PROCESS = time.time()  # first thing: process start + interpreter + imports are measured from here

import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
ENTRY = BENCH / "gpu_bench.py"  # the command line the children are started with
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

GIB = 1 << 30
PROMPT = (
    "A slow dolly-in through a rain-soaked alley at night, neon signs reflecting in puddles, "
    "steam rising from a grate while distant thunder rolls and rain patters on metal roofs."
)
SEED = 1
FPS = 24.0
STEPS = 8
MAX_SEQUENCE_LENGTH = 1024  # services.guidance.MAX_SEQUENCE_LENGTH; the connectors emit this many tokens


def log(message: str) -> None:
    """One progress line on stdout, stamped with the seconds since this process started."""
    sys.stdout.write(f"[bench {time.time() - T_PROCESS:7.1f}s] {message}\n")
    sys.stdout.flush()


def write_json(path: Path, data: Any) -> None:
    """Write `data` as JSON through a temp file, so a reader never sees half a file."""
    temp = path.with_name(path.name + ".tmp")
    temp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str))
    temp.replace(path)


def parse_size(text: str) -> tuple[int, int, int]:
    """ "768x512x121" -> (width, height, frames)."""
    width, height, frames = (int(v) for v in text.lower().split("x"))
    return width, height, frames


def size_label(size: tuple[int, int, int]) -> str:
    """(width, height, frames) -> "768x512x121"."""
    return "x".join(str(v) for v in size)
