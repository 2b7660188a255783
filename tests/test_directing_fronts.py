"""Issue 27's directing over HTTP and through the daemon: an extension of a finished video (`extend`,
`overlap`), a retake of one (`retake`, `from_frame`, `to_frame`) and an IC-LoRA control video (a file part
named by `reference_video`, `reference_downscale`), on a real `ltx2 serve` in front of a real daemon; and
`ltx2 submit --extend/--retake/--reference-video` to that same daemon. A video file to retake is the form's
file part `retake` (as `ltx2 retake FILE.mp4`).

The tiny VAE packs 4 frames into a latent frame: a 17-frame clip has 5 latent frames (frame 0; 1-4; 5-8;
9-12; 13-16), overlaps are 4m+1 frames and frames 5..8 are latent frame 2 alone. Every clip is 64x64x17.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from conftest import TINY_ARGS, probe_mp4, run_ltx2
from gateway_process import TINY, Gateway
from test_http_gateway_hostile import multipart, openai_error
from test_keyframes import gradient, write_video

from protocol.files import JOB_FILE, LATENTS_FILE, RETAKE_ENCODED_FILE
from protocol.model_ids import TINY_REPO_ID, hub_cache_dir
from services.latents import read_latents
from services.tiny_model import write_tiny_stage2_lora_to_hf_cache

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the client marks the Sora API deprecated
RENDER_TIMEOUT_S = 400.0
# Two denoising steps of the default schedule: every render here is a cheap one.
CHEAP = {"steps": 2, "schedule": "default"}
SOURCE = {"prompt": "a red ball bounces", "model": TINY, "size": "64x64", "num_frames": 17, "seed": 3, **CHEAP}
OVERLAP, FIRST, LAST = 5, 5, 8
# An IC-LoRA for the control video, as a repo id in the Hugging Face cache (the gateway takes no paths).
IC_LORA = "ltx2-stages/tiny-ic-lora-test"


@pytest.fixture(scope="module")
def gateway(hf_home: Path, tmp_path_factory: pytest.TempPathFactory):
    with Gateway(tmp_path_factory.mktemp("http-directing"), hf_home) as running:
        yield running


def wait_done(gateway: Gateway, key: str, video_id: str) -> dict:
    """The video object once the job ended."""
    deadline = time.monotonic() + RENDER_TIMEOUT_S
    while time.monotonic() < deadline:
        status, _, body = gateway.get(f"/v1/videos/{video_id}", key)
        video = json.loads(body)
        assert status == 200, video
        if video["status"] in ("completed", "failed"):
            return video
        time.sleep(0.2)
    raise TimeoutError(f"video {video_id} never ended")


def create(gateway: Gateway, key: str, fields: dict) -> tuple[int, dict]:
    status, _, body = gateway.post_json(key, fields)
    return status, body


def download(gateway: Gateway, key: str, video_id: str, name: str) -> Path:
    status, _, body = gateway.get(f"/v1/videos/{video_id}/content", key)
    assert status == 200, body
    path = gateway.root / name
    path.write_bytes(body)
    return path


def decoded(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


def job_dir(gateway: Gateway, video_id: str) -> Path:
    return Path(gateway.daemon_job(video_id)["job_dir"])


@pytest.fixture(scope="module")
def source(gateway: Gateway) -> dict:
    """alice's finished 17-frame clip, the source of the extensions and retakes."""
    status, video = create(gateway, "alice", SOURCE)
    assert status == 200, video
    done = wait_done(gateway, "alice", video["id"])
    assert done["status"] == "completed", gateway.daemon_job(video["id"])
    return {**done, "mp4": download(gateway, "alice", video["id"], "source.mp4")}


def test_an_extension_of_a_finished_video_is_fetched_joined_to_its_source(gateway: Gateway, source: dict):
    status, video = create(
        gateway,
        "alice",
        {
            "prompt": "the ball rolls away",
            "extend": source["id"],
            "overlap": OVERLAP,
            "num_frames": 17,
            "seed": 4,
            **CHEAP,
        },
    )
    assert status == 200, video
    assert video["num_frames"] == 17 + 17 - OVERLAP  # the source's model and size lent, then joined
    assert "seconds_mapping" not in video, video  # no seconds asked: nothing to say how they became frames
    done = wait_done(gateway, "alice", video["id"])
    assert done["status"] == "completed", gateway.daemon_job(video["id"])
    assert (done["size"], done["seconds"]) == ("64x64", f"{29 / 24:.3f}".rstrip("0"))
    joined = download(gateway, "alice", video["id"], "joined.mp4")
    probe = probe_mp4(joined)
    assert (probe["frames"], probe["width"], probe["height"]) == (29, 64, 64) and probe["audio_seconds"] > 1.0
    assert np.array_equal(decoded(joined)[:17], decoded(source["mp4"]))  # the source's frames as they were
    record = json.loads((job_dir(gateway, video["id"]) / JOB_FILE).read_text())
    assert (record["extension"]["source_job"], record["extension"]["overlap"]) == (source["id"], OVERLAP)


def test_a_retake_of_a_finished_video_keeps_the_latent_frames_outside_its_range(gateway: Gateway, source: dict):
    """Bit for bit in the latents (the tiny VAE's decoder mixes every latent frame into each pixel frame, so the
    decoded pixels outside the range move too; Lightricks' retake keeps the latents, as here)."""
    fields = {"prompt": "the ball turns blue", "retake": source["id"], "from_frame": FIRST, "to_frame": LAST}
    status, video = create(gateway, "alice", {**fields, "seed": 4, **CHEAP})
    assert status == 200, video
    done = wait_done(gateway, "alice", video["id"])
    assert done["status"] == "completed", gateway.daemon_job(video["id"])
    retaken = download(gateway, "alice", video["id"], "retaken.mp4")
    assert probe_mp4(retaken)["frames"] == 17
    before, _ = read_latents(job_dir(gateway, source["id"]) / LATENTS_FILE)
    after, _ = read_latents(job_dir(gateway, video["id"]) / LATENTS_FILE)
    held = [0, 1, 3, 4]  # every latent frame but 2, which holds frames 5..8
    assert torch.equal(after["video"][:, :, held], before["video"][:, :, held])
    assert not torch.allclose(after["video"][:, :, 2], before["video"][:, :, 2])


def retake_form(clip: bytes, **fields: bytes) -> tuple[bytes, dict[str, str]]:
    """A multipart create retaking frames 5..8 of `clip`, the video file uploaded as the part `retake`."""
    base = {"prompt": b"the ball turns blue", "model": TINY.encode(), "from_frame": b"5", "to_frame": b"8"}
    return multipart({**base, "seed": b"4", "steps": b"2", "schedule": b"default", **fields}, {"retake": clip})


def test_a_retake_of_an_uploaded_mp4_holds_its_vae_encoding_outside_the_range(gateway: Gateway, source: dict):
    """The file part `retake` is what `ltx2 retake FILE.mp4` takes: the daemon copies it into the job, the
    diffusion stage encodes it, and the latent frames outside the range are that encoding bit for bit."""
    body, headers = retake_form(source["mp4"].read_bytes())
    status, _, answer = gateway.request("POST", "/v1/videos", "alice", body, headers)
    assert status == 200, answer
    video = json.loads(answer)
    assert gateway.upload_files() == []  # the daemon copied it into the job
    record = json.loads((job_dir(gateway, video["id"]) / JOB_FILE).read_text())
    assert (record["retake"]["kind"], record["retake"]["has_audio"], record["retake"]["frames"]) == ("video", True, 17)
    done = wait_done(gateway, "alice", video["id"])
    assert done["status"] == "completed", gateway.daemon_job(video["id"])
    assert probe_mp4(download(gateway, "alice", video["id"], "retaken-file.mp4"))["frames"] == 17
    encoded, _ = read_latents(job_dir(gateway, video["id"]) / RETAKE_ENCODED_FILE)
    after, _ = read_latents(job_dir(gateway, video["id"]) / LATENTS_FILE)
    held = [0, 1, 3, 4]  # every latent frame but 2, which holds frames 5..8
    assert torch.equal(after["video"][:, :, held], encoded["video"][:, :, held])


@pytest.mark.parametrize(
    ("clip", "fields", "param", "words"),
    [
        ("png", {}, "retake", "or an MP4 or QuickTime video file"),
        ("16", {}, "retake", "retake: the video has 16 frames; a retake encodes the file as it is"),
        ("17", {"to_frame": b"17"}, "to_frame", "17 is outside the source's 17 frames"),
        ("17", {"extend": b"20261206-181500-a1b2c3"}, "extend", "no video"),
    ],
    ids=["png", "16-frames", "to-frame", "with-extend"],
)
def test_an_uploaded_retake_is_refused_naming_the_field_never_a_server_path(
    gateway: Gateway, source: dict, tmp_path: Path, clip: str, fields: dict, param: str, words: str
):
    from test_http_gateway import png_bytes

    if clip == "png":
        data = png_bytes(64, 64)
    elif clip == "16":
        write_video(tmp_path / "short.mp4", np.full((16, 64, 64, 3), 128, np.uint8))
        data = (tmp_path / "short.mp4").read_bytes()
    else:
        data = source["mp4"].read_bytes()
    before = len(gateway.daemon_jobs())
    body, headers = retake_form(data, **fields)
    status, _, answer = gateway.request("POST", "/v1/videos", "alice", body, headers)
    error = openai_error(answer)
    assert status in (400, 404) and error["param"] == param, answer
    assert words in error["message"] and str(gateway.root) not in error["message"], error
    assert len(gateway.daemon_jobs()) == before and gateway.upload_files() == []


@pytest.mark.parametrize(
    ("fields", "param", "words"),
    [
        ({"retake": "SOURCE", "from_frame": 5, "to_frame": 17}, "to_frame", "to_frame: 17 is outside the source's 17"),
        ({"retake": "SOURCE", "from_frame": 6, "to_frame": 8}, "from_frame", "nearest allowed: 5 or 9"),
        ({"retake": "SOURCE", "from_frame": 9, "to_frame": 8}, "from_frame", "9 is after to_frame 8"),
        ({"retake": "SOURCE", "from_frame": 5}, "to_frame", "a retake needs both from_frame A and to_frame B"),
        ({"from_frame": 5, "to_frame": 8}, "from_frame", "needs retake SOURCE"),
        ({"extend": "SOURCE", "overlap": 8}, "overlap", "overlap: 8 frames cannot be a video condition"),
        ({"extend": "SOURCE", "overlap": 21, "num_frames": 25}, "overlap", "21 is more than the source's 17 frames"),
        ({"overlap": 5}, "overlap", "needs extend SOURCE"),
        ({"extend": "/etc/passwd"}, "extend", "must be the id of one of this key's completed videos"),
        ({"retake": "../jobs/x"}, "retake", "paths are not accepted; send a video file as the multipart file part"),
    ],
)
def test_directing_refusals_name_the_field_and_what_is_allowed(
    gateway: Gateway, source: dict, fields: dict, param: str, words: str
):
    before = len(gateway.daemon_jobs())
    given = {name: source["id"] if value == "SOURCE" else value for name, value in fields.items()}
    status, body = create(gateway, "alice", {"prompt": "p", **given})
    assert status == 400 and body["error"]["param"] == param, body
    assert words in body["error"]["message"] and "--" not in body["error"]["message"], body
    assert len(gateway.daemon_jobs()) == before


def test_a_source_of_another_key_or_none_is_404_and_an_unfinished_one_400(gateway: Gateway, source: dict):
    before = len(gateway.daemon_jobs())
    unknown = source["id"][:-1] + ("1" if source["id"].endswith("0") else "0")
    for key, video_id, field in (
        ("bob", source["id"], "extend"),
        ("bob", source["id"], "retake"),
        ("alice", unknown, "extend"),
    ):
        extra = {"from_frame": 5, "to_frame": 8} if field == "retake" else {}
        status, body = create(gateway, key, {"prompt": "p", field: video_id, **extra})
        assert status == 404 and body["error"] == {
            "message": f"{field}: no video {video_id!r} of this key to {field}",
            "type": "invalid_request_error",
            "param": field,
            "code": "not_found",
        }, body
    assert len(gateway.daemon_jobs()) == before
    # A video of bob's own, still queued or rendering: the daemon refuses it as `ltx2 extend` does.
    status, running = create(gateway, "bob", {**SOURCE, "seed": 9})
    assert status == 200, running
    status, body = create(gateway, "bob", {"prompt": "p", "extend": running["id"]})
    assert status == 400 and body["error"]["param"] == "extend", body
    assert f"job {running['id']} is " in body["error"]["message"] and "not done" in body["error"]["message"]
    assert "/" not in body["error"]["message"].replace("POST /v1", "")
    assert gateway.request("DELETE", f"/v1/videos/{running['id']}", "bob")[0] == 200


@pytest.fixture(scope="module")
def control_clip(hf_home: Path, tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A 21-frame 80x48 control clip (the pipeline trims and resizes it), and the IC-LoRA in the cache."""
    write_tiny_stage2_lora_to_hf_cache(hub_cache_dir({"HF_HOME": str(hf_home)}), IC_LORA, "ic.safetensors")
    path = tmp_path_factory.mktemp("control") / "control.mp4"
    write_video(path, np.stack([np.roll(gradient((48, 80), 90), 4 * step, axis=1) for step in range(21)]))
    return path.read_bytes()


def test_a_control_video_is_a_file_part_named_by_reference_video(gateway: Gateway, control_clip: bytes):
    fields = {
        "prompt": b"a bird takes off",
        "model": TINY.encode(),
        "size": b"64x64",
        "num_frames": b"17",
        "loras": json.dumps([IC_LORA]).encode(),
        "reference_video": b"depth:0.8",
        "reference_downscale": b"2",
        "steps": b"2",
        "schedule": b"default",
    }
    body, headers = multipart(fields, {"depth": control_clip})
    status, _, answer = gateway.request("POST", "/v1/videos", "carol", body, headers)
    assert status == 200, answer
    video = json.loads(answer)
    assert any("uses the first 17 of its 21 frames" in line for line in video["notices"]), video
    assert gateway.upload_files() == []
    record = json.loads((job_dir(gateway, video["id"]) / JOB_FILE).read_text())
    control = record["reference"]
    assert (control["strength"], control["downscale"], control["frames"], control["frames_used"]) == (0.8, 2, 21, 17)
    done = wait_done(gateway, "carol", video["id"])
    assert done["status"] == "completed", gateway.daemon_job(video["id"])
    assert probe_mp4(download(gateway, "carol", video["id"], "controlled.mp4"))["frames"] == 17


@pytest.mark.parametrize(
    ("fields", "files", "param", "words"),
    [
        ({"reference_video": b"depth"}, {}, "reference_video", "'depth' names no file part of this form"),
        ({"reference_video": b"/srv/depth.mp4"}, {}, "reference_video", "paths are not accepted"),
        ({}, {"depth": "clip"}, "depth", "is no keyframe named in conditions and no reference_video"),
        ({"reference_video": b"depth:1.5"}, {"depth": "clip"}, "reference_video", "between 0.0 and 1.0; got 1.5"),
        ({"reference_video": b"depth"}, {"depth": "png"}, "reference_video", "cannot read depth as an MP4/MOV"),
        ({"reference_video": b"depth", "loras": b"[]"}, {"depth": "clip"}, "reference_video", "needs an IC-LoRA"),
        (
            {"reference_video": b"depth", "reference_downscale": b"9"},
            {"depth": "clip"},
            "reference_downscale",
            "1 and 8",
        ),
    ],
)
def test_control_video_refusals_name_the_field_never_a_server_path(
    gateway: Gateway, control_clip: bytes, fields: dict, files: dict, param: str, words: str
):
    from test_http_gateway import png_bytes

    before = len(gateway.daemon_jobs())
    base = {"prompt": b"p", "model": TINY.encode(), "size": b"64x64", "num_frames": b"17"}
    base["loras"] = json.dumps([IC_LORA]).encode()
    parts = {name: control_clip if kind == "clip" else png_bytes(64, 64) for name, kind in files.items()}
    body, headers = multipart({**base, **fields}, parts)
    status, _, answer = gateway.request("POST", "/v1/videos", "carol", body, headers)
    error = openai_error(answer)
    assert status == 400 and error["param"] == param, answer
    assert words in error["message"] and str(gateway.root) not in error["message"], error
    assert len(gateway.daemon_jobs()) == before and gateway.upload_files() == []
    status, answer = create(gateway, "carol", {"prompt": "p", "reference_video": "depth"})  # JSON carries no file
    assert status == 400 and answer["error"]["param"] == "reference_video"


# --- the same directing through the daemon: `ltx2 submit` ---------------------------------------------------------

CHEAP_FLAGS = ["--steps", "2", "--schedule", "default"]


def submit_in(folder: Path, env: dict[str, str], *flags: str) -> subprocess.CompletedProcess[str]:
    """`ltx2 submit FLAGS` run in `folder`, as a user in a project folder runs it (relative paths are theirs)."""
    command = [sys.executable, "-m", "orchestrator.cli", "submit", "--prompt", "on", "--seed", "4", *flags]
    return subprocess.run(command, env=env, cwd=folder, capture_output=True, text=True, timeout=120, check=False)


@pytest.fixture(scope="module")
def submitted(gateway: Gateway, source: dict, control_clip: bytes, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """An extension, a retake and a controlled clip queued on the gateway's daemon by `ltx2 submit` (the HTTP
    source is a daemon job like any other: the CLI is the operator's, it has no key); the control clip by a path
    relative to the folder the command runs in."""
    folder = tmp_path_factory.mktemp("project")
    (folder / "depth.mp4").write_bytes(control_clip)
    runs = {
        "extend": ["--extend", source["id"], "--overlap", str(OVERLAP), "--num-frames", "17"],
        "retake": ["--retake", source["id"], "--from-frame", str(FIRST), "--to-frame", str(LAST)],
        "control": [*TINY_ARGS, "--model", TINY_REPO_ID, "--reference-video", "depth.mp4:0.8", "--lora", IC_LORA],
    }
    ids = {}
    for name, flags in runs.items():
        result = submit_in(folder, gateway.env, *flags, *CHEAP_FLAGS)
        assert result.returncode == 0, result.stderr
        ids[name] = result.stdout.strip()
    return {"ids": ids, "folder": folder}


def watched(gateway: Gateway, job_id: str) -> Path:
    """`ltx2 watch JOB_ID` until the job ends; the MP4 it prints."""
    result = run_ltx2(["watch", job_id], gateway.env, timeout=RENDER_TIMEOUT_S)
    assert result.returncode == 0, (result.stderr, gateway.daemon_job(job_id))
    return Path(result.stdout.strip().splitlines()[-1])


def test_submit_extend_queues_an_extension_the_daemon_renders_joined(gateway: Gateway, source: dict, submitted: dict):
    joined = watched(gateway, submitted["ids"]["extend"])
    assert probe_mp4(joined)["frames"] == 17 + 17 - OVERLAP
    assert np.array_equal(decoded(joined)[:17], decoded(source["mp4"]))
    assert probe_mp4(joined.with_name(f"{joined.stem}_new.mp4"))["frames"] == 17


def test_submit_retake_queues_a_retake_the_daemon_renders_on_the_sources_latents(
    gateway: Gateway, source: dict, submitted: dict
):
    job_id = submitted["ids"]["retake"]
    assert probe_mp4(watched(gateway, job_id))["frames"] == 17
    before, _ = read_latents(job_dir(gateway, source["id"]) / LATENTS_FILE)
    after, _ = read_latents(job_dir(gateway, job_id) / LATENTS_FILE)
    assert torch.equal(after["video"][:, :, [0, 1, 3, 4]], before["video"][:, :, [0, 1, 3, 4]])
    assert not torch.allclose(after["video"][:, :, 2], before["video"][:, :, 2])


def test_submit_reference_video_sends_the_path_absolute_from_where_it_was_typed(gateway: Gateway, submitted: dict):
    job_id = submitted["ids"]["control"]
    assert probe_mp4(watched(gateway, job_id))["frames"] == 17
    record = json.loads((job_dir(gateway, job_id) / JOB_FILE).read_text())
    assert record["spec"]["reference_video"] == {"source": str(submitted["folder"] / "depth.mp4"), "strength": 0.8}
    assert (record["reference"]["frames"], record["reference"]["frames_used"]) == (21, 17)


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--retake", "SOURCE", "--from-frame", "5", "--to-frame", "17"], "--to-frame: 17 is outside the source's 17"),
        (["--extend", "SOURCE", "--overlap", "8", "--num-frames", "17"], "--overlap: 8 frames cannot be a video"),
        (["--retake", "20991231-000000-abcdef", "--from-frame", "5", "--to-frame", "8"], "--retake: no job"),
        ([*TINY_ARGS, "--reference-video", "missing.mp4", "--lora", IC_LORA], "{folder}/missing.mp4 does not exist"),
    ],
)
def test_submit_refuses_directing_the_daemon_cannot_do_with_the_clis_message(
    gateway: Gateway, source: dict, submitted: dict, flags: list[str], words: str
):
    before = len(gateway.daemon_jobs())
    given = [source["id"] if flag == "SOURCE" else flag for flag in flags]
    result = submit_in(submitted["folder"], gateway.env, *given)
    words = words.format(folder=submitted["folder"])  # a relative path is looked for where it was typed
    assert result.returncode == 2 and words in result.stderr and result.stdout == "", result.stderr
    assert len(gateway.daemon_jobs()) == before


def test_submit_makes_each_relative_path_absolute_and_leaves_names_as_typed(tmp_path: Path):
    """What `ltx2 submit` sends: paths from where they were typed; job ids and repo ids (naming nothing
    here) as they were; a path field naming nothing here absolute anyway, so the refusal says where."""
    from orchestrator.command_line.client_paths import with_absolute_paths

    (tmp_path / "lora.safetensors").write_bytes(b"x")
    (tmp_path / "clip.mp4").write_bytes(b"x")
    request = {
        "image": "first.png",
        "conditions": [{"source": "key.png", "frame": 9}, {"source": "/abs/k.png"}],
        "reference_video": "depth.mp4:0.5",
        "extend": "clip.mp4",
        "retake": "20261206-181500-a1b2c3",
        "loras": [{"source": "lora.safetensors", "scale": 0.5}, {"source": "owner/repo"}],
        "stage2_lora": {"source": "owner/distilled"},
        "audio": "drums.wav",
        "prompt": "first.png",
    }
    assert with_absolute_paths(request, tmp_path) == {
        "image": str(tmp_path / "first.png"),
        "conditions": [{"source": str(tmp_path / "key.png"), "frame": 9}, {"source": "/abs/k.png"}],
        "reference_video": {"source": str(tmp_path / "depth.mp4"), "strength": 0.5},
        "extend": str(tmp_path / "clip.mp4"),
        "retake": "20261206-181500-a1b2c3",
        "loras": [{"source": str(tmp_path / "lora.safetensors"), "scale": 0.5}, {"source": "owner/repo"}],
        "stage2_lora": {"source": "owner/distilled"},
        "audio": str(tmp_path / "drums.wav"),
        "prompt": "first.png",
    }
    assert with_absolute_paths({"extend": "20261206-181500-a1b2c3"}, tmp_path) == {"extend": "20261206-181500-a1b2c3"}
    # A retake of a file (ltx2 submit --retake clip.mp4): the file from where it was typed, as --extend's.
    assert with_absolute_paths({"retake": "clip.mp4"}, tmp_path) == {"retake": str(tmp_path / "clip.mp4")}


def post(gateway: Gateway, path: str, key: str, fields: dict) -> tuple[int, dict]:
    status, _, body = gateway.request(
        "POST", path, key, json.dumps(fields).encode(), {"Content-Type": "application/json"}
    )
    return status, json.loads(body)


def test_openais_remix_retakes_the_whole_clip_unless_given_a_range_and_names_its_source(gateway: Gateway, source: dict):
    """client.videos.remix sends only the prompt: a retake of every frame at the source's size, frames and fps."""
    client = gateway.client("alice")
    remix = client.videos.remix(source["id"], prompt="the ball turns green", extra_body={"seed": 5, **CHEAP})
    assert remix.remixed_from_video_id == source["id"] and remix.model_extra["num_frames"] == 17, remix
    record = json.loads((job_dir(gateway, remix.id) / JOB_FILE).read_text())
    assert (record["retake"]["source"], record["retake"]["from_frame"], record["retake"]["to_frame"]) == (
        source["id"],
        0,
        16,
    )
    ranged = client.videos.remix(source["id"], prompt="green", extra_body={"from_frame": FIRST, "to_frame": LAST})
    record = json.loads((job_dir(gateway, ranged.id) / JOB_FILE).read_text())
    assert (record["retake"]["from_frame"], record["retake"]["to_frame"]) == (FIRST, LAST)
    assert gateway.request("DELETE", f"/v1/videos/{ranged.id}", "alice")[0] == 200
    done = wait_done(gateway, "alice", remix.id)
    assert done["status"] == "completed" and done["remixed_from_video_id"] == source["id"], done
    assert probe_mp4(download(gateway, "alice", remix.id, "remix.mp4"))["frames"] == 17


def test_openais_extension_of_an_uploaded_file_counts_seconds_after_the_overlap(gateway: Gateway, source: dict):
    """client.videos.extend uploads the video (the client sends `video` as a file part); `seconds` is the new
    part: 0.5 s at 24 fps after the tiny VAE's default 13-frame overlap (3 x 4 + 1) renders 25 frames."""
    client = gateway.client("alice")
    video = client.videos.extend(
        prompt="the ball rolls on", seconds="0.5", video=("clip.mp4", source["mp4"].read_bytes(), "video/mp4")
    )
    assert gateway.upload_files() == []  # the daemon copied the file into the job
    assert video.model_extra["num_frames"] == 17 + 25 - 13, video
    assert (
        video.model_extra["seconds_mapping"]
        == "0.5 s at 24 fps after the 13-frame overlap -> 25 frames, 12 of them new (0.500 s)"
    )
    record = json.loads((job_dir(gateway, video.id) / JOB_FILE).read_text())
    assert (record["extension"]["source_job"], record["extension"]["overlap"]) == (None, 13)
    assert record["spec"]["num_frames"] == 25
    done = wait_done(gateway, "alice", video.id)
    assert done["status"] == "completed", gateway.daemon_job(video.id)
    assert done["seconds_mapping"] == video.model_extra["seconds_mapping"]  # read back from the store and the job
    assert probe_mp4(download(gateway, "alice", video.id, "extended-file.mp4"))["frames"] == 29


@pytest.mark.parametrize("route", ["/v1/videos/extensions", "/v1/videos/SOURCE/extend"])
def test_an_extension_by_id_on_either_route_extends_that_video(gateway: Gateway, source: dict, route: str):
    fields = {"prompt": "the ball rolls on", "seconds": 0.5, "overlap": OVERLAP, "seed": 6, **CHEAP}
    if route == "/v1/videos/extensions":
        fields["video"] = {"id": source["id"]}
    status, video = post(gateway, route.replace("SOURCE", source["id"]), "alice", fields)
    assert status == 200, video
    record = json.loads((job_dir(gateway, video["id"]) / JOB_FILE).read_text())
    assert (record["extension"]["source_job"], record["extension"]["overlap"]) == (source["id"], OVERLAP)
    assert record["spec"]["num_frames"] == 17  # 5 + 12 frames -> the next 8n+1
    assert gateway.request("DELETE", f"/v1/videos/{video['id']}", "alice")[0] == 200


@pytest.mark.parametrize(
    ("path", "key", "fields", "status", "param", "words"),
    [
        ("/v1/videos/SOURCE/extend", "alice", {"extend": "SOURCE"}, 400, "extend", "takes its video from the path"),
        ("/v1/videos/SOURCE/remix", "alice", {"retake": "SOURCE"}, 400, "retake", "takes its video from the path"),
        ("/v1/videos/SOURCE/remix", "bob", {}, 404, "video_id", "no video"),
        ("/v1/videos/not-a-video/remix", "alice", {}, 404, "video_id", "video_id: no video 'not-a-video'"),
        ("/v1/videos/%20SOURCE/extend", "alice", {"extend": "SOURCE"}, 400, "extend", "takes its video from the path"),
        ("/v1/videos/SOURCE/extend", "bob", {}, 404, "video_id", "no video"),
        ("/v1/videos/extensions", "bob", {"video": "SOURCE"}, 404, "video", "no video"),
        ("/v1/videos/extensions", "alice", {"video": "../jobs/x"}, 400, "video", "must be the id of one of this key"),
        ("/v1/videos/extensions", "alice", {"video": {"id": "SOURCE", "x": 1}}, 400, "video", "must be the id"),
        ("/v1/videos/extensions", "alice", {}, 400, "video", "give the video to extend once"),
        (
            "/v1/videos/SOURCE/remix",
            "alice",
            {"from_frame": 6, "to_frame": 8},
            400,
            "from_frame",
            "nearest allowed: 5 or 9",
        ),
    ],
)
def test_the_source_routes_refuse_naming_the_field_as_the_route_takes_it(
    gateway: Gateway, source: dict, path: str, key: str, fields: dict, status: int, param: str, words: str
):
    before = len(gateway.daemon_jobs())
    given = {name: source["id"] if value == "SOURCE" else value for name, value in fields.items()}
    if isinstance(given.get("video"), dict):
        given["video"] = {name: source["id"] if value == "SOURCE" else value for name, value in given["video"].items()}
    answer, body = post(gateway, path.replace("SOURCE", source["id"]), key, {"prompt": "p", **given})
    assert answer == status and body["error"]["param"] == param, body
    assert words in body["error"]["message"], body
    assert len(gateway.daemon_jobs()) == before


def test_a_remix_of_a_video_the_daemon_never_took_is_400_naming_video_id(gateway: Gateway):
    """A claim whose submit never reached the daemon (a gateway that died mid-create) has no frames to remix:
    400, where the whole-clip remix once read the missing size (500, KeyError)."""
    from orchestrator.gateway.keys import hash_key
    from orchestrator.gateway.store import SUBMITTING, GatewayStore

    video_id = "20260101-000000-0c1a1e"
    store = GatewayStore(Path(gateway.env["LTX2_STATE_DIR"]) / "http" / "gateway.sqlite")
    claim = {"id": video_id, "owner": hash_key(gateway.keys["alice"]), "created_at": 0, "model": TINY}
    store.add({**claim, "size": "", "seconds": "", "num_frames": 0, "fps": 24.0, "prompt": "p", "state": SUBMITTING})
    store.close()
    status, body = post(gateway, f"/v1/videos/{video_id}/remix", "alice", {"prompt": "p"})
    assert status == 400 and body["error"]["param"] == "video_id", body
    assert "was never rendered" in body["error"]["message"], body


def test_refusals_of_an_unknown_source_name_no_other_keys_video_ids(gateway: Gateway, source: dict):
    """The daemon's "nearest: A, B" after an unknown job id lists every key's jobs; a client is told none."""
    near = source["id"][:-1] + ("1" if source["id"].endswith("0") else "0")
    from orchestrator.gateway.keys import hash_key
    from orchestrator.gateway.store import SUBMITTING, GatewayStore

    # bob's claim of an id one character off alice's video: the gateway lets it through, the daemon has no such job.
    store = GatewayStore(Path(gateway.env["LTX2_STATE_DIR"]) / "http" / "gateway.sqlite")
    claim = {"id": near, "owner": hash_key(gateway.keys["bob"]), "created_at": 0, "model": TINY, "size": ""}
    store.add({**claim, "seconds": "", "num_frames": 0, "fps": 24.0, "prompt": "p", "state": SUBMITTING})
    store.close()
    status, body = post(gateway, "/v1/videos", "bob", {"prompt": "p", "extend": near})
    assert status == 400 and body["error"]["param"] == "extend", body
    assert source["id"] not in body["error"]["message"] and "nearest" not in body["error"]["message"], body


def test_an_extension_sent_again_is_its_video_even_after_its_source_was_deleted(gateway: Gateway, source: dict):
    """Last in the module: it deletes the source. A create sent again with its Idempotency-Key answers with
    the video it made; a new request naming the deleted source is 404, as for any video the key does not have.
    A whole-clip remix, whose range comes from its source, is its video when sent again too."""
    fields = {"prompt": "the ball stops", "extend": source["id"], "overlap": OVERLAP, "num_frames": 17, **CHEAP}
    remix = f"/v1/videos/{source['id']}/remix"

    def send(given: dict, key: str, path: str = "/v1/videos") -> tuple[int, dict]:
        headers = {"Content-Type": "application/json", "Idempotency-Key": key}
        status, _, body = gateway.request("POST", path, "alice", json.dumps(given).encode(), headers)
        return status, json.loads(body)

    status, first = send(fields, "extend-once")
    assert status == 200, first
    status, remixed = send({"prompt": "night", **CHEAP}, "remix-once", remix)
    assert status == 200, remixed
    assert gateway.request("DELETE", f"/v1/videos/{source['id']}", "alice")[0] == 200
    status, again = send(fields, "extend-once")
    assert (status, again["id"]) == (200, first["id"]), again
    status, again = send({"prompt": "night", **CHEAP}, "remix-once", remix)
    assert (status, again["id"]) == (200, remixed["id"]), again
    status, refused = send(fields, "extend-twice")
    assert status == 404 and refused["error"]["param"] == "extend", refused
    status, refused = send({"prompt": "night", **CHEAP}, "remix-twice", remix)
    assert status == 404 and refused["error"]["param"] == "video_id", refused
    assert wait_done(gateway, "alice", first["id"])["status"] == "completed"  # its copy of the source was taken
    assert gateway.request("DELETE", f"/v1/videos/{remixed['id']}", "alice")[0] == 200
