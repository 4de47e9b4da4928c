"""A whole batch-1 OLMoE-1B-7B decode step as one megakernel launch (issue 4; `crosspool.kernels.megakernel.step`):
its time against copy bandwidth, on random weights of the real shapes built on the GPU (the kernel, not a
checkpoint's values, is what is timed), at one context length.

Run on the GPU: `python3 scripts/megakernel_step_bench.py [--context 1024] [--splits 8] [--stages 3] [--warps 8]
[--layers 16] [--profile] [--json PATH]`.
Bytes a step: every layer's q/k/v/o_proj and router, the 8 experts each layer routes to (gate/up and down), the
cached keys and values, the final norm's lm_head; the embedding row is the step's input. The logits are checked
against the torch reference (`megakernel.reference`) fed the kernel's own earlier outputs, phase by phase.
The engine's own batch-1 step at 1k took 1.05-1.06 ms (0.557 of copy bw) in sessions 11-13 (benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from megakernel_chain_bench import print_profiles, run_commit  # noqa: E402
from megakernel_options import add_options, chain_kwargs  # noqa: E402
from stream_probe import graph_us  # noqa: E402

from crosspool.bench.traffic import copy_bandwidth  # noqa: E402
from crosspool.kernels import megakernel as mk  # noqa: E402
from crosspool.kernels import torch_ref  # noqa: E402
from crosspool.kernels.megakernel.profile import cycles_by_activity, timeline  # noqa: E402
from crosspool.kernels.megakernel.step import decode_chain  # noqa: E402
from crosspool.models.loader import AttentionWeights, FFNWeights  # noqa: E402
from crosspool.models.presets import get_preset  # noqa: E402
from crosspool.models.spec import ModelSpec  # noqa: E402

# a layer's phases (`decode_chain`): the router folded in two, (R g) h beside QKV and (R g W_o) a beside o_proj
LAYER_PHASES = ("qkv", "router (R g) h", "attention", "o_proj", "router (R g W_o) a", "gate/up", "down")


def print_timeline(t: torch.Tensor, phases: list[mk.Phase]) -> None:
    """With --profile: the step's critical path by phase of a layer, in us (means over layers), from
    `megakernel.profile.timeline`. `span`: from the previous phase's last program done to this one's; `lag`: from
    the input phase's last program done to the first program with the input staged; `spread`: first to last
    program with it staged; `work`: the longest any program spent on the phase's items after staging; `to first`:
    the mean time from staged to the first slot landed (attention: to the item's partial out); `after`: the mean
    time from there to the program's items done (attention: its heads' combine)."""
    start, ready, first, done = (t[:, :, k] for k in range(4))

    def top(x: torch.Tensor) -> torch.Tensor:
        return torch.where(x.isnan(), float("-inf"), x).max(0).values

    last_done = top(done)
    n = len(LAYER_PHASES)
    print("| phase | span | lag | spread | work | to first | after |\n|---|---:|---:|---:|---:|---:|---:|")
    for j, name in enumerate(LAYER_PHASES):
        ps = list(range(j, len(phases) - 1, n))
        cols = [[] for _ in range(6)]
        for p in ps:
            inp = last_done[phases[p].input].item() if phases[p].input >= 0 else 0.0
            lo = torch.where(ready[:, p].isnan(), float("inf"), ready[:, p]).min().item()
            cols[0].append(last_done[p].item() - (last_done[p - 1].item() if p else 0.0))
            cols[1].append(lo - inp)
            cols[2].append(top(ready[:, p:p + 1]).item() - lo)
            cols[3].append(top((done - ready)[:, p:p + 1]).item())
            cols[4].append((first[:, p] - ready[:, p]).nanmean().item())
            cols[5].append((done[:, p] - first[:, p]).nanmean().item())
        print(f"| {name} | " + " | ".join(f"{sum(c) / len(c):.2f}" for c in cols) + " |")
    print(f"| final norm + lm_head | {last_done[-1].item() - last_done[-2].item():.2f} | | | | | |")
    print(f"(stamped step: {last_done[-1].item():.1f} us from the first program's start)")
    # the parts, as means over programs and layers, in us from the moment before
    att = [p for p, ph in enumerate(phases) if ph.kind == "attention"]
    ranked = [p for p in range(len(phases)) if not t[:, p, 4].isnan().all() and phases[p].kind != "attention"]

    def mean_gap(a: torch.Tensor, b: torch.Tensor) -> float:
        return (b - a).nanmean().item()

    if att:
        a = t[:, att]
        print("| attention item, from staged | q rotated | slots done | rows combined | new token folded | "
              "partial out |\n|---|---:|---:|---:|---:|---:|")
        print("| us | " + " | ".join(f"{mean_gap(a[..., 1], a[..., k]):.2f}" for k in (4, 5, 6, 7, 2)) + " |")
    if ranked:
        r = t[:, ranked]
        routers = [phases[p].route for p in ranked]
        router_done = torch.stack([top(done[:, q:q + 1]) for q in routers], dim=1)           # [1, routed]
        print("| ranking, from the router's last program | logits polled | ranked | stored | staged |\n"
              "|---|---:|---:|---:|---:|")
        print("| us | " + " | ".join(f"{(r[..., k] - router_done).nanmean().item():.2f}" for k in (4, 5, 6, 1)) + " |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--context", type=int, default=1024, help="tokens in the cache after the step")
    p.add_argument("--splits", type=int, default=8, help="attention splits a head (DecodeStep's default)")
    p.add_argument("--stages", type=int, default=3, help="ring slots a program (32 KB each; DecodeStep's default)")
    p.add_argument("--warps", type=int, default=8, help="consumer warps a program (plus the producer warp)")
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--static", action="store_true", help="each program's gate/up items fixed in advance, not taken "
                   "from counters as it goes (`Chain(dynamic=False)`; DecodeStep's default is dynamic)")
    p.add_argument("--dynamic-sums", action="store_true", help="the sum phases of more items than programs (QKV, "
                   "o_proj, lm_head) taken from counters too (`Chain(dynamic_sums=True)`; untimed, session 18)")
    add_options(p)
    p.add_argument("--fold-heads", action="store_true", help="the router's o_proj part in the attention's head "
                   "combine, summed by a heads phase (`decode_chain(fold_heads=True)`; 5-8 us a step slower, "
                   "session 21)")
    p.add_argument("--scatter-down", action="store_true", help="the down's items one expert's rows each, added "
                   "into fp32 sums (`decode_chain(scatter_down=True)`; untimed, session 23)")
    p.add_argument("--no-compute", dest="compute", action="store_false", help="the weight slots stream through the "
                   "ring unread (`Chain(compute=False)`): what the step would take with free GEMV arithmetic; the "
                   "outputs are wrong, so they are not checked")
    p.add_argument("--most-shared", dest="prefer_l1", action="store_false", help="the kernel's shared-memory "
                   "carveout at the most there is, as Triton sets it, not at what it uses with the rest L1 "
                   "(`Chain(prefer_l1=False)`; DecodeStep's default is True: session 25, -13 us a step)")
    p.add_argument("--profile", action="store_true", help="cycle counters by activity (slows the step)")
    p.add_argument("--json", help="write the results here too")
    p.add_argument("--timeline", help="with --profile: torch.save the raw timeline ([programs, phases, 8] us) and "
                   "the phases' kinds here, for a closer look")
    args = p.parse_args()
    dev = torch.device("cuda")
    spec = ModelSpec.from_hf_config(get_preset("olmoe-1b-7b").config | {"num_hidden_layers": args.layers})
    g = torch.Generator(device=dev).manual_seed(0)
    h, e, i = spec.hidden_size, spec.routing.num_experts, spec.moe_intermediate_size

    def rand(*shape: int, std: float = 0.02) -> torch.Tensor:
        return (torch.randn(*shape, generator=g, device=dev) * std).to(torch.bfloat16)

    def norm(n: int) -> torch.Tensor:
        return (1 + 0.1 * torch.randn(n, generator=g, device=dev)).to(torch.bfloat16)

    attn = AttentionWeights(rand(spec.vocab_size, h, std=1.0), norm(h), rand(spec.vocab_size, h), [
        {"q_proj": rand(h, h), "k_proj": rand(h, h), "v_proj": rand(h, h), "o_proj": rand(h, h), "q_norm": norm(h),
         "k_norm": norm(h), "input_layernorm": norm(h), "post_attention_layernorm": norm(h)}
        for _ in range(args.layers)])
    ffn = FFNWeights(layers=[{"router": rand(e, h, std=0.1), "experts_gate_up": rand(e, 2 * i, h),
                              "experts_down": rand(e, h, i, std=0.01)} for _ in range(args.layers)])
    dc = decode_chain(spec, attn, ffn, splits=args.splits, fold_heads=args.fold_heads,
                      scatter_down=args.scatter_down)
    del ffn                                          # the chain holds its own copies
    ctx = args.context
    blocks = -(-ctx // mk.BLOCK)
    kv = rand(blocks, args.layers, 2, mk.BLOCK, spec.num_heads, mk.HEAD_DIM, std=1.0)
    table = torch.randperm(blocks, generator=g, device=dev).to(torch.int32)
    cos, sin = torch_ref.rope_cos_sin(spec.rope, torch.tensor([ctx - 1]), torch_ref.rope_inv_freq(spec.rope))
    chain = mk.Chain(dc.phases, dc.families, h, stages=args.stages, warps=args.warps, norms=dc.norms, eps=dc.eps,
                     kv=kv, max_blocks=blocks, profile=args.profile,
                     dynamic=not args.static, dynamic_sums=args.dynamic_sums, compute=args.compute,
                     prefer_l1=args.prefer_l1, **chain_kwargs(args))
    chain.set_step(ctx, table, cos[0].to(dev), sin[0].to(dev))
    x = attn.embed[17].float()
    copy_bw = copy_bandwidth(dev)
    us = graph_us([lambda: chain.run(x)], reps=9)
    before = kv.clone()
    chain.run(x)
    torch.cuda.synchronize()
    chain.check()
    worst, err = 0, None                           # (--no-compute: unchecked)
    if args.compute:
        got = chain.outputs()
        want = mk.reference(dc.phases, dc.families, x, dc.norms, dc.eps, given=got,
                            step=mk.Step(before, table, ctx, cos[0].to(dev), sin[0].to(dev)))
        errs = [(torch.where(a == b, 0.0, a - b).abs().max() / b[b.isfinite()].abs().max().clamp(min=1e-6)).item()
                for a, b in zip(got, want, strict=True)]             # (an empty split's log-sum-exp is -inf)
        worst = max(range(len(errs)), key=errs.__getitem__)
        err = errs[worst]
    attn_bytes = args.layers * (4 * h * h + e * h) * 2
    expert_bytes = args.layers * spec.routing.top_k * 3 * h * i * 2
    kv_bytes = args.layers * ctx * 2 * h * 2
    head_bytes = spec.vocab_size * h * 2
    total = attn_bytes + expert_bytes + kv_bytes + head_bytes
    frac = total / (us * 1e-6) / copy_bw
    print(f"OLMoE-1B-7B shapes, {args.layers} layers, context {ctx}, {args.splits} splits, ring {args.stages} x 32 KB, "
          f"{args.warps} consumer warps; copy bw {copy_bw / 1e12:.2f} TB/s")
    print("| step | us | MB a step | frac of copy bw | worst phase, max rel err |\n|---|---:|---:|---:|---:|")
    checked = "unchecked (--no-compute)" if err is None else f"{err:.1e} (phase {worst}, {dc.phases[worst].kind})"
    print(f"| megakernel, {len(dc.phases)} phases | {us:.1f} | {total / 1e6:.0f} | {frac:.3f} | {checked} |")
    rows = {"megakernel": dict(us=us, frac_copy_bw=frac, profile=cycles_by_activity(chain) if args.profile else None)}
    print_profiles(rows)
    if args.profile:
        print_timeline(timeline(chain), dc.phases)
        if args.timeline:
            torch.save(dict(timeline=timeline(chain), kinds=[ph.kind for ph in dc.phases], context=ctx,
                            splits=args.splits), args.timeline)
    if args.json:
        Path(args.json).write_text(json.dumps(dict(commit=run_commit(), device=torch.cuda.get_device_name(dev),
                                                   context=ctx, splits=args.splits, stages=args.stages,
                                                   warps=args.warps,
                                                   layers=args.layers, bytes=total, copy_bw=copy_bw, us=us,
                                                   frac_copy_bw=frac, max_rel_err=err, rows=rows), indent=1))


if __name__ == "__main__":
    main()
