"""KV pool accounting: pages shared by models, page bundles mapped on demand and returned."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from crosspool.models.presets import get_preset
from crosspool.models.spec import ModelSpec
from crosspool.pools.kv_pool import PAGE_BYTES, KVPool, KVPoolFullError, bundle_shape

SPECS = [ModelSpec.from_hf_config(get_preset(p).config) for p in ("tiny-olmoe", "tiny-qwen3-moe", "tiny-deepseek-v3")]


def _pool(pages: int = 12) -> tuple[KVPool, list]:
    pool = KVPool(pages * PAGE_BYTES)
    kvs = [pool.register(f"m{i}", s, 16, torch.float32) for i, s in enumerate(SPECS)]
    return pool, kvs


def _check_invariants(pool: KVPool, kvs: list, held: list[list[int]]) -> None:
    mapped_pages = sum(len(kv._used_in_bundle) * kv.bundle_pages for kv in kvs)
    assert mapped_pages + pool.free_pages == pool.total_pages          # no page lost or double-counted
    for kv, blocks in zip(kvs, held, strict=True):
        assert len(blocks) == len(set(blocks))                          # no block handed out twice
        assert not set(blocks) & set(kv._free)                          # in-use blocks are not free
        for b in blocks:
            assert b // kv.bundle_blocks in kv._used_in_bundle           # every used block is backed
        assert sum(kv._used_in_bundle.values()) == len(blocks)
        assert len(kv._free) + len(blocks) == len(kv._used_in_bundle) * kv.bundle_blocks


ops = st.lists(st.tuples(st.integers(0, 2), st.sampled_from(["alloc", "free", "shrink"]), st.integers(1, 300)),
               max_size=60)


@settings(max_examples=60, deadline=None)
@given(ops)
def test_random_grow_shrink_keeps_accounting(sequence) -> None:
    pool, kvs = _pool()
    held: list[list[int]] = [[] for _ in kvs]
    for m, op, n in sequence:
        kv = kvs[m]
        if op == "alloc":
            if n <= kv.num_free_blocks():
                held[m] += kv.alloc(n)
            else:
                try:
                    kv.alloc(n)
                    raise AssertionError("alloc beyond capacity succeeded")
                except KVPoolFullError:
                    pass
        elif op == "free":
            k = min(n, len(held[m]))
            kv.free(held[m][:k])
            held[m] = held[m][k:]
        else:
            kv.shrink()
        _check_invariants(pool, kvs, held)
    for kv, blocks in zip(kvs, held, strict=True):
        kv.free(blocks)
        kv.shrink(keep_free_blocks=0)
    assert pool.free_pages == pool.total_pages                          # usage returns to zero
    assert all(kv.mapped_bytes == 0 for kv in kvs)


def test_model_grows_into_pages_another_released() -> None:
    pool, (a, b, _) = _pool(pages=12)
    got_a = a.alloc(a.num_free_blocks())                                  # a takes the whole pool
    assert pool.free_pages < a.bundle_pages and b.num_free_blocks() < b.bundle_blocks
    a.free(got_a)
    a.shrink(keep_free_blocks=0)
    assert pool.free_pages == pool.total_pages
    got_b = b.alloc(b.num_free_blocks())                                  # now b can take nearly all of it
    assert len(got_b) * b.block_bytes >= 0.9 * pool.total_pages * PAGE_BYTES
    assert b.stats().high_water_bytes >= 0.9 * pool.total_pages * PAGE_BYTES


def test_unmapped_blocks_read_zero_and_data_survives_elsewhere() -> None:
    pool, (a, _, _) = _pool()
    blocks = a.alloc(2 * a.bundle_blocks)
    k_cache = a.layer(0)[0]
    k_cache[blocks[0]] = 1.0
    k_cache[blocks[-1]] = 2.0
    a.free(blocks[a.bundle_blocks:])
    a.shrink(keep_free_blocks=0)
    assert torch.all(k_cache[blocks[0]] == 1.0)
    assert torch.all(k_cache[blocks[-1]] == 0.0)                          # unbacked: reads zeros


def test_reserve_keeps_blocks_mapped_ahead() -> None:
    pool, (a, _, _) = _pool()
    a.ensure_reserve()
    assert a.stats().free_blocks >= a.bundle_blocks
    used = pool.used_pages
    a.alloc(1)
    assert pool.used_pages == used                                       # no mapping on the allocation


def test_bundle_shapes_hold_whole_blocks_with_little_waste() -> None:
    for block in (PAGE_BYTES, 1536 << 10, 497_664, 24_576, 3 << 20, 3 << 10):
        pages, blocks = bundle_shape(block, PAGE_BYTES)
        assert blocks >= 1 and blocks * block <= pages * PAGE_BYTES
        assert 1 - blocks * block / (pages * PAGE_BYTES) < 0.06


def _wait_for(cond, timeout_s: float = 5.0) -> bool:
    import time

    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.005)
    return cond()


def test_background_maintainer_keeps_reserve_and_releases_idle_models() -> None:
    from crosspool.pools.kv_pool import KVMaintainer

    pool, kvs = _pool()
    m = KVMaintainer(pool)
    try:
        m.request({"m0": 0, "m1": 0})
        assert _wait_for(lambda: all(kv.stats().free_blocks >= kv.bundle_blocks for kv in kvs[:2]))
        held = [kvs[0].alloc(kvs[0].bundle_blocks)]
        for _ in range(200):   # the scheduler allocating and freeing while the thread maps and unmaps
            held.append(kvs[0].alloc(3))
            kvs[0].free(held.pop(0))
            m.request({"m0": 3})
        m.request({})
        for blocks in held:
            kvs[0].free(blocks)
        m.request({})
        assert _wait_for(lambda: pool.free_pages == pool.total_pages)
        _check_invariants(pool, kvs, [[], [], []])
    finally:
        m.close()


def test_maintain_premaps_the_next_steps_demand() -> None:
    pool, (a, b, _) = _pool(pages=12)
    want = a.bundle_blocks + 5                                          # more than one bundle's worth
    pool.maintain({"m0": want, "m1": 0})
    assert a.stats().free_blocks >= want
    maps_before = pool.used_pages
    a.alloc(want)                                                        # the step itself maps nothing
    assert pool.used_pages == maps_before
    pool.maintain({})                                                    # all idle: everything returns
    assert b.mapped_bytes == 0 and a.stats().used_blocks == want


def test_maintain_keeps_the_recent_peak_mapped() -> None:
    """A batch whose sequences all cross a block boundary on one step in every block_size: the bundle that
    step needs stays mapped between the peaks (no map/unmap churn) even when the pool runs low, its other free
    bundles go once the peak leaves the window, and all go once the model is idle."""
    from crosspool.pools.kv_pool import LOW_WATER, PEAK_WINDOW

    pool, (a, b, _) = _pool(pages=128)
    hog = b.alloc((128 - 6 * a.bundle_pages - 3) // b.bundle_pages * b.bundle_blocks)   # another model
    a.free(a.alloc(6 * a.bundle_blocks))                 # free bundles beyond any peak; the pool is now low
    assert pool.free_pages < LOW_WATER * pool.total_pages
    peak = 2 * a.bundle_blocks
    held: list[int] = []
    pool.maintain({"m0": peak, "m1": 0})
    peak_mapped = (a.reserve_blocks(peak) + a.bundle_blocks) * a.block_bytes
    for step in range(3 * 16):
        demand = peak if step % 16 == 15 else 0
        pool.maintain({"m0": demand, "m1": 0})
        assert a.stats().free_blocks >= peak and a.mapped_bytes >= peak_mapped   # the peak's bundles stay
        if demand:
            held += a.alloc(peak)
            a.free(held)
            held = []
    for _ in range(PEAK_WINDOW):                  # the peak leaves the window: back to reserve + one bundle
        pool.maintain({"m0": 0, "m1": 0})
    assert a.stats().free_blocks <= a.reserve_blocks(0) + 2 * a.bundle_blocks
    b.free(hog)
    pool.maintain({})
    assert a.mapped_bytes == 0 and b.mapped_bytes == 0


def test_active_model_keeps_free_bundles_while_the_pool_has_room() -> None:
    """Unmapping stalls the steps running beside it (a driver call and a device sync), so an active model's free
    bundles stay mapped until the pool runs low or the model goes idle."""
    from crosspool.pools.kv_pool import PEAK_WINDOW

    pool, (a, _, _) = _pool(pages=64)
    a.free(a.alloc(20 * a.bundle_blocks))           # a prefill's worth of blocks, freed
    unmapped = pool.bundles_unmapped
    for _ in range(2 * PEAK_WINDOW):
        pool.maintain({"m0": 1})
    assert pool.bundles_unmapped == unmapped and a.stats().free_blocks >= 20 * a.bundle_blocks
    pool.maintain({})
    assert a.mapped_bytes == 0 and pool.free_pages == pool.total_pages


class _RecordingBackend:
    """The CPU backend, recording the page ranges it maps and unmaps."""

    def __init__(self) -> None:
        from crosspool.pools.kv_pool import CpuPageBackend

        self.inner = CpuPageBackend()
        self.page_bytes = self.inner.page_bytes
        self.calls: list[tuple[int, int]] = []

    def reserve(self, nbytes: int):
        return self.inner.reserve(nbytes)

    def map(self, vrange, first_page: int, num_pages: int) -> None:
        self.calls.append((first_page, num_pages))
        self.inner.map(vrange, first_page, num_pages)

    def unmap(self, vrange, first_page: int, num_pages: int) -> None:
        self.calls.append((first_page, num_pages))
        self.inner.unmap(vrange, first_page, num_pages)

    def release(self, vrange) -> None:
        self.inner.release(vrange)


def test_the_range_base_is_never_remapped() -> None:
    """Kernels are launched with the range's base address (Triton checks on every eager launch that it is
    mapped): the guard bundle holding it is never mapped over or unmapped, and no block lives in it."""
    backend = _RecordingBackend()
    pool = KVPool(24 * PAGE_BYTES, backend)
    kvs = [pool.register(f"m{i}", s, 16, torch.float32) for i, s in enumerate(SPECS)]
    for _ in range(3):
        for kv in kvs:
            got = kv.alloc(kv.num_free_blocks())      # each model in turn takes the whole pool
            assert min(got) >= kv.bundle_blocks
            kv.free(got)
            pool.maintain({})
    assert backend.calls and pool.free_pages == pool.total_pages
    smallest_guard = min(kv.bundle_pages for kv in kvs)
    assert all(first >= smallest_guard for first, _ in backend.calls)
    for kv in kvs:
        assert kv.buffer.data_ptr() == kv.vrange.tensor().data_ptr()
        assert kv.buffer.shape[0] == kv.max_blocks + kv.bundle_blocks


def test_another_models_next_step_takes_an_active_models_spare_bundles() -> None:
    """An active model holding free bundles from an earlier prefill gives them up when another model's next step
    needs the pages, before that step: the other model finds its blocks pre-mapped and never maps (or reclaims)
    on the engine thread."""
    pool, (a, b, _) = _pool(pages=128)
    a.free(a.alloc(100 // a.bundle_pages * a.bundle_blocks))     # a's prefill came and went: ~100 pages mapped
    want = 60 // b.bundle_pages * b.bundle_blocks                 # b's next step: ~60 pages
    pool.maintain({"m0": 1, "m1": want})
    assert b.stats().free_blocks >= want
    assert a.stats().free_blocks <= a.reserve_blocks(1) + 2 * a.bundle_blocks
    on_alloc = pool.bundles_mapped_on_alloc
    b.alloc(want)
    assert pool.bundles_mapped_on_alloc == on_alloc
