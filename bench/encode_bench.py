#!/usr/bin/env python3
"""H.264 encoding speed of the video stage's writer settings, on noise and on smooth content.

    python bench/encode_bench.py [--sizes 768x512x121,1920x1088x161] [--out results.json]

The video stage streams frames into libx264 through PyAV (services/media.py). This times that
encode alone, CPU only, for each combination of PyAV's thread type (SLICE, PyAV's default for
encoders, or FRAME) and x264 preset, on two contents: uniform random noise (what the benchmark's
random-weight model produces, the worst case for a video encoder) and a moving colour gradient
with mild noise (closer to real footage). Prints seconds, frames per second and bytes per run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np

CRF = 18  # services.media.DEFAULT_CRF


def frames(kind: str, width: int, height: int, count: int) -> np.ndarray:
    """`[count, H, W, 3]` uint8 frames of the named content, generated up front (not timed)."""
    rng = np.random.default_rng(0)
    if kind == "noise":
        return rng.integers(0, 256, size=(count, height, width, 3), dtype=np.uint8)
    x = np.linspace(0, 1, width, dtype=np.float32)[None, :]
    y = np.linspace(0, 1, height, dtype=np.float32)[:, None]
    out = np.empty((count, height, width, 3), dtype=np.uint8)
    for index in range(count):
        phase = index / count
        rgb = np.stack(
            [np.sin(6 * (x + phase)) * 0.5 + 0.5 + 0 * y, np.cos(4 * (y - phase)) * 0.5 + 0.5 + 0 * x, (x + y) / 2], -1
        )
        out[index] = np.clip(rgb * 255 + rng.normal(0, 4, rgb.shape), 0, 255).astype(np.uint8)
    return out


def encode(video: np.ndarray, thread_type: str, preset: str, path: Path) -> dict[str, Any]:
    count, height, width, _ = video.shape
    started = time.perf_counter()
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(24))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.thread_type = thread_type
        stream.options = {"crf": str(CRF), "preset": preset}
        for rgb in video:
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    seconds = time.perf_counter() - started
    return {"seconds": round(seconds, 3), "fps": round(count / seconds, 1), "bytes": path.stat().st_size}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="768x512x121,1920x1088x161")
    parser.add_argument("--presets", default="medium,veryfast")
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    results: dict[str, Any] = {"cpus": os.cpu_count(), "av": av.__version__, "runs": []}
    with tempfile.TemporaryDirectory() as folder:
        for size in args.sizes.split(","):
            width, height, count = (int(part) for part in size.split("x"))
            for kind in ("noise", "gradient"):
                video = frames(kind, width, height, count)
                for thread_type in ("SLICE", "FRAME"):
                    for preset in args.presets.split(","):
                        run = {"size": size, "content": kind, "thread_type": thread_type, "preset": preset}
                        run.update(encode(video, thread_type, preset, Path(folder) / "out.mp4"))
                        results["runs"].append(run)
                        sys.stdout.write(json.dumps(run) + "\n")
                        sys.stdout.flush()
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
