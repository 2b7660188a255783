"""--compile: regional torch.compile of the transformer blocks, equal to eager within float
tolerance, with inductor's caches kept under the state directory for later workers."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from conftest import LIGHTHOUSE_FLAGS, CompiledRender, StartedRender, ltx2_environment, run_ltx2
from cpu_drift import check_equal_latents, kernel_lines

from protocol.files import LATENTS_FILE
from services.latents import read_latents

FLAGS = LIGHTHOUSE_FLAGS


def latest_latents(state: Path) -> dict[str, torch.Tensor]:
    job = max((state / "jobs").iterdir(), key=lambda path: path.name)
    return read_latents(job / LATENTS_FILE)[0]


def cached_graphs(cache: Path) -> set[str]:
    return {str(path.relative_to(cache)) for path in (cache / "fxgraph").rglob("*") if path.is_file()}


def test_compiled_run_matches_eager_and_a_later_worker_reuses_the_compiled_graphs(
    compiled_lighthouse: CompiledRender, eager_lighthouse: StartedRender
):
    # The compiled run (the session's: test_nag's compiled run starts from a copy of its cache) ran beside
    # the eager reference (which test_reproducible renders again), each in a state dir of its own: two
    # independent processes keep CI's two cores busy while either spends seconds on one (imports,
    # inductor's codegen).
    compiled, env = compiled_lighthouse.result, compiled_lighthouse.env
    state = Path(env["LTX2_STATE_DIR"])
    _, eager_job = eager_lighthouse.finished()
    reference = read_latents(eager_job / LATENTS_FILE)[0]
    assert compiled.returncode == 0, compiled.stderr
    result = latest_latents(state)
    for key in ("video", "audio"):
        assert float((result[key] - reference[key]).abs().max()) <= 1e-5
    cache = state / "compile-cache"
    graphs = cached_graphs(cache)
    assert graphs, "inductor wrote no compiled graph into the state directory's cache"
    # A new worker (a new job of the same request) loads the compiled graphs instead of compiling again,
    # and makes the same bits: bit-equal latents, a byte-identical MP4 (DESIGN.md rule 6).
    again = run_ltx2(["generate", *FLAGS, "--compile"], {**env, "LTX2_COMPILE_PACKAGES": ""})  # Inductor's cache alone
    assert again.returncode == 0, again.stderr
    assert cached_graphs(cache) == graphs
    repeated = latest_latents(state)
    logs = sorted((state / "jobs").glob("*/logs/encode_diffuse-*.log"))
    check_equal_latents(repeated, result, lambda: kernel_lines(logs), "compiled workers")  # tests/cpu_drift.py
    if all(torch.equal(repeated[key], result[key]) for key in result):  # same latents, same file (x264's threads fixed)
        assert Path(again.stdout.strip()).read_bytes() == Path(compiled.stdout.strip()).read_bytes()
    log = latest_diffusion_log(state)
    assert "compile transformer blocks (on the first step, deterministic)" in log
    # The worker says what the caches served at its first step: Inductor's graph came from the state dir.
    assert "compile cache hits/misses: dynamo packages 0/0, inductor graphs 1/0" in log, log


def latest_diffusion_log(state: Path, first: bool = False) -> str:
    """The diffusion worker's log of the state dir's latest job (`first`: of its first job)."""
    job = (min if first else max)((state / "jobs").iterdir(), key=lambda path: path.name)
    return (job / "logs" / "encode_diffuse-1.log").read_text()


def first_latents(state: Path) -> dict[str, torch.Tensor]:
    job = min((state / "jobs").iterdir(), key=lambda path: path.name)
    return read_latents(job / LATENTS_FILE)[0]


def test_with_compile_packages_a_later_worker_loads_the_blocks_instead_of_tracing_them(
    compiled_lighthouse: CompiledRender, hf_home: Path, tmp_path: Path
):
    """LTX2_COMPILE_PACKAGES=1 (services/compile_packages.py): the session's compiled run saved what Dynamo
    made under its state dir's compile cache, keyed by model, plan, shape and software; a later worker with
    the same request (here in a state dir that starts with a copy of that cache, as a later job finds it)
    installs it: Dynamo's package cache hits, nothing is traced and no graph looked up, the same bits."""
    first_log = latest_diffusion_log(Path(compiled_lighthouse.env["LTX2_STATE_DIR"]), first=True)
    assert "compile cache hits/misses: dynamo packages 0/1" in first_log, first_log
    packages = [path.parent.name for path in (compiled_lighthouse.compile_cache / "dynamo").glob("*/entry")]
    assert len(packages) == 1, packages
    env = {**ltx2_environment(hf_home, tmp_path), "LTX2_COMPILE_PACKAGES": "1"}
    state = Path(env["LTX2_STATE_DIR"])
    shutil.copytree(compiled_lighthouse.compile_cache, state / "compile-cache")
    loaded = run_ltx2(["generate", *FLAGS, "--compile"], env)
    assert loaded.returncode == 0, loaded.stderr
    log = latest_diffusion_log(state)
    assert "compile cache hits/misses: dynamo packages 1/0, inductor graphs 0/0, aot-autograd 0/0" in log, log
    saved = first_latents(Path(compiled_lighthouse.env["LTX2_STATE_DIR"]))
    again = latest_latents(state)
    assert all(torch.equal(again[key], saved[key]) for key in ("video", "audio"))


def decoded_rgb(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]).astype(np.int16)


def video_log(state: Path) -> str:
    job = max((state / "jobs").iterdir(), key=lambda path: path.name)
    return (job / "logs" / "video_decode-1.log").read_text()


def test_a_compiled_decoder_decodes_within_levels_of_eager_and_a_later_process_reuses_its_graphs(
    eager_lighthouse: StartedRender, hf_home: Path, tmp_path: Path
):
    """--compile-decoder (issue 28 item 3): `ltx2 decode` of the session's eager render's latents with the VAE's
    decoder compiled (channels-last-3d) gives its frames within a few levels of the eager decode (another rounding
    of the same model). A second process finds Inductor's graph in the state dir's cache, a third (with
    LTX2_COMPILE_PACKAGES=1, as the first) installs the decoder's Dynamo package instead of tracing it; all three
    write the same file (deterministic mode, x264's threads fixed)."""
    eager, job = eager_lighthouse.finished()
    env = ltx2_environment(hf_home, tmp_path)
    state = Path(env["LTX2_STATE_DIR"])
    made = []
    for name, packages in (("first.mp4", "1"), ("second.mp4", ""), ("third.mp4", "1")):
        command = ["decode", "--input", str(job / LATENTS_FILE), "--output", str(tmp_path / name), "--compile-decoder"]
        decoded = run_ltx2(command, {**env, "LTX2_COMPILE_PACKAGES": packages})
        assert decoded.returncode == 0, decoded.stderr
        made.append((tmp_path / name, video_log(state)))
    (first, first_log), (second, second_log), (third, third_log) = made
    assert "compile the VAE decoder (at its first decode, deterministic)" in first_log, first_log
    assert "dynamo packages 0/1, inductor graphs 0/1" in first_log, first_log
    assert "dynamo packages 0/0, inductor graphs 1/0" in second_log, second_log  # Inductor's cache alone
    assert "dynamo packages 1/0, inductor graphs 0/0" in third_log, third_log  # nothing traced or looked up
    assert first.read_bytes() == second.read_bytes() == third.read_bytes()
    compiled, reference = decoded_rgb(first), decoded_rgb(Path(eager.stdout.strip()))
    assert compiled.shape == reference.shape and compiled.shape[0] == 9
    assert float(np.abs(compiled - reference).mean()) <= 1.0, float(np.abs(compiled - reference).mean())
    record = json.loads((max((state / "jobs").iterdir(), key=lambda path: path.name) / "job.json").read_text())
    assert record["spec"]["compile_decoder"] is True
    assert record["stages"]["video_decode"]["attempts"][-1]["plan"]["compile"] == "decoder"


def test_a_compiled_decoder_past_its_shape_limit_fails_the_attempt_instead_of_decoding_eager(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """A graph per input shape, and Dynamo's limit (8) on them: past it Dynamo ran the rest eager without a word,
    so a tiled clip's frames depended on the shapes its process met before (a hostile test: a 352x224 clip's
    ninth tile shape, a second size in a group). The limit is raised (model_loading.COMPILED_SHAPES) and reaching
    it raises; here it is lowered to 1 after the compile, so the second shape reaches it."""
    import torch._dynamo.config as dynamo_config
    from diffusers import AutoencoderKLLTX2Video

    from services import model_loading

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "cache"))  # compile_vae_decoder sets it
    for name in ("recompile_limit", "fail_on_recompile_limit_hit"):  # restored after the test
        monkeypatch.setattr(dynamo_config, name, getattr(dynamo_config, name))
    vae = AutoencoderKLLTX2Video.from_pretrained(tiny_model_dir, subfolder="vae").eval()
    model_loading.compile_vae_decoder(vae, tmp_path / "cache", deterministic=True)
    assert dynamo_config.recompile_limit >= model_loading.COMPILED_SHAPES and dynamo_config.fail_on_recompile_limit_hit
    dynamo_config.recompile_limit = 1
    channels = vae.config.latent_channels
    try:
        with torch.no_grad():
            vae.decode(torch.randn(1, channels, 1, 2, 2).to(memory_format=torch.channels_last_3d), return_dict=False)
            with pytest.raises(torch._dynamo.exc.FailOnRecompileLimitHit):
                vae.decode(
                    torch.randn(1, channels, 1, 2, 3).to(memory_format=torch.channels_last_3d), return_dict=False
                )
    finally:
        torch._dynamo.reset()


def test_a_compile_cache_that_cannot_be_written_gives_way_to_a_private_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    """A cache path that is a file (or on a read-only shared state dir) failed every compiled attempt on Inductor's
    lock files, and the failure policy stepped down to eager on another decode plan (a hostile test): the process
    compiles into a folder of its own instead, with a warning, on the plan it was given."""
    from services import model_loading

    monkeypatch.delenv("LTX2_COMPILE_CACHE_DIR", raising=False)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "before"))  # restored after the test
    blocked = tmp_path / "compile-cache"
    blocked.write_text("not a folder")
    with caplog.at_level("WARNING", logger="ltx2.worker"):
        model_loading.prepare_inductor(blocked, False, torch.device("cpu"))
    chosen = Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
    assert chosen != blocked and chosen.is_dir() and os.access(chosen, os.W_OK), chosen
    assert f"compile cache {blocked} cannot be written" in caplog.text
    fine = tmp_path / "writable"
    model_loading.prepare_inductor(fine, False, torch.device("cpu"))
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(fine) and fine.is_dir()
