"""services/gc_pauses.py: the worker names the garbage collector's long pauses in its log."""

from __future__ import annotations

import gc
import logging
import subprocess
import sys
from pathlib import Path

from services import gc_pauses

ROOT = Path(__file__).resolve().parents[1]


def collect_cycles(count: int) -> None:
    """`count` self-referencing lists made garbage, then one full collection (none before it)."""
    gc.disable()
    try:
        cycles: list[list] = [[] for _ in range(count)]
        for cycle in cycles:
            cycle.append(cycle)
        del cycles
    finally:
        gc.enable()
    gc.collect()


def watched_collection(count: int, threshold_s: float, monkeypatch, caplog) -> gc_pauses.PauseWatch:
    """collect_cycles(count) with the watch installed, logging pauses of `threshold_s` or more; the watch after."""
    monkeypatch.setattr(gc_pauses, "LOGGED_PAUSE_S", threshold_s)
    watch = gc_pauses.watch()
    try:
        with caplog.at_level(logging.INFO, logger="ltx2.worker"):
            collect_cycles(count)
    finally:
        gc.callbacks.remove(watch)
    return watch


def test_a_collection_past_the_threshold_is_logged_with_what_it_collected(monkeypatch, caplog):
    watch = watched_collection(50_000, 0.0, monkeypatch, caplog)
    assert any(generation == 2 and collected >= 50_000 for generation, _, collected in watch.pauses), watch.pauses
    assert "gc: a generation-2 collection paused this process" in caplog.text


def test_shorter_collections_are_not_logged(monkeypatch, caplog):
    watch = watched_collection(1_000, 60.0, monkeypatch, caplog)
    assert watch.pauses == [] and "gc:" not in caplog.text


def test_freezing_takes_the_imports_out_of_every_full_collection():
    """In a fresh process that imported torch: the collector's generations shrink to a few objects and stay so."""
    code = (
        "import gc, sys, torch\n"
        "from services import gc_pauses\n"
        "before = len(gc.get_objects())\n"
        "frozen = gc_pauses.freeze_imports()\n"
        "gc.collect()\n"
        "sys.stdout.write(f'{before} {frozen} {len(gc.get_objects())}')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    before, frozen, after = (int(word) for word in result.stdout.split())
    assert before > 100_000 and frozen >= before and after < before // 100, (before, frozen, after)
