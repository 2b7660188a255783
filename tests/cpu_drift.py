"""Latents two CPU processes made for one request: equal bit for bit, or within the last-bit drift CI's
host still shows now and then, with what both processes ran on put into the CI log.

Every local run (AMD EPYC, AVX512) gives equal bits; CI's Intel host (AVX512, AMX) has shown a few
last-bit differences between two processes of the same request, the same threads and the same
kernels: 1.0e-6 before MKL's thread count was fixed (services/__init__.py), 3.6e-7 in a compiled
worker and a grouped two-stage run after it (2026-12-07). GPU runs are bit-equal (docs/benchmarks.md
version 11). Another input differs by far more (another seed or the wrong noise: O(1); the grouped
two-stage test's two clips by more than 1e-3, which it asserts), so the bound of 1e-5 keeps these tests
able to fail on a wrong render; the warning names the kernels and what else the two runs shared, to
find the drift's cause where it happens.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors.torch import load_file

CPU_DRIFT = 1e-5  #: the largest difference accepted between two CPU processes of one request


def check_equal_latents(
    first: dict[str, torch.Tensor], second: dict[str, torch.Tensor], evidence: Callable[[], list[str]], what: str
) -> None:
    """Assert `first` and `second` hold the same video and audio latents, allowing CPU_DRIFT with a
    warning that carries `evidence()` (log lines, cache comparisons) into the test report."""
    differ = {key: float((first[key] - second[key]).abs().max()) for key in ("video", "audio")}
    assert max(differ.values()) <= CPU_DRIFT, (what, differ)
    if max(differ.values()) > 0.0:
        warnings.warn(f"{what} drifted {differ}: {evidence()}", stacklevel=2)


def kernel_lines(logs: Iterable[Path]) -> list[str]:
    """The workers' log lines naming their CPU kernels (ATen's ISA and threads, Inductor's ISA)."""
    lines = [line for log in logs for line in log.read_text().splitlines()]
    return [line for line in lines if "CPU kernels" in line or "vector ISA" in line]


def unequal_embeddings(first_state: Path, second_state: Path) -> list[str]:
    """The prompt-embedding cache files two state dirs both hold that differ (the text encoder ran in
    different processes: `ltx2 batch`'s pre-encoding or a grouped worker)."""
    differing = []
    for path in sorted((first_state / "embeddings").glob("*.safetensors")):
        other = second_state / "embeddings" / path.name
        if not other.is_file():
            continue
        left, right = load_file(path), load_file(other)
        if left.keys() != right.keys() or any(not torch.equal(left[key], right[key]) for key in left):
            differing.append(path.name)
    return differing
