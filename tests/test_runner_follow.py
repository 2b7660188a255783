"""How the runner waits for a worker's exit: in short steps and without a drain once the worker has
settled every job it was given, so the next stage starts as soon as the process is gone."""

from __future__ import annotations

from orchestrator.run.runner import DRAIN_MS, POLL_MS, SETTLED_POLL_MS, follow_until_exit


class ExitsAfter:
    """A process that is still running for `polls` polls, then has exited 0."""

    def __init__(self, polls: int) -> None:
        self.left = polls

    def poll(self) -> int | None:
        self.left -= 1
        return None if self.left >= 0 else 0


def waits_of(settled: bool, polls: int = 3) -> list[int]:
    """The timeouts the follow loop handed to `pump` (which hears nothing) for a worker that exits
    after `polls` polls, having settled every job (`settled`) or not."""
    waits: list[int] = []

    def pump(timeout_ms: int) -> bool:
        waits.append(timeout_ms)
        return False

    returncode, forced = follow_until_exit(
        ExitsAfter(polls), pump, lambda: float("inf"), lambda: None, 60.0, lambda: settled
    )
    assert (returncode, forced) == (0, None)
    return waits


def test_a_worker_that_settled_every_job_is_awaited_in_short_steps_and_not_drained():
    assert waits_of(settled=True) == [SETTLED_POLL_MS] * 3 + [0]


def test_a_worker_that_exits_before_settling_is_drained_for_its_last_messages():
    assert waits_of(settled=False) == [POLL_MS] * 3 + [DRAIN_MS]
