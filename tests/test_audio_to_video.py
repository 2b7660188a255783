"""--audio (audio-to-video, ltx-pipelines' A2VidPipelineTwoStage): the soundtrack encoded and held.

The mel spectrogram and the resampler (services/soundtrack.py) are pinned to torchaudio's definitions,
which ltx-core's AudioProcessor calls, written out here independently in numpy (torchaudio is no
dependency). The diffusion stage runs in this process on the tiny LTX-2.0 model; `ltx2 generate` runs as
a user runs it.
"""

from __future__ import annotations

import json
import math
import wave
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_ARGS, probe_mp4, run_ltx2
from diffusers import AutoencoderKLLTX2Audio
from test_keyframes import CHEAP, GUIDANCE_OFF

from config.settings import load_settings
from orchestrator.run.jobdir import JobDir
from orchestrator.run.jobspec import build_spec
from orchestrator.run.policy import initial_plan
from protocol.files import AUDIO_FILE, LATENTS_FILE, Stage
from protocol.soundtrack import require_audio_fits_request
from protocol.spec_rules import SpecError
from protocol.stage_request import StageRequest
from services import encode_diffuse, soundtrack
from services.latents import read_latents
from services.media import read_wav
from services.runtime import Reporter, WorkerContext

CLIP_SECONDS = CHEAP["num_frames"] / 24.0  # 17 frames at the tiny preset's 24 fps


def write_wav(path: Path, seconds: float, rate: int = 48000, channels: int = 2, pitch: float = 440.0) -> np.ndarray:
    """A 16-bit PCM WAV of a chord (another pitch per channel); returns its samples as floats, [channels, n]."""
    t = np.arange(round(seconds * rate)) / rate
    samples = np.stack([0.3 * np.sin(2 * np.pi * pitch * (1 + c / 2) * t) for c in range(channels)])
    pcm = np.round(samples * 32767).astype("<i2")
    with wave.open(str(path), "wb") as file:
        file.setnchannels(channels)
        file.setsampwidth(2)
        file.setframerate(rate)
        file.writeframes(pcm.T.tobytes())
    return pcm.astype(np.float32) / 32768


@pytest.fixture(scope="module")
def tracks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("tracks")
    files = {
        "song": folder / "song.wav",
        "other": folder / "other.wav",
        "short": folder / "short.wav",
        "text": folder / "notes.wav",
    }
    write_wav(files["song"], 1.0)
    write_wav(files["other"], 1.0, rate=22050, channels=1, pitch=180.0)
    write_wav(files["short"], 0.3)
    files["text"].write_text("not audio at all\n")
    return files


# -- the reference's math --------------------------------------------------------------------------------


def slaney_hz_to_mel(hz: np.ndarray) -> np.ndarray:
    """Slaney's Auditory Toolbox scale (librosa/torchaudio "slaney"): 3 mels per 200 Hz up to 1 kHz, then
    27 mels per factor 6.4."""
    hz = np.asarray(hz, dtype=np.float64)
    return np.where(hz < 1000, hz * 3 / 200, 15 + np.log(np.maximum(hz, 1e-10) / 1000) * 27 / np.log(6.4))


def reference_log_mel(x: np.ndarray, rate: int, n_mels: int, hop: int, n_fft: int) -> np.ndarray:
    """torchaudio MelSpectrogram(center=True, reflect, periodic Hann, power=1, slaney scale and norm), then
    log(clamp(., 1e-5)), as [channels, time, mels]; float64 throughout."""
    padded = np.pad(x.astype(np.float64), ((0, 0), (n_fft // 2, n_fft // 2)), mode="reflect")
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)
    count = 1 + (padded.shape[1] - n_fft) // hop
    frames = np.stack([padded[:, i * hop : i * hop + n_fft] * window for i in range(count)], axis=1)
    magnitude = np.abs(np.fft.rfft(frames, axis=-1))  # [channels, time, n_fft/2+1]
    freqs = np.linspace(0, rate // 2, n_fft // 2 + 1)
    mels = np.linspace(slaney_hz_to_mel(0.0), slaney_hz_to_mel(rate / 2), n_mels + 2)
    edges = np.where(mels < 15, mels * 200 / 3, 1000 * np.exp((mels - 15) * np.log(6.4) / 27))
    bank = np.zeros((len(freqs), n_mels))
    for m in range(n_mels):
        low, centre, high = edges[m : m + 3]
        rising = (freqs - low) / (centre - low)
        falling = (high - freqs) / (high - centre)
        bank[:, m] = np.maximum(0, np.minimum(rising, falling)) * 2 / (high - low)
    return np.log(np.maximum(magnitude @ bank, 1e-5))


def reference_resample(x: np.ndarray, orig: int, new: int, width: int = 6, rolloff: float = 0.99) -> np.ndarray:
    """torchaudio.functional.resample (sinc_interp_hann) as a sum: output sample n at input time n·orig/new
    is sum_i x[i]·(f/orig)·sinc(t)·cos²(πt/2w), t = f·(i/orig − n/new) within ±w, f = rolloff·min(orig, new),
    rates divided by their gcd; ceil(new·len/orig) samples."""
    gcd = math.gcd(orig, new)
    orig, new = orig // gcd, new // gcd
    base = min(orig, new) * rolloff
    length = math.ceil(new * x.shape[-1] / orig)
    i = np.arange(x.shape[-1], dtype=np.float64)
    out = np.zeros((x.shape[0], length))
    for n in range(length):
        t = base * (i / orig - n / new)
        inside = np.abs(t) <= width
        weights = np.where(inside, base / orig * np.sinc(t) * np.cos(np.pi * t / width / 2) ** 2, 0.0)
        out[:, n] = x.astype(np.float64) @ weights
    return out


def test_the_slaney_scale_is_linear_to_1_khz_then_logarithmic():
    hz = torch.tensor([0.0, 200 / 3, 1000.0, 6400.0])
    assert torch.allclose(soundtrack.hz_to_slaney_mel(hz), torch.tensor([0.0, 1.0, 15.0, 42.0]))
    assert torch.allclose(soundtrack.slaney_mel_to_hz(torch.tensor([1.0, 15.0, 42.0])), hz[1:])


def test_log_mel_is_the_audio_processors_melspectrogram():
    rate, hop, n_mels, n_fft = 16000, 160, 64, 1024
    x = np.random.default_rng(3).normal(0, 0.2, (2, 8000)).astype(np.float32)
    ours = soundtrack.log_mel(torch.from_numpy(x), rate, n_mels, hop, n_fft)
    assert ours.shape == (1, 2, 8000 // hop + 1, n_mels)
    expected = reference_log_mel(x, rate, n_mels, hop, n_fft)
    assert np.abs(ours[0].numpy() - expected).max() < 2e-4


@pytest.mark.parametrize(("orig", "new"), [(44100, 16000), (22050, 16000), (8000, 16000)])
def test_resample_is_torchaudios_sinc_interpolation(orig: int, new: int):
    x = np.random.default_rng(5).normal(0, 0.3, (2, 900)).astype(np.float32)
    ours = soundtrack.resample(torch.from_numpy(x), orig, new).numpy()
    expected = reference_resample(x, orig, new)
    assert ours.shape == expected.shape
    assert np.abs(ours - expected).max() < 5e-5  # float32 (as torchaudio runs it on float32 audio) vs float64


# -- the diffusion stage -----------------------------------------------------------------------------------


def render(
    model_dir: Path, state: Path, track: Path, **request: object
) -> tuple[JobDir, dict[str, torch.Tensor], list[str]]:
    """The encode_diffuse stage, in this process, on a fresh job built and created as `ltx2 generate` does."""
    settings = load_settings(environ={"LTX2_STATE_DIR": str(state), "HOME": str(state)})
    fields = {"prompt": "drums in the rain", "model": str(model_dir), "dtype": "float32", **CHEAP, **GUIDANCE_OFF}
    built = build_spec({**fields, "audio": str(track), **request}, settings)
    job = JobDir.create(settings.jobs_dir, built.spec, built.model, identity=built.identity, audio=built.audio)
    plan = initial_plan(Stage.ENCODE_DIFFUSE, built.spec, settings)
    reporter = Reporter(Stage.ENCODE_DIFFUSE, job.id, None)
    ctx = WorkerContext(Stage.ENCODE_DIFFUSE, job.path, StageRequest.of(job.record), plan, 1, reporter, {})
    encode_diffuse.run(ctx)
    return job, read_latents(job.path / LATENTS_FILE)[0], [built.identity.digest]


def encoded(model_dir: Path, track: Path) -> torch.Tensor:
    """The track encoded by the model's audio VAE, cut to the clip's audio latents (LTX2Pipeline's count)."""
    audio_vae = AutoencoderKLLTX2Audio.from_pretrained(model_dir, subfolder="audio_vae", dtype=torch.float32).eval()
    waveform, rate = soundtrack.read_track(track, CHEAP["num_frames"], 24.0)
    frames = round(CLIP_SECONDS * audio_vae.config.sample_rate / audio_vae.config.mel_hop_length / 4)
    return soundtrack.encode_track(audio_vae, waveform, rate, frames, torch.device("cpu"))


def test_the_pipeline_sees_the_tokens_ltx_cores_encoder_makes(tiny_model_dir: Path, tracks: dict):
    """ltx-core's AudioEncoder returns its posterior mean patchified ("b c t f -> b t (c f)"), normalized by
    the per-channel statistics and unpatchified; diffusers' encoder returns the mean raw and the pipeline packs
    and normalizes `audio_latents=` itself. The tokens the transformer starts from must be the reference's."""
    from diffusers import LTX2Pipeline

    latents = encoded(tiny_model_dir, tracks["song"])
    audio_vae = AutoencoderKLLTX2Audio.from_pretrained(tiny_model_dir, subfolder="audio_vae", dtype=torch.float32)
    mean, std = audio_vae.latents_mean, audio_vae.latents_std
    assert not torch.equal(std, torch.ones_like(std))  # the tiny VAE's statistics are not the identity
    batch, channels, frames, mels = latents.shape
    reference = (latents.permute(0, 2, 1, 3).reshape(batch, frames, channels * mels) - mean) / std
    tokens = LTX2Pipeline._normalize_audio_latents(LTX2Pipeline._pack_audio_latents(latents), mean, std)
    assert torch.equal(tokens, reference)


def test_the_soundtracks_latents_are_held_and_steer_the_video(tiny_model_dir: Path, tmp_path: Path, tracks: dict):
    job, latents, (digest,) = render(tiny_model_dir, tmp_path / "a", tracks["song"])
    held = encoded(tiny_model_dir, tracks["song"])
    assert latents["audio"].shape == held.shape == (1, 2, round(CLIP_SECONDS * 25), 2)
    assert torch.equal(latents["audio"], held)  # bit for bit: frozen, as the reference's audio
    assert job.record.audio.file == "input_audio.wav"
    assert (job.path / "input_audio.wav").read_bytes() == tracks["song"].read_bytes()

    _, other, (other_digest,) = render(tiny_model_dir, tmp_path / "b", tracks["other"])
    assert torch.equal(other["audio"], encoded(tiny_model_dir, tracks["other"]))  # mono 22.05 kHz: resampled
    assert not torch.equal(other["video"], latents["video"])  # the video attends to the held audio
    assert digest != other_digest  # the soundtrack's bytes are in the request digest


def test_both_stages_of_a_two_stage_run_hold_the_soundtrack(tiny_model_dir: Path, tmp_path: Path, tracks: dict):
    """The reference holds the encoded track in stage 1 and again in stage 2 (whose video starts noised at its
    first sigma); with CFG on, the audio's guidance is off and the latents still are the encoding."""
    guided = {"guidance_scale": 3.0, "audio_guidance_scale": 7.0, "guidance_rescale": 0.7}
    _, latents, _ = render(
        tiny_model_dir, tmp_path, tracks["song"], width=128, height=128, pipeline="two-stage", schedule="distilled",
        steps=8, **guided,
    )  # fmt: skip
    assert latents["video"].shape[-2:] == (128 // 4, 128 // 4)  # the tiny VAE packs 4x4 pixels
    assert torch.equal(latents["audio"], encoded(tiny_model_dir, tracks["song"]))


# -- the command ---------------------------------------------------------------------------------------------


def test_generate_with_audio_carries_the_track_in_the_mp4(ltx2_env: dict, tracks: dict):
    result = run_ltx2(
        ["generate", "--prompt", "a drummer", "--model", "ltx2-stages/tiny-random-ltx2", "--quiet", *TINY_ARGS,
         "--steps", "2", "--schedule", "default", "--audio", str(tracks["song"])],
        ltx2_env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    video = Path(result.stdout.strip())
    probe = probe_mp4(video)
    assert probe["frames"] == CHEAP["num_frames"]
    assert probe["audio_codec"] == "aac" and probe["audio_rate"] == 48000
    assert abs(probe["audio_seconds"] - CLIP_SECONDS) < 1024 / 48000  # within one AAC frame
    sidecar = json.loads(video.with_suffix(".json").read_text())
    assert sidecar["audio"]["source"] == "song.wav" and sidecar["spec"]["audio"] == str(tracks["song"])
    (job_dir,) = (Path(ltx2_env["LTX2_STATE_DIR"]) / "jobs").iterdir()
    delivered, rate = read_wav(job_dir / AUDIO_FILE)  # the track itself, not the VAE's reconstruction
    original = write_wav(tracks["song"].with_name("again.wav"), 1.0)
    assert rate == 48000 and delivered.shape == (2, round(CLIP_SECONDS * 48000))
    assert np.array_equal(delivered, original[:, : delivered.shape[1]])
    assert "load audio decoder" not in (job_dir / "logs" / "audio_decode-1.log").read_text()


def test_a_track_shorter_than_the_clip_or_not_audio_is_refused_naming_audio(ltx2_env: dict, tracks: dict):
    base = ["generate", "--prompt", "a drummer", "--model", "ltx2-stages/tiny-random-ltx2", "--quiet", *TINY_ARGS]
    base += ["--steps", "2", "--schedule", "default"]
    short = run_ltx2([*base, "--audio", str(tracks["short"])], ltx2_env)
    assert short.returncode == 2, short.stderr
    assert "--audio: short.wav lasts 0.300 s, shorter than the clip's 0.708 s" in short.stderr
    assert "(invalid_input)" in short.stderr and "attempt 2" not in short.stderr  # no lower-memory plan tried
    text = run_ltx2([*base, "--audio", str(tracks["text"])], ltx2_env)
    assert text.returncode == 2 and "--audio" in text.stderr and "does not start like an audio file" in text.stderr
    missing = run_ltx2([*base, "--audio", str(tracks["text"].with_name("nowhere.mp3"))], ltx2_env)
    assert missing.returncode == 2 and "--audio" in missing.stderr and "does not exist" in missing.stderr


def test_a_soundtrack_is_refused_beside_extend_or_retake():
    require_audio_fits_request("song.wav", None, None)
    for extend, retake in (("clip.mp4", None), (None, "20261206-000000-abcdef")):
        with pytest.raises(SpecError, match="cannot be combined with --(extend|retake)"):
            require_audio_fits_request("song.wav", extend, retake)
