"""LTX-2.5's diffusion-decoder attention on the geometric block mask (services/neighborhood_mask.py).

diffusers 0.42.1 ships two processors for `LTX2VideoVaeNeighborhoodAttention`: FlexAttention called
uncompiled with a mask from `create_block_mask` (dense scores and a dense mask: more than an H200 holds
at 224x224x17), and NATTEN's `na3d`, downloaded from the Hub when used. This one keeps diffusers'
projections (`project_qkv`: RMS norms, the pre-scaled query, the 3D rope) and output projection and
replaces only the attention:

- on CUDA, a compiled `flex_attention` reading the block lists built from the window's geometry, so
  neither scores nor masks grow with the square of the tokens;
- elsewhere (the CPU tests), `block_sparse_attention`, which executes the same block lists in plain
  torch: per query block, the keys of its listed blocks only, the window's rule applied inside partial
  blocks and not inside full ones. It is exact (float32 softmax), so it checks the lists themselves:
  a missing block or a wrongly full one changes the output.

The processor is not a subclass of diffusers' flex processor on purpose: diffusers' blocks then hand
it no mask (`build_block_mask` returns None), and it builds its own, once per grid.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import torch

from services.brick_order import BrickGrid, brick_block_lists, brick_block_mask, brick_mask_mod, from_bricks, to_bricks
from services.neighborhood_mask import (
    BLOCK_SIZE,
    BlockLists,
    Neighborhood,
    neighborhood_block_lists,
    neighborhood_block_mask,
    neighborhood_mask_mod,
)

#: Grids whose masks a processor keeps (a tiled decode meets a few tile shapes per stage).
CACHED_GRIDS = 8
#: Graphs of the compiled flex_attention (a stage's grid per tile shape: 5 stages x a few tile shapes).
RECOMPILE_LIMIT = 64
#: The token orders the attention runs in (BlockSparseNeighborhoodProcessor).
ORDERS = ("raster", "bricks")
#: Query x key scores `block_sparse_attention` forms at once, per batch and head.
SCORES_PER_PASS = 1 << 22


@functools.cache
def compiled_flex_attention() -> Callable[..., torch.Tensor]:
    """`flex_attention` compiled once per process (uncompiled it computes dense scores).

    Each grid (a stage, a tile shape) is its own graph, and a graph past dynamo's recompile limit
    would run uncompiled, dense: the limit is raised to cover a tiled decode's grids.
    """
    import torch._dynamo
    from torch.nn.attention.flex_attention import flex_attention

    dynamo_config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, max(getattr(dynamo_config, name), RECOMPILE_LIMIT))
    return torch.compile(flex_attention, dynamic=False)


@dataclasses.dataclass(frozen=True)
class SparsePass:
    """Query blocks `begin:end` of one pass: the tokens of their listed key blocks and which they may see."""

    begin: int
    end: int
    key_index: torch.Tensor  #: [blocks, listed * BLOCK_SIZE] token indices (past the grid: padding)
    allowed: torch.Tensor  #: [blocks, BLOCK_SIZE, listed * BLOCK_SIZE] the rule inside partial blocks, all of full ones


def block_sparse_passes(lists: BlockLists, mask_mod: Callable[..., torch.Tensor], tokens: int) -> list[SparsePass]:
    """The block lists laid out for `block_sparse_attention`, built once per grid (the rule's evaluation
    is the expensive part): `mask_mod` is the rule in the lists' token order (raster or bricks), keys from
    `tokens` on are padding."""
    device = lists.partial_counts.device
    blocks = lists.partial_counts.shape[0]
    indices = torch.cat([lists.partial_indices, lists.full_indices], dim=1).long()
    width = indices.shape[1]
    partial_width = lists.partial_indices.shape[1]
    column = torch.arange(width, device=device)
    listed = torch.where(
        column < partial_width,
        column[None, :] < lists.partial_counts[:, None],
        (column - partial_width)[None, :] < lists.full_counts[:, None],
    )
    masked = (column < partial_width)[:, None].expand(-1, BLOCK_SIZE).reshape(1, 1, -1)
    offsets = torch.arange(BLOCK_SIZE, device=device)
    per_pass = max(1, SCORES_PER_PASS // (BLOCK_SIZE * BLOCK_SIZE * width))
    passes = []
    for begin in range(0, blocks, per_pass):
        end = min(begin + per_pass, blocks)
        key_index = (indices[begin:end, :, None] * BLOCK_SIZE + offsets).reshape(end - begin, -1)
        query_index = (torch.arange(begin, end, device=device)[:, None] * BLOCK_SIZE + offsets)[:, :, None]
        seen = listed[begin:end, :, None].expand(-1, -1, BLOCK_SIZE).reshape(end - begin, 1, -1)
        seen = seen & (key_index[:, None, :] < tokens)
        inside = mask_mod(None, None, query_index, key_index[:, None, :])
        passes.append(SparsePass(begin, end, key_index, seen & (inside | ~masked)))
    return passes


def block_sparse_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, passes: list[SparsePass]
) -> torch.Tensor:
    """Attention `[B, heads, N, d]` of the listed blocks only (scale 1: the query comes pre-scaled)."""
    batch, heads, tokens, dim = query.shape
    padded = passes[-1].end * BLOCK_SIZE
    pad = (0, 0, 0, padded - tokens)
    query, key, value = (torch.nn.functional.pad(x, pad) for x in (query, key, value))
    out = torch.empty_like(query)
    for part in passes:
        rows = slice(part.begin * BLOCK_SIZE, part.end * BLOCK_SIZE)
        q = query[:, :, rows].reshape(batch, heads, part.end - part.begin, BLOCK_SIZE, dim)
        k = key[:, :, part.key_index]  # [B, heads, blocks, listed * BLOCK_SIZE, d]
        v = value[:, :, part.key_index]
        scores = torch.einsum("bhnqd,bhnkd->bhnqk", q.float(), k.float())
        scores = scores.masked_fill(~part.allowed, float("-inf"))
        weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # padded query rows see no key
        result = torch.einsum("bhnqk,bhnkd->bhnqd", weights, v.float()).to(query.dtype)
        out[:, :, rows] = result.reshape(batch, heads, -1, dim)
    return out[:, :, :tokens]


class BlockSparseNeighborhoodProcessor:
    """Processor for diffusers' `LTX2VideoVaeNeighborhoodAttention` on the geometric block mask.

    `order`: the tokens' order in the attention, "raster" (diffusers', as the projections make them) or
    "bricks" (services/brick_order.py: permuted into 4 x 4 x 8 bricks and back, about a quarter of the key
    blocks at the last stage of a 1080p clip). Raster stays the default until a GPU measures what the permutations cost
    against the blocks saved (bench/diffusion_decode_bench.py --orders)."""

    def __init__(self, order: str = "raster") -> None:
        if order not in ORDERS:
            raise ValueError(f"token order {order!r}: one of {', '.join(ORDERS)}")
        self.order = order
        self.masks: dict[tuple[Neighborhood, str, bool], Any] = {}
        #: the block lists are padded to every key block (neighborhood_block_mask's `full_width`): set
        #: once a compile refused the narrow ones
        self.full_width = False

    def mask_for(self, grid: Neighborhood, device: torch.device, flex: bool) -> Any:
        """The grid's BlockMask for flex_attention, else its block_sparse_passes, in the processor's order;
        built once per grid."""
        cache_key = (grid, str(device), flex)
        if cache_key not in self.masks:
            if len(self.masks) >= CACHED_GRIDS:
                self.masks.pop(next(iter(self.masks)))
            if self.order == "bricks":
                bricks = BrickGrid(grid)
                if flex:
                    self.masks[cache_key] = brick_block_mask(bricks, device=device, full_width=self.full_width)
                else:
                    lists = brick_block_lists(bricks, device=device)
                    self.masks[cache_key] = block_sparse_passes(lists, brick_mask_mod(bricks), bricks.tokens)
            elif flex:
                self.masks[cache_key] = neighborhood_block_mask(grid, device=device, full_width=self.full_width)
            else:
                lists = neighborhood_block_lists(grid, device=device)
                self.masks[cache_key] = block_sparse_passes(lists, neighborhood_mask_mod(grid), grid.tokens)
        return self.masks[cache_key]

    def __call__(self, attn: Any, hidden_states: torch.Tensor, block_mask: Any = None) -> torch.Tensor:
        """Channels-last `(B, T, H, W, C)` in and out, as diffusers' processors."""
        batch, frames, height, width, _ = hidden_states.shape
        query, key, value = attn.project_qkv(hidden_states)  # (B, T, H, W, heads, head_dim)
        tokens = frames * height * width
        query, key, value = (
            x.reshape(batch, tokens, attn.heads, attn.head_dim).transpose(1, 2) for x in (query, key, value)
        )
        grid = Neighborhood.of((frames, height, width), attn.kernel_size)
        flex = hidden_states.device.type == "cuda"
        mask = self.mask_for(grid, hidden_states.device, flex)
        bricks = BrickGrid(grid) if self.order == "bricks" else None
        if bricks is not None:
            query, key, value = (to_bricks(x, bricks) for x in (query, key, value))
        if flex:
            out = self.flex(query, key, value, grid, mask)
        else:
            out = block_sparse_attention(query, key, value, mask)
        if bricks is not None:
            out = from_bricks(out, bricks)
        out = out.transpose(1, 2).reshape(batch, frames, height, width, attn.heads * attn.head_dim)
        return attn.to_out[0](out)

    def flex(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, grid: Neighborhood, mask: Any
    ) -> torch.Tensor:
        """Compiled flex_attention on the mask; once, on a lowering that asserts the lists cover every key
        block (older Inductor on GPUs, Inductor on CPUs), again on full-width lists from then on."""
        try:
            return compiled_flex_attention()(query, key, value, block_mask=mask, scale=1.0)
        except Exception as error:
            if self.full_width or "block_mask size" not in str(error):
                raise
        self.full_width = True
        self.masks.clear()
        mask = self.mask_for(grid, query.device, flex=True)
        return compiled_flex_attention()(query, key, value, block_mask=mask, scale=1.0)


def use_block_sparse_attention(decoder: Any, order: str = "raster") -> BlockSparseNeighborhoodProcessor:
    """Give every neighbourhood attention of `decoder` one shared processor (one mask cache) with its tokens in
    `order` (BlockSparseNeighborhoodProcessor); returns it."""
    from diffusers.models.autoencoders.ltx2_diffusion_decoder import LTX2VideoVaeNeighborhoodAttention

    processor = BlockSparseNeighborhoodProcessor(order)
    for module in decoder.modules():
        if isinstance(module, LTX2VideoVaeNeighborhoodAttention):
            module.set_processor(processor)
    return processor
