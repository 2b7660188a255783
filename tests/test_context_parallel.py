"""Context parallel (issue 30) on the CPU: two gloo processes holding half the tokens each give the latents
one process gives, within TOLERANCE.

tests/context_parallel_render.py runs LTX2Pipeline on the tiny model (fp32, one thread per process) with
the transformer sharded by diffusers' own context-parallel hooks (services/context_parallel.py). Nothing
is mocked: the ranks are real processes talking over gloo.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from protocol.stages import CP_ADDRESS_ENV, CP_RANK_ENV, CP_SIZE_ENV
from services.context_parallel import max_difference

REPO_ROOT = Path(__file__).resolve().parents[1]
RENDER = REPO_ROOT / "tests" / "context_parallel_render.py"
TOLERANCE = 1e-4
# A render of two steps takes seconds; a group whose peer died waits in a collective far longer.
TIMEOUT_S = 300


def free_port() -> int:
    """A TCP port free on the loopback now, for the group's rendezvous."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def render(model_dir: Path, out: Path, size: int, *extra: str) -> dict[str, torch.Tensor]:
    """The latents `size` processes render together (1: a plain single-process run)."""
    base = {**os.environ, CP_ADDRESS_ENV: f"127.0.0.1:{free_port()}", CP_SIZE_ENV: str(size)}
    ranks = [
        subprocess.Popen(
            [sys.executable, str(RENDER), str(model_dir), str(out), *extra],
            env={**base, CP_RANK_ENV: str(rank)},
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(size)
    ]
    outputs = []
    for process in ranks:
        try:
            output, _ = process.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            for other in ranks:
                other.kill()
            raise
        outputs.append(output)
    for rank, (process, output) in enumerate(zip(ranks, outputs, strict=True)):
        assert process.returncode == 0, f"rank {rank} of {size} exited {process.returncode}:\n{output[-4000:]}"
    return load_file(str(out))


@pytest.mark.parametrize("model", ["tiny_model_dir", "tiny_23_model_dir"])
def test_two_gloo_ranks_give_one_process_latents(model: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """LTX-2.0 and 2.3, one stage, CFG on (a batch of two through every sharded layer)."""
    model_dir = request.getfixturevalue(model)
    alone = render(model_dir, tmp_path / "alone.safetensors", 1, "--cfg")
    together = render(model_dir, tmp_path / "together.safetensors", 2, "--cfg")
    for name in ("video", "audio"):
        assert together[name].shape == alone[name].shape
        assert max_difference(together[name], alone[name]) <= TOLERANCE, name
    # The sharded run is a run of the model, not a copy of the input: the latents moved from the noise.
    assert alone["video"].abs().max() > 0
