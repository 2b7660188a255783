"""What the CLI prints for a person on stderr: notices and the one error line.

Kept apart from the commands so every command module prints the same way.
"""

from __future__ import annotations

import sys


def notice(message: str) -> None:
    sys.stderr.write(f"ltx2: {message}\n")


def fail(message: str, code: int) -> int:
    """Print an error line for the user; returns the exit code to use."""
    sys.stderr.write(f"ltx2: error: {message}\n")
    return int(code)
