"""The uploads dir: each gateway process stores its uploads in a folder of its own, which it locks.

An upload lives for one create: stored, handed to the daemon (which copies it into the job) and
removed. A gateway killed in between leaves it behind, and nothing else would ever remove it. So a
gateway sweeps at start what no running gateway holds: every folder whose lock (a `flock` on the
folder itself, released by the kernel when its process dies, however it dies) it can take. Two
gateways on one state dir never sweep each other's uploads.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import shutil
import tempfile
from pathlib import Path

FOLDER_MODE = 0o700


class UploadDir:
    """This process's locked folder inside `root`, after sweeping the folders of dead gateways."""

    def __init__(self, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True, mode=FOLDER_MODE)
        self.root = root
        sweep(root)
        self.folder, self._lock = claim_folder(root)

    def store(self, data: bytes, suffix: str) -> Path:
        """Write an upload under a name the gateway makes (never the client's)."""
        path = self.folder / f"{secrets.token_hex(16)}.{suffix}"
        with path.open("xb") as handle:
            handle.write(data)
        path.chmod(0o600)
        return path

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
        os.close(self._lock)


def claim_folder(root: Path) -> tuple[Path, int]:
    """A new folder in `root`, locked before it gets its final name, so no sweep ever sees it unlocked.

    A sweep may still take a staging folder in the instant before its lock; then that folder is gone
    and another is made.
    """
    while True:
        staging = Path(tempfile.mkdtemp(prefix=".new-", dir=root))
        try:
            lock = os.open(staging, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:
            continue
        fcntl.flock(lock, fcntl.LOCK_EX)
        final = root / staging.name.removeprefix(".new-")
        try:
            staging.rename(final)
        except FileNotFoundError:
            os.close(lock)
            continue
        return final, lock


def sweep(root: Path) -> None:
    """Remove what no live gateway holds: unlocked folders and loose files (uploads of older versions)."""
    for entry in root.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            with contextlib.suppress(FileNotFoundError):
                remove_if_unlocked(entry)
        else:
            entry.unlink(missing_ok=True)


def remove_if_unlocked(folder: Path) -> None:
    lock = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:  # a running gateway's
        return
    else:
        shutil.rmtree(folder, ignore_errors=True)
    finally:
        os.close(lock)
