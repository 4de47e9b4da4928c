"""Where the megakernel's warps stall, block by block (issue 4): reads the SASS table that `bash scripts/gpu_issue4.sh
ncu` writes (`ncu --import mk.ncu-rep --page source --csv --print-source sass > sass.csv`: one row an instruction,
with its stall samples by reason), cuts it into basic blocks (at branch targets and after branches), and prints the
blocks with the most samples: their instruction mix (the slot loop is the block with the most FFMAs), samples by
stall reason, and their hottest instructions.

`python3 scripts/megakernel_ncu_blocks.py sass.csv [--blocks 6] [--top 6]` (anywhere: no GPU needed).
"""

from __future__ import annotations

import argparse
import csv
import re
from collections import Counter
from dataclasses import dataclass, field

BRANCH = re.compile(r"\b(?:BRA|BRX|JMP)\b\s+(0x[0-9a-f]+)")


@dataclass
class Instruction:
    address: int
    source: str
    samples: int
    executed: int
    stalls: dict[str, int]


@dataclass
class Block:
    instructions: list[Instruction] = field(default_factory=list)

    @property
    def samples(self) -> int:
        return sum(i.samples for i in self.instructions)

    def opcodes(self) -> Counter:
        ops = Counter()
        for i in self.instructions:
            words = [w for w in i.source.split() if not w.startswith("@")]
            if words:
                ops[words[0].split(".")[0]] += 1
        return ops

    def stalls(self) -> Counter:
        total = Counter()
        for i in self.instructions:
            total.update(i.stalls)
        return total


def read(path: str) -> list[Instruction]:
    """The instructions of sass.csv, in address order (the first row names the kernel, the second the columns)."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    header = next(r for r in rows if r and r[0] == "Address")
    col = {name: j for j, name in enumerate(header)}
    reasons = [n for n in header if n.startswith("stall_") and not n.endswith("(Not Issued)")]
    out = []
    for r in rows[rows.index(header) + 1:]:
        if len(r) < len(header) or not r[0].startswith("0x"):
            continue
        num = (lambda name, r=r: int(r[col[name]]) if r[col[name]].isdigit() else 0)
        out.append(Instruction(int(r[0], 16), r[col["Source"]].strip(), num("Warp Stall Sampling (All Samples)"),
                               num("Instructions Executed"), {n[6:]: num(n) for n in reasons if num(n)}))
    return sorted(out, key=lambda i: i.address)


def blocks(instructions: list[Instruction]) -> list[Block]:
    """Basic blocks: a block starts at a branch target and after a branch."""
    targets = {int(m[1], 16) for i in instructions if (m := BRANCH.search(i.source))}
    out: list[Block] = []
    for i in instructions:
        if not out or i.address in targets or BRANCH.search(out[-1].instructions[-1].source):
            out.append(Block())
        out[-1].instructions.append(i)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("csv", help="the SASS source page as CSV (`gpu_issue4.sh ncu`'s $OUT/sass.csv)")
    p.add_argument("--blocks", type=int, default=6, help="blocks to print, by samples")
    p.add_argument("--top", type=int, default=6, help="instructions to print a block, by samples")
    args = p.parse_args()
    ins = read(args.csv)
    bs = blocks(ins)
    total = sum(i.samples for i in ins)
    print(f"{len(ins)} instructions, {len(bs)} blocks, {total} stall samples")
    ffma = max(bs, key=lambda b: b.opcodes()["FFMA"])
    for b in sorted(bs, key=lambda b: -b.samples)[:args.blocks]:
        head = b.instructions[0]
        tag = " (the most FFMAs: the slot loop)" if b is ffma else ""
        print(f"\nblock at {head.address:#x}{tag}: {len(b.instructions)} instructions, executed {head.executed} "
              f"times by warps, {b.samples} samples ({b.samples / max(total, 1):.1%})")
        print("  opcodes: " + ", ".join(f"{op} {n}" for op, n in b.opcodes().most_common(10)))
        print("  stalls: " + ", ".join(f"{r} {n}" for r, n in b.stalls().most_common(8)))
        for i in sorted(b.instructions, key=lambda i: -i.samples)[:args.top]:
            why = ", ".join(f"{r} {n}" for r, n in Counter(i.stalls).most_common(3))
            print(f"    {i.address:#x} {i.samples:6d}  {i.source[:60]:60s} {why}")


if __name__ == "__main__":
    main()
