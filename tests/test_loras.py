"""LoRAs and FP8 on the tiny model: effects asserted on real latents, order enforced."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import TINY_ARGS, run_ltx2
from safetensors.torch import save_file

from config.settings import load_settings
from orchestrator.run.jobdir import JobDir
from orchestrator.run.jobspec import build_spec
from orchestrator.run.lora_lookup import resolve_lora
from orchestrator.run.policy import initial_plan
from protocol.errors import InvalidInput
from protocol.files import LATENTS_FILE, Stage
from protocol.spec_rules import SpecError
from protocol.stage_request import StageRequest
from services import encode_diffuse, model_loading
from services.latents import read_latents
from services.runtime import Reporter, WorkerContext
from services.tiny_model import lora_tensors

CAMERA_REPO = "Lightricks/LTX-2-19b-LoRA-Camera-Control-Dolly-In"
CAMERA_FILE = "ltx-2-19b-lora-camera-control-dolly-in.safetensors"


@pytest.fixture(scope="module")
def lora_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("loras")
    files = {"original": folder / "original.safetensors", "diffusers": folder / "diffusers.safetensors"}
    save_file(lora_tensors("diffusion_model."), str(files["original"]))
    save_file(lora_tensors("transformer."), str(files["diffusers"]))
    return files


@pytest.fixture(scope="module")
def camera_cache(hf_home: Path, lora_files: dict[str, Path]) -> Path:
    """Lightricks' dolly-in repo in the HF cache layout, holding our synthetic LoRA."""
    repo = hf_home / "hub" / ("models--" + CAMERA_REPO.replace("/", "--"))
    snapshot = repo / "snapshots" / ("c" * 40)
    snapshot.mkdir(parents=True, exist_ok=True)
    (snapshot / CAMERA_FILE).write_bytes(lora_files["original"].read_bytes())
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text("c" * 40)
    return snapshot / CAMERA_FILE


# The plain request's latents per model folder, rendered once per test session: several files compare
# their variant (a LoRA, FP8, offload, an image) with it, and equal requests give equal bits (rule 6).
PLAIN_LATENTS: dict[str, dict[str, torch.Tensor]] = {}


def encode(
    tiny_model_dir: Path, tmp_path: Path, name: str, shared: dict | None = None, **request: object
) -> dict[str, torch.Tensor]:
    """Run the encode_diffuse stage function in this process on a fresh job; return its latents.

    `shared` is the group worker's dict of loaded models: pass one dict to several calls to run
    them as the jobs of one stage-major group (one transformer, loaded once). The plain request
    (no extra fields, no group) is rendered once per model folder and session; callers get copies."""
    if shared is None and not request:
        key = str(tiny_model_dir)
        if key not in PLAIN_LATENTS:
            PLAIN_LATENTS[key] = encode_job(tiny_model_dir, tmp_path, name, None)
        return {stream: tensor.clone() for stream, tensor in PLAIN_LATENTS[key].items()}
    return encode_job(tiny_model_dir, tmp_path, name, shared, **request)


def encode_job(
    tiny_model_dir: Path,
    tmp_path: Path,
    name: str,
    shared: dict | None,
    environ: dict[str, str] | None = None,
    **request: object,
) -> dict[str, torch.Tensor]:
    """`encode` without the session's copy of the plain request: always a fresh job (`environ`: settings'
    variables beside the state dir, e.g. LTX2_FP8_GELU_KERNEL)."""
    settings = load_settings(environ={"LTX2_STATE_DIR": str(tmp_path), "HOME": str(tmp_path), **(environ or {})})
    fields = {
        "prompt": "a dolly in",
        "model": str(tiny_model_dir),
        "width": 64,
        "height": 64,
        "num_frames": 9,
        "seed": 4,
        "dtype": "float32",
        **request,
    }
    built = build_spec(fields, settings)
    job = JobDir.create(
        tmp_path / name, built.spec, built.model, loras=built.loras, image=built.image, stage2_lora=built.stage2_lora
    )
    plan = initial_plan(Stage.ENCODE_DIFFUSE, built.spec, settings)
    reporter = Reporter(Stage.ENCODE_DIFFUSE, job.id, None)
    request = StageRequest.of(job.record)
    ctx = WorkerContext(Stage.ENCODE_DIFFUSE, job.path, request, plan, 1, reporter, {} if shared is None else shared)
    encode_diffuse.run(ctx)
    return read_latents(job.path / LATENTS_FILE)[0]


def test_lora_changes_the_output_and_scale_zero_reproduces_the_base_exactly(
    tiny_model_dir: Path, tmp_path: Path, lora_files: dict[str, Path]
):
    base = encode(tiny_model_dir, tmp_path, "base")
    full = encode(tiny_model_dir, tmp_path, "full", loras=[{"source": str(lora_files["original"]), "scale": 1.0}])
    zero = encode(tiny_model_dir, tmp_path, "zero", loras=[{"source": str(lora_files["original"]), "scale": 0.0}])
    assert torch.equal(zero["video"], base["video"]) and torch.equal(zero["audio"], base["audio"])
    assert (full["video"] - base["video"]).abs().max() > 1e-3


def test_original_and_diffusers_key_formats_give_the_same_result(
    tiny_model_dir: Path, tmp_path: Path, lora_files: dict[str, Path]
):
    original = encode(tiny_model_dir, tmp_path, "o", loras=[{"source": str(lora_files["original"]), "scale": 0.7}])
    converted = encode(tiny_model_dir, tmp_path, "d", loras=[{"source": str(lora_files["diffusers"]), "scale": 0.7}])
    assert torch.equal(original["video"], converted["video"])


def test_lora_survives_fp8_because_it_is_fused_first(tiny_model_dir: Path, tmp_path: Path, lora_files: dict):
    fp8 = encode(tiny_model_dir, tmp_path, "fp8", fp8=True)
    fp8_lora = encode(
        tiny_model_dir, tmp_path, "fp8l", fp8=True, loras=[{"source": str(lora_files["original"]), "scale": 1.0}]
    )
    native_lora = encode(tiny_model_dir, tmp_path, "nl", loras=[{"source": str(lora_files["original"]), "scale": 1.0}])
    assert (fp8_lora["video"] - fp8["video"]).abs().max() > 1e-3
    # FP8 storage only perturbs the result; the LoRA's effect dominates the difference.
    assert (fp8_lora["video"] - native_lora["video"]).abs().max() < (fp8_lora["video"] - fp8["video"]).abs().max()


def test_fp8_cast_is_refused_while_adapters_are_attached(tiny_model_dir: Path, lora_files: dict[str, Path]):
    from diffusers import LTX2Pipeline

    pipe = LTX2Pipeline.from_pretrained(tiny_model_dir)
    pipe.load_lora_weights(str(lora_files["original"].parent), weight_name="original.safetensors", adapter_name="a")
    with pytest.raises(InvalidInput, match="fused before FP8"):
        model_loading.apply_memory_plan(
            pipe.transformer, torch.float32, torch.device("cpu"), fp8=True, sequential_offload=False
        )


def test_lora_outside_the_input_roots_is_refused(lora_files: dict[str, Path], tmp_path: Path):
    with pytest.raises(SpecError, match="outside the allowed input folders"):
        resolve_lora({"source": str(lora_files["original"]), "scale": 1.0}, (tmp_path / "elsewhere",))


def test_camera_name_resolves_lightricks_lora_from_the_cache(ltx2_env: dict, camera_cache: Path):
    result = run_ltx2(
        [
            "generate",
            "--prompt",
            "a dolly in",
            "--camera",
            "dolly-in",
            "--seed",
            "1",
            "--quiet",
            "--model",
            "ltx2-stages/tiny-random-ltx2",
            *TINY_ARGS,
        ],
        ltx2_env,
    )
    assert result.returncode == 0, result.stderr
    (job_dir,) = (Path(ltx2_env["LTX2_STATE_DIR"]) / "jobs").iterdir()
    job = JobDir.load(job_dir)
    assert job.record.loras[0].source == CAMERA_REPO
    assert Path(job.record.loras[0].path) == camera_cache.resolve()
    assert "fuse LoRAs" in (job_dir / "logs" / "encode_diffuse-1.log").read_text()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--camera", "sideways"], "--camera: must be one of dolly-in"),
        (["--lora", "x.safetensors", "--lora-scale", "1.5"], "--lora-scale: must be between 0.0 and 1.0"),
        (["--lora-scale", "0.5"], "--lora-scale must follow a --lora"),
        (["--lora", "Nobody/NoSuchLoRA"], "hf download Nobody/NoSuchLoRA"),
    ],
)
def test_bad_lora_flags_fail_before_any_work(ltx2_env: dict, flags: list, message: str):
    result = run_ltx2(["generate", "--prompt", "x", "--model", "ltx2-stages/tiny-random-ltx2", *flags], ltx2_env)
    assert result.returncode in (2, 4)
    assert message in result.stderr


def test_sequential_offload_is_recorded_and_is_exact_on_a_cpu_host(tiny_model_dir: Path, tmp_path: Path):
    """On the CPU there is nothing to offload to, so the result must equal the plain run bit for bit;
    on a GPU the same plan keeps layers in host memory (checked in the GPU benchmark, not here)."""
    plain = encode(tiny_model_dir, tmp_path, "plain")
    offload = encode(tiny_model_dir, tmp_path, "offload", sequential_offload=True)
    assert torch.equal(plain["video"], offload["video"])
    (job_dir,) = (tmp_path / "offload").iterdir()
    assert json.loads(read_latents(job_dir / LATENTS_FILE)[1]["plan"]) == {"weights": "native", "offload": "sequential"}


def test_repeated_prompt_reuses_cached_embeddings_without_loading_the_text_encoder(
    tiny_model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    caplog.set_level("INFO", logger="ltx2.worker")
    first = encode(tiny_model_dir, tmp_path, "first", prompt="a lighthouse in fog")
    assert "load text encoder" in caplog.text
    caplog.clear()
    again = encode(tiny_model_dir, tmp_path, "again", prompt="a lighthouse in fog")
    assert "prompt embeddings from cache" in caplog.text and "load text encoder" not in caplog.text
    assert torch.equal(first["video"], again["video"]) and torch.equal(first["audio"], again["audio"])
    assert len(list((tmp_path / "embeddings").glob("*.safetensors"))) == 1
