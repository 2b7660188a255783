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

import pytest
import torch
from conftest import ltx2_environment, probe_mp4, render_in_process, run_ltx2

from config.settings import Settings, load_settings
from orchestrator.placement.fork_client import ForkServer
from orchestrator.run.jobdir import JobDir
from orchestrator.run.jobspec import build_spec
from protocol.files import LATENTS_FILE
from protocol.retake import RETAKE_AUDIO_NOTE, audio_latent_span, latent_span
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
