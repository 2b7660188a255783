"""video_decode -> video.mp4: latents through the video VAE, streamed into H.264, audio muxed (an
extension's joined.mp4 beside it: services/joined_video.py).

Loads only the video VAE, or with `--decoder diffusion` only LTX-2.5's diffusion video decoder
(services/diffusion_decode.py, the same plans). The decode plan (protocol.plans.DecodePlan, chosen by the orchestrator)
says whether to tile spatially and whether to decode in temporal pieces; either way frames go to
the encoder as soon as they are final, converted on the device to the encoder's YUV 4:2:0
(services.color), so no float copy of the whole clip is ever made on the host. The file is
published only when it holds exactly the requested number of frames. A group process
(stage-major) loads the VAE once and decodes each of its jobs with it, and encodes on a
background thread (services.background_encode) so clip N+1 decodes while clip N is encoded.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch

# Imported at module level on purpose: a prestarted worker pays this before READY.
from diffusers import AutoencoderKLLTX2Video  # noqa: F401

from protocol.errors import InvalidInput
from protocol.extension import joined_frames
from protocol.files import (
    AUDIO_FILE,
    FIRST_FRAME_FILE,
    JOINED_FILE,
    LAST_FRAME_FILE,
    LATENTS_FILE,
    VIDEO_FILE,
    Stage,
)
from protocol.job_record import ResolvedExtension
from protocol.plans import DecodePlan, parallel_piece_ranges, piece_ranges
from protocol.spec_rules import DIFFUSION_DECODER_NAME
from services import compile_packages, context_parallel, model_loading
from services.background_encode import BackgroundEncoder
from services.color import rgb_to_yuv420
from services.diffusion_decode import diffusion_decode_frames, load_diffusion_decoder
from services.joined_video import open_joined
from services.latents import read_latents
from services.media import DEFAULT_PRESET, Mp4Writer, read_wav, write_png
from services.runtime import WorkerContext, run_worker

# Frames converted to YUV and copied to the host at a time: bounds the conversion's temporaries
# on the device while keeping the device-to-host transfers large (25 MB at 1080p).
FRAMES_PER_WRITE = 8


def configure_vae(vae: Any, plan: DecodePlan) -> None:
    """Apply the plan's spatial tiling; temporal pieces are cut here, not by diffusers."""
    vae.use_framewise_decoding = False
    vae.use_tiling = False  # a VAE kept from an earlier job of a group may have been tiled
    if plan.tiling:
        stride = plan.tile_size - plan.tile_overlap
        vae.enable_tiling(
            tile_sample_min_height=plan.tile_size,
            tile_sample_min_width=plan.tile_size,
            tile_sample_stride_height=stride,
            tile_sample_stride_width=stride,
        )


def decode_frames(
    vae: Any, latents: torch.Tensor, plan: DecodePlan, ranks: int = 1, rank: int = 0
) -> Iterator[torch.Tensor]:
    """Yield decoded frames `[n, 3, H, W]` in [0, 1] on the VAE's device, in order.

    `latents` are denormalized `[1, C, F, h, w]` (as LTX2Pipeline returns with output_type="latent").
    With temporal pieces, neighbours overlap by `plan.overlap_latent_frames` latent frames and
    the shared pixel frames are cross-faded linearly; a piece starting at latent frame `a` covers
    pixel frames `ratio*a` onwards, because the decoder turns its first latent into one frame.

    Over `ranks` processes (a context-parallel decode, issue 30), piece i is decoded by rank i mod
    `ranks` and sent to rank 0, which cross-fades and yields as one process would; the other ranks
    yield nothing (run them to the end: that is their work).
    """
    ranges = parallel_piece_ranges(latents.shape[2], plan, ranks) if ranks > 1 else None
    ranges = ranges or piece_ranges(latents.shape[2], plan.chunk_latent_frames, plan.overlap_latent_frames)
    pieces = decoded_pieces(vae, latents, ranges, ranks, rank)
    if rank == 0:
        yield from crossfaded(pieces, ranges, vae.temporal_compression_ratio)
    else:
        for _ in pieces:
            pass


def decode_piece(vae: Any, latents: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Latent frames [start, end) through the VAE: `[n, 3, H, W]` float frames in [0, 1]."""
    timestep = None
    if vae.config.timestep_conditioning:
        # The pipeline's default decode_timestep is 0: no decode noise, but the VAE wants the value.
        timestep = torch.zeros(latents.shape[0], device=latents.device, dtype=latents.dtype)
    with torch.no_grad():
        video = vae.decode(latents[:, :, start:end].to(vae.dtype), timestep, return_dict=False)[0]
    # Same order as diffusers' postprocess: denormalize in the VAE's dtype, then widen.
    return (video[0].permute(1, 0, 2, 3) * 0.5 + 0.5).clamp(0, 1).float()


def decoded_pieces(
    vae: Any, latents: torch.Tensor, ranges: list[tuple[int, int]], ranks: int, rank: int
) -> Iterator[torch.Tensor]:
    """Each piece's frames in order on rank 0 (its own decoded here, the others received from their
    ranks); a rank past 0 decodes its pieces and sends them, yielding nothing."""
    for index, (start, end) in enumerate(ranges):
        owner = index % ranks
        if owner == rank:
            frames = decode_piece(vae, latents, start, end)
            if rank == 0:
                yield frames
            else:
                context_parallel.send_to_first(frames)
        elif rank == 0:
            yield context_parallel.receive_from(owner, latents.device)


def crossfaded(pieces: Iterator[torch.Tensor], ranges: list[tuple[int, int]], ratio: int) -> Iterator[torch.Tensor]:
    """The pieces' frames as one clip: frames two pieces share are cross-faded linearly from the
    earlier piece into the later; each yield is final."""
    pending: torch.Tensor | None = None
    for index, piece in enumerate(pieces):
        frames = piece
        if pending is not None:
            shared = pending.shape[0]
            weight = torch.arange(1, shared + 1, device=frames.device, dtype=frames.dtype) / (shared + 1)
            weight = weight.view(-1, 1, 1, 1)
            frames[:shared] = pending * (1 - weight) + frames[:shared] * weight
        if index + 1 < len(ranges):
            shared_next = ratio * (ranges[index][1] - 1 - ranges[index + 1][0]) + 1
            pending = frames[-shared_next:]
            frames = frames[:-shared_next]
        yield frames


def load_decoder(ctx: WorkerContext, dtype: torch.dtype, device: torch.device) -> Any:
    """The spec's video decoder (`--decoder`), loaded once per process: the video VAE, or LTX-2.5's
    diffusion video decoder (services/diffusion_decode.py)."""
    if ctx.spec.decoder == DIFFUSION_DECODER_NAME:
        if "diffusion_decoder" not in ctx.shared:
            ctx.progress("load diffusion video decoder")
            ctx.shared["diffusion_decoder"] = load_diffusion_decoder(ctx.model_root, dtype, device)
        return ctx.shared["diffusion_decoder"]
    if "video_vae" not in ctx.shared:
        ctx.progress("load video VAE")
        ctx.shared["video_vae"] = model_loading.load_video_vae(ctx.model_root, dtype, device)
    return ctx.shared["video_vae"]


def compile_decoder(ctx: WorkerContext, vae: Any, latents: torch.Tensor) -> None:
    """The plan's compiled decoder (`--compile-decoder`), once per process: a group's members share the plan
    and the VAE (model_loading.compile_vae_decoder)."""
    if ctx.plan.get("compile") != "decoder" or ctx.shared.get("video_vae_compiled"):
        return
    deterministic = bool(ctx.plan.get("deterministic"))
    ctx.progress(f"compile the VAE decoder (at its first decode{', deterministic' if deterministic else ''})")
    # Each rank of a context-parallel decode its own package: its pieces are not rank 0's.
    shape = {"latents": list(latents.shape), "rank": context_parallel.group_rank()}
    package = compile_packages.package_key(vae, ctx.plan, shape)
    model_loading.compile_vae_decoder(vae, ctx.request.compile_cache_dir, deterministic, package)
    ctx.shared["video_vae_compiled"] = True


def frames_of(
    ctx: WorkerContext, decoder: Any, latents: torch.Tensor, plan: DecodePlan, ranks: int = 1, rank: int = 0
) -> Iterator[torch.Tensor]:
    """Decoded frames `[n, 3, H, W]` in [0, 1], in order, from the spec's decoder. The diffusion decoder
    denoises: its noise comes from the spec's seed, so a decode is repeatable. Over `ranks` processes the
    VAE's pieces are shared (decode_frames); the diffusion decoder runs on rank 0 alone (its tiles are not
    spread yet), the others yield nothing."""
    if ctx.spec.decoder == DIFFUSION_DECODER_NAME:
        if rank > 0:
            return iter(())
        generator = torch.Generator(latents.device).manual_seed(ctx.spec.seed)
        return diffusion_decode_frames(decoder, latents, plan, generator)
    configure_vae(decoder, plan)
    if ctx.shared.get("video_vae_compiled"):  # the layout the compiled decoder was made for (compile_vae_decoder)
        latents = latents.to(memory_format=torch.channels_last_3d)
    return decode_frames(decoder, latents, plan, ranks, rank)


def crop_frames(frames: torch.Tensor, box: tuple[int, int, int, int]) -> torch.Tensor:
    """`[n, 3, H, W]` frames cut to the spec's crop box (JobSpec.crop_box: left, top, width, height), a view
    on the device: the video and the PNGs hold the delivered size, never the rendered margin."""
    left, top, width, height = box
    return frames[:, :, top : top + height, left : left + width]


def to_uint8(frames: torch.Tensor) -> Any:
    """`[n, 3, H, W]` floats in [0, 1] -> `[n, H, W, 3]` uint8 numpy, converted on the device."""
    return (frames * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def run(ctx: WorkerContext) -> Future[list[str]]:
    """The stage: latents file + audio.wav -> MP4 with exactly `num_frames` frames.

    Decodes here and returns while the clip is still being encoded on the background thread, so
    a group process decodes its next clip meanwhile; the runtime reports the job done when the
    returned future is (the MP4 and both PNGs published).
    """
    device = model_loading.resolve_device()
    # A decode over N processes (issue 30): every rank joins its group before the VAE is loaded (on a GPU
    # its device is picked there), decodes its share of the pieces, and rank 0 alone writes the files.
    context_parallel.join_for_plan(ctx.plan, device)
    ranks, rank = context_parallel.plan_ranks(ctx.plan), context_parallel.group_rank()
    dtype = model_loading.resolve_dtype(ctx.spec.dtype, device)
    plan = DecodePlan.from_dict(ctx.plan["decode"])
    tensors, _ = read_latents(ctx.job_dir / LATENTS_FILE, ctx.spec.latents_digest())
    latents = tensors["video"]
    if latents.ndim != 5 or latents.shape[0] != 1:
        raise InvalidInput(f"video latents must be [1, C, F, h, w], got {list(latents.shape)}")
    decoder = load_decoder(ctx, dtype, device)
    compile_decoder(ctx, decoder, latents)
    expected = ctx.spec.num_frames
    if (latents.shape[2] - 1) * decoder.temporal_compression_ratio + 1 != expected:
        raise InvalidInput(f"latents hold {latents.shape[2]} latent frames, which cannot decode to {expected} frames")
    # Read on every rank, though rank 0 alone muxes it: a clip one rank refuses, every rank refuses, so a
    # group's ranks never disagree on which clip they are exchanging pieces of.
    waveform, sample_rate = read_wav(ctx.job_dir / AUDIO_FILE)
    if rank > 0:  # its pieces, sent to rank 0; nothing of its own to write
        for _ in frames_of(ctx, decoder, latents.to(device), plan, ranks, rank):
            pass
        context_parallel.piece_exchange_done()
        done: Future[list[str]] = Future()
        done.set_result([])
        return done
    encoder = ctx.shared.setdefault("encoder", BackgroundEncoder())
    stills: dict[str, np.ndarray] = {}
    box = ctx.spec.crop_box
    clip = ClipFiles(ctx.job_dir, box[2], box[3], ctx.spec.fps, expected, clip_tags(ctx), ctx.request.extension)
    preset = ctx.plan.get("x264_preset", DEFAULT_PRESET)
    threads = int(ctx.plan.get("x264_threads", 0))  # 0: x264 sizes its pool from the host's cores
    feed = encoder.start(functools.partial(encode_clip, clip, preset, threads, waveform, sample_rate))
    shared = ranks > 1 and ctx.spec.decoder != DIFFUSION_DECODER_NAME
    label = plan.label + (f", over {ranks} processes" if shared else "")
    ctx.progress(f"decode video ({label})", 0, expected)
    try:
        decoded = 0
        for decoded_frames in frames_of(ctx, decoder, latents.to(device), plan, ranks):
            frames = crop_frames(decoded_frames, box)
            for start in range(0, frames.shape[0], FRAMES_PER_WRITE):
                feed.put(rgb_to_yuv420(frames[start : start + FRAMES_PER_WRITE]).cpu().numpy())
            decoded += frames.shape[0]
            if FIRST_FRAME_FILE not in stills:
                stills[FIRST_FRAME_FILE] = to_uint8(frames[:1])[0]
            stills[LAST_FRAME_FILE] = to_uint8(frames[-1:])[0]
            ctx.progress(f"decode video ({label})", decoded, expected)
        # Here rather than on the encode thread, which is the busier of the two.
        for name, rgb in stills.items():
            write_png(ctx.job_dir / name, rgb, clip.tags)
    except BaseException:
        feed.abort()
        raise
    if ranks > 1:
        context_parallel.piece_exchange_done()
    if ctx.shared.get("video_vae_compiled"):
        compiled_decode_done()
    ctx.progress("encode H.264")
    return feed.close()


def compiled_decode_done() -> str:
    """After a compiled decode: keep what Dynamo compiled for a later process (LTX2_COMPILE_PACKAGES=1) and say
    what the compile caches served (tests read the line; bench/vae_decode_bench.py records the returned one)."""
    if compile_packages.wanted() and compile_packages.available():
        compile_packages.save()
    report = compile_packages.cache_report()
    logging.getLogger("ltx2.worker").info(report)
    return report


@dataclasses.dataclass(frozen=True)
class ClipFiles:
    """Where and what the encode thread writes for one job."""

    job_dir: Path
    width: int
    height: int
    fps: float
    num_frames: int
    #: what made the clip, written into the MP4 and the PNGs (clip_tags)
    tags: dict[str, str] = dataclasses.field(default_factory=dict)
    #: the video it extends: joined.mp4 is written too (services/joined_video.py)
    extension: ResolvedExtension | None = None


def clip_tags(ctx: WorkerContext) -> dict[str, str]:
    """What made the clip, inside its files (as image tools keep theirs): the prompt as the title, and the
    request as JSON in `comment` (seed, model, sizes, guidance, LoRAs; the conditioning image and the
    keyframes by file name; not the output's file stem) with the request digest. Nothing here differs
    between two renders of one request, so the files stay byte-identical."""
    request = {k: v for k, v in ctx.spec.to_dict().items() if k not in ("name", "drop_caches")}
    if request.get("image"):
        request["image"] = Path(request["image"]).name
    if request.get("extend"):  # a file by its name, as the image (a job by its id)
        request["extend"] = Path(request["extend"]).name
    if request.get("conditions"):  # by file name, as the image; none: left out, as before keyframes existed
        request["conditions"] = [{**entry, "source": Path(entry["source"]).name} for entry in request["conditions"]]
    else:
        request.pop("conditions", None)
    if request.get("reference_video"):  # by file name too; none: left out, as before control videos existed
        reference = request["reference_video"]
        request["reference_video"] = {**reference, "source": Path(reference["source"]).name}
    else:
        request.pop("reference_video", None)
        request.pop("reference_downscale", None)
    if request.get("audio"):  # the soundtrack by file name; none: left out, as before audio-to-video existed
        request["audio"] = Path(request["audio"]).name
    else:
        request.pop("audio", None)
    request["request_digest"] = ctx.request.request_digest
    return {"title": ctx.spec.prompt, "comment": json.dumps(request, sort_keys=True, ensure_ascii=False)}


def encode_clip(
    clip: ClipFiles, preset: str, threads: int, waveform: np.ndarray, sample_rate: int, pieces: Iterator[np.ndarray]
) -> list[str]:
    """On the encode thread: the audio track, then the YUV pieces as they come; the stage's outputs.

    The decoding side writes the first/last-frame PNGs before it closes the feed, so they exist
    by the time `pieces` ends.
    """
    path = clip.job_dir / VIDEO_FILE
    joined = None
    if clip.extension is not None:
        size = (clip.width, clip.height, clip.fps, clip.num_frames)
        joined = open_joined(clip.job_dir, clip.extension, size, (preset, threads), clip.tags, (waveform, sample_rate))
    try:
        with Mp4Writer(path, clip.width, clip.height, clip.fps, preset=preset, threads=threads, tags=clip.tags) as out:
            out.add_audio(waveform, sample_rate, clip.num_frames)
            for piece in pieces:
                out.write(piece)
                if joined is not None:
                    joined.write(piece)
            out.close(clip.num_frames)
        if joined is not None:
            extension = clip.extension
            joined.close(joined_frames(extension.frames, clip.num_frames, extension.overlap))
    except BaseException:
        if joined is not None:
            joined.abort()
        raise
    return [VIDEO_FILE, FIRST_FRAME_FILE, LAST_FRAME_FILE, *([JOINED_FILE] if joined is not None else [])]


def main(argv: list[str] | None = None) -> NoReturn:
    """Entry point of `python -m services.video_decode` and of the fork server's children."""
    run_worker(Stage.VIDEO_DECODE, run, argv)


if __name__ == "__main__":
    main()
