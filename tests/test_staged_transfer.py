"""services/staged_transfer.py: weights reach the device through two reused host buffers, unchanged.

On a GPU the buffers are pinned and the copies asynchronous; here the same packing runs to a CPU
target (`staged=True`), which is where its mistakes would be: offsets, dtypes, shapes, tensors larger
than a buffer, strided and empty tensors, tied weights and the Parameter objects that hooks hold.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import LTX2VideoTransformer3DModel
from torch import nn

from services.staged_transfer import StagedTransfer, move_to_device


def storages(module: nn.Module) -> set[int]:
    return {tensor.untyped_storage().data_ptr() for tensor in [*module.parameters(), *module.buffers()]}


def test_a_loaded_transformer_moves_in_many_batches_with_every_value_and_parameter_kept(tiny_model_dir: Path):
    transformer = LTX2VideoTransformer3DModel.from_pretrained(tiny_model_dir, subfolder="transformer")
    expected = {name: tensor.clone() for name, tensor in transformer.state_dict().items()}
    parameters = dict(transformer.named_parameters())
    before = storages(transformer)
    transfer = StagedTransfer(torch.device("cpu"), staged=True, buffer_bytes=4096)
    for block in transformer.transformer_blocks:  # as fp8_matmul.convert_blocks does: blocks, then the rest
        transfer.move(block)
    transfer.move(transformer)
    transfer.finish()
    moved = transformer.state_dict()
    assert moved.keys() == expected.keys()
    for name, tensor in expected.items():
        assert moved[name].dtype == tensor.dtype and moved[name].shape == tensor.shape, name
        assert torch.equal(moved[name], tensor), name
    assert dict(transformer.named_parameters()) == parameters  # the same Parameter objects
    assert all(parameters[name] is parameter for name, parameter in transformer.named_parameters())
    assert not storages(transformer) & before  # every tensor is a copy, none a view of the safetensors mapping
    total = sum(tensor.numel() * tensor.element_size() for tensor in expected.values())
    assert transfer.moved_bytes == total and total > 10 * 4096  # many buffer-fulls, one pair of buffers


def test_tied_strided_empty_oversized_and_mixed_dtype_tensors_move_once_and_unchanged():
    torch.manual_seed(0)
    model = nn.Module()
    model.first = nn.Linear(16, 8)
    model.second = nn.Linear(16, 8)
    model.second.weight = model.first.weight  # tied: one tensor under two names
    model.strided = nn.Parameter(torch.randn(8, 24).t())  # a transposed view, not contiguous
    model.empty = nn.Parameter(torch.empty(0, 4))
    model.also_empty = nn.Parameter(torch.empty(3, 0))
    model.large = nn.Parameter(torch.randn(64, 64))  # 16 KiB: larger than a 4 KiB buffer
    model.bf16 = nn.Parameter(torch.randn(5, 3).to(torch.bfloat16))  # an odd size: the next offset realigns
    model.register_buffer("steps", torch.arange(7, dtype=torch.int64))
    model.register_buffer("fp8", torch.randn(16).to(torch.float8_e4m3fn))
    model.register_buffer("sparse", torch.eye(6).to_sparse())  # no storage to pack: goes by Tensor.to
    model.wide_view = nn.Parameter(torch.randn(96, 64).t())  # 24 KiB, strided: must not size a buffer
    expected = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    transfer = StagedTransfer(torch.device("cpu"), staged=True, buffer_bytes=4096)
    transfer.move(model)
    buffer_sizes = [buffer.numel() for buffer in transfer._buffers if buffer is not None]
    transfer.finish()
    assert max(buffer_sizes) == 64 * 64 * 4  # the one contiguous tensor past 4 KiB, not the 24 KiB view
    assert model.second.weight is model.first.weight  # still tied after the move
    for name, tensor in model.state_dict().items():
        assert tensor.dtype == expected[name].dtype and tensor.shape == expected[name].shape, name
        if tensor.layout == torch.strided:
            bytes_now, bytes_before = (t.contiguous().view(torch.uint8) for t in (tensor, expected[name]))
            assert torch.equal(bytes_now, bytes_before), name
        else:
            assert torch.equal(tensor.to_dense(), expected[name].to_dense()), name
    tied = model.first.weight.numel() * 4
    everything = sum(tensor.numel() * tensor.element_size() for tensor in expected.values())
    assert transfer.moved_bytes == everything - tied  # the tied weight once, not twice


def test_a_cpu_target_without_staging_is_module_to(tiny_model_dir: Path):
    transformer = LTX2VideoTransformer3DModel.from_pretrained(tiny_model_dir, subfolder="transformer")
    transfer = StagedTransfer(torch.device("cpu"))
    assert not transfer.staged and not transfer.pinned
    assert move_to_device(transformer, torch.device("cpu")) is transformer
