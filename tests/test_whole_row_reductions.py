"""`[worker] whole_row_reductions` (issue 28, faster on one GPU): Inductor's row reductions up to 4,096 values keep
the row in registers. Only CUDA's Triton code generation asks the question the handler answers, so on this
machine what is checked is everything around it: the plan that asks for it, the handler a compile gets and gives
back, the cache folder of its own, and the job that passes the plan to the compile. What it does to the kernels
is counted on a GPU (bench/row_kernels_bench.py's `wholerows` variant: persistent and looped reductions)."""

from __future__ import annotations

import dataclasses
import logging
import os
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sympy
import torch
from test_loras import encode_job
from torch._inductor import config as inductor_config
from torch._inductor.choices import InductorChoices
from torch._inductor.runtime.cache_dir_utils import default_cache_dir
from torch._inductor.runtime.hints import ReductionHint
from torch._inductor.sizevars import SizeVarAllocator
from torch._inductor.virtualized import V

from config.settings import ConfigError, load_settings
from orchestrator.run.policy import Attempt, initial_plan, next_plan
from protocol.errors import Failure
from protocol.files import Stage
from protocol.spec import JobSpec
from services import model_loading, whole_row_reductions
from services.whole_row_reductions import CACHE_FOLDER, WHOLE_ROW_LIMIT, WholeRowChoices


class SomeoneElsesChoices(InductorChoices):
    """A handler installed by someone else (torch's own on ROCm, a user's)."""

    def uuid(self) -> str:
        """Its part of Inductor's cache key."""
        return "someone-else"


@dataclasses.dataclass
class Reduction:
    """What Inductor hands the handler about a kernel's reduction (what SIMDKernelFeatures answers it and
    Inductor's own rule): its shape, its values per row and its rows."""

    hint: ReductionHint
    reduction_numel: sympy.Expr
    numel: sympy.Expr = sympy.Integer(32640)  # rows: LTX-2.3's 1080p stage-2 tokens

    def get_reduction_hint(self) -> ReductionHint:
        """The reduction's shape: INNER for a reduction over each row's contiguous values."""
        return self.hint


@pytest.fixture(autouse=True)
def inductor_as_it_was(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test leaves Inductor's handler, its config and the cache variable as they were."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", os.environ.get("TORCHINDUCTOR_CACHE_DIR", "/nonexistent"))
    monkeypatch.delenv("LTX2_COMPILE_CACHE_DIR", raising=False)
    factory, deterministic = inductor_config.inductor_choices_class, inductor_config.deterministic
    yield
    inductor_config.inductor_choices_class, inductor_config.deterministic = factory, deterministic
    V.set_choices_handler(factory() if factory is not None else InductorChoices())


def test_the_plan_asks_for_whole_rows_with_compile_and_drops_them_below_the_top_rung():
    on = load_settings(environ={"HOME": "/nonexistent", "LTX2_WHOLE_ROW_REDUCTIONS": "true"})
    off = load_settings(environ={"HOME": "/nonexistent"})
    assert not off.whole_row_reductions  # off until measured on a GPU
    spec = JobSpec.from_dict(
        {"prompt": "p", "model": "m", "width": 64, "height": 64, "num_frames": 9, "steps": 8, "seed": 1}
    ).with_changes(fp8_matmul=True, compile=True)
    plan = initial_plan(Stage.ENCODE_DIFFUSE, spec, on)
    assert plan["row_reductions"] == "whole" and plan["compile"] == "regional"
    lower = next_plan(Stage.ENCODE_DIFFUSE, [Attempt(plan, Failure.CUDA_OOM)], spec, on)
    assert lower is not None and "compile" not in lower and "row_reductions" not in lower  # eager below the top
    assert "row_reductions" not in initial_plan(Stage.ENCODE_DIFFUSE, spec, off)
    assert "row_reductions" not in initial_plan(Stage.ENCODE_DIFFUSE, spec.with_changes(compile=False), on)
    with pytest.raises(ConfigError, match="LTX2_WHOLE_ROW_REDUCTIONS: expected true or false"):
        load_settings(environ={"HOME": "/nonexistent", "LTX2_WHOLE_ROW_REDUCTIONS": "wide"})


def test_rows_up_to_the_limit_stay_in_registers_and_every_other_reduction_is_inductors_to_decide():
    decide = WholeRowChoices.should_use_persistent_reduction
    with V.set_graph_handler(types.SimpleNamespace(sizevars=SizeVarAllocator())):
        for width in (2048, WHOLE_ROW_LIMIT):  # LTX-2's audio and video rows: above Inductor's 1,024
            row = Reduction(ReductionHint.INNER, sympy.Integer(width))
            assert decide(row, False) and decide(features=row, cooperative_reduction=False), width
            assert not InductorChoices.should_use_persistent_reduction(row, False), width  # what it replaces
        for other in (
            Reduction(ReductionHint.INNER, sympy.Integer(2 * WHOLE_ROW_LIMIT)),  # wider than the limit
            Reduction(ReductionHint.OUTER, sympy.Integer(WHOLE_ROW_LIMIT)),  # not a row
            Reduction(ReductionHint.INNER, sympy.Symbol("s0", positive=True, integer=True)),  # a size not known
        ):
            assert decide(other, False) == InductorChoices.should_use_persistent_reduction(other, False), other
        row = Reduction(ReductionHint.INNER, sympy.Integer(WHOLE_ROW_LIMIT))
        assert decide(row, True) == InductorChoices.should_use_persistent_reduction(row, True)  # a split one


def test_a_compile_gets_the_handler_and_gives_it_back_leaving_someone_elses_alone(caplog: pytest.LogCaptureFixture):
    assert whole_row_reductions.choose_row_reductions(True)
    assert isinstance(V.choices, WholeRowChoices) and inductor_config.inductor_choices_class is WholeRowChoices
    # What Inductor's caches key on (torch versions that key on the handler): the rule's own digest.
    assert inductor_config.save_config_portable()["inductor_choices_class"] == f"ltx2-{CACHE_FOLDER}"
    assert CACHE_FOLDER == f"whole-rows-{WHOLE_ROW_LIMIT}-{whole_row_reductions.rule_digest()}"
    assert not whole_row_reductions.choose_row_reductions(False)
    assert type(V.choices) is InductorChoices and inductor_config.inductor_choices_class is None
    inductor_config.inductor_choices_class = SomeoneElsesChoices
    V.set_choices_handler(SomeoneElsesChoices())
    assert not whole_row_reductions.choose_row_reductions(True)  # never replaces another's, and says so
    assert "whole_row_reductions not used" in caplog.text
    whole_row_reductions.choose_row_reductions(False)
    assert type(V.choices) is SomeoneElsesChoices and inductor_config.inductor_choices_class is SomeoneElsesChoices


def test_whole_row_kernels_go_to_a_cache_folder_of_their_own(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.INFO)
    model_loading.prepare_inductor(tmp_path / "cache", True, torch.device("cpu"), whole_rows=True)
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "cache" / CACHE_FOLDER)
    assert "row reductions of up to 4096 values keep the row in registers" in caplog.text
    assert isinstance(V.choices, WholeRowChoices)
    model_loading.prepare_inductor(tmp_path / "cache", True, torch.device("cpu"))
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "cache")
    assert not isinstance(V.choices, WholeRowChoices)
    # No cache folder given: a folder of their own under Inductor's default one.
    model_loading.prepare_inductor(None, True, torch.device("cpu"), whole_rows=True)
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(Path(default_cache_dir()) / CACHE_FOLDER)


def test_a_job_whose_plan_asks_for_whole_rows_compiles_with_them(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """The diffusion stage passes its plan's `row_reductions` to the compile (recorded here in place of the
    compile itself: what the handler changes is CUDA's code, and the CPU's compile of the job takes minutes)."""
    compiles: list[dict[str, Any]] = []

    def record(transformer: Any, cache_dir: Path | None, deterministic: bool = False, *rest: Any) -> None:
        compiles.append({"deterministic": deterministic, "rest": rest})

    monkeypatch.setattr(model_loading, "compile_blocks", record)
    encode_job(tiny_model_dir, tmp_path, "whole", None, {"LTX2_WHOLE_ROW_REDUCTIONS": "true"}, compile=True)
    encode_job(tiny_model_dir, tmp_path, "default", None, {}, compile=True)
    assert [entry["rest"][-1] for entry in compiles] == [True, False]
