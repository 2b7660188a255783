"""Which addresses the processes a test run started talk to, read from /proc while they run.

A process counts as the run's when its environment holds a marker the run set before starting it
(that finds those a parent-child walk would miss: Chromium's crash handler re-parents itself), or
when its parent counts (Chromium overwrites its children's environment block with their titles).
Each sample maps the sockets in those processes' /proc/PID/fd to the kernel's TCP and UDP tables
(/proc/PID/net/tcp, tcp6, udp, udp6 of their network namespace) and keeps every peer. A socket
that opens and closes between two samples is missed, so the watch stands beside the browser's own
switches (no background networking, a resolver that finds nothing), not instead of them.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import threading
from collections.abc import Iterable
from pathlib import Path

SAMPLE_S = 0.2
TABLES = ("tcp", "tcp6", "udp", "udp6")


@dataclasses.dataclass(frozen=True)
class Peer:
    """One connected socket of a watched process."""

    pid: int
    command: str
    table: str
    address: ipaddress.IPv4Address | ipaddress.IPv6Address
    port: int

    @property
    def is_loopback(self) -> bool:
        mapped = getattr(self.address, "ipv4_mapped", None)
        return self.address.is_loopback or bool(mapped and mapped.is_loopback)


def kernel_address(text: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
    """`0100007F:1F90` (or its 32-digit IPv6 form) as /proc/net/tcp writes it: host-order 32-bit words."""
    host, port = text.split(":")
    raw = bytes.fromhex(host)
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    return ipaddress.ip_address(words), int(port, 16)


def socket_inodes(pid: int) -> set[int]:
    inodes = set()
    try:
        for fd in os.scandir(f"/proc/{pid}/fd"):
            target = os.readlink(fd.path)
            if target.startswith("socket:["):
                inodes.add(int(target[8:-1]))
    except OSError:  # gone, or not ours to read
        pass
    return inodes


#: The kernel's thread creator: it and its children (kernel threads) have no environment, for good.
KTHREADD = 2


def command_of(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


class NetworkWatch:
    """Samples the peers of every process whose environment holds `marker` (NAME=value)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker.encode()
        self.pids: set[int] = set()  #: every watched process seen
        self.commands: set[str] = set()
        self.peers: set[Peer] = set()  #: every connected socket seen
        self.samples = 0
        #: (pid, command) of processes seen without the marker: a pid is looked at again once it exec'd,
        #: since a child caught between fork and exec still shows its parent's environment, not its own
        self._others: set[tuple[int, str]] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="network-watch", daemon=True)

    @property
    def outside(self) -> list[Peer]:
        """The peers that are neither loopback nor unconnected."""
        return sorted((peer for peer in self.peers if not peer.is_loopback), key=str)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            self.sample()

    def marked(self) -> set[int]:
        """The running processes that carry the marker, or whose parent is watched (Chromium rewrites
        its children's environment block when it sets their titles); others are remembered and skipped."""
        parents, commands = {}, {}
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit() or int(entry.name) in self.pids:
                continue
            pid = int(entry.name)
            commands[pid] = command_of(pid)
            if (pid, commands[pid]) in self._others:
                continue
            try:
                environ = Path(entry.path, "environ").read_bytes().split(b"\0")
                parent = int(Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            if self.marker in environ:
                self.pids.add(pid)
            elif environ != [b""] or KTHREADD in (pid, parent):
                parents[pid] = parent
            # Else an empty environment of a process, not a kernel thread: it is inside its exec, which names it
            # (comm) before it fills the new image's environment. Remembered now as unmarked under its final
            # name, it would never be looked at again (a CI run lost chromedriver so): it is read next sample.
        while adopted := [pid for pid, parent in parents.items() if parent in self.pids]:
            for pid in adopted:
                self.pids.add(pid)
                del parents[pid]
        self._others.update((pid, commands[pid]) for pid in parents)
        return {pid for pid in self.pids if Path(f"/proc/{pid}").exists()}

    def sample(self) -> None:
        """One look at every watched process's sockets."""
        owners = {}
        for pid in self.marked():
            self.commands.add(command_of(pid))
            owners.update(dict.fromkeys(socket_inodes(pid), pid))
        for namespace_pid in self.namespaces(owners.values()):
            for table in TABLES:
                self.read_table(Path(f"/proc/{namespace_pid}/net/{table}"), table, owners)
        self.samples += 1

    @staticmethod
    def namespaces(pids: Iterable[int]) -> list[int]:
        """One process per network namespace among `pids` (each namespace has its own tables)."""
        chosen: dict[str, int] = {}
        for pid in pids:
            try:
                chosen.setdefault(os.readlink(f"/proc/{pid}/ns/net"), pid)
            except OSError:
                continue
        return list(chosen.values())

    def read_table(self, path: Path, table: str, owners: dict[int, int]) -> None:
        try:
            lines = path.read_text().splitlines()[1:]
        except OSError:
            return
        for line in lines:
            fields = line.split()
            inode = int(fields[9])
            if inode not in owners:
                continue
            address, port = kernel_address(fields[2])
            if port == 0 and address.is_unspecified:  # listening, or an unconnected UDP socket
                continue
            self.peers.add(Peer(owners[inode], command_of(owners[inode]), table, address, port))
