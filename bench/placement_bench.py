"""Weights from a memory-mapped safetensors file onto the GPU: `Module.to` against services/staged_transfer.py.

A diffusion worker's start at 1080p spent 7.3 s placing the LTX-2.3 transformer (38 GB of bf16 read through
the safetensors mapping; benchmark version 18). This measures the placement alone, in one process on one
card: a file of `--gib` GiB of bf16 shaped like a transformer's blocks (48 blocks of linear weights) is
written under /dev/shm (where the bench keeps its models), then each variant maps it afresh
(`safetensors.torch.load_file`, as `from_pretrained` does), wraps the tensors in modules and moves them,
alternating `to` and `staged` `--repeats` times. Per variant: seconds, GB/s, and whether the tensors on the
card equal the first variant's bit for bit. Writes `placement.json` under --out.

    python3 bench/placement_bench.py --out "$OUT" --gib 16 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BLOCKS = 48
# One block's linear weights as (out, in), about the shapes of LTX-2's attention and feed-forward layers.
BLOCK_SHAPES = [(4096, 4096)] * 4 + [(16384, 4096), (4096, 16384)] + [(2048, 2048)] * 4 + [(8192, 2048), (2048, 8192)]


def write_weights(path: Path, gib: float) -> int:
    """A safetensors file of about `gib` GiB: BLOCK_SHAPES repeated, scaled by the block count that fits."""
    import torch
    from safetensors.torch import save_file

    per_block = sum(rows * cols for rows, cols in BLOCK_SHAPES) * 2
    blocks = max(1, int(gib * 2**30 // per_block))
    tensors = {}
    generator = torch.Generator(device="cuda").manual_seed(0)
    for block in range(blocks):
        for index, shape in enumerate(BLOCK_SHAPES):
            weight = torch.randn(shape, generator=generator, device="cuda", dtype=torch.bfloat16)
            tensors[f"blocks.{block}.layer{index}.weight"] = weight.cpu()
    save_file(tensors, str(path))
    return blocks


def modules_of(path: Path) -> Any:
    """The file's tensors, mapped afresh, as parameters of one module per block (what `from_pretrained` leaves)."""
    import torch
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    root = torch.nn.Module()
    root.blocks = torch.nn.ModuleList()
    for name in sorted(tensors, key=lambda key: (int(key.split(".")[1]), key)):
        block_index = int(name.split(".")[1])
        while len(root.blocks) <= block_index:
            root.blocks.append(torch.nn.Module())
        root.blocks[block_index].register_parameter(
            name.split(".")[2], torch.nn.Parameter(tensors[name], requires_grad=False)
        )
    return root


def place(variant: str, root: Any) -> None:
    import torch

    from services.staged_transfer import StagedTransfer

    device = torch.device("cuda")
    if variant == "to":
        for block in root.blocks:
            block.to(device)
    else:
        transfer = StagedTransfer(device)
        for block in root.blocks:
            transfer.move(block)
        transfer.finish()
    torch.cuda.synchronize()


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--gib", type=float, default=16.0)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--folder", type=Path, default=Path("/dev/shm"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.folder / "placement-bench.safetensors"
    report: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "runs": []}
    started = time.perf_counter()
    report["blocks"] = write_weights(path, args.gib)
    report["file_bytes"] = path.stat().st_size
    report["write_s"] = round(time.perf_counter() - started, 2)
    reference: list[Any] | None = None
    try:
        for repeat in range(args.repeats):
            for variant in ("to", "staged"):
                root = modules_of(path)
                started = time.perf_counter()
                place(variant, root)
                seconds = time.perf_counter() - started
                placed = [parameter for parameter in root.parameters()]
                same = None
                if reference is None:
                    reference = placed
                else:
                    same = all(torch.equal(a, b) for a, b in zip(reference, placed, strict=True))
                moved = sum(parameter.numel() * parameter.element_size() for parameter in placed)
                run = {
                    "variant": variant,
                    "repeat": repeat,
                    "seconds": round(seconds, 3),
                    "gb_per_s": round(moved / seconds / 1e9, 2),
                    "bit_equal_to_first": same,
                }
                report["runs"].append(run)
                sys.stdout.write(json.dumps(run) + "\n")
                sys.stdout.flush()
                (args.out / "placement.json").write_text(json.dumps(report, indent=2))
                del root, placed
                if reference is not None and run is not report["runs"][0]:
                    torch.cuda.empty_cache()
    finally:
        path.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
