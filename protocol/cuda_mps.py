"""CUDA MPS as the project's processes see it: where a control daemon listens, whether one runs, and the
environment each stage process gets (`[worker] cuda_mps`).

Why it matters here. A lane's decoders run beside its next diffusion in another process on the same GPU
(orchestrator.run.stage_overlap). Without MPS the GPU time-slices between the two processes' contexts: a
kernel of one never runs beside a kernel of the other. Under NVIDIA's Multi-Process Service the processes are
clients of one server and their kernels share the SMs, and a client's `CUDA_MPS_CLIENT_PRIORITY` (0 normal,
1 below normal) tells the server whose work goes first; the decoders get "below normal", the GPU's analogue of
the CPU niceness they already run at (orchestrator.placement.lane_links), so the diffusion's steps, the long
side of an overlapped wave, keep the card. Whether MPS makes a wave faster is a measurement still to make
(bench/batch_bench.py's MPS_RUNS); the setting lets a box with a daemon run with it or without it.

CUDA connects a process to MPS on its own when it initialises: if a control daemon answers in the pipe
directory (`CUDA_MPS_PIPE_DIRECTORY`, default /tmp/nvidia-mps), the process becomes its client; if not, it
runs as usual. So the project starts no daemon (an operator does: docs/operations.md, "CUDA MPS"); it
decides which pipe directory each stage process looks in and at which priority, and says in the worker's log
which it was. A daemon writes its pid to `nvidia-cuda-mps-control.pid` in its pipe directory
(NVIDIA's MPS documentation, "Tools and Interface Reference"); a live process of the daemon's program at that
pid is how a daemon is recognised without talking to it. Torch-free: the orchestrator sets the environment,
the worker logs it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

DEFAULT_PIPE_DIRECTORY = Path("/tmp/nvidia-mps")
PID_FILE = "nvidia-cuda-mps-control.pid"
#: The start of the control daemon's program name as /proc/<pid>/comm holds it (15 characters at most).
DAEMON_PROGRAM = "nvidia-cuda-mps"
PROC = Path("/proc")
PIPE_DIRECTORY_ENV = "CUDA_MPS_PIPE_DIRECTORY"
CLIENT_PRIORITY_ENV = "CUDA_MPS_CLIENT_PRIORITY"
#: MPS client priorities: the diffusion's, and the decoders' beside it.
NORMAL_PRIORITY, BELOW_NORMAL_PRIORITY = "0", "1"
#: `[worker] cuda_mps` values other than a pipe directory's absolute path.
MPS_MODES = ("auto", "off")
#: Under the orchestrator's private runtime directory: a pipe directory no daemon listens in, for "off".
NO_DAEMON_DIRECTORY = "no-cuda-mps"


def setting_problem(value: object) -> str | None:
    """What is wrong with a `[worker] cuda_mps` value, or None: "auto", "off" or an absolute path."""
    if not isinstance(value, str):
        return f"must be a string, got {type(value).__name__}"
    if value in MPS_MODES or (value and Path(value).is_absolute()):
        return None
    return f'must be "auto", "off" or the absolute path of an MPS pipe directory; got {value!r}'


def control_daemon_pid(directory: Path) -> int | None:
    """The pid of the MPS control daemon listening in pipe directory `directory`, or None when none runs there:
    no pid file, an unreadable one, or the pid of a process that has ended or is another program (a pid file
    left by a daemon that died, its pid since reused; the program's name is checked where /proc has it)."""
    try:
        pid = int((directory / PID_FILE).read_text().strip())
    except (OSError, ValueError):
        return None
    if pid <= 0:
        return None
    try:
        os.kill(pid, 0)
    except PermissionError:  # alive, another user's (a daemon started by root, as NVIDIA's guide does)
        pass
    except (OSError, OverflowError):  # gone, or a number no process can have
        return None
    try:
        program = (PROC / str(pid) / "comm").read_text().strip()
    except OSError:  # no /proc here: the live pid is all there is to go by
        return pid
    return pid if program.startswith(DAEMON_PROGRAM) else None


def pipe_directory(setting: str, environ: Mapping[str, str], no_daemon: Path) -> Path:
    """Where stage processes look for a daemon: `no_daemon` (an empty directory) for "off", the directory
    CUDA itself would use for "auto" ($CUDA_MPS_PIPE_DIRECTORY, else /tmp/nvidia-mps), else the path given."""
    if setting == "off":
        return no_daemon
    if setting == "auto":
        return Path(environ.get(PIPE_DIRECTORY_ENV) or DEFAULT_PIPE_DIRECTORY)
    return Path(setting)


def client_environment(setting: str, environ: Mapping[str, str], no_daemon: Path, decoder_link: bool) -> dict[str, str]:
    """What a stage process adds to its environment for `[worker] cuda_mps = setting`. Where a daemon runs in
    the pipe directory: that directory and the client priority, below normal for the processes of a lane's
    decoder link (`decoder_link`: it runs every decoder of a lane that overlaps, beside a diffusion or, at a
    run's end, alone, where the priority changes nothing), normal otherwise. Where none runs: the directory
    for "off" and a path given (CUDA must look there, not in its default), nothing for "auto" (CUDA looks
    where it would anyway; no line in the log)."""
    directory = pipe_directory(setting, environ, no_daemon)
    if control_daemon_pid(directory) is None:
        return {} if setting == "auto" else {PIPE_DIRECTORY_ENV: str(directory)}
    priority = BELOW_NORMAL_PRIORITY if decoder_link else NORMAL_PRIORITY
    return {PIPE_DIRECTORY_ENV: str(directory), CLIENT_PRIORITY_ENV: priority}


def describe_client(environ: Mapping[str, str]) -> str | None:
    """One line for a worker's log on what it was asked to do about MPS, from its environment: the pipe directory
    it looks in, whether a daemon's live pid is there and the priority asked for (not what CUDA then did: a
    daemon's permissions or a server of another user are not visible from here). None where no pipe directory
    is set ("auto" without a daemon and none exported; a farm's worker unless its node exports one)."""
    if PIPE_DIRECTORY_ENV not in environ:
        return None
    directory = Path(environ[PIPE_DIRECTORY_ENV])
    pid = control_daemon_pid(directory)
    if pid is None:
        return f"CUDA MPS: none (no control daemon in {directory})"
    priority = "below normal" if environ.get(CLIENT_PRIORITY_ENV) == BELOW_NORMAL_PRIORITY else "normal"
    return f"CUDA MPS: client of the control daemon (pid {pid}) in {directory}, priority {priority}"
