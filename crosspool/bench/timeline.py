"""Pipeline timelines: per engine step, per side (attention / FFN), when each sub-step ran.

Owns the timeline file format and its drawing; reads what `PipelineScheduler` records (CUDA events on GPU,
perf_counter on CPU) and touches nothing in the engine beyond starting and stopping that recording.

Record from an engine built with `EngineConfig(pipeline=True)`:

    with record_timeline(llm.engine, "timeline.json", png="timeline.png"):
        llm.generate(...)

Draw a recorded file: `python -m crosspool.bench.timeline --in timeline.json --out timeline.png`.
The JSON holds `device`, `steps` [{step, start_ms, end_ms, batches}] and `spans` [{step, tick, side, kind,
model, batch, layer, start_ms, end_ms}] (ms since the recording started), plus `summary` (`summarize`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from crosspool.engine.pipeline import TimelineLog
from crosspool.models.model import ATTENTION_SIDE, FFN_SIDE

SIDES = (ATTENTION_SIDE, FFN_SIDE)
Timeline = dict[str, Any]


def to_dict(log: TimelineLog) -> Timeline:
    data: Timeline = {"device": log.device, "steps": [dataclasses.asdict(s) for s in log.steps],
                      "spans": [dataclasses.asdict(s) for s in log.spans]}
    data["summary"] = summarize(data)
    return data


def save(log: TimelineLog | Timeline, path: str | os.PathLike[str]) -> Timeline:
    data = to_dict(log) if isinstance(log, TimelineLog) else log
    Path(path).write_text(json.dumps(data, indent=1))
    return data


def load(path: str | os.PathLike[str]) -> Timeline:
    return json.loads(Path(path).read_text())


@contextmanager
def record_timeline(engine: Any, path: str | os.PathLike[str] | None = None,
                    png: str | os.PathLike[str] | None = None) -> Iterator[TimelineLog]:
    """Record the pipelined steps run inside the block; on exit write the JSON (and the PNG) if asked."""
    pipeline = getattr(engine, "pipeline", None)
    if pipeline is None:
        raise ValueError("timelines are recorded by the pipeline scheduler: build the engine with "
                         "EngineConfig(pipeline=True) (one process; with pool ranks the pipeline is off)")
    log = pipeline.start_recording()
    try:
        yield log
    finally:
        pipeline.stop_recording()
    data = to_dict(log)
    if path is not None:
        save(data, path)
    if png is not None:
        draw(data, png)


def _union_ms(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[tuple[float, float]] = []
    for start, end in sorted(intervals):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def _length(intervals: list[tuple[float, float]]) -> float:
    return sum(e - s for s, e in intervals)


def _overlap(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> float:
    total, i, j = 0.0, 0, 0
    while i < len(a) and j < len(b):
        total += max(0.0, min(a[i][1], b[j][1]) - max(a[i][0], b[j][0]))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return total


def summarize(data: Timeline) -> dict[str, float]:
    """Totals over the recorded steps, in ms: wall time of the steps, busy time per side, time both sides
    were busy at once, and what the sub-steps would take back to back (`serial_ms`) or with the two sides
    fully overlapped, e.g. on different devices (`overlapped_bound_ms`: per step the busier side)."""
    wall = sum(s["end_ms"] - s["start_ms"] for s in data["steps"])
    out: dict[str, float] = {"steps": len(data["steps"]), "wall_ms": wall}
    busy = {side: 0.0 for side in SIDES}
    both = serial = bound = 0.0
    for step in data["steps"]:
        spans = [s for s in data["spans"] if s["step"] == step["step"]]
        per_side = {side: _union_ms([(s["start_ms"], s["end_ms"]) for s in spans if s["side"] == side])
                    for side in SIDES}
        lengths = {side: _length(v) for side, v in per_side.items()}
        for side in SIDES:
            busy[side] += lengths[side]
        both += _overlap(per_side[ATTENTION_SIDE], per_side[FFN_SIDE])
        serial += sum(s["end_ms"] - s["start_ms"] for s in spans)
        bound += max(lengths.values())
    for side in SIDES:
        out[f"{side}_busy_ms"] = busy[side]
        out[f"{side}_busy_frac"] = busy[side] / wall if wall > 0 else 0.0
    out.update(overlap_ms=both, serial_ms=serial, overlapped_bound_ms=bound)
    return out


def draw(data: Timeline, out: str | os.PathLike[str], title: str | None = None) -> None:
    """Two rows (attention side above, FFN side below) of sub-steps on one time axis: one colour per model
    (odd batches of a step lighter, so two micro-batches of one model differ), heads hatched, a dotted line
    where each step starts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    models = sorted({s["model"] for s in data["spans"]})
    cmap = plt.get_cmap("tab10")
    colour = {m: cmap(i % 10) for i, m in enumerate(models)}
    rows = {ATTENTION_SIDE: 1.0, FFN_SIDE: 0.0}
    end = max([s["end_ms"] for s in data["steps"]] + [1e-3])
    fig, ax = plt.subplots(figsize=(min(60.0, max(10.0, 0.02 * len(data["spans"]) + 8)), 3.2))
    for s in data["spans"]:
        ax.broken_barh([(s["start_ms"], max(s["end_ms"] - s["start_ms"], end * 1e-4))], (rows[s["side"]] - 0.4, 0.8),
                       facecolors=colour[s["model"]], edgecolor="black", linewidth=0.3,
                       hatch="//" if s["kind"] == "head" else None, alpha=0.9 if s["batch"] % 2 == 0 else 0.6)
    for step in data["steps"]:
        ax.axvline(step["start_ms"], color="grey", linestyle=":", linewidth=0.8)
    ax.set_yticks([rows[FFN_SIDE], rows[ATTENTION_SIDE]], ["FFN side", "attention side"])
    ax.set_xlim(0, end)
    ax.set_xlabel("ms")
    summary = data.get("summary") or summarize(data)
    ax.set_title(title or (f"{data['device']}: {int(summary['steps'])} steps, {summary['wall_ms']:.1f} ms; busy "
                           f"attention {summary['attention_busy_frac']:.0%}, FFN {summary['ffn_busy_frac']:.0%}; "
                           f"both busy {summary['overlap_ms']:.1f} ms"), fontsize=9)
    ax.legend(handles=[Patch(facecolor=colour[m], label=m) for m in models], loc="upper left", fontsize=7,
              bbox_to_anchor=(1.005, 1.0))
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def draw_lanes(spans: list[dict], out: str | os.PathLike[str], title: str, window_ms: float = 60.0) -> None:
    """Whole passes across ranks (`multi_model`, lanes): one row per lane, a bar per pass coloured by model, over
    the first `window_ms` of `spans` ({model, lane, start_ms, end_ms}, from 0)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    shown = [s for s in spans if s["start_ms"] < window_ms]
    models = sorted({s["model"] for s in spans})
    lanes = sorted({s["lane"] for s in spans})
    cmap = plt.get_cmap("tab10")
    colour = {m: cmap(i % 10) for i, m in enumerate(models)}
    fig, ax = plt.subplots(figsize=(14, 1.0 + 0.6 * len(lanes)))
    for s in shown:
        ax.broken_barh([(s["start_ms"], s["end_ms"] - s["start_ms"])], (s["lane"] - 0.4, 0.8),
                       facecolors=colour[s["model"]], edgecolor="black", linewidth=0.3)
    ax.set_yticks(lanes, [f"lane {lane}" for lane in lanes])
    ax.set_xlim(0, window_ms)
    ax.set_xlabel("ms")
    ax.set_title(title, fontsize=9)
    ax.legend(handles=[Patch(facecolor=colour[m], label=m) for m in models], loc="upper left", fontsize=7,
              bbox_to_anchor=(1.005, 1.0))
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="draw a pipeline timeline (JSON from record_timeline) as a PNG")
    p.add_argument("--in", dest="inp", required=True, help="timeline JSON")
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--title", default=None)
    a = p.parse_args(argv)
    data = load(a.inp)
    draw(data, a.out, a.title)
    s = data.get("summary") or summarize(data)
    print(f"{a.out}: {int(s['steps'])} steps, wall {s['wall_ms']:.2f} ms, attention busy {s['attention_busy_ms']:.2f} "
          f"ms, FFN busy {s['ffn_busy_ms']:.2f} ms, both busy {s['overlap_ms']:.2f} ms")


if __name__ == "__main__":
    main()
