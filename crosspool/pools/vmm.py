"""CUDA VMM page backend for the KV pool, in pure Python over `cuda.bindings.driver`.

A model's range is reserved once (cuMemAddressReserve) and every page of it starts mapped to ONE shared
physical zero page, so reads of unbacked blocks return zeros and never fault. Backing a bundle swaps the
zero mappings of its pages for one fresh physical allocation (cuMemCreate + cuMemMap + cuMemSetAccess);
unbacking swaps back and releases the allocation to the driver. Virtual addresses never change, so
tensors and captured CUDA graphs over the range stay valid across remaps.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

PAGE_BYTES = 2 << 20


def check_cu(result: tuple) -> object:
    """The value(s) of a `cuda.bindings.driver` call (which returns (error, value...)); raises on an error."""
    err, *rest = result if isinstance(result, tuple) else (result,)
    from cuda.bindings import driver as cu

    if err != cu.CUresult.CUDA_SUCCESS:
        _, name = cu.cuGetErrorName(err)
        raise RuntimeError(f"CUDA driver call failed: {name.decode() if isinstance(name, bytes) else name}")
    if not rest:
        return None
    return rest[0] if len(rest) == 1 else tuple(rest)


class _ArrayInterface:
    """Lets torch wrap a raw device range as a uint8 tensor without copying."""

    def __init__(self, ptr: int, nbytes: int) -> None:
        self.__cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1", "data": (ptr, False), "version": 3}


@dataclass
class CudaRange:
    ptr: int
    nbytes: int
    device: int
    handles: dict[int, tuple[object, int]] = field(default_factory=dict)   # first page -> (handle, pages)
    _tensor: torch.Tensor | None = None

    def tensor(self) -> torch.Tensor:
        if self._tensor is None:
            self._tensor = torch.as_tensor(_ArrayInterface(self.ptr, self.nbytes), device=f"cuda:{self.device}")
        return self._tensor


class CudaPageBackend:
    def __init__(self, device: int | torch.device | str = 0) -> None:
        from cuda.bindings import driver as cu

        self.cu = cu
        self.device = device if isinstance(device, int) else (torch.device(device).index or 0)
        torch.cuda.init()
        torch.zeros(1, device=f"cuda:{self.device}")          # make torch's primary context current
        prop = cu.CUmemAllocationProp()
        prop.type = cu.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
        prop.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        prop.location.id = self.device
        self.prop = prop
        gran = check_cu(cu.cuMemGetAllocationGranularity(
            prop, cu.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_MINIMUM))
        if PAGE_BYTES % int(gran):
            raise RuntimeError(f"VMM granularity {gran} does not divide the {PAGE_BYTES} B page")
        self.page_bytes = PAGE_BYTES
        access = cu.CUmemAccessDesc()
        access.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        access.location.id = self.device
        access.flags = cu.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
        self.access = access
        self.zero_handle = check_cu(cu.cuMemCreate(PAGE_BYTES, prop, 0))
        # zero the shared page once through a temporary mapping
        tmp = int(check_cu(cu.cuMemAddressReserve(PAGE_BYTES, PAGE_BYTES, 0, 0)))
        self._map(tmp, PAGE_BYTES, self.zero_handle)
        torch.as_tensor(_ArrayInterface(tmp, PAGE_BYTES), device=f"cuda:{self.device}").zero_()
        torch.cuda.synchronize(self.device)
        check_cu(cu.cuMemUnmap(tmp, PAGE_BYTES))
        check_cu(cu.cuMemAddressFree(tmp, PAGE_BYTES))

    def _map(self, ptr: int, nbytes: int, handle: object) -> None:
        check_cu(self.cu.cuMemMap(ptr, nbytes, 0, handle, 0))
        check_cu(self.cu.cuMemSetAccess(ptr, nbytes, [self.access], 1))

    def reserve(self, nbytes: int) -> CudaRange:
        nbytes = -(-nbytes // PAGE_BYTES) * PAGE_BYTES
        ptr = int(check_cu(self.cu.cuMemAddressReserve(nbytes, PAGE_BYTES, 0, 0)))
        for off in range(0, nbytes, PAGE_BYTES):
            check_cu(self.cu.cuMemMap(ptr + off, PAGE_BYTES, 0, self.zero_handle, 0))
        check_cu(self.cu.cuMemSetAccess(ptr, nbytes, [self.access], 1))   # one call over all zero mappings
        return CudaRange(ptr, nbytes, self.device)

    def map(self, vrange: CudaRange, first_page: int, num_pages: int) -> None:
        cu = self.cu
        start = vrange.ptr + first_page * PAGE_BYTES
        size = num_pages * PAGE_BYTES
        # No sync here: only unallocated blocks sit on the zero mapping we replace, and no kernel
        # reads those (block tables are padded with the sequence's own blocks).
        handle = check_cu(cu.cuMemCreate(size, self.prop, 0))
        for p in range(num_pages):
            check_cu(cu.cuMemUnmap(start + p * PAGE_BYTES, PAGE_BYTES))
        self._map(start, size, handle)
        vrange.handles[first_page] = (handle, num_pages)

    def unmap(self, vrange: CudaRange, first_page: int, num_pages: int) -> None:
        cu = self.cu
        handle, pages = vrange.handles.pop(first_page)
        assert pages == num_pages, "unmap must match the mapped bundle"
        start = vrange.ptr + first_page * PAGE_BYTES
        torch.cuda.synchronize(self.device)   # kernels queued before the blocks were freed may still read
        check_cu(cu.cuMemUnmap(start, num_pages * PAGE_BYTES))
        check_cu(cu.cuMemRelease(handle))            # physical memory goes back to the driver
        for p in range(num_pages):
            self._map(start + p * PAGE_BYTES, PAGE_BYTES, self.zero_handle)

    def release(self, vrange: CudaRange) -> None:
        cu = self.cu
        torch.cuda.synchronize(self.device)
        vrange._tensor = None
        backed: set[int] = set()
        for first, (handle, pages) in vrange.handles.items():
            check_cu(cu.cuMemUnmap(vrange.ptr + first * PAGE_BYTES, pages * PAGE_BYTES))
            check_cu(cu.cuMemRelease(handle))
            backed.update(range(first, first + pages))
        vrange.handles.clear()
        for p in range(vrange.nbytes // PAGE_BYTES):
            if p not in backed:
                check_cu(cu.cuMemUnmap(vrange.ptr + p * PAGE_BYTES, PAGE_BYTES))
        check_cu(cu.cuMemAddressFree(vrange.ptr, vrange.nbytes))
