"""A process for tests/test_compiled_shapes.py: a small diffusers model of repeated blocks compiled by the worker's own
`services.model_loading.compile_blocks`, run at the token counts given, in order; prints one JSON line.

    python tests/compiled_blocks_probe.py CACHE_DIR OUT.pt TOKENS[,TOKENS...] [PACKAGE_KEY]

With PACKAGE_KEY (and LTX2_COMPILE_PACKAGES=1 in the environment) the blocks go through Dynamo's packages under
CACHE_DIR, saved after each shape as the diffusion worker saves them after each pass. The line holds, per token
count, how many Dynamo graphs that call added, whether the packaged forward fell back to compiling without its
package, and the packages Dynamo loaded; OUT.pt holds each shape's output for bitwise comparisons across processes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from diffusers import ModelMixin
from torch._dynamo.utils import counters

from services import compile_packages, model_loading

WIDTH = 16


class ProbeBlock(torch.nn.Module):
    """A block with a norm, two linear layers and a residual: the shape of a transformer block's work."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = torch.nn.LayerNorm(WIDTH)
        self.up = torch.nn.Linear(WIDTH, 2 * WIDTH)
        self.down = torch.nn.Linear(2 * WIDTH, WIDTH)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + self.down(torch.nn.functional.gelu(self.up(self.norm(hidden))))


class ProbeModel(ModelMixin):
    """Three repeated blocks, compiled regionally as the LTX-2 transformer's are."""

    _repeated_blocks = ["ProbeBlock"]

    def __init__(self) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList(ProbeBlock() for _ in range(3))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            hidden = block(hidden)
        return hidden


def main(cache: Path, out: Path, token_counts: list[int], package_key: str | None) -> dict[str, object]:
    torch.manual_seed(0)
    model = ProbeModel().eval()
    model_loading.compile_blocks(model, cache, deterministic=True, package_key=package_key)
    graphs: dict[int, int] = {}
    outputs: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        for tokens in token_counts:
            before = counters["stats"]["unique_graphs"]
            hidden = torch.randn(1, tokens, WIDTH, generator=torch.Generator().manual_seed(tokens))
            outputs[tokens] = model(hidden)
            graphs[tokens] = counters["stats"]["unique_graphs"] - before
            if package_key is not None:
                compile_packages.save()
    torch.save(outputs, out)
    return {
        "new_graphs": graphs,
        "fell_back": compile_packages.PackagedForward.fell_back,
        "packages_loaded": counters["dynamo_cache"]["dynamo_cache_hit"],
    }


if __name__ == "__main__":
    arguments = sys.argv[1:]
    key = arguments[3] if len(arguments) > 3 else None
    report = main(Path(arguments[0]), Path(arguments[1]), [int(t) for t in arguments[2].split(",")], key)
    sys.stdout.write(json.dumps(report) + "\n")
