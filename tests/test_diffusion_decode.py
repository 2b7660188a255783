"""LTX-2.5's diffusion video decoder (services/diffusion_decode.py) on the geometric block mask.

The block lists against the dense mask they stand for, the block-sparse attention against dense
attention, the whole decode against diffusers' own `LTX2VideoDiffusionDecodePipeline` on the tiny 2.5
model, and the tiled decodes of the OOM ladder against the whole one.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT, probe_mp4, run_ltx2
from PIL import Image

from protocol.files import LAST_FRAME_FILE, LATENTS_FILE
from protocol.model_ids import TINY_REPO_IDS
from protocol.plans import DecodePlan
from services.latents import read_latents
from services.neighborhood_mask import (
    BlockLists,
    Neighborhood,
    dense_neighborhood_mask,
    neighborhood_block_lists,
    neighborhood_mask_mod,
)

PARITY_TOLERANCE = 1e-5  # as tests/test_parity.py
HALF_A_LEVEL = 0.5 / 255
# Latents of a 9-frame 32x32 clip of the tiny 2.5 model (4x in space and time): a stage-5 grid of
# 9x16x16 tokens, 18 blocks of 128.
LATENT_SHAPE = (1, 4, 3, 8, 8)
# (T, H, W), kernel, block size: raster blocks that start mid-row, rows shorter and longer than a
# block, kernels clipped to the grid, a ragged last block, and diffusers' stage-5 kernel.
GRIDS = [
    ((9, 16, 16), (3, 5, 5), 128),
    ((5, 7, 9), (3, 3, 3), 16),
    ((9, 16, 16), (11, 11, 11), 128),
    ((4, 10, 13), (3, 5, 5), 8),
    ((17, 12, 40), (3, 7, 7), 32),
    ((3, 4, 4), (3, 7, 7), 4),
    ((3, 6, 150), (3, 5, 5), 128),
]


def listed_and_full(lists: BlockLists, blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The lists as `[query blocks, key blocks]` matrices: every listed key block, and the full ones (a block is
    never both partial and full)."""
    listed = torch.zeros(blocks, blocks, dtype=torch.bool)
    full = torch.zeros(blocks, blocks, dtype=torch.bool)
    for row in range(blocks):
        partial = lists.partial_indices[row, : lists.partial_counts[row]].long()
        whole = lists.full_indices[row, : lists.full_counts[row]].long()
        assert not set(partial.tolist()) & set(whole.tolist())
        listed[row, partial] = True
        listed[row, whole] = True
        full[row, whole] = True
    return listed, full


def block_matrices(sizes: tuple[int, int, int], kernel: tuple[int, int, int], block: int) -> dict[str, torch.Tensor]:
    """The dense mask's blocks (any key allowed, all keys allowed) and the lists' (listed, full), each
    `[query blocks, key blocks]`."""
    grid = Neighborhood.of(sizes, kernel)
    blocks = -(-grid.tokens // block)
    pad = blocks * block - grid.tokens
    dense = torch.nn.functional.pad(dense_neighborhood_mask(grid), (0, pad, 0, pad)).reshape(
        blocks, block, blocks, block
    )
    real = torch.zeros(blocks * block, dtype=torch.bool)
    real[: grid.tokens] = True
    real = (real[:, None] & real[None, :]).reshape(blocks, block, blocks, block)
    lists = neighborhood_block_lists(grid, block)
    listed, full = listed_and_full(lists, blocks)
    return {
        "needed": dense.any(dim=(1, 3)),
        "all": (dense | ~real).all(dim=(1, 3)),
        "listed": listed,
        "full": full,
    }


@pytest.mark.parametrize(("sizes", "kernel", "block"), GRIDS)
def test_block_lists_hold_every_key_block_the_dense_mask_needs_and_no_other(
    sizes: tuple[int, int, int], kernel: tuple[int, int, int], block: int
):
    m = block_matrices(sizes, kernel, block)
    assert not (m["needed"] & ~m["listed"]).any()  # every key a window holds is in a listed block
    assert not (m["listed"] & ~m["needed"]).any()  # the unions of windows are exact at block level
    assert not (m["full"] & ~m["all"]).any()  # a block read without the mask holds only allowed keys


def dense_window_case() -> tuple[Neighborhood, tuple[torch.Tensor, ...], torch.Tensor]:
    """A small grid, seeded queries, keys and values `[2, 3, tokens, 8]`, and their dense masked attention."""
    grid = Neighborhood.of((5, 12, 20), (3, 5, 5))
    generator = torch.Generator().manual_seed(3)
    query, key, value = (torch.randn(2, 3, grid.tokens, 8, generator=generator) for _ in range(3))
    dense = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=dense_neighborhood_mask(grid), scale=1.0
    )
    return grid, (query, key, value), dense


def test_block_sparse_attention_equals_dense_masked_attention():
    from services.neighborhood_attention import block_sparse_attention, block_sparse_passes

    grid, (query, key, value), dense = dense_window_case()
    passes = block_sparse_passes(neighborhood_block_lists(grid), neighborhood_mask_mod(grid), grid.tokens)
    sparse = block_sparse_attention(query, key, value, passes)
    assert (sparse - dense).abs().max().item() <= PARITY_TOLERANCE


@pytest.fixture(scope="module")
def decoder_case(tiny_25_model_dir: Path) -> dict:
    """The tiny 2.5 model's diffusion decoder as the stage loads it, and seeded denormalized latents."""
    from services.diffusion_decode import load_diffusion_decoder

    case = {
        "model": load_diffusion_decoder(tiny_25_model_dir, torch.float32, torch.device("cpu")),
        "latents": torch.randn(LATENT_SHAPE, generator=torch.Generator().manual_seed(21)),
    }
    case["whole"], _ = staged(case, DecodePlan(False, None, 1, 16, 8))
    return case


def staged(case: dict, plan: DecodePlan) -> tuple[torch.Tensor, list[int]]:
    """Our decode's frames `[n, H, W, 3]` and how many each yield held."""
    from services.diffusion_decode import diffusion_decode_frames

    pieces = list(diffusion_decode_frames(case["model"], case["latents"], plan, torch.Generator().manual_seed(5)))
    return torch.cat(pieces).permute(0, 2, 3, 1), [piece.shape[0] for piece in pieces]


def test_whole_decode_equals_diffusers_diffusion_decode_pipeline(decoder_case: dict, tiny_25_model_dir: Path):
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        LTX2VideoDiffusionDecodePipeline,
        LTX2VideoDiffusionDecoderModel,
    )

    decoder = LTX2VideoDiffusionDecoderModel.from_pretrained(tiny_25_model_dir, subfolder="diffusion_decoder").eval()
    pipe = LTX2VideoDiffusionDecodePipeline(diffusion_decoder=decoder, scheduler=FlowMatchEulerDiscreteScheduler())
    reference = pipe(
        decoder_case["latents"], generator=torch.Generator().manual_seed(5), output_type="pt", denormalize=False
    ).frames[0]  # [F, 3, H, W] in [0, 1]
    ours = decoder_case["whole"]
    assert ours.shape == (9, 32, 32, 3)  # (3 - 1) * 4 + 1 frames
    assert (ours - reference.permute(0, 2, 3, 1)).abs().max().item() <= PARITY_TOLERANCE


# Temporal pieces of 2 latent frames sharing 1 (2 pieces over 3 latent frames), alone and with spatial
# tiles of 24 px overlapping by 8 (2 x 2 tiles over 32 px).
TILED_PLANS = {
    "pieces": (DecodePlan(False, 2, 1, 24, 8), 2),
    "pieces+tiled": (DecodePlan(True, 2, 1, 24, 8), 2),
}


@pytest.mark.parametrize("plan_name", tuple(TILED_PLANS))
def test_tiled_decode_equals_the_whole_decode_within_half_a_level(decoder_case: dict, plan_name: str):
    from services.diffusion_decode import Axis, plan_tiles

    plan, pieces = TILED_PLANS[plan_name]
    whole = decoder_case["whole"]
    tiled, counts = staged(decoder_case, plan)
    assert tiled.shape == whole.shape == (9, 32, 32, 3)
    assert len(counts) == pieces
    axes = (Axis(5, 2, True, 0), Axis(8, 4, False, 0), Axis(8, 4, False, 0))
    spans = plan_tiles(decoder_case["model"], axes, plan)
    assert len(spans[1]) == len(spans[2]) == (2 if plan.tiling else 1)  # the tiles really are decoded apart
    assert (tiled - whole).abs().max().item() <= HALF_A_LEVEL


# ---------------------------------------------------------------------------------------------
# `--decoder`: a tiny 2.5 clip decoded by its diffusion decoder, and the flag's bad uses.
# ---------------------------------------------------------------------------------------------


# A 17-frame clip decoded in temporal pieces of 2 latent frames (3 latent frames: two pieces sharing one); the
# decoder yields its frames as its tiles end (3, 7, 11, 17 so far), and the worker is killed after 7 of them.
KILLED_DECODE = ["--width", "64", "--height", "64", "--num-frames", "17", "--vae-chunk-frames", "2"]
KILLED_AT = "video_decode:decode video (temporal pieces of 2):7"


def wait_for_pause(path: Path, process: subprocess.Popen, timeout_s: float = 240) -> Path:
    """`path` once the paused worker wrote it; fails at once if the command ended first (nothing paused)."""
    deadline = time.monotonic() + timeout_s
    while not path.exists() or not path.read_text().strip():
        if process.poll() is not None:
            raise AssertionError(f"the command ended ({process.returncode}) before a worker paused: {path}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.1)
    return path


def test_a_2_5_clip_killed_mid_decode_retries_and_gives_the_frames_of_an_undisturbed_decode(
    ltx2_env: dict, tmp_path: Path, tiny_25_model_dir: Path
):
    """`--decoder diffusion` end to end, its decode worker SIGKILLed after its first piece: the policy retries,
    the MP4 has exactly the asked frames, the sidecar names the decoder, and the published last frame is the
    one a decode of the job's latents in this process gives (the decoder's noise comes from the seed, so a
    retried decode repeats itself; within one level: another process's CPU kernels)."""
    from services.diffusion_decode import diffusion_decode_frames, load_diffusion_decoder
    from services.video_decode import to_uint8

    faults = tmp_path / "faults"
    faults.mkdir()
    env = {**ltx2_env, "LTX2_FAULT_PAUSE": KILLED_AT, "LTX2_FAULT_DIR": str(faults)}
    request = ["generate", "--prompt", "a lighthouse", "--seed", "4", "--model", TINY_REPO_IDS["2.5"], "--quiet"]
    command = [sys.executable, "-m", "orchestrator.cli", *request, *KILLED_DECODE, "--decoder", "diffusion"]
    process = subprocess.Popen(command, env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        paused = int(wait_for_pause(faults / "paused-video_decode.pid", process).read_text())
        os.kill(paused, signal.SIGKILL)
        stdout, stderr = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, stderr.decode()[-3000:]
    video = Path(stdout.decode().strip())
    assert probe_mp4(video)["frames"] == 17
    sidecar = json.loads(video.with_suffix(".json").read_text())
    assert sidecar["decoder"] == sidecar["spec"]["decoder"] == "diffusion"
    (job,) = (tmp_path / "state" / "jobs").iterdir()
    first, second = json.loads((job / "job.json").read_text())["stages"]["video_decode"]["attempts"]
    assert first["pid"] == paused and first["result"] != "ok" and second["result"] == "ok"
    assert first["plan"] == second["plan"] and first["plan"]["decode"]["chunk_latent_frames"] == 2

    decoder = load_diffusion_decoder(tiny_25_model_dir, torch.float32, torch.device("cpu"))
    latents = read_latents(job / LATENTS_FILE)[0]["video"]
    plan = DecodePlan.from_dict(first["plan"]["decode"])
    frames = list(diffusion_decode_frames(decoder, latents, plan, torch.Generator().manual_seed(4)))
    assert sum(piece.shape[0] for piece in frames) == 17
    expected = to_uint8(frames[-1][-1:])[0].astype(int)
    published = np.asarray(Image.open(job / LAST_FRAME_FILE).convert("RGB")).astype(int)
    assert published.shape == expected.shape and np.abs(published - expected).max() <= 1


@pytest.mark.parametrize(
    ("family", "decoder", "message"),
    [
        ("2.0", "diffusion", "--decoder diffusion needs the checkpoint's diffusion video decoder"),
        ("2.5", "convolution", "--decoder"),
    ],
)
def test_bad_decoder_flags_exit_2_naming_the_flag_and_what_is_allowed(
    ltx2_env: dict, tmp_path: Path, family: str, decoder: str, message: str
):
    result = run_ltx2(["generate", "--prompt", "x", "--model", TINY_REPO_IDS[family], "--decoder", decoder], ltx2_env)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "vae" in result.stderr and "diffusion" in result.stderr
    assert not (tmp_path / "state" / "jobs").exists() or not any((tmp_path / "state" / "jobs").iterdir())


def test_tiles_without_their_halos_differ_from_the_whole_decode(decoder_case: dict):
    """The control of the test above: the halo is what makes the tiles equal (diffusers' seams-only tiles
    differ by more than half a level at their borders)."""
    from services.diffusion_decode import diffusion_decode_frames

    plan, _ = TILED_PLANS["pieces"]
    pieces = diffusion_decode_frames(
        decoder_case["model"], decoder_case["latents"], plan, torch.Generator().manual_seed(5), exact_tiles=False
    )
    seams = torch.cat(list(pieces)).permute(0, 2, 3, 1)
    assert seams.shape == decoder_case["whole"].shape
    assert (seams - decoder_case["whole"]).abs().max().item() > HALF_A_LEVEL


# ---------------------------------------------------------------------------------------------
# Brick order (services/brick_order.py): the same attention with each block of 128 tokens a 4x4x8 brick.
# ---------------------------------------------------------------------------------------------

# (T, H, W), kernel: whole bricks, padding on every axis, kernels clipped to the grid, and the decoder's
# stage-5 kernel on a grid whose windows shift at every border.
BRICK_GRIDS = [
    ((8, 16, 16), (3, 5, 5)),
    ((5, 7, 9), (3, 3, 3)),
    ((9, 16, 16), (11, 11, 11)),
    ((17, 12, 40), (3, 7, 7)),
    ((3, 4, 4), (3, 7, 7)),
    ((6, 10, 13), (5, 3, 9)),
]


def brick_block_matrices(sizes: tuple[int, int, int], kernel: tuple[int, int, int]) -> dict[str, torch.Tensor]:
    """As block_matrices, in brick order: the dense rule over the padded grid's brick-order indices."""
    from services.brick_order import BrickGrid, brick_block_lists, brick_mask_mod

    bricks = BrickGrid(Neighborhood.of(sizes, kernel))
    index = torch.arange(bricks.tokens)
    dense = brick_mask_mod(bricks)(None, None, index[:, None], index[None, :])
    real = torch.stack([axis < size for axis, size in zip(bricks.coordinates(index), sizes, strict=True)]).all(0)
    blocks = bricks.tokens // 128
    allowed = (dense & real[None, :]).reshape(blocks, 128, blocks, 128)
    lists = brick_block_lists(bricks)
    listed, full = listed_and_full(lists, blocks)
    # Padded queries' rows are dropped: what a block needs is what its real queries need.
    needed = (allowed & real.reshape(blocks, 128)[:, :, None, None]).any(dim=(1, 3))
    everything = (dense & real[None, :]) | ~real[:, None]  # a full block: every real query sees every key
    return {
        "needed": needed,
        "all": everything.reshape(blocks, 128, blocks, 128).all(dim=(1, 3)) & real.reshape(blocks, 128).all(dim=1),
        "listed": listed,
        "full": full,
    }


@pytest.mark.parametrize(("sizes", "kernel"), BRICK_GRIDS)
def test_brick_lists_hold_every_key_block_the_dense_mask_needs_and_no_other(
    sizes: tuple[int, int, int], kernel: tuple[int, int, int]
):
    m = brick_block_matrices(sizes, kernel)
    assert not (m["needed"] & ~m["listed"]).any()
    assert not (m["listed"] & ~m["needed"]).any()
    assert not (m["full"] & ~m["all"]).any()


def test_brick_order_is_a_reversible_permutation_matching_its_coordinates():
    from services.brick_order import BrickGrid, from_bricks, to_bricks

    bricks = BrickGrid(Neighborhood.of((6, 10, 13), (3, 3, 3)))
    frames, height, width = bricks.grid.sizes
    t, h, w = torch.meshgrid(torch.arange(frames), torch.arange(height), torch.arange(width), indexing="ij")
    raster = torch.stack((t, h, w), dim=-1).reshape(1, 1, -1, 3).float() + 1  # padding comes out as zeros
    ordered = to_bricks(raster, bricks)[0, 0]
    expected = torch.stack(bricks.coordinates(torch.arange(bricks.tokens)), dim=-1).float() + 1
    real = (expected - 1 < torch.tensor(bricks.grid.sizes)).all(dim=-1)
    assert torch.equal(ordered[real], expected[real]) and not ordered[~real].any()
    assert torch.equal(from_bricks(to_bricks(raster, bricks), bricks), raster)


def test_attention_in_brick_order_equals_dense_masked_attention():
    from services.brick_order import BrickGrid, brick_block_lists, brick_mask_mod, from_bricks, to_bricks
    from services.neighborhood_attention import block_sparse_attention, block_sparse_passes

    grid, (query, key, value), dense = dense_window_case()
    bricks = BrickGrid(grid)
    passes = block_sparse_passes(brick_block_lists(bricks), brick_mask_mod(bricks), bricks.tokens)
    ordered = block_sparse_attention(*(to_bricks(x, bricks) for x in (query, key, value)), passes)
    assert (from_bricks(ordered, bricks) - dense).abs().max().item() <= PARITY_TOLERANCE


def test_bricks_read_fewer_key_blocks_than_raster_rows_at_the_decoders_last_stage():
    """The work a query block does, in key blocks read, on a slice of a 1080p clip's stage-5 grid (480 tokens
    wide, kernel 11): a raster block, one row of 128 tokens, reads two or three blocks of each of its windows'
    11 x 11 key rows (~271); a brick reads the few bricks a side of one box (~38)."""
    from services.brick_order import BrickGrid, brick_block_lists, mean_key_blocks

    grid = Neighborhood.of((12, 32, 480), (11, 11, 11))
    raster = mean_key_blocks(neighborhood_block_lists(grid))
    bricks = mean_key_blocks(brick_block_lists(BrickGrid(grid)))
    assert raster > 250 and bricks < raster / 5, (raster, bricks)


def test_the_decoder_in_brick_order_decodes_what_it_decodes_in_raster_order(decoder_case: dict):
    """The whole tiny 2.5 decode with every neighbourhood attention in brick order: the raster decode's frames
    (the same keys each query sees, summed in another order), and an order the processor does not know refused."""
    from services.neighborhood_attention import use_block_sparse_attention

    use_block_sparse_attention(decoder_case["model"], "bricks")
    try:
        bricks, _ = staged(decoder_case, DecodePlan(False, None, 1, 16, 8))
    finally:
        use_block_sparse_attention(decoder_case["model"])
    assert (bricks - decoder_case["whole"]).abs().max().item() <= PARITY_TOLERANCE
    with pytest.raises(ValueError, match="one of raster, bricks"):
        use_block_sparse_attention(decoder_case["model"], "columns")
