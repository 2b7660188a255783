"""Context parallel (issue 30): one clip's denoising over N processes, each holding the whole model
and 1/N of the video tokens, joined in one torch.distributed group.

The sharding is diffusers 0.42.1's own: `ModelMixin.enable_parallelism` with a
`ContextParallelConfig(ulysses_degree=N)` hooks the transformer so its inputs are split along the
token axis on the way in and gathered on the way out, and every attention layer runs Ulysses
attention (an all-to-all from token shards to head shards and back). The audio tokens stay whole on
every rank (the plan leaves them out): Ulysses attention then sees each audio token N times, which
softmax weighs exactly as once. What this module adds is only what diffusers leaves to its caller,
and the places where it does not hold for LTX-2 (services/context_parallel_plan.py says which):

- joining the group (`join_group`): NCCL on GPUs, gloo on the CPU (the CPU path is what the tests
  run; a two-core CI has no two GPUs), from the variables the orchestrator sets (protocol.stages.CP_*);
- the attention backend: "native" (torch SDPA) is the one CP backend that runs on the CPU and on any
  GPU; the ring degree would need a backend that returns the log-sum-exp, which native does not;
- the mesh and device on the CPU, where `enable_parallelism` itself cannot run (`enable_on_cpu`).

Every rank computes the same latents (the outputs are gathered), so rank 0 alone writes them.
"""

from __future__ import annotations

import datetime
import os
from typing import Any

import torch
import torch.distributed as dist
from diffusers.hooks.context_parallel import apply_context_parallel
from diffusers.models._modeling_parallel import ContextParallelConfig, ParallelConfig
from torch.distributed.device_mesh import init_device_mesh

from protocol.errors import EnvironmentFailure, InvalidInput
from protocol.stages import CP_ADDRESS_ENV, CP_RANK_ENV, CP_SIZE_ENV
from services.context_parallel_plan import keep_local_heads_of_masks, ltx2_plan

# How long a rank waits for the others at the rendezvous and in a collective. Every rank waits for GO
# before it joins, and a prestarted rank may wait through a whole diffusion run; a rank left alone by a
# dead peer is stopped by the orchestrator (orchestrator.placement.worker_gang), not by this timeout.
GROUP_TIMEOUT = datetime.timedelta(hours=24)
# The attention backend every rank runs: the only one registered with context-parallel support that
# runs on the CPU as well as on CUDA (diffusers.models.attention_dispatch, AttentionBackendName.NATIVE).
ATTENTION_BACKEND = "native"


def group_size() -> int:
    """The number of processes this one was started among (1 when not started as a context-parallel rank)."""
    return int(os.environ.get(CP_SIZE_ENV, "1"))


def group_rank() -> int:
    """This process's rank in its group (0 when not started as a context-parallel rank)."""
    return int(os.environ.get(CP_RANK_ENV, "0"))


def join_group(device: torch.device) -> None:
    """Join the group the environment names (rendezvous at its CP_ADDRESS_ENV, rank 0's TCP store), once
    per process; on CUDA this rank's device becomes `cuda:<rank>` of the devices it sees (its lane's)."""
    if dist.is_initialized():
        return
    if device.type == "cuda":
        if torch.cuda.device_count() < group_size():  # NCCL refuses two ranks on one GPU
            raise EnvironmentFailure(
                f"context parallel over {group_size()} processes needs {group_size()} GPUs in the lane, which"
                f" shows {torch.cuda.device_count()}; give it a lane of that many devices ([cluster] devices)"
            )
        torch.cuda.set_device(group_rank())
    dist.init_process_group(
        backend="nccl" if device.type == "cuda" else "gloo",
        init_method=f"tcp://{os.environ[CP_ADDRESS_ENV]}",
        rank=group_rank(),
        world_size=group_size(),
        timeout=GROUP_TIMEOUT,
    )


def leave_group() -> None:
    """Tear the group down (each rank, once its work is done), so no rank exits while another still sends."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def parallelize(transformer: Any, degree: int, device: torch.device) -> None:
    """Shard `transformer`'s tokens over the `degree` ranks of the joined group (Ulysses attention), with
    diffusers' hooks and the LTX-2 plan of services/context_parallel_plan.py."""
    transformer.set_attention_backend(ATTENTION_BACKEND)
    keep_local_heads_of_masks()
    config = ContextParallelConfig(ulysses_degree=degree)
    plan = ltx2_plan(transformer.config.rope_type)
    if device.type == "cpu":
        enable_on_cpu(transformer, config, plan)
    else:
        transformer.enable_parallelism(config=config, cp_plan=plan)


def enable_on_cpu(transformer: Any, config: ContextParallelConfig, plan: dict[str, Any]) -> None:
    """`ModelMixin.enable_parallelism`'s context-parallel steps, on the CPU.

    diffusers 0.42.1 cannot run it there: `_resolve_parallel_config` picks the rank's device as
    `rank % torch.accelerator.device_count()`, which is 0 without an accelerator ("ZeroDivisionError:
    integer modulo by zero"). The steps after that device are the same here: a (ring, ulysses) CPU mesh,
    the config set up with it and recorded on the model and on every attention processor, and the plan's
    split and gather hooks applied (`apply_context_parallel`)."""
    mesh = init_device_mesh("cpu", config.mesh_shape, mesh_dim_names=config.mesh_dim_names)
    parallel = ParallelConfig(context_parallel_config=config)
    parallel.setup(dist.get_rank(), dist.get_world_size(), torch.device("cpu"), mesh=mesh)
    transformer._parallel_config = parallel
    for module in transformer.modules():
        processor = getattr(module, "processor", None)
        if processor is not None and hasattr(processor, "_parallel_config"):
            processor._parallel_config = parallel
    apply_context_parallel(transformer, config, plan)


def send_to_first(frames: torch.Tensor) -> None:
    """Send a float tensor to rank 0: its shape first (4 int64s, the receiver cannot know a piece's frame
    count before it is decoded), then its values (a parallel decode's pieces: services/video_decode.py)."""
    shape = torch.tensor(frames.shape, dtype=torch.int64, device=frames.device)
    dist.send(shape, dst=0)
    dist.send(frames.contiguous(), dst=0)


def receive_from(rank: int, device: torch.device) -> torch.Tensor:
    """The float tensor `rank` sends with send_to_first, on `device`."""
    shape = torch.empty(4, dtype=torch.int64, device=device)
    dist.recv(shape, src=rank)
    frames = torch.empty(tuple(int(n) for n in shape.tolist()), dtype=torch.float32, device=device)
    dist.recv(frames, src=rank)
    return frames


def piece_exchange_done() -> None:
    """Each rank of a parallel decode, after its last piece of a clip was sent or received: no rank leaves
    (or starts the next clip of its group) while a send of this one may still be on its way."""
    dist.barrier()


def max_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest absolute difference of two latents (how far a sharded run is from an unsharded one)."""
    return float((a.float() - b.float()).abs().max())


def plan_ranks(plan: dict[str, Any]) -> int:
    """The number of context-parallel ranks an attempt's plan asks for (1: not context parallel)."""
    return int(plan.get("context_parallel", 1))


def join_for_plan(plan: dict[str, Any], device: torch.device) -> None:
    """Join the group when the plan is context parallel; refuse a process that was not started as one of
    exactly that many ranks (a stage run by hand with such a plan: it would wait for peers that never come)."""
    ranks = plan_ranks(plan)
    if ranks == 1:
        return
    if group_size() != ranks or CP_ADDRESS_ENV not in os.environ:
        raise EnvironmentFailure(
            f"the plan asks for {ranks} context-parallel processes, but this one was started as one of "
            f"{group_size()} (the orchestrator starts them: orchestrator.placement.worker_gang)"
        )
    join_group(device)


def require_shardable(transformer: Any, video_tokens: int, text_tokens: int, ranks: int) -> None:
    """InvalidInput unless `ranks` divides what diffusers splits evenly between them: the video and text
    tokens (its equipartition sharder asserts it) and the video and audio attention heads (Ulysses
    attention hands each rank 1/N of them)."""
    config = transformer.config
    counts = {
        "video tokens": video_tokens,
        "prompt tokens": text_tokens,
        "video attention heads": config.num_attention_heads,
        "audio attention heads": config.audio_num_attention_heads,
    }
    uneven = [f"{count} {what}" for what, count in counts.items() if count % ranks]
    if uneven:
        raise InvalidInput(
            f"--context-parallel {ranks}: {ranks} processes cannot share {', '.join(uneven)} evenly; "
            "pick a number of processes that divides them (or another size)"
        )
