"""Where the engine runs: --device cuda:N makes that device current, and the KV cache is sized from the
device memory left after load on CUDA (1 GiB on CPU unless --kv-cache-gib says otherwise)."""

from __future__ import annotations

import pytest
import torch

from loraplex.config import Config
from loraplex.engine.engine import Engine, pick_device
from loraplex.engine.offload import kv_cache_bytes
from loraplex.engine.runner import ModelRunner
from loraplex.errors import ConfigError


def test_kv_cache_budget_on_cpu():
    cpu = torch.device("cpu")
    assert Config().kv_cache_gib is None
    assert kv_cache_bytes(Config(), cpu) == 2**30  # the CPU default is unchanged
    assert kv_cache_bytes(Config(kv_cache_gib=0.25), cpu) == 2**28
    assert kv_cache_bytes(Config(kv_cache_memory_fraction=0.5), cpu) == 2**30  # a CUDA-only setting
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(ConfigError, match="kv_cache_memory_fraction"):
            Config(kv_cache_memory_fraction=bad)


def test_cpu_engine_keeps_one_gib_of_kv(tmp_path):
    from tiny_models import save_tiny_model

    base = save_tiny_model(tmp_path / "base", "llama")
    engine = Engine(Config(model=str(base), dtype="float32", device="cpu"))
    block_bytes = ModelRunner.kv_bytes_per_block(engine.spec, engine.config.block_size, torch.float32)
    assert engine.info.kv_blocks == 2**30 // block_bytes


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_cuda_device_without_cuda_is_a_config_error():
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device("auto") == torch.device("cpu")
    for name in ("cuda", "cuda:1"):
        with pytest.raises(ConfigError, match="no CUDA device"):
            pick_device(name)


@pytest.mark.gpu
def test_cuda_kv_pool_is_capped_for_small_models(tmp_path):
    from tiny_models import save_tiny_model

    base = save_tiny_model(tmp_path / "base", "llama")  # max_position_embeddings 512
    engine = Engine(Config(model=str(base), dtype="float32", device="cuda", max_num_seqs=8))
    assert engine.info.kv_blocks == 2 * 8 * (512 // 16)


@pytest.mark.gpu
def test_cuda_index_becomes_the_current_device():
    before = torch.cuda.current_device()
    try:
        last = torch.cuda.device_count() - 1
        assert pick_device(f"cuda:{last}") == torch.device("cuda", last)
        assert torch.cuda.current_device() == last
        assert pick_device("cuda") == torch.device("cuda", last)  # no index: the current one, named
        with pytest.raises(ConfigError, match="CUDA device"):
            pick_device(f"cuda:{last + 1}")
    finally:
        torch.cuda.set_device(before)


@pytest.mark.gpu
def test_cuda_kv_cache_takes_the_free_memory_share(tmp_path):
    from tiny_models import save_tiny_model

    # A context long enough that the pool's cap (2 x max_num_seqs full-length sequences) stays above it.
    base = save_tiny_model(tmp_path / "base", "llama", max_position_embeddings=2**21)
    engine = Engine(Config(model=str(base), dtype="float32", device="cuda", kv_cache_memory_fraction=0.5))
    block_bytes = ModelRunner.kv_bytes_per_block(engine.spec, engine.config.block_size, torch.float32)
    kv_bytes = engine.info.kv_blocks * block_bytes
    torch.cuda.empty_cache()
    free_now, total = torch.cuda.mem_get_info()
    # Half of what was free after load went to the KV cache, so about as much is still free.
    assert kv_bytes > 2**30
    assert 0.8 < kv_bytes / free_now < 1.25, (kv_bytes, free_now, total)
