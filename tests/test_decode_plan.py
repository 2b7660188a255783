"""Decode plan selection is a pure function of size, budget and the user's overrides."""

from __future__ import annotations

import dataclasses

import pytest

from config.settings import DecodeSettings
from orchestrator.run.decode_plan import INDEX_LIMIT, choose_decode_plan, decode_ladder, estimate_peak, next_decode_plan
from protocol.plans import piece_ranges

BIG = DecodeSettings(
    profile="thor-128g",
    budget_gib=60.0,
    tile_size=512,
    tile_overlap=128,
    chunk_overlap_latent_frames=2,
    x264_preset="veryfast",
)


def test_1080p_161_frames_is_never_decoded_in_one_pass():
    """The single pass would exceed 32-bit indexing ("input tensor must fit into 32-bit index math")."""
    plan = choose_decode_plan(1920, 1088, 161, BIG)
    assert plan.tiling and plan.chunk_latent_frames is None
    assert plan.label == "spatial tiling"


def test_single_pass_is_kept_where_it_fits():
    assert choose_decode_plan(768, 512, 121, BIG).label == "single pass"
    # Measured boundary: 1088p single pass still works at 121 frames.
    assert estimate_peak(choose_decode_plan(1920, 1088, 121, BIG), 1920, 1088, 121)[0] <= INDEX_LIMIT


def test_small_budget_falls_back_to_temporal_pieces():
    low = dataclasses.replace(BIG, budget_gib=4.0)
    plan = choose_decode_plan(1920, 1088, 161, low)
    assert plan.chunk_latent_frames == 11 and plan.tiling
    tiny = dataclasses.replace(BIG, budget_gib=0.5)
    assert choose_decode_plan(1920, 1088, 161, tiny).chunk_latent_frames == 4


def test_explicit_chunk_and_tiling_flags_win():
    assert choose_decode_plan(768, 512, 121, BIG, chunk_latent_frames=8).label == "temporal pieces of 8"
    assert choose_decode_plan(768, 512, 121, BIG, tiling=True).label == "spatial tiling"
    assert choose_decode_plan(1920, 1088, 161, BIG, tiling=False).label == "temporal pieces of 11"


@pytest.mark.parametrize("chunk", [2, 3])
def test_a_chunk_no_longer_than_the_overlap_shares_one_frame_less_than_it_holds(chunk: int):
    """`--vae-chunk-frames 2` is allowed (2 to the clip's latent frames) but the configured overlap is 2: the
    pieces must still advance (the decode crashed on `range(..., 0)` after the whole diffusion had run)."""
    plan = choose_decode_plan(64, 64, 17, BIG, chunk_latent_frames=chunk)
    assert plan.overlap_latent_frames == min(BIG.chunk_overlap_latent_frames, chunk - 1)
    ranges = piece_ranges(3, plan.chunk_latent_frames, plan.overlap_latent_frames)
    assert ranges[0] == (0, chunk) and ranges[-1][1] == 3 and len(ranges) == 4 - chunk


def test_ladder_runs_from_single_pass_down_to_pieces_of_four():
    labels = [p.label for p in decode_ladder(21, BIG)]
    assert labels == [
        "single pass",
        "spatial tiling",
        "temporal pieces of 11 + tiling",
        "temporal pieces of 8 + tiling",
        "temporal pieces of 4 + tiling",
    ]
    assert [p.label for p in decode_ladder(5, BIG)] == [
        "single pass",
        "spatial tiling",
        "temporal pieces of 4 + tiling",
    ]


def test_next_plan_walks_the_ladder_then_stops():
    plan = decode_ladder(21, BIG)[0]
    seen = [plan.label]
    while (plan := next_decode_plan(plan, 21, BIG)) is not None:
        seen.append(plan.label)
    assert seen == [p.label for p in decode_ladder(21, BIG)]


@pytest.mark.parametrize(("latents", "chunk", "overlap"), [(21, 11, 2), (21, 8, 2), (21, 4, 1), (5, 3, 1), (9, 4, 2)])
def test_pieces_cover_every_latent_frame_and_yield_the_exact_frame_count(latents: int, chunk: int, overlap: int):
    ranges = piece_ranges(latents, chunk, overlap)
    assert ranges[0][0] == 0 and ranges[-1][1] == latents
    assert all(b - a <= chunk for a, b in ranges)
    assert all(next_a == end - overlap for (_, end), (next_a, _) in zip(ranges, ranges[1:], strict=False))
    # The video_decode arithmetic: each piece yields ratio*(b-a-1)+1 frames, minus what it shares.
    ratio = 8
    total = sum(ratio * (b - a - 1) + 1 for a, b in ranges) - sum(
        ratio * (end - 1 - next_a) + 1 for (_, end), (next_a, _) in zip(ranges, ranges[1:], strict=False)
    )
    assert total == ratio * (latents - 1) + 1


def test_piece_overlap_must_be_smaller_than_the_piece():
    with pytest.raises(ValueError, match="overlap"):
        piece_ranges(21, 2, 2)
