"""Time megakernel step variants alternated within one GPU call (issue 4: machines differ by ~4%, so only runs of
one call compare). A variant is a string of `megakernel_step_bench.py` options, or `@REV [options]` for commit
REV's bench as `megakernel_ab.py build REV` left it in `mkb/` (carry `mkb` to the device). Every round runs each
variant once, in the order given, each in its own process under a timeout, and prints its result as it ends;
the table of us a step (fraction of copy bw) comes last.

Run on the GPU: `python3 scripts/megakernel_variants.py --rounds 2 -- "" "--pipelined" "@c3478a5"` (the `--` lets a
variant start with a dash).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# the step bench's result row: | megakernel, N phases | us | MB | frac of copy bw | worst phase's max rel err (...) |
RESULT = re.compile(r"\| megakernel, \d+ phases \| ([\d.]+) \| \d+ \| ([\d.]+) \| (\S+) ")


def command(variant: str) -> list[str]:
    """The command line that times one variant."""
    words = variant.split()
    if words and words[0].startswith("@"):
        rev = words[0][1:]
        return [sys.executable, "scripts/megakernel_ab.py", "run", rev, f"mkb/mk_{rev}/step_bench.py", *words[1:]]
    return [sys.executable, "scripts/megakernel_step_bench.py", *words]


def result(stdout: str, stderr: str, rc: int) -> str:
    """A run's table cell: `us (fraction)`, with its worst phase's error where that is over 2e-2 (the step
    bench's check against the reference), or why there is none."""
    found = RESULT.search(stdout)
    if found:
        if found[3] == "unchecked":                  # (--no-compute)
            return f"{found[1]} ({found[2]}), unchecked"
        err = float(found[3])
        return f"{found[1]} ({found[2]})" + (f", err {err:.1e}" if not err <= 2e-2 else "")
    last = (stderr.strip().splitlines() or ["no output"])[-1]
    return f"failed, rc {rc}: {last[:80]}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("variants", nargs="+", help='step bench options a variant ("" for the defaults; "@REV ..." for '
                   "an older commit's bench)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--timeout", type=float, default=60.0, help="seconds a run may take")
    args = p.parse_args()
    env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    cells: dict[str, list[str]] = {v: [] for v in args.variants}
    for r in range(args.rounds):
        for v in args.variants:
            t0 = time.perf_counter()
            try:
                done = subprocess.run(command(v), cwd=ROOT, env=env, capture_output=True, text=True,
                                      timeout=args.timeout)
                cell = result(done.stdout, done.stderr, done.returncode)
            except subprocess.TimeoutExpired:
                cell = f"timed out after {args.timeout:.0f} s"
            cells[v].append(cell)
            print(f"round {r + 1}/{args.rounds}, [{v}]: {cell} ({time.perf_counter() - t0:.0f} s)", flush=True)
    print("| variant | " + " | ".join(f"run {r + 1}" for r in range(args.rounds)) + " |")
    print("|---|" + "---:|" * args.rounds)
    for v, row in cells.items():
        print(f"| `{v or '(defaults)'}` | " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
