"""Check on a multi-GPU host that lanes pin their workers (run with the host's python3 and torch).

`python3 bench/lanes_gpu_check.py` finds the lanes as the orchestrator does (no torch import), then
imports torch the way the fork server does (NVML-based availability check, CUDA never
initialised) and forks one child per lane through services.forkserver.fork_worker with the lane's
`cuda_visible_devices`: each child must see exactly its lane's GPU (same UUID as the parent's
`nvidia-smi -L` lists for it), and a CPU lane's child none. Prints one line per lane; exits 1 on
a mismatch. Needs no diffusers, zmq or av, so it runs on a bare CUDA image.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from config.settings import load_settings  # noqa: E402
from orchestrator.placement.lanes import Lane, resolve_lanes, visible_cuda_devices  # noqa: E402


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()  # before any fork: a child must not inherit unwritten lines


def probe(_argv: list[str]) -> None:
    """The child: report what torch sees, as a stage worker would after the fork."""
    import torch

    count = torch.cuda.device_count()
    uuids = [str(torch.cuda.get_device_properties(i).uuid) for i in range(count)]
    say(f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r} count={count} uuids={uuids}")
    os._exit(0)


def main() -> int:
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")  # as services.forkserver does
    from services.forkserver import fork_worker

    settings = load_settings(environ={**os.environ, "LTX2_CONFIG": ""})  # LTX2_DEVICES applies
    lanes = resolve_lanes(settings) + [Lane(99, "cpu", "")]
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=False).stdout
    except OSError:  # no driver: only the CPU lanes can be checked
        listing = ""
    physical = [line.split("UUID: ")[1].rstrip(")") for line in listing.splitlines() if line.startswith("GPU ")]
    import torch

    say(f"lanes: {[lane.device for lane in lanes]}; torch.cuda.is_available()={torch.cuda.is_available()}")
    assert not torch.cuda.is_initialized(), "the parent initialised CUDA: forking would be useless"
    modules = {"probe": types.SimpleNamespace(main=probe)}
    failures = 0
    for lane in lanes:
        with tempfile.NamedTemporaryFile("r", suffix=".log") as log:
            request: dict[str, object] = {"stage": "probe", "argv": [], "log": log.name}
            if lane.visible_devices is not None:
                request["cuda_visible_devices"] = lane.visible_devices
            pid = fork_worker(modules, request)
            _, status = os.waitpid(pid, 0)
            seen = Path(log.name).read_text().strip()
        if lane.visible_devices is None:  # the one lane that pins nothing: it sees what we see
            expected = f"count={len(visible_cuda_devices())}"
        elif lane.device == "cpu":
            expected = "count=0 uuids=[]"
        else:
            expected = f"uuids=['{physical[int(lane.visible_devices)].removeprefix('GPU-')}']"
        ok = os.waitstatus_to_exitcode(status) == 0 and expected in seen
        failures += not ok
        say(f"lane {lane.device}: {seen} -> {'ok' if ok else 'MISMATCH, expected ' + expected}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
