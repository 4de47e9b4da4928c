"""KV-cache pool: one physical page budget shared by every model's paged KV cache.

Each registered model gets its own virtual range, large enough for the whole pool, laid out block-major
([blocks, layers, n, block_size, heads, dim], see `kv_cache.py`) so attention sees one ordinary paged
tensor. Physical pages back that range on demand in *page bundles*: the fewest whole pages that hold a
whole number of blocks, i.e. the same block range in every layer's K and V. A bundle is mapped when the
model needs a block and none of its mapped blocks is free, and unmapped when all its blocks are free and
the model is idle, or when the pool runs low on free pages and the model holds more free bundles than its
recent peak demand (hysteresis), so pages flow between models. Unmapping is left for when the pages are wanted:
each unmap is a driver call and a device sync, and on a GPU it stalls the decode steps running beside it.

The first bundle of every range is a guard: never backed by a page of the pool, never remapped, so the range's
base address (the pointer every kernel is launched with, which Triton validates on each eager launch) stays
mapped while other bundles are mapped and unmapped on the maintainer thread. Blocks start after it.

The pool owns pages and bundles; it never decides which request gets a block (the scheduler does).
Backends: `CpuPageBackend` (an ordinary zero-filled tensor per range, same accounting) and
`crosspool.pools.vmm.CudaPageBackend` (CUDA VMM through `cuda.bindings.driver`).
"""

from __future__ import annotations

import collections
import heapq
import mmap
import sys
import threading
from dataclasses import dataclass, field
from typing import Protocol

import torch

from crosspool.models.spec import ModelSpec

PAGE_BYTES = 2 << 20
PEAK_WINDOW = 64   # maintain() calls over which an active model keeps its peak next-step demand mapped
LOW_WATER = 1 / 16  # below this fraction of free pool pages, active models release free bundles beyond their peak


class VirtualRange(Protocol):
    nbytes: int

    def tensor(self) -> torch.Tensor:
        """The whole range as a uint8 tensor (unbacked pages read as zeros)."""
        ...


class PageBackend(Protocol):
    page_bytes: int

    def reserve(self, nbytes: int) -> VirtualRange: ...
    def map(self, vrange: VirtualRange, first_page: int, num_pages: int) -> None: ...
    def unmap(self, vrange: VirtualRange, first_page: int, num_pages: int) -> None: ...
    def release(self, vrange: VirtualRange) -> None: ...


class KVPoolFullError(RuntimeError):
    """No free physical page is left in the pool."""


@dataclass
class _CpuRange:
    nbytes: int
    mem: mmap.mmap
    data: torch.Tensor

    def tensor(self) -> torch.Tensor:
        return self.data


_MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000 if sys.platform == "linux" else 0)


class CpuPageBackend:
    """Host memory standing in for VMM: a range is an anonymous mmap (zero pages, committed only when
    written); unmapping a bundle is madvise(DONTNEED), which returns its memory to the OS and makes it
    read as zeros again, as the shared zero page does on the GPU."""

    def __init__(self, page_bytes: int = PAGE_BYTES) -> None:
        self.page_bytes = page_bytes

    def reserve(self, nbytes: int) -> _CpuRange:
        # no swap reservation for the range (like a VMM reservation): only written pages count against memory,
        # so a process holding large ranges can still fork
        mem = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE)
        return _CpuRange(nbytes, mem, torch.frombuffer(mem, dtype=torch.uint8))

    def map(self, vrange: _CpuRange, first_page: int, num_pages: int) -> None:
        pass

    def unmap(self, vrange: _CpuRange, first_page: int, num_pages: int) -> None:
        vrange.mem.madvise(mmap.MADV_DONTNEED, first_page * self.page_bytes, num_pages * self.page_bytes)

    def release(self, vrange: _CpuRange) -> None:
        # Return the memory now, but leave the mapping to the garbage collector: tensors made from it keep
        # the mmap alive, and closing it under them would turn a stray read (a traceback printing a
        # tensor) into a segfault.
        vrange.mem.madvise(mmap.MADV_DONTNEED, 0, vrange.nbytes)
        vrange.data = torch.empty(0, dtype=torch.uint8)


@dataclass
class ModelKVStats:
    mapped_bytes: int
    used_blocks: int
    free_blocks: int
    high_water_bytes: int


@dataclass(eq=False)
class ModelKV:
    """One model's virtual KV range: the paged tensor attention reads, and its blocks."""

    name: str
    pool: KVPool
    block_size: int
    block_bytes: int
    bundle_pages: int
    bundle_blocks: int
    num_bundles: int
    buffer: torch.Tensor                  # [max_blocks, layers, n, block_size, heads, dim]
    vrange: VirtualRange
    reserve_bundles: int = 1
    _free: list[int] = field(default_factory=list)          # free blocks in mapped bundles
    _used_in_bundle: dict[int, int] = field(default_factory=dict)   # mapped bundle -> blocks in use
    _pending: set[int] = field(default_factory=set)                 # bundles being mapped right now
    _unmapped: list[int] = field(default_factory=list)              # heap of bundles neither mapped nor pending
    high_water_bytes: int = 0

    def __post_init__(self) -> None:
        self._unmapped = list(range(1, self.num_bundles + 1))    # bundle 0 is the guard; sorted: already a heap

    # ---- the interface the block manager uses ------------------------------------------------
    @property
    def max_blocks(self) -> int:
        """Blocks this model could hold with the whole pool to itself."""
        return (self.pool.total_pages // self.bundle_pages) * self.bundle_blocks

    def num_free_blocks(self) -> int:
        """Blocks obtainable now: free mapped ones plus those that free pool pages, and pages other
        models hold only as idle reserve, could map."""
        pages = self.pool.free_pages + self.pool.reclaimable_pages(exclude=self)
        pending = len(self._pending) * self.bundle_blocks      # being mapped by another thread
        return len(self._free) + pending + (pages // self.bundle_pages) * self.bundle_blocks

    def can_alloc(self, n: int) -> bool:
        """Whether n blocks are obtainable. The decode path almost always finds them among the mapped free
        blocks (the maintainer keeps a reserve); only otherwise are other models' idle bundles counted."""
        return n <= len(self._free) or n <= self.num_free_blocks()

    def alloc(self, n: int) -> list[int]:
        """n free blocks, mapping bundles as needed. Driver calls run outside the lock, so other
        models' allocations and frees never wait on this model's mapping."""
        while True:
            with self.pool.lock:
                if not self.can_alloc(n):
                    raise KVPoolFullError(f"{self.name}: need {n} blocks, {self.num_free_blocks()} obtainable")
                if len(self._free) >= n:
                    out = [self._free.pop() for _ in range(n)]
                    for b in out:
                        self._used_in_bundle[b // self.bundle_blocks] += 1
                    return out
                if self.pool.free_pages < self.bundle_pages:
                    self.pool.reclaim(self.bundle_pages, exclude=self)
                if self.pool.free_pages < self.bundle_pages:   # only a bundle being mapped can help now
                    self.pool.mapped.wait(timeout=1.0)
                    continue
                bundle = self._claim_bundle()
            self.pool.backend.map(self.vrange, bundle * self.bundle_pages, self.bundle_pages)
            with self.pool.lock:
                self._publish_bundle(bundle)
                self.pool.bundles_mapped += 1
                self.pool.bundles_mapped_on_alloc += 1     # the allocating (engine) thread waited for it

    def free(self, blocks: list[int]) -> None:
        with self.pool.lock:
            for b in blocks:
                self._used_in_bundle[b // self.bundle_blocks] -= 1
            self._free.extend(reversed(blocks))

    def layer(self, layer: int) -> list[torch.Tensor]:
        return list(self.buffer[:, layer].unbind(1))

    # ---- mapping ------------------------------------------------------------------------------
    def _claim_bundle(self) -> int:
        self.pool._take_pages(self.bundle_pages)
        bundle = heapq.heappop(self._unmapped)     # the lowest: keeps the mapped range dense
        self._pending.add(bundle)
        return bundle

    def _publish_bundle(self, bundle: int) -> None:
        self._pending.discard(bundle)
        self._used_in_bundle[bundle] = 0
        first = bundle * self.bundle_blocks
        # pop() hands out the lowest block first
        self._free.extend(range(first + self.bundle_blocks - 1, first - 1, -1))
        self.high_water_bytes = max(self.high_water_bytes, self.mapped_bytes)
        self.pool.mapped.notify_all()

    def _unmap_bundle(self, bundle: int) -> None:
        first = bundle * self.bundle_blocks
        self._free = [b for b in self._free if not first <= b < first + self.bundle_blocks]
        del self._used_in_bundle[bundle]
        heapq.heappush(self._unmapped, bundle)
        self.pool.backend.unmap(self.vrange, bundle * self.bundle_pages, self.bundle_pages)
        self.pool._return_pages(self.bundle_pages)
        self.pool.bundles_unmapped += 1

    def reserve_blocks(self, next_step_blocks: int = 0) -> int:
        """Free blocks to keep mapped: what the next step will ask for, at least `reserve_bundles`."""
        return max(next_step_blocks, self.reserve_bundles * self.bundle_blocks)

    def ensure_reserve(self, next_step_blocks: int = 0) -> None:
        """Map bundles until `reserve_blocks(next_step_blocks)` blocks are free. The driver calls run
        outside the lock, so a concurrent `alloc` from the scheduler never waits on a mapping."""
        want = self.reserve_blocks(next_step_blocks)
        while True:
            with self.pool.lock:
                if len(self._free) >= want or self.pool.free_pages < self.bundle_pages:
                    return
                bundle = self._claim_bundle()
            self.pool.backend.map(self.vrange, bundle * self.bundle_pages, self.bundle_pages)
            with self.pool.lock:
                self._publish_bundle(bundle)
                self.pool.bundles_mapped += 1

    def shrink(self, keep_free_blocks: int | None = None) -> int:
        """Unmap fully free bundles while more than `keep_free_blocks` (default: the reserve) stay free.
        Returns the number of bundles unmapped."""
        with self.pool.lock:
            keep = self.reserve_bundles * self.bundle_blocks if keep_free_blocks is None else keep_free_blocks
            done = 0
            for bundle in sorted(self._used_in_bundle, reverse=True):   # highest first: keeps the range dense
                if len(self._free) - self.bundle_blocks < keep:
                    break
                if self._used_in_bundle[bundle] == 0:
                    self._unmap_bundle(bundle)
                    done += 1
            return done

    def idle_bundles(self) -> int:
        return sum(1 for used in self._used_in_bundle.values() if used == 0)

    @property
    def mapped_bytes(self) -> int:
        return len(self._used_in_bundle) * self.bundle_pages * self.pool.page_bytes

    def stats(self) -> ModelKVStats:
        used = sum(self._used_in_bundle.values())
        return ModelKVStats(self.mapped_bytes, used, len(self._free), self.high_water_bytes)


def bundle_shape(block_bytes: int, page_bytes: int, max_pages: int = 4) -> tuple[int, int]:
    """(pages, blocks) of a page bundle: the fewest pages (at most `max_pages`) that waste the least
    space holding whole blocks. Blocks larger than a page get bundles of whole pages."""
    if block_bytes >= page_bytes:
        pages = -(-block_bytes // page_bytes)
        best = min(range(pages, pages * max_pages + 1, 1),
                   key=lambda p: (p * page_bytes - (p * page_bytes // block_bytes) * block_bytes) / (p * page_bytes))
        return best, best * page_bytes // block_bytes
    def waste(p: int) -> float:
        return 1 - (p * page_bytes // block_bytes) * block_bytes / (p * page_bytes)
    best = min(range(1, max_pages + 1), key=lambda p: (round(waste(p), 4), p))
    return best, best * page_bytes // block_bytes


class KVPool:
    """The physical page budget and the models' virtual ranges over it."""

    def __init__(self, budget_bytes: int, backend: PageBackend | None = None) -> None:
        self.backend = backend or CpuPageBackend()
        self.page_bytes = self.backend.page_bytes
        self.total_pages = budget_bytes // self.page_bytes
        if self.total_pages < 1:
            raise ValueError(f"KV pool budget {budget_bytes} B is below one {self.page_bytes} B page")
        self.free_pages = self.total_pages
        # bundles mapped / unmapped so far, and mapped by an allocation that found no free block (benchmarks)
        self.bundles_mapped = self.bundles_unmapped = self.bundles_mapped_on_alloc = 0
        self.models: dict[str, ModelKV] = {}
        self.lock = threading.RLock()
        self.mapped = threading.Condition(self.lock)     # notified whenever a bundle finishes mapping
        # each active model's next-step demands over the last PEAK_WINDOW maintain() calls
        self._recent_demand: dict[str, collections.deque[int]] = {}

    def register(self, name: str, spec: ModelSpec, block_size: int, dtype: torch.dtype,
                 reserve_bundles: int = 1) -> ModelKV:
        if name in self.models:
            raise ValueError(f"model {name!r} already has a KV range")
        n, heads, dim = spec.kv_cache_entries
        elem = torch.finfo(dtype).bits // 8
        block_bytes = spec.num_layers * n * block_size * heads * dim * elem
        bundle_pages, bundle_blocks = bundle_shape(block_bytes, self.page_bytes)
        if bundle_pages > self.total_pages:
            raise ValueError(f"{name}: one page bundle ({bundle_pages} pages) exceeds the pool ({self.total_pages})")
        num_bundles = self.total_pages // bundle_pages
        bundle_bytes = bundle_pages * self.page_bytes
        vrange = self.backend.reserve((num_bundles + 1) * bundle_bytes)     # + the guard bundle
        # blocks are spaced evenly inside a bundle; the stride may exceed block_bytes by a little padding
        stride = (bundle_bytes // bundle_blocks) // elem
        inner = (n * block_size * heads * dim, block_size * heads * dim, heads * dim, dim, 1)
        shape = ((num_bundles + 1) * bundle_blocks, spec.num_layers, n, block_size, heads, dim)
        flat = vrange.tensor()[: (num_bundles + 1) * bundle_bytes].view(dtype)
        buffer = flat.as_strided(shape, (stride, *inner))
        kv = ModelKV(name, self, block_size, block_bytes, bundle_pages, bundle_blocks, num_bundles, buffer,
                     vrange, reserve_bundles)
        self.models[name] = kv
        return kv

    def unregister(self, name: str, force: bool = False) -> None:
        """Drop a model's range and return its pages; unless `force`, its blocks must all be free."""
        with self.lock:
            self._unregister(name, force)

    def _unregister(self, name: str, force: bool) -> None:
        kv = self.models[name]
        if not force and any(kv._used_in_bundle.values()):
            raise RuntimeError(f"{name}: KV blocks still in use; finish or abort its requests first")
        del self.models[name]
        for bundle in list(kv._used_in_bundle):
            kv._unmap_bundle(bundle)
        self.backend.release(kv.vrange)

    def close(self) -> None:
        """Release every range and page (shutdown)."""
        for name in list(self.models):
            self.unregister(name, force=True)

    def maintain(self, demand: dict[str, int]) -> None:
        """Between steps. `demand` maps each active model to the blocks its next step may take.
        1. Idle models release all their free bundles.
        2. Under pressure (after every active model's next step the pool would have under LOW_WATER of its
           pages free), active models release free bundles beyond their peak demand of the last PEAK_WINDOW
           steps plus one bundle of slack (hysteresis: a batch whose sequences cross a block boundary together
           every block_size steps keeps the bundle it needs then, instead of mapping and unmapping it each
           time). Without pressure their free bundles stay mapped for their next prefill: an unmap stalls the
           steps running beside it, and a model that cannot pre-map its next step would map (or reclaim
           another model's bundles) on the engine thread.
        3. Active models pre-map their next step's demand (at least their reserve), so that step does not map."""
        active = {name: kv for name, kv in self.models.items() if name in demand}
        for name, kv in list(self.models.items()):
            if name not in active:
                self._recent_demand.pop(name, None)
                kv.shrink(keep_free_blocks=0)
        for name in active:
            self._recent_demand.setdefault(name, collections.deque(maxlen=PEAK_WINDOW)).append(demand[name])
        if self.free_pages - self._pages_to_premap(active, demand) < LOW_WATER * self.total_pages:
            for name, kv in active.items():
                kv.shrink(keep_free_blocks=kv.reserve_blocks(max(self._recent_demand[name])) + kv.bundle_blocks)
        for name, kv in active.items():
            kv.ensure_reserve(demand[name])

    @staticmethod
    def _pages_to_premap(active: dict[str, ModelKV], demand: dict[str, int]) -> int:
        """Pages the active models' `ensure_reserve` would map now."""
        pages = 0
        for name, kv in active.items():
            missing = kv.reserve_blocks(demand[name]) - len(kv._free) - len(kv._pending) * kv.bundle_blocks
            pages += max(0, -(-missing // kv.bundle_blocks)) * kv.bundle_pages
        return pages

    def reclaimable_pages(self, exclude: ModelKV | None = None) -> int:
        return sum(kv.idle_bundles() * kv.bundle_pages for kv in self.models.values() if kv is not exclude)

    def reclaim(self, pages: int, exclude: ModelKV | None = None) -> None:
        """Unmap other models' fully free bundles until `pages` pages are free (caller holds the lock)."""
        for kv in self.models.values():
            if self.free_pages >= pages:
                return
            if kv is not exclude:
                for bundle in sorted(kv._used_in_bundle, reverse=True):
                    if self.free_pages >= pages:
                        return
                    if kv._used_in_bundle[bundle] == 0:
                        kv._unmap_bundle(bundle)

    def _take_pages(self, n: int) -> None:
        if n > self.free_pages:
            raise KVPoolFullError(f"KV pool: need {n} pages, {self.free_pages} free")
        self.free_pages -= n

    def _return_pages(self, n: int) -> None:
        self.free_pages += n
        assert self.free_pages <= self.total_pages

    @property
    def used_pages(self) -> int:
        return self.total_pages - self.free_pages

    @property
    def usage(self) -> float:
        return self.used_pages / self.total_pages


class KVMaintainer:
    """Runs `KVPool.maintain` on a background thread, woken after each engine step, so page mapping
    and unmapping stay off the decode path."""

    def __init__(self, pool: KVPool) -> None:
        self.pool = pool
        self._demand: dict[str, int] = {}
        self._wake = threading.Event()
        self._stop = False
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="kv-maintainer", daemon=True)
        self._thread.start()

    def request(self, demand: dict[str, int]) -> None:
        if self.error is not None:
            raise RuntimeError("KV maintainer thread died") from self.error
        self._demand = dict(demand)
        self._wake.set()

    def _run(self) -> None:
        while not self._stop:
            self._wake.wait()
            self._wake.clear()
            if self._stop:
                return
            try:
                self.pool.maintain(self._demand)
            except BaseException as exc:   # surfaced to the engine on its next request()
                self.error = exc
                return

    def close(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=30)
