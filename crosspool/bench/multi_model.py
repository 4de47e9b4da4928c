"""Several models decoding at once under an offered load: TBT percentiles and throughput, pipeline on vs off.

    python -m crosspool.bench.multi_model --model DIR [--models 2,4] [--rate 2] [--duration-s 20]
        [--prompt-len 512] [--output-len 128] [--modes off,on] [--timeline-dir DIR] [--json FILE]

N models (copies of one checkpoint under names m0..m{N-1}, each loaded separately: N models' weights and KV)
get Poisson arrivals at `--rate` requests/s each, the same seeded trace in every mode (equal offered load).
Requests are added at their arrival times while the engine steps, as the server's engine thread does.
Modes: `off` (the engine's plain step: each model's batch in turn, whole-step CUDA graphs), `on` (the
layer-wise pipeline over sub-step graphs), `on-green` (the same with the SMs split between the sides by green
contexts, `--attention-sms`), `serial` (the pipeline with one lane: the same sub-steps back to back, for a
timeline to compare with). Reported per (N, mode): TBT P50/P90/P99 over every gap between two
tokens of a request (vLLM's ITL), TTFT P50/P99, output tokens/s over the run; a timeline (JSON + PNG, with
per-side busy time and overlap) of a few steps in the middle of the run for the pipelined modes. Across pool
ranks with whole-pass graphs, `on` runs the passes in lanes (`Engine.lanes`) instead; the row's `lanes` says how
much they overlapped (every pass timed on its lane's stream for `LANE_WINDOW_S` from mid-run).
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from crosspool.bench import provenance, timeline
from crosspool.config import EngineConfig, layout_settings
from crosspool.engine.distributed import DistributedEngine
from crosspool.engine.engine import Engine
from crosspool.engine.llm import create_engine
from crosspool.engine.sampling import SamplingParams
from crosspool.models.loader import load_spec

LANE_WINDOW_S = 3.0          # how long the lanes' passes are timed, from the middle of the run
LANE_DRAW_MS = 60.0          # how much of that window the lanes' timeline PNG shows


def trace(models: list[str], rate: float, duration_s: float, prompt_len: int, vocab: int,
          seed: int) -> list[tuple[float, str, list[int]]]:
    """(arrival s, model, prompt ids) sorted by arrival: Poisson per model."""
    rng = np.random.default_rng(seed)
    out = []
    for m in models:
        t = rng.exponential(1 / rate)
        while t < duration_s:
            out.append((float(t), m, rng.integers(0, vocab - 10, prompt_len).tolist()))
            t += rng.exponential(1 / rate)
    return sorted(out, key=lambda a: a[0])


def _pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q)) if xs else float("nan")


def lane_overlap(spans: list[tuple[int, float, float]]) -> dict:
    """How much the lanes' passes overlapped: spans are (lane, start ms, end ms) of whole passes (a lane's own
    passes never overlap). Returns the window, the time any lane was busy, the time two or more were, and each
    lane's busy time (ms)."""
    if not spans:
        return {"passes": 0}
    edges = sorted([(s, 1) for _, s, _ in spans] + [(e, -1) for _, _, e in spans])
    busy = multi = 0.0
    active, last = 0, edges[0][0]
    for t, step in edges:
        if active >= 1:
            busy += t - last
        if active >= 2:
            multi += t - last
        active, last = active + step, t
    lanes = sorted({lane for lane, _, _ in spans})
    return {"passes": len(spans), "window_ms": max(e for _, _, e in spans) - min(s for _, s, _ in spans),
            "busy_ms": busy, "overlap_ms": multi, "overlap_frac": multi / busy if busy else 0.0,
            "lane_busy_ms": [sum(e - s for ln, s, e in spans if ln == lane) for lane in lanes]}


def _lane_graphs(engine: Engine) -> dict:
    """Per model, the decode graphs whose passes run in lanes (across ranks with the pipeline on); empty elsewhere."""
    return {name: m.runner.graphs for name, m in engine.models.items()
            if m.runner.graphs is not None and m.runner.graphs.lanes > 1 and torch.cuda.is_available()}


def _lane_spans(graphs: dict, events: dict) -> list[dict]:
    """{model, lane, start_ms, end_ms} of the recorded passes (`events`: per model, (lane, start, end) CUDA
    events), from the first start; stops the recording."""
    for g in graphs.values():
        g.spans = None
    torch.cuda.synchronize()
    flat = [(name, *span) for name, spans in events.items() for span in spans]
    if not flat:
        return []
    ref = flat[0][2]                     # any event of the device: times relative to it, shifted below
    try:
        spans = [{"model": name, "lane": lane, "start_ms": ref.elapsed_time(a), "end_ms": ref.elapsed_time(b)}
                 for name, lane, a, b in flat]
    except RuntimeError as e:            # a diagnostic: never lose the run's row over it
        print(f"lane timing unavailable: {e}", flush=True)
        return []
    t0 = min(s["start_ms"] for s in spans)
    for s in spans:
        s["start_ms"] -= t0
        s["end_ms"] -= t0
    return sorted(spans, key=lambda s: s["start_ms"])


def _warm_up(engine: Engine | DistributedEngine, prompt_len: int, vocab: int) -> None:
    """Capture every graph bucket and compile every kernel before the clock starts."""
    if isinstance(engine, Engine):
        engine.capture_graphs()
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    for name in engine.models:
        engine.add_request(name, list(range(1, min(prompt_len, vocab - 1))), params)
    while engine.has_unfinished():
        engine.step()


def run_mode(model_dir: str, n: int, mode: str, args: argparse.Namespace, out_dir: Path) -> dict:
    names = [f"m{i}" for i in range(n)]
    layout = layout_settings(args.kv_devices, args.weights_devices, default_device=args.device)
    green = args.attention_sms if mode == "on-green" else None
    config = EngineConfig(pipeline=mode != "off", kv_cache_bytes=int(args.kv_cache_gb * 2**30),
                          pipeline_attention_sms=green,
                          max_model_len=args.prompt_len + args.output_len + 16, max_num_seqs=args.max_num_seqs,
                          tbt_target_s=args.tbt_target_s, **layout)
    engine = create_engine(dict.fromkeys(names, model_dir), config)
    local = getattr(engine, "local", engine)         # across pool ranks: KV rank 0's engine records the timeline
    pipeline = local.pipeline
    lanes = _lane_graphs(local)       # across ranks, pipeline on: passes in lanes, timed for a while mid-run
    lane_events: dict | None = None
    if mode == "serial" and pipeline is not None:
        pipeline.lanes = 1
    vocab = load_spec(model_dir).vocab_size
    _warm_up(engine, args.prompt_len, vocab)
    arrivals = trace(names, args.rate, args.duration_s, args.prompt_len, vocab, args.seed)
    params = SamplingParams(max_tokens=args.output_len, temperature=0, ignore_eos=True)
    finished = []
    record_at = args.duration_s / 2
    recording = None
    start = time.perf_counter()
    i = steps = 0
    while i < len(arrivals) or engine.has_unfinished():
        now = time.perf_counter() - start
        while i < len(arrivals) and arrivals[i][0] <= now:
            engine.add_request(arrivals[i][1], arrivals[i][2], params)
            i += 1
        if not engine.has_unfinished():
            time.sleep(max(0.0, min(arrivals[i][0] - now, 0.01)))
            continue
        if pipeline is not None and recording is None and now >= record_at:
            recording = pipeline.start_recording()
        if lanes and lane_events is None and now >= record_at:
            lane_events = {}
            for name, g in lanes.items():
                g.spans = lane_events[name] = []
        if lane_events is not None and now >= record_at + LANE_WINDOW_S:
            for g in lanes.values():
                g.spans = None
        finished += [o for o in engine.step() if o.finished]
        steps += 1
        # pipelined steps only count (a step with one model ready runs unpipelined and records nothing)
        if recording is not None and pipeline.timeline is not None and len(recording.steps) >= args.timeline_steps:
            pipeline.stop_recording()
    elapsed = time.perf_counter() - start
    lane_spans = _lane_spans(lanes, lane_events or {}) if lanes else []
    engine.close()
    tbt = [g for o in finished for g in o.tbt_s]
    ttft = [o.ttft_s for o in finished if o.ttft_s is not None]
    layout_text = f"kv {','.join(config.kv_devices) or config.device} weights " \
                  f"{','.join(config.weights_devices) or config.device}"
    row = {"models": n, "mode": mode, "layout": layout_text, "requests": len(finished), "steps": steps,
           "elapsed_s": elapsed,
           "output_tokens_per_s": sum(len(o.token_ids) for o in finished) / elapsed,
           "tbt_ms_p50": _pct(tbt, 50) * 1e3, "tbt_ms_p90": _pct(tbt, 90) * 1e3, "tbt_ms_p99": _pct(tbt, 99) * 1e3,
           "ttft_ms_p50": _pct(ttft, 50) * 1e3, "ttft_ms_p99": _pct(ttft, 99) * 1e3,
           "tbt_ms_mean": statistics.mean(tbt) * 1e3 if tbt else float("nan"),
           # the slowest first tokens, to tell one-time costs (the first requests) from queueing
           "slowest_ttft": [{"request": o.request_id, "model": o.model, "ttft_ms": o.ttft_s * 1e3,
                             "queue_ms": (o.queue_s or 0.0) * 1e3, "preemptions": o.num_preemptions}
                            for o in sorted((o for o in finished if o.ttft_s is not None),
                                            key=lambda o: -o.ttft_s)[:5]]}
    if lanes:
        row["lanes"] = lane_overlap([(s["lane"], s["start_ms"], s["end_ms"]) for s in lane_spans])
        if lane_spans:
            stem = out_dir / f"timeline-{n}models-{mode}-lanes"
            stem.with_suffix(".json").write_text(json.dumps({"spans": lane_spans, "summary": row["lanes"]}) + "\n")
            timeline.draw_lanes(lane_spans, stem.with_suffix(".png"),
                                f"{n} models, passes in lanes (first {LANE_DRAW_MS:.0f} ms of the timed window); "
                                f"two lanes busy {row['lanes']['overlap_frac']:.0%} of the busy time",
                                LANE_DRAW_MS)
    if recording is not None:
        data = timeline.to_dict(recording)
        stem = out_dir / f"timeline-{n}models-{mode}"
        timeline.save(data, stem.with_suffix(".json"))
        timeline.draw(data, stem.with_suffix(".png"), title=f"{n} models, pipeline {mode}")
        row["timeline"] = data["summary"]
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint served as every model")
    p.add_argument("--models", default="2,4", help="numbers of models, comma separated")
    p.add_argument("--modes", default="off,on", help="off | on | serial | on-green, comma separated")
    p.add_argument("--attention-sms", type=int, default=66, help="on-green: SMs for the attention side")
    p.add_argument("--rate", type=float, default=2.0, help="requests/s per model (Poisson)")
    p.add_argument("--duration-s", type=float, default=20.0, help="arrivals stop after this")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--tbt-target-s", type=float, default=0.05)
    p.add_argument("--kv-cache-gb", type=float, default=16.0)
    p.add_argument("--timeline-steps", type=int, default=6)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--kv-devices", default=None, help="pool layout, e.g. cuda:0,cuda:1 (default: --device)")
    p.add_argument("--weights-devices", default=None, help="e.g. cuda:2,cuda:3 (default: with the KV pool)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default="bench/results", help="timelines and results go here")
    args = p.parse_args(argv)
    bad = sorted(set(args.modes.split(",")) - {"off", "on", "serial", "on-green"})
    if bad:
        p.error(f"unknown modes {bad}; choose from off, on, serial, on-green")
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for n in (int(x) for x in args.models.split(",")):
        for mode in args.modes.split(","):
            try:
                row = run_mode(args.model, n, mode, args, out_dir)
            except Exception as exc:   # one mode failing (e.g. green contexts on this driver) keeps the others
                row = {"models": n, "mode": mode, "error": f"{type(exc).__name__}: {exc}"}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("| models | layout | pipeline | requests | tokens/s | TBT p50 ms | p90 | p99 | TTFT p50 ms | p99 "
          "| lanes overlap |")
    print("|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if "error" in r:
            print(f"| {r['models']} | | {r['mode']} | failed: {r['error'][:200]} | | | | | | | |")
            continue
        lanes = r.get("lanes", {})
        overlap = f"{lanes['overlap_frac']:.2f} of {lanes['passes']} passes" if lanes.get("passes") else ""
        print(f"| {r['models']} | {r['layout']} | {r['mode']} | "
              f"{r['requests']} | {r['output_tokens_per_s']:.0f} | "
              f"{r['tbt_ms_p50']:.2f} | {r['tbt_ms_p90']:.2f} | {r['tbt_ms_p99']:.2f} | {r['ttft_ms_p50']:.1f} | "
              f"{r['ttft_ms_p99']:.1f} | {overlap} |")
    stamp = f"{datetime.datetime.now():%Y%m%d-%H%M%S}"
    out = out_dir / f"multi-model-{stamp}.json"
    measured = args.kv_devices.split(",")[0] if args.kv_devices else args.device
    out.write_text(json.dumps({"model": args.model, **provenance.stamp(measured), "args": vars(args), "rows": rows},
                              indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
