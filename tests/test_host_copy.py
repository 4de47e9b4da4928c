"""`host_copy`: copies by the SMs against torch's copy, on fresh random inputs (CPU: Triton's interpreter); on a
GPU, through pinned host memory's device view both ways, and in the engine's decode inputs and token readback."""

from __future__ import annotations

import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")
if not CUDA:
    pytest.importorskip("numpy")

from crosspool.kernels import host_copy  # noqa: E402

DEVICE = torch.device("cuda" if CUDA else "cpu")


@pytest.mark.parametrize("n, n2", [(1, 0), (5, 3), (1024, 1), (3000, 2049)])
def test_copy_matches_torch_for_one_or_two_pairs(n: int, n2: int) -> None:
    g = torch.Generator().manual_seed(n * 7 + n2)
    src = torch.randint(-2**40, 2**40, (n,), generator=g).to(DEVICE)
    dst = torch.full((n,), -7, dtype=torch.long, device=DEVICE)
    if n2:
        src2 = torch.randn(n2, generator=g).to(DEVICE)
        dst2 = torch.zeros(n2, device=DEVICE)
        host_copy.copy(dst, src, dst2, src2)
        assert torch.equal(dst2, src2)
    else:
        host_copy.copy(dst, src)
    assert torch.equal(dst, src)


def test_copy_rejects_mismatched_pairs() -> None:
    a = torch.zeros(4, dtype=torch.long, device=DEVICE)
    with pytest.raises(ValueError, match="into"):
        host_copy.copy(a, torch.zeros(5, dtype=torch.long, device=DEVICE))
    with pytest.raises(ValueError, match="into"):
        host_copy.copy(a, torch.zeros(4, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="contiguous"):
        host_copy.copy(a, torch.zeros(4, 2, dtype=torch.long, device=DEVICE)[:, 0])
    with pytest.raises(ValueError, match="both dst2 and src2"):
        host_copy.copy(a, a, dst2=a)


def test_host_view_needs_pinned_memory() -> None:
    with pytest.raises(ValueError, match="pinned"):
        host_copy.host_view(torch.zeros(4, dtype=torch.long), DEVICE)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a GPU")
def test_pinned_memory_both_ways_through_its_device_view() -> None:
    g = torch.Generator().manual_seed(3)
    host = torch.randint(0, 2**50, (7, 300), generator=g).pin_memory()
    view = host_copy.host_view(host, DEVICE)
    assert view.device.type == "cuda" and view.data_ptr() == host.data_ptr()
    dev = torch.zeros(7, 300, dtype=torch.long, device=DEVICE)
    tokens = torch.randint(0, 50_000, (9,), generator=g).to(DEVICE)
    out = torch.zeros(9, dtype=torch.long).pin_memory()
    host_copy.copy(dev, view, host_copy.host_view(out, DEVICE), tokens)
    torch.cuda.synchronize()
    assert torch.equal(dev.cpu(), host)
    assert torch.equal(out, tokens.cpu())


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a GPU")
def test_decode_inputs_and_readback_copy_by_kernel() -> None:
    """`DecodeInputs.fill` stages through the device views and `TokenReadback.queue` writes the pinned buffer:
    the device sees the host's metadata and the host the device's tokens, turn after turn."""
    from types import SimpleNamespace

    from crosspool.engine.graphs import IDS, POSITIONS, DecodeInputs, TokenReadback

    inputs = DecodeInputs(DEVICE, max_batch=4, max_model_len=256, block_size=16)
    readback = TokenReadback(DEVICE, max_batch=4)
    for step in range(3):
        seqs = [SimpleNamespace(seq=SimpleNamespace(num_computed=10 + step + b, block_table=[b, 5, 6],
                                                    token_at=lambda pos: pos * 3)) for b in range(3)]
        inputs.fill(seqs, bucket=4)
        torch.cuda.synchronize()
        assert inputs.meta[POSITIONS, :3].tolist() == [10 + step + b for b in range(3)]
        assert inputs.meta[IDS, :3].tolist() == [3 * (10 + step + b) for b in range(3)]
        assert inputs.tables[:3, :3].tolist() == [[b, 5, 6] for b in range(3)]
        inputs.tokens[:3] = torch.tensor([step, 2 * step, 7], device=DEVICE)
        assert readback.queue(seqs, inputs.tokens).wait() == [step, 2 * step, 7]
