"""`LTX2_PROFILE_STEP=N`: where one denoising step's time goes, kernel by kernel, written beside the job's logs.

Issue 28 needs the last seconds of a warm 1080p clip (benchmarks version 18: 10.20 s, of which a step of stage 2
takes 2.30 s while its matmuls and attention account for roughly 1.7 s at the kernels' measured rates). A
benchmark of one block rebuilt outside the pipeline would time what that bench builds; this profiles the step the
worker itself runs, with its compile, FP8 layers, attention processors and inputs, so the table is the product's.

With the variable set, step N (0-based) of every denoising pass of every job in the process runs under
torch.profiler (CPU activity, and CUDA activity where the step runs on a GPU), between two device
synchronisations, and `<job>/logs/profile-<pass>-step<N>.txt` gets the step's wall time, the time per kernel
category (matmul, attention, Inductor's fused kernels, other) and the 40 most expensive operations or kernels.
The profiled step itself is slower (the profiler's own overhead), so a benchmark reads the steady steps of the
same pass, not this one, for speed. Unset (the default), nothing here runs and no step is touched.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from config.settings import PROFILE_STEP, profile_step

log = logging.getLogger("ltx2.worker")
#: Rows of the per-kernel table.
TABLE_ROWS = 40
#: Kernel name patterns per category, first match wins (CUDA kernel names, or aten op names on a CPU).
#: Inductor's kernels come first: their names list the ops they fused, attention's or a matmul's among them.
CATEGORIES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("fused (Inductor)", re.compile(r"^(triton_|cpp_fused)")),
    ("attention", re.compile(r"fmha|flash|attention|sdpa|cudnn.*(fprop|attn)", re.IGNORECASE)),
    ("matmul", re.compile(r"gemm|xmma|cutlass|nvjet|sm90_|scaled_mm|matmul|aten::mm\b|aten::(add|b)mm", re.IGNORECASE)),
)


def profiled_step() -> int | None:
    """The step index to profile from LTX2_PROFILE_STEP, or None when unset (config.settings.profile_step, which
    `ltx2` and the daemon check before any job: a worker never meets a value they refused)."""
    return profile_step(os.environ)


def category(name: str) -> str:
    """The kernel category a profiler event's name falls in."""
    for label, pattern in CATEGORIES:
        if pattern.search(name):
            return label
    return "other"


def _spent_us(event: Any, on_device: bool) -> float:
    """An averaged event's own time (µs) in the report: on a GPU only the kernels' (the operators that launched them
    carry the same time as their device time, and counting both would count it twice), on a CPU the operators'
    self time. torch renamed the device attribute from cuda to device."""
    if not on_device:
        return float(getattr(event, "self_cpu_time_total", 0.0))
    if getattr(event, "device_type", None) != torch.autograd.DeviceType.CUDA:
        return 0.0
    for name in ("self_device_time_total", "self_cuda_time_total"):
        value = getattr(event, name, None)
        if value:
            return float(value)
    return 0.0


def summarize(events: Iterable[Any], wall_s: float, on_device: bool) -> str:
    """The report: wall time, time per category and the most expensive rows. On a GPU the rows are
    kernels by their own device time; on a CPU, operators by their own CPU time."""
    rows: list[tuple[float, str, int]] = []
    for event in events:
        spent = _spent_us(event, on_device)
        if spent > 0:
            rows.append((spent, event.key, int(getattr(event, "count", 1))))
    rows.sort(reverse=True)
    total = sum(spent for spent, _, _ in rows)
    per_category: dict[str, float] = {}
    for spent, name, _ in rows:
        per_category[category(name)] = per_category.get(category(name), 0.0) + spent
    clock = "device (self)" if on_device else "CPU (self)"
    lines = [f"step wall {wall_s * 1000:.1f} ms; {clock} time of all rows {total / 1000:.1f} ms"]
    for label, spent in sorted(per_category.items(), key=lambda item: -item[1]):
        share = spent / total if total else 0.0
        lines.append(f"category {label}: {spent / 1000:.1f} ms ({share:.1%})")
    lines.append(f"{'ms':>10} {'calls':>6}  {'category':<17}  name")
    for spent, name, count in rows[:TABLE_ROWS]:
        lines.append(f"{spent / 1000:10.2f} {count:6d}  {category(name):<17}  {name[:160]}")
    return "\n".join(lines) + "\n"


class StepProfiler:
    """Profiles one step of a pass: `before_step(i)` ahead of step i's model call (called from the
    previous step's end, or the pass's start for step 0), `after_step(i)` at its end."""

    def __init__(
        self, step: int | None, job_dir: Path, pass_name: str, device: torch.device, rank: int | None = None
    ) -> None:
        """`rank`: this process's rank where a pass runs over several (context parallel): a report each."""
        self.step = step
        self.pass_name = pass_name
        name = f"profile-{re.sub(r'[^A-Za-z0-9]+', '-', pass_name).strip('-')}-step{step}"
        self.path = job_dir / "logs" / f"{name}{'' if rank is None else f'-rank{rank}'}.txt"
        self.device = device
        self._profile: Any = None
        self._started = 0.0

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def before_step(self, index: int) -> None:
        """Start the profiler if step `index` is the one asked for."""
        if self.step is None or index != self.step or self._profile is not None:
            return
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self._synchronize()
        self._profile = torch.profiler.profile(activities=activities)
        self._profile.__enter__()
        self._started = time.perf_counter()

    def after_step(self, index: int) -> None:
        """Stop the profiler after the profiled step and write the report (once per pass)."""
        if self._profile is None or index != self.step:
            return
        self._synchronize()
        wall = time.perf_counter() - self._started
        profile, self._profile = self._profile, None
        profile.__exit__(None, None, None)
        self.step = None  # one report per pass
        try:
            self.path.write_text(summarize(profile.key_averages(), wall, self.device.type == "cuda"))
        except OSError as error:  # a diagnostic: the clip goes on without it
            log.warning("%s: the step profile could not be written to %s (%s)", PROFILE_STEP, self.path, error)

    def finish(self, steps: int) -> None:
        """After a pass that ended: say so if its step count never reached the step asked for (no report)."""
        if self.step is not None and self.step >= steps:
            log.warning(
                "%s=%d: the pass %r has %d steps (0-%d); no step of it profiled",
                PROFILE_STEP, self.step, self.pass_name, steps, steps - 1,
            )  # fmt: skip

    def close(self) -> None:
        """Stop a profiler a failed pass left running (nothing written: the step did not end)."""
        if self._profile is not None:
            profile, self._profile = self._profile, None
            profile.__exit__(None, None, None)
