"""`ltx2 serve`, the OpenAI-style HTTP gateway: the official `openai` client against a real uvicorn
(`ltx2 serve` in a subprocess) in front of a real daemon rendering the tiny model on CPU.

Nothing is mocked: keys come from `ltx2 keys --http`, every check asks the daemon itself what was
queued, and the videos are probed with PyAV.
"""

from __future__ import annotations

import io
import json
import os
import statistics
import struct
import sys
import threading
import time
import typing
import uuid
from pathlib import Path

import pytest
from conftest import probe_mp4, run_ltx2
from gateway_process import HTTP_CONFIG, TINY, Gateway, free_port, stop
from prometheus_client.parser import text_string_to_metric_families

from config.settings import load_settings
from orchestrator.gateway.video_requests import parse_video_request
from protocol.model_ids import TINY_REPO_ID
from protocol.spec import JobSpec

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the client marks the Sora API deprecated

RENDER_TIMEOUT_S = 400.0


@pytest.fixture(scope="module")
def gateway(hf_home: Path, tmp_path_factory: pytest.TempPathFactory):
    with Gateway(tmp_path_factory.mktemp("http"), hf_home) as running:
        yield running


def png_bytes(width: int, height: int, size_hint: int = 0) -> bytes:
    """A real PNG (noise when `size_hint` asks for a large file)."""
    from PIL import Image

    pixels = os.urandom(width * height * 3) if size_hint else bytes(range(256)) * (width * height * 3 // 256 + 1)
    image = Image.frombytes("RGB", (width, height), pixels[: width * height * 3])
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def wait_until(client: openai.OpenAI, video_id: str, statuses: set[str], timeout_s: float = RENDER_TIMEOUT_S):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        video = client.videos.retrieve(video_id)
        if video.status in statuses:
            return video
        time.sleep(0.5)
    raise TimeoutError(f"video {video_id} never reached {statuses}")


def test_keys_are_stored_hashed_and_printed_once(gateway):
    keys_file = Path(gateway.env["LTX2_STATE_DIR"]) / "http" / "keys.json"
    stored = keys_file.read_text()
    assert oct(keys_file.stat().st_mode & 0o777) == "0o600"
    assert set(json.loads(stored)) == {"alice", "bob", "carol"}
    for key in gateway.keys.values():
        assert key.startswith("ltx2-") and key not in stored
    again = run_ltx2(["keys", "--http", "alice"], gateway.env)
    assert again.returncode == 2 and "already exists" in again.stderr and again.stdout == ""


def test_openai_client_renders_lists_downloads_and_deletes(gateway):
    client = gateway.client()
    image = png_bytes(64, 64)
    first = client.videos.create(
        prompt="a red ball rolls across a table",
        model=TINY,
        size="64x64",
        seconds="0.7",
        input_reference=("first.png", image, "image/png"),
        extra_body={"seed": 11},
    )
    assert first.object == "video" and first.status in ("queued", "in_progress")
    assert first.model == "ltx2-stages/tiny-random-ltx2" and first.size == "64x64"
    assert first.seconds == "0.708"  # as long as the clip lasts: 17 frames at 24 fps (0.7 s was asked)
    assert first.model_extra["num_frames"] == 17  # 0.7 s x 24 fps = 16.8 -> the next 8n+1
    assert "17 frames" in first.model_extra["seconds_mapping"]
    # The upload reached the daemon as a path inside the gateway's uploads dir, was copied into the
    # job and removed from the uploads dir.
    uploads = Path(gateway.env["LTX2_STATE_DIR"]) / "http" / "uploads"
    job_dir = Path(gateway.daemon_job(first.id)["job_dir"])
    assert json.loads((job_dir / "job.json").read_text())["spec"]["image"].startswith(str(uploads))
    assert gateway.upload_files() == []

    second = client.videos.create(prompt="a short blue wave", model=TINY, size="64x64", seconds="0.3")
    assert second.model_extra["num_frames"] == 9

    done = wait_until(client, first.id, {"completed", "failed"})
    assert done.status == "completed", gateway.daemon_job(first.id)
    assert done.progress == 100 and done.completed_at >= done.created_at and done.error is None
    assert done.model_extra["seconds_mapping"] == first.model_extra["seconds_mapping"]
    mp4 = gateway.root / "first.mp4"
    client.videos.download_content(first.id).write_to_file(mp4)
    probe = probe_mp4(mp4)
    assert (probe["frames"], probe["width"], probe["height"]) == (17, 64, 64)
    assert probe["video_codec"] == "h264" and probe["audio_codec"] == "aac" and probe["audio_seconds"] > 0.6

    thumbnail = client.videos.download_content(first.id, variant="thumbnail").content
    assert thumbnail.startswith(b"\x89PNG\r\n\x1a\n")
    assert struct.unpack(">II", thumbnail[16:24]) == (64, 64)

    whole = mp4.read_bytes()
    status, headers, part = gateway.get(f"/v1/videos/{first.id}/content", "alice", {"Range": "bytes=100-1099"})
    assert status == 206 and part == whole[100:1100]
    assert headers["content-range"] == f"bytes 100-1099/{len(whole)}"

    assert wait_until(client, second.id, {"completed", "failed"}).status == "completed"
    page = client.videos.list(limit=1)
    assert [video.id for video in page.data] == [second.id] and page.has_more
    assert [video.id for video in client.videos.list(limit=1)]  # every page == [second.id, first.id]
    assert [video.id for video in client.videos.list(order="asc").data] == [first.id, second.id]

    assert_reuse_returns_this_keys_video_only(gateway, first.id, image)

    published = Path(gateway.daemon_job(first.id)["output"])
    assert published.is_file() and published.with_name(f"{published.stem}_first.png").is_file()
    deleted = client.videos.delete(first.id)
    assert deleted.deleted and deleted.id == first.id and deleted.object == "video.deleted"
    assert not published.exists() and not published.with_name(f"{published.stem}_first.png").exists()
    with pytest.raises(openai.NotFoundError):
        client.videos.retrieve(first.id)
    assert [video.id for video in client.videos.list().data] == [second.id]
    client.videos.delete(second.id)


def test_openais_example_falls_back_to_the_tiny_model_and_is_delivered_at_the_size_asked(gateway):
    """OpenAI's own create (`sora-2`, the client's default size 720x1280, seconds "4") on a machine
    without the default model's weights (the test cache holds only the tiny model): it runs the
    fallback as `ltx2 generate` does, and says so; 720 is no multiple of 32, so it renders at
    736x1280 and is cropped back. The tiny VAE compresses 4x, so that size takes many minutes on CPU:
    it is checked at create and dropped, and a small size delivered the same way (72x40, an
    `http.exact_sizes` of this gateway: rendered at 96x64) renders and arrives at exactly that size."""
    client = gateway.client()
    openai_default = client.videos.create(prompt="a lighthouse", model="sora-2", size="720x1280", seconds="4")
    assert openai_default.model == TINY_REPO_ID, openai_default
    assert openai_default.model_extra["model_note"].startswith("tiny offline model")
    assert openai_default.model_extra["notices"][0].startswith("no weights for rootonchair/LTX-2-19b-distilled in")
    assert (openai_default.size, openai_default.seconds) == ("720x1280", "4.042")  # as long as 97 frames last
    spec = json.loads((Path(gateway.daemon_job(openai_default.id)["job_dir"]) / "job.json").read_text())["spec"]
    assert (spec["width"], spec["height"], spec["crop_width"], spec["crop_height"]) == (736, 1280, 720, None)
    assert client.videos.delete(openai_default.id).deleted

    # The example of docs/http-api.md names the default model by its short name: the same fallback.
    readme = client.videos.create(prompt="a quiet pond", model="ltx-2-distilled", size="64x64", seconds="0.3")
    assert readme.model == TINY_REPO_ID and readme.model_extra["model_note"] is not None
    assert client.videos.delete(readme.id).deleted

    video = client.videos.create(
        prompt="a lighthouse at dusk", model="sora-2", size="72x40", seconds="4", extra_body={"fps": 2, "seed": 3}
    )
    assert (video.model, video.size, video.seconds) == (TINY_REPO_ID, "72x40", "4.5")
    assert video.model_extra["num_frames"] == 9  # 4 s at 2 fps: 8 frames, and a clip has 8n+1
    assert video.model_extra["seconds_mapping"] == "4 s at 2 fps -> 9 frames (4.500 s)"
    done = wait_until(client, video.id, {"completed", "failed"})
    assert done.status == "completed", gateway.daemon_job(video.id)
    assert (done.model, done.size, done.seconds) == (TINY_REPO_ID, "72x40", "4.5")
    assert done.model_extra["seconds_mapping"] == video.model_extra["seconds_mapping"]
    mp4 = gateway.root / "exact.mp4"
    client.videos.download_content(video.id).write_to_file(mp4)
    probe = probe_mp4(mp4)
    assert (probe["width"], probe["height"], probe["frames"]) == (72, 40, 9)
    assert probe["audio_seconds"] >= 4.5
    thumbnail = client.videos.download_content(video.id, variant="thumbnail").content
    assert struct.unpack(">II", thumbnail[16:24]) == (72, 40)
    sidecar = json.loads(Path(gateway.daemon_job(video.id)["output"]).with_suffix(".json").read_text())
    assert sidecar["size"] == {"rendered": [96, 64], "delivered": [72, 40], "crop_box": [12, 12, 72, 40]}
    client.videos.delete(video.id)


@pytest.mark.parametrize("size", typing.get_args(openai.types.VideoSize))
@pytest.mark.parametrize("pipeline", [None, "two-stage"])
def test_every_size_the_openai_client_offers_renders_at_the_next_size_up_and_crops_to_it(
    size: str, pipeline: str | None, tmp_path: Path
):
    settings = load_settings(environ={"HOME": str(tmp_path)})
    asked = tuple(int(side) for side in size.split("x"))
    fields = {"prompt": "a cat", "size": size, **({"pipeline": pipeline} if pipeline else {})}
    spec = parse_video_request(fields, settings).spec
    multiple = 64 if pipeline else 32  # two-stage's first stage runs at half the size
    rendered = (spec["width"], spec["height"])
    assert all(side % multiple == 0 and 0 <= side - want < multiple for side, want in zip(rendered, asked, strict=True))
    full = JobSpec.from_dict({**spec, "model": "m", "num_frames": 9, "steps": 8, "seed": 1})
    assert full.crop_box[2:] == asked  # delivered exactly; centred in the render
    assert full.crop_box[:2] == ((rendered[0] - asked[0]) // 2, (rendered[1] - asked[1]) // 2)


def test_openais_model_names_are_aliases_and_the_default_models_leave_the_choice_to_the_daemon(tmp_path: Path):
    settings = load_settings(environ={"HOME": str(tmp_path)})
    (names,) = [typing.get_args(arg) for arg in typing.get_args(openai.types.VideoModel) if typing.get_args(arg)]
    for name in names:
        spec = parse_video_request({"prompt": "a cat", "model": name}, settings).spec
        # No model: the daemon's default, or its fallback when not cached (orchestrator.run.jobspec).
        assert spec.get("model") == ("Lightricks/LTX-2" if name.startswith("sora-2-pro") else None), name
    assert "model" not in parse_video_request({"prompt": "a cat", "model": "ltx-2-distilled"}, settings).spec
    # A repo id in full names exact weights, as --model does: no fallback for it.
    named = parse_video_request({"prompt": "a cat", "model": "rootonchair/LTX-2-19b-distilled"}, settings)
    assert named.spec["model"] == "rootonchair/LTX-2-19b-distilled"


def assert_reuse_returns_this_keys_video_only(gateway, video_id: str, image: bytes) -> None:
    """The finished video's request again with `reuse`: this key's video comes back and nothing renders;
    another key never gets it (its request renders as its own video)."""
    request = {"prompt": "a red ball rolls across a table", "model": TINY, "size": "64x64", "seconds": "0.7"}
    reference = ("again.png", image, "image/png")
    again = gateway.client().videos.create(**request, input_reference=reference, extra_body={"seed": 11, "reuse": True})
    assert again.id == video_id and again.status == "completed", again
    assert again.model_extra["notices"][0].startswith(f"reused job {video_id} ")
    bob = gateway.client("bob")
    theirs = bob.videos.create(**request, input_reference=reference, extra_body={"seed": 11, "reuse": True})
    assert theirs.id != video_id and "notices" not in theirs.model_extra
    bob.videos.delete(theirs.id)


def test_missing_or_wrong_key_is_401_and_other_keys_jobs_are_404(gateway):
    status, headers, body = gateway.get("/v1/videos")
    assert status == 401 and headers["www-authenticate"] == "Bearer"
    assert json.loads(body)["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        gateway.client("ltx2-not-a-key").videos.list()
    status, _, body = gateway.request("POST", "/v1/videos", "wrong", b"{}", {"Content-Type": "application/json"})
    assert status == 401

    owned = {"prompt": "owned by alice", "model": TINY, "size": "64x64", "seconds": 0.3}  # JSON: seconds a number
    status, _, video = gateway.post_json("alice", owned)
    assert status == 200 and video["num_frames"] == 9 and video["seconds_mapping"].startswith("0.3 s at"), video
    assert video["seconds"] == "0.375"  # as long as the 9 frames last
    bob = gateway.client("bob")
    with pytest.raises(openai.NotFoundError):
        bob.videos.retrieve(video["id"])
    with pytest.raises(openai.NotFoundError):
        bob.videos.download_content(video["id"])
    with pytest.raises(openai.NotFoundError):
        bob.videos.delete(video["id"])
    assert video["id"] not in [v.id for v in bob.videos.list().data]
    # The job's log (the job page's) is alice's alone too: bob gets what an unknown id gets, no key 401.
    log = f"/v1/videos/{video['id']}/log"
    assert gateway.get(log, "bob")[0] == 404 and gateway.get(log)[0] == 401
    status, _, body = gateway.get(log, "alice")
    mine = json.loads(body)
    assert status == 200 and mine["object"] == "video.log" and mine["id"] == video["id"], mine
    assert "job_queued" in mine["events"][0], mine  # formatted as `ltx2 logs` shows them
    assert len(json.loads(gateway.get(log + "?lines=1", "alice")[2])["events"]) == 1
    assert gateway.get(log + "?lines=0", "alice")[0] == 400
    # Which key is in use, by name: what the job page shows.
    assert [json.loads(gateway.get("/v1/key", name)[2])["name"] for name in ("alice", "bob")] == ["alice", "bob"]
    assert gateway.client().videos.retrieve(video["id"]).id == video["id"]  # bob's delete did nothing
    assert gateway.client().videos.delete(video["id"]).deleted
    assert gateway.daemon_job(video["id"])["state"] in ("cancelled", "done")


def test_per_key_queue_cap_is_429_with_retry_after(gateway):
    before = len(gateway.daemon_jobs())
    made = []
    for n in range(2):
        status, _, video = gateway.post_json("carol", {"prompt": f"carol {n}", "model": TINY, "size": "64x64"})
        assert status == 200, video
        made.append(video["id"])
    status, headers, refused = gateway.post_json("carol", {"prompt": "one too many", "model": TINY, "size": "64x64"})
    assert status == 429 and int(headers["retry-after"]) > 0
    assert refused["error"]["code"] == "too_many_active_videos"
    assert len(gateway.daemon_jobs()) == before + 2
    for video_id in made:
        assert gateway.client("carol").videos.delete(video_id).deleted
    status, _, video = gateway.post_json("carol", {"prompt": "room again", "model": TINY, "size": "64x64"})
    assert status == 200  # both ended: the key may queue again
    assert gateway.client("carol").videos.delete(video["id"]).deleted


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"size": "abc"}, "size"),
        ({"size": "65x64"}, "size"),  # refused by the daemon's spec validation, named as the HTTP field
        ({"seconds": "-1"}, "seconds"),
        ({"seconds": "many"}, "seconds"),
        ({"model": "sora-3"}, "model"),
        ({"model": "/etc"}, "model"),
        ({"prompt": "x" * 1_000_000}, "prompt"),
        ({"num_frames": 10}, "num_frames"),
        ({"seed": "eleven"}, "seed"),
        ({"loras": '["/tmp/evil.safetensors"]'}, "loras"),
        ({"loras": '["../../etc"]'}, "loras"),
    ],
)
def test_malformed_fields_are_400_naming_the_field_and_queue_nothing(gateway, fields, param):
    before, pid = len(gateway.daemon_jobs()), gateway.daemon_pid()
    request = {"prompt": "a valid prompt", "model": TINY, "size": "64x64", **fields}
    client = gateway.client()
    with pytest.raises(openai.BadRequestError) as refused:  # as multipart, the way the client sends
        extra = {k: v for k, v in request.items() if k not in ("prompt", "model", "size", "seconds")}
        client.videos.create(
            prompt=request["prompt"],
            model=request["model"],
            size=request["size"],
            **({"seconds": request["seconds"]} if "seconds" in request else {}),
            extra_body=extra or None,
        )
    assert refused.value.param == param, refused.value.body
    status, _, body = gateway.post_json("alice", request)  # and as JSON
    assert status == 400 and body["error"]["param"] == param and body["error"]["type"] == "invalid_request_error"
    assert len(gateway.daemon_jobs()) == before and gateway.daemon_pid() == pid


NAG_FIELDS = {"negative_prompt": "blurry, dark", "nag_scale": 5, "nag_tau": 3, "nag_alpha": 0.5, "nag_steps": 2}


def test_nag_fields_reach_the_job_spec_and_the_video_renders(gateway):
    client = gateway.client("bob")
    extra = {key: value for key, value in NAG_FIELDS.items() if key != "negative_prompt"}
    video = client.videos.create(  # multipart: the numbers travel as text
        prompt="a kite over a beach",
        model=TINY,
        size="64x64",
        seconds="0.3",
        extra_body={"negative_prompt": NAG_FIELDS["negative_prompt"], **extra},
    )
    job_dir = Path(gateway.daemon_job(video.id)["job_dir"])
    spec = json.loads((job_dir / "job.json").read_text())["spec"]
    expected = {**NAG_FIELDS, "nag_scale": 5.0, "nag_tau": 3.0}
    assert {key: spec[key] for key in expected} == expected
    assert wait_until(client, video.id, {"completed", "failed"}).status == "completed", gateway.daemon_job(video.id)
    client.videos.delete(video.id)


@pytest.mark.parametrize(
    ("fields", "param", "message"),
    [
        ({"nag_scale": 0}, "nag_scale", "nag_scale: must be between 1.0 and 30.0; got 0.0"),
        ({"nag_scale": "strong"}, "nag_scale", "nag_scale must be a number; got 'strong'"),
        ({"nag_scale": 5, "nag_tau": 0}, "nag_tau", "nag_tau: must be a finite number above 0; got 0.0"),
        ({"nag_scale": 5, "nag_alpha": 1.5}, "nag_alpha", "nag_alpha: must be between 0.0 and 1.0; got 1.5"),
        ({"nag_scale": 5, "nag_steps": -1}, "nag_steps", "nag_steps: must be 0 or more"),
        ({"nag_scale": 5, "nag_steps": 1.5}, "nag_steps", "nag_steps must be a whole number; got 1.5"),
    ],
)
def test_invalid_nag_fields_are_400_naming_the_field_with_the_flags_rule(gateway, fields, param, message):
    before = len(gateway.daemon_jobs())
    request = {"prompt": "a kite", "model": TINY, "size": "64x64", "negative_prompt": "blurry", **fields}
    status, _, body = gateway.post_json("alice", request)
    assert status == 400 and body["error"]["param"] == param, body
    assert message in body["error"]["message"]
    assert "--" not in body["error"]["message"], body  # HTTP field names, never the CLI's flags
    assert len(gateway.daemon_jobs()) == before


@pytest.mark.parametrize(
    ("fields", "param", "message"),
    [
        ({"pipeline": "three-stage"}, "pipeline", "pipeline: must be one of one-stage, two-stage"),
        ({"pipeline": "two-stage"}, "size", "size: width two-stage needs a multiple of 64"),  # 64x64: too small
        ({"stg_scale": 11}, "stg_scale", "stg_scale: must be between 0.0 and 10.0"),
        ({"guidance_rescale": "high"}, "guidance_rescale", "guidance_rescale must be a number; got 'high'"),
        ({"size": "96x80"}, "size", "size: height must be a multiple of 32 between 64 and 4096; got 80"),
        ({"steps": 4}, "steps", "steps: the distilled schedule has exactly 8 steps; got 4 (use schedule default for"),
    ],
)
def test_pipeline_and_guidance_fields_are_checked_as_the_flags_are(gateway, fields, param, message):
    before = len(gateway.daemon_jobs())
    status, _, body = gateway.post_json("alice", {"prompt": "a kite", "model": TINY, "size": "64x64", **fields})
    assert status == 400 and body["error"]["param"] == param, body
    assert message in body["error"]["message"], body
    assert "--" not in body["error"]["message"], body  # HTTP field names, never the CLI's flags
    assert len(gateway.daemon_jobs()) == before


def test_a_two_stage_request_records_its_pipeline(gateway):
    status, _, body = gateway.post_json(
        "alice", {"prompt": "a kite", "model": TINY, "size": "128x128", "pipeline": "two-stage", "stg_scale": 0.5}
    )
    assert status == 200, body
    spec = json.loads((Path(gateway.daemon_job(body["id"])["job_dir"]) / "job.json").read_text())["spec"]
    assert (spec["pipeline"], spec["stg_scale"]) == ("two-stage", 0.5)
    gateway.client("alice").videos.delete(body["id"])


def test_keyframes_are_file_parts_named_by_conditions(gateway):
    """`conditions` names the form's file parts; the daemon receives them as uploads it copies into the
    job, and refuses a bad frame naming the part, never the server's path to it."""
    from test_http_gateway_hostile import multipart, openai_error

    fields = {"prompt": b"a bird lands", "model": TINY.encode(), "size": b"64x64", "num_frames": b"17"}
    last = png_bytes(80, 64)
    body, headers = multipart({**fields, "conditions": b'["last@-1:0.5"]'}, {"last": last})
    status, _, answer = gateway.request("POST", "/v1/videos", "alice", body, headers)
    assert status == 200, answer
    video_id = json.loads(answer)["id"]
    record = json.loads((Path(gateway.daemon_job(video_id)["job_dir"]) / "job.json").read_text())
    (condition,) = record["conditions"]
    assert (condition["frame"], condition["latent_index"], condition["strength"]) == (13, 4, 0.5)
    assert (Path(record["spec"]["conditions"][0]["source"]).parent.parent.name, condition["file"]) == (
        "uploads",
        "condition_0.png",
    )
    assert gateway.upload_files() == []
    gateway.client("alice").videos.delete(video_id)

    before = len(gateway.daemon_jobs())
    body, headers = multipart({**fields, "conditions": b'["last@3"]'}, {"last": last})
    status, _, answer = gateway.request("POST", "/v1/videos", "alice", body, headers)
    error = openai_error(answer)
    assert status == 400 and error["param"] == "conditions", answer
    assert error["message"].startswith("conditions: last@3:1: frame 3 is not where") and "/" not in error["message"]
    status, _, answer = gateway.post_json("alice", {"prompt": "x", "conditions": ["last"]})
    assert status == 400 and answer["error"]["param"] == "conditions"
    assert len(gateway.daemon_jobs()) == before and gateway.upload_files() == []


def test_a_soundtrack_is_the_file_part_audio(gateway, tmp_path: Path):
    """Audio-to-video over HTTP: the `audio` file part is stored, handed to the daemon as the spec's `audio`,
    copied into the job; something else under that name, or `audio` in JSON, is refused naming the field."""
    from test_audio_to_video import write_wav
    from test_http_gateway_hostile import multipart, openai_error

    write_wav(tmp_path / "song.wav", 1.0)
    fields = {"prompt": b"a drummer", "model": TINY.encode(), "size": b"64x64", "num_frames": b"17"}
    body, headers = multipart(fields, {"audio": (tmp_path / "song.wav").read_bytes()})
    status, _, answer = gateway.request("POST", "/v1/videos", "alice", body, headers)
    assert status == 200, answer
    video_id = json.loads(answer)["id"]
    job_dir = Path(gateway.daemon_job(video_id)["job_dir"])
    record = json.loads((job_dir / "job.json").read_text())
    assert record["audio"]["file"] == "input_audio.wav"
    assert (job_dir / "input_audio.wav").read_bytes() == (tmp_path / "song.wav").read_bytes()
    assert gateway.upload_files() == []
    gateway.client("alice").videos.delete(video_id)

    before = len(gateway.daemon_jobs())
    body, headers = multipart(fields, {"audio": b"these are not sounds"})
    status, _, answer = gateway.request("POST", "/v1/videos", "alice", body, headers)
    assert status == 400 and openai_error(answer)["param"] == "audio", answer
    status, _, answer = gateway.post_json("alice", {"prompt": "x", "audio": "/etc/passwd"})
    assert status == 400 and answer["error"]["param"] == "audio"
    assert len(gateway.daemon_jobs()) == before and gateway.upload_files() == []


def test_oversized_upload_is_413_and_queues_nothing(gateway):
    before = len(gateway.daemon_jobs())
    big = png_bytes(512, 512, size_hint=1)
    assert len(big) > 524288
    with pytest.raises(openai.APIStatusError) as refused:
        gateway.client().videos.create(
            prompt="too big", model=TINY, size="64x64", input_reference=("big.png", big, "image/png")
        )
    assert refused.value.status_code == 413 and refused.value.param == "input_reference"
    with pytest.raises(openai.BadRequestError) as refused:  # not an image at all
        gateway.client().videos.create(prompt="x", model=TINY, input_reference=("a.png", b"#!/bin/sh", "image/png"))
    assert refused.value.param == "input_reference"
    # A body declared over http.max_body_bytes is refused before the gateway reads it.
    status, _, body = gateway.request(
        "POST",
        "/v1/videos",
        "alice",
        b"{}",
        {"Content-Type": "application/json", "Content-Length": str(5 * 1024 * 1024)},
    )
    assert status == 413 and json.loads(body)["error"]["code"] == "too_large"
    assert len(gateway.daemon_jobs()) == before
    assert gateway.upload_files() == []


def test_200_concurrent_retrieves_while_a_job_runs(gateway, capsys: pytest.CaptureFixture):
    client = gateway.client("bob")
    video = client.videos.create(prompt="load test", model=TINY, size="64x64", seconds="0.7", extra_body={"seed": 5})
    wait_until(client, video.id, {"in_progress", "completed"})
    path = f"/v1/videos/{video.id}"
    barrier = threading.Barrier(200)
    results: list[tuple[int, float, str]] = [(0, 0.0, "")] * 200

    def fetch(index: int) -> None:
        barrier.wait()
        started = time.perf_counter()
        status, _, body = gateway.get(path, "bob")
        results[index] = (status, time.perf_counter() - started, json.loads(body).get("id", ""))

    threads = [threading.Thread(target=fetch, args=(n,)) for n in range(200)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [status for status, _, _ in results] == [200] * 200
    assert {video_id for _, _, video_id in results} == {video.id}
    latencies = sorted(seconds for _, seconds, _ in results)
    p99 = latencies[int(len(latencies) * 0.99) - 1]
    with capsys.disabled():  # reported, not asserted: latency depends on the host
        sys.stdout.write(
            f"\n200 concurrent GET /v1/videos/{{id}}: p50 {statistics.median(latencies) * 1000:.0f} ms, "
            f"p99 {p99 * 1000:.0f} ms, max {latencies[-1] * 1000:.0f} ms\n"
        )
    assert gateway.daemon_job(video.id)["state"] in ("running", "done")
    deleted = client.videos.delete(video.id)  # cancels it if it still runs
    assert deleted.deleted
    assert gateway.daemon_job(video.id)["state"] in ("cancelled", "done")


def test_requests_over_the_per_minute_limit_are_429_with_retry_after(gateway):
    strict = gateway.root / "strict.toml"
    strict.write_text(HTTP_CONFIG.replace("requests_per_minute = 100000", "requests_per_minute = 3"))
    port = free_port()
    server = gateway.start_server(port, {**gateway.env, "LTX2_CONFIG": str(strict)}, "strict-serve.log")
    try:
        assert [gateway.request("GET", "/v1/videos", "alice", port=port)[0] for _ in range(3)] == [200] * 3
        status, headers, body = gateway.request("GET", "/v1/videos", "alice", port=port)
        assert status == 429 and 0 < int(headers["retry-after"]) <= 60
        assert json.loads(body)["error"]["code"] == "rate_limit_exceeded"
        assert gateway.request("GET", "/v1/videos", "bob", port=port)[0] == 200  # each key has its own minute
    finally:
        stop(server)


def test_healthz_and_metrics(gateway):
    client = gateway.client()  # one video of its own, so the test holds when run alone
    video = client.videos.create(prompt="a metronome", model=TINY, size="64x64", extra_body={"num_frames": 9})
    assert wait_until(client, video.id, {"completed", "failed"}).status == "completed"
    status, _, body = gateway.get("/healthz")
    assert status == 200 and json.loads(body)["status"] == "ok"
    assert gateway.get("/metrics")[0] == 401
    assert gateway.get("/metrics", "alice")[0] == 403  # only http.metrics_keys may read every key's counts
    status, headers, body = gateway.get("/metrics", "carol")
    text = body.decode()
    assert status == 200 and headers["content-type"].startswith("text/plain")
    assert "ltx2_daemon_up 1.0" in text
    done = sum(1 for job in gateway.daemon_jobs() if job["state"] == "done")
    assert f'ltx2_jobs{{state="done"}} {float(done)}' in text
    assert "ltx2_queue_depth" in text
    assert 'ltx2_stage_seconds_count{result="ok",stage="encode_diffuse"}' in text
    # The gauges hold the highest peak of the attempts this gateway saw end: its own retrieves
    # (this test's video among them) and not the jobs another server on this daemon retrieved, so
    # each gauge is one attempt's peak, at least this video's and at most every job's highest.
    seen: dict[str, set[int]] = {}
    for listed in gateway.daemon_jobs():
        for attempt in gateway.daemon_job(listed["id"])["attempts"]:
            seen.setdefault(attempt["stage"], set()).add(attempt["peak_rss_bytes"])
    own: dict[str, int] = {}
    for attempt in gateway.daemon_job(video.id)["attempts"]:
        own[attempt["stage"]] = max(own.get(attempt["stage"], 0), attempt["peak_rss_bytes"])
    samples = {
        (sample.name, sample.labels.get("stage")): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    assert set(seen) == set(own) == {"encode_diffuse", "audio_decode", "video_decode"}
    for stage, peaks in seen.items():
        gauge = samples[("ltx2_stage_peak_rss_bytes", stage)]
        assert 0 < own[stage] <= gauge <= max(peaks) and gauge in peaks, (stage, gauge, own[stage], sorted(peaks))
        assert samples[("ltx2_stage_peak_gpu_bytes", stage)] == 0  # CPU workers: no GPU memory


def test_unknown_routes_and_methods_answer_openai_errors(gateway):
    status, _, body = gateway.get(f"/v1/nothing-{uuid.uuid4().hex}", "alice")
    assert status == 404 and "error" in json.loads(body)
    status, _, body = gateway.request("PUT", "/v1/videos", "alice", b"")
    assert status == 405 and json.loads(body)["error"]["type"] == "invalid_request_error"
