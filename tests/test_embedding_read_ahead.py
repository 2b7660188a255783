"""services/embedding_cache.ReadAhead: the next job's cached embeddings read on a thread, the same tensors as a load."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from services import embedding_cache
from services.embedding_cache import ReadAhead

CPU = torch.device("cpu")


def write_embeddings(path: Path, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    embeddings = {
        "prompt_embeds": torch.randn(1, 16, 24, generator=generator).to(torch.bfloat16),
        "prompt_attention_mask": torch.ones(1, 16, dtype=torch.int64),
    }
    embedding_cache.store(path, embeddings)
    return embeddings


def test_a_file_read_ahead_gives_the_tensors_a_load_gives_in_aligned_memory_of_its_own(tmp_path: Path):
    first, second = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    write_embeddings(first, 1)
    expected = write_embeddings(second, 2)
    read_ahead = ReadAhead()
    assert read_ahead.take(second, CPU) is None  # nothing started
    read_ahead.start(first, pin=False)
    read_ahead.start(second, pin=False)  # replaces the read of `first`
    taken = read_ahead.take(second, CPU)
    loaded = embedding_cache.load(second, CPU)
    assert taken is not None and loaded is not None
    assert taken["negative_prompt_embeds"] is None and taken["negative_prompt_attention_mask"] is None
    for key, tensor in expected.items():
        assert taken[key].dtype == tensor.dtype and torch.equal(taken[key], tensor) and torch.equal(loaded[key], tensor)
        assert taken[key].data_ptr() % 64 == 0  # torch's own allocation, as load's clone gives
    assert read_ahead.take(second, CPU) is None  # taken once


def test_a_read_that_fails_leaves_the_job_to_load_the_file_itself(tmp_path: Path, caplog):
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a safetensors file")
    read_ahead = ReadAhead()
    read_ahead.start(broken, pin=False)
    with caplog.at_level(logging.WARNING, logger="ltx2.worker"):
        assert read_ahead.take(broken, CPU) is None
    assert "reading broken.safetensors ahead failed" in caplog.text


def test_a_garbled_cache_file_is_a_miss_not_a_failed_job(tmp_path: Path):
    """safetensors raises its own SafetensorError for a garbled header, which `load` let through to fail the stage."""
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a safetensors file")
    assert embedding_cache.load(broken, CPU) is None
    assert not embedding_cache.readable(broken) and not embedding_cache.readable(tmp_path / "absent.safetensors")
    whole = tmp_path / "whole.safetensors"
    write_embeddings(whole, 3)
    assert embedding_cache.readable(whole)


def test_a_file_evicted_between_read_and_take_is_not_brought_back_empty(tmp_path: Path):
    path = tmp_path / "evicted.safetensors"
    expected = write_embeddings(path, 4)
    read_ahead = ReadAhead()
    read_ahead.start(path, pin=False)
    read_ahead._future.result()  # read, then evicted by another process while this job denoised
    path.unlink()
    taken = read_ahead.take(path, CPU)
    assert taken is not None and torch.equal(taken["prompt_embeds"], expected["prompt_embeds"])
    assert not path.exists()  # Path.touch made a 0-byte file of it


def test_a_read_for_a_job_that_does_not_come_is_dropped_at_the_next_take(tmp_path: Path):
    other, own = tmp_path / "other.safetensors", tmp_path / "own.safetensors"
    write_embeddings(other, 5)
    write_embeddings(own, 6)
    read_ahead = ReadAhead()
    read_ahead.start(other, pin=False)
    assert read_ahead.take(own, CPU) is None  # the job loads its own file; the read of `other` is let go
    assert read_ahead._future is None and read_ahead.take(other, CPU) is None
