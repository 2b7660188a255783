"""API keys of the HTTP gateway: made once by `ltx2 keys --http NAME`, kept only as SHA-256 hashes.

A key is 32 random bytes, so a plain SHA-256 is as good as a slow password hash against a stolen
keys file (nothing to guess), and it keeps the check per request cheap. The file is JSON, mode 0600,
rewritten atomically under an exclusive lock so two `ltx2 keys --http` runs cannot lose a key; the
gateway re-reads it when it changes, so a new key works without a restart.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import hmac
import json
import os
import re
import secrets
import threading
from collections.abc import Iterator
from pathlib import Path

from protocol.files import publish

KEY_PREFIX = "ltx2-"
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
FILE_MODE = 0o600


class KeyFileError(ValueError):
    """A key name is invalid or taken, or the keys file is unreadable."""


def hash_key(key: str) -> str:
    """The stored form of a key (and the owner id of its jobs)."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def read_keys(path: Path) -> dict[str, dict[str, str]]:
    """name -> {"sha256", "created"}; an absent file is no keys."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise KeyFileError(f"cannot read the HTTP keys file {path}: {exc}") from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) and "sha256" in v for v in data.values()):
        raise KeyFileError(f"{path} is not an ltx2 HTTP keys file")
    return data


def create_key(path: Path, name: str) -> str:
    """Add a key called `name`; returns the key itself, which is stored nowhere."""
    if not NAME_PATTERN.fullmatch(name):
        raise KeyFileError(f"--http: key name must match {NAME_PATTERN.pattern}; got {name!r}")
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    with _locked(path):
        keys = read_keys(path)
        if name in keys:
            raise KeyFileError(f"--http: a key named {name!r} already exists in {path}")
        keys[name] = {"sha256": hash_key(key), "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}
        temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
        with os.fdopen(fd, "w") as handle:
            json.dump(keys, handle, indent=2)
        publish(temp, path)  # fsync, rename, fsync the folder: a crash keeps the old file or the new
    return key


class KeyRing:
    """The gateway's view of the keys file, re-read whenever the file changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._hashes: dict[str, str] = {}  # sha256 -> name

    def _refresh(self) -> None:
        try:
            stat = self.path.stat()
            stamp = (stat.st_mtime_ns, stat.st_ino)
        except FileNotFoundError:
            stamp = None
        with self._lock:
            if stamp != self._stamp:
                keys = read_keys(self.path) if stamp else {}
                self._hashes = {entry["sha256"]: name for name, entry in keys.items()}
                self._stamp = stamp

    def name_of(self, owner: str) -> str | None:
        """The name of the key whose hash is `owner` (None once its entry left the file)."""
        self._refresh()
        return self._hashes.get(owner)

    def owner_of(self, key: str) -> str | None:
        """The key's hash if it is a known key, else None (compared in constant time)."""
        self._refresh()
        digest = hash_key(key)
        for known in self._hashes:
            if hmac.compare_digest(known, digest):
                return known
        return None
