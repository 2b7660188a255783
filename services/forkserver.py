"""`python -m services.forkserver`: import torch and every stage once, then fork one worker per request.

Importing torch + diffusers costs 4 s of CPU here and 12-25 s on a GPU host, paid by every stage
process. This server pays it once per orchestrator: each request forks a child that already has
the modules loaded and runs exactly like `python -m services.<stage>` (own session, own log file,
READY/GO, exit code). Memory isolation is unchanged: the server allocates nothing on the
accelerator (it never initialises CUDA, and sets the NVML-based availability check so importing
cannot either), every model is loaded by a child after GO, and the child's exit frees it.

Wire (JSON lines): stdin gets `{"stage": NAME, "argv": [...], "log": PATH}` (plus
`"cuda_visible_devices": DEVICES` for a worker of a lane that pins a device: the child sets it
before anything touches CUDA, which reads it at its initialisation, so it holds although the
server's own environment differs; `"threads": N` for a lane's share of the CPUs, the size of the
child's torch thread pool; and `"die_with_server": true` on a farm node, where the child
asks the kernel to kill it when the server exits, see orchestrator.placement.node_forker); stdout answers
`{"pid": N}` per request, `{"exit": N, "code": C}` when a child ends (negative C: killed by
signal -C), and `{"ready": true, "cuda_initialised_by": NAME}` once the imports are done (NAME is ""
unless an import initialised CUDA, which makes forking useless: see `cuda_initialised_by`). EOF on
stdin stops the server.
"""

from __future__ import annotations

import gc
import importlib
import json
import os
import select
import signal
import sys
from typing import Any

from protocol.fault_points import fault_point
from protocol.files import Stage
from services import gc_pauses, parent_bound

# Stop-and-reap cadence of the single-threaded loop; also the exit-report latency.
POLL_S = 0.05


def emit(message: dict[str, Any]) -> None:
    """One line to the orchestrator; if it has closed our stdout (it ended, or closed us while we were
    still importing), nobody is left to serve: exit quietly rather than print a traceback into the
    stderr we share with it."""
    try:
        sys.stdout.write(json.dumps(message) + "\n")
        sys.stdout.flush()  # nothing may sit in the buffer when we fork
    except BrokenPipeError:
        os._exit(0)


def fork_worker(modules: dict[str, Any], request: dict[str, Any]) -> int:
    """Fork a child that becomes the requested stage worker; returns its pid (in the parent)."""
    module = modules[request["stage"]]
    server = os.getpid()
    gc_pauses.freeze_imports()  # the child's collections skip the imports' objects (services/gc_pauses.py)
    pid = os.fork()
    if pid:
        return pid
    try:  # the child
        if request.get("die_with_server"):
            parent_bound.die_with(server)
        os.setsid()
        log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(log, 1)
        os.dup2(log, 2)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        if "cuda_visible_devices" in request:
            os.environ["CUDA_VISIBLE_DEVICES"] = request["cuda_visible_devices"]
        os.environ.update(request.get("environment", {}))  # CUDA MPS's variables, read when CUDA starts
        if "threads" in request:  # torch read OMP_NUM_THREADS when the server imported it: size the pool here
            os.environ["OMP_NUM_THREADS"] = str(request["threads"])
            sys.modules["torch"].set_num_threads(request["threads"])
        module.main(request["argv"])
    finally:
        os._exit(1)  # main never returns; this only runs if it raised before run_worker took over


# Packages known to initialise CUDA when imported (diffusers imports torchao when it is installed;
# NGC images ship Transformer Engine): named in the message when CUDA turns out initialised.
CUDA_INITIALISING_PACKAGES = ("torchao", "transformer_engine", "apex")


def cuda_initialised_by() -> str:
    """ "" while CUDA is untouched; else the likely culprit. A child forked after CUDA was
    initialised cannot use it, so the orchestrator then starts fresh workers instead."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_initialized():
        return ""
    present = [name for name in CUDA_INITIALISING_PACKAGES if name in sys.modules]
    return " or ".join(present) or "an imported module"


def reap() -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        emit({"exit": pid, "code": os.waitstatus_to_exitcode(status)})


def main() -> None:
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    modules = {stage.value: importlib.import_module(stage.module) for stage in Stage}
    gc.collect()  # once: the imports' cyclic garbage, which every fork's freeze would otherwise keep for good
    culprit = fault_point("forkserver.imported") or cuda_initialised_by()
    emit({"ready": True, "cuda_initialised_by": culprit})
    pending = b""
    while True:
        readable, _, _ = select.select([0], [], [], POLL_S)
        if readable:
            chunk = os.read(0, 65536)
            if not chunk:
                break
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                request = json.loads(line)
                emit({"pid": fork_worker(modules, request), "stage": request["stage"]})
        reap()
    reap()
    sys.stdout.flush()
    os._exit(0)  # tearing down torch and diffusers takes about a second and frees nothing the OS would not


if __name__ == "__main__":
    main()
