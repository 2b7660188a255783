"""Latents to frames through LTX-2.5's diffusion video decoder, whole or in tiles, frames streamed in order.

diffusers 0.42.1's `LTX2VideoDiffusionDecoderModel` upsamples the latents through four deterministic
neighbourhood-attention stages into a context volume, then predicts the pixels in one x0 step from
noise (stage 5). Its attention runs here on the geometric block mask (services/neighborhood_attention.py).

Tiles follow the decode plan (protocol.plans.DecodePlan, the same OOM ladder as the VAE's): spatial
tiles of `tile_size` px overlapping by `tile_overlap`, and temporal pieces of `chunk_latent_frames`
latent frames sharing `overlap_latent_frames`. As in diffusers' `tiled_decode`, stages 1 to 3 always
run on the whole clip (they are small) and tiles cut the grid entering the last deterministic stage,
whose cells map to fixed blocks of output pixels; seams are blended linearly as diffusers does. Two
things differ, so that a tiled decode equals the whole one:

- the noise is one canvas, drawn exactly as the whole decode draws it and cut per tile (diffusers
  draws each tile's own in a one-step decode, so its tiles decode different noise);
- each tile is decoded with a halo as wide as a tile border's influence reaches (`halo_cells`: the
  depth times the window radius of the last two stages), which is then cut off, so every pixel kept
  was computed with the windows the whole decode uses. A halo costs compute, never exactness.

Frames go out per temporal piece as soon as they are final, as services/video_decode.decode_frames.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from protocol.errors import ModelNotFound
from protocol.families import DIFFUSION_DECODER
from protocol.plans import DecodePlan


def load_diffusion_decoder(root: Path, dtype: torch.dtype, device: torch.device) -> Any:
    """The checkpoint's diffusion video decoder on `device`, its attention on the geometric block mask."""
    from diffusers import LTX2VideoDiffusionDecoderModel

    from services.neighborhood_attention import use_block_sparse_attention

    if not (root / DIFFUSION_DECODER / "config.json").is_file():
        raise ModelNotFound(f"--decoder diffusion needs {root / DIFFUSION_DECODER}, which has no config.json")
    model = LTX2VideoDiffusionDecoderModel.from_pretrained(root, subfolder=DIFFUSION_DECODER, torch_dtype=dtype)
    model = model.to(device).eval()
    use_block_sparse_attention(model)
    return model


@dataclasses.dataclass(frozen=True)
class Axis:
    """One axis of the grid entering the last deterministic stage, and how its cells map to pixels."""

    cells: int  #: cells of the clip on this axis (without the trailing ghost frames)
    scale: int  #: output pixels (frames) per cell
    causal: bool  #: the temporal axis: the first cell decodes to one frame, every other to `scale`
    halo: int  #: cells a tile's border influences inwards (see halo_cells)

    def pixel(self, cell: int) -> int:
        """First output pixel (frame) of `cell`; `pixel(cells)` is the axis' pixel count."""
        if self.causal and cell > 0:
            return cell * self.scale - (self.scale - 1)
        return cell * self.scale


@dataclasses.dataclass(frozen=True)
class Tile:
    """A tile on one axis: the cells it keeps (`core`) and the cells it is decoded with (`core` + halo)."""

    core: tuple[int, int]
    decoded: tuple[int, int]


def halo_cells(model: Any) -> tuple[int, int, int]:
    """(t, h, w) cells of the last-stage grid that a tile's border changes, counted inwards.

    A block whose window is shifted at the tile's border changes its output within the window's
    radius of the border, and each further block widens that by the radius again: the last
    deterministic stage's depth times its radius, plus stage 5's depth times its radius in stage-5
    cells divided by the upsample's stride.
    """
    config = model.config
    kernel_4 = config.decoder_stage_kernels[-1]
    kernel_5 = config.decoder_stage5_kernel
    depth_4, depth_5 = config.decoder_stage_depths[-2], config.decoder_stage_depths[-1]
    stride = config.decoder_upsample_strides[-1]
    return tuple(  # type: ignore[return-value]
        depth_4 * (k4 // 2) + -(-(depth_5 * (k5 // 2)) // s)
        for k4, k5, s in zip(kernel_4, kernel_5, stride, strict=True)
    )


def last_stage_axes(model: Any, features: torch.Tensor, exact_tiles: bool) -> tuple[Axis, Axis, Axis]:
    """The (t, h, w) axes of the grid `features` (stages 1 to 3's output) enters the last deterministic
    stage with: its cells without the trailing ghost frames, the pixels (frames) per cell, the halo."""
    decoder = model.decoder
    patch, stride = decoder.patch_size, decoder.upsamples[-1].stride
    halo = halo_cells(model) if exact_tiles else (0, 0, 0)
    ghost = decoder.trailing_pad_latent_frames * math.prod(up.stride[0] for up in decoder.upsamples[:-1])
    return (
        Axis(features.shape[1] - ghost, stride[0], stride[0] == 2, halo[0]),
        Axis(features.shape[2], stride[1] * patch, False, halo[1]),
        Axis(features.shape[3], stride[2] * patch, False, halo[2]),
    )


def min_tile_cells(model: Any) -> tuple[int, int, int]:
    """(t, h, w): the smallest tile both remaining kernels accept (diffusers' `tiled_decode` rule)."""
    config = model.config
    return tuple(  # type: ignore[return-value]
        max(k4, -(-k5 // s))
        for k4, k5, s in zip(
            config.decoder_stage_kernels[-1],
            config.decoder_stage5_kernel,
            config.decoder_upsample_strides[-1],
            strict=True,
        )
    )


def tile_spans(axis: Axis, tile: int | None, stride: int, smallest: int) -> list[Tile]:
    """Overlapping tiles covering the axis, starts `stride` cells apart (diffusers' `_tile_intervals`: a
    trailing remnant shorter than `smallest` joins the tile before it); None or a tile as long as the
    axis: one tile."""
    if tile is None or axis.cells <= tile:
        return [Tile((0, axis.cells), (0, axis.cells))]
    starts = list(range(0, axis.cells, stride))
    while len(starts) > 1 and axis.cells - starts[-1] < smallest:
        starts.pop()
    cores = [(start, min(start + tile, axis.cells)) for start in starts[:-1]] + [(starts[-1], axis.cells)]
    return [Tile(core, (max(0, core[0] - axis.halo), min(axis.cells, core[1] + axis.halo))) for core in cores]


def plan_tiles(model: Any, axes: tuple[Axis, Axis, Axis], plan: DecodePlan) -> list[list[Tile]]:
    """The (t, h, w) tiles of `plan`: spatial tiles of tile_size px overlapping by tile_overlap when
    tiling, temporal pieces of chunk_latent_frames latent frames sharing overlap_latent_frames."""
    smallest = min_tile_cells(model)
    cells_per_latent = model.temporal_compression_ratio // axes[0].scale
    spans = []
    if plan.chunk_latent_frames is None:
        spans.append(tile_spans(axes[0], None, 0, smallest[0]))
    else:
        tile = plan.chunk_latent_frames * cells_per_latent
        stride = (plan.chunk_latent_frames - plan.overlap_latent_frames) * cells_per_latent
        spans.append(tile_spans(axes[0], tile, stride, smallest[0]))
    for axis, least in zip(axes[1:], smallest[1:], strict=True):
        if plan.tiling:
            tile = max(plan.tile_size // axis.scale, least)
            stride = max((plan.tile_size - plan.tile_overlap) // axis.scale, 1)
            spans.append(tile_spans(axis, tile, stride, least))
        else:
            spans.append(tile_spans(axis, None, 0, least))
    return spans


def blend(before: torch.Tensor, after: torch.Tensor, extent: int, dim: int) -> torch.Tensor:
    """`after` with its first `extent` places along `dim` faded in over the last of `before` (diffusers'
    blend_v/blend_h/blend_t: weight y / extent for `after`'s place y)."""
    extent = min(before.shape[dim], after.shape[dim], extent)
    if extent <= 0:
        return after
    shape = [1] * after.ndim
    shape[dim] = extent
    weight = (torch.arange(extent, device=after.device, dtype=torch.float32) / extent).view(shape).to(after.dtype)
    head = before.narrow(dim, before.shape[dim] - extent, extent) * (1 - weight)
    after = after.clone()
    after.narrow(dim, 0, extent).copy_(head + after.narrow(dim, 0, extent) * weight)
    return after


def decode_tile(
    model: Any, features: torch.Tensor, noise: torch.Tensor, axes: tuple[Axis, ...], spans: tuple[Tile, ...]
) -> torch.Tensor:
    """One tile's pixels `(B, C, F, H, W)`, decoded with its halo and cut to its core."""
    decoder = model.decoder
    (t0, t1), (h0, h1), (w0, w1) = (span.decoded for span in spans)
    ghost = features.shape[1] - axes[0].cells
    trailing = t1 == axes[0].cells
    context = decoder.forward_stage_4(
        features[:, t0 : t1 + (ghost if trailing else 0), h0:h1, w0:w1],
        drop_leading_frame=t0 == 0,
        crop_trailing_ghost=trailing,
    )
    pixels = [
        (axis.pixel(span.decoded[0]), axis.pixel(span.decoded[1])) for axis, span in zip(axes, spans, strict=True)
    ]
    x_t = noise[:, :, slice(*pixels[0]), slice(*pixels[1]), slice(*pixels[2])]
    video = decoder.denoise(context, x_t, decoder.default_num_inference_steps)
    for dim, (axis, span, (first, _)) in enumerate(zip(axes, spans, pixels, strict=True), start=2):
        begin, end = axis.pixel(span.core[0]) - first, axis.pixel(span.core[1]) - first
        video = video.narrow(dim, begin, end - begin)
    return video


def blended_rows(
    tiles: list[list[torch.Tensor]], spans_h: list[Tile], spans_w: list[Tile], axes: tuple[Axis, ...]
) -> torch.Tensor:
    """One temporal piece's tiles joined as diffusers joins them: each blended into the one above and
    the one to its left over their shared pixels, then cut to where the next one starts."""
    rows = []
    for i, row in enumerate(tiles):
        kept = []
        for j, decoded in enumerate(row):
            tile = decoded
            if i > 0:
                tile = blend(tiles[i - 1][j], tile, shared(axes[1], spans_h, i), dim=3)
            if j > 0:
                tile = blend(row[j - 1], tile, shared(axes[2], spans_w, j), dim=4)
            if j + 1 < len(row):
                tile = tile[..., : axes[2].pixel(spans_w[j + 1].core[0]) - axes[2].pixel(spans_w[j].core[0])]
            if i + 1 < len(tiles):
                tile = tile[..., : axes[1].pixel(spans_h[i + 1].core[0]) - axes[1].pixel(spans_h[i].core[0]), :]
            kept.append(tile)
        rows.append(torch.cat(kept, dim=4))
    return torch.cat(rows, dim=3)


def shared(axis: Axis, spans: list[Tile], index: int) -> int:
    """Pixels tile `index` shares with the tile before it on `axis`."""
    return axis.pixel(spans[index - 1].core[1]) - axis.pixel(spans[index].core[0])


def to_frames(video: torch.Tensor) -> torch.Tensor:
    """`(1, C, F, H, W)` in [-1, 1] -> `[F, 3, H, W]` in [0, 1] (diffusers' postprocess order)."""
    return (video[0].permute(1, 0, 2, 3) * 0.5 + 0.5).clamp(0, 1).float()


def diffusion_decode_frames(
    model: Any,
    latents: torch.Tensor,
    plan: DecodePlan,
    generator: torch.Generator | None,
    exact_tiles: bool = True,
) -> Iterator[torch.Tensor]:
    """Yield decoded frames `[n, 3, H, W]` in [0, 1], in order, `(F - 1) * ratio + 1` in all.

    `latents` are denormalized `[1, C, F, h, w]`, as the VAE decode takes them. The generator draws the
    whole clip's noise once, as `LTX2VideoDiffusionDecodePipeline` does for an untiled decode.
    `exact_tiles=False` decodes tiles without halos, as diffusers and the reference do (seams blended
    only): the real decoder's halo is 24 cells (192 px) in space and 22 cells (44 frames) in time.
    """
    from diffusers.utils.torch_utils import randn_tensor

    decoder = model.decoder
    latents = latents.to(model.dtype)
    with torch.no_grad():
        features = decoder.forward_stages_1_to_3(latents)
        axes = last_stage_axes(model, features, exact_tiles)
        shape = (latents.shape[0], decoder.out_channels, *(axis.pixel(axis.cells) for axis in axes))
        noise = randn_tensor(shape, generator=generator, device=latents.device, dtype=latents.dtype)
        spans_t, spans_h, spans_w = plan_tiles(model, axes, plan)
        tail: torch.Tensor | None = None
        for k, span_t in enumerate(spans_t):
            tiles = [[decode_tile(model, features, noise, axes, (span_t, h, w)) for w in spans_w] for h in spans_h]
            piece = blended_rows(tiles, spans_h, spans_w, axes)
            del tiles
            if tail is not None:
                piece = blend(tail, piece, tail.shape[2], dim=2)
            if k + 1 < len(spans_t):
                keep = axes[0].pixel(spans_t[k + 1].core[0]) - axes[0].pixel(span_t.core[0])
                tail = piece[:, :, keep:]
                piece = piece[:, :, :keep]
            yield to_frames(piece)
