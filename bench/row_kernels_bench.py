"""The one-pass kernels (services/fp8_rows.py, services/qk_norm_rope.py) against what Inductor fuses instead, on a GPU.

Three parts, all on the card the call runs on, written to `--out` as they finish (a call cut short keeps them):
- `kernel`: the feed-forward's hidden activation at LTX-2's sizes (1080p stage 2 and stage 1, the audio) through
  the project's kernel and through the compiled torch code it replaces (`quantize_rows(gelu(h + b))`, Inductor's
  deterministic mode as the worker sets it); median time of repeated launches, and both against the fp32 torch
  reference (FP8 codes that differ, largest dequantised error relative to the row's maximum).
- `qk`: the self-attention's query and key RMS norms and split rotary embedding (services/qk_norm_rope.py) at
  LTX-2.3's 1080p stage-2 and stage-1 token counts, LTX-2.0's 1080p x 161 and the audio's: the kernel, the torch
  code eagerly and compiled by Inductor; time and difference from the eager torch code.
- `model`: a full-width LTX-2.3 transformer of `--layers` random blocks with the worker's settings (`--fp8-matmul`
  with fast accumulation, FP8 self-attention, regional compile, deterministic), one forward at stage 2's and at
  stage 1's token counts per `--variants` (Inductor's fusions only; the one-pass GELU; that and the query/key
  kernel; the GELU kernel with Inductor's row reductions in registers), each in its own process with its own
  Inductor cache (and how many of its generated reductions are persistent and looped): forward time (median), a
  kernel-by-kernel profile of one forward (step_profile's table), each variant's outputs against the one before,
  and the Triton source of the most expensive fused kernels.

    python3 bench/row_kernels_bench.py --out "$OUT" [--parts kernel,qk,model] [--layers 4] [--variants kernel,wholerows]
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

#: (name, rows, columns): LTX-2.3's feed-forward hidden activation at 1920x1088x121 (stage 2), 960x544 (stage 1), audio.
KERNEL_SHAPES = (("stage2_video", 32640, 16384), ("stage1_video", 8160, 16384), ("audio", 126, 8192))
#: (name, latent frames, latent height, latent width, audio latent frames) of the model part's forwards.
MODEL_SHAPES = (("stage2", 16, 34, 60, 126), ("stage1", 16, 17, 30, 126))
#: The model part's variants: name -> (the one-pass GELU kernel, the query/key norm and rotary embedding kernel,
#: Inductor's row reductions in registers up to 4,096 wide: services/whole_row_reductions.py).
MODEL_VARIANTS = {
    "inductor": (False, False, False),
    "kernel": (True, False, False),
    "qk": (True, True, False),
    "wholerows": (True, False, True),
}
#: (name, tokens, heads, half a head): LTX-2.3's self-attention at 1080p stage 2, at stage 1, LTX-2.0's one-stage
#: 1920x1088x161 (21 latent frames), the audio.
QK_SHAPES = (("stage2_video", 32640, 32, 64), ("stage1_video", 8160, 32, 64), ("large_video", 42840, 32, 64))
QK_SHAPES += (("audio", 126, 32, 32),)
#: `--smoke`: the same code on the CPU at a few tokens, to catch a mistake before a device call is spent on it.
SMOKE_SHAPES = (("stage2", 2, 4, 4, 8), ("stage1", 2, 2, 2, 8))
WORK = Path("/tmp/row-kernels-work")


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def median_ms(torch: Any, function: Any, repeats: int) -> float:
    """Median wall time of `function()` over `repeats` runs, each between CUDA events (on a CPU: the clock)."""
    times = []
    if not torch.cuda.is_available():
        for _ in range(repeats):
            started = time.perf_counter()
            function()
            times.append((time.perf_counter() - started) * 1000)
        return sorted(times)[len(times) // 2]
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        function()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def compare(torch: Any, got: tuple[Any, Any], want: tuple[Any, Any]) -> dict[str, float]:
    """How far (FP8 rows, scales) `got` is from `want`: share of FP8 codes that differ, largest dequantised error
    relative to its row's maximum, largest relative difference of the scales."""
    got_q, got_s = got
    want_q, want_s = want
    differ = (got_q.view(torch.uint8) != want_q.view(torch.uint8)).float().mean().item()
    got_values, want_values = got_q.float() * got_s, want_q.float() * want_s
    row_max = want_values.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12)
    error = ((got_values - want_values).abs() / row_max).max().item()
    scale_rel = ((got_s / want_s) - 1).abs().max().item()
    return {"codes_differ": differ, "max_error_of_row_max": error, "scale_rel": scale_rel}


def kernel_part(out: Path) -> dict[str, Any]:
    import torch
    import torch._inductor.config as inductor_config
    from torch.nn import functional

    from services import fp8_rows
    from services.fp8_matmul import quantize_rows

    inductor_config.deterministic = True
    fp8_rows.define_operator()
    if (reason := fp8_rows.gelu_kernel_unavailable("cuda")) is not None:
        raise SystemExit(f"the kernel cannot run here: {reason}")
    results: dict[str, Any] = {}
    torch.manual_seed(0)
    for name, rows, columns in KERNEL_SHAPES:
        hidden = (torch.randn(rows, columns, device="cuda") * 2).to(torch.bfloat16)
        bias = (torch.randn(columns, device="cuda") * 0.5).to(torch.bfloat16)
        compiled = torch.compile(
            lambda h, b: quantize_rows(functional.gelu(h + b, approximate="tanh")), dynamic=False, fullgraph=True
        )
        with torch.no_grad():
            reference = fp8_rows.gelu_quantize_reference(hidden, bias)
            ours = fp8_rows.gelu_quantize_rows(hidden, bias)
            theirs = compiled(hidden, bias)
            again = fp8_rows.gelu_quantize_rows(hidden, bias)
            record = {
                "rows": rows,
                "columns": columns,
                "kernel_ms": median_ms(torch, functools.partial(fp8_rows.gelu_quantize_rows, hidden, bias), 30),
                "inductor_ms": median_ms(torch, functools.partial(compiled, hidden, bias), 30),
                "kernel_vs_reference": compare(torch, ours, reference),
                "inductor_vs_reference": compare(torch, theirs, reference),
                "kernel_repeats_bit_equal": bool(torch.equal(ours[0].view(torch.uint8), again[0].view(torch.uint8)))
                and bool(torch.equal(ours[1], again[1])),
            }
        moved = rows * columns * 2 + rows * columns + rows * 4 + columns * 2
        record["kernel_GBps"] = moved / record["kernel_ms"] / 1e6
        with torch.no_grad():  # no bias, and a row holding a NaN (its scale and codes NaN, its neighbour's not)
            record["no_bias_vs_reference"] = compare(
                torch, fp8_rows.gelu_quantize_rows(hidden, None), fp8_rows.gelu_quantize_reference(hidden, None)
            )
            poisoned = hidden[:2].clone()
            poisoned[0, 5] = float("nan")
            nan_codes, nan_scale = fp8_rows.gelu_quantize_rows(poisoned, bias)
            record["nan_row_scale_is_nan"] = bool(nan_scale[0].isnan().item())
            record["nan_row_codes_all_nan"] = bool(nan_codes[0].float().isnan().all().item())
            record["clean_row_beside_it_finite"] = bool(nan_codes[1].float().isfinite().all().item())
        results[name] = record
        say(f"kernel {name}: {json.dumps(record)}")
        (out / "row-kernels-kernel.json").write_text(json.dumps(results, indent=2))
    return results


def query_key_difference(got: tuple[Any, Any], want: tuple[Any, Any]) -> dict[str, float]:
    """Per tensor (query, key): the share of values of `got` unequal to `want`'s, and the largest difference
    relative to `want`'s largest value."""
    record = {}
    for label, ours, theirs in zip(("query", "key"), got, want, strict=True):
        record[f"{label}_differ"] = (ours != theirs).float().mean().item()
        largest = theirs.float().abs().max()
        record[f"{label}_max_error_of_max"] = ((ours.float() - theirs.float()).abs().max() / largest).item()
    return record


def qk_part(out: Path) -> dict[str, Any]:
    """services/qk_norm_rope.py's kernel against the torch code it replaces, eager and compiled by Inductor, at
    LTX-2.3's self-attention sizes: median time, and how far each is from the eager torch code (share of bf16
    values that differ, largest difference relative to the tensor's largest value)."""
    import torch
    import torch._inductor.config as inductor_config

    from services import qk_norm_rope

    inductor_config.deterministic = True
    qk_norm_rope.define_qk_operator()
    if (reason := qk_norm_rope.qk_kernel_unavailable("cuda")) is not None:
        raise SystemExit(f"the kernel cannot run here: {reason}")
    compiled = torch.compile(qk_norm_rope.norm_rope_reference, dynamic=False, fullgraph=True)
    results: dict[str, Any] = {}
    torch.manual_seed(0)
    for name, tokens, heads, half_head in QK_SHAPES:
        width = heads * half_head * 2
        query, key = ((torch.randn(1, tokens, width, device="cuda") * 3).to(torch.bfloat16) for _ in range(2))
        weights = [(1 + 0.1 * torch.randn(width, device="cuda")).to(torch.bfloat16) for _ in range(2)]
        turns = torch.rand(1, tokens, heads, half_head, device="cuda", dtype=torch.float64) * 6.3
        cos, sin = turns.cos().float().transpose(1, 2), turns.sin().float().transpose(1, 2)
        args = (query, key, weights[0], weights[1], 1e-6, 1e-6, cos, sin)
        with torch.no_grad():
            reference = qk_norm_rope.norm_rope_reference(*args)
            ours = torch.ops.ltx2.qk_norm_rope(*args)
            theirs = compiled(*args)
            again = torch.ops.ltx2.qk_norm_rope(*args)

            record = {
                "tokens": tokens,
                "width": width,
                "kernel_ms": median_ms(torch, functools.partial(torch.ops.ltx2.qk_norm_rope, *args), 30),
                "inductor_ms": median_ms(torch, functools.partial(compiled, *args), 30),
                "eager_ms": median_ms(torch, functools.partial(qk_norm_rope.norm_rope_reference, *args), 10),
                "kernel_vs_torch": query_key_difference(ours, reference),
                "inductor_vs_torch": query_key_difference(theirs, reference),
                "kernel_repeats_bit_equal": all(torch.equal(a, b) for a, b in zip(ours, again, strict=True)),
            }
        moved = tokens * width * 2 * 4 + tokens * width * 4  # query and key read and written, the angles read
        record["kernel_GBps"] = moved / record["kernel_ms"] / 1e6
        results[name] = record
        say(f"qk {name}: {json.dumps(record)}")
        (out / "row-kernels-qk.json").write_text(json.dumps(results, indent=2))
    return results


def model_forward_args(torch: Any, shape: tuple[str, int, int, int, int], device: str) -> dict[str, Any]:
    """The transformer's keywords for one distilled step (batch 1, no guidance) at `shape`'s token counts."""
    _, frames, height, width, audio_frames = shape
    generator = torch.Generator(device).manual_seed(1)

    def noise(*size: int) -> Any:
        return torch.randn(*size, device=device, generator=generator).to(torch.bfloat16)

    sigma = torch.tensor([0.7], device=device)
    return {
        "hidden_states": noise(1, frames * height * width, 128),
        "audio_hidden_states": noise(1, audio_frames, 128),
        "encoder_hidden_states": noise(1, 1024, 4096),
        "audio_encoder_hidden_states": noise(1, 1024, 2048),
        "timestep": sigma * 1000,
        "sigma": sigma,
        "audio_sigma": sigma,
        "num_frames": frames,
        "height": height,
        "width": width,
        "fps": 24.0,
        "audio_num_frames": audio_frames,
        "use_cross_timestep": True,
        "return_dict": False,
    }


def model_variant(out: Path, layers: int, label: str, smoke: bool) -> int:
    """One variant of the model part (MODEL_VARIANTS), in this process (the parent runs each in a fresh one)."""
    import torch
    from diffusers import LTX2VideoTransformer3DModel
    from gpu_configs import TRANSFORMER_CONFIG_2_3

    from services import fp8_attention, model_loading, qk_norm_rope
    from services.fp8_matmul import convert_blocks
    from services.step_profile import summarize

    gelu_kernel, qk_kernel, whole_rows = MODEL_VARIANTS[label]
    device = "cpu" if smoke else "cuda"
    torch.manual_seed(0)
    with torch.device(device):
        transformer = LTX2VideoTransformer3DModel(**{**TRANSFORMER_CONFIG_2_3, "num_layers": layers})
    transformer = transformer.to(torch.bfloat16).eval().requires_grad_(False)
    convert_blocks(transformer, torch.device(device), fast_accumulation=True, gelu_kernel=gelu_kernel)
    if qk_kernel and not smoke and (reason := qk_norm_rope.qk_kernel_unavailable("cuda")) is not None:
        raise SystemExit(f"the query/key kernel cannot run here: {reason}")
    installed = fp8_attention.install(transformer, qk_kernel)
    cache = Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
    model_loading.compile_blocks(transformer, cache, deterministic=True, whole_rows=whole_rows)
    record: dict[str, Any] = {"layers": layers, "fp8_attention_layers": installed}
    synchronize = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for shape in SMOKE_SHAPES if smoke else MODEL_SHAPES:
        kwargs = model_forward_args(torch, shape, device)
        with torch.no_grad():
            started = time.perf_counter()
            video, audio = transformer(**kwargs)
            synchronize()
            first_s = time.perf_counter() - started
            for _ in range(2):
                transformer(**kwargs)
            forward_ms = median_ms(torch, functools.partial(transformer, **kwargs), 7)
            activities = [torch.profiler.ProfilerActivity.CPU]
            activities += [torch.profiler.ProfilerActivity.CUDA] if device == "cuda" else []
            synchronize()
            with torch.profiler.profile(activities=activities) as profile:
                started = time.perf_counter()
                transformer(**kwargs)
                synchronize()
                wall = time.perf_counter() - started
        table = summarize(profile.key_averages(), wall, on_device=device == "cuda")
        (out / f"row-kernels-model-{label}-{shape[0]}-profile.txt").write_text(table)
        torch.save({"video": video.cpu(), "audio": audio.cpu()}, WORK / f"model-{label}-{shape[0]}.pt")
        tokens = kwargs["hidden_states"].shape[1]
        record[shape[0]] = {"first_forward_s": first_s, "forward_ms": forward_ms, "tokens": tokens}
        say(f"model {label} {shape[0]}: {json.dumps(record[shape[0]])}")
        (out / f"row-kernels-model-{label}.json").write_text(json.dumps(record, indent=2))
    return 0


def keep_kernel_sources(cache: Path, profile: Path, target: Path, count: int = 24) -> list[str]:
    """Copy the generated Triton source of the `count` most expensive fused kernels in `profile` out of `cache`."""
    names = []
    for line in profile.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[-1].startswith("triton_") and parts[-1] not in names:
            names.append(parts[-1])
    names = names[:count]
    target.mkdir(parents=True, exist_ok=True)
    kept = []
    for source in cache.rglob("*.py"):
        try:
            text = source.read_text(errors="replace")
        except OSError:
            continue
        for name in names:
            if f"def {name}(" in text and name not in kept:
                shutil.copy(source, target / f"{name}.py")
                kept.append(name)
    return kept


def reduction_forms(cache: Path) -> dict[str, int]:
    """How many of the Triton kernels Inductor generated into `cache` are persistent reductions (the row in
    registers) and how many looped ones: what `[worker] whole_row_reductions` changes."""
    counts = {"persistent_reductions": 0, "looped_reductions": 0}
    for source in cache.rglob("*.py"):
        text = source.read_text(errors="replace")
        if "async_compile.triton(" in text:  # a graph's wrapper, which holds its kernels' sources again
            continue
        counts["persistent_reductions"] += text.count("@triton_heuristics.persistent_reduction(")
        counts["looped_reductions"] += text.count("@triton_heuristics.reduction(")
    return counts


def model_part(out: Path, layers: int, smoke: bool, variants: list[str]) -> dict[str, Any]:
    """The model part's `variants` (MODEL_VARIANTS' names), each in its own process and Inductor cache; the outputs
    of each against the one before it in `variants`."""
    import torch

    results: dict[str, Any] = {}
    work = WORK
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    for label in variants:
        cache = work / f"cache-{label}"
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache)}
        command = [sys.executable, __file__, "--out", str(out), "--variant", label, "--layers", str(layers)]
        command += ["--smoke"] if smoke else []
        started = time.time()
        done = subprocess.run(command, env=env, check=False)
        results[label] = {"rc": done.returncode, "seconds": time.time() - started, **reduction_forms(cache)}
        for shape in MODEL_SHAPES:
            profile = out / f"row-kernels-model-{label}-{shape[0]}-profile.txt"
            if profile.exists():
                results[label][f"sources_{shape[0]}"] = keep_kernel_sources(
                    cache, profile, out / f"kernels-{label}-{shape[0]}"
                )
    for shape in MODEL_SHAPES:
        for before_label, after_label in itertools.pairwise(variants):
            files = [work / f"model-{label}-{shape[0]}.pt" for label in (before_label, after_label)]
            if not all(file.exists() for file in files):
                continue
            before, after = (torch.load(file) for file in files)
            results[f"difference_{shape[0]}_{before_label}_to_{after_label}"] = {
                key: {
                    "max_abs": (after[key].float() - before[key].float()).abs().max().item(),
                    "rms": (after[key].float() - before[key].float()).pow(2).mean().sqrt().item(),
                    "rms_of_output": before[key].float().pow(2).mean().sqrt().item(),
                }
                for key in ("video", "audio")
            }
    (out / "row-kernels-model.json").write_text(json.dumps(results, indent=2))
    say(f"model: {json.dumps(results)}")
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--parts", default="kernel,qk,model")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--smoke", action="store_true", help="the model part on the CPU at a few tokens")
    parser.add_argument("--variants", default="inductor,kernel,qk", help="the model part's, in order")
    parser.add_argument("--variant", choices=tuple(MODEL_VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.variant:
        return model_variant(args.out, args.layers, args.variant, args.smoke)
    parts = args.parts.split(",")
    if "kernel" in parts:
        kernel_part(args.out)
    if "qk" in parts:
        qk_part(args.out)
    if "model" in parts:
        model_part(args.out, args.layers, args.smoke, args.variants.split(","))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
