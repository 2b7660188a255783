#!/usr/bin/env python3
"""GPU benchmark, version 3: stage-major batches and regional compile on the full-size model.

    python bench/batch_bench.py --out DIR [--budget-s 560] [--scale full|smoke|tiny] [--family 2.0|2.3]
                                [--sequence batch,batch_compile,batch_compile_warm,large_compile]

Builds the full-size LTX-2.0 folder (`--family 2.3`: LTX-2.3, with its latent upsampler) with random
weights (bench/gpu_bench.py `build`, reused when an earlier call on the machine left one of the same
scale and family), then runs, each as a fresh `ltx2` CLI process:

- batch: `ltx2 batch` of --clips clips at --small (different prompts and seeds), stage-major, eager;
- batch_compile: the same clips with `compile = true` (regional compile of the transformer's
  repeated blocks), starting from an empty compile cache;
- batch_compile_warm: the same again, the compile cache left by batch_compile kept (what every
  later batch on the machine sees);
- large_compile: one clip at --large with `--compile` (denoise seconds per step at 1080p);
- batch_fp8mm: the batch clips with `--fp8-matmul` and `--compile` (warm compile cache), PSNR
  against the eager bf16 clips;
- batch_fp8mm_warmup: 2 of the batch_fp8mm clips, to fill the compile cache for the runs below;
- batch_fp8mm_lanes1 / batch_fp8mm_lanes: batch_fp8mm with one lane (`LTX2_DEVICES=1`) and with
  a lane per visible GPU (`auto`); the lanes' clips are compared frame by frame with one lane's;
- batch_fp8mm_lanes1_again / batch_fp8mm_gpu1: the one-lane batch again on GPU 0, and on GPU 1
  alone (`LTX2_DEVICES=cuda:1`), compared with the first one-lane run (is a difference the GPU's?);
- batch_fp8mm_ray: batch_fp8mm on a Ray farm of this host (`[cluster] backend = "ray"`: a Ray
  head started with every visible GPU before the run, stopped after it; the batch joins it), one
  lane per GPU, compared frame by frame with one local lane's clips;
- large_fp8mm: one clip at --large with `--fp8-matmul --compile` (s/step and peak memory at 1080p);
- large_fp8mm_nag / small_fp8mm / small_fp8mm_nag: the same with Normalized Attention Guidance
  (`--nag-scale 11` and a negative prompt), and one clip at --small without and with it: the
  per-step price of NAG (services/nag.py);
- large_fp8mm_exact: large_fp8mm with `LTX2_FP8_FAST_ACCUMULATION=false` (every FP8 product
  accumulated in fp32), to price the tensor cores' fast accumulation in speed and PSNR;
- large_eager: the same clip in eager bf16, the reference of the large clips' PSNR;
- large_eager_plain: large_eager with `PYTORCH_CUDA_ALLOC_CONF` emptied, i.e. torch's default
  allocator instead of the workers' expandable segments (peak memory as nvidia-smi sees it);
- hd_two_stage_fp8mm / hd_fp8mm (issue 14, meant for `--family 2.3`): a stage-major batch of --clips
  clips at --hd (1920x1088x121), distilled schedule, `--fp8-matmul --compile`, `pipeline =
  "two-stage"` / `"one-stage"`; hd_two_stage_fp8mm_warmup / hd_fp8mm_warmup: one such clip each, to
  fill the compile cache; hd_two_stage_bf16 / hd_bf16: one clip in eager bf16 (per-stage peaks for
  the issue's 48 GiB target). results.json "issue14" compares them with the targets; the comment
  above HD_TARGETS estimates the two device calls:

      bash bench/run_on_device.sh batch --family 2.3 \
          --sequence hd_two_stage_fp8mm_warmup,hd_fp8mm_warmup,hd_two_stage_bf16
      bash bench/run_on_device.sh batch --family 2.3 --sequence hd_two_stage_fp8mm,hd_fp8mm

Per run: wall time from process start to exit, per-clip time (wall / clips, and the warm per-clip
cost: what each clip after the first adds inside the group processes, both as the sum of its
stage attempts' seconds and as the spacing of the clips' stage ends, which is the honest figure
once the video stage overlaps clips; the diffusion stage's own warm seconds per clip), worker
processes per stage, each clip's stage seconds,
peak GPU memory (nvidia-smi, every 250 ms) and per stage (torch). Every per-stage number comes
from the jobs' events.log and job.json (bench/event_timings.py), not from the worker logs' text:
model loads per stage, each clip's first denoising step and steady s/step (and the MFU from it)
come from the workers' progress events (`stage_progress`), timestamped as they arrive.
Compiled clips are compared with the eager ones of the same seed by the PSNR of their decoded
frames. Results go to DIR/results.json as each run ends; the last thing printed is a table.
"""

from __future__ import annotations

import time

T_PROCESS = time.time()

import argparse  # noqa: E402
import contextlib  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from event_timings import AttemptTiming, JobTiming, finish_times, first_mark, progress_rows, read_events, read_job  # noqa: E402,E501
from gpu_common import (  # noqa: E402
    ENTRY,
    GIB,
    MAX_SEQUENCE_LENGTH,
    PROMPT,
    REPO,
    STEPS,
    log,
    parse_size,
    size_label,
    write_json,
)  # fmt: skip
from gpu_configs import FAMILIES, peak_flops, scaled_configs, transformer_flops  # noqa: E402
from gpu_report import fmt  # noqa: E402
from gpu_run import GpuSampler, probe_environment, run_child  # noqa: E402
from gpu_staged import kill_pids, worker_pids  # noqa: E402
from gpu_storage import choose_root  # noqa: E402

from orchestrator.placement.lanes import visible_cuda_devices  # noqa: E402
from protocol.cuda_mps import control_daemon_pid  # noqa: E402

STAGES = ("encode_diffuse", "audio_decode", "video_decode")
PROMPTS = [
    PROMPT,
    "A paper lantern drifts over a night market, vendors calling out as oil sizzles in woks.",
    "Waves break against a basalt cliff at dawn, gulls wheeling and spray hissing on the rocks.",
    "A potter's wheel spins in a sunlit workshop while clay slaps and a radio hums softly.",
    "Snow falls on an empty tram stop, a bell rings and a distant train rumbles past.",
    "A drummer counts in on a rooftop at sunset, traffic murmuring in the street below.",
]


def write_batch(
    path: Path,
    root: str,
    size: tuple[int, int, int],
    clips: int,
    compile_: bool,
    fp8_matmul: bool = False,
    pipeline: str | None = None,
    fp8_attention: bool = False,
    clip_keys: list[list[str]] | None = None,
) -> Path:
    """A batch TOML of `clips` clips (prompt i, seed i) at `size`; `pipeline` ("one-stage" /
    "two-stage") is written only when given (else the family's preset decides), `fp8_attention` only
    when on; `clip_keys[i]`: more TOML lines for clip i (keyframes, an extension's source)."""
    width, height, frames = size
    lines = [
        "[defaults]",
        f"model = {json.dumps(root)}",
        f"width = {width}\nheight = {height}\nnum_frames = {frames}",
        f'steps = {STEPS}\nschedule = "distilled"',
        f"compile = {'true' if compile_ else 'false'}",
        f"fp8_matmul = {'true' if fp8_matmul else 'false'}",
        *([f"pipeline = {json.dumps(pipeline)}"] if pipeline else []),
        *(["fp8_attention = true"] if fp8_attention else []),
        "",
    ]
    for index in range(clips):
        lines += ["[[clips]]", f'name = "clip{index + 1}"', f"prompt = {json.dumps(PROMPTS[index % len(PROMPTS)])}"]
        lines += [f"seed = {index + 1}", *(clip_keys[index] if clip_keys else []), ""]
    path.write_text("\n".join(lines))
    return path


# A negative prompt for the NAG runs, and the NAG scale the ComfyUI LTX-2 node uses.
NAG_FLAGS = ["--nag-scale", "11", "--negative-prompt", "blurry, low quality, distorted, watermark, text"]
LARGE_RUNS = {
    "large_compile": ["--compile"],
    "large_fp8mm": ["--fp8-matmul", "--compile"],
    "large_fp8mm_nag": ["--fp8-matmul", "--compile", *NAG_FLAGS],
    "large_fp8mm_exact": ["--fp8-matmul", "--compile"],
    "large_eager": [],
    "large_eager_plain": [],
    "large_fp8mm_fp8attn": ["--fp8-matmul", "--compile", "--fp8-attention"],
}
# One clip at --small: the per-step price of NAG against the same clip without it.
SMALL_RUNS = {
    "small_fp8mm": ["--fp8-matmul", "--compile"],
    "small_fp8mm_nag": ["--fp8-matmul", "--compile", *NAG_FLAGS],
    "small_fp8mm_fp8attn": ["--fp8-matmul", "--compile", "--fp8-attention"],
}
# Issue 28 item 2: FP8 attention against the same clip with bf16 attention (PSNR of the MP4s, s/step).
#   bash bench/run_on_device.sh batch --sequence large_fp8mm,large_fp8mm_fp8attn,small_fp8mm,small_fp8mm_fp8attn
VERSUS = {"large_fp8mm_fp8attn": "large_fp8mm", "small_fp8mm_fp8attn": "small_fp8mm"}
# Runs that change a setting through the environment: the FP8 GEMMs without fast accumulation;
# torch's default CUDA allocator instead of the expandable segments the workers get.
RUN_ENV = {
    "large_fp8mm_exact": {"LTX2_FP8_FAST_ACCUMULATION": "false"},
    "large_eager_plain": {"PYTORCH_CUDA_ALLOC_CONF": ""},
    "batch_fp8mm_lanes1": {"LTX2_DEVICES": "1"},
    "batch_fp8mm_lanes": {"LTX2_DEVICES": "auto"},
    "batch_fp8mm_lanes1_again": {"LTX2_DEVICES": "1"},
    "batch_fp8mm_gpu1": {"LTX2_DEVICES": "cuda:1"},
    "batch_fp8mm_ray": {"LTX2_CLUSTER_BACKEND": "ray", "LTX2_RAY_ADDRESS": "auto"},
}
# Runs compared clip by clip with another run rather than with the eager clips (same settings, so
# the frames must be identical: PSNR inf).
SAME_AS = {
    "batch_fp8mm_lanes": "batch_fp8mm_lanes1",
    "batch_fp8mm_lanes1_again": "batch_fp8mm_lanes1",  # run to run, same GPU
    "batch_fp8mm_gpu1": "batch_fp8mm_lanes1",  # the other GPU, alone
    "batch_fp8mm_ray": "batch_fp8mm_lanes1",
}
# Issue 23 (version 11): the fast path twice with `[worker] deterministic` on and once off, each run from a
# cold compile cache of its own, so the second "on" run proves that compiling again gives the same kernels
# and bits (a user's other host, a wiped cache). Files must be identical between the "on" runs; the "off"
# run gives the time the deterministic mode is compared with (per step and per clip, within 2 %).
#   bash bench/run_on_device.sh batch --sequence batch_fp8mm_det,batch_fp8mm_det_again,batch_fp8mm_nondet
# LTX-2.3 two-stage at --hd, if a second call's time allows (one shared cache: cold compiles of both
# stage shapes for three runs do not fit one call; the "on" runs then differ in cache state, not in code):
#   bash bench/run_on_device.sh batch --family 2.3 --clips 2 \
#       --sequence hd_two_stage_det,hd_two_stage_det_again,hd_two_stage_nondet
REPEAT_RUNS = {
    "batch_fp8mm_det": ("batch_fp8mm_det_again", "batch_fp8mm_nondet"),
    "hd_two_stage_det": ("hd_two_stage_det_again", "hd_two_stage_nondet"),
}
RUN_ENV.update(
    {"batch_fp8mm_nondet": {"LTX2_DETERMINISTIC": "false"}, "hd_two_stage_nondet": {"LTX2_DETERMINISTIC": "false"}}
)
SAME_AS.update({again: first for first, (again, _) in REPEAT_RUNS.items()})
SAME_AS.update({off: first for first, (_, off) in REPEAT_RUNS.items()})
# Runs whose compile starts from an empty cache of their own.
OWN_COMPILE_CACHE = {"batch_fp8mm_det", "batch_fp8mm_det_again", "batch_fp8mm_nondet"}
# `ray start` of a one-host farm takes a few seconds; it runs before the measured batch, as a
# farm is up before its jobs come.
RAY_START_TIMEOUT_S = 120
# NVIDIA's MPS control program (MPS_RUNS start a daemon of their own with it; the driver's utilities ship it).
MPS_CONTROL = "nvidia-cuda-mps-control"
# How long an MPS run's daemon may take to write its pid file after `nvidia-cuda-mps-control -d` returned.
MPS_START_S = 10.0
# The most an MPS run's daemon takes after its run (two 10 s commands, 15 s for it to go): kept out of its timeout.
MPS_TEARDOWN_S = 40
# The compile warm-up batch needs only enough clips to compile every shape once.
WARMUP_CLIPS = 2

# Issue 14 (version 10, planned): LTX-2.3 at --hd (1920x1088x121), two-stage against one-stage, each a
# stage-major batch of --clips clips (distilled schedule, `--fp8-matmul --compile`). Run -> (pipeline,
# clips: None = --clips, fp8-matmul and compile). The warm-ups (one clip each) fill the compile cache for
# the shapes of each pipeline (two-stage: stage 1 at half size, stage 2 at full size); the *_bf16 runs
# (one clip, eager bf16) give the per-stage peaks the issue's "<= 48 GiB in bf16" target is about.
HD_RUNS: dict[str, tuple[str, int | None, bool]] = {
    "hd_fp8mm_warmup": ("one-stage", 1, True),
    "hd_two_stage_fp8mm_warmup": ("two-stage", 1, True),
    "hd_fp8mm": ("one-stage", None, True),
    "hd_two_stage_fp8mm": ("two-stage", None, True),
    "hd_bf16": ("one-stage", 1, False),
    "hd_two_stage_bf16": ("two-stage", 1, False),
    "hd_two_stage_det": ("two-stage", None, True),
    "hd_two_stage_det_again": ("two-stage", None, True),
    "hd_two_stage_nondet": ("two-stage", None, True),
    "hd_two_stage_fp8attn": ("two-stage", None, True),
}
# Issue 28 item 2 on LTX-2.3 two-stage at --hd: FP8 self-attention against the same batch with bf16 attention
# (a warm compile cache from the first; stage 2's 32,640 tokens are where the kernel gains):
#   bash bench/run_on_device.sh batch --family 2.3 --clips 2 \
#       --sequence hd_two_stage_fp8mm_warmup,hd_two_stage_fp8mm,hd_two_stage_fp8attn
HD_FP8_ATTENTION = {"hd_two_stage_fp8attn"}
VERSUS["hd_two_stage_fp8attn"] = "hd_two_stage_fp8mm"
# Issue 28 item 1: stage overlap on one lane. The same --clips clips in waves of OVERLAP_GROUP (group_size),
# one after the other and then with each wave's diffusion beside the previous wave's decoders; the clips
# must be identical (PSNR inf), the batch's wall time is what overlap changes. One call each, after a warm-up
# that fills the compile cache (--clips 8 at --small; --clips 4 at --hd with --family 2.3):
#   bash bench/run_on_device.sh batch --clips 8 --sequence batch_fp8mm_warmup,batch_fp8mm_waves,batch_fp8mm_overlap
#   bash bench/run_on_device.sh batch --family 2.3 --clips 4 \
#       --sequence hd_two_stage_fp8mm_warmup,hd_two_stage_waves,hd_two_stage_overlap
OVERLAP_GROUP = "2"
HD_RUNS.update({"hd_two_stage_waves": ("two-stage", None, True), "hd_two_stage_overlap": ("two-stage", None, True)})
for waves, overlapped in (("batch_fp8mm_waves", "batch_fp8mm_overlap"), ("hd_two_stage_waves", "hd_two_stage_overlap")):
    RUN_ENV[waves] = {"LTX2_GROUP_SIZE": OVERLAP_GROUP, "LTX2_OVERLAP_STAGES": "off"}
    RUN_ENV[overlapped] = {"LTX2_GROUP_SIZE": OVERLAP_GROUP, "LTX2_OVERLAP_STAGES": "on"}
    SAME_AS[overlapped] = waves
# Issue 28's target at its size: the overlapped 4-clip batch again with FP8 self-attention, after it in one call (the
# steady clip of a long batch is its diffusion, the decode hidden; FP8 attention shortens stage 2's steps):
#   bash bench/run_on_device.sh batch --family 2.3 --clips 4 \
#       --sequence hd_two_stage_fp8mm_warmup,hd_two_stage_overlap,hd_two_stage_overlap_fp8attn
HD_RUNS["hd_two_stage_overlap_fp8attn"] = ("two-stage", None, True)
HD_FP8_ATTENTION.add("hd_two_stage_overlap_fp8attn")
RUN_ENV["hd_two_stage_overlap_fp8attn"] = RUN_ENV["hd_two_stage_overlap"]
VERSUS["hd_two_stage_overlap_fp8attn"] = "hd_two_stage_overlap"
# Issue 28's steady clip (session 18): waves of 3 clips (--clips 6: two waves), overlapped, with bf16 and FP8
# self-attention, so clips 2-3 of each wave give the warm spacing of the diffusion stage with the decoders of the
# wave before beside it; then the same with every lever on (FP8 attention, the compiled decoder, and Dynamo's
# packages: wave 2's workers load what wave 1's compiled):
#   bash bench/run_on_device.sh batch --family 2.3 --clips 6 \
#       --sequence hd_two_stage_fp8mm_warmup,hd_two_stage_overlap3,hd_two_stage_overlap3_fp8attn
#   bash bench/run_on_device.sh batch --family 2.3 --clips 6 --sequence hd_two_stage_overlap3_all
OVERLAP3 = {"LTX2_GROUP_SIZE": "3", "LTX2_OVERLAP_STAGES": "on"}
for name in ("hd_two_stage_overlap3", "hd_two_stage_overlap3_fp8attn", "hd_two_stage_overlap3_all"):
    HD_RUNS[name] = ("two-stage", None, True)
    RUN_ENV[name] = dict(OVERLAP3)
HD_FP8_ATTENTION.update({"hd_two_stage_overlap3_fp8attn", "hd_two_stage_overlap3_all"})
RUN_ENV["hd_two_stage_overlap3_all"]["LTX2_COMPILE_PACKAGES"] = "1"
VERSUS["hd_two_stage_overlap3_fp8attn"] = "hd_two_stage_overlap3"
VERSUS["hd_two_stage_overlap3_all"] = "hd_two_stage_overlap3"
# Issue 28's LTX-2.0 target (768x512x121 <= 2.3 s per warm clip on an H100): 8 clips in waves of 4, overlapped,
# after the 2-clip warm-up that fills the compile cache:
#   bash bench/run_on_device.sh batch --clips 8 --sequence batch_fp8mm_warmup,batch_fp8mm_overlap4
RUN_ENV["batch_fp8mm_overlap4"] = {"LTX2_GROUP_SIZE": "4", "LTX2_OVERLAP_STAGES": "on"}
# Where a warm 1080p step's time goes (session 18: 2.30 s per stage-2 step, ~1.7 s of it matmuls and attention at
# their kernels' rates): 2 clips with FP8 attention, step 1 of each pass profiled kernel by kernel (the reports land
# in results.json "step_profiles"; clip 2's are the warm ones; the profiled steps themselves run slower):
#   bash bench/run_on_device.sh batch --family 2.3 --sequence hd_two_stage_fp8mm_warmup,hd_two_stage_profile
HD_RUNS["hd_two_stage_profile"] = ("two-stage", 2, True)  # two clips whatever --clips says
HD_FP8_ATTENTION.add("hd_two_stage_profile")
RUN_ENV["hd_two_stage_profile"] = {"LTX2_PROFILE_STEP": "1"}
# Issue 28, the feed-forward's one-pass GELU (services/fp8_rows.py, `[worker] fp8_gelu_kernel`) against the same
# clips with Inductor's fusion, in one call; each run sets the setting, whatever its default. At --hd one wave of 3
# (--clips 3) each, so both fit a call with their cold compiles; on an H200 the one-stage 1080p x 161 step as well:
#   bash bench/run_on_device.sh batch --family 2.3 --clips 3 \
#       --sequence hd_two_stage_overlap3_inductorgelu,hd_two_stage_overlap3_gelukernel
#   bash bench/run_on_device.sh batch --sequence large_fp8mm_fp8attn_inductorgelu,large_fp8mm_fp8attn_gelukernel
# (Version 20 ran hd_two_stage_overlap3_fp8attn and large_fp8mm_fp8attn as the Inductor side, while the kernel was
# opt-in; they take the default now.)
for kernel, inductor in (
    ("hd_two_stage_overlap3_gelukernel", "hd_two_stage_overlap3_inductorgelu"),
    ("large_fp8mm_fp8attn_gelukernel", "large_fp8mm_fp8attn_inductorgelu"),
):
    for name, on in ((kernel, "true"), (inductor, "false")):
        if kernel.startswith("hd_"):
            HD_RUNS[name] = ("two-stage", None, True)
            HD_FP8_ATTENTION.add(name)
            RUN_ENV[name] = {**OVERLAP3, "LTX2_FP8_GELU_KERNEL": on}
        else:
            LARGE_RUNS[name] = LARGE_RUNS["large_fp8mm_fp8attn"]
            RUN_ENV[name] = {"LTX2_FP8_GELU_KERNEL": on}
    VERSUS[kernel] = inductor
# Issue 28, the self-attention's query/key norms and rotary embedding in one pass per token (services/qk_norm_rope.py,
# `[worker] qk_norm_rope_kernel`) against the same clips with Inductor's kernels, after the runs they are compared
# with (hd_two_stage_overlap3_fp8attn, large_fp8mm_fp8attn; each pair sets the setting, whatever its default):
#   bash bench/run_on_device.sh batch --family 2.3 --clips 3 \
#       --sequence hd_two_stage_fp8mm_warmup,hd_two_stage_overlap3_fp8attn,hd_two_stage_overlap3_qknormrope
#   bash bench/run_on_device.sh batch --sequence large_fp8mm_fp8attn,large_fp8mm_fp8attn_qknormrope
HD_RUNS["hd_two_stage_overlap3_qknormrope"] = ("two-stage", None, True)
HD_FP8_ATTENTION.add("hd_two_stage_overlap3_qknormrope")
RUN_ENV["hd_two_stage_overlap3_qknormrope"] = {**OVERLAP3, "LTX2_QK_NORM_ROPE_KERNEL": "true"}
RUN_ENV["hd_two_stage_overlap3_fp8attn"]["LTX2_QK_NORM_ROPE_KERNEL"] = "false"
VERSUS["hd_two_stage_overlap3_qknormrope"] = "hd_two_stage_overlap3_fp8attn"
LARGE_RUNS["large_fp8mm_fp8attn_qknormrope"] = LARGE_RUNS["large_fp8mm_fp8attn"]
RUN_ENV["large_fp8mm_fp8attn_qknormrope"] = {"LTX2_QK_NORM_ROPE_KERNEL": "true"}
RUN_ENV["large_fp8mm_fp8attn"] = {"LTX2_QK_NORM_ROPE_KERNEL": "false"}
VERSUS["large_fp8mm_fp8attn_qknormrope"] = "large_fp8mm_fp8attn"
# The repeat of issue 28's steady-clip run (below) takes that run's settings, whatever the defaults become.
RUN_ENV["hd_two_stage_overlap3_fp8attn_again"] = dict(RUN_ENV["hd_two_stage_overlap3_fp8attn"])
# Issue 28's last target: run-to-run identical outputs with every lever of its steady clip on (FP8 attention, the
# one-pass GELU, overlap, deterministic mode): the same 6 clips again on the warm machine, a later call of the same
# --work folder; MP4, WAV and latents compared byte for byte with the first run's (results.json "issue23"):
#   bash bench/run_on_device.sh batch --family 2.3 --clips 6 \
#       --sequence hd_two_stage_fp8mm_warmup,hd_two_stage_overlap3_fp8attn   (call 1)
#   bash bench/run_on_device.sh batch --family 2.3 --clips 6 --sequence hd_two_stage_overlap3_fp8attn_again   (call 2)
HD_RUNS["hd_two_stage_overlap3_fp8attn_again"] = ("two-stage", None, True)
HD_FP8_ATTENTION.add("hd_two_stage_overlap3_fp8attn_again")
REPEAT_RUNS["hd_two_stage_overlap3_fp8attn"] = ("hd_two_stage_overlap3_fp8attn_again", "")
SAME_AS["hd_two_stage_overlap3_fp8attn_again"] = "hd_two_stage_overlap3_fp8attn"
# Issue 28, Inductor's row reductions in registers up to 4,096 values (services/whole_row_reductions.py, `[worker]
# whole_row_reductions`) against the same clips with its default (looped above 1,024), after the runs they are
# compared with; each pair sets the setting, whatever its default. The whole-row kernels compile into a cache folder
# of their own, so a run's first clips compile cold: compare warm clips and steady steps:
#   bash bench/run_on_device.sh batch --family 2.3 --clips 3 \
#       --sequence hd_two_stage_fp8mm_warmup,hd_two_stage_overlap3_fp8attn,hd_two_stage_overlap3_wholerows
#   bash bench/run_on_device.sh batch --sequence large_fp8mm_fp8attn,large_fp8mm_fp8attn_wholerows
HD_RUNS["hd_two_stage_overlap3_wholerows"] = ("two-stage", None, True)
HD_FP8_ATTENTION.add("hd_two_stage_overlap3_wholerows")
RUN_ENV["hd_two_stage_overlap3_wholerows"] = {
    **RUN_ENV["hd_two_stage_overlap3_fp8attn"],
    "LTX2_WHOLE_ROW_REDUCTIONS": "true",
}
RUN_ENV["hd_two_stage_overlap3_fp8attn"]["LTX2_WHOLE_ROW_REDUCTIONS"] = "false"
RUN_ENV["hd_two_stage_overlap3_fp8attn_again"]["LTX2_WHOLE_ROW_REDUCTIONS"] = "false"  # the repeat keeps its pair's
VERSUS["hd_two_stage_overlap3_wholerows"] = "hd_two_stage_overlap3_fp8attn"
LARGE_RUNS["large_fp8mm_fp8attn_wholerows"] = LARGE_RUNS["large_fp8mm_fp8attn"]
RUN_ENV["large_fp8mm_fp8attn_wholerows"] = {**RUN_ENV["large_fp8mm_fp8attn"], "LTX2_WHOLE_ROW_REDUCTIONS": "true"}
RUN_ENV["large_fp8mm_fp8attn"]["LTX2_WHOLE_ROW_REDUCTIONS"] = "false"
VERSUS["large_fp8mm_fp8attn_wholerows"] = "large_fp8mm_fp8attn"
# The query/key kernel (on by default since benchmarks version 21) with whole-row reductions as well, against the
# kernel alone (each run sets both settings, whatever their defaults):
#   bash bench/run_on_device.sh batch --sequence large_fp8mm_fp8attn_qknormrope,large_fp8mm_fp8attn_qk_wholerows
#   bash bench/run_on_device.sh batch --family 2.3 --clips 3 \
#       --sequence hd_two_stage_fp8mm_warmup,hd_two_stage_overlap3_qknormrope,hd_two_stage_overlap3_qk_wholerows
for alone, both in (
    ("large_fp8mm_fp8attn_qknormrope", "large_fp8mm_fp8attn_qk_wholerows"),
    ("hd_two_stage_overlap3_qknormrope", "hd_two_stage_overlap3_qk_wholerows"),
):
    if both.startswith("hd_"):
        HD_RUNS[both] = HD_RUNS[alone]
        HD_FP8_ATTENTION.add(both)
    else:
        LARGE_RUNS[both] = LARGE_RUNS[alone]
    RUN_ENV[alone]["LTX2_WHOLE_ROW_REDUCTIONS"] = "false"
    RUN_ENV[both] = {**RUN_ENV[alone], "LTX2_WHOLE_ROW_REDUCTIONS": "true"}
    VERSUS[both] = alone
# Issue 28 item 1, "optionally with CUDA MPS when present; measure with and without": the overlapped runs again
# under an MPS control daemon this bench starts for the run (mps_daemon; `[worker] cuda_mps` names its pipe
# directory, so decoders beside a diffusion join it at the below-normal client priority), after the same runs
# without it in the same call; the same request, so the same bits (SAME_AS):
#   bash bench/run_on_device.sh batch --family 2.3 --clips 6 \
#       --sequence hd_two_stage_fp8mm_warmup,hd_two_stage_overlap3_fp8attn,hd_two_stage_overlap3_mps
#   bash bench/run_on_device.sh batch --clips 8 \
#       --sequence batch_fp8mm_warmup,batch_fp8mm_overlap4,batch_fp8mm_overlap4_mps
MPS_RUNS = {
    "hd_two_stage_overlap3_mps": "hd_two_stage_overlap3_fp8attn",
    "batch_fp8mm_overlap4_mps": "batch_fp8mm_overlap4",
}
HD_RUNS["hd_two_stage_overlap3_mps"] = ("two-stage", None, True)
HD_FP8_ATTENTION.add("hd_two_stage_overlap3_mps")
for mps_run, without in MPS_RUNS.items():
    RUN_ENV[mps_run] = dict(RUN_ENV[without])
    SAME_AS[mps_run] = without
# Issue 27: directing the clip on LTX-2.3 two-stage at --hd, against the plain two-stage batch of the same call
# (hd_two_stage_fp8mm, which must run first in the call or an earlier one on the machine): every clip with
# three keyframes (images at the first frame, the middle latent start and the last one), and every clip of
# hd_two_stage_fp8mm extended by --hd's frame count (121: the joined MP4 has 121 + 121 - 25 frames, the default
# overlap). Warm seconds per clip and the diffusion stage's peak (it VAE-encodes the conditions):
#   bash bench/run_on_device.sh batch --family 2.3 --clips 2 \
#       --sequence hd_two_stage_fp8mm_warmup,hd_two_stage_fp8mm,hd_two_stage_keyframes,hd_two_stage_extend
HD_RUNS.update({"hd_two_stage_keyframes": ("two-stage", None, True), "hd_two_stage_extend": ("two-stage", None, True)})
# The issue's memory bar: two-stage with keyframes within the diffusion stage's 48 GiB in bf16 (one clip, eager bf16,
# beside hd_two_stage_bf16's plain clip; version 16 saw keyframes add 4.6 GiB with FP8 matmuls):
#   bash bench/run_on_device.sh batch --family 2.3 --sequence hd_two_stage_bf16,hd_two_stage_keyframes_bf16
HD_RUNS["hd_two_stage_keyframes_bf16"] = ("two-stage", 1, False)
# Issue 30 (needs two GPUs: `nvidia-h200-x2`): one clip on one GPU against the same clip over a lane of both
# (context parallel: Ulysses for these distilled clips, the video decode's pieces shared), in one call:
#   bash bench/run_on_device.sh batch --clips 2 --sequence large_fp8mm,large_fp8mm_cp2
#   bash bench/run_on_device.sh batch --family 2.3 --clips 2 \
#       --sequence hd_two_stage_fp8mm_warmup,hd_two_stage_fp8mm,hd_two_stage_cp2
LARGE_RUNS["large_fp8mm_cp2"] = ["--fp8-matmul", "--compile", "--context-parallel", "2"]
HD_RUNS["hd_two_stage_cp2"] = ("two-stage", None, True)
for name in ("large_fp8mm_cp2", "hd_two_stage_cp2"):
    RUN_ENV[name] = {"LTX2_DEVICES": "cuda:0+1"}
VERSUS.update({"large_fp8mm_cp2": "large_fp8mm", "hd_two_stage_cp2": "hd_two_stage_fp8mm"})
# Files a job reads must lie inside paths.input_roots (~ and /tmp by default), so not in the work folder.
DIRECTING_INPUTS = Path("/tmp/ltx2-bench-inputs")


def keyframe_keys(size: tuple[int, int, int], clips: int) -> list[list[str]]:
    """Three keyframe PNGs at `size` (smooth colour fields, different per keyframe) and each clip's
    `conditions` line holding them at frame 0, the middle latent start and the last (-1)."""
    import numpy as np
    from PIL import Image

    width, height, frames = size
    DIRECTING_INPUTS.mkdir(parents=True, exist_ok=True)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    paths = []
    for index in range(3):
        phase = 2.0 * index
        rgb = [np.sin(x / (97 + 13 * c) + y / (71 + 7 * c) + phase + c) for c in range(3)]
        image = ((np.stack(rgb, axis=-1) + 1.0) * 127.5).astype(np.uint8)
        path = DIRECTING_INPUTS / f"keyframe{index}.png"
        Image.fromarray(image).save(path)
        paths.append(path)
    middle = (frames - 1) // 2 // 8 * 8 + 1  # a latent frame's start (LTX-2's temporal compression: 8)
    line = f'conditions = ["{paths[0]}@0", "{paths[1]}@{middle}", "{paths[2]}@-1"]'
    return [[line] for _ in range(clips)]


def extension_keys(work: Path, clips: int) -> list[list[str]]:
    """Each clip's `extend` line: the MP4 of the same clip of hd_two_stage_fp8mm (this call's or an earlier
    call's on the machine, from the work folder's results.json), copied under DIRECTING_INPUTS."""
    results = json.loads((work / "results.json").read_text()) if (work / "results.json").is_file() else {}
    jobs = results.get("runs", {}).get("hd_two_stage_fp8mm", {}).get("jobs", {})
    DIRECTING_INPUTS.mkdir(parents=True, exist_ok=True)
    keys = []
    for index in range(clips):
        output = jobs.get(f"clip{index + 1}", {}).get("output")
        if not output:
            raise SystemExit("hd_two_stage_extend needs hd_two_stage_fp8mm's clips: run it first in the sequence")
        source = DIRECTING_INPUTS / f"source{index + 1}.mp4"
        shutil.copyfile(output, source)
        keys.append([f'extend = "{source}"'])
    return keys


# Version 10 (planned; numbers go to docs/benchmarks.md only after the run). Estimate for one H200, from
# version 9's LTX-2.0 figures (the 2.3 transformer has 18.99 B parameters against 2.0's 18.88 B, plus
# gated attention; 2.3's connectors grow to 3.17 B but run once per clip): build ~100-120 s (~70 GB);
# one-stage 1080p x 121 ~2.9-3.2 s/step x 8 steps = ~25 s of diffusion per clip, plus decodes; two-stage
# 8 steps at 960x544 (a quarter of the tokens, ~0.6 s/step) + upsampler + 3 steps at full size = ~12-14 s.
# Cold compile, loads and the build do not fit one 600 s call with both 4-clip batches, so two calls on
# one warm machine (the second reuses the folder, BUILD_OK records the family, and the compile cache,
# kept when the work folder holds an earlier call's results.json):
#   call 1 (~110 s build + 2 x ~100 s cold warm-ups + ~80 s bf16 peaks, ~420 s):
#     bash bench/run_on_device.sh batch --family 2.3 \
#         --sequence hd_two_stage_fp8mm_warmup,hd_fp8mm_warmup,hd_two_stage_bf16
#   call 2 (~45 s loads + 4 x ~20 s two-stage, ~45 s + 4 x ~32 s one-stage, ~300 s):
#     bash bench/run_on_device.sh batch --family 2.3 --sequence hd_two_stage_fp8mm,hd_fp8mm
# If the machine was given back in between, call 2 rebuilds (~110 s) and compiles cold (the first clip
# of each batch absorbs it; warm per clip counts only clips 2..4), still ~500 s; then run hd_bf16 /
# hd_two_stage_bf16 in a third call. results.json "issue14" holds the targets' verdicts (add_issue14).
HD_TARGETS = {"two_stage_warm_per_clip_s": 15.0, "stretch_s": 10.0, "diffusion_speedup": 2.5, "stage_peak_gib": 48.0}


def attempt_record(attempt: AttemptTiming) -> dict[str, Any]:
    """One attempt as the results keep it (times as UNIX seconds)."""
    keys = ("result", "seconds", "peak_gpu_bytes", "peak_rss_bytes", "group", "lane", "reason", "plan")
    keys += ("started", "ended")
    return {key: getattr(attempt, key) for key in keys}


def process_count(job_dirs: list[Path], stage: str) -> int:
    """Worker processes a stage took: members of a group share the group's log through hard
    links, so there is one log file (inode) per process."""
    inodes = set()
    for job_dir in job_dirs:
        for path in (job_dir / "logs").glob(f"{stage}-*.log"):
            inodes.add((path.stat().st_dev, path.stat().st_ino))
    return len(inodes)


# Two-stage clips: stage 2 refines with this many steps (services/two_stage.py).
STAGE2_STEPS = 3


def denoise_rate(rows: list[tuple[float, str, int]]) -> dict[str, float | None]:
    """A clip's first denoising step and its steady s/step (steps 1..STEPS) from progress events;
    for a two-stage clip these are stage 1's ("denoise stage 1"), plus stage 2's steady s/step and
    the seconds from stage 1's last step to stage 2's first (the latent upsampler and re-noising)."""
    t0, t1, tn = (first_mark(rows, "denoise", step) for step in (0, 1, STEPS))
    rate = {
        "first_step_s": None if t0 is None or t1 is None else t1 - t0,
        "s_per_step_steady": None if t1 is None or tn is None else (tn - t1) / (STEPS - 1),
    }
    u1, un = (first_mark(rows, "denoise stage 2", step) for step in (1, STAGE2_STEPS))
    if u1 is not None:
        u0 = first_mark(rows, "denoise stage 2", 0)
        rate["stage2_s_per_step_steady"] = None if un is None else (un - u1) / (STAGE2_STEPS - 1)
        rate["stage1_to_stage2_s"] = None if tn is None or u0 is None else u0 - tn
    return rate


def load_counts(events_by_job: list[list[dict[str, Any]]], stage: str) -> dict[str, int]:
    """How often each model was loaded for a stage (a group worker reports a load once)."""
    counts: dict[str, int] = {}
    for events in events_by_job:
        for _, phase, _ in progress_rows(events, stage):
            if phase.startswith("load "):
                counts[phase] = counts.get(phase, 0) + 1
    return counts


def lead_in(rows: list[tuple[float, str, int]], started: float | None) -> list[list[Any]]:
    """What a stage process did up to its first unit of work (a denoising step, a decoded piece):
    [seconds since the attempt started, phase, step] per progress event, up to the first one with
    a step. Where a lane's fixed cost per process goes (loads, placement, compile, first step)."""
    if started is None:
        return []
    marks: list[list[Any]] = []
    for t, phase, step in rows:
        marks.append([round(t - started, 2), phase, step])
        if step >= 1:
            break
    return marks


def phase_spans(rows: list[tuple[float, str, int]], started: float | None) -> list[list[Any]]:
    """Each run of one phase of a job's stage: [seconds since the attempt started, phase, seconds until the
    next phase began]; the last run's span ends at its last report. Where the time outside the steps goes
    (issue 27: an extension's 11 s between its two stages), for every job, not only a group's first."""
    if started is None or not rows:
        return []
    spans: list[list[Any]] = []
    for t, phase, _ in rows:
        if not spans or spans[-1][1] != phase:
            spans.append([round(t - started, 2), phase, 0.0])
        spans[-1][2] = round(t - started - spans[-1][0], 2)
    for this, following in zip(spans, spans[1:], strict=False):
        this[2] = round(following[0] - this[0], 2)
    return spans


def summarize(state: Path) -> dict[str, Any]:
    """Per job: status, output, stage end times and attempts; per stage: processes and each job's
    start, end and seconds. All of it from the jobs' events.log and job.json."""
    job_dirs = sorted((state / "jobs").glob("*")) if (state / "jobs").is_dir() else []
    timings: list[JobTiming] = sorted((read_job(d) for d in job_dirs), key=lambda job: (job.name or "", job.job_id))
    out: dict[str, Any] = {"jobs": {}, "stages": {}}
    for job in timings:
        out["jobs"][job.name] = {
            "status": job.status,
            "output": job.output,
            "finished_at": finish_times(job),
            "stages": {name: [attempt_record(a) for a in stage.attempts] for name, stage in job.stages.items()},
        }
    events = {job.job_id: read_events(state / "jobs" / job.job_id) for job in timings}
    for stage in STAGES:
        per_job = [
            {"job": job.name, "start": t.started, "end": t.ended, "seconds": t.seconds}
            | (denoise_rate(progress_rows(events[job.job_id], stage)) if stage == "encode_diffuse" else {})
            | {"phases": phase_spans(progress_rows(events[job.job_id], stage), t.started)}
            for job in timings
            if (t := job.stages.get(stage)) is not None and t.attempts
        ]
        firsts = {
            job.name: lead_in(progress_rows(events[job.job_id], stage), t.started)
            for job in timings
            if (t := job.stages.get(stage)) is not None
            and t.last is not None
            and (t.last.group or [job.job_id])[0] == job.job_id
        }
        out["stages"][stage] = {
            "processes": process_count(job_dirs, stage),
            "lead_in": firsts,
            "loads": load_counts(list(events.values()), stage),
            "per_job": per_job,
        }
    return out


def add_mfu(run: dict[str, Any], environment: dict[str, Any], family: str = "2.0") -> None:
    """MFU of the clips' mean steady s/step against the GPU's datasheet bf16 peak (one-stage runs:
    a two-stage clip's steps are at two sizes)."""
    peak = peak_flops(environment.get("versions", {}).get("gpu", ""))
    rates = [j["s_per_step_steady"] for j in run["stages"]["encode_diffuse"]["per_job"] if j.get("s_per_step_steady")]
    if rates and peak and run.get("pipeline") != "two-stage":
        config = scaled_configs("full", family=family)["transformer"]
        flops = transformer_flops(config, *parse_size(run["size"]), MAX_SEQUENCE_LENGTH)["flops"]
        run["mfu_steady"] = flops / (sum(rates) / len(rates)) / peak


def stage_gaps(jobs: dict[str, Any]) -> dict[str, float]:
    """Per stage, the wall time each clip after the first adds: (last end - first end) / (clips - 1).

    A group worker may overlap clips (the video stage encodes clip N while it decodes clip N+1),
    so summing each clip's attempt seconds would count the overlap twice; the spacing of the
    clips' ends is what a longer batch pays per clip.
    """
    gaps: dict[str, float] = {}
    for stage in STAGES:
        ends = sorted(job["finished_at"][stage] for job in jobs.values() if stage in job.get("finished_at", {}))
        if len(ends) > 1:
            gaps[stage] = (ends[-1] - ends[0]) / (len(ends) - 1)
    return gaps


def lane_stage_gaps(jobs: dict[str, Any]) -> dict[str, float]:
    """Per stage, what each further clip costs the batch with its lanes working side by side: the
    spacing of stage ends within each lane's diffusion group ((last - first) / (clips - 1)), the
    lanes' rates added up. stage_gaps mixes the lanes' ends, which interleave at random; a lane's
    own spacing is what a longer batch pays there. One lane with two groups: their mean."""
    gaps: dict[str, float] = {}
    for stage in STAGES:
        spacing: dict[int, list[float]] = {}
        groups: dict[tuple[str, ...], list[float]] = {}
        lanes: dict[tuple[str, ...], int] = {}
        for name, job in jobs.items():
            diffusion = job["stages"].get("encode_diffuse") or [{}]
            key = tuple(diffusion[-1].get("group") or [name])
            if stage in job.get("finished_at", {}):
                groups.setdefault(key, []).append(job["finished_at"][stage])
                lanes[key] = diffusion[-1].get("lane", 0)
        for key, ends in groups.items():
            if len(ends) > 1:
                spacing.setdefault(lanes[key], []).append((max(ends) - min(ends)) / (len(ends) - 1))
        if spacing:
            gaps[stage] = 1 / sum(1 / (sum(per) / len(per)) for per in spacing.values() if sum(per) > 0)
    return gaps


def run_cli(name: str, command: list[str], env: dict[str, str], timeout_s: float, log_path: Path) -> dict[str, Any]:
    log(f"{name}: {' '.join(command[3:6])} ... (timeout {timeout_s:.0f} s)")
    started = time.time()
    with log_path.open("a") as handle:
        handle.write(f"\n===== {name}\n")
        handle.flush()
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=handle, text=True)
        try:
            stdout, _ = process.communicate(timeout=timeout_s)
            timed_out = False
        except subprocess.TimeoutExpired:
            process.kill()
            kill_pids(worker_pids(Path(env["LTX2_STATE_DIR"])))
            stdout, _ = process.communicate()
            timed_out = True
    ended = time.time()
    log(f"{name}: rc {process.returncode} in {ended - started:.1f} s")
    if process.returncode != 0:
        sys.stdout.write(log_path.read_text(errors="replace")[-4000:] + "\n")
    return {"returncode": process.returncode, "timed_out": timed_out, "t0": started, "t1": ended, "stdout": stdout}


@contextlib.contextmanager
def ray_head(name: str, env: dict[str, str], log_path: Path) -> Iterator[None]:
    """For a farm run (`*_ray`): a Ray head on this host with every visible GPU, started with the
    run's environment (a farm's stages get their node's environment, not the batch's), stopped after."""
    if not name.endswith("_ray"):
        yield
        return
    ray_cli = [sys.executable, "-m", "ray.scripts.scripts"]
    gpus = str(len(visible_cuda_devices(env)))
    start = [*ray_cli, "start", "--head", "--num-gpus", gpus, "--include-dashboard=false", "--disable-usage-stats"]
    with log_path.open("a") as handle:
        subprocess.run(start, env=env, stdout=handle, stderr=handle, timeout=RAY_START_TIMEOUT_S, check=True)
        try:
            yield
        finally:
            subprocess.run([*ray_cli, "stop", "--force"], env=env, stdout=handle, stderr=handle, check=False)


@contextlib.contextmanager
def mps_daemon(name: str, env: dict[str, str], work: Path, log_path: Path) -> Iterator[dict[str, Any]]:
    """For an MPS run (MPS_RUNS): an MPS control daemon of its own (pipe and log folders under `work`), named to
    the run's workers through LTX2_CUDA_MPS in `env`; yields what it recorded (pid, the servers it ran, the tails
    of its logs, which name the clients it served), with "error" where it could not start (the run is then
    skipped), and quits it after the run, killing it if it does not go. The daemon gets none of the run's LTX2_*
    variables (a timed-out run's clean-up kills every process carrying its state folder) and sees every GPU (a
    daemon started with CUDA_VISIBLE_DEVICES renumbers its clients' devices)."""
    if name not in MPS_RUNS:
        yield {}
        return
    pipe, logs = work / "mps-pipe", work / "mps-log"
    for folder in (pipe, logs):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    kept = {key: value for key, value in env.items() if not key.startswith("LTX2_") and key != "CUDA_VISIBLE_DEVICES"}
    daemon_env = {**kept, "CUDA_MPS_PIPE_DIRECTORY": str(pipe), "CUDA_MPS_LOG_DIRECTORY": str(logs)}
    record: dict[str, Any] = {"pipe_directory": str(pipe)}

    def control(command: str) -> str:
        try:
            answer = subprocess.run(
                [MPS_CONTROL],
                input=f"{command}\n",
                env=daemon_env,
                capture_output=True,
                text=True,
                timeout=10,
                check=False,
            )
        except (OSError, subprocess.SubprocessError) as error:
            return f"{type(error).__name__}: {error}"
        return (answer.stdout + answer.stderr).strip()

    try:
        with log_path.open("a") as handle:
            subprocess.run([MPS_CONTROL, "-d"], env=daemon_env, stdout=handle, stderr=handle, timeout=30, check=True)
        deadline = time.time() + MPS_START_S
        while (pid := control_daemon_pid(pipe)) is None and time.time() < deadline:
            time.sleep(0.1)
        if pid is None:
            record["error"] = f"the MPS control daemon wrote no live pid to {pipe} in {MPS_START_S} s (see {log_path})"
    except (OSError, subprocess.SubprocessError) as error:
        record["error"] = f"{MPS_CONTROL} -d failed: {type(error).__name__}: {error}"
        pid = None
    if pid is not None:
        record["control_pid"] = pid
        env["LTX2_CUDA_MPS"] = str(pipe)
    try:
        yield record
    finally:
        if pid is not None:
            record["server_list"] = control("get_server_list")
            record["quit"] = control("quit")
            deadline = time.time() + 15
            while control_daemon_pid(pipe) is not None and time.time() < deadline:
                time.sleep(0.2)
            if control_daemon_pid(pipe) is not None:
                record["killed"] = True
                kill_pids({pid: "nvidia-cuda-mps-control"})
        for log_name in ("control.log", "server.log"):
            path = logs / log_name
            record[log_name] = path.read_text(errors="replace").splitlines()[-60:] if path.is_file() else None


def psnr(first: Path, second: Path) -> float | None:
    """PSNR (dB) between two MP4s' decoded frames (8-bit RGB), over the whole clip; frame by frame,
    as whole clips in float64 took seconds and gigabytes each (a 16-clip comparison outlived a call)."""
    import av
    import numpy as np

    squared, values = 0.0, 0
    with av.open(str(first)) as a, av.open(str(second)) as b:
        # Frame threads: x264's one-slice streams give slice threads nothing to share, and 12 pairs of
        # 1080p noise clips took 245 s of a device call decoded that way (session 18).
        a.streams.video[0].thread_type = b.streams.video[0].thread_type = "AUTO"
        for frame_a, frame_b in itertools.zip_longest(a.decode(video=0), b.decode(video=0)):
            if frame_a is None or frame_b is None:
                return None
            x, y = frame_a.to_ndarray(format="rgb24"), frame_b.to_ndarray(format="rgb24")
            if x.shape != y.shape:
                return None
            difference = x.astype(np.int32) - y.astype(np.int32)
            squared += float(np.square(difference, dtype=np.int64).sum())
            values += difference.size
    mse = squared / values if values else 0.0
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def build_parser() -> argparse.ArgumentParser:
    """The command line (see the top of this file)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT", "/tmp/bench-out"))
    # Job folders, MP4s and the compile cache live in RAM: the model folder fills the lent machine's disk.
    shm = Path("/dev/shm")
    parser.add_argument("--work", default=str(shm / "ltx2-bench-work") if shm.is_dir() else "/tmp/bench-work")
    parser.add_argument("--root", default="auto")
    parser.add_argument("--scale", choices=["full", "smoke", "tiny"], default="full")
    parser.add_argument("--small", default="768x512x121")
    parser.add_argument("--large", default="1920x1088x161")
    parser.add_argument("--clips", type=int, default=4)
    parser.add_argument("--family", choices=FAMILIES, default="2.0", help="LTX-2 family of the built folder")
    parser.add_argument("--hd", default="1920x1088x121", help="clip size of the hd_* runs (issue 14)")
    parser.add_argument("--sequence", default="batch,batch_compile,batch_compile_warm,large_compile")
    parser.add_argument("--budget-s", type=float, default=560.0)
    parser.add_argument("--host-ram-gib", type=float, default=0.0)
    return parser


def ensure_model(args: argparse.Namespace, root: Path, work: Path, deadline: float, child_log: Path) -> dict[str, Any]:
    """Build the model folder in a `gpu_bench.py build` child unless one of the same scale is there."""
    marker = root / "BUILD_OK"
    if marker.is_file():
        built = json.loads(marker.read_text())
        if built.get("scale") == args.scale and built.get("family", "2.0") == args.family:
            return {"reused": True}
    build = [sys.executable, str(ENTRY), "build", "--root", str(root), "--scale", args.scale, "--family", args.family]
    build += ["--result", str(work / "build.json")]
    build += ["--host-ram-gib", str(args.host_ram_gib)] if args.host_ram_gib else []
    rc, t0, t1, _ = run_child(build, max(deadline - time.time() - 60, 10), child_log)
    return {"returncode": rc, "wall_s": t1 - t0}


def run_environment(name: str, state: Path, outputs: Path, cache: Path) -> dict[str, str]:
    """The CLI's environment for run `name`: its own folders, the shared compile cache, RUN_ENV."""
    return {
        **os.environ,
        "LTX2_STATE_DIR": str(state),
        "LTX2_OUTPUT_DIR": str(outputs),
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
        "LTX2_COMPILE_CACHE_DIR": str(state.parent / f"compile-cache-{name}" if name in OWN_COMPILE_CACHE else cache),
        **RUN_ENV.get(name, {}),
    }


def run_command(name: str, args: argparse.Namespace, root: Path, work: Path) -> tuple[list[str], tuple[int, int, int]]:
    """The CLI command of run `name` and its clip size: a batch of --clips small clips, or one large clip."""
    cli = [sys.executable, "-m", "orchestrator.cli"]
    if name in HD_RUNS:
        pipeline, clips, fast = HD_RUNS[name]
        size = parse_size(args.hd)
        count = clips or args.clips
        keys = {
            "hd_two_stage_keyframes": lambda: keyframe_keys(size, count),
            "hd_two_stage_keyframes_bf16": lambda: keyframe_keys(size, count),
            "hd_two_stage_extend": lambda: extension_keys(work, count),
            "hd_two_stage_cp2": lambda: [["context_parallel = 2"]] * count,
            "hd_two_stage_overlap3_all": lambda: [["compile_decoder = true"]] * count,
        }
        batch = write_batch(
            work / f"{name}.toml", str(root), size, count, fast, fast, pipeline, name in HD_FP8_ATTENTION,
            keys[name]() if name in keys else None,
        )  # fmt: skip
        return [*cli, "batch", str(batch), "--quiet"], size
    if name.startswith("batch"):
        size = parse_size(args.small)
        fp8mm = name.startswith("batch_fp8mm")
        clips = WARMUP_CLIPS if name.endswith("_warmup") else args.clips
        batch = write_batch(work / f"{name}.toml", str(root), size, clips, name != "batch", fp8mm)
        return [*cli, "batch", str(batch), "--quiet"], size
    if name in LARGE_RUNS or name in SMALL_RUNS:
        size = parse_size(args.large if name in LARGE_RUNS else args.small)
        command = [*cli, "generate", "--model", str(root), "--prompt", PROMPT, "--seed", "1", "--name", "clip1"]
        command += ["--width", str(size[0]), "--height", str(size[1]), "--num-frames", str(size[2]), "--quiet"]
        return command + (LARGE_RUNS.get(name) or SMALL_RUNS[name]), size
    raise SystemExit(f"unknown run {name!r}")


def add_clip_numbers(run: dict[str, Any]) -> None:
    """Per clip: wall / clips, and what each clip after the first adds inside the group processes
    (its loads are shared), as attempt seconds and as the spacing of stage ends."""
    clips = len(run["jobs"]) or 1
    run["per_clip_wall_s"] = run["wall_s"] / clips
    later = [
        sum(attempts[-1]["seconds"] or 0 for attempts in job["stages"].values() if attempts)
        for job_name, job in sorted(run["jobs"].items())
        if job_name != "clip1"
    ]
    run["warm_per_clip_s"] = sum(later) / len(later) if later else None
    run["stage_gap_s"] = stage_gaps(run["jobs"])
    run["warm_per_clip_wall_s"] = sum(run["stage_gap_s"].values()) if run["stage_gap_s"] else None
    run["lane_stage_gap_s"] = lane_stage_gaps(run["jobs"])
    run["steady_per_clip_s"] = sum(run["lane_stage_gap_s"].values()) if run["lane_stage_gap_s"] else None


def add_stage_peaks(run: dict[str, Any]) -> None:
    """Per stage, the highest torch peak of any clip's last attempt (GiB), and the diffusion stage's
    warm seconds per clip: the mean of clips 2..N's attempt seconds (the group's loads and compile
    land on clip 1)."""
    peaks: dict[str, float] = {}
    for stage in STAGES:
        attempts = [job["stages"][stage] for job in run["jobs"].values() if job["stages"].get(stage)]
        values = [a[-1].get("peak_gpu_bytes") or 0 for a in attempts]
        if values:
            peaks[stage] = max(values) / GIB
    run["stage_peak_gib"] = peaks
    later = [
        job["stages"]["encode_diffuse"][-1]["seconds"]
        for name, job in sorted(run["jobs"].items())
        if name != "clip1" and job["stages"].get("encode_diffuse") and job["stages"]["encode_diffuse"][-1]["seconds"]
    ]
    run["diffusion_warm_per_clip_s"] = sum(later) / len(later) if later else None


def add_issue14(runs: dict[str, Any]) -> dict[str, Any]:
    """Issue 14's targets from the hd_* runs present (None where a run is missing): two-stage warm per
    clip (wall spacing of the clips' stage ends, so overlapping decodes count once) <= 15 s (stretch
    10 s); the diffusion stage >= 2.5x faster two-stage than one-stage (warm attempt seconds per clip);
    every stage <= 48 GiB in the bf16 runs (and, for information, in the fp8-matmul runs)."""
    two, one = runs.get("hd_two_stage_fp8mm", {}), runs.get("hd_fp8mm", {})
    warm = two.get("warm_per_clip_wall_s")
    diffusion_two, diffusion_one = two.get("diffusion_warm_per_clip_s"), one.get("diffusion_warm_per_clip_s")
    speedup = diffusion_one / diffusion_two if diffusion_one and diffusion_two else None
    peaks = {name: run.get("stage_peak_gib") for name, run in runs.items() if name in HD_RUNS and "jobs" in run}
    bf16 = [v for name, p in peaks.items() if name.endswith("_bf16") for v in (p or {}).values() if v]  # 0: unmeasured
    return {
        "two_stage_warm_per_clip_s": warm,
        "one_stage_warm_per_clip_s": one.get("warm_per_clip_wall_s"),
        "two_stage_ok": None if warm is None else warm <= HD_TARGETS["two_stage_warm_per_clip_s"],
        "two_stage_stretch_ok": None if warm is None else warm <= HD_TARGETS["stretch_s"],
        "diffusion_warm_per_clip_s": {"two-stage": diffusion_two, "one-stage": diffusion_one},
        "diffusion_speedup": speedup,
        "diffusion_speedup_ok": None if speedup is None else speedup >= HD_TARGETS["diffusion_speedup"],
        "stage_peak_gib": peaks,
        "bf16_peaks_ok": (max(bf16) <= HD_TARGETS["stage_peak_gib"]) if bf16 else None,
        "targets": HD_TARGETS,
    }


def add_psnr(results: dict[str, Any]) -> None:
    """Every run's clips against the eager run's clips of the same name (batch, or large_eager)."""
    for name, run in results["runs"].items():
        other_name = SAME_AS.get(name) or VERSUS.get(name)
        if other_name and "jobs" in run and "jobs" in results["runs"].get(other_name, {}):
            other = results["runs"][other_name]["jobs"]
            key = "psnr_vs_same_settings_db" if name in SAME_AS else f"psnr_vs_{other_name}_db"
            run[key] = {
                job: psnr(Path(other[job]["output"]), Path(data["output"]))
                for job, data in run["jobs"].items()
                if data.get("output") and other.get(job, {}).get("output")
            }
            continue
        reference = results["runs"].get("large_eager" if name.startswith("large") else "batch", {})
        if name in ("batch", "large_eager") or "jobs" not in run or "jobs" not in reference:
            continue
        eager = reference["jobs"]
        run["psnr_vs_eager_db"] = {
            job: psnr(Path(eager[job]["output"]), Path(data["output"]))
            for job, data in run["jobs"].items()
            if data.get("output") and eager.get(job, {}).get("output")
        }


def add_repeatability(results: dict[str, Any]) -> dict[str, Any]:
    """Issue 23: per clip, whether the second deterministic run's MP4, WAV and latents equal the first's, PSNR
    of both against it; per run, steady s/step and warm seconds per clip, and "on" over "off" for each."""
    verdicts: dict[str, Any] = {}
    runs = results["runs"]
    for first, (again, off) in REPEAT_RUNS.items():
        if "jobs" not in runs.get(first, {}):
            continue
        verdict: dict[str, Any] = {"clips": {}, "timing": {}}
        for clip, data in runs[first]["jobs"].items():
            row: dict[str, Any] = {}
            for other in (again, off):
                theirs = runs.get(other, {}).get("jobs", {}).get(clip, {})
                if data.get("output") and theirs.get("output"):
                    row[other] = same_outputs(Path(data["output"]), Path(theirs["output"]))
            verdict["clips"][clip] = row
        for name in (first, again, off):
            if "jobs" in runs.get(name, {}):
                verdict["timing"][name] = run_speed(runs[name])
        on, slow = verdict["timing"].get(first, {}), verdict["timing"].get(off, {})
        verdict["on_over_off"] = {
            key: on[key] / slow[key]
            for key in ("s_per_step_steady", "warm_per_clip_wall_s")
            if on.get(key) and slow.get(key)
        }
        verdicts[first] = verdict
    return verdicts


def same_outputs(first: Path, second: Path) -> dict[str, Any]:
    """Two clips of one request: MP4 and WAV bytes equal, latents bit-equal, and the MP4s' PSNR."""
    import torch
    from safetensors.torch import load_file

    dirs = [Path(json.loads(path.with_suffix(".json").read_text())["job_dir"]) for path in (first, second)]
    latents = [load_file(str(folder / "latents.safetensors")) for folder in dirs]
    return {
        "mp4_identical": first.read_bytes() == second.read_bytes(),
        "wav_identical": (dirs[0] / "audio.wav").read_bytes() == (dirs[1] / "audio.wav").read_bytes(),
        "latents_equal": all(torch.equal(latents[0][key], latents[1][key]) for key in latents[0]),
        "latents_max_abs_diff": max(
            float((latents[0][k].float() - latents[1][k].float()).abs().max()) for k in latents[0]
        ),
        "psnr_db": psnr(first, second),
    }


def run_speed(run: dict[str, Any]) -> dict[str, float | None]:
    """A run's mean steady s/step over its warm clips (2..N; clip 1 carries loads and compile) and its warm
    wall seconds per clip (the spacing of the clips' stage ends)."""
    steps = [
        job["s_per_step_steady"]
        for job in run["stages"]["encode_diffuse"]["per_job"]
        if job["job"] != "clip1" and job.get("s_per_step_steady")
    ]
    return {
        "s_per_step_steady": sum(steps) / len(steps) if steps else None,
        "warm_per_clip_wall_s": run.get("warm_per_clip_wall_s"),
        "per_clip_wall_s": run.get("per_clip_wall_s"),
    }


def finish_run(
    run: dict[str, Any], name: str, size: tuple[int, int, int], state: Path, environment: dict[str, Any], family: str
) -> dict[str, Any]:
    """A finished run's record: wall time, size, pipeline, the jobs' timings and the numbers made from them."""
    run["wall_s"] = run["t1"] - run["t0"]
    run["size"] = size_label(size)
    run["pipeline"] = HD_RUNS[name][0] if name in HD_RUNS else "one-stage"
    run.update(summarize(state))
    add_clip_numbers(run)
    add_stage_peaks(run)
    add_mfu(run, environment, family)
    # LTX2_PROFILE_STEP runs: each job's per-kernel reports (services/step_profile.py), by job folder and file.
    profiles = {
        f"{report.parent.parent.name}/{report.name}": report.read_text()
        for report in sorted(state.glob("jobs/*/logs/profile-*.txt"))
    }
    if profiles:
        run["step_profiles"] = profiles
    return run


def measured_run(
    name: str, command: list[str], environment: dict[str, str], left: float, work: Path, child_log: Path
) -> dict[str, Any]:
    """run_cli inside what run `name` needs around it (a Ray head for a farm run, an MPS daemon for an MPS run,
    whose teardown comes out of its time), or {"skipped": why} where that could not start."""
    with ray_head(name, environment, child_log), mps_daemon(name, environment, work, child_log) as mps:
        if "error" in mps:
            return {"skipped": f"CUDA MPS: {mps['error']}", "cuda_mps": mps}
        run = run_cli(name, command, environment, left - (MPS_TEARDOWN_S if mps else 0), child_log)
    if mps:
        run["cuda_mps"] = mps
    return run


def skip_reason(name: str, left: float) -> str | None:
    """Why run `name` does not start, or None: under a minute left of the call, or an MPS run without MPS."""
    if left < 60:
        return f"only {left:.0f} s left"
    if name in MPS_RUNS and shutil.which(MPS_CONTROL) is None:
        return f"{MPS_CONTROL} is not on PATH (no CUDA MPS on this machine)"
    return None


def main(argv: list[str] | None = None) -> int:
    """1 folders and earlier results, 2 model folder, 3 environment, 4 the runs, 5 PSNR, 6 table."""
    args = build_parser().parse_args(argv)
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    deadline = T_PROCESS + args.budget_s
    results: dict[str, Any] = {"args": vars(args), "runs": {}}
    sampler = GpuSampler()
    sampler.start()
    child_log = out / "children.log"

    def save() -> None:
        write_json(out / "results.json", results)
        write_json(work / "results.json", results)

    # 1. A later call on the same warm machine adds its runs to the earlier call's (its MP4s are
    # still in the work folder, so the PSNR pass can pair runs of both calls).
    if (work / "results.json").is_file():
        earlier = json.loads((work / "results.json").read_text())
        results["runs"] = earlier.get("runs", {})
        results["earlier_calls"] = [*earlier.get("earlier_calls", []), earlier.get("args")]
    root = choose_root(args.root, name=f"ltx2-{args.scale}")
    results["build"] = ensure_model(args, root, work, deadline, child_log)  # 2
    if results["build"].get("returncode", 0) != 0:
        save()
        return 1
    results["environment"] = probe_environment()  # 3
    save()
    cache = work / "compile-cache"
    if not results.get("earlier_calls"):
        shutil.rmtree(cache, ignore_errors=True)
    for name in args.sequence.split(","):  # 4
        if (skip := skip_reason(name, deadline - time.time() - 20)) is not None:
            results["runs"][name] = {"skipped": skip}
            continue
        left = deadline - time.time() - 20
        state, outputs = work / f"state-{name}", work / f"outputs-{name}"
        shutil.rmtree(state, ignore_errors=True)
        shutil.rmtree(outputs, ignore_errors=True)
        command, size = run_command(name, args, root, work)
        environment = run_environment(name, state, outputs, cache)
        run = measured_run(name, command, environment, left, work, child_log)
        if "skipped" in run:
            results["runs"][name] = run
            continue
        run["gpu_peak_mib"] = sampler.peak_mib(run["t0"], run["t1"])
        results["runs"][name] = finish_run(run, name, size, state, results["environment"], args.family)
        save()
    sampler.stop()
    add_psnr(results)  # 5
    results["issue14"] = add_issue14(results["runs"])
    results["issue23"] = add_repeatability(results)
    save()
    print_table(results)  # 6
    return 0


def print_table(results: dict[str, Any]) -> None:
    """One line per run: the numbers docs/benchmarks.md quotes."""
    for name, run in results["runs"].items():
        if "skipped" in run:
            sys.stdout.write(f"{name}: skipped ({run['skipped']})\n")
            continue
        peaks = {
            stage: max((a[-1]["peak_gpu_bytes"] or 0) for a in (job["stages"][stage] for job in run["jobs"].values()))
            / GIB
            for stage in STAGES
        }
        seconds = {stage: [fmt(j["seconds"], "", 2) for j in run["stages"][stage]["per_job"]] for stage in STAGES}
        diffusion = run["stages"]["encode_diffuse"]["per_job"]
        long_phases = [span for span in (diffusion[-1]["phases"] if diffusion else []) if span[2] >= 0.5]
        sys.stdout.write(
            f"{name} [{run['size']}, {len(run['jobs'])} clip(s)]: rc {run['returncode']}, wall {run['wall_s']:.1f} s, "
            f"per clip {run['per_clip_wall_s']:.2f} s, warm per clip {fmt(run.get('warm_per_clip_s'), 's', 2)} "
            f"(attempt seconds) / {fmt(run.get('warm_per_clip_wall_s'), 's', 2)} (wall, per stage "
            f"{ {k: round(v, 2) for k, v in run.get('stage_gap_s', {}).items()} }); "
            f"processes per stage {[s['processes'] for s in run['stages'].values()]}, "
            f"loads {[s.get('loads') for s in run['stages'].values()]}; steady s/step "
            f"{[fmt(j.get('s_per_step_steady'), '', 3) for j in run['stages']['encode_diffuse']['per_job']]}, "
            f"stage-2 s/step {[fmt(j.get('stage2_s_per_step_steady'), '', 3) for j in diffusion]}, "
            f"MFU {fmt(run.get('mfu_steady'), '', 3)}, "
            f"diffusion warm per clip {fmt(run.get('diffusion_warm_per_clip_s'), 's', 2)}; "
            f"stage seconds per clip {seconds}; peak GPU nvidia-smi {run['gpu_peak_mib']} MiB, "
            f"torch per stage {', '.join(f'{k} {v:.1f} GiB' for k, v in peaks.items())}; "
            f"clips/hour {3600 * len(run['jobs']) / run['wall_s']:.0f}; steady per clip (lanes side by side) "
            f"{fmt(run.get('steady_per_clip_s'), 's', 3)} "
            f"{ {k: round(v, 3) for k, v in run.get('lane_stage_gap_s', {}).items()} }; "
            f"lead-in per process { {k: s.get('lead_in') for k, s in run['stages'].items()} }; "
            f"last clip's diffusion phases of 0.5 s or more {long_phases}; "
            f"PSNR vs eager {run.get('psnr_vs_eager_db')}, vs same settings {run.get('psnr_vs_same_settings_db')}\n"
        )
    if results.get("issue23"):
        sys.stdout.write(f"issue 23: {json.dumps(results['issue23'], default=str)}\n")
    if any(name in HD_RUNS for name in results["runs"]):
        sys.stdout.write(f"issue 14: {json.dumps(results.get('issue14'), default=str)}\n")


if __name__ == "__main__":
    sys.exit(main())
