"""Moving a loaded model's weights onto the accelerator through pinned host buffers, one batch ahead.

Why not `module.to("cuda")`: the weights `from_pretrained` returns are views of memory-mapped safetensors
files, and `.to` copies them one tensor after another from pageable memory. Each copy first faults the
mapping's pages in, in the calling thread, then lets the driver stage the bytes through its own small
pinned buffer, and only then moves on: at 1080p the LTX-2.3 transformer's 38 GB took 7.3 s of each
diffusion worker's start on an H100 (5.2 GB/s, benchmark version 18), paid again by every wave of a long
batch. Here the tensors are packed into one of two pinned buffers by torch's CPU copy (its intra-op
threads fault the pages in parallel), the buffer goes to the device as asynchronous copies, and the next
batch is packed into the other buffer while the first one is on its way. The device tensors are new
allocations of the same shapes and dtypes, so what later code sees is what `.to` gives.

A buffer is reused only after the device has finished reading it (a CUDA event per buffer), and the
parameters keep their `Parameter` objects (`param.data` is replaced, as `Module.to` does), so hooks and
tied weights (one tensor under two names, moved once) survive the move. Gradients are not moved (the stages
only infer), and tensors a buffer cannot carry (strided views, empty or sparse ones) go by `Tensor.to`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

# Bytes per pinned buffer: large enough that a 1080p transformer block (about 0.8 GB of bf16) goes in a
# handful of batches, small enough that two of them are a rounding error of a big box's host memory.
BUFFER_BYTES = 256 * 2**20
# Each tensor starts at a multiple of this many bytes in a buffer (any dtype's alignment).
ALIGNMENT = 256


@dataclass
class _Slot:
    """One place a tensor is held: a module's parameter or buffer, by name."""

    module: nn.Module
    name: str
    is_parameter: bool


@dataclass
class _Batch:
    """Tensors packed into one buffer together, each with the slots that hold it."""

    tensors: list[torch.Tensor] = field(default_factory=list)
    slots: list[list[_Slot]] = field(default_factory=list)
    nbytes: int = 0


def _aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGNMENT) * ALIGNMENT


class StagedTransfer:
    """Host-to-device moves of modules' tensors through two reused (pinned, on CUDA) host buffers.

    One instance serves a whole placement (e.g. every block of a transformer, then the rest of it), so
    the buffers are allocated once. `staged` False (what a CPU target gets) leaves every move to
    `Module.to`; the tests turn it on for a CPU target to check the packing without a GPU, and then
    host tensors are copied too (to the host), since moving nothing would check nothing.
    """

    def __init__(self, device: torch.device, *, staged: bool | None = None, buffer_bytes: int = BUFFER_BYTES) -> None:
        if device.type == "cuda" and device.index is None:  # what tensors on it report ("cuda:0" != "cuda")
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        self.staged = device.type == "cuda" if staged is None else staged
        self.pinned = device.type == "cuda"
        self.buffer_bytes = buffer_bytes
        self._buffers: list[torch.Tensor | None] = [None, None]
        self._events: list[Any] = [None, None]
        self._turn = 0
        self._placed: set[int] = set()  # storages this transfer made (a CPU target's copies are on the host too)
        self.moved_bytes = 0

    def move(self, module: nn.Module) -> nn.Module:
        """Put every parameter and buffer of `module` that is elsewhere on the device; returns `module`."""
        if not self.staged:
            return module.to(self.device)
        batch = _Batch()
        for tensor, slots in self._tensors_to_move(module):
            if not self._stageable(tensor):  # a strided view, an empty or sparse tensor: as Module.to would
                self._place(tensor, tensor.to(self.device), slots)
                continue
            nbytes = _aligned(tensor.numel() * tensor.element_size())
            if batch.tensors and batch.nbytes + nbytes > self.buffer_bytes:
                self._send(batch)
                batch = _Batch()
            batch.tensors.append(tensor)
            batch.slots.append(slots)
            batch.nbytes += nbytes
        if batch.tensors:
            self._send(batch)
        return module

    def finish(self) -> None:
        """Wait for the last copies and let the buffers go (what a placement calls once at its end)."""
        for event in self._events:
            if event is not None:
                event.synchronize()
        allocated = any(buffer is not None for buffer in self._buffers)
        self._buffers = [None, None]
        self._events = [None, None]
        if self.pinned and allocated:
            # The caching host allocator would keep the pinned pages for the process's whole life.
            empty_host_cache = getattr(torch._C, "_host_emptyCache", None)
            if empty_host_cache is not None:
                empty_host_cache()

    def _tensors_to_move(self, module: nn.Module) -> list[tuple[torch.Tensor, list[_Slot]]]:
        """Each distinct tensor not yet on the device, once, with every slot that holds it."""
        found: dict[int, tuple[torch.Tensor, list[_Slot]]] = {}
        for owner in module.modules():
            for table, is_parameter in ((owner._parameters, True), (owner._buffers, False)):
                for name, tensor in table.items():
                    if tensor is None or self._placed_here(tensor):
                        continue
                    key = id(tensor)
                    if key not in found:
                        found[key] = (tensor, [])
                    found[key][1].append(_Slot(owner, name, is_parameter))
        return list(found.values())

    def _placed_here(self, tensor: torch.Tensor) -> bool:
        """Already where it should be: on the device (a CPU target: made by this transfer)."""
        if self.device.type != "cpu":
            return tensor.device == self.device
        stored = tensor.layout == torch.strided and tensor.numel() > 0
        return stored and tensor.untyped_storage().data_ptr() in self._placed

    @staticmethod
    def _stageable(tensor: torch.Tensor) -> bool:
        """Whether the tensor's bytes can go through a buffer: a dense, contiguous, non-empty host tensor."""
        return (
            tensor.layout == torch.strided
            and tensor.device.type == "cpu"
            and tensor.is_contiguous()
            and tensor.numel() > 0
        )

    def _place(self, tensor: torch.Tensor, moved: torch.Tensor, slots: list[_Slot]) -> None:
        self.moved_bytes += tensor.numel() * tensor.element_size()
        if self.device.type == "cpu" and moved.layout == torch.strided and moved.numel():
            self._placed.add(moved.untyped_storage().data_ptr())  # every empty tensor's storage is at address 0
        for slot in slots:
            _put(slot, moved)

    def _buffer(self, nbytes: int) -> torch.Tensor:
        """This turn's buffer, at least `nbytes` long, once the device has finished reading it."""
        event = self._events[self._turn]
        if event is not None:
            event.synchronize()
        buffer = self._buffers[self._turn]
        if buffer is None or buffer.numel() < nbytes:
            buffer = None
            self._buffers[self._turn] = None
            size = max(nbytes, self.buffer_bytes)
            buffer = torch.empty(size, dtype=torch.uint8, pin_memory=self.pinned)
            self._buffers[self._turn] = buffer
        return buffer

    def _send(self, batch: _Batch) -> None:
        buffer = self._buffer(batch.nbytes)
        offset = 0
        for tensor, slots in zip(batch.tensors, batch.slots, strict=True):
            nbytes = tensor.numel() * tensor.element_size()
            staged = buffer[offset : offset + nbytes].view(tensor.dtype).view(tensor.shape)
            staged.copy_(tensor)  # torch's intra-op threads: the page faults happen in parallel
            moved = torch.empty(tensor.shape, dtype=tensor.dtype, device=self.device)
            moved.copy_(staged, non_blocking=self.pinned)
            offset += _aligned(nbytes)
            self._place(tensor, moved, slots)
        if self.pinned:  # on the stream the copies went on: the destination device's
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
            self._events[self._turn] = event
        self._turn = 1 - self._turn


def _put(slot: _Slot, moved: torch.Tensor) -> None:
    """Hold `moved` where the slot held the old tensor, keeping a parameter's object as Module.to does."""
    if slot.is_parameter:
        parameter = slot.module._parameters[slot.name]
        assert parameter is not None
        with torch.no_grad():
            parameter.data = moved
    else:
        slot.module._buffers[slot.name] = moved


def move_to_device(module: nn.Module, device: torch.device) -> nn.Module:
    """`module.to(device)` through pinned buffers where the device is a GPU; returns `module`."""
    transfer = StagedTransfer(device)
    try:
        transfer.move(module)
    finally:
        transfer.finish()
    return module
