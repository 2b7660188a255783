"""How the orchestrator reads a worker's end from its return code."""

from __future__ import annotations

import signal

import pytest

from protocol.errors import ExitCode, Failure, classify_exit, describe_exit


@pytest.mark.parametrize(
    ("returncode", "failure"),
    [
        (0, None),
        (ExitCode.INVALID_INPUT, Failure.INVALID_INPUT),
        (ExitCode.OUT_OF_MEMORY, Failure.CUDA_OOM),
        (ExitCode.MODEL_NOT_FOUND, Failure.MODEL_NOT_FOUND),
        (ExitCode.OTHER, Failure.CRASH),
        (-signal.SIGKILL, Failure.HOST_OOM),
        (-signal.SIGSEGV, Failure.CRASH),
        (77, Failure.CRASH),
    ],
)
def test_return_codes_map_to_failures(returncode: int, failure: Failure | None):
    assert classify_exit(returncode) is failure


def test_invalid_input_and_missing_models_are_not_retried():
    assert not Failure.INVALID_INPUT.is_retryable
    assert not Failure.MODEL_NOT_FOUND.is_retryable
    assert Failure.CUDA_OOM.is_retryable and Failure.HOST_OOM.is_retryable and Failure.CRASH.is_retryable


def test_descriptions_name_signals_and_codes():
    assert describe_exit(-signal.SIGKILL) == "killed by SIGKILL"
    assert describe_exit(3) == "exit 3 (out_of_memory)"
