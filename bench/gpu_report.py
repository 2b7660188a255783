"""The benchmark's numbers for people: derived ratios and MFU, the summary table, the run lists.

It exists to keep the arithmetic and the printing apart from the runs: everything here reads the
results dictionary that gpu_run saved (results.json), so a table can be printed again from an old
file. Staged columns show what the orchestrator records per stage (events.log, job.json: stage
seconds, lead-in before each stage, publish, peaks); the worker-internal phases (model loads, text
encode, denoising steps, decode) are measured in the single-process baseline only.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from gpu_common import GIB, MAX_SEQUENCE_LENGTH, parse_size
from gpu_configs import peak_flops, transformer_flops

STAGES = ("encode_diffuse", "audio_decode", "video_decode")


# ---------------------------------------------------------------------------------------------
# derived numbers
# ---------------------------------------------------------------------------------------------
def model_config(results: dict[str, Any]) -> dict[str, Any] | None:
    """The transformer config the baseline loaded, else the one in the model folder."""
    cfg = results["phases"].get("baseline", {}).get("transformer_config")
    config_file = Path(results.get("root", "")) / "transformer" / "config.json"
    if not cfg and config_file.is_file():
        cfg = json.loads(config_file.read_text())
    return cfg


def baseline_mfu(run: dict[str, Any], cfg: dict[str, Any], peak: float | None, matmul: float | None) -> dict[str, Any]:
    """FLOPs of a baseline call's step, achieved TFLOP/s and MFU (per step and per transformer call)."""
    flops = transformer_flops(cfg, *parse_size(run["size"]), MAX_SEQUENCE_LENGTH)
    median_call = median(run.get("transformer_gpu_s"))
    entry = {
        **flops,
        "s_per_step": run["s_per_step"],
        "transformer_gpu_median_s": median_call,
        "achieved_tflops_step": flops["flops"] / run["s_per_step"] / 1e12,
    }
    if median_call:
        entry["achieved_tflops_transformer"] = flops["flops"] / median_call / 1e12
    if peak:
        entry["mfu_step_vs_datasheet"] = flops["flops"] / run["s_per_step"] / peak
        if median_call:
            entry["mfu_transformer_vs_datasheet"] = flops["flops"] / median_call / peak
    if matmul:
        entry["mfu_step_vs_measured_matmul"] = flops["flops"] / run["s_per_step"] / (matmul * 1e12)
    return entry


def staged_ratios(results: dict[str, Any]) -> dict[str, Any]:
    """Staged small-clip wall time over the baseline's cold call: the first fork-server run, each
    run, and run-order pairs of repeats."""
    phases, small, derived = results["phases"], results["args"]["small"], {}
    cold_runs = {r.get("label"): r for r in phases.get("baseline", {}).get("runs", [])}
    base_cold = cold_runs.get("cold", {}).get("cold_total_s")
    # Fork-server runs (every run before the fork server existed counts as one: no "fork_server" key).
    staged = [(n, p) for n, p in phases.items() if n.startswith("staged_") and p.get("size") == small]
    first_fork = next((p for _, p in staged if p.get("fork_server", True)), None)
    if first_fork and first_fork.get("returncode") == 0 and base_cold:
        derived["staged_over_baseline_cold"] = first_fork["cli_wall_s"] / base_cold
    if base_cold:  # every staged small-clip run against the (first) baseline process's cold call
        derived["staged_over_baseline_cold_each"] = {
            n: p["cli_wall_s"] / base_cold for n, p in staged if p.get("returncode") == 0
        }
    staged_walls = [
        p["cli_wall_s"]
        for n, p in phases.items()
        if n.startswith(f"staged_{small}") and p.get("returncode") == 0 and p.get("fork_server", True)
    ]
    base_walls = [
        r["cold_total_s"]
        for n, p in phases.items()
        if n.startswith("baseline")
        for r in p.get("runs", [])
        if r.get("cold_total_s")
    ]
    if len(staged_walls) > 1 and len(base_walls) > 1:
        derived["staged_over_baseline_cold_pairs"] = [a / b for a, b in zip(staged_walls, base_walls, strict=False)]
    return derived


def derive(results: dict[str, Any]) -> dict[str, Any]:
    """MFU of every baseline call and staged run (its s/step from the stage_progress events) and
    the staged / baseline wall-time ratios."""
    phases = results["phases"]
    derived: dict[str, Any] = {}
    cfg = model_config(results)
    peak = peak_flops(results["environment"].get("versions", {}).get("gpu", ""))
    matmul = phases.get("build", {}).get("matmul", {}).get("tflops")
    for run in phases.get("baseline", {}).get("runs", []) if cfg else []:
        if run.get("s_per_step"):
            derived[f"baseline_{run['label']}"] = baseline_mfu(run, cfg, peak, matmul)
    for name, phase in phases.items() if cfg else []:
        step = staged_value(phase, "encode_diffuse", "s_per_step") if name.startswith("staged_") else None
        if step:
            flops = transformer_flops(cfg, *parse_size(phase["size"]), MAX_SEQUENCE_LENGTH)["flops"]
            derived[name] = {"achieved_tflops_step": flops / step / 1e12}
            if peak:
                derived[name]["mfu_step_vs_datasheet"] = flops / step / peak
    derived.update(staged_ratios(results))
    return derived


# ---------------------------------------------------------------------------------------------
# cells
# ---------------------------------------------------------------------------------------------
def fmt(value: Any, unit: str = "s", digits: int = 1) -> str:
    """A number for the table: "-" for None, GiB from bytes, GiB from MiB, else `digits` decimals."""
    if value is None:
        return "-"
    if unit == "GiB":
        return f"{value / GIB:.1f}"
    if unit == "MiB":
        return f"{value / 1024:.1f}"
    return f"{value:.{digits}f}"


def median(values: list[float] | None) -> float | None:
    """The upper median (None for no values)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def staged_value(phase: dict[str, Any], stage: str, key: str) -> Any:
    """A field of one stage of a staged run (None if absent)."""
    return phase.get("stages", {}).get(stage, {}).get(key)


def staged_peak(phase: dict[str, Any], key: str) -> Any:
    """The largest of a peak over the run's stages."""
    values = [s.get(key) or 0 for s in phase.get("stages", {}).values()]
    return max(values) if values else None


def per_stage(phase: dict[str, Any], key: str, digits: int = 1) -> str:
    """A field of the three stages as "enc/aud/vid"."""
    return "/".join(fmt(staged_value(phase, s, key), digits=digits) for s in STAGES)


def base_cell(metric: str, run: dict[str, Any], base: dict[str, Any], first: bool) -> str:
    """One baseline column; process-level numbers only in the column of the process's first call."""
    if not run:
        return "-"
    audio = (run.get("audio_vae_decode_s") or 0) + (run.get("vocoder_s") or 0)
    total = run.get("cold_total_s") if first else (run.get("call_s") or 0) + (run.get("mp4_encode_s") or 0)
    values = {
        "start+import (s)": fmt(base.get("start_import_s")) if first else "-",
        "weight load (s) [TE+DiT+aud+vae]": fmt(base.get("load_s")) if first else "-",
        "text encode (s)": fmt(run.get("text_encode_s"), digits=2),
        "denoise total (s)": fmt(run.get("denoise_s")),
        "denoise s/step": fmt(run.get("s_per_step"), digits=3),
        "transformer GPU s/call (median)": fmt(median(run.get("transformer_gpu_s")), digits=3),
        "video decode (s)": fmt(run.get("vae_decode_s"), digits=2),
        "audio decode (s)": fmt(audio, digits=2),
        "np postprocess + rest (s)": fmt(run.get("postprocess_and_rest_s"), digits=2),
        "mp4 encode (s)": fmt(run.get("mp4_encode_s")),
        "TOTAL wall (s)": fmt(total),
        "peak GPU alloc (GiB, torch)": fmt(run.get("peak_gpu_alloc_bytes"), "GiB"),
        "peak GPU used (GiB, nvidia-smi)": fmt(run.get("gpu_peak_mib_call"), "MiB"),
        "peak host RSS (GiB)": fmt(run.get("rss_peak_bytes"), "GiB"),
    }
    return values.get(metric, "-")


def staged_cell(metric: str, phase: dict[str, Any]) -> str:
    """One staged column: what events.log and job.json say per stage, and the CLI's wall time."""
    if not phase.get("stages"):
        return "-"
    encode = "encode_diffuse"
    loads = (
        staged_value(phase, encode, "text_encoder_load_s"),
        staged_value(phase, encode, "transformer_load_s"),
        staged_value(phase, "audio_decode", "load_s"),
        staged_value(phase, "video_decode", "load_s"),
    )
    values = {
        "start+import (s)": fmt(staged_value(phase, encode, "start_import_handshake_s")),
        "weight load (s) [TE+DiT+aud+vae]": "+".join(fmt(value, digits=1) for value in loads),
        "text encode (s)": fmt(staged_value(phase, encode, "text_encode_s"), digits=2),
        "denoise total (s)": fmt(staged_value(phase, encode, "denoise_s")),
        "denoise s/step": fmt(staged_value(phase, encode, "s_per_step"), digits=3),
        "video decode (s)": "+mp4 " + fmt(staged_value(phase, "video_decode", "decode_s"), digits=2),
        "audio decode (s)": fmt(staged_value(phase, "audio_decode", "decode_s"), digits=2),
        "mp4 encode (s)": "in video stage",
        "job created (s) [CLI start ->]": fmt(phase.get("cli_start_to_job_created_s")),
        "stage lead-in enc/aud/vid (s)": per_stage(phase, "lead_in_s", digits=2),
        "stage seconds enc/aud/vid": per_stage(phase, "seconds"),
        "publish (s) [video end -> done]": fmt(phase.get("publish_s"), digits=2),
        "TOTAL wall (s)": fmt(phase.get("cli_wall_s")),
        "peak GPU alloc (GiB, torch)": fmt(staged_peak(phase, "peak_gpu_bytes"), "GiB"),
        "peak GPU used (GiB, nvidia-smi)": fmt(phase.get("gpu_peak_mib"), "MiB"),
        "peak host RSS (GiB)": fmt(staged_peak(phase, "peak_rss_bytes"), "GiB"),
    }
    return values.get(metric, "-")


TABLE_METRICS = (
    "start+import (s)",
    "weight load (s) [TE+DiT+aud+vae]",
    "text encode (s)",
    "denoise total (s)",
    "denoise s/step",
    "transformer GPU s/call (median)",
    "video decode (s)",
    "audio decode (s)",
    "np postprocess + rest (s)",
    "mp4 encode (s)",
    "job created (s) [CLI start ->]",
    "stage lead-in enc/aud/vid (s)",
    "stage seconds enc/aud/vid",
    "publish (s) [video end -> done]",
    "TOTAL wall (s)",
    "peak GPU alloc (GiB, torch)",
    "peak GPU used (GiB, nvidia-smi)",
    "peak host RSS (GiB)",
    "MFU denoise step (datasheet)",
    "MFU transformer call (datasheet)",
)


# ---------------------------------------------------------------------------------------------
# the table and the run lists
# ---------------------------------------------------------------------------------------------
def table_columns(results: dict[str, Any]) -> list[tuple[str, Any, str]]:
    """(title, metric -> cell text, derived key) per measured configuration; empty ones left out."""
    phases = results["phases"]
    base = phases.get("baseline", {})
    runs = {r.get("label"): r for r in base.get("runs", []) if "call_s" in r}
    small, large = results["args"]["small"], results["args"]["large"]

    def staged(key: str) -> Any:
        return lambda m: staged_cell(m, phases.get(key, {}))

    columns: list[tuple[str, Any, str]] = [
        ("base cold " + small, lambda m: base_cell(m, runs.get("cold", {}), base, True), "baseline_cold"),
        ("base warm", lambda m: base_cell(m, runs.get("warm", {}), base, False), "baseline_warm"),
        ("staged " + small, staged(f"staged_{small}"), f"staged_{small}"),
        ("nofork " + small, staged(f"staged_{small}_nofork"), f"staged_{small}_nofork"),
        ("base " + large, lambda m: base_cell(m, runs.get("large", {}), base, False), "baseline_large"),
        ("staged " + large, staged(f"staged_{large}"), f"staged_{large}"),
        ("nofork " + large, staged(f"staged_{large}_nofork"), f"staged_{large}_nofork"),
    ]
    # Columns with nothing measured (no warm call, no run without the fork server, ...) are left out.
    return [c for c in columns if any(c[1](m) != "-" for m in TABLE_METRICS if not m.startswith("MFU"))]


def table_lines(results: dict[str, Any]) -> list[str]:
    """The summary table: one column per measured configuration."""
    derived = results.get("derived", {})
    columns = table_columns(results)

    def cell(metric: str, text_of: Any, key: str) -> str:
        field = {"MFU denoise": "mfu_step_vs_datasheet", "MFU transformer": "mfu_transformer_vs_datasheet"}
        for prefix, name in field.items():
            if metric.startswith(prefix):
                value = derived.get(key, {}).get(name)
                return "-" if value is None else f"{100 * value:.1f}%"
        return text_of(metric)

    widths = [max(17, len(title)) for title, _, _ in columns]
    lines = [f"{'metric':33s}|" + "|".join(f"{t:>{w}s}" for (t, _, _), w in zip(columns, widths, strict=True))]
    lines.append("-" * len(lines[0]))
    for metric in TABLE_METRICS:
        cells = [f"{cell(metric, text_of, key):>{w}s}" for (_, text_of, key), w in zip(columns, widths, strict=True)]
        lines.append(f"{metric:33s}|" + "|".join(cells))
    return lines


def baseline_repeat_line(key: str, phase: dict[str, Any], run: dict[str, Any]) -> str:
    """One baseline call in the run list (process start-up and load only on the cold call)."""
    cold = run["label"] == "cold"
    wall = run.get("cold_total_s") if cold else run["call_s"] + run["mp4_encode_s"]
    start = fmt(phase.get("start_import_s")) if cold else "-"
    load = fmt(phase.get("load_s")) if cold else "-"
    encode, first_step = fmt(run.get("text_encode_s"), digits=2), fmt(run.get("first_step_s"), digits=2)
    return (
        f"  {key + ' ' + run['label']:28s} {fmt(wall):>6s} | {start:>5s} | {load:>19s} | {encode:>5s} | "
        f"{first_step:>5s} | {fmt(run.get('s_per_step_steady'), digits=3):>6s} | "
        f"vae {fmt(run.get('vae_decode_s'), digits=2)} + mp4 {fmt(run.get('mp4_encode_s'))}"
    )


def repeat_lines(results: dict[str, Any]) -> list[str]:
    """One line per measured process, in run order (repeats included), for the small clip.

    Staged runs have no worker-internal phases here (not in events.log / job.json): their line
    gives the wall time and the stage seconds.
    """
    small = results["args"]["small"]
    lines = ["runs in order (small clip): wall | start+import | loads | text enc | 1st step | s/step steady | decode"]
    for key, phase in results["phases"].items():
        if key.startswith(f"staged_{small}") and phase.get("stages"):
            lines.append(
                f"  {key:28s} {fmt(phase.get('cli_wall_s')):>6s} | {'-':>5s} | {'-':>19s} | {'-':>5s} | "
                f"{'-':>5s} | {'-':>6s} | stages enc/aud/vid {per_stage(phase, 'seconds', digits=2)}"
            )
        elif key.startswith("baseline"):
            for run in phase.get("runs", []):
                if run.get("size") == small and "call_s" in run:
                    lines.append(baseline_repeat_line(key, phase, run))
    ratios = results.get("derived", {}).get("staged_over_baseline_cold_pairs")
    if ratios:
        lines.append(f"staged/baseline cold ratio per pair (in run order): {', '.join(f'{r:.3f}' for r in ratios)}")
    return lines


def fork_lines(results: dict[str, Any]) -> list[str]:
    """Every staged run in order: fork server on/off, wall, ratio, per-stage lead-in and seconds, memory."""
    each = results.get("derived", {}).get("staged_over_baseline_cold_each", {})
    lines = [
        "staged runs in order: fork | wall | /base cold | lead-in enc/aud/vid | stage s enc/aud/vid | "
        "peak alloc GiB | smi GiB | left over"
    ]
    for key, phase in results["phases"].items():
        if not key.startswith("staged_"):
            continue
        if phase.get("skipped"):
            lines.append(f"  {key:30s} skipped: {phase['skipped']}")
            continue
        ratio = each.get(key)
        status = "" if phase.get("returncode") == 0 else f"  FAILED rc={phase.get('returncode')}"
        lines.append(
            f"  {key:30s} {'on ' if phase.get('fork_server', True) else 'off'} | {fmt(phase.get('cli_wall_s')):>6s} | "
            f"{'-' if ratio is None else f'{ratio:.3f}':>6s} | {per_stage(phase, 'lead_in_s', digits=2):>16s} | "
            f"{per_stage(phase, 'seconds'):>15s} | {fmt(staged_peak(phase, 'peak_gpu_bytes'), 'GiB'):>5s} | "
            f"{fmt(phase.get('gpu_peak_mib'), 'MiB'):>5s} | {len(phase.get('leftover_processes') or {})}{status}"
        )
    return lines


def header_lines(results: dict[str, Any]) -> list[str]:
    """The card, the versions, the model folder and the build."""
    env, build = results.get("environment", {}), results["phases"].get("build", {})
    lines = ["", "=" * 100, f"GPU: {env.get('versions', {}).get('gpu')} | {env.get('nvidia_smi')}"]
    lines.append(f"versions: {env.get('versions')} | model folder {results.get('root')}")
    if build:
        plan = build.get("storage", {}).get("plan", {}).get("placement")
        lines.append(
            f"build: {build.get('total_bytes', 0) / 1e9:.1f} GB in {build.get('wall_s') or 0:.0f} s "
            f"(sync {build.get('sync_s') or 0:.0f} s), TE layers {build.get('text_encoder_layers')}, "
            f"bf16 matmul {build.get('matmul', {}).get('tflops', 0):.0f} TFLOP/s, placement {plan}"
        )
        if build.get("deviation"):
            lines.append(f"DEVIATION: {build['deviation']}")
    return lines


def footer_lines(results: dict[str, Any]) -> list[str]:
    """FLOPs, the headline ratio, and every failed or skipped run."""
    phases, derived = results["phases"], results.get("derived", {})
    flops = {k: v.get("flops") for k, v in derived.items() if isinstance(v, dict) and v.get("flops")}
    lines = [f"FLOPs per step: {', '.join(f'{k} {v:.4g}' for k, v in flops.items())}"]
    if derived.get("staged_over_baseline_cold"):
        ratio = derived["staged_over_baseline_cold"]
        lines.append(f"staged / baseline, cold, {results['args']['small']}, process start to MP4: {ratio:.3f}")
    for name, phase in phases.items():
        if name.startswith("staged_") and phase.get("returncode") not in (0, None):
            lines.append(f"{name} FAILED rc={phase.get('returncode')}: {phase.get('stderr_tail', '')[-600:]}")
        if name.startswith("staged_") and phase.get("skipped"):
            lines.append(f"{name} skipped: {phase['skipped']}")
    base = phases.get("baseline", {})
    for run in base.get("runs", []):
        if run.get("skipped"):
            lines.append(f"baseline {run['label']} skipped: {run['skipped']}")
    if base and base.get("returncode") not in (0, None):
        lines.append(f"baseline process rc={base.get('returncode')} timed_out={base.get('timed_out')}")
    return [*lines, "=" * 100]


def print_table(results: dict[str, Any]) -> None:
    """Everything above, printed at the end of `all`."""
    lines = header_lines(results) + table_lines(results) + repeat_lines(results) + fork_lines(results)
    sys.stdout.write("\n".join(lines + footer_lines(results)) + "\n")
    sys.stdout.flush()
