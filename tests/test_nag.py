"""Normalized Attention Guidance (services/nag.py): the formula, the processor on a real LTX2Attention,
the guided denoise loop on the tiny model in-process, and `ltx2 generate --nag-*` end to end."""

from __future__ import annotations

import copy
import gc
import json
import shutil
import subprocess
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from conftest import LIGHTHOUSE_FLAGS, CompiledRender, StartedRender, run_ltx2
from diffusers import LTX2Pipeline, LTX2VideoTransformer3DModel
from diffusers.models.transformers.transformer_ltx2 import LTX2Attention, LTX2AudioVideoAttnProcessor
from safetensors.torch import save_file
from test_loras import encode, lora_tensors

from protocol.files import LATENTS_FILE
from services import guidance
from services.latents import read_latents
from services.nag import NagAttnProcessor, NagSettings, nag_blend, nag_guidance
from services.nag_key_values import is_text_context_step_invariant, negative_key_values, text_cross_attention

# The session's plain lighthouse render (conftest.eager_lighthouse) is this request without NAG: its negative prompt
# acts only through NAG here (no CFG), so the plain render needs no run of its own.
FLAGS = [*LIGHTHOUSE_FLAGS, "--negative-prompt", "blurry, dark"]
SETTINGS = NagSettings(scale=5.0, tau=2.5, alpha=0.25)
# Transformer configs beside LTX-2.0's (the tiny model's): LTX-2.3's text context modulated per block by
# a timestep embedding, and the same modulation from a static per-layer table (LTX-2.5, "KV-cacheable").
STEP_DEPENDENT = {"cross_attn_mod": True, "audio_cross_attn_mod": True}
STATIC_TABLE = {**STEP_DEPENDENT, "use_prompt_adaln_single": False}


def formula(positive: torch.Tensor, negative: torch.Tensor, phi: float, tau: float, alpha: float) -> torch.Tensor:
    """The issue's formula, written out literally (L1 norm over channels per token)."""
    guided = phi * positive - (phi - 1) * negative
    s = guided.abs().sum(-1, keepdim=True) / positive.abs().sum(-1, keepdim=True)
    clamped = guided * torch.minimum(s, torch.tensor(tau, dtype=s.dtype)) / s
    return alpha * clamped + (1 - alpha) * positive


def paired(seed: int, shape: tuple[int, ...] = (2, 12, 32)) -> tuple[torch.Tensor, torch.Tensor]:
    """Random float64 (positive, negative) attention outputs; the first half of the tokens have a negative
    close to the positive (ratio under tau), the rest an unrelated one (ratio clamped)."""
    generator = torch.Generator().manual_seed(seed)
    positive = torch.randn(shape, generator=generator, dtype=torch.float64)
    negative = torch.randn(shape, generator=generator, dtype=torch.float64)
    half = shape[1] // 2
    negative[:, :half] = positive[:, :half] + 0.05 * negative[:, :half]
    return positive, negative


def test_blend_matches_the_formula_on_both_sides_of_the_clamp():
    positive, negative = paired(0)
    settings = NagSettings(scale=5.0, tau=2.5, alpha=0.25)
    guided = 5.0 * positive - 4.0 * negative
    ratio = guided.abs().sum(-1) / positive.abs().sum(-1)
    assert bool((ratio > 2.5).any()) and bool((ratio < 2.5).any())
    expected = formula(positive, negative, 5.0, 2.5, 0.25)
    assert float((nag_blend(positive, negative, settings) - expected).abs().max()) <= 1e-6


@pytest.mark.parametrize("phi,tau", [(11.0, 2.5), (2.0, 1.0), (5.0, 100.0)])
def test_alpha_zero_is_the_prompt_alone_and_alpha_one_the_clamped_guidance(phi: float, tau: float):
    positive, negative = paired(1)
    assert torch.equal(nag_blend(positive, negative, NagSettings(phi, tau, 0.0)), positive)
    full = nag_blend(positive, negative, NagSettings(phi, tau, 1.0))
    expected = formula(positive, negative, phi, tau, 1.0)
    assert float((full - expected).abs().max()) <= 1e-6
    # The clamp: no token's L1 norm grows beyond tau times the prompt's.
    ratio = full.abs().sum(-1) / positive.abs().sum(-1)
    assert float(ratio.max()) <= tau * (1 + 1e-5)


def test_blend_keeps_tokens_with_zero_norm_finite():
    positive, negative = paired(2)
    positive[0, 0] = 0.0
    negative[0, 0] = 0.0
    out = nag_blend(positive, negative, NagSettings(5.0, 2.5, 0.25))
    assert bool(torch.isfinite(out).all()) and torch.equal(out[0, 0], torch.zeros_like(out[0, 0]))


@pytest.mark.parametrize("gated", [False, True])
def test_processor_equals_the_formula_around_diffusers_own_attention(gated: bool):
    torch.manual_seed(0)
    attn = LTX2Attention(
        query_dim=32, heads=4, kv_heads=4, dim_head=8, cross_attention_dim=24, apply_gated_attention=gated
    ).eval()
    if gated:
        torch.nn.init.normal_(attn.to_gate_logits.weight)
    queries = torch.randn(2, 10, 32)
    positive_context, negative_context = torch.randn(2, 7, 24), torch.randn(2, 7, 24)
    # Additive masks as the transformer passes them: [B, 1, tokens], -10000 on masked tokens.
    positive_bias, negative_bias = torch.zeros(2, 1, 7), torch.zeros(2, 1, 7)
    positive_bias[0, :, :2] = -10000.0
    negative_bias[1, :, 5:] = -10000.0
    settings = NagSettings(scale=5.0, tau=2.5, alpha=0.25)
    with torch.no_grad():
        # Reference: diffusers' processor on each context, read before its output projection and gates.
        bare = copy.deepcopy(attn)
        bare.to_out[0] = torch.nn.Identity()
        bare.to_gate_logits = None
        default = LTX2AudioVideoAttnProcessor()
        z_positive = default(bare, queries, positive_context, positive_bias)
        z_negative = default(bare, queries, negative_context, negative_bias)
        blended = formula(z_positive, z_negative, 5.0, 2.5, 0.25)
        if gated:
            gates = 2.0 * torch.sigmoid(attn.to_gate_logits(queries))
            blended = (blended.unflatten(2, (4, -1)) * gates.unsqueeze(-1)).flatten(2, 3)
        expected = attn.to_out[0](blended)
        attn.set_processor(NagAttnProcessor(settings, negative_tokens=7))
        got = attn(
            queries,
            encoder_hidden_states=torch.cat([positive_context, negative_context], dim=1),
            attention_mask=torch.cat([positive_bias, negative_bias], dim=-1),
        )
    assert float((got - expected).abs().max()) <= 1e-6


@pytest.fixture(scope="module")
def tiny_pipeline(tiny_model_dir: Path) -> tuple[LTX2Pipeline, dict[str, torch.Tensor]]:
    pipe = LTX2Pipeline.from_pretrained(tiny_model_dir, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        embeds, mask, negative_embeds, negative_mask = pipe.encode_prompt(
            prompt="a kite over a beach",
            negative_prompt="blurry, dark",
            do_classifier_free_guidance=True,
            max_sequence_length=guidance.MAX_SEQUENCE_LENGTH,
        )
    embeddings = {
        "prompt_embeds": embeds,
        "prompt_attention_mask": mask,
        "negative_prompt_embeds": negative_embeds,
        "negative_prompt_attention_mask": negative_mask,
    }
    return pipe, embeddings


def negative_embeddings(pipe: LTX2Pipeline, negative_prompt: str) -> dict[str, torch.Tensor]:
    """Another negative prompt's embeddings, from the fixture's text encoder."""
    with torch.no_grad():
        _embeds, _mask, negative_embeds, negative_mask = pipe.encode_prompt(
            prompt="a kite over a beach",
            negative_prompt=negative_prompt,
            do_classifier_free_guidance=True,
            max_sequence_length=guidance.MAX_SEQUENCE_LENGTH,
        )
    return {"negative_prompt_embeds": negative_embeds, "negative_prompt_attention_mask": negative_mask}


def with_transformer(pipe: LTX2Pipeline, transformer: LTX2VideoTransformer3DModel) -> LTX2Pipeline:
    """The same pipeline around another transformer."""
    other = LTX2Pipeline(**{**pipe.components, "transformer": transformer})
    other.set_progress_bar_config(disable=True)
    return other


def variant(pipe: LTX2Pipeline, **changes: object) -> LTX2Pipeline:
    """The pipeline around a random transformer of the tiny config with `changes`, built by diffusers' own class."""
    torch.manual_seed(0)
    config = {**pipe.transformer.config, **changes}
    return with_transformer(pipe, LTX2VideoTransformer3DModel.from_config(config).eval())


def denoise_both(pipe: LTX2Pipeline, embeddings: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The video and audio latents of 3 steps at CFG 1."""
    with torch.no_grad():
        video, audio = pipe(
            prompt_embeds=embeddings["prompt_embeds"],
            prompt_attention_mask=embeddings["prompt_attention_mask"],
            **guidance.guidance_off(),
            width=64,
            height=64,
            num_frames=9,
            num_inference_steps=3,
            generator=torch.Generator().manual_seed(7),
            output_type="latent",
            return_dict=False,
        )
    return {"video": video, "audio": audio}


def denoise(pipe: LTX2Pipeline, embeddings: dict[str, torch.Tensor]) -> torch.Tensor:
    return denoise_both(pipe, embeddings)["video"]


def test_nag_guides_the_first_steps_in_one_transformer_call_each_then_restores(tiny_pipeline: tuple):
    pipe, embeddings = tiny_pipeline
    transformer = pipe.transformer
    plain = denoise(pipe, embeddings)
    seen: list[tuple[str, int]] = []

    def record(_module: object, _args: tuple, kwargs: dict) -> None:
        processor = type(transformer.transformer_blocks[0].audio_attn2.processor).__name__
        seen.append((processor, kwargs["encoder_hidden_states"].shape[1]))

    with nag_guidance(transformer, pipe.connectors, embeddings, SETTINGS, steps=2):
        # Registered after NAG's own pre-hook, so it sees the inputs the blocks get.
        hook = transformer.register_forward_pre_hook(record, with_kwargs=True)
        guided = denoise(pipe, embeddings)
        hook.remove()
    # The blocks get the prompt's tokens only: the negative prompt comes as K/V computed beforehand.
    tokens = embeddings["prompt_embeds"].shape[1]
    assert seen == [("NagAttnProcessor", tokens)] * 2 + [("LTX2AudioVideoAttnProcessor", tokens)]
    assert not torch.equal(guided, plain)
    assert all(type(module.processor) is LTX2AudioVideoAttnProcessor for module in text_cross_attention(transformer))
    # Restored: the same transformer again gives the unguided result bit for bit.
    assert torch.equal(denoise(pipe, embeddings), plain)
    with nag_guidance(transformer, pipe.connectors, embeddings, SETTINGS, steps=0):
        assert torch.equal(denoise(pipe, embeddings), plain)


def key_projections(pipe: LTX2Pipeline, embeddings: dict, **options: object) -> tuple[dict, list[int], list[int]]:
    """(latents of 3 steps guided by NAG, to_k calls of each text cross-attention while NAG was set up,
    then during the denoising loop), counted by forward hooks on the modules' own to_k layers."""
    modules = text_cross_attention(pipe.transformer)
    calls = [0] * len(modules)
    hooks = [
        module.to_k.register_forward_hook(lambda *_args, index=index: calls.__setitem__(index, calls[index] + 1))
        for index, module in enumerate(modules)
    ]
    try:
        with nag_guidance(pipe.transformer, pipe.connectors, embeddings, SETTINGS, steps=3, **options):
            at_setup = list(calls)
            latents = denoise_both(pipe, embeddings)
    finally:
        for hook in hooks:
            hook.remove()
    return latents, at_setup, [total - before for total, before in zip(calls, at_setup, strict=True)]


def test_negative_kv_are_projected_once_per_job_and_equal_the_per_step_computation(tiny_pipeline: tuple):
    pipe, embeddings = tiny_pipeline
    cached, at_setup, in_loop = key_projections(pipe, embeddings)
    per_step, per_step_setup, per_step_loop = key_projections(pipe, embeddings, reuse_negative_kv=False)
    layers = len(text_cross_attention(pipe.transformer))
    # Cached: each module projects the negative prompt once before the loop, then only the prompt per step.
    assert (at_setup, in_loop) == ([1] * layers, [3] * layers)
    assert (per_step_setup, per_step_loop) == ([0] * layers, [6] * layers)
    for key in ("video", "audio"):
        assert float((cached[key] - per_step[key]).abs().max()) <= 1e-6


def test_a_negative_mask_keeping_every_token_gives_no_bias_and_the_same_latents(tiny_pipeline: tuple):
    """The connectors' mask keeps every token (services/nag.py says why), so the cached attention runs
    unmasked; the per-step path still adds a bias of zeros, and both give the same latents."""
    pipe, embeddings = tiny_pipeline
    with torch.no_grad():
        video, audio, mask = pipe.connectors(
            embeddings["negative_prompt_embeds"], embeddings["negative_prompt_attention_mask"], padding_side="left"
        )
        assert bool(mask.all())
        assert all(kv.bias is None for kv in negative_key_values(pipe.transformer, video, audio, mask))
        padded = mask.clone()
        padded[:, :100] = 0
        biases = [kv.bias for kv in negative_key_values(pipe.transformer, video, audio, padded)]
    assert all(bias is not None and bool((bias[..., :100] == -10000.0).all()) for bias in biases)
    unmasked, _setup, _loop = key_projections(pipe, embeddings)
    zero_bias, _setup, _loop = key_projections(pipe, embeddings, reuse_negative_kv=False)
    for key in ("video", "audio"):
        assert float((unmasked[key] - zero_bias[key]).abs().max()) <= 1e-6


@pytest.mark.parametrize("changes,invariant", [({}, True), (STEP_DEPENDENT, False), (STATIC_TABLE, True)])
def test_the_text_context_at_the_cross_attention_changes_per_step_only_under_timestep_prompt_modulation(
    tiny_pipeline: tuple, changes: dict, invariant: bool
):
    """The premise of the cache, on diffusers' own blocks: what attn2 and audio_attn2 get as context."""
    pipe, embeddings = tiny_pipeline
    model = variant(pipe, **changes)
    contexts: list[torch.Tensor] = []
    block = model.transformer.transformer_blocks[1]
    hooks = [
        getattr(block, name).register_forward_pre_hook(
            lambda _module, _args, kwargs: contexts.append(kwargs["encoder_hidden_states"]), with_kwargs=True
        )
        for name in ("attn2", "audio_attn2")
    ]
    denoise(model, embeddings)
    for hook in hooks:
        hook.remove()
    video_steps, audio_steps = contexts[0::2], contexts[1::2]
    assert len(video_steps) == 3
    unchanged = all(torch.equal(steps[0], later) for steps in (video_steps, audio_steps) for later in steps[1:])
    assert unchanged is invariant
    assert is_text_context_step_invariant(model.transformer) is invariant


@pytest.mark.parametrize("changes,cached", [(STEP_DEPENDENT, False), (STATIC_TABLE, True)])
def test_nag_computes_negative_kv_per_step_only_where_the_text_context_changes_per_step(
    tiny_pipeline: tuple, changes: dict, cached: bool
):
    pipe, embeddings = tiny_pipeline
    model = variant(pipe, **changes)
    latents, at_setup, in_loop = key_projections(model, embeddings)
    reference, _setup, _loop = key_projections(model, embeddings, reuse_negative_kv=False)
    layers = len(text_cross_attention(model.transformer))
    assert (at_setup, in_loop) == (([1] * layers, [3] * layers) if cached else ([0] * layers, [6] * layers))
    for key in ("video", "audio"):
        assert float((latents[key] - reference[key]).abs().max()) <= 1e-6
    assert not torch.equal(latents["video"], denoise(model, embeddings))


def cached_keys(transformer: LTX2VideoTransformer3DModel) -> list[weakref.ref]:
    """Weak references to the negative keys the NAG processors hold now."""
    return [weakref.ref(module.processor.negative_kv.key) for module in text_cross_attention(transformer)]


def test_the_negative_kv_are_released_when_nag_ends(tiny_pipeline: tuple):
    pipe, embeddings = tiny_pipeline
    with nag_guidance(pipe.transformer, pipe.connectors, embeddings, SETTINGS, steps=3):
        whole_job = cached_keys(pipe.transformer)
        denoise(pipe, embeddings)
        gc.collect()
        assert all(ref() is not None for ref in whole_job)
    gc.collect()
    assert all(ref() is None for ref in whole_job)
    # With NAG on the first steps only, they go as soon as those steps are over.
    with nag_guidance(pipe.transformer, pipe.connectors, embeddings, SETTINGS, steps=2):
        first_steps = cached_keys(pipe.transformer)
        denoise(pipe, embeddings)
        gc.collect()
        assert all(ref() is None for ref in first_steps)


def test_compiled_blocks_keep_one_graph_for_jobs_with_other_negative_prompts(tiny_pipeline: tuple):
    """Three jobs on one regionally compiled transformer (`compile_blocks`' fullgraph=True), each with its own
    negative prompt, as a stage-major group runs them. The graphs are counted by dynamo; dynamo decides
    what to trace, guard and recompile before any backend sees a graph, so the test uses the "eager"
    backend and spares two CPU cores inductor's code generation (test_compiled_nag_equals_eager_nag
    runs inductor end to end)."""
    from torch._dynamo.utils import counters

    pipe, embeddings = tiny_pipeline
    compiled = copy.deepcopy(pipe.transformer)
    compiled.compile_repeated_blocks(fullgraph=True, backend="eager")
    compiled_pipe = with_transformer(pipe, compiled)
    torch._dynamo.reset()
    counters.clear()
    graphs = []
    for negative_prompt in ("blurry, dark", "grainy, pale", "a crowd of people"):
        negative = negative_embeddings(pipe, negative_prompt)
        with nag_guidance(pipe.transformer, pipe.connectors, negative, SETTINGS, steps=3):
            eager = denoise(pipe, embeddings)
        with nag_guidance(compiled, pipe.connectors, negative, SETTINGS, steps=3):
            keys = cached_keys(compiled)
            result = denoise(compiled_pipe, embeddings)
        graphs.append(counters["stats"]["unique_graphs"])
        # This job's own K/V, not those the graph was traced with, and gone once the job is over.
        assert float((result - eager).abs().max()) <= 1e-6, negative_prompt
        gc.collect()
        assert all(ref() is None for ref in keys)
    # One graph serves both blocks and all three negative prompts.
    assert graphs == [1, 1, 1]


def test_a_group_gives_each_clip_the_kv_of_its_own_negative_prompt(tiny_model_dir: Path, tmp_path: Path):
    """Two clips denoised in one process on one transformer (a stage-major group), each equal to its clip alone."""
    shared: dict = {}
    first = encode(tiny_model_dir, tmp_path, "dark", shared, negative_prompt="blurry, dark", nag_scale=5.0)
    transformer = shared["denoiser"]["transformer"]
    second = encode(tiny_model_dir, tmp_path, "pale", shared, negative_prompt="grainy, pale", nag_scale=5.0)
    assert shared["denoiser"]["transformer"] is transformer
    alone = encode(tiny_model_dir, tmp_path, "pale-alone", negative_prompt="grainy, pale", nag_scale=5.0)
    for key in ("video", "audio"):
        assert torch.equal(second[key], alone[key])
    assert not torch.equal(first["video"], second["video"])


def latest(state: Path) -> tuple[Path, dict[str, torch.Tensor], dict[str, str]]:
    job = max((state / "jobs").iterdir(), key=lambda path: path.name)
    tensors, metadata = read_latents(job / LATENTS_FILE)
    return job, tensors, metadata


@pytest.fixture(scope="module")
def runs(
    hf_home: Path,
    tmp_path_factory: pytest.TempPathFactory,
    compiled_lighthouse: CompiledRender,
    eager_lighthouse: StartedRender,
) -> dict[str, object]:
    """Plain (the session's eager lighthouse render, without the negative prompt), then --nag-scale 1, --nag-scale 5
    twice and --nag-scale 5 --compile, each a real `ltx2 generate`.

    The compiled run, the longest (inductor compiles the blocks), runs beside the other three, in a state
    dir of its own: they are independent processes, and each spends seconds on one core (its fork
    server's imports, the tiny model's single-threaded steps), so two at a time keep CI's two cores busy.
    Its state dir starts with a copy of the inductor cache of test_compile's compiled run, as a later job
    of a state dir finds the cache of those before it: the kernels the two graphs share are not built
    again (about 12 s of CI's two cores), and the NAG graph is still compiled anew."""
    from conftest import ltx2_environment

    env = ltx2_environment(hf_home, tmp_path_factory.mktemp("nag"))
    compiled_env = ltx2_environment(hf_home, tmp_path_factory.mktemp("nag-compiled"))
    shutil.copytree(compiled_lighthouse.compile_cache, Path(compiled_env["LTX2_STATE_DIR"]) / "compile-cache")
    results: dict[str, object] = {"env": env}

    def record(label: str, result: subprocess.CompletedProcess[str], run_env: dict[str, str]) -> None:
        assert result.returncode == 0, result.stderr
        job, tensors, metadata = latest(Path(run_env["LTX2_STATE_DIR"]))
        results[label] = {"result": result, "job": job, "latents": tensors, "metadata": metadata}

    with ThreadPoolExecutor(max_workers=1) as beside:
        compiled = beside.submit(run_ltx2, ["generate", *FLAGS, "--nag-scale", "5", "--compile"], compiled_env)
        for label, extra in (
            ("off", ["--nag-scale", "1", "--nag-tau", "3"]),
            ("nag", ["--nag-scale", "5"]),
            ("again", ["--nag-scale", "5"]),
        ):
            record(label, run_ltx2(["generate", *FLAGS, *extra], env), env)
        record("compiled", compiled.result(), compiled_env)
    plain, job = eager_lighthouse.finished()  # its state dir gets other tests' jobs: its own job, by its sidecar
    results["plain"] = {"result": plain, "job": job, "latents": read_latents(job / LATENTS_FILE)[0]}
    return results


def test_nag_scale_one_is_bit_equal_to_no_nag_and_five_changes_the_latents(runs: dict):
    plain, off, nag = runs["plain"]["latents"], runs["off"]["latents"], runs["nag"]["latents"]
    for key in ("video", "audio"):
        assert torch.equal(plain[key], off[key])
    assert not torch.equal(plain["video"], nag["video"])
    assert "--nag-tau has no effect without --nag-scale > 1" in runs["off"]["result"].stderr


def test_the_same_nag_run_twice_is_bit_equal(runs: dict):
    for key in ("video", "audio"):
        assert torch.equal(runs["nag"]["latents"][key], runs["again"]["latents"][key])


def test_nag_makes_one_transformer_call_per_step_and_silences_the_negative_prompt_warning(runs: dict):
    assert int(runs["nag"]["metadata"]["transformer_calls"]) == 8
    assert "--negative-prompt has no effect" not in runs["nag"]["result"].stderr
    assert "--negative-prompt has no effect" in runs["off"]["result"].stderr


def test_compiled_nag_equals_eager_nag(runs: dict):
    for key in ("video", "audio"):
        assert float((runs["compiled"]["latents"][key] - runs["nag"]["latents"][key]).abs().max()) <= 1e-5


def test_nag_settings_are_recorded_in_job_json_and_the_sidecar(runs: dict):
    nag = runs["nag"]
    recorded = json.loads((nag["job"] / "job.json").read_text())["spec"]
    sidecar = json.loads(Path(nag["result"].stdout.strip()).with_suffix(".json").read_text())["spec"]
    expected = {"nag_scale": 5.0, "nag_tau": 2.5, "nag_alpha": 0.25, "nag_steps": None}
    for spec in (recorded, sidecar):
        assert {key: spec[key] for key in expected} == expected


@pytest.mark.parametrize(
    "extra,flag",
    [
        (["--nag-scale", "-1"], "--nag-scale"),
        (["--nag-scale", "0.5"], "--nag-scale"),
        (["--nag-scale", "5", "--nag-tau", "0"], "--nag-tau"),
        (["--nag-scale", "5", "--nag-tau", "-2"], "--nag-tau"),
        (["--nag-scale", "5", "--nag-alpha", "1.5"], "--nag-alpha"),
        (["--nag-scale", "5", "--nag-alpha", "-0.1"], "--nag-alpha"),
        (["--nag-scale", "5", "--nag-steps", "-1"], "--nag-steps"),
        (["--nag-scale", "5", "--guidance-scale", "3", "--schedule", "default", "--steps", "3"], "--nag-scale"),
    ],
)
def test_invalid_nag_flags_exit_2_naming_the_flag(ltx2_env: dict, extra: list[str], flag: str):
    result = run_ltx2(["generate", *FLAGS, *extra], ltx2_env)
    assert result.returncode == 2, result.stderr
    assert flag in result.stderr


def test_nag_with_a_lora_and_fp8_matmuls_stays_close_to_nag_in_full_precision(tiny_model_dir: Path, tmp_path: Path):
    lora = tmp_path / "lora.safetensors"
    save_file(lora_tensors("transformer."), str(lora))
    request = {"negative_prompt": "blurry, dark", "loras": [{"source": str(lora), "scale": 1.0}]}
    reference = encode(tiny_model_dir, tmp_path, "nag", nag_scale=5.0, **request)
    result = encode(tiny_model_dir, tmp_path, "nag-fp8mm", nag_scale=5.0, fp8_matmul=True, **request)
    unguided = encode(tiny_model_dir, tmp_path, "fp8mm", fp8_matmul=True, **request)
    for key in ("video", "audio"):
        error = float((result[key] - reference[key]).norm() / reference[key].norm())
        assert 0 < error < 0.02
    assert not torch.equal(result["video"], unguided["video"])


def test_the_prompt_cache_keys_the_negative_prompt_only_where_it_acts(tmp_path: Path):
    from protocol.spec import JobSpec
    from services.embedding_cache import cache_path

    base = {"prompt": "p", "model": "m", "width": 64, "height": 64, "num_frames": 9, "steps": 8, "seed": 1}

    def path(**changes: object) -> Path:
        return cache_path(
            tmp_path, tmp_path, "", JobSpec.from_dict({**base, **changes}), torch.float32, torch.device("cpu")
        )

    assert path(negative_prompt="a") == path(negative_prompt="b") == path()
    assert path(negative_prompt="a", nag_scale=5.0) != path(negative_prompt="b", nag_scale=5.0)
    assert path(negative_prompt="a", nag_scale=5.0) != path(negative_prompt="a")


def test_batch_file_nag_fields_are_validated_by_the_spec():
    from protocol.spec import JobSpec
    from protocol.spec_rules import SpecError

    base = {"prompt": "p", "model": "m", "width": 64, "height": 64, "num_frames": 9, "steps": 8, "seed": 1}
    spec = JobSpec.from_dict({**base, "nag_scale": 11, "nag_steps": 4})
    assert spec.uses_nag and spec.uses_negative_prompt and spec.nag_step_count == 4
    assert JobSpec.from_dict({**base, "nag_scale": 11, "nag_steps": 20}).nag_step_count == 8
    assert not JobSpec.from_dict({**base, "nag_scale": 11, "nag_steps": 0}).uses_nag
    # Latents written before NAG existed still match a spec at NAG's defaults.
    assert JobSpec.from_dict(base).latents_digest() == JobSpec.from_dict({**base, "nag_scale": 1.0}).latents_digest()
    with pytest.raises(SpecError, match="--nag-alpha"):
        JobSpec.from_dict({**base, "nag_alpha": "high"})
    with pytest.raises(SpecError, match="--nag-tau"):
        JobSpec.from_dict({**base, "nag_tau": float("nan")})
