"""Exit codes of stage workers and how the orchestrator classifies a finished process.

The table lives here, in the torch-free protocol package, so a worker (which raises) and the
orchestrator (which reads return codes) share it without importing each other.
"""

from __future__ import annotations

import enum
import errno
import signal


class ExitCode(enum.IntEnum):
    """What a stage worker's exit status means (DESIGN.md rule 3)."""

    OK = 0  #: outputs written and renamed into place
    OTHER = 1  #: any failure not listed below (a bug, a corrupt file, ...)
    INVALID_INPUT = 2  #: the job spec or an input file was rejected; retrying cannot help
    OUT_OF_MEMORY = 3  #: the accelerator ran out of memory (torch.OutOfMemoryError)
    MODEL_NOT_FOUND = 4  #: a model or LoRA is missing from the local cache; retrying cannot help
    NO_SPACE = 5  #: a disk is full (OSError ENOSPC); retrying or using less memory cannot help
    ENVIRONMENT = 6  #: the worker could not start its work here (import error, CUDA unusable); not retried
    INTERRUPTED = 130  #: the CLI was stopped by Ctrl-C/SIGTERM (128 + SIGINT, the shell's convention)


class Failure(enum.Enum):
    """Why a stage attempt failed, as the retry policy sees it."""

    INVALID_INPUT = "invalid_input"  #: exit 2
    CUDA_OOM = "cuda_oom"  #: exit 3
    MODEL_NOT_FOUND = "model_not_found"  #: exit 4
    NO_SPACE = "no_space"  #: exit 5: a disk is full; never retried, never a lower-memory plan
    HOST_OOM = "host_oom"  #: killed by SIGKILL, which on a healthy box means the kernel's OOM killer
    CRASH = "crash"  #: exit 1, any other code, or death by another signal
    HUNG = "hung"  #: no heartbeat within the configured time; the orchestrator killed it
    CANCELLED = "cancelled"  #: stopped on request
    INTERRUPTED = "interrupted"  #: the orchestrator stopped (shutdown, Ctrl-C) or died while it ran
    ENVIRONMENT = "environment"  #: exit 6, or died before READY: the host, not the plan, is at fault

    @property
    def is_retryable(self) -> bool:
        """Bad input and missing models fail the same way every time, so they are not retried;
        a cancelled or interrupted attempt was stopped on purpose, so it is not retried now."""
        return self not in NOT_RETRIED


# A lower-memory plan cannot help these: the same input, cache, host or request fails the same way.
NOT_RETRIED = frozenset(
    {
        Failure.INVALID_INPUT,
        Failure.MODEL_NOT_FOUND,
        Failure.NO_SPACE,
        Failure.CANCELLED,
        Failure.INTERRUPTED,
        Failure.ENVIRONMENT,
    }
)


def classify_exit(returncode: int) -> Failure | None:
    """Map a `subprocess` return code (negative for signals) to a failure, or None for success."""
    if returncode == ExitCode.OK:
        return None
    if returncode == -signal.SIGKILL:
        return Failure.HOST_OOM
    by_code = {
        ExitCode.INVALID_INPUT: Failure.INVALID_INPUT,
        ExitCode.OUT_OF_MEMORY: Failure.CUDA_OOM,
        ExitCode.MODEL_NOT_FOUND: Failure.MODEL_NOT_FOUND,
        ExitCode.NO_SPACE: Failure.NO_SPACE,
        ExitCode.ENVIRONMENT: Failure.ENVIRONMENT,
    }
    return by_code.get(returncode, Failure.CRASH)


def describe_exit(returncode: int) -> str:
    """A human sentence for a return code, used in error reports."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"killed by {name}"
    try:
        return f"exit {returncode} ({ExitCode(returncode).name.lower()})"
    except ValueError:
        return f"exit {returncode}"


class StageError(Exception):
    """A failure a stage understands; its class decides the worker's exit code."""

    exit_code = ExitCode.OTHER


class InvalidInput(StageError):
    """The spec or an input file is unusable (a stale latents file, an unreadable image...)."""

    exit_code = ExitCode.INVALID_INPUT


class EnvironmentFailure(StageError):
    """This host cannot run the stage at all (a module fails to import, CUDA cannot be used)."""

    exit_code = ExitCode.ENVIRONMENT


class ModelNotFound(StageError):
    """A model or LoRA is not in the local cache or folder; `field` is the spec field to change."""

    exit_code = ExitCode.MODEL_NOT_FOUND
    field = "model"


class LoraNotFound(ModelNotFound):
    """A LoRA is not in the local cache or folder: the same exit code, but `--lora` is what to change."""

    field = "lora"


# errno values of a full disk: no blocks left, or the user's quota spent (a quota is a disk that is
# full for this user; a smaller plan cannot help either).
NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
# How writers that do not raise OSError say the same: safetensors' Rust I/O error ("No space left on
# device (os error 28)"), torch's and libraries' wrapped messages.
NO_SPACE_TEXTS = ("No space left on device", "Disk quota exceeded", "(os error 28)", "(os error 122)", "[Errno 28]")


def is_no_space(exc: BaseException) -> bool:
    """Whether `exc`, or an exception it was raised from, says a disk is full.

    Not only OSError(ENOSPC): safetensors raises SafetensorError("... No space left on device (os
    error 28)"), and libraries re-raise I/O errors as RuntimeError with the cause chained or quoted.
    Every writer of a stage's files goes through this test, so a full state dir is exit 5 (no retry)
    whoever noticed it.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in NO_SPACE_ERRNOS:
            return True
        if any(text in str(current) for text in NO_SPACE_TEXTS):
            return True
        current = current.__cause__ or current.__context__
    return False
