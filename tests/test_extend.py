"""Extension (`ltx2 extend SOURCE`): a clip whose first K frames are a source video's last K, published
joined to the source and alone.

The source is rendered once in this process (the stages are real worker processes forked from the
session's fork server); `ltx2 extend` runs once as a user runs it. The tiny VAE packs 4 frames into a
latent frame, so overlaps are 4m+1 frames: with 17-frame clips, an overlap of 5 holds the new clip's
first two latent frames at the encoding of the source's last 5 frames, and its first 5 audio latents (of
18) at the encoding of the source's audio under those frames.
"""

from __future__ import annotations

import json
from pathlib import Path

import av
import numpy as np
import pytest
import torch
import zmq
from conftest import ltx2_environment, probe_mp4, render_in_process, run_ltx2

from config.settings import Settings, load_settings
from orchestrator.placement.fork_client import ForkServer
from orchestrator.placement.worker_link import WorkerLink
from orchestrator.run.job_hooks import JobHooks
from orchestrator.run.jobdir import JobDir
from orchestrator.run.jobspec import build_spec
from orchestrator.run.model_lookup import resolve_model
from orchestrator.run.stage_major import run_job_stage_major
from protocol.extension import AUDIO_NOTE, held_audio_latents
from protocol.files import EXTEND_SOURCE_FILE, JOINED_FILE, LATENTS_FILE, VIDEO_FILE, Stage
from protocol.spec_rules import SpecError
from services.joined_video import joined_audio
from services.latents import read_latents

# Two denoising steps of the default schedule with guidance off: one transformer call per step.
CHEAP = {"width": 64, "height": 64, "num_frames": 17, "steps": 2, "schedule": "default", "dtype": "float32"}
CHEAP_FLAGS = ["--num-frames", "17", "--steps", "2", "--schedule", "default", "--dtype", "float32", "--quiet"]
SOURCE_FRAMES, NEW_FRAMES, OVERLAP = 17, 17, 5
# AAC codes 1024 samples a frame: at the tiny vocoder's 16 kHz a track may end up to 64 ms after its video.
AAC_FRAME_S = 1024 / 16000


def settings_for(root: Path) -> Settings:
    """The settings `ltx2` has in ltx2_environment(root): the same state dir and output folder."""
    return load_settings(
        environ={"LTX2_STATE_DIR": str(root / "state"), "LTX2_OUTPUT_DIR": str(root / "outputs"), "HOME": str(root)}
    )


def render(request: dict[str, object], settings: Settings, fork_server: ForkServer) -> JobDir:
    """A job built as `ltx2 generate` builds it, run here by an embedded orchestrator."""
    built = build_spec(request, settings)
    job = JobDir.create(
        settings.jobs_dir, built.spec, built.model, conditions=built.conditions, extension=built.extension,
        identity=built.identity, owner="generate",
    )  # fmt: skip
    render_in_process(job, settings, fork_server)
    return JobDir.load(job.path)


def decoded(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("extend")


@pytest.fixture(scope="module")
def source(root: Path, tiny_model_dir: Path, fork_server: ForkServer) -> JobDir:
    """A finished 17-frame tiny clip to extend."""
    request = {"prompt": "a red ball bounces", "model": str(tiny_model_dir), "seed": 3, **CHEAP}
    return render(request, settings_for(root), fork_server)


@pytest.fixture(scope="module")
def extended(root: Path, source: JobDir, hf_home: Path) -> dict[str, object]:
    """`ltx2 extend <source job> --overlap 5`, as a user runs it."""
    args = ["extend", source.id, "--prompt", "the ball rolls away", "--overlap", str(OVERLAP), "--seed", "4"]
    result = run_ltx2([*args, *CHEAP_FLAGS], ltx2_environment(hf_home, root))
    assert result.returncode == 0, result.stderr
    joined = Path(result.stdout.strip())
    sidecar = json.loads(joined.with_suffix(".json").read_text())
    job = JobDir.load(Path(sidecar["job_dir"]))
    return {"joined": joined, "new": joined.with_name(f"{joined.stem}_new.mp4"), "sidecar": sidecar, "job": job}


def test_extend_publishes_the_joined_video_and_the_new_part_with_their_frame_counts_and_audio(extended: dict):
    joined, new = probe_mp4(extended["joined"]), probe_mp4(extended["new"])
    assert new["frames"] == NEW_FRAMES
    assert joined["frames"] == SOURCE_FRAMES + NEW_FRAMES - OVERLAP == 29
    assert (joined["width"], joined["height"], joined["fps"]) == (64, 64, 24.0)  # the source's, never given
    assert joined["audio_codec"] == new["audio_codec"] == "aac"
    assert 29 / 24 <= joined["audio_seconds"] <= 29 / 24 + AAC_FRAME_S
    assert abs(joined["audio_seconds"] - joined["video_seconds"]) <= 1 / 24  # as long as its video within a frame
    assert 17 / 24 <= new["audio_seconds"] <= 17 / 24 + AAC_FRAME_S


def test_the_joined_video_starts_with_the_sources_frames_bit_for_bit(extended: dict, source: JobDir):
    """The source's H.264 packets are copied, not encoded again: its decoded frames are the source's exactly."""
    joined = decoded(extended["joined"])
    assert np.array_equal(joined[:SOURCE_FRAMES], decoded(source.path / VIDEO_FILE))
    assert np.array_equal(joined[:SOURCE_FRAMES], decoded(Path(source.record.output)))


def test_the_joined_video_goes_on_with_the_new_frames_after_the_overlap_in_order(extended: dict):
    """Each joined frame after the source's is closest to the new part's frame K later (both are lossy
    encodes of one decoded frame, so they match only within H.264's error, far below the frames' changes)."""
    joined, new = decoded(extended["joined"]).astype(np.int16), decoded(extended["new"]).astype(np.int16)
    for index in range(NEW_FRAMES - OVERLAP):
        errors = [float(np.abs(joined[SOURCE_FRAMES + index] - frame).mean()) for frame in new]
        assert int(np.argmin(errors)) == OVERLAP + index


def test_the_new_clip_holds_its_first_latent_frames_at_the_source_last_frames(extended: dict, tiny_model_dir: Path):
    """Strength 1 at latent index 0: the new clip's first (K - 1) / 4 + 1 latent frames are the VAE's encoding
    of the source's last K frames as diffusers' LTX2ConditionPipeline encodes a condition (argmax), unchanged
    by denoising (float32 on the CPU: 1e-5); the frames after them are denoised."""
    from diffusers import AutoencoderKLLTX2Video

    job: JobDir = extended["job"]
    latents = read_latents(job.path / LATENTS_FILE)[0]["video"]
    tail = decoded(job.path / EXTEND_SOURCE_FILE)[-OVERLAP:]
    pixels = torch.from_numpy(tail).float().permute(3, 0, 1, 2)[None] / 127.5 - 1.0
    vae = AutoencoderKLLTX2Video.from_pretrained(tiny_model_dir, subfolder="vae").eval()
    with torch.no_grad():
        encoded = vae.encode(pixels).latent_dist.mode()
    held = (OVERLAP - 1) // 4 + 1
    assert encoded.shape[2] == held == 2
    assert float((latents[:, :, :held] - encoded).abs().max()) <= 1e-5
    assert float((latents[:, :, held] - encoded[:, :, -1]).abs().max()) > 1e-2


def source_audio_under_the_overlap(path: Path) -> tuple[np.ndarray, int]:
    """The source's audio track under its last OVERLAP frames, at its own rate, counted from its first sample."""
    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        rate, planar = stream.rate, av.AudioResampler(format="fltp")
        pieces = [out.to_ndarray() for frame in container.decode(stream) for out in planar.resample(frame)]
    track = np.concatenate(pieces, axis=1)
    start, stop = round((SOURCE_FRAMES - OVERLAP) / 24 * rate), round(SOURCE_FRAMES / 24 * rate)
    return track[:, start:stop], rate


def test_the_new_clip_holds_its_first_audio_latents_at_the_source_audio_under_the_overlap(
    extended: dict, tiny_model_dir: Path
):
    """The source's audio under the overlap (its frames 12 to 16: 5/24 s), encoded by the audio VAE, is what the
    new clip's first audio latents are after denoising, bit for bit: the 5 of its 18 (25 a second) wholly inside
    the overlap, latent l spanning mel frames up to 4l + 1 at 100 a second, (4·4 + 1) / 100 <= 5/24 s. The 6th,
    which straddles the overlap's end, and every later one are generated."""
    from diffusers import AutoencoderKLLTX2Audio

    from services.soundtrack import encode_waveform

    job: JobDir = extended["job"]
    audio = read_latents(job.path / LATENTS_FILE)[0]["audio"]
    waveform, rate = source_audio_under_the_overlap(job.path / EXTEND_SOURCE_FILE)
    audio_vae = AutoencoderKLLTX2Audio.from_pretrained(tiny_model_dir, subfolder="audio_vae").eval()
    encoded = encode_waveform(audio_vae, waveform, rate, torch.device("cpu"))
    held = held_audio_latents(OVERLAP, NEW_FRAMES, 24.0, audio.shape[2], 100.0)
    assert (held, audio.shape[2], encoded.shape[2]) == (5, 18, 6)
    assert torch.equal(audio[:, :, :held], encoded[:, :, :held])
    assert float((audio[:, :, held] - encoded[:, :, held]).abs().max()) > 1e-2
    assert all(float((audio[:, :, index] - audio[:, :, held - 1]).abs().max()) > 1e-3 for index in range(held, 18))


def test_the_overlap_audio_is_the_track_under_the_sources_last_frames_and_none_without_a_track(tmp_path: Path):
    """A 1 kHz burst at 0.25 to 0.275 s of a 24-frame clip lands 0.25 - 4/24 s into the audio under frames 4 to
    8 (AAC's priming is trimmed by the decoder: samples count from the track's start); a clip without audio
    holds nothing."""
    from services.media import Mp4Writer
    from services.overlap_audio import read_overlap_track

    rate, gray = 16000, np.full((24, 96, 64), 128, np.uint8)
    burst = np.zeros((2, rate), np.float32)
    burst[:, 4000:4400] = 0.8 * np.sin(2 * np.pi * 1000 * np.arange(400) / rate)
    for name, audio in (("burst.mp4", burst), ("silent.mp4", None)):
        with Mp4Writer(tmp_path / name, 64, 64, 24.0, threads=1) as writer:
            if audio is not None:
                writer.add_audio(audio, rate, 24)
            writer.write(gray)
            writer.close(24)
    track, found_rate = read_overlap_track(tmp_path / "burst.mp4", 4, 5, 24.0)
    start = round(4 / 24 * rate)
    assert found_rate == rate and track.shape == (2, round(9 / 24 * rate) - start)
    loud = np.flatnonzero(np.abs(track[0]) > 0.1)
    assert abs(int(loud[0]) - (4000 - start)) <= 2 and abs(int(loud[-1]) - (4399 - start)) <= 2
    assert read_overlap_track(tmp_path / "silent.mp4", 4, 5, 24.0) is None


@pytest.mark.parametrize(
    ("overlap", "num_frames", "fps", "held"),
    [
        (5, 17, 24.0, 5),  # 0.208 s: latents 0-4 end by mel frame 17
        (25, 121, 24.0, 26),  # 1.042 s: latent 25 ends at 1.01 s, latent 26 at 1.05 s
        (9, 121, 25.0, 9),  # 0.36 s = mel frame 36: latent 8 ends at mel 33, latent 9 at 37
        (1, 17, 24.0, 1),  # one frame (42 ms): latent 0 covers mel frame 0 alone
        (17, 33, 30.0, 14),  # 0.567 s: latent 13 ends at 0.53 s
    ],
)
def test_the_overlap_holds_the_audio_latents_wholly_inside_it(overlap: int, num_frames: int, fps: float, held: int):
    total = round(num_frames / fps * 25)
    assert held_audio_latents(overlap, num_frames, fps, total, 100.0) == held


def test_held_audio_tokens_stay_at_their_latents_through_guided_denoising():
    """In the loop itself, before the held latents are written back: with CFG, STG, modality guidance and
    guidance rescale on the audio (whose rescale moves every token of the x0), the held tokens end where they
    started (normalized and denormalized again: float32 rounding), and the rest are denoised."""
    from diffusers import LTX2ConditionPipeline
    from diffusers.pipelines.ltx2.pipeline_ltx2_condition import LTX2VideoCondition

    from services.held_audio_tokens import HeldAudioTokens, held_tokens_pipeline
    from services.tiny_model import build_components

    parts = build_components()
    names = ("scheduler", "vae", "audio_vae", "text_encoder", "tokenizer", "connectors", "transformer", "vocoder")
    pipe = held_tokens_pipeline(LTX2ConditionPipeline)(**{name: parts[name] for name in names})
    pipe.set_progress_bar_config(disable=True)
    latents = torch.randn(1, 2, 5, 2, generator=torch.Generator().manual_seed(2))
    frames = np.random.default_rng(0).integers(0, 255, (5, 64, 64, 3), dtype=np.uint8)
    guidance = {"guidance_scale": 3.0, "stg_scale": 1.0, "modality_scale": 3.0, "guidance_rescale": 0.7,
                "audio_guidance_scale": 7.0, "audio_stg_scale": 1.0, "audio_modality_scale": 3.0,
                "audio_guidance_rescale": 0.7, "spatio_temporal_guidance_blocks": [1]}  # fmt: skip
    with torch.no_grad():
        _, audio = pipe.call_holding(
            HeldAudioTokens(latents), prompt="a ball", conditions=[LTX2VideoCondition(frames, index=0)], width=64,
            height=64, num_frames=17, frame_rate=24.0, num_inference_steps=2, max_sequence_length=16,
            generator=torch.Generator().manual_seed(1), output_type="latent", return_dict=False, **guidance,
        )  # fmt: skip
    assert audio.shape == (1, 2, 18, 2)
    assert float((audio[:, :, :5] - latents).abs().max()) <= 1e-6
    assert float((audio[:, :, 5] - latents[:, :, -1]).abs().max()) > 1e-2


def test_job_and_sidecar_record_where_the_extension_came_from(extended: dict, source: JobDir):
    job: JobDir = extended["job"]
    extension = job.record.extension
    source_bytes = (source.path / VIDEO_FILE).read_bytes()
    assert (job.path / EXTEND_SOURCE_FILE).read_bytes() == source_bytes
    assert (extension.source, extension.source_job, extension.frames, extension.overlap) == (
        source.id, source.id, SOURCE_FRAMES, OVERLAP
    )  # fmt: skip
    assert job.record.digest_inputs["extension"] == {"sha256": extension.sha256, "frames": 17, "overlap": 5}
    assert "extend" not in job.record.digest_inputs["request"]  # by its bytes, not by the id that named it
    recorded = extended["sidecar"]["extension"]
    assert recorded["source_job"] == source.id and recorded["sha256"] == extension.sha256
    assert (recorded["overlap"], recorded["joined_frames"], recorded["audio"]) == (5, 29, AUDIO_NOTE)
    assert job.spec.model == source.spec.model and job.spec.fps == source.spec.fps  # lent by the source job
    assert (job.path / JOINED_FILE).read_bytes() == extended["joined"].read_bytes()


def test_the_joined_audio_keeps_the_source_then_crossfades_over_the_overlap_into_the_new():
    rate, fps = 1000, 10.0
    source = np.full((2, 1700), 0.5, np.float32)  # 17 frames at 10 fps
    new = np.full((2, 1700), -0.25, np.float32)
    audio = joined_audio(source, new, rate, source_frames=17, overlap=5, fps=fps)
    assert audio.shape == (2, 2900)  # (17 + 17 - 5) frames
    assert np.array_equal(audio[:, :1200], source[:, :1200])  # the source's, up to the overlap
    assert np.array_equal(audio[:, 1700:], new[:, 500:])  # the new part's, after it
    fade = np.linspace(0, np.pi / 2, 500)
    assert np.allclose(audio[0, 1200:1700], 0.5 * np.cos(fade) - 0.25 * np.sin(fade), atol=1e-6)


def extend_request(source: str, **fields: object) -> dict[str, object]:
    return {"prompt": "on", "extend": source, "steps": 2, "schedule": "default", **fields}


@pytest.mark.parametrize(
    ("fields", "flag", "message"),
    [
        ({"overlap": 6}, "--overlap", "nearest allowed: 5 or 9"),
        ({"overlap": 17, "num_frames": 17}, "--overlap", "17 must be below --num-frames 17"),
        ({"overlap": 21, "num_frames": 25}, "--overlap", "21 is more than the source's 17 frames"),
        ({"width": 128}, "--width", "the clip delivers 128x64 but the source is 64x64"),
        ({"fps": 30.0}, "--fps", "30 differs from the source's 24"),
        ({"conditions": ["{png}@1"]}, "--condition", "frame 1 lies in the overlap (frames 0 to 4"),
    ],
)
def test_extension_refusals_name_the_flag_and_what_is_allowed(
    source: JobDir, root: Path, tmp_path: Path, fields: dict, flag: str, message: str
):
    from PIL import Image

    png = tmp_path / "key.png"
    Image.new("RGB", (64, 64)).save(png)
    fields = {key: [entry.format(png=png) for entry in value] if key == "conditions" else value
              for key, value in fields.items()}  # fmt: skip
    with pytest.raises(SpecError) as refused:
        build_spec(extend_request(source.id, **{"overlap": OVERLAP, **fields}), settings_for(root))
    assert refused.value.flag == flag and message in str(refused.value)


@pytest.mark.parametrize(
    ("fields", "frames", "overlap", "notice"),
    [
        ({"seconds": 0.5}, 25, 13, "0.5 s at 24 fps after the 13-frame overlap -> 25 frames, 12 of them new (0.500 s)"),
        ({"seconds": 0.5, "overlap": 5}, 17, 5, "after the 5-frame overlap -> 17 frames, 12 of them new (0.500 s)"),
        ({"seconds": 1}, 41, 13, "1 s at 24 fps after the 13-frame overlap -> 41 frames, 28 of them new (1.167 s)"),
        ({"seconds": 1e-11, "overlap": 9}, 17, 9, "after the 9-frame overlap -> 17 frames, 8 of them new"),  # not 9
    ],
)
def test_an_extensions_seconds_count_the_new_part_after_the_overlap(
    source: JobDir, root: Path, fields: dict, frames: int, overlap: int, notice: str
):
    """As OpenAI's extensions count `seconds` (the joined video grows by that much): the tiny VAE's default overlap
    is 3 x 4 + 1 = 13 frames of the 17-frame source; 0.5 s at 24 fps is 12 new frames, 13 + 12 -> 25 (8n+1)."""
    built = build_spec(extend_request(source.id, **fields), settings_for(root))
    assert (built.spec.num_frames, built.spec.overlap) == (frames, overlap)
    assert any(line.startswith("--seconds: ") and notice in line for line in built.notices), built.notices


def test_an_extensions_seconds_beyond_the_longest_clip_are_refused_naming_seconds(source: JobDir, root: Path):
    with pytest.raises(SpecError) as refused:
        build_spec(extend_request(source.id, seconds=42.5), settings_for(root))  # 13 + 1020 frames at 24 fps
    assert refused.value.flag == "--seconds" and "after the 13-frame overlap needs 1033 frames" in str(refused.value)
    with pytest.raises(SpecError) as doubled:
        build_spec(extend_request(source.id, seconds=1, num_frames=17), settings_for(root))
    assert doubled.value.flag == "--seconds" and "not both" in str(doubled.value)


def test_extend_refuses_a_missing_source_or_an_unfinished_job_before_any_job(
    source: JobDir, root: Path, hf_home: Path, tmp_path: Path, tiny_model_dir: Path
):
    settings = settings_for(root)
    waiting = JobDir.create(settings.jobs_dir, source.spec, resolve_model(str(tiny_model_dir)))
    missing_job = source.id[:-6] + "000000"
    env = ltx2_environment(hf_home, root)
    jobs_before = sorted(path.name for path in settings.jobs_dir.iterdir())
    for given, message in (
        (str(tmp_path / "gone.mp4"), "does not exist or is not a file"),
        (missing_job, f"no job '{missing_job}' in"),
        (waiting.id, f"job {waiting.id} is queued, not done: only a finished job's video can be extended"),
    ):
        result = run_ltx2(["extend", given, "--prompt", "on", *CHEAP_FLAGS], env)
        assert result.returncode == 2, result.stderr
        assert f"extend: {given}: " in result.stderr and message in result.stderr, result.stderr
    assert sorted(path.name for path in settings.jobs_dir.iterdir()) == jobs_before


def test_a_batch_clip_extends_a_finished_job_by_its_extend_key(source: JobDir, root: Path, tmp_path: Path):
    from orchestrator.command_line.batch import BatchError, validate_batch

    batch = tmp_path / "more.toml"
    batch.write_text(f'[defaults]\nnum_frames = 17\n[[clips]]\nprompt = "on"\nextend = "{source.id}"\noverlap = 9\n')
    (clip,) = validate_batch(batch, settings_for(root), {})
    path, extension = clip.built.extension
    assert path == source.path / VIDEO_FILE and (extension.source_job, extension.overlap) == (source.id, 9)
    assert (clip.built.spec.model, clip.built.spec.width) == (source.spec.model, 64)  # lent by the source job
    batch.write_text(f'[[clips]]\nname = "late"\nprompt = "on"\nextend = "{source.id}"\noverlap = 8\n')
    with pytest.raises(BatchError, match=r"clip 1 \(late\): --overlap: 8 frames cannot be a video condition"):
        validate_batch(batch, settings_for(root), {})


def test_the_daemon_queues_an_extension_submitted_by_job_id_and_refuses_an_unknown_one(
    source: JobDir, root: Path, tmp_path: Path
):
    """A submit's spec carries `extend` as `ltx2 submit --extend` sends it; the daemon resolves it as
    `generate` does (nothing is rendered here: the daemon is not serving)."""
    from orchestrator.daemon.server import Daemon
    from orchestrator.daemon.store import open_store
    from orchestrator.daemon.transport import DaemonAddress
    from protocol import jobs

    settings = settings_for(root)
    daemon = Daemon(settings, DaemonAddress(f"ipc://{tmp_path}/d.sock"))
    store = open_store(tmp_path / "jobs.sqlite", settings.jobs_dir)
    reply = daemon.submit(jobs.Submit("", {"prompt": "on", "extend": source.id, "num_frames": 17}), store)
    assert isinstance(reply, jobs.Ok), reply
    queued = JobDir.load(settings.jobs_dir / reply.data["id"])
    assert queued.record.extension.source_job == source.id and queued.spec.overlap == 13  # the default: 3·4+1
    assert (queued.path / EXTEND_SOURCE_FILE).read_bytes() == (source.path / VIDEO_FILE).read_bytes()
    refused = daemon.submit(jobs.Submit("", {"prompt": "on", "extend": "20990101-000000-abcdef"}), store)
    assert isinstance(refused, jobs.Error) and refused.field == "extend" and "no job" in refused.message


def test_a_chain_renders_each_segment_once_and_a_rerun_skips_the_finished_ones(
    source: JobDir, root: Path, tmp_path: Path, fork_server: ForkServer
):
    """Segment 1 extends the source, segment 2 segment 1; the second run, with a prompt added, renders
    only the new segment (one job run, no attempt added to segment 1, its files untouched). The last
    joined video is the whole chain, each earlier part's frames in it bit for bit."""
    from orchestrator.command_line.chain import run_chain
    from orchestrator.run.job_end import take_job

    settings = settings_for(root)
    base = {key: CHEAP[key] for key in ("num_frames", "steps", "schedule", "dtype")} | {"overlap": OVERLAP, "seed": 5}
    prompts = tmp_path / "story.txt"
    prompts.write_text("# the ball's day\nthe ball rolls on\n")
    ran: list[str] = []
    context = zmq.Context()
    link = WorkerLink(context, shared_fork_server=fork_server)

    def run_job(job: JobDir) -> Path:
        ran.append(job.id)
        take_job(job, "extend")
        return run_job_stage_major(job, settings, link, JobHooks())

    try:
        first = run_chain(prompts, base, source.id, settings, run_job, lambda line: None)
        segment = JobDir.load(settings.jobs_dir / ran[0])
        before = {path.name: path.stat().st_mtime_ns for path in segment.path.glob("*.*")}
        prompts.write_text("# the ball's day\nthe ball rolls on\n\nit stops by a wall\n")
        lines: list[str] = []
        whole = run_chain(prompts, base, source.id, settings, run_job, lines.append)
    finally:
        link.close()
        context.term()
    assert len(ran) == 2 and any("segment 1/2: done earlier" in line for line in lines)
    assert {path.name: path.stat().st_mtime_ns for path in segment.path.glob("*.*")} == before
    assert [len(JobDir.load(segment.path).stage_record(stage).attempts) for stage in Stage] == [1, 1, 1]
    last = JobDir.load(settings.jobs_dir / ran[1])
    assert last.record.extension.source_job == segment.id
    frames = decoded(whole)
    assert len(frames) == SOURCE_FRAMES + 2 * (NEW_FRAMES - OVERLAP)
    assert np.array_equal(frames[: SOURCE_FRAMES + NEW_FRAMES - OVERLAP], decoded(first))
    assert np.array_equal(frames[:SOURCE_FRAMES], decoded(source.path / VIDEO_FILE))


def test_extend_chain_refuses_a_prompt_flag_and_needs_a_source_or_a_chain(root: Path, hf_home: Path, tmp_path: Path):
    env = ltx2_environment(hf_home, root)
    prompts = tmp_path / "story.txt"
    prompts.write_text("one\n")
    both = run_ltx2(["extend", "--chain", str(prompts), "--prompt", "two"], env)
    assert both.returncode == 2 and "--prompt: not with --chain: the --chain file gives the prompts" in both.stderr
    neither = run_ltx2(["extend", "--prompt", "two"], env)
    assert neither.returncode == 2 and "extend: needs JOB_ID_OR_MP4" in neither.stderr
    prompts.write_text("# nothing but a comment\n")
    empty = run_ltx2(["extend", "--chain", str(prompts)], env)
    assert empty.returncode == 2 and "holds no prompt" in empty.stderr


def write_gradient_clip(path: Path, frames: int, preset: str) -> np.ndarray:
    """A smooth moving gradient (H.264 keeps it within a level or two), encoded as the video stage does;
    its RGB frames."""
    from services.color import rgb_to_yuv420
    from services.media import Mp4Writer

    ramp = torch.linspace(0, 1, 64)
    pictures = torch.stack([torch.stack([ramp.roll(3 * i)[None].expand(64, 64), ramp[:, None].expand(64, 64),
                                         torch.full((64, 64), i / frames)]) for i in range(frames)])  # fmt: skip
    with Mp4Writer(path, 64, 64, 24.0, preset=preset, threads=1) as writer:
        writer.add_audio(np.zeros((2, 16000), np.float32), 16000, frames)
        writer.write(rgb_to_yuv420(pictures).numpy())
        writer.close(frames)
    return (pictures * 255).round().byte().permute(0, 2, 3, 1).numpy()


def test_a_source_from_other_x264_settings_is_encoded_again_into_the_joined_video(tmp_path: Path):
    """Parameter sets that differ from this encoder's (another preset) cannot share one stream: the
    source's frames are decoded and encoded again, within H.264's error of a smooth picture (CRF 18:
    2 levels of 255 on average against the source's decoded frames), and the new frames follow them (4
    levels against their RGB, which 4:2:0 chroma subsampling loses at the gradient's wrapped edge)."""
    from services.color import rgb_to_yuv420
    from services.joined_video import JoinedWriter

    source = tmp_path / "fast.mp4"
    write_gradient_clip(source, 9, "ultrafast")
    new = write_gradient_clip(tmp_path / "new.mp4", 9, "medium")

    writer = JoinedWriter(tmp_path / "joined.mp4", source, 64, 64, 24.0, "medium", 1, {}, overlap=5)
    assert not writer.copying
    writer.add_audio(np.zeros((2, 8000), np.float32), 16000, 13)
    writer.write_source()
    writer.write(rgb_to_yuv420(torch.from_numpy(new).permute(0, 3, 1, 2).float() / 255).numpy())
    writer.close(13)
    joined = decoded(tmp_path / "joined.mp4").astype(np.int16)
    assert len(joined) == 9 + 9 - 5
    assert float(np.abs(joined[:9] - decoded(source)).mean()) <= 2.0
    assert float(np.abs(joined[9:] - new[5:]).mean()) <= 4.0


def test_an_extension_without_overlap_keeps_the_pipeline_it_asks_for(root: Path, tmp_path: Path):
    """The default overlap once re-set the pipeline to the preset's, dropping a --pipeline the request gave."""
    from test_retake import write_mp4

    clip = write_mp4(tmp_path / "wide.mp4", 17, width=128, height=128)
    request = extend_request(str(clip), num_frames=25, pipeline="two-stage", schedule="distilled", steps=8)
    built = build_spec(request, settings_for(root))
    assert (built.spec.pipeline, built.spec.overlap) == ("two-stage", 13)


def test_both_passes_of_an_extension_hold_the_frames_of_one_decode_of_its_source(tmp_path: Path):
    """Two-stage conditions both passes on the source's last frames: the worker decodes the source once per job
    (each decode of a 1080p source of random-weight renders took 12 s on an H100 host, docs/benchmarks.md
    version 16) and a group's next job decodes its own."""
    from types import SimpleNamespace

    from protocol.job_record import ResolvedExtension
    from protocol.spec import JobSpec
    from services.denoising import conditioning

    rng = np.random.default_rng(0)
    with av.open(str(tmp_path / EXTEND_SOURCE_FILE), "w") as container:
        stream = container.add_stream("libx264", rate=24)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        for _ in range(9):
            frame = av.VideoFrame.from_ndarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    extension = ResolvedExtension(
        source="clip.mp4", source_job=None, file=EXTEND_SOURCE_FILE, sha256="0" * 64, frames=9, width=64, height=64,
        fps=24.0, overlap=5,
    )  # fmt: skip
    request = {"prompt": "p", "model": "m", "width": 64, "height": 64, "num_frames": 17, "steps": 8, "seed": 1}
    spec = JobSpec.from_dict(request)
    phases: list[str] = []

    def context(job_id: str) -> SimpleNamespace:
        request = SimpleNamespace(job_id=job_id, retake=None, conditions=[], extension=extension, reference=None)
        return SimpleNamespace(request=request, job_dir=tmp_path, spec=spec, shared=shared, progress=phases.append)

    shared: dict[str, object] = {"video_vae": object()}  # loaded: the frames are what this test reads
    passes = [conditioning(context(job), torch.device("cpu"), torch.float32, None, None) for job in ("a", "a", "b")]
    frames = [inputs["conditions"][0].frames for _, _, inputs in passes]
    assert phases == ["decode the source's last frames"] * 2  # job a's two passes, then job b
    assert frames[0] is frames[1] and np.array_equal(frames[0], frames[2]) and frames[0].shape == (5, 64, 64, 3)
