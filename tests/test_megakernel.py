"""The megakernel's chain of dependent GEMV phases (`crosspool.kernels.megakernel`): its plan and torch reference
on the CPU; the Gluon kernel against the reference on the GPU (fresh random inputs, repeated launches and graph
replays, which must never take the previous step's words for this step's)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from crosspool.kernels import megakernel as mk
from crosspool.kernels.megakernel import Phase


def _families(device: str, seed: int) -> list[torch.Tensor]:
    g = torch.Generator(device="cpu").manual_seed(seed)
    a = torch.randn(4096 + 64, 2048, generator=g) * 0.03
    b = torch.randn(4096, 1024, generator=g) * 0.03
    return [a.to(device, torch.bfloat16), b.to(device, torch.bfloat16)]


# a layer's shape in small: GEMV, gated pair over two sources, sum over two sources (+ residual), a router-sized
# GEMV on the last programs, then a GEMV that waits on it and adds the step's input
CHAIN = [
    Phase("sum", 0, 0, 2048, 2048),
    Phase("swiglu", 0, 0, 2048, 2048, sources=2, stride=2048, up_offset=1024, input=0),
    Phase("sum", 1, 0, 2048, 1024, sources=2, stride=2048, input=1, residual=0),
    Phase("sum", 0, 4096, 64, 2048, input=2, tail=True),
    Phase("sum", 0, 1024, 1024, 2048, input=2, wait=3, residual=-1),
]


# the same with RMSNorms before the phases of one input segment (weights at 0 and 2048 of the chain's norms)
NORM_CHAIN = [dataclasses.replace(ph, norm=n) for ph, n in zip(CHAIN, [0, 2048, -1, 0, 2048], strict=True)]
EPS = 1e-5


def _norms(device: str, seed: int) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(seed)
    return (1 + 0.2 * torch.randn(4096, generator=g)).to(device, torch.bfloat16)


def _by_hand(fam: list[torch.Tensor], x: torch.Tensor, norms: torch.Tensor | None = None) -> list[torch.Tensor]:
    a, b = (f.float() for f in fam)

    def r(v: torch.Tensor) -> torch.Tensor:              # staged inputs and outputs are rounded to bf16
        return v.to(torch.bfloat16).float()

    def n(v: torch.Tensor, at: int) -> torch.Tensor:     # RMSNorm, rounded as the model rounds it
        if norms is None:
            return v
        return r(norms[at:at + v.numel()].float() * r(v * torch.rsqrt(v.pow(2).mean() + EPS)))

    y0 = r(a[:2048] @ n(r(x), 0))
    z = n(y0, 2048)
    g0, u0 = a[:1024] @ z, a[1024:2048] @ z
    g1, u1 = a[2048:3072] @ z, a[3072:4096] @ z
    y1 = r(torch.cat([torch.nn.functional.silu(g0) * u0, torch.nn.functional.silu(g1) * u1]))
    y2 = r(b[:2048] @ y1[:1024] + b[2048:4096] @ y1[1024:] + y0)
    y3 = r(a[4096:4160] @ n(y2, 0))
    y4 = r(a[1024:2048] @ n(y2, 2048) + x[:1024])
    return [y0, y1, y2, y3, y4]


@pytest.mark.parametrize("normed", [False, True])
def test_reference_follows_the_phase_definitions(normed: bool) -> None:
    fam = _families("cpu", 0)
    norms = _norms("cpu", 4) if normed else None
    x = torch.randn(2048, generator=torch.Generator().manual_seed(1))
    chain = NORM_CHAIN if normed else CHAIN
    for i, (got, want) in enumerate(zip(mk.reference(chain, fam, x, norms, EPS), _by_hand(fam, x, norms),
                                        strict=True)):
        # both round to bf16; a sum in another order may land one bf16 ulp apart
        torch.testing.assert_close(got, want, rtol=8e-3, atol=1e-3, msg=lambda m, i=i: f"phase {i}: {m}")


def test_plan_lays_out_words_and_rejects_bad_chains() -> None:
    fam = _families("cpu", 0)
    p = mk.plan(CHAIN, fam, 2048)
    assert p.out_offsets == [0, 1024, 2048, 3072, 3104] and p.words == 3616         # two values a word
    assert p.table.shape == (5, mk.NCOL)
    assert p.table[1, mk.F_ITEMS].item() == 128 and p.table[1, mk.F_ITEMS_PER_SRC].item() == 64
    assert p.table[2, mk.F_IN_CHUNKS].item() == 8 and p.table[2, mk.F_RES_OFF].item() == 0
    assert p.table[4, mk.F_WAIT_OFF].item() == 3072 and p.table[4, mk.F_WAIT_N].item() == 32
    bad = {
        "kind": Phase("gemm", 0, 0, 2048, 2048),
        "family": Phase("sum", 2, 0, 2048, 2048),
        "expected \\[rows, 1024\\]": Phase("sum", 0, 0, 2048, 1024),
        "multiple of 256": Phase("sum", 0, 0, 2048, 2000),
        "which has 4160": Phase("sum", 0, 4096, 128, 2048),
        "reads 4096 input values": Phase("sum", 0, 0, 2048, 2048, sources=2, stride=0),
        "is not an earlier phase": Phase("sum", 0, 0, 2048, 2048, input=0),
    }
    for message, phase in bad.items():
        with pytest.raises(ValueError, match=message):
            mk.plan([phase], fam, 2048)
    for phase, norms_len in ((Phase("sum", 0, 0, 2048, 2048, norm=0), 0),           # no norms given
                             (Phase("sum", 0, 0, 2048, 2048, norm=1), 2048),        # runs past their end
                             (Phase("sum", 1, 0, 2048, 1024, sources=2, stride=2048, norm=0), 4096)):  # two segments
        with pytest.raises(ValueError, match="norm weights"):
            mk.plan([phase], fam, 4096, norms_len)
    assert mk.plan(NORM_CHAIN, fam, 2048, 4096).table[:, mk.F_NORM].tolist() == [0, 2048, -1, 0, 2048]
    with pytest.raises(ValueError, match="residual 0 is shorter"):
        mk.plan([Phase("sum", 0, 4096, 64, 2048), Phase("sum", 0, 0, 2048, 2048, residual=0)], fam, 2048)


@pytest.mark.parametrize("nprog", [1, 3, 132])
def test_tile_lists_give_every_tile_once_in_consumption_order(nprog: int) -> None:
    fam = _families("cpu", 0)
    p = mk.plan(CHAIN, fam, 2048)
    lists = mk.tile_lists(p, nprog)
    got = []
    for r in range(nprog):
        n = lists[r, 0].item()
        assert not lists[r, 1 + n:].any()
        got += [(c >> 28, (c >> 24) & 15, c & 0xFFFFFF) for c in lists[r, 1:1 + n].tolist()]
    want = []           # by hand: phase, item, tile; program r takes items r, r + nprog, ... (phase 3: its last
                        # programs, item i on program (i - 4) mod nprog)
    per_phase = [
        [[(0, c, 16 * i) for c in range(8)] for i in range(128)],
        [[(0, c, 16 * (i % 64) + 2048 * (i // 64) + 1024 * h) for h in range(2) for c in range(8)]
         for i in range(128)],
        [[(1, c, 16 * i + 2048 * s) for s in range(2) for c in range(4)] for i in range(128)],
        [[(0, c, 4096 + 16 * i) for c in range(8)] for i in range(4)],
        [[(0, c, 1024 + 16 * i) for c in range(8)] for i in range(64)],
    ]
    for r in range(nprog):
        for phase, items in enumerate(per_phase):
            if phase == 3:
                want += [t for i in range(4) if (i - 4) % nprog == r for t in items[i]]
            else:
                for i in range(r, len(items), nprog):
                    want += items[i]
    assert got == want
    with pytest.raises(ValueError, match="no tail"):
        mk.tile_lists(p, nprog, dynamic=[3])


def test_tile_lists_dynamic_leave_the_swiglu_phases_to_the_producer() -> None:
    """With dynamic=True every program's list holds one DYNAMIC code for each swiglu phase in place of its tiles (the
    producer takes that phase's items as it goes); the other phases' tiles are as before."""
    p = mk.plan(CHAIN, _families("cpu", 0), 2048)
    assert mk.dynamic_phases(p) == [1]
    assert mk.dynamic_phases(p, sums_above=100) == [0, 1, 2]     # and the sums of 128 items
    static, dynamic = mk.tile_lists(p, 3, 2), mk.tile_lists(p, 3, 2, dynamic=[1])
    for r in range(3):
        codes, mine = static[r, 1:1 + static[r, 0]].tolist(), dynamic[r, 1:1 + dynamic[r, 0]].tolist()
        n0 = 4 * len(range(r, 128, 3))                   # phase 0's slots: 8 chunks an item, 2 a slot
        n1 = 8 * len(range(r, 128, 3))                   # phase 1's (swiglu): 16 chunks an item
        assert len(codes) == len(mine) + n1 - 1
        assert mine[:n0] == codes[:n0]
        assert mine[n0] == mk.DYNAMIC | 1 and mine[n0] < 0 and (mine[n0] >> 30) & 1
        assert mine[n0 + 1:] == codes[n0 + n1:]


def test_tile_lists_with_boxes_keep_each_slots_first_chunk() -> None:
    p = mk.plan(CHAIN, _families("cpu", 0), 2048)
    one, two = mk.tile_lists(p, 3, 1), mk.tile_lists(p, 3, 2, pad=5)
    for r in range(3):
        n1, n2 = one[r, 0].item(), two[r, 0].item()
        assert n2 * 2 == n1 and torch.equal(two[r, 1:1 + n2], one[r, 1:1 + n1][::2])
        assert two.shape[1] >= 1 + n2 + 5 and not two[r, 1 + n2:].any()
    with pytest.raises(ValueError, match="do not divide"):
        mk.tile_lists(p, 3, 3)


def test_chain_rejects_bad_weights_and_rings_before_any_launch() -> None:
    fam = _families("cpu", 0)
    with pytest.raises(ValueError, match="1-4 weight families"):
        mk.Chain(CHAIN, fam * 3, 2048)
    with pytest.raises(ValueError, match="contiguous bf16"):
        mk.Chain(CHAIN, [fam[0].float(), fam[1]], 2048)
    with pytest.raises(ValueError, match="226 KiB"):
        mk.Chain(CHAIN, fam, 2048, stages=8, boxes=4)
    with pytest.raises(ValueError, match="norm weights"):
        mk.Chain(NORM_CHAIN, fam, 2048)                                   # normed phases, no norms given
    with pytest.raises(ValueError, match="1-D tensor"):
        mk.Chain(NORM_CHAIN, fam, 2048, norms=_norms("cpu", 4).reshape(2, -1))


# a small routed MoE: o_proj-like GEMV on x, a 16-expert router on it, top-4 experts' gate/up (intermediate 512)
# and their down, summed with their routing weights, + the GEMV's output
MOE = [
    Phase("sum", 0, 0, 2048, 2048),
    Phase("sum", 0, 2048, 16, 2048, input=0),
    Phase("swiglu", 1, 0, 4 * 512, 2048, sources=4, stride=1024, up_offset=512, input=0, route=1),
    Phase("sum", 2, 0, 2048, 512, sources=4, stride=2048, input=2, residual=0, route=1),
]


def _moe_families(device: str, seed: int) -> list[torch.Tensor]:
    g = torch.Generator(device="cpu").manual_seed(seed)
    return [(torch.randn(rows, cols, generator=g) * 0.03).to(device, torch.bfloat16)
            for rows, cols in ((2048 + 16, 2048), (16 * 1024, 2048), (16 * 2048, 512))]


def test_routed_reference_follows_softmax_top_k() -> None:
    a, gu, dn = (f.float() for f in _moe_families("cpu", 6))
    x = torch.randn(2048, generator=torch.Generator().manual_seed(7))

    def r(v: torch.Tensor) -> torch.Tensor:
        return v.to(torch.bfloat16).float()

    y0 = r(a[:2048] @ r(x))
    logits = r(a[2048:2064] @ y0)
    probs, ids = torch.softmax(logits, 0).topk(4)
    parts = []
    for e in ids.tolist():
        gate, up = gu[1024 * e:1024 * e + 512] @ y0, gu[1024 * e + 512:1024 * e + 1024] @ y0
        parts.append(torch.nn.functional.silu(gate) * up)
    y2 = r(torch.cat(parts))
    y3 = r(sum(p * (dn[2048 * e:2048 * e + 2048] @ y2[512 * s:512 * s + 512])
               for s, (e, p) in enumerate(zip(ids.tolist(), probs.tolist(), strict=True))) + y0)
    got = mk.reference(MOE, _moe_families("cpu", 6), x)
    for i, (g, w) in enumerate(zip(got, [y0, logits, y2, y3], strict=True)):
        torch.testing.assert_close(g, w, rtol=8e-3, atol=1e-3, msg=lambda m, i=i: f"phase {i}: {m}")


def test_routed_reference_breaks_ties_as_the_kernel_does() -> None:
    """Router logits equal in bf16 are common among 64 experts: the reference ranks the lower expert id first, as
    the kernel does, so a tie at the k-th place picks the same expert on both sides."""
    fam = _moe_families("cpu", 6)
    x = torch.randn(2048, generator=torch.Generator().manual_seed(7))
    given = mk.reference(MOE, fam, x)
    given[1] = torch.zeros_like(given[1])
    given[1][[12, 3, 9]] = 1.0                       # experts 3, 9 and 12 lead; the other 13 tie for the 4th place
    got = mk.reference(MOE, fam, x, given=given)
    gu, y0 = fam[1].float(), given[0]
    want = torch.cat([torch.nn.functional.silu(gu[1024 * e:1024 * e + 512] @ y0) * (gu[1024 * e + 512:1024 * e + 1024]
                                                                                      @ y0) for e in (3, 9, 12, 0)])
    torch.testing.assert_close(got[2], want.to(torch.bfloat16).float(), rtol=8e-3, atol=1e-3)


def test_routed_tiles_wait_for_their_ranking() -> None:
    p = mk.plan(MOE, _moe_families("cpu", 6), 2048)
    assert p.routed == [2, 3] and p.table[:, mk.F_ORDINAL].tolist() == [-1, -1, 0, 1]
    # both routed phases share router 1: ranking it for the gate/up serves the down too (its tiles load early)
    assert p.table[:, mk.F_ROUTE_LAST].tolist() == [-1, -1, 1, 1]
    two_routers = MOE + [dataclasses.replace(MOE[1], input=3), dataclasses.replace(MOE[3], input=2, route=4)]
    assert mk.plan(two_routers, _moe_families("cpu", 6), 2048).table[:, mk.F_ROUTE_LAST].tolist() == \
        [-1, -1, 1, 1, -1, 2]
    lists = mk.tile_lists(p, 1, 2)                      # one program: every tile, in order
    codes = lists[0, 1:1 + lists[0, 0]].tolist()
    static = 128 * 4 + 4                                 # phases 0 and 1: 8 chunks a row, 2 a slot
    assert not any(c & mk.ROUTED for c in codes[:static])
    gate_up = codes[static:static + 128 * 8]             # 128 items of 16 rows, gate then up, 4 slots each
    assert all(c & mk.ROUTED for c in gate_up)
    assert [(c >> 16) & 0xFF for c in gate_up[:1] + gate_up[-1:]] == [0, 0]
    first, last = gate_up[0] & 0xFFFF, gate_up[-1] & 0xFFFF
    assert (first >> 12, first & 0xFFF) == (0, 0)        # source 0, row 0 of the expert
    assert (last >> 12, last & 0xFFF) == (3, 512 + 496)  # source 3, up row 496 of the expert
    down = codes[static + 128 * 8:]                      # 128 items x 4 sources x 1 slot (2 chunks)
    assert len(down) == 128 * 4 and all((c >> 16) & 0xFF == 1 for c in down)
    assert [(c >> 12) & 15 for c in down[:4]] == [0, 1, 2, 3]
    bad = {"top-k": dataclasses.replace(MOE[2], sources=32, out_rows=32 * 512),
           "not an earlier phase": dataclasses.replace(MOE[2], route=3),
           "positive stride": dataclasses.replace(MOE[2], stride=0)}
    for message, phase in bad.items():
        with pytest.raises(ValueError, match=message):
            mk.plan(MOE[:2] + [phase], _moe_families("cpu", 6), 2048)


def test_scattered_down_lays_out_one_expert_an_item_and_two_fp32_buffers() -> None:
    """A scattered sum (`Phase.scatter`): items are one source's 16 rows (source by source), dynamic wherever the
    chain is, coded with that source only; its words hold two fp32 buffers of its outputs; the reference is the
    plain sum's; it cannot be the last phase, a router, or a norm's scale."""
    fam = _moe_families("cpu", 6)
    moe = MOE + [Phase("sum", 0, 0, 1024, 2048, input=3)]          # (a reader after it: a scatter is not last)
    scattered = moe[:3] + [dataclasses.replace(moe[3], scatter=True)] + moe[4:]
    plain, p = mk.plan(moe, fam, 2048), mk.plan(scattered, fam, 2048)
    assert p.table[3, mk.F_ITEMS] == 4 * 128 and p.table[3, mk.F_ITEMS_PER_SRC] == 128
    assert p.table[3, mk.F_SCATTER] == 1 and plain.table[3, mk.F_SCATTER] == 0
    assert p.words - plain.words == 2048 // 2                     # 2048 words (two fp32 buffers), not 1024
    assert mk.dynamic_phases(p) == [2, 3] and mk.dynamic_phases(plain) == [2]
    lists = mk.tile_lists(p, 1, 2)                                 # static: item i is source i // 128, rows i % 128
    codes = lists[0, 1:1 + lists[0, 0]].tolist()
    down = codes[128 * 4 + 4 + 128 * 8:][:4 * 128]                 # 512 items x 1 slot (2 chunks of 512 values)
    assert [((c >> 12) & 15, c & 0xFFF) for c in (down[0], down[127], down[128], down[511])] == \
        [(0, 0), (0, 127 * 16), (1, 0), (3, 127 * 16)]
    x = torch.randn(2048, generator=torch.Generator().manual_seed(7))
    for a, b in zip(mk.reference(moe, fam, x), mk.reference(scattered, fam, x), strict=True):
        assert torch.equal(a, b)
    bad = {"not the last phase": scattered[:4], "only the input or residual": moe[:2] + [
        dataclasses.replace(moe[2], route=1), dataclasses.replace(moe[3], scatter=True),
        dataclasses.replace(moe[3], residual=0, wait=3)]}
    for message, chain in bad.items():
        with pytest.raises(ValueError, match=message):
            mk.plan(chain, fam, 2048)


def test_folded_router_routes_as_the_router_after_the_norm() -> None:
    """A router folded through its norm (`Phase.rms_of`: rows R g reading x itself, not R reading norm(x)) picks the
    same experts and weighs them alike: its outputs are the logits times x's RMS, which the routed phases take
    out. The plan rejects folded routers it cannot run."""
    fam = _moe_families("cpu", 6)
    g = torch.Generator().manual_seed(8)
    norms = (1 + 0.3 * torch.randn(2048, generator=g)).to(torch.bfloat16)
    x = torch.randn(2048, generator=g)
    plain = [MOE[0], dataclasses.replace(MOE[1], norm=0), dataclasses.replace(MOE[2], norm=0), MOE[3]]
    folded = [MOE[0], dataclasses.replace(MOE[1], rms_of=0), dataclasses.replace(MOE[2], norm=0), MOE[3]]
    fam_folded = [fam[0].clone(), fam[1], fam[2]]
    fam_folded[0][2048:2064] = (fam[0][2048:2064].float() * norms.float()).to(torch.bfloat16)
    want = mk.reference(plain, fam, x, norms)
    got = mk.reference(folded, fam_folded, x, norms)
    rstd = torch.rsqrt(want[0].pow(2).mean() + 1e-5)
    torch.testing.assert_close(got[1] * rstd, want[1], rtol=2e-2, atol=2e-2)           # the logits, scaled
    assert torch.equal(got[2], want[2])                  # the same experts, the same staged input
    # weighed alike: the experts' part of the down (its residual aside) to 1.6% of its scale here; with the
    # logits left unscaled, 21%
    routed, want_routed = got[3] - want[0], want[3] - want[0]
    assert (routed - want_routed).abs().max() < 0.03 * want_routed.abs().max()
    assert mk.plan(folded, fam_folded, 2048, 2048).table[:, mk.F_ROUTE_SCALED].tolist() == [0, 0, 1, 1]
    bad = {"at most 64 outputs": [MOE[0], Phase("sum", 0, 0, 128, 2048, input=0, rms_of=0)],
           "an earlier phase": [dataclasses.replace(MOE[0], rms_of=0)],
           "stage all of that phase's outputs with a norm": folded[:2] + [MOE[2]]}
    for message, chain in bad.items():
        with pytest.raises(ValueError, match=message):
            mk.plan(chain, fam_folded, 2048, 2048)


def test_chain_of_an_olmoe_ffn_half_matches_the_engines_torch_path() -> None:
    """The chain's semantics against the engine's own model code: OLMoE's post-attention norm, router, routing rule
    (softmax, greedy top-8, no renormalization) and experts, at the real hidden and intermediate sizes (16
    experts, to keep the test light)."""
    from crosspool.kernels import torch_ref
    from crosspool.models.ffn_side import FFNSide
    from crosspool.models.loader import FFNWeights
    from crosspool.models.presets import get_preset
    from crosspool.models.spec import ModelSpec

    spec = ModelSpec.from_hf_config(get_preset("olmoe-1b-7b").config | {"num_hidden_layers": 1, "num_experts": 16})
    hid, inter, n_exp, top_k = spec.hidden_size, 1024, 16, spec.routing.top_k
    g = torch.Generator().manual_seed(11)

    def rand(*shape: int, std: float = 0.02) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * std).to(torch.bfloat16)

    w = {"router": rand(n_exp, hid), "experts_gate_up": rand(n_exp, 2 * inter, hid),
         "experts_down": rand(n_exp, hid, inter)}
    norm_w = (1 + 0.1 * torch.randn(hid, generator=g)).to(torch.bfloat16)
    ffn = FFNSide(spec, FFNWeights(layers=[w]), kernels="torch")
    chain = [
        Phase("sum", 0, 0, n_exp, hid, norm=0),
        Phase("swiglu", 1, 0, top_k * inter, hid, sources=top_k, stride=2 * inter, up_offset=inter, norm=0, route=0),
        Phase("sum", 2, 0, hid, inter, sources=top_k, stride=hid, input=1, route=0),
    ]
    fams = [w["router"], w["experts_gate_up"].reshape(-1, hid), w["experts_down"].reshape(-1, inter)]
    compared = 0
    for seed in range(4):
        h = (torch.randn(hid, generator=torch.Generator().manual_seed(20 + seed)) * 3).to(torch.bfloat16)
        x = torch_ref.rms_norm(h[None], norm_w, spec.rms_norm_eps)
        engine = ffn.forward(0, x)[0].float()          # the FFN's output, before the residual add
        logits = torch_ref.linear(x, w["router"])[0].float()
        top = logits.topk(top_k + 1).values
        if top[top_k - 1] - top[top_k] < 0.02:         # a near-tie may rank the other way in either: skip
            continue
        compared += 1
        got = mk.reference(chain, fams, h.float(), norm_w, spec.rms_norm_eps)
        torch.testing.assert_close(got[0], logits, rtol=8e-3, atol=1e-3)
        err = (got[2] - engine).abs().max() / engine.abs().max()
        # the engine rounds gate/up and each expert's rows to bf16 before summing; the chain keeps them in fp32
        # (gate rows read as up rows would give ~1.8 here, no norm before the experts ~9)
        assert err < 2e-2, f"seed {seed}: max error {err:.2e} of the FFN output's scale"
    assert compared >= 2


def test_unpack_reads_two_bf16_values_a_word_in_order() -> None:
    v = torch.randn(32, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    bits = v.view(torch.int16).to(torch.int64) & 0xFFFF
    words = []
    for item in range(2):                  # word j of an item: value j low, value j + 8 high, the tag above
        for j in range(8):
            words.append(bits[16 * item + j] | (bits[16 * item + j + 8] << 16) | (77 << 32))
    assert torch.equal(mk.unpack(torch.stack(words)), v.float())


def _check_phases(chain: mk.Chain, phases: list[Phase], fam: list[torch.Tensor], x: torch.Tensor,
                  norms: torch.Tensor | None) -> None:
    """Every phase of the kernel's outputs against the reference fed the kernel's own earlier outputs (inputs,
    residuals, router logits): each phase is checked to about one bf16 rounding, as none carries the roundings of
    the phases before (from one fp32 order to another, an output's bf16 rounding can flip one ulp, and across a
    chain those flips add up to far more than a phase's own error). The first phase has no earlier phase: it is
    the step's input against the reference outright."""
    got = chain.outputs()
    for i, want in enumerate(mk.reference(phases, fam, x, norms, EPS, given=got)):
        torch.testing.assert_close(got[i], want, rtol=1e-2, atol=2e-3, msg=lambda m, i=i: f"phase {i}: {m}")


def test_carveout_percent_holds_the_block_and_no_more() -> None:
    """`Chain(prefer_l1=True)`'s carveout: the least percentage of the SM's shared memory that holds the block and
    the driver's 1 KiB."""
    from crosspool.kernels.megakernel.chain import carveout_percent

    most = 228 * 1024
    for shared in (0, 48 * 1024, 127_472, 150_000, most - 1024):
        pct = carveout_percent(shared, most)
        assert pct * most / 100 >= shared + 1024 > (pct - 1) * most / 100, (shared, pct)
    assert carveout_percent(127_472, most) == 56              # the OLMoE step's kernel (Triton 3.6)
    with pytest.raises(ValueError, match="does not fit"):
        carveout_percent(most, most)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
                    reason="needs an sm_90 GPU")
def test_prefer_l1_sets_the_kernels_carveout_and_keeps_its_outputs() -> None:
    from cuda.bindings import driver as cu

    from crosspool.pools.vmm import check_cu

    fam = _families("cuda", 2)
    chain = mk.Chain(CHAIN, fam, 2048, prefer_l1=True)
    x = torch.randn(2048, generator=torch.Generator().manual_seed(8)).cuda()
    for _ in range(2):                                   # the carveout is set after the first launch
        chain.run(x)
        torch.cuda.synchronize()
        chain.check()
        _check_phases(chain, CHAIN, fam, x, None)
    held = check_cu(cu.cuFuncGetAttribute(cu.CUfunction_attribute.CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT,
                                          cu.CUfunction(chain._carved)))
    assert held == chain.carveout and 0 < chain.carveout < 100          # the driver holds what was set


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
                    reason="needs an sm_90 GPU")
@pytest.mark.parametrize(("normed", "warps"), [(False, 4), (True, 4), (True, 8)])
def test_chain_kernel_matches_reference_across_launches_and_replays(normed: bool, warps: int) -> None:
    fam = _families("cuda", 2)
    norms = _norms("cuda", 4) if normed else None
    phases = NORM_CHAIN if normed else CHAIN
    chain = mk.Chain(phases, fam, 2048, norms=norms, eps=EPS, warps=warps)
    x = torch.empty(2048, device="cuda")
    for seed in (3, 4):                                  # two eager launches: the epoch moves on
        x.copy_(torch.randn(2048, generator=torch.Generator().manual_seed(seed)))
        chain.run(x)
        torch.cuda.synchronize()
        chain.check()
        _check_phases(chain, phases, fam, x, norms)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        chain.run(x)
    for seed in (5, 6, 7):                               # replays with fresh inputs
        x.copy_(torch.randn(2048, generator=torch.Generator().manual_seed(seed)))
        graph.replay()
        torch.cuda.synchronize()
        chain.check()
        _check_phases(chain, phases, fam, x, norms)
    with pytest.raises(ValueError, match="input"):
        chain.run(torch.zeros(1024, device="cuda"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
                    reason="needs an sm_90 GPU")
@pytest.mark.parametrize("keys", [False, True])
def test_routed_chain_ranks_and_loads_the_chosen_experts(graph_launch, keys: bool) -> None:  # noqa: ANN001
    """Every program ranks the router alike and writes the experts' ids and weights for both routed phases; keys:
    ranked on the logits as integer keys, the weights written after the staging (`Chain(rank_keys=True)`)."""
    fam = _moe_families("cuda", 6)
    chain = mk.Chain(MOE, fam, 2048, stages=12, boxes=2, rank_keys=keys)
    x = torch.empty(2048, device="cuda")
    chosen = set()
    for seed in range(8, 14):                            # fresh inputs route to other experts
        x.copy_(torch.randn(2048, generator=torch.Generator().manual_seed(seed)))
        graph_launch(lambda: chain.run(x))
        chain.check()
        got = chain.outputs()
        probs, ids = torch.softmax(got[1], 0).topk(4)   # the ranking of the kernel's own logits
        for o in range(2):                               # every program ranked them alike, for both phases
            assert (chain.experts[:, o, :4] == ids.int()).all(), f"seed {seed}, routed phase {o}"
            torch.testing.assert_close(chain.experts[:, o, 16:20].view(torch.float32),
                                       probs.expand(chain.nprog, 4), rtol=1e-5, atol=1e-6)
        _check_phases(chain, MOE, fam, x, None)          # the experts' phases with the kernel's own ranking
        chosen.add(tuple(ids.tolist()))
    assert len(chosen) >= 3                              # the inputs did route to other experts
