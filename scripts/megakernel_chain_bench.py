"""The megakernel's GEMV chain on OLMoE-1B-7B's batch-1 shapes: how close to copy bandwidth do real GEMVs get
when each phase waits on tagged words instead of a kernel boundary? (issue 4; `crosspool.kernels.megakernel`)

Run on the GPU: `python3 scripts/megakernel_chain_bench.py [--layers 16] [--boxes 4] [--stages N] [--warps 4]
[--json PATH]`.
Per layer, the weights a batch-1 OLMoE step reads, except attention's KV and lm_head:
- QKV [6144, 2048] on the layer's input h;
- o_proj [2048, 2048] on q's rows (a stand-in for the attention output) + h;
- the router [64, 2048] on that;
- 8 experts' gate/up [2 x 1024, 2048] each, SwiGLU, which wait on the router;
- their down [2048, 1024] each, summed, + the o_proj output: the next layer's h.
There is no norm, no routing (experts 0-7 of each layer) and no attention yet: this times the chain's machinery.
The rows, each a CUDA graph replayed over cold L2:
- `chain`: the dependent chain (5 phases a layer);
- `independent`: the same phases and tiles, each reading the step's input and waiting on nothing (this kernel's
  ceiling with no dependencies at all);
- `independent, tiles unread`: the same, with the tiles streamed through the ring but never read (the TMA path's
  own rate, without the GEMV arithmetic; its outputs are not checked);
- `inputs polled, long ready`: after layer 0 every phase polls and stages layer 0's gate/up words, written long
  before (what staging costs without waiting for any producer);
and it checks the chain's last output against the torch reference.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stream_probe import graph_us  # noqa: E402

from crosspool.bench.traffic import copy_bandwidth  # noqa: E402
from crosspool.kernels import megakernel as mk  # noqa: E402
from crosspool.kernels.megakernel import Phase  # noqa: E402
from crosspool.kernels.megakernel.profile import cycles_by_activity  # noqa: E402

H, QKV, INTER, EXPERTS, ROUTER, NUM_EXPERTS = 2048, 6144, 1024, 8, 64, 64
ATTN_ROWS = QKV + H + ROUTER


def olmoe_layer_routed(layers: int, routed: bool = True, normed: bool = True, splits: int = 0) -> list[Phase]:
    """The real FFN half: input norm before QKV, post-attention norm before the router and the experts, and the
    8 experts of each layer chosen from its 64 by its router at run time (family 1 and 2 hold all 64).
    routed=False: experts 0-7, the gate/up waiting on the router; normed=False: no norms. splits > 0: the real
    attention between QKV and o_proj (q/k norms, RoPE, the KV cache, heads split that many ways), else o_proj reads
    q's rows."""
    phases: list[Phase] = []
    h = -1
    for layer in range(layers):
        b, e = layer * ATTN_ROWS, layer * NUM_EXPERTS * 2 * INTER
        n = len(phases)
        norm = (lambda at: at if normed else -1)
        phases.append(Phase("sum", 0, b, QKV, H, input=h, norm=norm(0)))
        if splits:
            phases.append(Phase("attention", 0, layer, H, mk.HEAD_DIM, sources=splits, input=n, norm=norm(2 * H),
                                scale=mk.HEAD_DIM ** -0.5))
        o = len(phases)
        how = dict(route=o + 1) if routed else {}
        phases += [
            Phase("sum", 0, b + QKV, H, H, input=o - 1, residual=h),
            Phase("sum", 0, b + QKV + H, ROUTER, H, input=o, norm=norm(H)),
            Phase("swiglu", 1, e, EXPERTS * INTER, H, sources=EXPERTS, stride=2 * INTER, up_offset=INTER,
                  input=o, norm=norm(H), **(how if routed else dict(wait=o + 1))),
            Phase("sum", 2, e, H, INTER, sources=EXPERTS, stride=2 * INTER, input=o + 2, residual=o, **how),
        ]
        h = o + 3
    return phases


def olmoe_chain(layers: int, dependent: bool, ready: bool = False) -> list[Phase]:
    """The step's phases; dependent=False: every phase reads the step's input; ready=True: after layer 0 every phase
    reads layer 0's gate/up words (polled, but long since written), with no residual and no wait."""
    phases: list[Phase] = []
    h = -1
    for layer in range(layers):
        b, e = layer * ATTN_ROWS, layer * EXPERTS * 2 * INTER
        n = len(phases)
        if ready and layer > 0:
            phases += [Phase("sum", 0, b, QKV, H, input=3), Phase("sum", 0, b + QKV, H, H, input=3),
                       Phase("sum", 0, b + QKV + H, ROUTER, H, input=3),
                       Phase("swiglu", 1, e, EXPERTS * INTER, H, sources=EXPERTS, stride=2 * INTER, up_offset=INTER,
                             input=3),
                       Phase("sum", 2, e, H, INTER, sources=EXPERTS, stride=2 * INTER, input=3)]
            continue

        def src(i: int) -> int:
            return i if dependent else -1

        phases += [
            Phase("sum", 0, b, QKV, H, input=src(h)),
            Phase("sum", 0, b + QKV, H, H, input=src(n), residual=src(h) if dependent else mk.NO_PHASE),
            Phase("sum", 0, b + QKV + H, ROUTER, H, input=src(n + 1)),
            Phase("swiglu", 1, e, EXPERTS * INTER, H, sources=EXPERTS, stride=2 * INTER, up_offset=INTER,
                  input=src(n + 1), wait=n + 2 if dependent else mk.NO_PHASE),
            Phase("sum", 2, e, H, INTER, sources=EXPERTS, stride=2 * INTER,
                  input=src(n + 3) if dependent else -1, residual=src(n + 1) if dependent else mk.NO_PHASE),
        ]
        h = n + 4
    return phases


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--boxes", type=int, default=4, help="[16, 256] boxes (8 KB) in a ring slot")
    p.add_argument("--stages", type=int, help="slots in each program's ring (default: 192 KB of them)")
    p.add_argument("--warps", type=int, default=4)
    p.add_argument("--json", help="write the results here too")
    p.add_argument("--profile", action="store_true",
                   help="count each program's SM cycles by what they went to, and print the split of each row")
    p.add_argument("--attention", type=int, default=0, metavar="SPLITS",
                   help="with --routed: also time the chain with attention at --context, heads split SPLITS ways")
    p.add_argument("--context", type=int, default=1024, help="context length for --attention")
    p.add_argument("--routed", action="store_true",
                   help="time the routed chain instead: norms, and 8 of 64 experts a layer chosen by its router "
                        "(12.9 GB of expert weights for 16 layers, of which a step reads 2.15 GB)")
    args = p.parse_args()
    args.stages = args.stages or 24 // args.boxes
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)

    def weights(rows: int, cols: int, std: float) -> torch.Tensor:
        return (torch.randn(rows, cols, generator=g, device=dev) * std).to(torch.bfloat16)

    L = args.layers
    if args.routed:
        routed(args, weights, dev, g)
        return
    # scales that keep the residual stream bounded over the layers (the SwiGLU squares its input)
    fam = [weights(L * ATTN_ROWS, H, 0.01), weights(L * EXPERTS * 2 * INTER, H, 0.002),
           weights(L * EXPERTS * 2 * INTER, INTER, 0.01)]
    total_bytes = sum(w.numel() * 2 for w in fam)
    x = torch.randn(H, generator=g, device=dev)
    copy_bw = copy_bandwidth(dev)
    rows = {}
    for name, dependent, compute, ready in (("chain", True, True, False), ("independent", False, True, False),
                                            ("independent, tiles unread", False, False, False),
                                            ("inputs polled, long ready", True, True, True)):
        phases = olmoe_chain(L, dependent, ready)
        # the independent chain reads the step's input everywhere: give it the widest input any phase reads
        chain = mk.Chain(phases, fam, H if dependent else EXPERTS * INTER, stages=args.stages,
                         boxes=args.boxes, warps=args.warps, compute=compute, **experiments(args))
        inp = x if dependent else torch.randn(EXPERTS * INTER, generator=g, device=dev)
        us = graph_us([lambda c=chain, i=inp: c.run(i)], reps=9)
        chain.run(inp)
        torch.cuda.synchronize()
        chain.check()
        got, want = chain.outputs()[-1], mk.reference(phases, fam, inp)[-1]
        err = ((got - want).abs().max() / want.abs().max()).item() if compute else float("nan")
        rows[name] = dict(us=us, phases=len(phases), frac_copy_bw=total_bytes / (us * 1e-6) / copy_bw,
                          last_output_max_rel_err=err, profile=cycles_by_activity(chain) if args.profile else None)
    boundary = (rows["chain"]["us"] - rows["independent"]["us"]) / (len(olmoe_chain(L, True)) - 1)
    commit = run_commit()
    print(f"copy bandwidth {copy_bw / 1e12:.2f} TB/s; {total_bytes / 1e6:.0f} MB a step, {L} layers x 5 phases; "
          f"ring {args.stages} x {8 * args.boxes} KB, {args.warps} warps")
    print("| variant | us a step | frac of copy bw | last output, max rel err |\n|---|---:|---:|---:|")
    for name, r in rows.items():
        print(f"| {name} | {r['us']:.1f} | {r['frac_copy_bw']:.3f} | {r['last_output_max_rel_err']:.1e} |")
    print(f"a dependency costs {boundary:.2f} us over the independent chain")
    print_profiles(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(dict(commit=commit, device=torch.cuda.get_device_name(dev),
                                                   copy_bw=copy_bw, bytes=total_bytes, layers=L,
                                                   stages=args.stages, boxes=args.boxes, warps=args.warps, rows=rows,
                                                   experiments=experiments(args),
                                                   boundary_us=boundary), indent=1))


def experiments(args: argparse.Namespace) -> dict:
    return dict(profile=args.profile)


def run_commit() -> str:
    """The commit that runs: `.run-commit` where the caller wrote one (a device copy's .git may be stale)."""
    f = Path(".run-commit")
    if f.exists():
        return f.read_text().strip()
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()


def print_profiles(rows: dict[str, dict]) -> None:
    """With --profile: where each row's SM cycles went (mean over programs)."""
    named = {k: r["profile"] for k, r in rows.items() if r.get("profile")}
    if not named:
        return
    keys = [k for k in next(iter(named.values())) if k != "cycles"]
    print("| row (cycles a program) | " + " | ".join(keys) + " |\n|---|" + "---:|" * len(keys))
    for name, prof in named.items():
        print(f"| {name} ({prof['cycles'] / 1e6:.2f} M) | " + " | ".join(f"{prof[k]:.3f}" for k in keys) + " |")


def routed(args: argparse.Namespace, weights, dev: torch.device, g: torch.Generator) -> None:  # noqa: ANN001
    """`--routed`: the chain with norms and run-time routing, against its reference and copy bandwidth."""
    L = args.layers
    fam = [weights(L * ATTN_ROWS, H, 0.01), weights(L * NUM_EXPERTS * 2 * INTER, H, 0.002),
           weights(L * NUM_EXPERTS * 2 * INTER, INTER, 0.01)]
    norms = (1 + 0.1 * torch.randn(4 * H, generator=g, device=dev)).to(torch.bfloat16)
    x = torch.randn(H, generator=g, device=dev)
    step_bytes = L * (ATTN_ROWS * H + EXPERTS * 2 * INTER * H + EXPERTS * H * INTER) * 2
    kv_bytes = L * args.context * 2 * H * 2                  # the cached keys and values a step reads
    ctx = args.context
    blocks = -(-ctx // mk.BLOCK)
    kv = (torch.randn(blocks, L, 2, mk.BLOCK, H // mk.HEAD_DIM, mk.HEAD_DIM, generator=g, device=dev)).to(
        torch.bfloat16)
    table = torch.randperm(blocks, generator=g, device=dev).to(torch.int32)
    freq = (ctx - 1) / 10000 ** (torch.arange(0, mk.HEAD_DIM, 2, device=dev) / mk.HEAD_DIM)   # RoPE at ctx - 1
    step = mk.Step(kv, table, ctx, freq.cos(), freq.sin())
    copy_bw = copy_bandwidth(dev)
    print(f"routed chain: {L} layers, {step_bytes / 1e6:.0f} MB a step; ring {args.stages} x {8 * args.boxes} KB, "
          f"{args.warps} warps (a near-tie in some layer's router can pick another expert than the reference)")
    print("| variant | us a step | frac of copy bw | last output, max rel err |\n|---|---:|---:|---:|")
    rows = {}
    variants = [("routed, normed", True, True, 0), ("routed, no norms", True, False, 0),
                ("experts 0-7 (waiting on the router), normed", False, True, 0)]
    if args.attention:
        variants = [(f"routed, normed, attention at {ctx} ({args.attention} splits)", True, True, args.attention),
                    variants[0]]
    for name, routed_, normed, splits in variants:
        phases = olmoe_layer_routed(L, routed_, normed, splits)
        chain = mk.Chain(phases, fam, H, stages=args.stages, boxes=args.boxes, warps=args.warps, norms=norms,
                         kv=kv if splits else None, max_blocks=blocks, **experiments(args))
        chain.set_step(ctx, table, step.cos, step.sin)
        us = graph_us([lambda c=chain: c.run(x)], reps=9)
        chain.run(x)
        torch.cuda.synchronize()
        chain.check()
        ref_step = mk.Step(kv.clone(), table, ctx, step.cos, step.sin)
        got, want = chain.outputs()[-1], mk.reference(phases, fam, x, norms, step=ref_step)[-1]
        err = ((got - want).abs().max() / want.abs().max()).item()
        nbytes = step_bytes + (kv_bytes if splits else 0)
        rows[name] = dict(us=us, bytes=nbytes, frac_copy_bw=nbytes / (us * 1e-6) / copy_bw,
                          last_output_max_rel_err=err, profile=cycles_by_activity(chain) if args.profile else None)
        print(f"| {name} | {us:.1f} | {rows[name]['frac_copy_bw']:.3f} | {err:.1e} |")
    print_profiles(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(dict(routed=True, commit=run_commit(), layers=L, bytes=step_bytes,
                                                   copy_bw=copy_bw, stages=args.stages, boxes=args.boxes, rows=rows,
                                                   experiments=experiments(args)),
                                              indent=1))


if __name__ == "__main__":
    main()
