"""`[worker] whole_row_reductions`: Inductor keeps each row of a compiled row reduction in registers (one read per
row) for rows up to WHOLE_ROW_LIMIT values, where by default it does so only up to 1,024.

Why. Most of a transformer block's fused elementwise kernels end in a reduction over a token's row: the RMS norms
before each attention and the feed-forward (fused with the AdaLN modulation and, with `--fp8-matmul`, the FP8 row
quantisation of the next matmul's input: the row's maximum, then the scaled cast), and the query's and key's RMS
norms across heads. LTX-2's video rows are 4,096 wide (its audio rows 2,048). Above 1,024 values Inductor emits a
"looped" reduction that walks the row once per reduction and once more for the output, so a norm with its
modulation and quantisation reads each row three times: on an H100 those kernels took 71.6 ms of
a 2,257 ms 1080p stage-2 step (docs/benchmarks.md, version 19); one read per row is what this aims at (what it
saved on a GPU: below). Inductor's own persistent form (the row in registers) is what it already generates
for these widths when its multi-kernel mode is on; that mode picks between the two forms by timing them on the
device, which DESIGN.md rule 6 forbids (a pick by timing can change the bits from run to run). Here the pick is
fixed by the row's width instead, so the same request compiles to the same kernels every time.

It works through Inductor's documented seam for heuristics, `torch._inductor.config.inductor_choices_class` (and
the current thread's handler, which Inductor caches once it first compiled). The compiled kernels differ from the
default ones, so they get a cache folder of their own (CACHE_FOLDER, under the worker's compile cache) and the plan
key `"row_reductions": "whole"` (which also keys Dynamo's packages, services/compile_packages.py). Only CUDA's
Triton code generation asks this question; on the CPU Inductor's C++ kernels are unchanged. Off by default: one
H100 run (docs/benchmarks.md, version 21) gained 1.1-1.3 % per 1080p step, not yet measured with the query/key
kernel (bench/batch_bench.py's `*_wholerows` runs).
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

from torch._inductor import config as inductor_config
from torch._inductor.choices import InductorChoices
from torch._inductor.runtime.hints import ReductionHint
from torch._inductor.virtualized import V

log = logging.getLogger("ltx2.worker")
#: Widest row kept in registers: LTX-2's video width (its audio rows, 2,048, and every narrower row included).
WHOLE_ROW_LIMIT = 4096


class WholeRowChoices(InductorChoices):
    """Inductor's heuristics, except that a row reduction (ReductionHint.INNER) over at most WHOLE_ROW_LIMIT values
    is persistent. Cooperative (split) reductions and every other decision stay Inductor's."""

    @staticmethod
    def should_use_persistent_reduction(*args: Any, **kwargs: Any) -> bool:
        """(features, cooperative_reduction), as InductorChoices takes them; passed on as given, so a torch whose
        signature grew still gets its own answer for what this does not decide."""
        features = args[0] if args else kwargs["features"]
        cooperative = args[1] if len(args) > 1 else kwargs.get("cooperative_reduction", False)
        if (
            inductor_config.triton.persistent_reductions
            and not cooperative
            and features.get_reduction_hint() == ReductionHint.INNER
            and V.graph.sizevars.statically_known_leq(features.reduction_numel, WHOLE_ROW_LIMIT)
        ):
            return True
        return InductorChoices.should_use_persistent_reduction(*args, **kwargs)

    def uuid(self) -> str:
        """What Inductor's cache key holds for this handler (torch versions that key on `inductor_choices_class`)."""
        return f"ltx2-{CACHE_FOLDER}"


def rule_digest() -> str:
    """A digest of the rule's code and limit: a changed rule compiles into another folder and cache key, never
    finding kernels the old one made (torch 2.11 may not key its caches on the handler at all)."""
    code = WholeRowChoices.should_use_persistent_reduction.__code__
    text = repr((code.co_code, code.co_consts, code.co_names, WHOLE_ROW_LIMIT))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


#: Under the worker's compile cache: the kernels compiled with whole rows, kept apart from the default ones.
CACHE_FOLDER = f"whole-rows-{WHOLE_ROW_LIMIT}-{rule_digest()}"


def choose_row_reductions(whole_rows: bool) -> bool:
    """Make this thread's next compiles use WholeRowChoices (`whole_rows`), or take it away again; True when whole
    rows are in force. Inductor's settings live per thread (torch 2.13 keeps its config in context variables, the
    handler in a thread-local): call it on the thread that compiles, as prepare_inductor does. A handler of someone
    else's (torch's own on ROCm, a user's) is never replaced: whole rows are then not used, with a warning."""
    seam = hasattr(inductor_config, "inductor_choices_class")
    other = inductor_config.inductor_choices_class if seam else None
    if whole_rows:
        if other not in (None, WholeRowChoices):
            log.warning("inductor: whole_row_reductions not used: Inductor's heuristics are %r's", other)
            return False
        if seam:
            inductor_config.inductor_choices_class = WholeRowChoices
        V.set_choices_handler(WholeRowChoices())
        log.info("inductor: row reductions of up to %d values keep the row in registers", WHOLE_ROW_LIMIT)
        return True
    if other is WholeRowChoices:
        inductor_config.inductor_choices_class = None
    if isinstance(V.choices, WholeRowChoices):
        V.set_choices_handler(InductorChoices())
    return False
