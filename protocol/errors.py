"""The one failure vocabulary: how a worker's exception becomes its exit code, how an exit code
becomes a `Failure`, and what each failure means to the retry policy.

Every classification lives here, in the torch-free protocol package, so a worker (which raises:
`exit_code_of`) and the orchestrator (which reads return codes: `classify_exit`) share it without
importing each other. From there the same `Failure` value is an attempt's result in job.json
(orchestrator.run.states.AttemptResult is built from it), the job's `failure` when the policy ends it,
the CLI's exit code (orchestrator.cli) and the `failure` of the HTTP error (orchestrator.gateway.app).
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


class Failure(enum.StrEnum):
    """Why a stage attempt, or a job's run, failed, as the retry policy sees it."""

    INVALID_INPUT = "invalid_input"  #: exit 2: the spec or an input file is unusable; never retried
    CUDA_OOM = "cuda_oom"  #: exit 3: the accelerator ran out of memory; the next plan uses less
    MODEL_NOT_FOUND = "model_not_found"  #: exit 4: a model or LoRA is not cached; never retried
    NO_SPACE = "no_space"  #: exit 5: a disk was full (ENOSPC); never retried, the plan is never lowered
    HOST_OOM = "host_oom"  #: killed by SIGKILL (the kernel's OOM killer on a healthy box, or its fork server died)
    CRASH = "crash"  #: exit 1, another code or signal, or exit 0 without the outputs
    HUNG = "hung"  #: silent for longer than `hung_after_s`; the orchestrator killed it
    CANCELLED = "cancelled"  #: a person cancelled the job; the orchestrator stopped the worker
    INTERRUPTED = "interrupted"  #: the orchestrator stopped (shutdown, Ctrl-C) or died during it
    ENVIRONMENT = "environment"  #: exit 6, or the worker died before READY (import error, CUDA unusable)
    INTERNAL = "internal"  #: the orchestrator itself failed on the job (a bug; the daemon's log has the traceback)

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
        Failure.INTERNAL,
    }
)


# The exit status of a CLI command whose job ended with a failure (`generate`, `decode`, `watch`): the
# worker's own code where it has one, OUT_OF_MEMORY for either memory, OTHER for the rest.
CLI_EXIT_CODES = {
    Failure.INVALID_INPUT: ExitCode.INVALID_INPUT,
    Failure.CUDA_OOM: ExitCode.OUT_OF_MEMORY,
    Failure.HOST_OOM: ExitCode.OUT_OF_MEMORY,
    Failure.MODEL_NOT_FOUND: ExitCode.MODEL_NOT_FOUND,
    Failure.NO_SPACE: ExitCode.NO_SPACE,
    Failure.ENVIRONMENT: ExitCode.ENVIRONMENT,
}


def cli_exit_code(failure: str | None) -> ExitCode:
    """The CLI's exit status for a job that ended with `failure` (a Failure or its value as job.json and
    the daemon carry it; None or unknown, as for jobs ended before it was recorded: OTHER)."""
    known = Failure._value2member_map_.get(failure) if failure else None
    return CLI_EXIT_CODES.get(known, ExitCode.OTHER)  # type: ignore[arg-type]


def classify_exit(returncode: int, ready: bool = True) -> Failure | None:
    """Map a worker's return code (negative for signals) to a failure, or None for success.

    `ready`: the worker had said READY (its imports worked). One that exited with an unexplained
    error before that could not start here at all (an import error, CUDA unusable), which no plan of
    the stage can help: ENVIRONMENT rather than CRASH.
    """
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
    failure = by_code.get(returncode, Failure.CRASH)
    return Failure.ENVIRONMENT if failure is Failure.CRASH and returncode > 0 and not ready else failure


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


# torch's error when a process forked after CUDA was initialised touches CUDA: the fork server's
# imports initialised it (DESIGN.md rule 10); no plan of this stage can succeed in this process.
FORKED_CUDA_ERROR = "Cannot re-initialize CUDA in forked subprocess"


def exit_code_of(exc: BaseException) -> ExitCode:
    """The exit code a worker that raised `exc` ends with (CUDA OOM recognised without importing torch).

    A StageError says its own; a full disk is NO_SPACE whoever raised it (is_no_space); an import
    error or a forked process touching CUDA is ENVIRONMENT; torch's OutOfMemoryError, or an error
    quoting CUDA's out-of-memory message (some libraries re-raise it as RuntimeError), is OUT_OF_MEMORY.
    """
    if isinstance(exc, StageError):
        return exc.exit_code
    if is_no_space(exc):
        return ExitCode.NO_SPACE
    if isinstance(exc, ImportError) or FORKED_CUDA_ERROR in str(exc):
        return ExitCode.ENVIRONMENT
    if type(exc).__name__ == "OutOfMemoryError" or "CUDA out of memory" in str(exc):
        return ExitCode.OUT_OF_MEMORY
    return ExitCode.OTHER


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
