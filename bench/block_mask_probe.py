"""One grid of LTX-2.5's diffusion-decoder attention through the stage's processor, checked token by token
(issue 29: v17's illegal memory access, found with the brick order on large grids).

Random bf16 queries, keys and values of one grid (`--grid T,H,W`, `--kernel`, the decoder's heads and head
size) go through services/neighborhood_attention.BlockSparseNeighborhoodProcessor's own path in `--order`
(the permutation into bricks and back included): compiled FlexAttention on the block mask built from the
window's geometry. `--samples` query tokens drawn at random (the grid's eight corners always among them)
are then attended exactly in float32 over the keys of their windows, and the largest difference is
reported. Nothing dense is built, so any grid that fits runs, including those whose activations pass
int32's end (heads x tokens x head size > 2**31 - 1, one suspect of the fault): run each grid and order in
its own process, with `CUDA_LAUNCH_BLOCKING=1`, so that a fault names its kernel and spoils nothing else.
Appends one JSON line to `--out`/block_mask_probe.jsonl.

    CUDA_LAUNCH_BLOCKING=1 python3 bench/block_mask_probe.py --out "$OUT" --grid 17,40,136 --order bricks
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# The reference decoder's last stage: 256 channels in heads of 64.
HEADS, HEAD_DIM = 4, 64


def window_keys(coordinates: tuple[int, int, int], sizes: tuple[int, ...], kernel: tuple[int, ...]) -> list[int]:
    """Raster indices of the keys a query at `coordinates` attends to (its window, shifted inward)."""
    starts = [min(max(c - k // 2, 0), n - k) for c, n, k in zip(coordinates, sizes, kernel, strict=True)]
    _, height, width = sizes
    return [
        (t * height + h) * width + w
        for t in range(starts[0], starts[0] + kernel[0])
        for h in range(starts[1], starts[1] + kernel[1])
        for w in range(starts[2], starts[2] + kernel[2])
    ]


def sampled_queries(sizes: tuple[int, int, int], samples: int, seed: int) -> list[tuple[int, int, int]]:
    """The grid's eight corners and `samples` more query coordinates drawn at random."""
    import random

    rng = random.Random(seed)
    corners = [(t, h, w) for t in (0, sizes[0] - 1) for h in (0, sizes[1] - 1) for w in (0, sizes[2] - 1)]
    return corners + [tuple(rng.randrange(n) for n in sizes) for _ in range(samples)]  # type: ignore[misc]


def probe(grid: Any, order: str, device: Any, dtype: Any, samples: int) -> dict[str, object]:
    """The grid's attention through the processor in `order`, timed and checked at sampled queries."""
    import torch

    from services.neighborhood_attention import BlockSparseNeighborhoodProcessor

    sizes, result = grid.sizes, {}
    generator = torch.Generator(device).manual_seed(0)
    # (B, heads, tokens, head_dim) views of (B, tokens, heads, head_dim), as the processor makes them.
    query, key, value = (
        torch.randn(1, grid.tokens, HEADS, HEAD_DIM, generator=generator, device=device, dtype=dtype).transpose(1, 2)
        / HEAD_DIM**0.25
        for _ in range(3)
    )
    processor = BlockSparseNeighborhoodProcessor(order)
    started = time.monotonic()
    try:
        mask = processor.mask_for(grid, device, flex=True)
        result["mask_s"] = round(time.monotonic() - started, 3)
        if order == "bricks":
            from services.brick_order import BrickGrid, from_bricks, to_bricks

            bricks = BrickGrid(grid)
            bricked = [to_bricks(x, bricks) for x in (query, key, value)]
            out = from_bricks(processor.flex(*bricked, grid, mask), bricks)
        else:
            out = processor.flex(query, key, value, grid, mask)
        if device.type == "cuda":
            torch.cuda.synchronize()
        result["attention_s"] = round(time.monotonic() - started, 3)
        worst = 0.0
        for coordinates in sampled_queries(sizes, samples, seed=1):
            index = (coordinates[0] * sizes[1] + coordinates[1]) * sizes[2] + coordinates[2]
            keys = torch.tensor(window_keys(coordinates, sizes, grid.kernel), device=device)
            q, k, v = query[0, :, index].float(), key[0, :, keys].float(), value[0, :, keys].float()
            weights = torch.softmax(torch.einsum("hd,hkd->hk", q, k), dim=-1)
            exact = torch.einsum("hk,hkd->hd", weights, v)
            worst = max(worst, float((out[0, :, index].float() - exact).abs().max()))
        result["max_diff"] = float(f"{worst:.3g}")
        result["full_width_lists"] = processor.full_width
    except Exception as exc:  # the fault is the result
        result["error"] = f"{type(exc).__name__}: {exc}"[:800]
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--grid", required=True, help="T,H,W tokens of the grid")
    parser.add_argument("--kernel", default="11,11,11", help="the window's T,H,W (the decoder's stage 5: 11,11,11)")
    parser.add_argument("--order", choices=("bricks", "raster"), required=True)
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--device", default="cuda", help="cuda (cpu: a smoke run of small grids)")
    args = parser.parse_args()

    import torch

    from services.neighborhood_mask import Neighborhood

    sizes = tuple(int(part) for part in args.grid.split(","))
    grid = Neighborhood.of(sizes, tuple(int(part) for part in args.kernel.split(",")))  # type: ignore[arg-type]
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    result: dict[str, object] = {"grid": list(sizes), "kernel": list(grid.kernel), "order": args.order,
                                 "heads": HEADS, "head_dim": HEAD_DIM, "tokens": grid.tokens,
                                 "elements": grid.tokens * HEADS * HEAD_DIM}  # fmt: skip
    result["past_int32"] = result["elements"] > 2**31 - 1  # type: ignore[operator]
    args.out.mkdir(parents=True, exist_ok=True)
    result.update(probe(grid, args.order, device, dtype, args.samples))
    line = json.dumps(result)
    sys.stdout.write(line + "\n")
    sys.stdout.flush()
    with (args.out / "block_mask_probe.jsonl").open("a") as handle:
        handle.write(line + "\n")
    return 1 if "error" in result else 0


if __name__ == "__main__":
    sys.exit(main())
