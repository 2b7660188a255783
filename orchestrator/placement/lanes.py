"""Lanes (DESIGN.md rule 8): the devices stage processes run on, one stage process at a time each.

`[cluster] devices` names them: "auto" is every CUDA device this process can see, a list picks
them, 1 is a single lane that sees what the orchestrator sees (as before lanes existed). A list entry
may join devices with "+" ("cuda:1+2"): one lane of N GPUs, whose context-parallel diffusion runs one
process per GPU (orchestrator.placement.worker_gang; each rank takes `cuda:<rank>` of what it sees). A worker
of lane `cuda:N` starts with `CUDA_VISIBLE_DEVICES` set to that one device (so it is `cuda:0`
inside the worker); a CPU lane hides every GPU. The devices are counted without importing torch,
which the orchestrator never does: `CUDA_VISIBLE_DEVICES`, else `nvidia-smi -L`, else the
driver's /proc entries.

Lanes that work at once share the host's CPUs: with several lanes, `[cluster] lane_threads =
"auto"` gives each lane's stage processes an even share of them as their CPU thread count
(`Lane.threads`), since every process otherwise sizes torch's OpenMP pool for the whole host and
the pools, spinning while they wait, slow each other down.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import TypeVar

from config.settings import ConfigError, Settings

# `nvidia-smi -L` answers in well under a second; a hung driver must not hold up a start.
NVIDIA_SMI_TIMEOUT_S = 3.0
# One entry per GPU the NVIDIA driver has bound (present even where nvidia-smi is not installed).
DRIVER_GPUS_DIR = Path("/proc/driver/nvidia/gpus")
T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Lane:
    """One device: its name as the orchestrator sees it, and what its workers may see."""

    index: int  #: position among the lanes (names its worker socket)
    device: str  #: "cuda:N", "cuda:N+M" (a group of devices) or "cpu"; "" for the single lane that pins nothing
    visible_devices: str | None  #: CUDA_VISIBLE_DEVICES of its workers; None leaves it as it is
    threads: int | None = None  #: CPU threads of its workers (OMP_NUM_THREADS); None leaves them as they are


def lane_width(lane: Lane) -> int | None:
    """How many context-parallel processes the lane can hold: its GPUs ("cuda:1+2": 2, "cuda:0": 1); None where
    it sets no bound (a CPU lane's gloo processes, the single lane that pins nothing, a farm's lane)."""
    if not lane.device.startswith("cuda:"):
        return None
    return len(lane.device.removeprefix("cuda:").split("+"))


def widest_lane(lanes: list[Lane]) -> int | None:
    """The widest of `lanes` (lane_width), None when one of them sets no bound."""
    widths = [lane_width(lane) for lane in lanes]
    return None if any(width is None for width in widths) else max(widths, default=None)


def runs_here(lane: Lane, widest: int | None, processes: int) -> bool:
    """Whether this lane should take a job of `processes` context-parallel processes, `widest` being the widest
    lane's width among the daemon's lanes (None: one sets no bound). A lane too narrow leaves the job to a lane
    that can hold it (the daemon picks per job, DESIGN.md rule 8); when none can, any lane takes it and its
    stage fails at once naming the setting, instead of it waiting in the queue for ever."""
    width = lane_width(lane)
    if width is None or processes <= width:
        return True
    return widest is not None and widest < processes


def visible_cuda_devices(environ: Mapping[str, str] | None = None) -> list[str]:
    """The CUDA devices this process can see, as `CUDA_VISIBLE_DEVICES` entries for its workers."""
    environ = os.environ if environ is None else environ
    if "CUDA_VISIBLE_DEVICES" in environ:
        entries = []
        for raw in environ["CUDA_VISIBLE_DEVICES"].split(","):
            entry = raw.strip()
            if not entry or entry.startswith("-"):  # CUDA ignores this entry and every one after it
                break
            entries.append(entry)
        return entries
    return [str(index) for index in range(count_driver_gpus())]


def count_driver_gpus() -> int:
    """GPUs of the machine: `nvidia-smi -L`, else /proc/driver/nvidia/gpus; 0 without a driver."""
    try:
        listing = subprocess.run(
            ["nvidia-smi", "-L"], capture_output=True, text=True, timeout=NVIDIA_SMI_TIMEOUT_S, check=False
        )
        if listing.returncode == 0:
            return sum(1 for line in listing.stdout.splitlines() if line.startswith("GPU "))
    except (OSError, subprocess.TimeoutExpired):
        pass
    try:
        return sum(1 for _ in DRIVER_GPUS_DIR.iterdir())
    except OSError:
        return 0


def resolve_lanes(settings: Settings, environ: Mapping[str, str] | None = None) -> list[Lane]:
    """The lanes of `[cluster] devices`, with their CPU threads (`[cluster] lane_threads`); raises
    ConfigError naming the key when it cannot hold."""
    lanes = lanes_of_devices(settings, environ)
    threads = lane_threads(settings.lane_threads, len(lanes), os.environ if environ is None else environ)
    return [dataclasses.replace(lane, threads=threads) for lane in lanes]


def lane_threads(setting: str | int, lane_count: int, environ: Mapping[str, str]) -> int | None:
    """The CPU threads of each lane's workers: a number given, or for "auto" with several lanes an
    even share of the CPUs this process may run on (at least 1); None (torch's default) for one
    lane, or where the user set OMP_NUM_THREADS."""
    if isinstance(setting, int):
        return setting
    if lane_count < 2 or environ.get("OMP_NUM_THREADS"):
        return None
    return max(1, len(os.sched_getaffinity(0)) // lane_count)


def lanes_of_devices(settings: Settings, environ: Mapping[str, str] | None) -> list[Lane]:
    """The lanes `[cluster] devices` names, each on its device."""
    devices = settings.devices
    if devices == 1:
        return [Lane(0, "", None)]
    visible = visible_cuda_devices(environ)
    if devices == "auto":
        if not visible:  # no GPU: one lane, exactly as before
            return [Lane(0, "", None)]
        return [Lane(index, f"cuda:{index}", entry) for index, entry in enumerate(visible)]
    if isinstance(devices, int):
        if devices > len(visible):
            raise ConfigError(f"cluster.devices = {devices}, but only {len(visible)} CUDA devices are visible")
        return [Lane(index, f"cuda:{index}", visible[index]) for index in range(devices)]
    lanes = []
    for index, name in enumerate(devices):
        if name == "cpu":
            lanes.append(Lane(index, "cpu", ""))
            continue
        numbers = [int(number) for number in name.removeprefix("cuda:").split("+")]
        if max(numbers) >= len(visible):
            raise ConfigError(f"cluster.devices names {name}, but only {len(visible)} CUDA devices are visible")
        # A group of devices ("cuda:1+2", for context parallel): its workers see all of them.
        lanes.append(Lane(index, name, ",".join(visible[number] for number in numbers)))
    return lanes


def split_for_lanes(items: list[T], count: int) -> list[list[T]]:
    """`items` in `count` contiguous runs, in order, as even as can be; empty runs left out."""
    size, extra = divmod(len(items), count)
    runs, start = [], 0
    for index in range(count):
        end = start + size + (1 if index < extra else 0)
        runs.append(items[start:end])
        start = end
    return [run for run in runs if run]
