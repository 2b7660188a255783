"""Retake (`ltx2 retake JOB_ID --from-frame A --to-frame B`): frames A..B of a finished clip regenerated, every
other latent frame held at the source's.

The source is rendered once in this process (real worker processes forked from the session's fork server);
`ltx2 retake` runs once as a user runs it. The tiny VAE packs 4 frames into a latent frame, so a 17-frame clip
has 5 latent frames (frame 0; 1-4; 5-8; 9-12; 13-16) and frames 5..8 are latent frame 2 alone.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ltx2_environment, probe_mp4, render_in_process, run_ltx2

from config.settings import Settings, load_settings
from orchestrator.placement.fork_client import ForkServer
from orchestrator.run.jobdir import JobDir
from orchestrator.run.jobspec import build_spec
from protocol.files import LATENTS_FILE, RETAKE_ENCODED_FILE, RETAKE_SOURCE_VIDEO_FILE
from protocol.retake import RETAKE_AUDIO_NOTE, RETAKE_NO_AUDIO_NOTE, audio_latent_span, latent_span
from protocol.spec_rules import SpecError
from services.latents import read_latents

CHEAP = {"width": 64, "height": 64, "num_frames": 17, "steps": 2, "schedule": "default", "dtype": "float32"}
CHEAP_FLAGS = ["--steps", "2", "--schedule", "default", "--dtype", "float32", "--quiet"]
FIRST, LAST = 5, 8  # latent frame 2 of the tiny VAE's 5
# The tiny audio VAE's mel frames per second (16 kHz / hop 160): 25 audio latents a second.
MEL_PER_SECOND = 100.0


def settings_for(root: Path) -> Settings:
    return load_settings(
        environ={"LTX2_STATE_DIR": str(root / "state"), "LTX2_OUTPUT_DIR": str(root / "outputs"), "HOME": str(root)}
    )


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("retake")


@pytest.fixture(scope="module")
def source(root: Path, tiny_model_dir: Path, fork_server: ForkServer) -> JobDir:
    """A finished 17-frame tiny clip to retake, rendered as `ltx2 generate` would."""
    settings = settings_for(root)
    built = build_spec({"prompt": "a red ball bounces", "model": str(tiny_model_dir), "seed": 3, **CHEAP}, settings)
    job = JobDir.create(settings.jobs_dir, built.spec, built.model, identity=built.identity, owner="generate")
    render_in_process(job, settings, fork_server)
    return JobDir.load(job.path)


@pytest.fixture(scope="module")
def retaken(root: Path, source: JobDir, hf_home: Path) -> dict[str, object]:
    """`ltx2 retake <source> --from-frame 5 --to-frame 8`, as a user runs it."""
    args = ["retake", source.id, "--prompt", "the ball turns blue", "--from-frame", str(FIRST), "--to-frame", str(LAST)]
    result = run_ltx2([*args, "--seed", "4", *CHEAP_FLAGS], ltx2_environment(hf_home, root))
    assert result.returncode == 0, result.stderr
    video = Path(result.stdout.strip())
    sidecar = json.loads(video.with_suffix(".json").read_text())
    return {"video": video, "sidecar": sidecar, "job": JobDir.load(Path(sidecar["job_dir"]))}


def test_retake_holds_the_latent_frames_outside_the_range_bit_for_bit_and_regenerates_those_inside(
    retaken: dict, source: JobDir
):
    before, _ = read_latents(source.path / LATENTS_FILE)
    after, _ = read_latents(retaken["job"].path / LATENTS_FILE)
    start, stop = latent_span(FIRST, LAST, 4)
    assert (start, stop) == (2, 3)
    held = [index for index in range(before["video"].shape[2]) if not start <= index < stop]
    assert torch.equal(after["video"][:, :, held], before["video"][:, :, held])
    assert not torch.allclose(after["video"][:, :, start:stop], before["video"][:, :, start:stop])
    # The audio: the source's latents outside the range's span, new ones inside it.
    first, last = audio_latent_span(FIRST, LAST, 24.0, before["audio"].shape[2], MEL_PER_SECOND)
    assert torch.equal(after["audio"][:, :, :first], before["audio"][:, :, :first])
    assert torch.equal(after["audio"][:, :, last:], before["audio"][:, :, last:])
    assert not torch.allclose(after["audio"][:, :, first:last], before["audio"][:, :, first:last])


def test_retake_publishes_one_mp4_of_the_sources_frame_count_with_the_range_in_its_sidecar(
    retaken: dict, source: JobDir
):
    probe = probe_mp4(retaken["video"])
    assert (probe["frames"], probe["width"], probe["height"]) == (17, 64, 64)
    assert probe["frames"] == probe_mp4(Path(source.record.output))["frames"]
    summary = retaken["sidecar"]["retake"]
    assert summary["source_job"] == source.id
    assert (summary["from_frame"], summary["to_frame"], summary["latent_frames"]) == (FIRST, LAST, [2, 2])
    assert summary["audio"] == RETAKE_AUDIO_NOTE


def test_retake_denoises_the_new_audio_beside_the_sources_held_audio_not_spliced_into_it(source: JobDir):
    """In the loop itself, before anything is written back (ltx-pipelines' retake holds the audio outside the
    window with TemporalRegionMask): with guidance on the audio, the audio latents outside the range's span end
    where the source's are (normalized and denormalized again: float32 rounding), those inside are new, and the
    write-back puts the source's own values there bit for bit. A source without audio gets a whole new track."""
    from services.retake_pipeline import LTX2RetakePipeline, RetakeRegion
    from services.tiny_model import build_components

    parts = build_components()
    names = ("scheduler", "vae", "audio_vae", "text_encoder", "tokenizer", "connectors", "transformer", "vocoder")
    pipe = LTX2RetakePipeline(**{name: parts[name] for name in names})
    pipe.set_progress_bar_config(disable=True)
    tensors, _ = read_latents(source.path / LATENTS_FILE)
    start, stop = latent_span(FIRST, LAST, 4)
    region = RetakeRegion(tensors["video"], tensors["audio"], start, stop, FIRST, LAST)
    first, last = audio_latent_span(FIRST, LAST, 24.0, tensors["audio"].shape[2], MEL_PER_SECOND)
    assert 0 < first < last < tensors["audio"].shape[2]  # new audio between held audio on both sides
    guidance = {"guidance_scale": 3.0, "audio_guidance_scale": 7.0, "audio_guidance_rescale": 0.7}
    call = {"prompt": "the ball turns blue", "width": 64, "height": 64, "num_frames": 17, "frame_rate": 24.0,
            "num_inference_steps": 2, "max_sequence_length": 16, "output_type": "latent", "return_dict": False,
            **guidance}  # fmt: skip
    held = pipe.held_audio(region, 24.0)
    outside = [index for index in range(tensors["audio"].shape[2]) if not first <= index < last]
    assert held.mask(tensors["audio"].shape[2]).nonzero().flatten().tolist() == outside
    with torch.no_grad():
        _, raw = pipe.call_retake(region, held, generator=torch.Generator().manual_seed(4), **call)
        _, whole = pipe(retake=RetakeRegion(tensors["video"], None, start, stop, FIRST, LAST), **call)
    audio = held.written_back(raw)  # what the call returns (its job's latents: the retake test above)
    source_audio = tensors["audio"]
    assert float((raw[:, :, outside] - source_audio[:, :, outside]).abs().max()) <= 1e-5
    assert float((raw[:, :, first:last] - source_audio[:, :, first:last]).abs().amin(dim=(0, 1, 3)).min()) > 1e-3
    assert torch.equal(audio[:, :, outside], source_audio[:, :, outside])
    assert torch.equal(audio[:, :, first:last], raw[:, :, first:last])
    assert whole.shape == source_audio.shape
    assert float((whole[:, :, outside] - source_audio[:, :, outside]).abs().max()) > 1e-2


@pytest.mark.parametrize(
    ("first", "last", "flag", "words"),
    [
        (9, 8, "--from-frame", "after --to-frame 8"),
        (5, 17, "--to-frame", "outside the source's 17 frames"),
        (6, 8, "--from-frame", "nearest allowed: 5 or 9"),
        (5, 10, "--to-frame", "nearest allowed: 8 or 12"),
    ],
)
def test_retake_refuses_a_range_off_the_clip_or_the_latent_grid_naming_the_flag(
    root: Path, source: JobDir, first: int, last: int, flag: str, words: str
):
    request = {"prompt": "p", "retake": source.id, "from_frame": first, "to_frame": last}
    with pytest.raises(SpecError) as caught:
        build_spec(request, settings_for(root))
    assert caught.value.flag == flag and words in str(caught.value)


def test_retake_refuses_an_unknown_or_unfinished_source_naming_retake(root: Path, source: JobDir):
    settings = settings_for(root)
    queued = JobDir.create(settings.jobs_dir, source.record.spec, build_spec({"prompt": "p"}, settings).model)
    unknown = source.id[:-1] + ("1" if source.id.endswith("0") else "0")
    for job_id, words in ((unknown, "no job"), (queued.id, "is queued, not done")):
        with pytest.raises(SpecError) as caught:
            build_spec({"prompt": "p", "retake": job_id, "from_frame": 5, "to_frame": 8}, settings)
        assert caught.value.flag == "--retake" and words in str(caught.value)


def test_retake_digest_covers_the_source_latents_bytes_and_the_range(root: Path, source: JobDir):
    settings = settings_for(root)
    request = {"prompt": "p", "retake": source.id, "from_frame": 5, "to_frame": 8, "seed": 1}
    built = build_spec(request, settings)
    recorded = built.identity.inputs["retake"]
    assert recorded["sha256"] == hashlib.sha256((source.path / LATENTS_FILE).read_bytes()).hexdigest()
    other = build_spec({**request, "from_frame": 9, "to_frame": 12}, settings)
    assert other.identity.digest != built.identity.digest
    # The source enters by its latents' bytes alone, never by the id or path that named it (a second
    # definition of FILE_FIELDS once left `retake` and `extend` in the digested request).
    assert "retake" not in built.identity.inputs["request"]


def ltx_core_video_region(frames: int, ratio: int, first: int, last: int, fps: float) -> list[int]:
    """ltx-core's TemporalRegionMask for video, written out: latent bounds [k, k+1) scaled by the ratio, shifted
    by get_pixel_coords' causal fix (+1 - r, clamped at 0), in seconds, meeting [first/fps, (last+1)/fps)."""
    latents = (frames - 1) // ratio + 1
    bounds = torch.stack([torch.arange(latents), torch.arange(latents) + 1], dim=-1) * ratio
    seconds = (bounds + 1 - ratio).clamp(min=0) / fps
    inside = (seconds[:, 1] > first / fps) & (seconds[:, 0] < (last + 1) / fps)
    return inside.nonzero().flatten().tolist()


def ltx_core_audio_region(count: int, first: int, last: int, fps: float) -> list[int]:
    """The same for audio: latent l spans mel frames [4l + 1 - 4, 4(l+1) + 1 - 4), clamped at 0, hop 1/100 s."""
    mel = torch.stack([torch.arange(count), torch.arange(count) + 1], dim=-1) * 4
    seconds = (mel + 1 - 4).clamp(min=0) / MEL_PER_SECOND
    inside = (seconds[:, 1] > first / fps) & (seconds[:, 0] < (last + 1) / fps)
    return inside.nonzero().flatten().tolist()


@pytest.mark.parametrize(("frames", "ratio"), [(17, 4), (121, 8)])
def test_retake_regions_are_ltx_cores_temporal_region_mask(frames: int, ratio: int):
    starts = [0, *range(1, frames, ratio)]
    ends = [0, *range(ratio, frames, ratio)]
    audio_count = round(frames / 24.0 * MEL_PER_SECOND / 4)
    for first in starts:
        for last in (end for end in ends if end >= first):
            start, stop = latent_span(first, last, ratio)
            assert list(range(start, stop)) == ltx_core_video_region(frames, ratio, first, last, 24.0)
            begin, end = audio_latent_span(first, last, 24.0, audio_count, MEL_PER_SECOND)
            assert list(range(begin, end)) == ltx_core_audio_region(audio_count, first, last, 24.0)


# Retake of a video file: the source's published MP4, encoded by the diffusion stage with the VAEs first.


@pytest.fixture(scope="module")
def retaken_file(root: Path, source: JobDir, tiny_model_dir: Path, fork_server: ForkServer) -> JobDir:
    """`ltx2 retake <the source's MP4> --from-frame 5 --to-frame 8`, run in this process as generate would."""
    settings = settings_for(root)
    request = {"prompt": "the ball turns blue", "model": str(tiny_model_dir), "seed": 4, **CHEAP}
    request = {k: v for k, v in request.items() if k not in ("width", "height", "num_frames")}  # the file's
    request.update(retake=source.record.output, from_frame=FIRST, to_frame=LAST)
    built = build_spec(request, settings)
    job = JobDir.create(
        settings.jobs_dir, built.spec, built.model, identity=built.identity, owner="generate", retake=built.retake
    )
    render_in_process(job, settings, fork_server)
    return JobDir.load(job.path)


def test_retake_of_an_mp4_holds_its_vae_encoding_outside_the_range_bit_for_bit(retaken_file: JobDir):
    encoded, _ = read_latents(retaken_file.path / RETAKE_ENCODED_FILE)
    after, _ = read_latents(retaken_file.path / LATENTS_FILE)
    assert after["video"].shape == encoded["video"].shape
    start, stop = latent_span(FIRST, LAST, 4)
    held = [index for index in range(encoded["video"].shape[2]) if not start <= index < stop]
    assert torch.equal(after["video"][:, :, held], encoded["video"][:, :, held])
    assert not torch.allclose(after["video"][:, :, start:stop], encoded["video"][:, :, start:stop])
    # The file's audio stream, encoded by the audio VAE, is held outside the range's span as a job's is.
    first, last = audio_latent_span(FIRST, LAST, 24.0, after["audio"].shape[2], MEL_PER_SECOND)
    assert after["audio"].shape == encoded["audio"].shape
    assert torch.equal(after["audio"][:, :, :first], encoded["audio"][:, :, :first])
    assert torch.equal(after["audio"][:, :, last:], encoded["audio"][:, :, last:])


def test_retake_of_an_mp4_encodes_its_frames_as_ltx_pipelines_does(retaken_file: JobDir, tiny_model_dir: Path):
    """ltx-pipelines' video_latent_from_file, written out on diffusers' VAE: the decoded frames / 127.5 - 1, the
    posterior's mean (our latents files hold it unnormalized, as diffusers' pipelines return latents)."""
    import av
    from diffusers import AutoencoderKLLTX2Video

    with av.open(str(retaken_file.path / RETAKE_SOURCE_VIDEO_FILE)) as container:
        frames = np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])
    pixels = torch.from_numpy(frames).float().permute(3, 0, 1, 2)[None] / 127.5 - 1.0
    vae = AutoencoderKLLTX2Video.from_pretrained(tiny_model_dir, subfolder="vae", dtype=torch.float32).eval()
    with torch.no_grad():
        expected = vae.encode(pixels).latent_dist.mode()
    encoded, _ = read_latents(retaken_file.path / RETAKE_ENCODED_FILE)
    # 1e-4: the worker's CPU convolutions and this process's run with other thread counts, which CI measured
    # ~1.2e-5 apart; another definition (a sampled latent, other pixel scaling) is off by far more than that.
    assert torch.allclose(encoded["video"], expected, atol=1e-4, rtol=0)
    assert not torch.allclose(encoded["video"], vae.encode(pixels).latent_dist.sample(), atol=1e-2, rtol=0)


def test_retake_of_an_mp4_publishes_its_frame_count_with_the_file_in_its_sidecar(retaken_file: JobDir, source: JobDir):
    output = Path(retaken_file.record.output)
    probe = probe_mp4(output)
    assert (probe["frames"], probe["width"], probe["height"]) == (17, 64, 64)
    summary = json.loads(output.with_suffix(".json").read_text())["retake"]
    source_mp4 = Path(source.record.output)
    assert summary["source_file"] == source_mp4.name and "source_job" not in summary
    assert summary["sha256"] == hashlib.sha256(source_mp4.read_bytes()).hexdigest()
    assert summary["encoded"] == RETAKE_ENCODED_FILE and summary["audio"] == RETAKE_AUDIO_NOTE
    assert retaken_file.record.digest_inputs["retake"]["sha256"] == summary["sha256"]


def write_mp4(path: Path, frames: int, width: int = 64, height: int = 64) -> Path:
    """A small silent H.264 MP4 of grey frames."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=24)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for _ in range(frames):
            frame = av.VideoFrame.from_ndarray(np.full((height, width, 3), 128, np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda folder: folder / "missing.mp4", "does not exist or is not a file"),
        (lambda folder: (folder / "notes.mp4").write_text("not a video") and folder / "notes.mp4", "as an MP4/MOV"),
        (lambda folder: write_mp4(folder / "sixteen.mp4", 16), "has 16 frames; a retake encodes the file as it is"),
        (lambda folder: write_mp4(folder / "wide.mp4", 17, width=80), "crop or scale its width to 64 or 96"),
    ],
    ids=["missing", "not-a-video", "16-frames", "80-wide"],
)
def test_retake_refuses_a_bad_video_file_naming_it_with_exit_2_and_nothing_queued(
    tmp_path: Path, hf_home: Path, make: object, words: str
):
    path = make(tmp_path)
    args = ["retake", str(path), "--prompt", "p", "--from-frame", "5", "--to-frame", "8", "--quiet"]
    result = run_ltx2(args, ltx2_environment(hf_home, tmp_path))
    assert result.returncode == 2 and f"retake: {path}: " in result.stderr and words in result.stderr, result.stderr
    assert result.stdout == ""
    jobs = tmp_path / "state" / "jobs"
    assert not jobs.exists() or not any(jobs.iterdir())


def test_a_short_audio_track_is_padded_with_what_normalizes_to_zero_as_ltx_pipelines_pads(tiny_model_dir: Path):
    """ltx-pipelines' _conform_latent_length pads normalized latents with zeros; ours are unnormalized, so the
    padding is the audio VAE's per-channel mean, which diffusers' normalization turns into zeros."""
    from diffusers import AutoencoderKLLTX2Audio, LTX2Pipeline

    from services.retake_source import conform_audio_length

    stats = AutoencoderKLLTX2Audio.from_pretrained(tiny_model_dir, subfolder="audio_vae")
    short = torch.randn(1, 2, 10, 2, generator=torch.Generator().manual_seed(0))
    padded = conform_audio_length(short, 18, stats.latents_mean)
    assert padded.shape == (1, 2, 18, 2) and torch.equal(padded[:, :, :10], short)
    packed = LTX2Pipeline._pack_audio_latents(padded)  # [1, L, C * M]
    normalized = LTX2Pipeline._normalize_audio_latents(packed, stats.latents_mean, stats.latents_std)
    assert torch.allclose(normalized[:, 10:], torch.zeros_like(normalized[:, 10:]), atol=1e-6)
    assert torch.equal(conform_audio_length(padded, 12, stats.latents_mean), padded[:, :, :12])


def test_retake_of_a_silent_mp4_records_no_audio_to_keep_and_encodes_none(root: Path, tmp_path: Path):
    """A file without an audio stream: nothing to hold, so the whole track is generated afresh (the pipeline
    gets no source audio), as ltx-pipelines' retake does without audio; the sidecar says so."""
    from orchestrator.run.sidecar import retake_summary
    from services.retake_source import encode_audio_file

    silent = write_mp4(tmp_path / "silent.mp4", 17)
    built = build_spec({"prompt": "p", "retake": str(silent), "from_frame": 5, "to_frame": 8}, settings_for(root))
    path, recorded = built.retake
    assert (recorded.kind, recorded.has_audio, recorded.frames) == ("video", False, 17)
    assert (
        recorded.sha256 == hashlib.sha256(silent.read_bytes()).hexdigest() == built.identity.inputs["retake"]["sha256"]
    )
    assert (built.spec.width, built.spec.height, built.spec.num_frames) == (64, 64, 17)
    assert retake_summary(recorded)["audio"] == RETAKE_NO_AUDIO_NOTE
    assert encode_audio_file(None, path, 17 / 24, 18, torch.device("cpu")) is None
