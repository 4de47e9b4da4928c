"""Decode step time of one model against the memory-bandwidth floor.

    crosspool bench decode --model DIR [--batch 1,8,32] [--context 1024,8192] [--output-len 48]
                           [--kernels torch|triton] [--no-cuda-graphs] [--hf] [--json FILE]

For each (context, batch): B requests with `context`-token prompts are prefilled, then decode steps with every
sequence decoding are timed back to back (no sync between steps, so async decode can overlap them). Reported
per cell: wall time per step (total / steps), device span of the step (CUDA events around the model's work:
metadata copies + graph replay, or the eager launches) and the host fraction (1 - span / wall: the time the
GPU waits for Python; it misses the waits inside a span, such as a metadata copy queued after the GPU went
idle), and the host's own time per step (`host_busy_ms`: wall time less the time blocked on a launched step's
tokens; near the step time, the host is the bottleneck); the bytes the step must touch
(`crosspool.bench.traffic`: weights, the experts the batch routed to, counted on the device over the last
steps, and the KV); the achieved bandwidth (bytes / wall) and its fraction of the device-to-device copy
bandwidth measured in the same run. `--hf` adds HF transformers' `generate` on the same checkpoint and GPU
(batch 1, the first context). Results go to `bench/results/` as JSON.

`--kv-devices cuda:0 --weights-devices cuda:1` runs the same cells on the split layout (issue 8: the model's
attention side and KV on one GPU, its FFN on another, hidden states over NCCL each layer): the step time of a
lone batch there against the one-GPU row is what the per-layer transfer costs a step with nothing to overlap it.
The weights rank routes the experts, so those cells report no bytes or bandwidth.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import statistics
import time
from pathlib import Path

import torch

from crosspool.bench import provenance, traffic
from crosspool.bench.traffic import sync
from crosspool.config import EngineConfig, is_distributed, layout_settings
from crosspool.engine.engine import Engine
from crosspool.engine.llm import create_engine
from crosspool.engine.sampling import SamplingParams

COUNT_STEPS = 4     # trailing decode steps run eagerly with expert counting (not timed)


def bench_cell(engine: Engine, name: str, batch: int, context: int, output_len: int, warmup: int = 3,
               max_cell_tokens: int | None = None, profiler: object | None = None) -> dict:
    """One (batch, context) cell. profiler: a started torch.profiler whose window is the timed steps
    (`profiler.step()` before and after them)."""
    served = engine.models[name]
    model, runner, sched = served.model, served.runner, served.scheduler
    spec = model.spec
    cell: dict = {"batch": batch, "context": context}
    # the first prompts decode while the last are still prefilling: they get enough tokens to still be running
    # when the last one is done (else the batch never fills), and what is left is aborted after the timing
    max_tokens = output_len + prefill_steps(batch, context, engine.config.max_num_batched_tokens)
    need = batch * -(-(context + max_tokens) // engine.config.block_size)
    if max_cell_tokens is not None and batch * context > max_cell_tokens:
        cell["skipped"] = f"{batch * context} prompt tokens, over --max-cell-tokens {max_cell_tokens}"
        return cell
    if need > served.blocks.num_blocks or context + max_tokens > served.max_model_len:
        cell["skipped"] = (f"needs {need} KV blocks ({need * served.blocks.kv.block_bytes / 2**30:.1f} GiB), "
                           f"pool holds {served.blocks.num_blocks}; max_model_len {served.max_model_len}")
        return cell
    gen = torch.Generator().manual_seed(batch * 100_003 + context)
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    ids = [engine.add_request(name, torch.randint(0, spec.vocab_size - 10, (context,), generator=gen).tolist(),
                              params) for _ in range(batch)]
    t0 = time.perf_counter()
    while not (not sched.waiting and len(sched.running) == batch
               and all(s.num_computed == s.num_tokens - 1 for s in sched.running)):
        if any(out.finished for out in engine.step()):
            raise RuntimeError(f"a request of the {batch} x {context} cell finished before the batch was "
                               f"prefilled (preempted and recomputed past its {max_tokens} tokens?)")
    cell["prefill_s"] = time.perf_counter() - t0
    spans, lens, hits = [], [], []
    graphs = runner.graphs
    timed = output_len - 1 - COUNT_STEPS
    runner.gpu_spans = []
    for _ in range(warmup):
        engine.step()
    # timed steps back to back with no sync between them (async decode overlaps a step's host work with the
    # previous step on the device; a sync per step would serialize them); the mean is total / steps
    sync(engine.device)
    runner.gpu_spans = []
    if profiler is not None:
        profiler.step()
    pool = engine.kv_pool
    maps = (pool.bundles_mapped, pool.bundles_unmapped, pool.bundles_mapped_on_alloc)
    waited = served.token_wait_s
    t = time.perf_counter()
    for _ in range(timed - warmup):
        lens.append(sum(s.num_computed + 1 for s in sched.running))
        engine.step()
    sync(engine.device)
    mean_wall = (time.perf_counter() - t) / (timed - warmup)
    # async decode: the host blocks only on a launched step's tokens; the rest of the wall time is its own work
    # (a host that never blocks is the bottleneck: the device then waits for it)
    wait = (served.token_wait_s - waited) / (timed - warmup)
    # KV page (un)mapping during the timed steps: driver calls that may stall the step
    cell["kv_bundles_mapped"], cell["kv_bundles_unmapped"], cell["kv_bundles_mapped_on_alloc"] = (
        now - before for now, before in zip((pool.bundles_mapped, pool.bundles_unmapped,
                                             pool.bundles_mapped_on_alloc), maps, strict=True))
    if profiler is not None:
        profiler.step()
    spans = [a.elapsed_time(b) / 1e3 for a, b in runner.gpu_spans]
    runner.gpu_spans = None
    ffn = model.ffn
    remote = not hasattr(ffn, "expert_hits")     # the FFN runs on weights ranks: no experts to count here
    if not remote:
        runner.graphs = None     # eager from here: count the experts each step routes to
        experts_n = spec.routing.num_experts if spec.routing else 1
        for _ in range(COUNT_STEPS):
            ffn.expert_hits = torch.zeros(spec.num_layers, experts_n, dtype=torch.int32, device=engine.device)
            engine.step()
            if ffn.expert_hits.any():      # the step ran the model (the last steps may only read tokens)
                hits.append(ffn.expert_hits.sum(1).tolist())
        runner.graphs = graphs
        ffn.expert_hits = None
    for rid in ids:
        engine.abort(rid)
    while engine.has_unfinished():
        engine.step()
    cell.update({"steps": timed - warmup, "step_ms": mean_wall * 1e3, "tokens_per_s": batch / mean_wall,
                 "host_wait_ms": wait * 1e3, "host_busy_ms": (mean_wall - wait) * 1e3})
    if spans:
        span = statistics.mean(spans[-len(lens):])
        cell.update({"device_span_ms": span * 1e3, "host_fraction": max(0.0, 1 - span / mean_wall)})
    if remote:
        return cell
    if not hits:
        raise RuntimeError("no decode step left to count routed experts: raise --output-len")
    experts = [statistics.mean(h[layer] for h in hits) for layer in range(spec.num_layers)]
    weight_bytes = traffic.attention_bytes(model.attention, batch) + traffic.ffn_bytes(model.ffn, experts)
    kv = statistics.mean(lens) * spec.kv_bytes_per_token(torch.finfo(engine.config.dtype).bits // 8)
    cell.update({
        "experts_per_moe_layer": statistics.mean(e for e, w in zip(experts, model.ffn.w.layers, strict=True)
                                                 if "experts_gate_up" in w) if spec.routing else 0,
        "weight_bytes": weight_bytes, "kv_bytes": kv, "bytes": weight_bytes + kv,
    })
    return cell


def add_bandwidth(row: dict, copy_bw: float | None) -> None:
    """Achieved bandwidth and its fraction of the copy bandwidth, for cells that ran and counted their bytes
    (split-layout cells have no byte count: the weights rank routes the experts)."""
    if copy_bw and "step_ms" in row and "bytes" in row:
        row["bandwidth"] = row["bytes"] / (row["step_ms"] / 1e3)
        row["copy_bw_fraction"] = row["bandwidth"] / copy_bw


def prefill_steps(batch: int, context: int, chunk: int) -> int:
    """Engine steps until every prompt of a cell is prefilled, with a margin: `chunk` prompt tokens a step."""
    return -(-(batch * context) // chunk) + 2


def critical_path(kernels: list[tuple[str, float, float]]) -> dict[str, dict[str, float]]:
    """Where a stream of kernels' span goes, kernel by kernel: kernels (name, start, end) in any order. Walking them
    by start, each kernel is charged `advance` = how far it pushes the latest end seen so far (the time it adds to
    the span), and `gap` = the idle time before it when it starts after that end. Under programmatic dependent
    launch a kernel starts while its predecessor drains and its duration includes that wait, so durations overlap
    and sum past the span; advances and gaps do not: over all kernels they add up to the span exactly. Returns
    {name: {calls, busy (summed durations), advance, gap}}."""
    out: dict[str, dict[str, float]] = {}
    frontier = None
    for name, start, end in sorted(kernels, key=lambda k: (k[1], k[2])):
        row = out.setdefault(name, {"calls": 0, "busy": 0.0, "advance": 0.0, "gap": 0.0})
        row["calls"] += 1
        row["busy"] += end - start
        if frontier is None:
            frontier = start
        row["gap"] += max(0.0, start - frontier)
        row["advance"] += max(0.0, end - max(frontier, start))
        frontier = max(frontier, end)
    return out


def largest_gaps(kernels: list[tuple[str, float, float]], n: int = 5) -> list[tuple[float, str]]:
    """The n longest idle gaps (us, the kernel that ends each) of the same walk as `critical_path`: whether a
    step's idle time is a little every step or a long stall now and then (a host sync, a page mapped)."""
    gaps, frontier = [], None
    for name, start, end in sorted(kernels, key=lambda k: (k[1], k[2])):
        if frontier is not None and start > frontier:
            gaps.append((start - frontier, name))
        frontier = end if frontier is None else max(frontier, end)
    return sorted(gaps, reverse=True)[:n]


def _kernel_intervals(events: list) -> list[tuple[str, float, float]]:
    """(name, start us, end us) of the device's kernels and copies among a torch.profiler's events."""
    return [(e.name, float(e.time_range.start), float(e.time_range.end)) for e in events
            if getattr(e.device_type, "name", "") == "CUDA" and not e.name.startswith("ProfilerStep")]


def print_critical_path(kernels: list[tuple[str, float, float]], steps: int, rows: int = 25) -> dict:
    """The `critical_path` table per step, largest advance first, and its totals; returns them."""
    path = critical_path(kernels)
    if not path:
        return {}
    total_advance = sum(r["advance"] for r in path.values())
    total_gap = sum(r["gap"] for r in path.values())
    print("| kernel (critical path, per step) | calls | busy us | advance us | gap before us |")
    print("|---|---:|---:|---:|---:|")
    for name, r in sorted(path.items(), key=lambda kv: -kv[1]["advance"])[:rows]:
        print(f"| {name[:70]} | {r['calls'] / steps:.0f} | {r['busy'] / steps:.1f} | {r['advance'] / steps:.1f} | "
              f"{r['gap'] / steps:.1f} |")
    print(f"span per step {(total_advance + total_gap) / steps:.1f} us: kernels and copies advance it "
          f"{total_advance / steps:.1f}, idle gaps {total_gap / steps:.1f}")
    print("longest gaps (us, before): " + ", ".join(f"{g:.1f} {name[:30]}" for g, name in largest_gaps(kernels)))
    return {"per_step_us": {name: {k: v / steps for k, v in r.items()} for name, r in path.items()},
            "advance_us": total_advance / steps, "gap_us": total_gap / steps}


def _profile(engine: Engine, batch: int, context: int, output_len: int) -> None:
    """Device time per kernel over the timed decode steps of one cell, and how much of the step's device span
    the kernels fill (the rest: gaps between kernels, metadata copies)."""
    from torch.profiler import ProfilerActivity, profile, schedule

    # wait for the warm-up, record exactly the timed steps (bench_cell steps the profiler around them)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA],
                 schedule=schedule(wait=1, warmup=0, active=1, repeat=1)) as prof:
        cell = bench_cell(engine, "m", batch, context, output_len, profiler=prof)
    events = prof.key_averages()
    print(events.table(sort_by="self_device_time_total", row_limit=25, max_name_column_width=60))
    # the profiler's own step annotation ("ProfilerStep*") carries the device time of everything inside it:
    # counting it too would double the sum
    kernels_us = sum(e.self_device_time_total for e in events
                     if e.device_type.name == "CUDA" and not e.key.startswith("ProfilerStep"))
    per_step_ms = kernels_us / 1e3 / cell["steps"]
    span = cell.get("device_span_ms")
    if span:
        print(f"kernels busy {per_step_ms:.3f} ms of a {span:.3f} ms device span per step: "
              f"{max(0.0, 1 - per_step_ms / span):.1%} of the span has no kernel running (gaps, copies)")
    # busy times overlap under PDL (each includes its wait for the kernel before); the critical path does not
    print_critical_path(_kernel_intervals(prof.events()), cell["steps"])


def hf_generate_ms(model_dir: str, context: int, new_tokens: int, device: str) -> float:
    """Per-token time of transformers' generate (batch 1, greedy, KV cache on) on the same checkpoint."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).to(device).eval()
    ids = torch.randint(0, hf.config.vocab_size - 10, (1, context), device=device)
    mask = torch.ones_like(ids)
    times = []
    for n in (1, new_tokens + 1):     # per-token time = (T(n+1) - T(1)) / n: takes the prefill out
        hf.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        sync(torch.device(device))
        t = time.perf_counter()
        hf.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        sync(torch.device(device))
        times.append(time.perf_counter() - t)
    del hf
    torch.cuda.empty_cache()
    return (times[1] - times[0]) / new_tokens * 1e3


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="crosspool bench decode", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--batch", default="1,16", help="batch sizes, comma separated")
    p.add_argument("--context", default="128", help="prompt lengths, comma separated")
    p.add_argument("--output-len", type=int, default=48)
    p.add_argument("--max-model-len", type=int, default=None,
                   help="the engine's max_model_len (default: the longest context + output). Decode graphs size "
                        "their split-KV grid by it beyond CROSSPOOL_GRAPH_SHORT_CONTEXT keys, as serving's "
                        "default (the model's longest context) does")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--kv-cache-gb", type=float, default=None)
    p.add_argument("--kernels", choices=["torch", "triton"], default=None)
    p.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false", default=None)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-cell-tokens", type=int, default=None, help="skip cells with more prompt tokens (time)")
    p.add_argument("--hf", action="store_true", help="also time transformers' generate (batch 1)")
    p.add_argument("--host-profile", action="store_true",
                   help="print the host functions taking the most time over the last cell (cProfile)")
    p.add_argument("--profile", action="store_true",
                   help="print the device time per kernel over the first cell's decode steps (torch.profiler)")
    p.add_argument("--gemv", action="store_true",
                   help="attention-side projections through the skinny GEMM kernel (crosspool.kernels.gemv)")
    p.add_argument("--no-pdl", action="store_true",
                   help="no programmatic dependent launch for the decode kernels (crosspool.kernels.pdl: on by "
                        "default on sm_90+)")
    p.add_argument("--router-cublas", action="store_true",
                   help="the MoE router through torch's linear (cuBLAS) instead of the skinny GEMM (a before/after)")
    p.add_argument("--kv-devices", default=None, help="split layout: the KV pool's device (with --weights-devices)")
    p.add_argument("--weights-devices", default=None, help="split layout: the weights pool's devices")
    p.add_argument("--label", default="", help="free text stored with the results")
    p.add_argument("--json", default=None, help="results file (default: bench/results/decode-<model>-<time>.json)")
    args = p.parse_args(argv)
    if args.output_len < COUNT_STEPS + 6:
        p.error(f"--output-len must be at least {COUNT_STEPS + 6}")
    layout = layout_settings(args.kv_devices, args.weights_devices, default_device=args.device)
    if len(layout.get("kv_devices", ())) > 1:
        p.error("the decode bench drives one KV device")
    device = torch.device(str(layout["device"]))
    kv_bytes = int(args.kv_cache_gb * 2**30) if args.kv_cache_gb else None
    from crosspool.kernels import gemv

    gemv.ENABLED = args.gemv
    gemv.ROUTER = not args.router_cublas
    if args.no_pdl:
        from crosspool.kernels import pdl

        pdl.ENABLED = False
        os.environ["CROSSPOOL_PDL"] = "0"     # the split layout's spawned ranks read it
    try:
        contexts = [int(c) for c in args.context.split(",")]
        batches = [int(b) for b in args.batch.split(",")]
    except ValueError:
        p.error(f"--batch and --context take comma-separated integers, got {args.batch!r} and {args.context!r}")
    if min(contexts + batches) < 1:
        p.error("batch sizes and contexts must be >= 1")
    copy_bw = traffic.copy_bandwidth(device) if device.type == "cuda" else None
    config = EngineConfig(kv_cache_bytes=kv_bytes, kernels=args.kernels, cuda_graphs=args.cuda_graphs,
                          max_num_seqs=max(args.max_num_seqs, max(batches)),
                          max_model_len=max(contexts) + args.output_len, **layout)
    config = dataclasses.replace(config, max_model_len=args.output_len + max(
        c + prefill_steps(max(batches), c, config.max_num_batched_tokens) for c in contexts))
    if args.max_model_len is not None:
        if args.max_model_len < config.max_model_len:
            p.error(f"--max-model-len {args.max_model_len} is below what the cells need ({config.max_model_len})")
        config = dataclasses.replace(config, max_model_len=args.max_model_len)
    split = is_distributed(config)
    if split and (args.profile or args.hf):
        p.error("--profile and --hf time one device: leave out --kv-devices/--weights-devices")
    t0 = time.perf_counter()
    engine = create_engine({"m": args.model}, config)   # across ranks: tuned and captured while loading
    load_s = time.perf_counter() - t0
    if device.type == "cuda" and not split:          # weights, KV pool and the megakernel's buffers
        print(f"GPU memory after loading: {torch.cuda.memory_allocated(device) / 2**30:.2f} GiB allocated, peak "
              f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB", flush=True)
    graphs = engine.models["m"].runner.graphs
    capture = None
    if device.type == "cuda" and not split:
        t = time.perf_counter()
        engine.models["m"].model.ffn.tune_kernels()   # before the graphs: they capture the tuned tiles
        print(f"fused-MoE kernels tuned in {time.perf_counter() - t:.1f} s", flush=True)
    if graphs is not None and graphs.capture:
        seconds, grown = graphs.capture_all()
        capture = {"seconds": sum(seconds.values()), "buckets": len(seconds), "graphs": len(graphs.steps),
                   "pool_bytes": grown}
        print(f"captured {len(graphs.steps)} decode graphs ({len(seconds)} buckets) in {sum(seconds.values()):.1f} s, "
              f"graph pool {grown / 2**20:.0f} MiB", flush=True)
    bench_cell(engine, "m", 1, 16, COUNT_STEPS + 8)    # warm-up (kernels compile)
    rows = []
    for context in contexts:
        for batch in batches:
            row = bench_cell(engine, "m", batch, context, args.output_len, max_cell_tokens=args.max_cell_tokens)
            add_bandwidth(row, copy_bw)
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.profile:
        _profile(engine, batches[0], contexts[0], args.output_len)
    if args.host_profile:
        import cProfile
        import pstats

        with cProfile.Profile() as prof:
            bench_cell(engine, "m", batches[-1], contexts[-1], args.output_len)
        pstats.Stats(prof).sort_stats("tottime").print_stats(22)
    engine.close()
    hf_ms = hf_generate_ms(args.model, contexts[0], 32, args.device) if args.hf else None
    result = {
        "model": args.model, **provenance.stamp(device), "label": args.label,
        "kernels": config.kernels, "cuda_graphs": config.cuda_graphs, "max_model_len": config.max_model_len,
        "copy_bandwidth": copy_bw,
        "load_s": load_s, "capture": capture, "hf_generate_ms_per_token": hf_ms, "rows": rows,
        "layout": {k: v for k, v in layout.items() if k != "device"} or None,
    }
    print(f"\n{config.kernels} kernels, cuda graphs {'on' if config.cuda_graphs else 'off'}, "
          f"copy bandwidth {copy_bw / 1e12:.2f} TB/s" if copy_bw else "")
    print("| context | batch | step ms | tokens/s | host frac | experts/layer | MB touched | frac of copy bw "
          "| KV bundles mapped / unmapped (on alloc) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        if "skipped" in r:
            print(f"| {r['context']} | {r['batch']} | skipped: {r['skipped']} | | | | | | |")
            continue
        print(f"| {r['context']} | {r['batch']} | {r['step_ms']:.2f} | {r['tokens_per_s']:.1f} | "
              f"{r.get('host_fraction', float('nan')):.2f} | {r.get('experts_per_moe_layer', float('nan')):.1f} | "
              f"{r.get('bytes', float('nan')) / 1e6:.0f} | {r.get('copy_bw_fraction', float('nan')):.3f} | "
              f"{r['kv_bundles_mapped']} / {r['kv_bundles_unmapped']} ({r['kv_bundles_mapped_on_alloc']}) |")
    if hf_ms is not None:
        print(f"HF transformers generate, batch 1, context {contexts[0]}: {hf_ms:.2f} ms/token")
    out = Path(args.json) if args.json else Path("bench/results") / (
        f"decode-{Path(args.model).name}-{datetime.datetime.now():%Y%m%d-%H%M%S}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
