"""Where lanes come from: this host's devices, or a Ray cluster (`[cluster] backend`).

Each lane is followed by one thread with its own WorkerLink (orchestrator.run.runner); this module
gives the lanes and makes their links, so the daemon and `ltx2 batch` need not know which backend
runs them. The Ray backend is imported only when it is configured: ray is never imported at CLI
start (the orchestrator starts in well under a second).
"""

from __future__ import annotations

from typing import Protocol

import zmq

from config.settings import ConfigError, Settings
from orchestrator.placement.fork_client import ForkServer
from orchestrator.placement.lanes import Lane, resolve_lanes
from orchestrator.placement.worker_link import WorkerLink

#: The CPU niceness of a lane's decoders while they run beside its diffusion (orchestrator.run.stage_overlap).
#: Their libx264 threads (24 by default) would otherwise take the host's cores from the next wave's diffusion
#: worker exactly while it places its weights, an all-cores copy: on an H100's 16-core host that placement took
#: 15-16 s beside a wave's decoders against 2.4-3.0 s alone (LTX-2.3 1080p, session 19). The decoders' own
#: work is hidden behind the next wave's diffusion, which leaves its steps most of the cores anyway, so they
#: lose little; a process may only raise its niceness, so this is one-way for the decoder process's life.
DECODERS_BESIDE_NICENESS = 10


class LaneSource(Protocol):
    """The lanes of a run and the link of each."""

    lanes: list[Lane]

    def link(self, lane: Lane) -> WorkerLink: ...

    def close(self) -> None: ...


class LocalLanes:
    """This host's lanes (orchestrator.placement.lanes); their workers are forked or exec'd here.

    All lanes fork from one server (each child is pinned to its lane's device as it starts), which
    starts importing as the lanes are opened: a daemon's first job, and a batch's first stage after
    its prompt pre-encoding, no longer wait the 10 s of imports (docs/benchmarks.md, version 9)."""

    def __init__(self, settings: Settings, context: zmq.Context) -> None:
        self.lanes = resolve_lanes(settings)
        self.settings, self.context = settings, context
        self.fork_server = ForkServer() if settings.fork_server else None
        if self.fork_server is not None:
            self.fork_server.warm()

    def link(self, lane: Lane, role: str = "") -> WorkerLink:
        """A link for `lane`'s workers; `role` names a second one of the same lane (its own socket): "decoders",
        whose workers run beside the lane's diffusion at DECODERS_BESIDE_NICENESS (and, under CUDA MPS, at the
        below-normal client priority: WorkerLink.mps_environment)."""
        return WorkerLink(
            self.context,
            fork_server=self.settings.fork_server,
            lane=lane,
            shared_fork_server=self.fork_server,
            role=role,
            niceness=DECODERS_BESIDE_NICENESS if role == "decoders" else 0,
            mps_setting=self.settings.cuda_mps,
        )

    def close(self) -> None:
        """Stop the lanes' fork server (each link closes its own socket; the context is the caller's)."""
        if self.fork_server is not None:
            self.fork_server.close()


def open_lanes(settings: Settings, context: zmq.Context) -> LaneSource:
    """The configured lanes; raises ConfigError (FarmUnusable for a farm) when they cannot run."""
    if settings.backend == "ray":
        try:
            from orchestrator.placement.ray_farm import RayFarm
        except ImportError as exc:
            raise ConfigError(
                f"cluster.backend = \"ray\" needs Ray: pip install 'ltx2-stages[cluster]' ({exc})"
            ) from None
        return RayFarm(settings)
    return LocalLanes(settings, context)
