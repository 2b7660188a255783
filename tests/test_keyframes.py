"""--condition (keyframes): images and videos placed at pixel frames, through diffusers' LTX2ConditionPipeline.

The staged side runs the encode_diffuse stage on the tiny models of LTX-2.0 and 2.3 (fp32, CPU); the
reference is LTX2ConditionPipeline itself, given the same files with `LTX2VideoCondition`'s own
latent indices (-1 as diffusers reads it). The tiny VAE packs 4 frames into a latent frame, so a
17-frame clip has 5 latent frames, starting at pixel frames 0, 1, 5, 9 and 13.
"""

from __future__ import annotations

import json
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from conftest import FAMILY_MODEL_FIXTURES, TINY_ARGS, run_ltx2
from diffusers import LTX2ConditionPipeline
from diffusers.pipelines.ltx2.pipeline_ltx2_condition import LTX2VideoCondition
from PIL import Image

from config.settings import load_settings
from orchestrator.gateway.video_requests import RequestError, parse_video_request
from orchestrator.run.jobdir import JobDir
from orchestrator.run.jobspec import build_spec
from orchestrator.run.policy import initial_plan
from protocol.conditions import parse_condition_flag
from protocol.families import detect_family
from protocol.files import LATENTS_FILE, Stage
from protocol.spec_rules import SpecError
from protocol.stage_request import StageRequest
from services import encode_diffuse
from services.guidance import guidance_off
from services.latents import read_latents
from services.runtime import Reporter, WorkerContext

TOLERANCE = 1e-5
# Two denoising steps of the default schedule with guidance off: one transformer call per step.
CHEAP = {"width": 64, "height": 64, "num_frames": 17, "steps": 2, "schedule": "default", "seed": 7}
GUIDANCE_OFF = {
    "guidance_scale": 1.0,
    "audio_guidance_scale": 1.0,
    "stg_scale": 0.0,
    "modality_scale": 1.0,
    "guidance_rescale": 0.0,
}


def gradient(size: tuple[int, int], tint: int) -> np.ndarray:
    height, width = size
    ramp = np.linspace(0, 255, width, dtype=np.uint8)
    return np.stack(
        [np.tile(ramp, (height, 1)), np.tile(np.linspace(255, 0, height, dtype=np.uint8)[:, None], (1, width)),
         np.full((height, width), tint, np.uint8)], -1,
    )  # fmt: skip


def write_video(path: Path, frames: np.ndarray) -> None:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=24)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        for pixels in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)


def decoded_frames(path: Path) -> np.ndarray:
    """The video's frames as the reference hands them to diffusers (RGB uint8, [F, H, W, 3])."""
    with av.open(str(path)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


@pytest.fixture(scope="module")
def keyframe_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A first and a last image (wider than the clip: the pipeline crops them) and a 9-frame video."""
    folder = tmp_path_factory.mktemp("keyframes")
    files = {"first": folder / "first.png", "last": folder / "last.jpg", "clip": folder / "clip.mp4"}
    Image.fromarray(gradient((64, 96), 40)).save(files["first"])
    Image.fromarray(gradient((80, 64), 200)[::-1]).save(files["last"])
    moving = np.stack([np.roll(gradient((64, 64), 120), 6 * step, axis=1) for step in range(9)])
    write_video(files["clip"], moving)
    return files


def keyframes(files: dict[str, Path]) -> list[dict[str, object]]:
    """First image at frame 0, the video in the middle (frames 5-13), the last image at -1 at half strength."""
    return [
        {"source": str(files["first"])},
        {"source": str(files["clip"]), "frame": 5},
        {"source": str(files["last"]), "frame": -1, "strength": 0.5},
    ]


def render(
    model_dir: Path, state: Path, shared: dict | None = None, **request: object
) -> tuple[JobDir, dict[str, torch.Tensor]]:
    """The encode_diffuse stage, in this process, on a fresh job built as `ltx2 generate` builds it;
    `shared` is a group worker's dict of loaded models (one dict for several calls: one stage-major group)."""
    settings = load_settings(environ={"LTX2_STATE_DIR": str(state), "HOME": str(state)})
    fields = {"prompt": "a bird takes off", "model": str(model_dir), "dtype": "float32", **CHEAP, **GUIDANCE_OFF}
    built = build_spec({**fields, **request}, settings)
    job = JobDir.create(
        settings.jobs_dir, built.spec, built.model, image=built.image, conditions=built.conditions,
        identity=built.identity,
    )  # fmt: skip
    plan = initial_plan(Stage.ENCODE_DIFFUSE, built.spec, settings)
    reporter = Reporter(Stage.ENCODE_DIFFUSE, job.id, None)
    shared = {} if shared is None else shared
    ctx = WorkerContext(Stage.ENCODE_DIFFUSE, job.path, StageRequest.of(job.record), plan, 1, reporter, shared)
    encode_diffuse.run(ctx)
    return job, read_latents(job.path / LATENTS_FILE)[0]


def reference(model_dir: Path, conditions: list[LTX2VideoCondition], **extra: object) -> tuple[torch.Tensor, ...]:
    pipe = LTX2ConditionPipeline.from_pretrained(model_dir, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    size = {key: CHEAP[key] for key in ("width", "height", "num_frames")}
    with torch.no_grad():
        return pipe(
            conditions=conditions,
            prompt="a bird takes off",
            negative_prompt="",
            frame_rate=24.0,
            num_inference_steps=CHEAP["steps"],
            generator=torch.Generator().manual_seed(CHEAP["seed"]),
            output_type="latent",
            return_dict=False,
            **size,
            **guidance_off(detect_family(model_dir)),
            **extra,
        )


def reference_conditions(files: dict[str, Path]) -> list[LTX2VideoCondition]:
    """keyframes() as diffusers takes them: latent indices (pixel 5 is latent 2 at 4x), -1 as diffusers reads it."""
    return [
        LTX2VideoCondition(frames=Image.open(files["first"]).convert("RGB"), index=0),
        LTX2VideoCondition(frames=decoded_frames(files["clip"]), index=2),
        LTX2VideoCondition(frames=Image.open(files["last"]).convert("RGB"), index=-1, strength=0.5),
    ]


@pytest.fixture(scope="module", params=("2.0", "2.3"))
def keyframe_render(
    request: pytest.FixtureRequest, keyframe_files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, object]:
    """One keyframed render per family and its reference, shared by the asserts below."""
    model_dir = request.getfixturevalue(FAMILY_MODEL_FIXTURES[request.param])
    state = tmp_path_factory.mktemp(f"kf-{request.param}")
    job, staged = render(model_dir, state, conditions=keyframes(keyframe_files))
    video, audio = reference(model_dir, reference_conditions(keyframe_files))
    unconditioned, _ = reference(model_dir, [])
    return {
        "family": request.param, "job": job, "staged": staged, "video": video, "audio": audio,
        "unconditioned": unconditioned,
    }  # fmt: skip


def test_keyframe_latents_equal_ltx2_condition_pipeline(keyframe_render: dict):
    staged = keyframe_render["staged"]
    video_diff = float((staged["video"] - keyframe_render["video"]).abs().max())
    audio_diff = float((staged["audio"] - keyframe_render["audio"]).abs().max())
    assert staged["video"].shape == keyframe_render["video"].shape == (1, 4, 5, 16, 16)
    assert video_diff <= TOLERANCE and audio_diff <= TOLERANCE
    assert float((staged["video"] - keyframe_render["unconditioned"]).abs().max()) > 1e-2  # the keyframes act


def test_a_group_member_after_a_text_only_job_gets_the_lone_jobs_latents(
    keyframe_render: dict, keyframe_files: dict, tmp_path: Path
):
    """Stage-major: one process denoises a text-to-video job, then the keyframed one, on the models it
    loaded once (the VAE joins them for the keyframes); the keyframed latents are those of its lone run."""
    model_dir = Path(keyframe_render["job"].record.model_path)
    shared: dict = {}
    render(model_dir, tmp_path / "plain", shared)
    _, grouped = render(model_dir, tmp_path / "keyed", shared, conditions=keyframes(keyframe_files))
    assert "video_vae" in shared
    assert torch.equal(grouped["video"], keyframe_render["staged"]["video"])
    assert torch.equal(grouped["audio"], keyframe_render["staged"]["audio"])


def test_keyframes_render_under_nag_and_the_fp8_rung(tiny_model_dir: Path, tmp_path: Path, keyframe_files: dict):
    """NAG wraps the transformer's text attention and FP8 storage is the ladder's first lower-memory rung:
    neither cares that the sequence carries keyframe tokens."""
    conditions = [{"source": str(keyframe_files["last"]), "frame": -1}]
    _, plain = render(tiny_model_dir, tmp_path / "plain", conditions=conditions)
    guided = {"nag_scale": 5.0, "negative_prompt": "blurry", "fp8": True}
    job, nag_fp8 = render(tiny_model_dir, tmp_path / "nag", conditions=conditions, **guided)
    assert job.record.conditions[0].latent_index == 4
    assert torch.isfinite(nag_fp8["video"]).all() and nag_fp8["video"].shape == plain["video"].shape
    assert float((nag_fp8["video"] - plain["video"]).abs().max()) > 1e-3


def test_job_json_records_each_condition_resolved_and_copied(keyframe_render: dict, keyframe_files: dict):
    job: JobDir = keyframe_render["job"]
    first, clip, last = job.record.conditions
    assert (first.kind, first.frame, first.latent_index, first.strength) == ("image", 0, 0, 1.0)
    assert (clip.kind, clip.frames, clip.frame, clip.latent_index) == ("video", 9, 5, 2)
    assert (last.frame, last.latent_index, last.strength) == (13, 4, 0.5)  # -1: the last latent frame's start
    for condition, name in zip((first, clip, last), ("first", "clip", "last"), strict=True):
        assert (job.path / condition.file).read_bytes() == keyframe_files[name].read_bytes()
    digested = job.record.digest_inputs["conditions"]
    assert [entry["frame"] for entry in digested] == [0, 5, 13]
    assert digested[1]["sha256"] == clip.sha256


def test_the_digest_covers_the_condition_files_bytes(tiny_model_dir: Path, tmp_path: Path, keyframe_files: dict):
    settings = load_settings(environ={"LTX2_STATE_DIR": str(tmp_path / "state"), "HOME": str(tmp_path)})
    copy = tmp_path / "first.png"
    copy.write_bytes(keyframe_files["first"].read_bytes())
    request = {"prompt": "x", "model": str(tiny_model_dir), **CHEAP, "conditions": [f"{copy}@0:0.5"]}
    before = build_spec(request, settings).identity
    again = build_spec(request, settings).identity
    Image.fromarray(gradient((64, 96), 41)).save(copy)  # other pixels
    after = build_spec(request, settings).identity
    plain = build_spec({**request, "conditions": []}, settings).identity
    assert before.digest == again.digest != after.digest
    assert before.inputs["conditions"] == [
        {"sha256": before.inputs["conditions"][0]["sha256"], "frame": 0, "strength": 0.5, "crf": None}
    ]
    assert "conditions" not in plain.inputs  # a request without keyframes keeps the digest it had before them


def test_two_stage_conditions_both_stages_as_diffusers_composition(
    tiny_model_dir: Path, tmp_path: Path, keyframe_files: dict
):
    """Two-stage gives each pass the keyframes: LTX2ConditionPipeline encodes them again at stage 2's
    size and places them on the upsampled latents (diffusers' two-stage composition, conditions in both calls)."""
    from test_parity import load_reference
    from test_two_stage import reference_two_stage

    two_stage = {"width": 128, "height": 128, "num_frames": 9, "pipeline": "two-stage", "schedule": "distilled"}
    conditions = [{"source": str(keyframe_files["first"])}, {"source": str(keyframe_files["last"]), "frame": -1}]
    job, staged = render(tiny_model_dir, tmp_path, **two_stage, steps=8, conditions=conditions)
    assert [condition.latent_index for condition in job.record.conditions] == [0, 2]
    pipe = load_reference(tiny_model_dir, "distilled")
    pipe = LTX2ConditionPipeline.from_pipe(pipe)
    pipe.set_progress_bar_config(disable=True)
    first = Image.open(keyframe_files["first"]).convert("RGB")
    last = Image.open(keyframe_files["last"]).convert("RGB")
    keyed = [LTX2VideoCondition(frames=first, index=0), LTX2VideoCondition(frames=last, index=-1)]
    video, audio = reference_two_stage(
        pipe, tiny_model_dir, job.spec, "2.0", output_types=("latent",), conditions=keyed
    )["latent"]
    assert staged["video"].shape == video.shape == (1, 4, 3, 32, 32)
    assert float((staged["video"] - video).abs().max()) <= TOLERANCE
    assert float((staged["audio"] - audio).abs().max()) <= TOLERANCE


@pytest.mark.parametrize(
    ("condition", "message"),
    [
        ("{first}@17", "frame 17 is outside the clip (frames 0 to 16"),
        ("{first}@3", "frame 3 is not where a latent frame starts"),
        ("{first}@3", "nearest allowed: 1 or 5"),
        ("{first}@-2", "or -1 (the last start); got -2"),
        ("{first}:1.5", "the strength must be between 0.0 and 1.0; got 1.5"),
        ("{notes}", "cannot read"),
        ("{missing}", "does not exist or is not a file"),
        ("{clip}@13", "its 9 frames from frame 13 run to frame 21, past the clip's last frame 16"),
    ],
)
def test_bad_conditions_exit_2_naming_the_flag_before_any_job(
    ltx2_env: dict, tmp_path: Path, keyframe_files: dict, condition: str, message: str
):
    (tmp_path / "notes.png").write_text("this is not a picture")
    paths = {"first": keyframe_files["first"], "clip": keyframe_files["clip"]}
    value = condition.format(**paths, notes=tmp_path / "notes.png", missing=tmp_path / "missing.png")
    args = ["generate", "--prompt", "x", "--model", "ltx2-stages/tiny-random-ltx2", *TINY_ARGS, "--condition", value]
    result = run_ltx2(args, ltx2_env)
    assert result.returncode == 2, result.stderr
    assert "--condition" in result.stderr and message in result.stderr, result.stderr
    assert not (Path(ltx2_env["LTX2_STATE_DIR"]) / "jobs").exists()


def test_condition_crf_needs_a_condition_and_an_image(ltx2_env: dict, keyframe_files: dict):
    base = ["generate", "--prompt", "x", "--model", "ltx2-stages/tiny-random-ltx2", *TINY_ARGS]
    alone = run_ltx2([*base, "--condition-crf", "20"], ltx2_env)
    assert alone.returncode == 2 and "--condition-crf must follow a --condition" in alone.stderr
    video = run_ltx2([*base, "--condition", str(keyframe_files["clip"]), "--condition-crf", "20"], ltx2_env)
    assert video.returncode == 2 and "--condition-crf: " in video.stderr and "is a video" in video.stderr
    assert not (Path(ltx2_env["LTX2_STATE_DIR"]) / "jobs").exists()


def test_a_condition_flag_is_read_from_the_right():
    """Only a trailing @FRAME and :STRENGTH are taken off: a path may hold "@" and ":" elsewhere."""
    assert parse_condition_flag("a@b.png") == {"source": "a@b.png"}
    assert parse_condition_flag("key:1.png@-1:0.25") == {"source": "key:1.png", "frame": -1, "strength": 0.25}
    assert parse_condition_flag("clip.mp4@9") == {"source": "clip.mp4", "frame": 9}
    with pytest.raises(SpecError, match="--condition: must be PATH"):
        parse_condition_flag(" ")


def test_generate_with_keyframes_publishes_them_in_the_sidecar(ltx2_env: dict, keyframe_files: dict):
    result = run_ltx2(
        ["generate", "--prompt", "a bird", "--model", "ltx2-stages/tiny-random-ltx2", "--quiet", *TINY_ARGS,
         "--image", str(keyframe_files["first"]), "--condition", f"{keyframe_files['last']}@-1:0.5",
         "--condition-crf", "20", "--steps", "2", "--schedule", "default"],
        ltx2_env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    sidecar = json.loads(Path(result.stdout.strip()).with_suffix(".json").read_text())
    image, last = sidecar["conditions"]
    assert (image["source"], image["frame"], image["latent_index"], image["crf"]) == ("first.png", 0, 0, None)
    assert (last["source"], last["frame"], last["strength"], last["crf"]) == ("last.jpg", 13, 0.5, 20)
    assert last["sha256"] == sidecar_sha256(keyframe_files["last"])
    (job_dir,) = (Path(ltx2_env["LTX2_STATE_DIR"]) / "jobs").iterdir()
    assert "load video VAE for the keyframes" in (job_dir / "logs" / "encode_diffuse-1.log").read_text()


def sidecar_sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_http_conditions_name_the_forms_file_parts(tmp_path: Path):
    """The gateway takes keyframes as file parts that `conditions` names (never paths); the flag's form
    and {upload, frame, strength, crf} both read, and a part named by nothing, or a name no part has, is refused."""
    settings = load_settings(environ={"HOME": str(tmp_path)})
    fields = {"prompt": "a bird", "conditions": '["first", {"upload": "clip", "frame": 5, "strength": 0.5}]'}
    spec = parse_video_request(fields, settings, {"first", "clip"}).spec
    assert spec["conditions"] == [{"source": "first"}, {"source": "clip", "frame": 5, "strength": 0.5}]
    refusals = [
        ({**fields, "conditions": '["first"]'}, {"first", "clip"}, "clip", "no keyframe named in conditions"),
        (fields, {"first"}, "conditions", "'clip' names no file part"),
        ({**fields, "conditions": '["/etc/passwd@0"]'}, set(), "conditions", "paths are not accepted"),
        ({**fields, "conditions": '[{"path": "x"}]'}, set(), "conditions", "JSON list of keyframes"),
    ]
    for given, uploads, param, message in refusals:
        with pytest.raises(RequestError) as refused:
            parse_video_request(given, settings, uploads)
        assert refused.value.param == param and message in str(refused.value)


def test_batch_clips_take_keyframes_as_tables_or_as_the_flag_writes_them(
    tiny_model_dir: Path, tmp_path: Path, keyframe_files: dict
):
    from orchestrator.command_line.batch import BatchError, validate_batch

    settings = load_settings(environ={"LTX2_STATE_DIR": str(tmp_path / "state"), "HOME": str(tmp_path)})
    head = f'[defaults]\nmodel = "{tiny_model_dir}"\nwidth = 64\nheight = 64\nnum_frames = 17\n'
    batch = tmp_path / "keys.toml"
    batch.write_text(
        head + f'[[clips]]\nprompt = "a"\nconditions = ["{keyframe_files["first"]}@0:0.5",'
        f' {{source = "{keyframe_files["clip"]}", frame = 5}}]\n'
    )
    (clip,) = validate_batch(batch, settings, {})
    placed = [(record.kind, record.frame, record.strength) for _, record in clip.built.conditions]
    assert placed == [("image", 0, 0.5), ("video", 5, 1.0)]
    batch.write_text(head + f'[[clips]]\nname = "late"\nprompt = "a"\nconditions = ["{keyframe_files["clip"]}@9"]\n')
    with pytest.raises(BatchError, match=r"clip 1 \(late\): --condition: .* past the clip's last frame 16"):
        validate_batch(batch, settings, {})
