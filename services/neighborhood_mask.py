"""The block-sparse mask of LTX-2.5's 3D neighborhood attention, built from the window's geometry.

LTX-2.5's diffusion video decoder (diffusers 0.42.1 `LTX2VideoDiffusionDecoderModel`) lets every token
of a `(T, H, W)` grid, flattened in raster order (`t * H * W + h * W + w`), attend to a `kernel_size`
box that is centred on it and shifted inward at the grid's borders, so it always holds exactly
`kernel_t * kernel_h * kernel_w` keys (NATTEN's `na3d`; diffusers' `_neighborhood_block_mask`).

diffusers hands that rule to `create_block_mask`, which evaluates it for every query and key pair: a
dense boolean matrix of the grid's tokens squared (3,510 GiB for one 768x512x80 tile on an H200,
docs/benchmarks.md). Here the block lists FlexAttention reads are computed from the geometry instead,
one query block at a time, without ever forming a query x key matrix of blocks or of tokens:

- a query block (BLOCK_SIZE consecutive tokens) is cut into row segments, each a run of tokens with
  one `t` and one `h` and consecutive `w`; the union of a segment's windows is one box, because the
  window's start never decreases and moves by at most one as the query moves;
- each key row `(t, h)` of that box is a contiguous run of token indices, so its key blocks are a
  range; the union over rows and segments, sorted and without repeats, is the query block's list;
- a listed key block is *full* (FlexAttention skips the mask inside it) when every key in it lies in
  every window of the query block, i.e. in the intersection of their boxes, which is again a box.

The lists are `(1, 1, query_blocks, max_listed)` wide, not `(…, key_blocks)` as `create_block_mask`
makes them: FlexAttention's forward kernel walks `kv_num_blocks` entries of each row by its stride,
and `compute_q_blocks=False` skips the transposed lists only a backward pass reads.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch.nn.attention.flex_attention import BlockMask

#: FlexAttention's default sparse block size (tokens per query block and per key block).
BLOCK_SIZE = 128
#: Query blocks whose lists are built at once (a 1080p stage-5 grid has ~123,000 blocks).
QUERY_BLOCKS_PER_PASS = 8192


@dataclasses.dataclass(frozen=True)
class Neighborhood:
    """A token grid and the (clipped) kernel of its neighborhood attention."""

    frames: int
    height: int
    width: int
    kernel: tuple[int, int, int]

    @classmethod
    def of(cls, grid: tuple[int, int, int], kernel: tuple[int, int, int]) -> Neighborhood:
        """As diffusers clips it: a kernel never larger than the grid."""
        clipped = tuple(min(k, n) for k, n in zip(kernel, grid, strict=True))
        return cls(grid[0], grid[1], grid[2], clipped)  # type: ignore[arg-type]

    @property
    def tokens(self) -> int:
        """Tokens of the grid (queries and keys alike)."""
        return self.frames * self.height * self.width

    @property
    def sizes(self) -> tuple[int, int, int]:
        """(T, H, W)."""
        return (self.frames, self.height, self.width)


def window_start(coordinate: torch.Tensor, size: int, kernel: int) -> torch.Tensor:
    """First key coordinate of the window of a query at `coordinate` on an axis of `size` (shifted inward)."""
    return torch.clamp(coordinate - kernel // 2, 0, size - kernel)


def neighborhood_mask_mod(grid: Neighborhood) -> Callable[..., torch.Tensor]:
    """FlexAttention's `mask_mod` of the window, evaluated only inside partial blocks (diffusers' rule)."""
    frames, height, width = grid.sizes
    kernel_t, kernel_h, kernel_w = grid.kernel
    plane = height * width

    def mask_mod(batch: torch.Tensor, head: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        q_t, q_rest = q_idx // plane, q_idx % plane
        k_t, k_rest = kv_idx // plane, kv_idx % plane
        q_h, q_w = q_rest // width, q_rest % width
        k_h, k_w = k_rest // width, k_rest % width
        start_t = window_start(q_t, frames, kernel_t)
        start_h = window_start(q_h, height, kernel_h)
        start_w = window_start(q_w, width, kernel_w)
        inside_t = (k_t >= start_t) & (k_t < start_t + kernel_t)
        inside_h = (k_h >= start_h) & (k_h < start_h + kernel_h)
        inside_w = (k_w >= start_w) & (k_w < start_w + kernel_w)
        return inside_t & inside_h & inside_w

    return mask_mod


def dense_neighborhood_mask(grid: Neighborhood, device: torch.device | str = "cpu") -> torch.Tensor:
    """The `[tokens, tokens]` boolean mask (for tests on small grids only: it is the tokens squared)."""
    index = torch.arange(grid.tokens, device=device)
    return neighborhood_mask_mod(grid)(None, None, index[:, None], index[None, :])  # type: ignore[arg-type]


@dataclasses.dataclass(frozen=True)
class BlockLists:
    """Per query block, the key blocks it reads: partial (mask applied) and full (no mask), each sorted."""

    partial_counts: torch.Tensor  #: [query_blocks] int32
    partial_indices: torch.Tensor  #: [query_blocks, width] int32, the first `count` entries valid
    full_counts: torch.Tensor
    full_indices: torch.Tensor


def _coordinates(grid: Neighborhood, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    plane = grid.height * grid.width
    return index // plane, (index % plane) // grid.width, index % grid.width


def _segments(grid: Neighborhood, blocks: torch.Tensor, block_size: int) -> tuple[torch.Tensor, ...]:
    """The row segments of query `blocks` as `[blocks, segments]` tensors: (t, h, first w, last w, valid).

    A block starting mid-row holds at most `ceil(block_size / W) + 1` segments.
    """
    device = blocks.device
    most = -(-block_size // grid.width) + 1
    first = blocks * block_size
    last = torch.clamp(first + block_size, max=grid.tokens) - 1
    row_of_first = first // grid.width
    rows = row_of_first[:, None] + torch.arange(most, device=device)[None, :]  # global row = t * H + h
    row_begin = torch.maximum(rows * grid.width, first[:, None])
    row_end = torch.minimum(rows * grid.width + grid.width - 1, last[:, None])
    valid = row_begin <= row_end
    row_begin = torch.where(valid, row_begin, first[:, None])
    row_end = torch.where(valid, row_end, first[:, None])
    t, h, w_first = _coordinates(grid, row_begin)
    return t, h, w_first, row_end % grid.width, valid


def _listed_blocks(grid: Neighborhood, blocks: torch.Tensor, block_size: int) -> torch.Tensor:
    """`[blocks, candidates]` key block indices the windows of query `blocks` reach, -1 where none (repeats kept)."""
    device = blocks.device
    frames, height, width = grid.sizes
    kernel_t, kernel_h, kernel_w = grid.kernel
    t, h, w_first, w_last, valid = _segments(grid, blocks, block_size)
    start_t = window_start(t, frames, kernel_t)
    start_h = window_start(h, height, kernel_h)
    w_begin = window_start(w_first, width, kernel_w)
    w_end = window_start(w_last, width, kernel_w) + kernel_w - 1  # inclusive
    # The widest w run a segment's windows cover decides how many key blocks one key row can touch.
    run = min(width, block_size + kernel_w - 1)
    per_row = -(-run // block_size) + 1
    offsets_t = torch.arange(kernel_t, device=device)
    offsets_h = torch.arange(kernel_h, device=device)
    # [blocks, segments, kernel_t, kernel_h]: the token index of each key row's first and last key.
    key_t = start_t[..., None, None] + offsets_t[:, None]
    key_h = start_h[..., None, None] + offsets_h[None, :]
    row_base = (key_t * height + key_h) * width
    first_block = (row_base + w_begin[..., None, None]) // block_size
    last_block = (row_base + w_end[..., None, None]) // block_size
    steps = torch.arange(per_row, device=device)
    listed = first_block[..., None] + steps  # [blocks, segments, kernel_t, kernel_h, per_row]
    keep = (listed <= last_block[..., None]) & valid[..., None, None, None]
    listed = torch.where(keep, listed, torch.full_like(listed, -1))
    return listed.reshape(listed.shape[0], -1)


def _block_boxes(grid: Neighborhood, block_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per block, the smallest and largest (t, h, w) among its tokens: `[blocks, 3]` each."""
    blocks = -(-grid.tokens // block_size)
    index = torch.clamp(torch.arange(blocks * block_size, device=device), max=grid.tokens - 1)
    coordinates = torch.stack(_coordinates(grid, index), dim=-1).reshape(blocks, block_size, 3)
    return coordinates.amin(dim=1), coordinates.amax(dim=1)


def _full(
    grid: Neighborhood, blocks: torch.Tensor, listed: torch.Tensor, boxes: tuple[torch.Tensor, torch.Tensor]
) -> torch.Tensor:
    """Which listed key blocks lie wholly inside every window of their query block (of `blocks`).

    `boxes` are every block's smallest and largest (t, h, w) (`_block_boxes`). The windows' intersection
    is taken over the whole coordinate range of the query block, a superset of its coordinates, so a
    block called full here is full; a few full ones may be left partial, which costs only the mask.
    """
    low, high = boxes
    sizes = torch.tensor(grid.sizes, device=listed.device)
    kernel = torch.tensor(grid.kernel, device=listed.device)
    # The windows' intersection on each axis: from the latest start to the earliest end (inclusive).
    query_low, query_high = low[blocks], high[blocks]
    inner_begin = torch.clamp(query_high - kernel // 2, min=torch.zeros_like(sizes), max=sizes - kernel)
    inner_end = torch.clamp(query_low - kernel // 2, min=torch.zeros_like(sizes), max=sizes - kernel) + kernel - 1
    key = listed.clamp(min=0)
    key_low, key_high = low[key], high[key]  # [query_blocks, candidates, 3]
    inside = (key_low >= inner_begin[:, None, :]) & (key_high <= inner_end[:, None, :])
    full = inside.all(dim=-1) & (listed >= 0)
    last_block = low.shape[0] - 1
    full &= listed != last_block  # the last block may be ragged: it always takes the mask
    return full


def compact_block_rows(listed: torch.Tensor, chosen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The chosen entries of each row, sorted ascending, repeats dropped: (counts, `[rows, width]`), the
    width the longest row's, unused places 0."""
    big = torch.iinfo(torch.int64).max
    values = torch.where(chosen, listed, torch.full_like(listed, big)).sort(dim=1).values
    repeat = torch.zeros_like(values, dtype=torch.bool)
    repeat[:, 1:] = values[:, 1:] == values[:, :-1]
    values = torch.where(repeat, torch.full_like(values, big), values).sort(dim=1).values
    counts = (values != big).sum(dim=1)
    width = max(int(counts.max().item()) if counts.numel() else 0, 1)
    values = values[:, :width]
    values = torch.where(values == big, torch.zeros_like(values), values)
    return counts.to(torch.int32), values.to(torch.int32)


def neighborhood_block_lists(
    grid: Neighborhood, block_size: int = BLOCK_SIZE, device: torch.device | str = "cpu"
) -> BlockLists:
    """The key blocks each query block reads, from the window's geometry (never a token x token matrix).

    Query blocks are taken QUERY_BLOCKS_PER_PASS at a time, which bounds the temporaries (a pass lists
    up to a few hundred candidates per block) whatever the grid.
    """
    device = torch.device(device)
    boxes = _block_boxes(grid, block_size, device)
    total = boxes[0].shape[0]
    parts = []
    for begin in range(0, total, QUERY_BLOCKS_PER_PASS):
        blocks = torch.arange(begin, min(begin + QUERY_BLOCKS_PER_PASS, total), device=device)
        listed = _listed_blocks(grid, blocks, block_size)
        full = _full(grid, blocks, listed, boxes)
        parts.append((compact_block_rows(listed, (listed >= 0) & ~full), compact_block_rows(listed, full)))
    partial_counts, partial_indices = join_block_passes([part[0] for part in parts])
    full_counts, full_indices = join_block_passes([part[1] for part in parts])
    return BlockLists(partial_counts, partial_indices, full_counts, full_indices)


def join_block_passes(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Passes' (counts, indices) stacked, the indices padded with 0 to the widest pass."""
    width = max(indices.shape[1] for _, indices in parts)
    padded = [torch.nn.functional.pad(indices, (0, width - indices.shape[1])) for _, indices in parts]
    return torch.cat([counts for counts, _ in parts]), torch.cat(padded)


def neighborhood_block_mask(
    grid: Neighborhood, block_size: int = BLOCK_SIZE, device: torch.device | str = "cpu", full_width: bool = False
) -> BlockMask:
    """FlexAttention's BlockMask of the window, one (batch, head) shared by all (broadcast).

    `full_width` pads the partial lists to one place per key block, as `create_block_mask` makes them,
    for a torch whose Inductor lowering asserts that width (torch 2.13 asserts it on CPU only): the
    padding is never read, but it is query blocks x key blocks int32 (2.1 GB for a whole 768x512x121
    stage 5), so it is only the fallback (services/neighborhood_attention.py).
    """
    lists = neighborhood_block_lists(grid, block_size, device)
    return block_mask_of(lists, neighborhood_mask_mod(grid), grid.tokens, block_size, full_width)


def block_mask_of(
    lists: BlockLists, mask_mod: Callable[..., torch.Tensor], tokens: int, block_size: int, full_width: bool
) -> BlockMask:
    """FlexAttention's BlockMask from block lists and the rule inside their partial blocks, over `tokens`
    queries and keys (raster order here, bricks in services/brick_order.py)."""
    partial = lists.partial_indices
    if full_width:
        partial = torch.nn.functional.pad(partial, (0, partial.shape[0] - partial.shape[1]))
    return BlockMask.from_kv_blocks(
        lists.partial_counts[None, None],
        partial[None, None],
        lists.full_counts[None, None],
        lists.full_indices[None, None],
        BLOCK_SIZE=block_size,
        mask_mod=mask_mod,
        seq_lengths=(tokens, tokens),
        compute_q_blocks=False,
    )
