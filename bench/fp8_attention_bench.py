"""FP8 attention against bf16 attention at LTX-2's self-attention shapes (issue 28, item 2), one GPU.

For each shape (the video self-attention of a 1080p LTX-2.3 clip's second stage, its first stage, and
a 768x512 LTX-2.0 clip; batch 1, 32 heads of 128) and input kind:

- times (CUDA events, median of --repeats after warm-ups) of torch's bf16 SDPA as the stage runs it
  (torch picks the backend), cuDNN's and FlashAttention's bf16 backends forced, and
  services.fp8_attention (quantisation of q, k, v included) eager and compiled (the quantisation fused by
  Inductor, as `--compile` runs it), and the quantisation alone (eager);
- the error of bf16 SDPA and of FP8 attention against an fp32 reference on the first
  --reference-queries queries: relative RMS, PSNR (peak = the reference's max |value|) and max |error|;
- whether two FP8 calls on the same inputs give equal bits.

Input kinds: `normal` (q, k, v standard normal: logits of std 1, a flat softmax) and `peaky` (q three
times larger and k offset by a shared mean of 2 per channel: sharper attention and the offset that
centring the keys removes). Writes fp8_attention.json under --out after each measurement.

    python3 bench/fp8_attention_bench.py --out "$OUT"
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {
    "ltx23_1920x1088x121_stage2": (1, 32640, 32, 128),
    "ltx23_1920x1088x121_stage1": (1, 8160, 32, 128),
    "ltx20_768x512x121": (1, 6144, 32, 128),
}
KINDS = ("normal", "peaky")


def inputs(shape: tuple[int, int, int, int], kind: str, seed: int = 0) -> tuple[Any, Any, Any]:
    """Random (B, S, H, D) bf16 query, key and value of the kind named."""
    import torch

    generator = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v = (torch.randn(shape, device="cuda", generator=generator, dtype=torch.float32) for _ in range(3))
    if kind == "peaky":
        q = q * 3.0
        k = k + 2.0 * torch.randn(shape[-1], device="cuda", generator=generator).sign()
    return q.bfloat16(), k.bfloat16(), v.bfloat16()


def sdpa(backend: str | None) -> Any:
    """bf16 attention on (B, S, H, D) tensors through torch's SDPA, with a forced backend or torch's pick."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}

    def attend(q: Any, k: Any, v: Any) -> Any:
        args = (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        if backend is None:
            out = torch.nn.functional.scaled_dot_product_attention(*args)
        else:
            with sdpa_kernel(backends[backend]):
                out = torch.nn.functional.scaled_dot_product_attention(*args)
        return out.transpose(1, 2)

    return attend


def timed(function: Any, args: tuple, repeats: int) -> float:
    """Median milliseconds of `repeats` calls after two warm-ups."""
    import torch

    for _ in range(2):
        function(*args)
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        function(*args)
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end))
    return sorted(samples)[len(samples) // 2]


def reference(q: Any, k: Any, v: Any, queries: int) -> Any:
    """fp32 attention of the first `queries` queries, head by head: (B, queries, H, D)."""
    import torch

    out = torch.empty((q.shape[0], queries, q.shape[2], q.shape[3]), device="cuda", dtype=torch.float32)
    scale = q.shape[-1] ** -0.5
    for head in range(q.shape[2]):
        qh = q[:, :queries, head].float()
        kh, vh = k[:, :, head].float(), v[:, :, head].float()
        weights = torch.softmax(qh @ kh.transpose(1, 2) * scale, dim=-1)
        out[:, :, head] = weights @ vh
    return out


def error(approx: Any, exact: Any) -> dict[str, float]:
    """Relative RMS error, PSNR against the reference's peak, and the largest absolute error."""
    import math

    diff = approx.float() - exact
    rms = diff.pow(2).mean().sqrt().item()
    peak = exact.abs().max().item()
    return {
        "relative_rms": rms / exact.pow(2).mean().sqrt().item(),
        "psnr_db": 20 * math.log10(peak / rms) if rms else float("inf"),
        "max_abs": diff.abs().max().item(),
    }


def quantize_only(q: Any, k: Any, v: Any) -> tuple:
    """The FP8 path's own work before the kernel: centring the keys and quantising the three operands."""
    from services.fp8_attention import quantize

    return quantize(q), quantize(k - k.mean(dim=1, keepdim=True)), quantize(v)


def say(record: dict[str, Any]) -> None:
    """One JSON line on stdout, at once (the call's log)."""
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()


def flops(shape: tuple[int, int, int, int]) -> float:
    """Multiply-adds of q k^T and P v, counted as 2 flops each."""
    batch, tokens, heads, head_dim = shape
    return 4.0 * batch * heads * tokens * tokens * head_dim


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--reference-queries", type=int, default=1024)
    parser.add_argument("--shapes", default=",".join(SHAPES))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    import torch

    from services import fp8_attention

    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cudnn": torch.backends.cudnn.version(),
        "unavailable": fp8_attention.unavailable_reason(),
        "results": [],
    }
    if report["unavailable"] is None:
        report["cudnn_frontend"] = getattr(fp8_attention.frontend(), "__version__", "?")
        report["fp8_output"] = fp8_attention.output_is_fp8(torch.cuda.current_device())
    say({key: value for key, value in report.items() if key != "results"})
    path = args.out / "fp8_attention.json"
    path.write_text(json.dumps(report, indent=1))
    if report["unavailable"]:
        return 1
    # As `--compile` runs it: Inductor fuses the quantisation around the kernel's operator.
    compiled_fp8 = torch.compile(fp8_attention.fp8_attention, dynamic=False)
    for name in args.shapes.split(","):
        shape = SHAPES[name]
        for kind in KINDS:
            q, k, v = inputs(shape, kind)
            row: dict[str, Any] = {"shape": name, "dims": shape, "kind": kind}
            exact = reference(q, k, v, args.reference_queries)
            started = time.perf_counter()
            try:
                first = fp8_attention.fp8_attention(q, k, v)
                torch.cuda.synchronize()
            except Exception as failure:  # the kernel's refusal is a result too
                row["fp8_error"] = f"{type(failure).__name__}: {failure}"
                report["results"].append(row)
                say(row)
                path.write_text(json.dumps(report, indent=1))
                continue
            row["fp8_first_call_s"] = time.perf_counter() - started
            row["fp8_repeatable"] = bool(torch.equal(first, fp8_attention.fp8_attention(q, k, v)))
            row["error_fp8"] = error(first[:, : args.reference_queries], exact)
            row["error_bf16"] = error(sdpa(None)(q, k, v)[:, : args.reference_queries], exact)
            timings = {
                "bf16_default": (sdpa(None), (q, k, v)),
                "bf16_cudnn": (sdpa("cudnn"), (q, k, v)),
                "bf16_flash": (sdpa("flash"), (q, k, v)),
                "fp8": (fp8_attention.fp8_attention, (q, k, v)),
                "fp8_compiled": (compiled_fp8, (q, k, v)),
            }
            for label, (function, call_args) in timings.items():
                try:
                    row[f"ms_{label}"] = timed(function, call_args, args.repeats)
                    row[f"tflops_{label}"] = flops(shape) / row[f"ms_{label}"] / 1e9
                except Exception as failure:
                    row[f"ms_{label}"] = f"{type(failure).__name__}: {failure}"
            row["ms_fp8_quantize_only"] = timed(quantize_only, (q, k, v), args.repeats)
            report["results"].append(row)
            say(row)
            path.write_text(json.dumps(report, indent=1))
            del q, k, v, exact, first
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
