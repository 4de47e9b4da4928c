"""The megakernel's attention phase (issue 4): its plan and tile codes, its torch reference against the engine's
torch path (`torch_ref`), and on an sm_90 GPU the kernel against that reference."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from crosspool.kernels import megakernel as mk
from crosspool.kernels import torch_ref
from crosspool.kernels.megakernel import Phase
from crosspool.models.spec import RopeSpec

EPS = 1e-5
D = mk.HEAD_DIM


def _chain(heads: int, splits: int, layer: int = 1) -> list[Phase]:
    """A layer's attention half: normed QKV, attention (q/k norms, RoPE, the cache), o_proj + the step's input."""
    hd = heads * D
    return [
        Phase("sum", 0, 0, 3 * hd, hd, norm=0),
        Phase("attention", 0, layer, hd, D, sources=splits, input=0, norm=hd, scale=1 / math.sqrt(D)),
        Phase("sum", 0, 3 * hd, hd, hd, input=1, residual=-1),
    ]


def _weights(heads: int, device: str, seed: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    hd = heads * D
    g = torch.Generator().manual_seed(seed)
    fam = [(torch.randn(4 * hd, hd, generator=g) * 0.03).to(device, torch.bfloat16)]
    norms = (1 + 0.2 * torch.randn(3 * hd, generator=g)).to(device, torch.bfloat16)
    return fam, norms


def _step(heads: int, ctx: int, device: str, seed: int, layers: int = 2, blocks: int = 100) -> mk.Step:
    """A cache of random keys and values at random blocks, and cos/sin of position ctx - 1 (OLMoE's RoPE)."""
    g = torch.Generator().manual_seed(seed)
    kv = torch.randn(blocks, layers, 2, mk.BLOCK, heads, D, generator=g).to(device, torch.bfloat16)
    table = torch.randperm(blocks, generator=g)[:-(-ctx // mk.BLOCK)].to(torch.int32)
    rope = RopeSpec(dim=D, theta=10000.0, interleaved=False)
    cos, sin = torch_ref.rope_cos_sin(rope, torch.tensor([ctx - 1]), torch_ref.rope_inv_freq(rope))
    return mk.Step(kv, table.to(device), ctx, cos[0].to(device), sin[0].to(device))


@pytest.mark.parametrize("ctx", [1, 17, 300, 1000])
@pytest.mark.parametrize("splits", [1, 4])
def test_attention_reference_matches_the_engines_torch_path(ctx: int, splits: int) -> None:
    heads, layer = 4, 1
    hd = heads * D
    fam, norms = _weights(heads, "cpu", 0)
    step = _step(heads, ctx, "cpu", 1)
    ours = mk.Step(step.kv.clone(), step.block_table, ctx, step.cos, step.sin)
    qkv = torch.randn(3 * hd, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16).float()
    phase = _chain(heads, splits, layer)[1]
    outs = mk.attend_reference(phase, qkv, norms, EPS, ours)
    got = outs[-hd:]                                     # the heads, combined (after the partials and their lse)
    assert torch.equal(got, mk.combine(outs[:-hd], splits))
    # the engine's torch path (bf16 throughout: it rounds scores and probabilities, so agreement is to ~1e-2)
    q, k, v = (qkv[j * hd:(j + 1) * hd].to(torch.bfloat16) for j in range(3))
    q = torch_ref.rms_norm(q, norms[hd:2 * hd], EPS).view(1, heads, D)
    k = torch_ref.rms_norm(k, norms[2 * hd:], EPS).view(1, heads, D)
    cos, sin = step.cos[None], step.sin[None]
    q, k = torch_ref.apply_rope(q, cos, sin, False), torch_ref.apply_rope(k, cos, sin, False)
    k_cache, v_cache = step.kv[:, layer, 0], step.kv[:, layer, 1]
    slot = torch.tensor([(int(step.block_table[(ctx - 1) // mk.BLOCK])) * mk.BLOCK + (ctx - 1) % mk.BLOCK])
    torch_ref.write_kv(k_cache, slot, k)
    torch_ref.write_kv(v_cache, slot, v.view(1, heads, D))
    want = torch_ref.padded_attention(q, torch_ref.gather_kv(k_cache, step.block_table[None].long()),
                                      torch_ref.gather_kv(v_cache, step.block_table[None].long()),
                                      torch.tensor([0]), torch.tensor([ctx - 1]), 1 / math.sqrt(D))
    torch.testing.assert_close(got, want.float().reshape(-1), rtol=5e-2, atol=2e-2)
    # the cache now holds the same new key and value (k to one bf16 rounding of the rotation)
    torch.testing.assert_close(ours.kv.float(), step.kv.float(), rtol=1e-2, atol=1e-2)
    assert torch.equal(ours.kv[:, layer, 1], step.kv[:, layer, 1])
    others = [i for i in range(step.kv.shape[1]) if i != layer]
    assert torch.equal(ours.kv[:, others], step.kv[:, others])


def test_attention_splits_agree_and_empty_splits_weigh_nothing() -> None:
    heads, ctx = 2, 130
    hd = heads * D
    _, norms = _weights(heads, "cpu", 3)
    qkv = torch.randn(3 * hd, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16).float()
    outs = {}
    for splits in (1, 2, 4, 8):
        step = _step(heads, ctx, "cpu", 5)
        partials = mk.attend_reference(_chain(heads, splits)[1], qkv, norms, EPS, step)
        lse = partials[splits * hd:-hd].view(splits, heads)
        span = mk.split_positions(ctx, splits)
        assert span % mk.KV_SLOT == 0 and span * splits >= ctx
        for s in range(splits):                          # a split past the context: no positions, lse -inf
            assert torch.isinf(lse[s]).all() == (s * span >= ctx)
        outs[splits] = partials[-hd:]
    for splits in (2, 4, 8):                             # partials are rounded to bf16 before the combine
        torch.testing.assert_close(outs[splits], outs[1], rtol=2e-2, atol=1e-2)


def test_attention_phases_are_planned_and_coded() -> None:
    heads, splits = 4, 4
    fam, _ = _weights(heads, "cpu", 0)
    p = mk.plan(_chain(heads, splits), fam, heads * D, 3 * heads * D)
    row = p.table[1].tolist()
    assert row[mk.F_KIND] == mk.ATTENTION and row[mk.F_ITEMS] == heads * splits and row[mk.F_ROW0] == 1
    assert row[mk.F_IN_CHUNKS] == 2 * heads * D // mk.CHUNK and row[mk.F_NORM_SEG] == heads * D // mk.CHUNK
    assert torch.tensor([row[mk.F_SCALE]], dtype=torch.int32).view(torch.float32).item() == \
        pytest.approx(math.log2(math.e) / math.sqrt(D))
    # the attention's words: partials, one lse a (split, head), the combined heads, an arrival count a head;
    # o_proj stages the combined heads
    partials = splits * heads * D // 2 + splits * heads
    assert p.out_offsets[2] - p.out_offsets[1] == partials + heads * D // 2 + heads
    assert p.table[2, mk.F_IN_OFF].item() == p.out_offsets[1] + partials
    assert p.table[2, mk.F_IN_CHUNKS].item() == heads * D // mk.CHUNK
    assert p.table[0, mk.F_NORM_SEG].item() == p.table[0, mk.F_IN_CHUNKS].item()    # one norm, the whole input
    codes = mk.tile_lists(p, 5)
    attn = [c for r in range(5) for c in codes[r, 1:1 + codes[r, 0]].tolist() if c < 0]
    assert sorted(c & 0xFFFF for c in attn) == list(range(heads * splits))
    assert all((c >> 16) & 0x7FFF == 1 for c in attn)
    assert 1 not in mk.dynamic_phases(p, sums_above=0)
    with pytest.raises(ValueError, match="only sum and swiglu"):
        mk.tile_lists(p, 5, dynamic=[1])                 # an attention phase's items are not dynamic


def test_bad_attention_phases_are_rejected() -> None:
    heads = 4
    hd = heads * D
    fam, _ = _weights(heads, "cpu", 0)
    good = _chain(heads, 2)

    def chain(**change: object) -> list[Phase]:
        return [good[0], dataclasses.replace(good[1], **change), good[2]]

    bad = {
        "heads of k = 128": chain(k=64),
        "1, 2, 4 or 8 splits": chain(sources=3),
        "stages q and k": chain(input=-1),
        "norm weights": chain(norm=2 * hd),
        "positive scale": chain(scale=0.0),
        "takes no residual": chain(residual=0),
    }
    for message, phases in bad.items():
        with pytest.raises(ValueError, match=message):
            mk.plan(phases, fam, hd, 3 * hd)
    with pytest.raises(ValueError, match="only the input of a one-source sum"):
        mk.plan(good[:2] + [Phase("sum", 0, 3 * hd, hd, hd, input=1, norm=0)], fam, hd, 3 * hd)
    with pytest.raises(ValueError, match="splits its heads alike"):
        mk.plan(good[:2] + [dataclasses.replace(good[1], sources=4)], fam, hd, 3 * hd)


gpu = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
                         reason="needs an sm_90 GPU")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize(("splits", "warps"), [(1, 4), (4, 4), (4, 8)])
def test_attention_chain_matches_reference_and_writes_the_cache(splits: int, warps: int, graph_launch) -> None:  # noqa: ANN001
    """QKV, attention and o_proj on the GPU at several context lengths (eager, then graph replays): every phase
    against the reference fed the kernel's own earlier outputs, and the cache against the reference's writes."""
    heads = 16
    hd = heads * D
    fam, norms = _weights(heads, "cuda", 6)
    phases = _chain(heads, splits)
    step = _step(heads, 1, "cuda", 7, blocks=400)
    kv = step.kv.clone()
    chain = mk.Chain(phases, fam, hd, norms=norms, eps=EPS, kv=kv, max_blocks=256, warps=warps)
    x = torch.empty(hd, device="cuda")
    for i, ctx in enumerate([1, 16, 17, 129, 1000, 1024, 3001]):
        s = _step(heads, ctx, "cuda", 8 + i, blocks=400)
        kv.copy_(s.kv)
        x.copy_(torch.randn(hd, generator=torch.Generator().manual_seed(20 + i)))
        chain.set_step(ctx, s.block_table, s.cos, s.sin)
        if i < 3:                                        # eager launches, then a graph's replays
            chain.run(x)
            torch.cuda.synchronize()
        else:
            graph_launch(lambda: chain.run(x))
        chain.check()
        got = chain.outputs()
        want_step = mk.Step(s.kv.clone(), s.block_table, ctx, s.cos, s.sin)
        want = mk.reference(phases, fam, x, norms, EPS, given=got, step=want_step)
        for j, (a, b) in enumerate(zip(got, want, strict=True)):
            torch.testing.assert_close(a, b, rtol=1e-2, atol=2e-3, msg=lambda m, j=j, c=ctx: f"ctx {c} phase {j}: {m}")
        torch.testing.assert_close(kv.float(), want_step.kv.float(), rtol=1e-2, atol=1e-2)
