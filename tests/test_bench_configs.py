"""bench/gpu_configs.py and gpu_build.py: the full-size configs of each family, without building weights.

The LTX-2.3 configs (issue 14) are written as config.json files and a model_index.json, the way the
GPU build writes them, into a temporary folder, with every model made on the meta device: the folder
must be detected as the family it was built for, and the issue's batch must validate against it.
Parameter counts at full size come from meta-device construction too (no memory, a few seconds).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT

from config.settings import load_settings
from orchestrator.command_line.batch import validate_batch
from protocol.families import LATENT_UPSAMPLER, detect_family, family_named

sys.path.insert(0, str(REPO_ROOT / "bench"))
import batch_bench  # noqa: E402
from batch_bench import HD_RUNS, add_issue14, build_parser, run_command  # noqa: E402
from gpu_build import component_factories, meta_param_counts, save_pipeline_files  # noqa: E402
from gpu_configs import (  # noqa: E402
    EXPECTED_PARAMS,
    EXPECTED_PARAMS_2_3,
    family_components,
    scaled_configs,
)


def write_config_folder(root: Path, family: str) -> Path:
    """Every component's config.json (meta-device models, smoke scale) and the pipeline files."""
    cfgs = scaled_configs("smoke", family=family)
    with torch.device("meta"):
        for name, make in component_factories(cfgs).items():
            model: Any = make()
            if name == "text_encoder":
                model.config.save_pretrained(root / name)
            else:
                model.save_config(root / name)
    save_pipeline_files(torch, root, cfgs, family)
    return root


@pytest.mark.parametrize("family", ["2.0", "2.3"])
def test_written_configs_are_detected_as_their_family(tmp_path: Path, family: str) -> None:
    root = write_config_folder(tmp_path / f"ltx2-{family}", family)
    detected = detect_family(root)
    assert detected.name == family
    assert (root / LATENT_UPSAMPLER / "config.json").is_file() == (family == "2.3")
    if family == "2.3":
        assert detected.audio_sample_rate == 48000  # the BWE vocoder's output rate


def test_2_3_transformer_flags_are_the_family_row() -> None:
    transformer = scaled_configs("full", family="2.3")["transformer"]
    for key, value in family_named("2.3").transformer.items():
        assert transformer.get(key, value) == value, key
    assert scaled_configs("full", family="2.3")["latent_upsampler"]["use_rational_resampler"] is False


def test_2_0_configs_unchanged_by_the_family_argument() -> None:
    assert scaled_configs("full") == scaled_configs("full", family="2.0")
    assert "latent_upsampler" not in scaled_configs("full")
    assert family_components("2.3")[-1] == "latent_upsampler"
    with pytest.raises(ValueError):
        scaled_configs("full", family="2.4")


def test_full_size_parameter_counts_on_the_meta_device() -> None:
    counts = {family: meta_param_counts(scaled_configs("full", family=family)) for family in ("2.0", "2.3")}
    for family, expected in (("2.0", EXPECTED_PARAMS), ("2.3", EXPECTED_PARAMS_2_3)):
        for name, target in expected.items():
            assert abs(counts[family][name] - target) / target < 0.01, (family, name, counts[family][name])
    # LTX-2.3's "22B": the original checkpoint's transformer plus text connectors.
    two_three = counts["2.3"]["transformer"] + counts["2.3"]["connectors"]
    assert 21.5e9 < two_three < 22.5e9


def write_extension_sources(work: Path, clips: int) -> None:
    """What hd_two_stage_extend reads in a call: hd_two_stage_fp8mm's clips in the work folder's results.json
    (here one flat 1920x1088x121 MP4 for each: an extension delivers its source's size)."""
    import av

    source = work / "source.mp4"
    with av.open(str(source), "w") as container:
        stream = container.add_stream("libx264", rate=24)
        stream.width, stream.height, stream.pix_fmt = 1920, 1088, "yuv420p"
        stream.options = {"preset": "ultrafast"}
        for index in range(121):
            frame = av.VideoFrame.from_ndarray(np.full((1088, 1920, 3), index, dtype=np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    jobs = {f"clip{index + 1}": {"output": str(source)} for index in range(clips)}
    (work / "results.json").write_text(json.dumps({"runs": {"hd_two_stage_fp8mm": {"jobs": jobs}}}))


def test_issue_14_batches_validate_against_a_2_3_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every hd_* run's batch file (issues 14, 27, 28) is a batch the CLI accepts, with its pipeline and flags."""
    root = write_config_folder(tmp_path / "ltx2-2.3", "2.3")
    args = build_parser().parse_args(["--family", "2.3", "--out", str(tmp_path / "out")])
    settings = load_settings(environ={"HOME": str(tmp_path), "LTX2_STATE_DIR": str(tmp_path / "state")})
    monkeypatch.setattr(batch_bench, "DIRECTING_INPUTS", tmp_path / "inputs")  # not the device's /tmp folder
    write_extension_sources(tmp_path, args.clips)
    for name, (pipeline, clips, fast) in HD_RUNS.items():
        command, size = run_command(name, args, root, tmp_path)
        assert size == (1920, 1088, 121)
        built = validate_batch(Path(command[-2]), settings, {})
        assert len(built) == (clips or args.clips)
        spec = built[0].built.spec
        assert (spec.pipeline, spec.fp8_matmul, spec.compile) == (pipeline, fast, fast)


def test_issue_14_verdicts() -> None:
    def run(warm: float, diffusion: float, peak: float) -> dict[str, Any]:
        return {"jobs": {}, "warm_per_clip_wall_s": warm, "diffusion_warm_per_clip_s": diffusion,
                "stage_peak_gib": {"encode_diffuse": peak}}  # fmt: skip

    runs = {"hd_two_stage_fp8mm": run(12.0, 8.0, 30.0), "hd_fp8mm": run(30.0, 24.0, 35.0)}
    verdict = add_issue14({**runs, "hd_two_stage_bf16": run(0, 0, 47.0)})
    assert verdict["two_stage_ok"] and not verdict["two_stage_stretch_ok"]
    assert verdict["diffusion_speedup"] == pytest.approx(3.0) and verdict["diffusion_speedup_ok"]
    assert verdict["bf16_peaks_ok"] is True
    assert add_issue14({})["two_stage_ok"] is None


STAND_IN_MPS_CONTROL = """#!/bin/sh
# Stands in for NVIDIA's nvidia-cuda-mps-control in test_an_mps_run_starts_and_quits_a_daemon_of_its_own: -d
# starts a process of this program's name and writes its pid where the daemon writes its own; the commands
# arrive on stdin; "quit" ends it, as the real daemon does.
case "$1" in
    -d) "$0" serve >/dev/null 2>&1 &
        echo $! > "$CUDA_MPS_PIPE_DIRECTORY/nvidia-cuda-mps-control.pid"
        seen="LTX2_STATE_DIR=${LTX2_STATE_DIR:-unset} CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-unset}"
        echo "started with $seen" > "$CUDA_MPS_LOG_DIRECTORY/control.log"
        exit 0 ;;
    serve) while :; do sleep 0.1; done ;;
esac
read -r command
case "$command" in
    get_server_list) echo 4242 ;;
    quit) kill "$(cat "$CUDA_MPS_PIPE_DIRECTORY/nvidia-cuda-mps-control.pid")" ;;
esac
"""


def test_an_mps_run_starts_and_quits_a_daemon_of_its_own(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """bench/batch_bench.py's MPS runs (issue 28, "measure with and without"): the run's workers are told the
    daemon's pipe directory; the daemon gets none of the run's LTX2_* variables (a timed-out run's clean-up kills
    every process carrying its state folder) and every GPU; it is gone after the run. A stand-in for NVIDIA's
    program (this machine has no MPS): what is checked is the bench's own lifecycle around it."""
    program = tmp_path / "bin" / batch_bench.MPS_CONTROL
    program.parent.mkdir()
    program.write_text(STAND_IN_MPS_CONTROL)
    program.chmod(0o755)
    monkeypatch.setenv("PATH", f"{program.parent}:{os.environ['PATH']}")
    work, log = tmp_path / "work", tmp_path / "children.log"
    env = {**os.environ, "LTX2_STATE_DIR": str(work / "state"), "CUDA_VISIBLE_DEVICES": "1"}
    name = next(iter(batch_bench.MPS_RUNS))
    assert batch_bench.skip_reason(name, 600) is None
    with batch_bench.mps_daemon(name, env, work, log) as record:
        pid = record["control_pid"]
        assert env["LTX2_CUDA_MPS"] == str(work / "mps-pipe") == record["pipe_directory"]
        assert (Path("/proc") / str(pid)).exists()
    assert record["server_list"] == "4242" and "killed" not in record
    assert record["control.log"] == ["started with LTX2_STATE_DIR=unset CUDA_VISIBLE_DEVICES=unset"]
    deadline = time.time() + 5
    while (Path("/proc") / str(pid)).exists() and time.time() < deadline:
        time.sleep(0.05)
    assert not (Path("/proc") / str(pid)).exists() or "Z" in (Path("/proc") / str(pid) / "stat").read_text().split()[2]
    # A daemon that never comes up: the run is skipped with the reason, nothing is left running.
    program.write_text("#!/bin/sh\nexit 0\n")
    monkeypatch.setattr(batch_bench, "MPS_START_S", 0.5)
    with batch_bench.mps_daemon(name, dict(env), work, log) as record:
        assert "no live pid" in record["error"]
    # A machine without the program: the run is skipped before anything starts.
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    assert "not on PATH" in batch_bench.skip_reason(name, 600)
