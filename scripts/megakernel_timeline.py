"""One layer of a saved megakernel step timeline (issue 4), program by program: when each phase's programs
started it, had polled every word of its input (not attention), had it staged (normed, the router weighed), had
their first slot land (an attention phase: their item's partial out) and were done, as the earliest and latest
program, in us from the previous layer's last program done; then the ranking's moments (logits polled, ranked,
stored) of the layer's first routed phase.

Make the timeline on the GPU: `python3 scripts/megakernel_step_bench.py --profile --timeline tl.pt`; then, anywhere:
`python3 scripts/megakernel_timeline.py tl.pt [--layer 5]`. Session 20 read the gaps between phases this way
(benchmarks.md section 7).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from megakernel_step_bench import LAYER_PHASES  # noqa: E402

MOMENTS = ("start", "polled", "ready", "first", "done")
# each layer phase's input phase, as an index into LAYER_PHASES (-1: the previous layer's down)
INPUT_OF = {"qkv": -1, "router (R g) h": -1, "attention": 0, "o_proj": 2, "router (R g W_o) a": 2, "gate/up": 3,
            "down": 5}
STAMP = {"start": 0, "ready": 1, "first": 2, "done": 3, "polled": 7}     # (an attention item's own part at 7)


def span(x: torch.Tensor) -> tuple[float, float]:
    """The earliest and latest of x's stamped (not NaN) values."""
    x = x[~x.isnan()]
    return (x.min().item(), x.max().item()) if x.numel() else (float("nan"), float("nan"))


def layer_table(t: torch.Tensor, layer: int) -> list[str]:
    """The markdown rows of `layer` in timeline t ([programs, phases, 8] us, `megakernel.profile.timeline`)."""
    n = len(LAYER_PHASES)
    if layer < 0 or (layer + 1) * n >= t.shape[1]:
        raise SystemExit(f"layer {layer}: the timeline has {(t.shape[1] - 1) // n} layers")
    base = layer * n
    ref = span(t[:, base - 1, STAMP["done"]])[1] if base else 0.0
    rows = ["| phase | input's last done | " + " | ".join(f"{m} first / last" for m in MOMENTS) + " |",
            "|---|---:|" + "---:|" * len(MOMENTS)]
    for j, name in enumerate(LAYER_PHASES):
        cells = [(float("nan"), float("nan")) if m == "polled" and name == "attention" else
                 span(t[:, base + j, STAMP[m]] - ref) for m in MOMENTS]
        # the moment the input was whole: against `polled`, how long the last words took to be seen
        input_done = span(t[:, base + INPUT_OF[name], STAMP["done"]] - ref)[1]
        rows.append(f"| {name} | {input_done:.2f} | " + " | ".join(f"{lo:.2f} / {hi:.2f}" for lo, hi in cells)
                    + " |")
    routed = next((base + j for j in range(n) if not t[:, base + j, 4].isnan().all()
                   and LAYER_PHASES[j] not in ("attention",)), None)
    if routed is not None:
        parts = [span(t[:, routed, k] - ref) for k in (4, 5, 6)]
        rows.append(f"\nranking of {LAYER_PHASES[routed - base]} (first / last program): " + ", ".join(
            f"{what} {lo:.2f} / {hi:.2f}" for what, (lo, hi) in zip(("logits polled", "ranked", "stored"), parts,
                                                                       strict=True)))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", help="a timeline saved by megakernel_step_bench.py --profile --timeline PATH")
    p.add_argument("--layer", type=int, default=5)
    args = p.parse_args()
    saved = torch.load(args.path)
    print(f"context {saved['context']}, {saved['splits']} splits; layer {args.layer}, us from the previous layer's end")
    print("\n".join(layer_table(saved["timeline"], args.layer)))


if __name__ == "__main__":
    main()
