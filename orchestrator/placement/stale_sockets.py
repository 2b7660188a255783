"""Remove worker socket files left behind by orchestrators that were killed outright.

Every orchestrator (the daemon, `ltx2 generate`, `ltx2 batch`) binds `workers-<its pid>.sock` (and
`workers-<its pid>-<lane>.sock` for each further lane) in
the private runtime directory and removes it when it closes (a daemon also binds
`daemon-core-<its pid>.sock`, its link to its client front). One killed by SIGKILL or the OOM
killer cannot, so each such death used to leave a file there for good. When an orchestrator
starts, files of exactly that name whose pid is not running are removed; any other name, and the
socket of any running process (another daemon, a `generate` in another shell), is left alone.
"""

from __future__ import annotations

import errno
import logging
import re
import socket
from pathlib import Path

from orchestrator.placement import processes

log = logging.getLogger("ltx2.orchestrator")
# -N: lane N's socket, for lanes after the first; daemon-core-PID: a daemon's link to its client front.
WORKER_SOCKET = re.compile(r"(?:workers|daemon-core)-(\d+)(?:-\d+)?(?:-decoders)?\.sock")


def remove_stale_worker_sockets(directory: Path) -> list[Path]:
    """Remove `workers-<pid>[-<lane>][-decoders].sock` files in `directory` whose process is gone (a lane's
    second link, orchestrator.run.stage_overlap's, ends in -decoders); returns them."""
    removed = []
    for path in directory.iterdir():
        match = WORKER_SOCKET.fullmatch(path.name)
        if match is None or processes.is_running(int(match.group(1))) or accepts_connections(path):
            continue
        path.unlink(missing_ok=True)
        log.info("removed %s: its process is gone", path)
        removed.append(path)
    return removed


def accepts_connections(path: Path) -> bool:
    """True if some process listens on the unix socket file at `path`, so it is in use whatever its
    name says (e.g. a new process got the dead one's pid and bound it just now), and a client may
    connect. A process killed outright leaves its socket file behind; ZeroMQ would connect to it and
    wait out a timeout, so a plain connect tells a listener from a stale file at once. Only "absent",
    "refused" and "not a socket" mean nobody listens: any other error (a full backlog, no permission)
    leaves a file that may belong to a live process, which is never removed on a guess."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError as exc:
            return exc.errno not in (errno.ENOENT, errno.ECONNREFUSED, errno.ENOTSOCK)
    return True
