"""The N processes of one context-parallel stage attempt (DESIGN.md rule 8), followed as one process.

A context-parallel diffusion (issue 30) is N worker processes joined in one torch.distributed group:
rank 0 talks to the orchestrator and writes the outputs, the other ranks say READY, wait for GO and
then stay silent. Their fates are tied: a rank that dies leaves the others waiting for it inside a
collective, so the first rank to fail stops the rest, and the attempt ends with that rank's exit
status, classified once by the policy like any worker's. `WorkerGang` gives the runner the parts of
Popen it uses (pid, poll, wait), so the follow loop, the hang check and the stop path stay one.

Started here (exec'd, each with its rank, the group's size and the rendezvous address in its environment:
protocol.stages.CP_RANK_ENV and its neighbours), never by the fork server, whose children inherit no
per-process environment.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from protocol.stages import CP_ADDRESS_ENV, CP_RANK_ENV, CP_SIZE_ENV

# How often `wait` looks at the members.
WAIT_POLL_S = 0.05
# The rendezvous of a gang is on this host's loopback (all ranks of a lane run on one host).
RENDEZVOUS_HOST = "127.0.0.1"


class WorkerGang:
    """The ranks of one attempt; `pid` is rank 0's (the one recorded in job.json)."""

    def __init__(
        self, members: list[subprocess.Popen[bytes]], stop_member: Callable[[subprocess.Popen[bytes]], int]
    ) -> None:
        self.members = members
        self.stop_member = stop_member
        self.first_failure: int | None = None  #: the exit status of the rank that failed first on its own

    @property
    def pid(self) -> int:
        return self.members[0].pid

    def poll(self) -> int | None:
        """None while any rank runs and none failed; else the attempt's exit status (0 when all exited 0).

        A failed rank stops the others at once: they would wait for it in their next collective."""
        if self.first_failure is not None:
            return self.first_failure if all(member.poll() is not None for member in self.members) else None
        codes = [member.poll() for member in self.members]
        failed = next((code for code in codes if code not in (None, 0)), None)
        if failed is not None:
            self.first_failure = failed
            self.stop()
            return failed
        return 0 if all(code == 0 for code in codes) else None

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while (code := self.poll()) is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired([member.args for member in self.members], timeout or 0.0)
            time.sleep(WAIT_POLL_S)
        return code

    def stop(self) -> int:
        """Stop every rank still running; the attempt's exit status (the first failure's, else rank 0's)."""
        codes = [self.stop_member(member) for member in self.members]
        if self.first_failure is None:
            self.first_failure = next((code for code in codes if code != 0), None)
        return self.first_failure if self.first_failure is not None else codes[0]


def free_port() -> int:
    """A TCP port free on the loopback now, for a gang's rendezvous (taken by rank 0's store moments later)."""
    with socket.socket() as probe:
        probe.bind((RENDEZVOUS_HOST, 0))
        return probe.getsockname()[1]


def rank_threads(lane_threads: int | None, ranks: int) -> int | None:
    """CPU threads of each rank: the lane's share split between its ranks (the ranks of a CPU gang run at
    once on the same cores); None leaves torch's default where the user set OMP_NUM_THREADS."""
    if lane_threads is not None:
        return max(1, lane_threads // ranks)
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    return max(1, len(os.sched_getaffinity(0)) // ranks)


def rank_log(log_path: Path, rank: int) -> Path:
    """Rank `rank`'s log beside the attempt's (rank 0 writes the attempt's log itself)."""
    return log_path if rank == 0 else log_path.with_name(f"{log_path.stem}.rank{rank}{log_path.suffix}")


def start_gang(
    module: str,
    args: list[str],
    log_path: Path,
    ranks: int,
    environment: Callable[[int | None], dict[str, str]],
    lane_threads: int | None,
    stop_member: Callable[[subprocess.Popen[bytes]], int],
) -> WorkerGang:
    """Exec `ranks` workers of `module` with the same arguments, each with its rank in its environment.

    `environment(threads)` is a worker's environment with `threads` CPU threads (the lane's device(s)
    included); each rank gets its share of the lane's threads."""
    port = free_port()
    threads = rank_threads(lane_threads, ranks)
    members: list[subprocess.Popen[bytes]] = []
    try:
        for rank in range(ranks):
            group = {CP_RANK_ENV: str(rank), CP_SIZE_ENV: str(ranks), CP_ADDRESS_ENV: f"{RENDEZVOUS_HOST}:{port}"}
            with rank_log(log_path, rank).open("ab") as log_file:
                members.append(
                    subprocess.Popen(
                        [sys.executable, "-m", module, *args],
                        stdout=log_file,
                        stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL,
                        start_new_session=True,
                        env={**environment(threads), **group},
                    )
                )
    except BaseException:
        for member in members:
            stop_member(member)
        raise
    return WorkerGang(members, stop_member)
