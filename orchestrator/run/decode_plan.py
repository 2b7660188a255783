"""Pick how the video VAE decodes a clip, from its size and the memory budget (a pure function).

The rungs, from best quality to least memory, are the failure ladder of DESIGN.md rule 3:
single pass -> spatial tiling -> temporal pieces of 11 -> 8 -> 4 latent frames (tiled when a
piece still needs it). The automatic choice is the first rung that both fits the budget and
stays under the 32-bit index limit that crashes a single-pass 1080p x 161 decode in diffusers
("input tensor must fit into 32-bit index math").
"""

from __future__ import annotations

import dataclasses

from config.settings import DecodeSettings
from protocol.plans import DecodePlan

# The LTX-2 decoder's largest activation is its last up-block: 128 channels at a quarter of the
# output resolution before unpatchifying, i.e. 8 elements per output pixel and frame. Kernels
# such as F.pad index it with int32, so it must stay under 2**31 elements. This reproduces the
# measured boundary: 1920x1088 fails at 161 frames and fits at 121.
ELEMENTS_PER_PIXEL_FRAME = 8
INDEX_LIMIT = 2**31 - 1
# Peak extra memory of a single-pass bf16 decode, measured on an H100: 5.2 GiB at 768x512x121 and
# 18.6 GiB at 1920x1088x81, both about 118 bytes per output pixel and frame.
BYTES_PER_PIXEL_FRAME = 118
# The decoded clip is held whole on the device by diffusers' (tiled) decode: 3 channels in bf16.
OUTPUT_BYTES_PER_PIXEL_FRAME = 6
# Temporal piece sizes in latent frames, as in the seed project (2, 3 and 6 pieces at 161 frames).
TEMPORAL_PIECES = (11, 8, 4)
GIB = 1 << 30


def decode_ladder(latent_frames: int, settings: DecodeSettings, tiling: bool | None = None) -> list[DecodePlan]:
    """Every rung that makes sense for a clip, from most to least memory.

    Pieces at least as long as the clip are dropped (they would equal a whole-clip decode).
    `tiling` forces spatial tiling on or off for every rung.
    """
    overlap = settings.chunk_overlap_latent_frames

    def plan(tiled: bool, chunk: int | None) -> DecodePlan:
        return DecodePlan(
            tiled if tiling is None else tiling, chunk, overlap, settings.tile_size, settings.tile_overlap
        )

    rungs = [plan(False, None), plan(True, None)]
    rungs += [plan(True, n) for n in TEMPORAL_PIECES if overlap < n < latent_frames]
    unique: list[DecodePlan] = []
    for rung in rungs:
        if rung not in unique:
            unique.append(rung)
    return unique


def estimate_peak(plan: DecodePlan, width: int, height: int, num_frames: int) -> tuple[int, int]:
    """(largest activation in elements, peak extra bytes) of decoding with `plan`."""
    frames = num_frames if plan.chunk_latent_frames is None else 8 * (plan.chunk_latent_frames - 1) + 1
    frames = min(frames, num_frames)
    if plan.tiling:
        area = min(width, plan.tile_size) * min(height, plan.tile_size)
    else:
        area = width * height
    elements = ELEMENTS_PER_PIXEL_FRAME * area * frames
    held_output = width * height * frames * OUTPUT_BYTES_PER_PIXEL_FRAME
    return elements, BYTES_PER_PIXEL_FRAME * area * frames + held_output


def fits(plan: DecodePlan, width: int, height: int, num_frames: int, budget_gib: float) -> bool:
    """Whether a plan stays under the index limit and the memory budget."""
    elements, peak = estimate_peak(plan, width, height, num_frames)
    return elements <= INDEX_LIMIT and peak <= budget_gib * GIB


def choose_decode_plan(
    width: int,
    height: int,
    num_frames: int,
    settings: DecodeSettings,
    chunk_latent_frames: int | None = None,
    tiling: bool | None = None,
) -> DecodePlan:
    """The plan for a clip: the user's explicit choice, else the first rung that fits.

    When nothing fits the budget, the smallest rung is returned: the failure policy has nothing
    smaller to fall back to, and the budget is an estimate, not a hard limit.
    """
    latent_frames = (num_frames - 1) // 8 + 1
    if chunk_latent_frames is not None:
        # `--vae-chunk-frames` takes 2 and up; pieces must share fewer frames than they hold, so a piece shorter
        # than the configured overlap + 1 shares one less than its length (2 -> 1) rather than crash the decode.
        overlap = min(settings.chunk_overlap_latent_frames, chunk_latent_frames - 1)
        piece = DecodePlan(False, chunk_latent_frames, overlap, settings.tile_size, settings.tile_overlap)
        if tiling is not None:
            return dataclasses.replace(piece, tiling=tiling)
        if fits(piece, width, height, num_frames, settings.budget_gib):
            return piece
        return dataclasses.replace(piece, tiling=True)
    ladder = decode_ladder(latent_frames, settings, tiling)
    for plan in ladder:
        if fits(plan, width, height, num_frames, settings.budget_gib):
            return plan
    return ladder[-1]


def next_decode_plan(current: DecodePlan, latent_frames: int, settings: DecodeSettings) -> DecodePlan | None:
    """The next lower-memory rung after `current`, or None when the ladder is exhausted."""
    ladder = decode_ladder(latent_frames, settings)
    smaller = [p for p in ladder if _memory_rank(p) > _memory_rank(current)]
    return smaller[0] if smaller else None


def _memory_rank(plan: DecodePlan) -> tuple[int, int]:
    """Orders plans from most to least memory: whole clip before pieces, untiled before tiled."""
    chunk_rank = 0 if plan.chunk_latent_frames is None else 1000 - plan.chunk_latent_frames
    return chunk_rank, int(plan.tiling)
