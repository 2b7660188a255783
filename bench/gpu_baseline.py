"""`gpu_bench.py baseline`: the single-process reference, diffusers' LTX2Pipeline in one process.

It exists to give the staged pipeline something to be compared with: the same model folder,
prompt, seed, steps and sigmas, loaded once with LTX2Pipeline.from_pretrained + .to(device), then
one clip per entry of --runs (the first is the cold call of a fresh process). Every phase is timed
in-process with synchronized host stamps (text encode, connectors, each denoising step, VAE and
audio decode, vocoder) and CUDA events per transformer call. Runs in a child process started by
gpu_run; torch and diffusers are imported inside cmd_baseline, after T_PROCESS.
"""

from __future__ import annotations

import argparse
import importlib
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

from gpu_common import (
    FPS,
    GIB,
    MAX_SEQUENCE_LENGTH,
    PROMPT,
    SEED,
    STEPS,
    T_PROCESS,
    log,
    parse_size,
    size_label,
    write_json,
)
from gpu_configs import transformer_flops

# The pipeline pieces whose time counts apart from the denoising loop (the rest of a call).
TIMED_PARTS = ("text_encode", "connectors", "vae_decode", "audio_vae_decode", "vocoder")


def rss_peak() -> int:
    """Peak resident memory of this process in bytes."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Probes:
    """The time marks of one pipeline call: wrapped methods and hooks write into `marks`, every
    transformer call gets a host stamp and (on CUDA) a pair of events, every step its end."""

    def __init__(self, torch: Any, pipe: Any) -> None:
        self.torch = torch
        self.cuda = torch.cuda.is_available()
        self.marks: dict[str, float] = {}
        self.calls: list[tuple[Any, Any]] = []
        self.host_calls: list[float] = []
        self.steps: list[float] = []  # end of each denoising step (synchronized)
        pipe.encode_prompt = self.timed("text_encode", pipe.encode_prompt)
        pipe.vae.decode = self.timed("vae_decode", pipe.vae.decode)
        pipe.audio_vae.decode = self.timed("audio_vae_decode", pipe.audio_vae.decode)
        self.hook_pair(pipe.connectors, "connectors")
        self.hook_pair(pipe.vocoder, "vocoder")
        pipe.transformer.register_forward_pre_hook(self.transformer_pre)
        pipe.transformer.register_forward_hook(self.transformer_post)

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def reset(self) -> None:
        """Forget the previous call's marks."""
        for collected in (self.marks, self.calls, self.host_calls, self.steps):
            collected.clear()

    def add(self, name: str, started: float) -> None:
        self.marks[name] = self.marks.get(name, 0.0) + time.time() - started
        self.marks[name + "_end"] = time.time()

    def timed(self, name: str, fn: Any) -> Any:
        """`fn` wrapped: its synchronized duration added to marks[name], its end in marks[name_end]."""

        def wrapper(*a: Any, **k: Any) -> Any:
            self.sync()
            t0 = time.time()
            out = fn(*a, **k)
            self.sync()
            self.add(name, t0)
            return out

        return wrapper

    def hook_pair(self, module: Any, name: str) -> None:
        """The same as `timed` for a module's forward, through hooks."""

        def pre(_m: Any, _a: Any) -> None:
            self.sync()
            self.marks[name + "_t0"] = time.time()

        def post(_m: Any, _a: Any, _o: Any) -> None:
            self.sync()
            self.add(name, self.marks[name + "_t0"])

        module.register_forward_pre_hook(pre)
        module.register_forward_hook(post)

    def transformer_pre(self, _m: Any, _a: Any) -> None:
        self.host_calls.append(time.time())
        if self.cuda:
            start = self.torch.cuda.Event(enable_timing=True)
            start.record()
            self.calls.append((start, None))

    def transformer_post(self, _m: Any, _a: Any, _o: Any) -> None:
        if self.cuda:
            end = self.torch.cuda.Event(enable_timing=True)
            end.record()
            self.calls[-1] = (self.calls[-1][0], end)

    def on_step(self, _p: Any, _i: int, _t: Any, _k: dict[str, Any]) -> dict[str, Any]:
        """callback_on_step_end: the synchronized end of a denoising step."""
        self.sync()
        self.steps.append(time.time())
        return {}

    def gpu_call_seconds(self) -> list[float]:
        """CUDA-event time of each transformer call (empty without CUDA)."""
        return [s.elapsed_time(e) / 1000 for s, e in self.calls if e is not None] if self.cuda else []


def load_pipeline(torch: Any, root: str, res: dict[str, Any]) -> Any:
    """from_pretrained + .to(device), timed into `res`; the scheduler as the staged pipeline uses it."""
    from diffusers import FlowMatchEulerDiscreteScheduler, LTX2Pipeline

    t_imported = time.time()
    cuda = torch.cuda.is_available()
    pipe = LTX2Pipeline.from_pretrained(root, torch_dtype=torch.bfloat16)
    t_cpu = time.time()
    pipe.to(torch.device("cuda" if cuda else "cpu"))
    if cuda:
        torch.cuda.synchronize()
    t_loaded = time.time()
    res["load_from_pretrained_s"] = t_cpu - t_imported
    res["load_to_device_s"] = t_loaded - t_cpu
    res["load_s"] = t_loaded - t_imported
    res["rss_after_load"] = rss_peak()
    if cuda:
        res["gpu_after_load_bytes"] = torch.cuda.memory_allocated()
        res["gpu_name"] = torch.cuda.get_device_name(0)
    res["transformer_config"] = dict(pipe.transformer.config)
    res["text_encoder_layers"] = pipe.text_encoder.config.text_config.num_hidden_layers
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(
        pipe.scheduler.config, use_dynamic_shifting=False, shift_terminal=None
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def set_decode_tiling(pipe: Any, size: tuple[int, int, int]) -> bool:
    """Tiled VAE decode above 720p x 121 (a single-pass 1080p x 161 decode hits PyTorch's 32-bit
    index limit), with the staged plan's tiles; returns whether it is tiled."""
    width, height, frames = size
    tiled = width * height * frames > 1280 * 720 * 121
    if tiled:
        pipe.vae.enable_tiling(
            tile_sample_min_height=512, tile_sample_min_width=512,
            tile_sample_stride_height=384, tile_sample_stride_width=384,
        )  # fmt: skip
    else:
        pipe.vae.disable_tiling()
    return tiled


def call_pipeline(torch: Any, pipe: Any, probes: Probes, size: tuple[int, int, int]) -> tuple[Any, Any, float, float]:
    """One clip through the pipeline: (video frames, audio, call start, call end)."""
    from diffusers.pipelines.ltx2.utils import DISTILLED_SIGMA_VALUES

    from services.guidance import guidance_off

    width, height, frames = size
    if probes.cuda:
        torch.cuda.reset_peak_memory_stats()
    generator = torch.Generator(device="cuda" if probes.cuda else "cpu").manual_seed(SEED)
    probes.sync()
    t_call = time.time()
    with torch.no_grad():
        video, audio = pipe(
            prompt=PROMPT, negative_prompt="", width=width, height=height, num_frames=frames, frame_rate=FPS,
            num_inference_steps=STEPS, sigmas=list(DISTILLED_SIGMA_VALUES), generator=generator,
            output_type="np", return_dict=False, callback_on_step_end=probes.on_step, **guidance_off(),
        )  # fmt: skip
    probes.sync()
    return video, audio, t_call, time.time()


def write_mp4(pipe: Any, video: Any, audio: Any, path: Path) -> None:
    """The clip as an MP4, with diffusers' own writer (PyAV)."""
    from diffusers.utils import encode_video

    encode_video(
        video[0],
        fps=FPS,
        output_path=str(path),
        audio=audio[0].float().cpu(),
        audio_sample_rate=pipe.vocoder.config.output_sampling_rate,
    )


def step_numbers(steps: list[float], denoise_start: float) -> dict[str, Any]:
    """Denoising loop times from the step ends (the loop starts when the connectors end)."""
    return {
        "denoise_s": steps[-1] - denoise_start if steps else None,
        "step_ends": list(steps),
        "first_step_s": steps[0] - denoise_start if steps else None,
        "s_per_step": (steps[-1] - denoise_start) / len(steps) if steps else None,
        "s_per_step_steady": (steps[-1] - steps[0]) / (len(steps) - 1) if len(steps) > 1 else None,
    }


def run_record(probes: Probes, t_call: float, t_pipe: float, t_mp4: float) -> dict[str, Any]:
    """A finished call's times and memory (the caller adds label, size, files and shapes)."""
    torch, marks, steps = probes.torch, probes.marks, probes.steps
    denoise_start = marks.get("connectors_end", t_call)
    loop = step_numbers(steps, denoise_start)
    return {
        "t_call": t_call,
        "t_mp4": t_mp4,
        "call_s": t_pipe - t_call,
        "text_encode_s": marks.get("text_encode"),
        "connectors_s": marks.get("connectors"),
        **loop,
        "transformer_calls": len(probes.host_calls),
        "transformer_gpu_s": probes.gpu_call_seconds(),
        "vae_decode_s": marks.get("vae_decode"),
        "audio_vae_decode_s": marks.get("audio_vae_decode"),
        "vocoder_s": marks.get("vocoder"),
        "postprocess_and_rest_s": (t_pipe - t_call)
        - sum(marks.get(k) or 0 for k in TIMED_PARTS)
        - (loop["denoise_s"] or 0),
        "mp4_encode_s": t_mp4 - t_pipe,
        "peak_gpu_alloc_bytes": torch.cuda.max_memory_allocated() if probes.cuda else 0,
        "peak_gpu_reserved_bytes": torch.cuda.max_memory_reserved() if probes.cuda else 0,
        "rss_peak_bytes": rss_peak(),
    }


def run_clip(pipe: Any, probes: Probes, label: str, size_text: str, work: str) -> dict[str, Any]:
    """One entry of --runs: the call, its MP4, and the record of both."""
    size = parse_size(size_text)
    tiled = set_decode_tiling(pipe, size)
    probes.reset()
    video, audio, t_call, t_pipe = call_pipeline(probes.torch, pipe, probes, size)
    mp4 = Path(work) / f"baseline_{label}_{size_label(size)}.mp4"
    write_mp4(pipe, video, audio, mp4)
    t_mp4 = time.time()
    run = {"label": label, "size": size_text, "tiled_decode": tiled, **run_record(probes, t_call, t_pipe, t_mp4)}
    run.update(mp4=str(mp4), mp4_bytes=mp4.stat().st_size, frames_shape=list(video.shape))
    run["audio_shape"] = list(audio.shape)
    return run


def estimate_run_s(res: dict[str, Any], size: tuple[int, int, int]) -> float:
    """Seconds the next run may take, scaled from the first run by transformer FLOPs (+ slack)."""
    done = [r for r in res["runs"] if r.get("s_per_step")]
    if not done:
        return 60.0
    first = done[-1]
    cfg = res["transformer_config"]
    f_done = transformer_flops(cfg, *parse_size(first["size"]), MAX_SEQUENCE_LENGTH)["flops"]
    f_next = transformer_flops(cfg, *size, MAX_SEQUENCE_LENGTH)["flops"]
    pixels = size[0] * size[1] * size[2] / max(1, eval_pixels(first["size"]))
    rest = first["call_s"] - first["denoise_s"] + first["mp4_encode_s"]
    return STEPS * first["s_per_step"] * f_next / f_done + rest * pixels * 1.5 + 30


def eval_pixels(size_text: str) -> int:
    """Width x height x frames of "WxHxN"."""
    w, h, n = parse_size(size_text)
    return w * h * n


def import_libraries() -> Any:
    """Everything a call needs (torch, diffusers' LTX-2 pipeline, the guidance module), imported
    before the load starts: the imports are part of the measured start; returns torch."""
    import torch

    for name in ("diffusers.pipelines.ltx2.utils", "diffusers.utils", "services.guidance"):
        importlib.import_module(name)
    for name in ("FlowMatchEulerDiscreteScheduler", "LTX2Pipeline"):
        getattr(sys.modules["diffusers"], name)  # diffusers imports its classes on first access
    return torch


def cmd_baseline(args: argparse.Namespace) -> int:
    """1 import, 2 load + instrument, 3 one clip per entry of --runs; results rewritten after each."""
    spawned = float(os.environ.get("BENCH_SPAWN_T", T_PROCESS))
    result_path = Path(args.result)
    res: dict[str, Any] = {"spawn_t": spawned, "process_t": T_PROCESS, "interpreter_start_s": T_PROCESS - spawned}
    torch = import_libraries()
    t_imported = time.time()  # 1
    res["import_s"] = t_imported - T_PROCESS
    res["start_import_s"] = t_imported - spawned
    pipe = load_pipeline(torch, args.root, res)  # 2
    probes = Probes(torch, pipe)
    res["runs"] = []
    write_json(result_path, res)
    for index, spec in enumerate(args.runs.split(",")):  # 3
        size_text, _, label = spec.partition(":")
        if index > 0 and time.time() + estimate_run_s(res, parse_size(size_text)) > args.deadline:
            res["runs"].append({"label": label, "size": size_text, "skipped": "not enough time left"})
            write_json(result_path, res)
            continue
        run = run_clip(pipe, probes, label, size_text, args.work)
        if index == 0:
            run["cold_total_s"] = run["t_mp4"] - spawned
        res["runs"].append(run)
        write_json(result_path, res)
        log(
            f"baseline {label} {size_text}: call {run['call_s']:.1f} s, {run['s_per_step']:.3f} s/step, "
            f"mp4 {run['mp4_encode_s']:.1f} s, peak GPU {run['peak_gpu_alloc_bytes'] / GIB:.1f} GiB"
        )
    return 0
