"""CFG parallel (issue 30): a guided step's unconditional and conditional branches on two processes.

diffusers' LTX-2 pipelines run classifier-free guidance as one transformer call on a batch of two (the negative
prompt's row and the prompt's: `torch.cat([latents] * 2)`) and split its output with `chunk(2)`. Over N ranks
each rank runs the transformer on its 1/N of that batch: a forward pre-hook slices every input whose first
dimension is the batch, and a forward hook gathers the outputs back in batch order (`all_gather`), so every rank
holds what one process's call returns and the pipeline combines the branches as it always does. That is one
all-gather of the outputs per call, against Ulysses attention's two all-to-alls in every attention layer
(services/context_parallel.py), so a guided two-process run takes this. A call whose batch the ranks cannot
share evenly (STG's and modality guidance's calls, a batch of one; an unguided pass) runs whole on every rank,
which gives every rank the same output with no exchange.

Written here because diffusers 0.42.1's ParallelConfig has context parallelism only.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

#: The plan's `context_parallel_mode` of a run whose ranks share the guidance batch (else "ulysses").
CFG_MODE = "cfg"


def split_batches(transformer: torch.nn.Module, ranks: int, rank: int) -> None:
    """Hook `transformer` so each of the group's `ranks` processes computes its share of every evenly shared batch."""
    state: dict[str, int | None] = {"batch": None}

    def before(_module: Any, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        batch = int(hidden.shape[0])
        if args or batch < ranks or batch % ranks:  # positional inputs are not named here: run the call whole
            state["batch"] = None
            return args, kwargs
        state["batch"] = batch
        share = batch // ranks
        rows = slice(rank * share, (rank + 1) * share)
        return args, {name: own_rows(value, batch, rows) for name, value in kwargs.items()}

    def after(_module: Any, _args: tuple, _kwargs: dict[str, Any], output: Any) -> Any:
        if state["batch"] is None:
            return output
        if not isinstance(output, tuple):
            raise TypeError(f"CFG parallel needs the transformer's tuple output (return_dict=False): {type(output)}")
        return tuple(gathered(part, ranks) for part in output)

    transformer.register_forward_pre_hook(before, with_kwargs=True)
    transformer.register_forward_hook(after, with_kwargs=True)


def own_rows(value: Any, batch: int, rows: slice) -> Any:
    """This rank's rows of an input whose first dimension is the batch; anything else as it is."""
    if isinstance(value, torch.Tensor) and value.ndim >= 1 and value.shape[0] == batch:
        return value[rows]
    return value


def gathered(part: torch.Tensor, ranks: int) -> torch.Tensor:
    """Every rank's rows of one output, in rank (batch) order."""
    pieces = [torch.empty_like(part) for _ in range(ranks)]
    dist.all_gather(pieces, part.contiguous())
    return torch.cat(pieces)
