"""LTX-2.5's neighbourhood attention with its tokens ordered in 3D bricks instead of raster rows.

FlexAttention skips work a block of 128 queries x 128 keys at a time. In raster order
(services/neighborhood_mask.py) a query block is a run of one row, 128 tokens wide and one high and deep,
so the union of its windows is `kernel_t x kernel_h x (128 + kernel_w - 1)` keys spread over
`kernel_t * kernel_h` rows, each row touching two or three key blocks: at the decoder's last stage
(kernel 11 x 11 x 11) a query block reads ~271 key blocks for the 1,331 keys a window holds.
Reordered so that each block of 128 tokens is a brick, `BRICK` = 4 x 4 x 8 (t, h, w), the union of a
brick's windows is a box of `(4 + 10) x (4 + 10) x (8 + 10)` keys, which ~70 key bricks cover on a whole
1080p clip's stage-5 grid (121 x 272 x 480 tokens; measured on an H100, docs/benchmarks.md version 17), fewer
near the borders (`mean_key_blocks`: ~38 against ~271 on the 12 x 32 x 480 slice tests/test_diffusion_decode.py
checks).

The grid is padded with empty tokens to whole bricks (at most a brick's side on each axis); a padded key is
never seen and a padded query's output is dropped. `to_bricks`/`from_bricks` are a pad, a reshape and a
permute of the `[batch, heads, tokens, dim]` tensors, no gather. The block lists are built from the
geometry as in raster order: a query brick's windows cover one box, whose key bricks form a 3D range; a
key brick is full when it holds no padding and lies inside every window of the query brick.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch.nn.attention.flex_attention import BlockMask

from services.neighborhood_mask import (
    BLOCK_SIZE,
    QUERY_BLOCKS_PER_PASS,
    BlockLists,
    Neighborhood,
    block_mask_of,
    compact_block_rows,
    join_block_passes,
    window_start,
)

#: (t, h, w) tokens of a brick: BLOCK_SIZE of them, deepest along w (the widest axis of a decoder's grid).
BRICK = (4, 4, 8)


@dataclasses.dataclass(frozen=True)
class BrickGrid:
    """A neighbourhood grid laid out in bricks: the brick's sides and how many bricks each axis holds."""

    grid: Neighborhood
    brick: tuple[int, int, int] = BRICK

    @property
    def counts(self) -> tuple[int, int, int]:
        """Bricks along (t, h, w), the last one of an axis padded."""
        return tuple(-(-size // side) for size, side in zip(self.grid.sizes, self.brick, strict=True))  # type: ignore[return-value]

    @property
    def padded(self) -> tuple[int, int, int]:
        """(T, H, W) padded to whole bricks."""
        return tuple(count * side for count, side in zip(self.counts, self.brick, strict=True))  # type: ignore[return-value]

    @property
    def tokens(self) -> int:
        """Tokens of the padded grid: bricks x BLOCK_SIZE."""
        frames, height, width = self.padded
        return frames * height * width

    def positions(self, brick: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(t, h, w) of bricks (their indices in brick order) on the grid of bricks."""
        _, count_h, count_w = self.counts
        return brick // (count_h * count_w), (brick // count_w) % count_h, brick % count_w

    def coordinates(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(t, h, w) of brick-order token indices (padding included)."""
        side_t, side_h, side_w = self.brick
        brick_t, brick_h, brick_w = self.positions(index // BLOCK_SIZE)
        offset = index % BLOCK_SIZE
        offset_t, offset_rest = offset // (side_h * side_w), offset % (side_h * side_w)
        offset_h, offset_w = offset_rest // side_w, offset_rest % side_w
        return brick_t * side_t + offset_t, brick_h * side_h + offset_h, brick_w * side_w + offset_w


def to_bricks(x: torch.Tensor, bricks: BrickGrid) -> torch.Tensor:
    """`[B, heads, T*H*W, d]` in raster order -> `[B, heads, bricks * BLOCK_SIZE, d]` in brick order."""
    batch, heads, _, dim = x.shape
    frames, height, width = bricks.grid.sizes
    padded_t, padded_h, padded_w = bricks.padded
    grid = x.reshape(batch, heads, frames, height, width, dim)
    grid = torch.nn.functional.pad(grid, (0, 0, 0, padded_w - width, 0, padded_h - height, 0, padded_t - frames))
    (count_t, count_h, count_w), (side_t, side_h, side_w) = bricks.counts, bricks.brick
    split = grid.reshape(batch, heads, count_t, side_t, count_h, side_h, count_w, side_w, dim)
    return split.permute(0, 1, 2, 4, 6, 3, 5, 7, 8).reshape(batch, heads, bricks.tokens, dim)


def from_bricks(x: torch.Tensor, bricks: BrickGrid) -> torch.Tensor:
    """The inverse of `to_bricks`, the padding dropped."""
    batch, heads, _, dim = x.shape
    frames, height, width = bricks.grid.sizes
    (count_t, count_h, count_w), (side_t, side_h, side_w) = bricks.counts, bricks.brick
    split = x.reshape(batch, heads, count_t, count_h, count_w, side_t, side_h, side_w, dim)
    grid = split.permute(0, 1, 2, 5, 3, 6, 4, 7, 8).reshape(batch, heads, *bricks.padded, dim)
    return grid[:, :, :frames, :height, :width].reshape(batch, heads, frames * height * width, dim)


def brick_mask_mod(bricks: BrickGrid) -> Callable[..., torch.Tensor]:
    """FlexAttention's `mask_mod` in brick order: the window's rule on the tokens' coordinates, padded keys
    never seen (a padded query's row, dropped afterwards, sees its clamped window)."""
    grid = bricks.grid
    sizes = grid.sizes

    def mask_mod(batch: torch.Tensor, head: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        queries, keys = bricks.coordinates(q_idx), bricks.coordinates(kv_idx)
        inside = []
        for query, key, size, kernel in zip(queries, keys, sizes, grid.kernel, strict=True):
            start = window_start(torch.clamp(query, max=size - 1), size, kernel)
            inside.append((key >= start) & (key < start + kernel))
        return inside[0] & inside[1] & inside[2]

    return mask_mod


def axis_window_start(coordinate: torch.Tensor, sizes: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """window_start on `[..., 3]` coordinates, each axis with its own size and kernel."""
    return torch.minimum(torch.clamp(coordinate - kernel // 2, min=0), sizes - kernel)


def _brick_corners(bricks: BrickGrid, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`[blocks, 3]` first and last real (t, h, w) of each brick (clipped to the grid)."""
    position = torch.stack(bricks.positions(blocks), dim=-1)
    side = torch.tensor(bricks.brick, device=blocks.device)
    sizes = torch.tensor(bricks.grid.sizes, device=blocks.device)
    low = position * side
    return low, torch.minimum(low + side, sizes) - 1


def brick_block_lists(bricks: BrickGrid, device: torch.device | str = "cpu") -> BlockLists:
    """The key bricks each query brick reads, partial and full, from the geometry (as neighborhood_block_lists)."""
    device = torch.device(device)
    grid = bricks.grid
    sizes = torch.tensor(grid.sizes, device=device)
    kernel = torch.tensor(grid.kernel, device=device)
    side = torch.tensor(bricks.brick, device=device)
    counts = torch.tensor(bricks.counts, device=device)
    total = int(torch.prod(counts))
    # Key bricks one query brick can reach per axis: its windows' union spans at most side + kernel - 1 keys,
    # which, starting anywhere in a brick, touch up to (2 * side + kernel - 3) // side + 1 bricks.
    reach = (2 * side + kernel - 3) // side + 1
    offsets = torch.stack(
        torch.meshgrid(*(torch.arange(int(n), device=device) for n in reach), indexing="ij"), dim=-1
    ).reshape(-1, 3)
    parts = []
    for begin in range(0, total, QUERY_BLOCKS_PER_PASS):
        blocks = torch.arange(begin, min(begin + QUERY_BLOCKS_PER_PASS, total), device=device)
        low, high = _brick_corners(bricks, blocks)
        union_low = axis_window_start(low, sizes, kernel)
        union_high = axis_window_start(high, sizes, kernel) + kernel - 1
        first, last = union_low // side, union_high // side
        key = first[:, None, :] + offsets[None, :, :]  # [blocks, candidates, 3] brick positions
        reached = (key <= last[:, None, :]).all(dim=-1)
        listed = torch.where(reached, (key[..., 0] * counts[1] + key[..., 1]) * counts[2] + key[..., 2], -1)
        key_low = key.clamp(max=counts - 1) * side
        key_high = key_low + side - 1
        inner_low = axis_window_start(high, sizes, kernel)  # inside every window of the brick: the intersection
        inner_high = axis_window_start(low, sizes, kernel) + kernel - 1
        whole = (key_high < sizes).all(dim=-1)  # no padding in the key brick
        inside = ((key_low >= inner_low[:, None, :]) & (key_high <= inner_high[:, None, :])).all(dim=-1)
        full = reached & whole & inside
        parts.append((compact_block_rows(listed, reached & ~full), compact_block_rows(listed, full)))
    partial_counts, partial_indices = join_block_passes([part[0] for part in parts])
    full_counts, full_indices = join_block_passes([part[1] for part in parts])
    return BlockLists(partial_counts, partial_indices, full_counts, full_indices)


def brick_block_mask(bricks: BrickGrid, device: torch.device | str = "cpu", full_width: bool = False) -> BlockMask:
    """FlexAttention's BlockMask of the window in brick order (see neighborhood_block_mask for `full_width`)."""
    lists = brick_block_lists(bricks, device)
    return block_mask_of(lists, brick_mask_mod(bricks), bricks.tokens, BLOCK_SIZE, full_width)


def mean_key_blocks(lists: BlockLists) -> float:
    """Key blocks a query block reads on average (partial and full): the attention's work, in blocks."""
    return float((lists.partial_counts + lists.full_counts).float().mean())
