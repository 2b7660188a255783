"""Where the ~68 GB of bf16 weights can go: file systems, free space, host RAM, and the plan.

It exists because the lent machines differ in disk and RAM: the builder has to pick a folder that
is not a tmpfs, fall back to a tmpfs for components that do not fit on disk (within what the
single-process baseline leaves of host memory), and record a deviation when even that is too
little. Standard library only.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

from gpu_common import GIB, log


def mounts() -> list[tuple[str, str]]:
    """(mount point, file system type) of every mount, from /proc/mounts."""
    try:
        rows = [line.split() for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return []
    return [(row[1], row[2]) for row in rows if len(row) >= 3]


def fs_type(path: Path) -> str:
    """The type of the file system holding `path` (the longest mount point above it)."""
    best, kind = "", "?"
    resolved = str(path.resolve())
    for mount_point, fstype in mounts():
        if (resolved == mount_point or resolved.startswith(mount_point.rstrip("/") + "/")) and len(mount_point) > len(
            best
        ):
            best, kind = mount_point, fstype
    return kind


def fs_free(path: Path) -> int:
    """Bytes an unprivileged writer may still put on the file system holding `path`."""
    stat = os.statvfs(path)
    return stat.f_bavail * stat.f_frsize


def storage_report() -> dict[str, Any]:
    """Free space and type of the usual folders, for the results file."""
    report = {}
    for name in ("/", "/tmp", "/dev/shm", "/var/tmp", "/root", "/mnt"):
        path = Path(name)
        if path.is_dir():
            try:
                report[name] = {"free_gib": round(fs_free(path) / GIB, 2), "fstype": fs_type(path)}
            except OSError as exc:
                report[name] = {"error": str(exc)}
    return report


ROOT_CANDIDATES = ("/tmp", "/var/tmp", "/root", "/home", "/opt", "/srv", "/mnt", "/workspace", "/data", "/scratch")
# bf16 bytes of the full-size LTX-2.0 folder (33.83 B parameters), for choosing where it goes.
FULL_MODEL_BYTES = 67.7e9


def choose_root(requested: str, name: str = "ltx2-full") -> Path:
    """`auto`: a finished folder from an earlier call on this machine, else the writable
    non-tmpfs folder with the most free space (a tmpfs would hold ~68 GB of weights in RAM)."""
    if requested != "auto":
        return Path(requested)
    usable = []
    for candidate in ROOT_CANDIDATES:
        folder = Path(candidate)
        if (folder / name / "BUILD_OK").is_file():
            return folder / name
        if folder.is_dir() and os.access(folder, os.W_OK) and fs_type(folder) not in ("tmpfs", "ramfs", "overlay-ro"):
            try:
                usable.append((fs_free(folder), candidate))
            except OSError:
                continue
    best = max(usable) if usable else (0, "/tmp")
    return Path(best[1]) / name


def mem_total_bytes() -> int:
    """MemTotal of /proc/meminfo in bytes."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    return 0


def ram_dir(needed: int) -> Path | None:
    """A tmpfs folder with room for `needed` bytes: /dev/shm, else a tmpfs we mount (root only)."""
    shm = Path("/dev/shm")
    if shm.is_dir() and fs_type(shm) == "tmpfs" and fs_free(shm) >= needed + GIB:
        path = shm / "ltx2-bench"
        path.mkdir(exist_ok=True)
        return path
    target = Path("/mnt/ltx2-bench-ram")
    if os.geteuid() != 0:
        return None
    target.mkdir(parents=True, exist_ok=True)
    if fs_type(target) != "tmpfs":
        size_gib = int(needed / GIB) + 2
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size_gib}g", "tmpfs", str(target)],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            log(f"could not mount a tmpfs: {result.stderr.strip()}")
            return None
    return target if fs_free(target) >= needed else None


def place_largest_first(sizes: dict[str, int], disk_left: int, ram_left: int) -> tuple[dict[str, str], int, int]:
    """Each component, largest first, on the disk if it fits, else in RAM if that fits, else "none";
    returns the placement and the disk and RAM bytes left."""
    placement: dict[str, str] = {}
    for name in sorted(sizes, key=lambda n: -sizes[n]):
        if sizes[name] <= disk_left:
            placement[name], disk_left = "disk", disk_left - sizes[name]
        elif sizes[name] <= ram_left:
            placement[name], ram_left = "ram", ram_left - sizes[name]
        else:
            placement[name] = "none"
    return placement, disk_left, ram_left


def plan_storage(
    root: Path, sizes: dict[str, int], te_fixed: int, te_per_layer: int, te_layers: int, host_ram: int
) -> dict[str, Any]:
    """Place each component on the disk holding `root` or, if that is full, on a tmpfs.

    A tmpfs holds its files in RAM, and the single-process baseline holds every component in host
    memory once while loading (~63 GiB at full size), so at most host_ram - 80 GiB goes there.
    When even that is too little, the text encoder gets fewer layers (a recorded deviation).
    """
    margin = 3 * GIB
    disk_free = fs_free(root) - margin
    ram_budget = max(0, host_ram - 80 * GIB)
    if fs_type(root) == "tmpfs":
        ram_budget, disk_free = 0, min(disk_free, max(0, host_ram - 80 * GIB))
    placement, disk_left, ram_left = place_largest_first(sizes, disk_free, ram_budget)
    layers = te_layers
    if placement.get("text_encoder") == "none":
        room = max(disk_left, ram_left)
        layers = max(0, min(te_layers, (room - te_fixed) // te_per_layer)) if room > te_fixed else 0
        where = "disk" if disk_left >= ram_left else "ram"
        placement["text_encoder"] = where if layers >= 1 else "none"
    missing = [name for name, where in placement.items() if where == "none"]
    return {
        "placement": placement,
        "text_encoder_layers": layers,
        "disk_free_bytes": disk_free + margin,
        "ram_budget_bytes": ram_budget,
        "missing": missing,
    }
