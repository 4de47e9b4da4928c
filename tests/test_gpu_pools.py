"""KV pool on the H200 through CUDA VMM: mapping, zero reads, remaps under graphs, memory to the driver."""

from __future__ import annotations

import pytest
import torch

from crosspool.models.presets import get_preset
from crosspool.models.spec import ModelSpec
from crosspool.pools.kv_pool import PAGE_BYTES, KVPool

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

OLMOE = ModelSpec.from_hf_config(get_preset("olmoe-1b-7b").config)      # 2 MiB blocks of 16 tokens in bf16


@pytest.fixture()
def pool():
    from crosspool.pools.vmm import CudaPageBackend

    p = KVPool(256 * PAGE_BYTES, CudaPageBackend(0))
    yield p
    p.close()


def test_unbacked_reads_zero_and_remapped_data_is_right(pool: KVPool) -> None:
    a = pool.register("a", OLMOE, 16, torch.bfloat16)
    k0 = a.layer(0)[0]
    assert float(k0[5].abs().sum()) == 0.0                              # never mapped: zero page
    blocks = a.alloc(4)
    for i, b in enumerate(blocks):
        k0[b] = float(i + 1)
    a.free(blocks[2:])
    a.shrink(keep_free_blocks=0)
    torch.cuda.synchronize()
    assert float(k0[blocks[0]].float().mean()) == 1.0 and float(k0[blocks[1]].float().mean()) == 2.0
    assert float(k0[blocks[3]].abs().sum()) == 0.0                      # unmapped again: zeros
    again = a.alloc(2)                                                   # remapped on fresh pages
    for b in again:
        k0[b] = 7.0
    assert all(float(k0[b].float().mean()) == 7.0 for b in again)
    assert float(k0[blocks[0]].float().mean()) == 1.0


def test_cuda_graph_over_range_survives_remap(pool: KVPool) -> None:
    a = pool.register("a", OLMOE, 16, torch.bfloat16)
    blocks = a.alloc(2)
    k0 = a.layer(0)[0]
    k0[blocks[1]] = 3.0
    out = torch.zeros((), device="cuda", dtype=torch.float32)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        out.copy_(k0[blocks[1]].float().sum())                          # warm-up on the side stream
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out.copy_(k0[blocks[1]].float().sum())
    graph.replay()
    torch.cuda.synchronize()
    expected = 3.0 * k0[blocks[1]].numel()
    assert float(out) == expected
    assert a.bundle_blocks == 1                                          # one 2 MiB block per page
    a.free([blocks[1]])
    assert a.shrink(keep_free_blocks=0) == 1                             # its page really unmapped
    graph.replay()
    torch.cuda.synchronize()
    assert float(out) == 0.0                                             # same address now reads the zero page
    again = a.alloc(2)
    assert blocks[1] in again
    k0[blocks[1]] = 5.0
    graph.replay()
    torch.cuda.synchronize()
    assert float(out) == 5.0 * k0[blocks[1]].numel()


def test_memory_returns_to_the_driver(pool: KVPool) -> None:
    a = pool.register("a", OLMOE, 16, torch.bfloat16)
    torch.cuda.synchronize()
    free0 = torch.cuda.mem_get_info()[0]
    blocks = a.alloc(128)                                                # 128 bundles of 2 MiB = 256 MiB
    free1 = torch.cuda.mem_get_info()[0]
    assert free0 - free1 >= 128 * PAGE_BYTES
    a.free(blocks)
    a.shrink(keep_free_blocks=0)
    free2 = torch.cuda.mem_get_info()[0]
    assert free2 - free1 >= 128 * PAGE_BYTES
    assert pool.free_pages == pool.total_pages


def test_one_model_can_take_nearly_the_whole_pool(pool: KVPool) -> None:
    a = pool.register("a", OLMOE, 16, torch.bfloat16)
    b = pool.register("b", ModelSpec.from_hf_config(get_preset("qwen3-30b-a3b").config), 16, torch.bfloat16)
    got = b.alloc(b.num_free_blocks())
    assert len(got) * b.block_bytes >= 0.9 * pool.total_pages * PAGE_BYTES
    assert a.num_free_blocks() * a.block_bytes <= 0.1 * pool.total_pages * PAGE_BYTES   # only leftovers
    b.free(got)
    b.shrink(keep_free_blocks=0)
    got_a = a.alloc(a.num_free_blocks())
    assert len(got_a) * a.block_bytes >= 0.9 * pool.total_pages * PAGE_BYTES
    a.free(got_a)
    a.shrink(keep_free_blocks=0)
