"""Compile the megakernel's chain kernel for sm_90 without a GPU, and print what it uses (issue 4).

`python3 scripts/megakernel_compile_check.py [--stages 6] [--boxes 4] [--sass PATH]`: runs Triton's whole pipeline
(Gluon -> PTX -> cubin by the bundled ptxas) for `crosspool.kernels.megakernel.chain._chain_kernel` and prints shared
memory, registers and stack bytes (a stack means spilled registers). With another Triton first on PYTHONPATH
(the device has 3.6) it checks that release's Gluon names too. `--sass PATH` writes the disassembly there;
`--by-source N` prints the kernel's instruction count and the N Python functions with the most SASS instructions
(by the line info `nvdisasm -g` gives each instruction; an inlined function's instructions count to it).
"""

from __future__ import annotations

import argparse
import ast
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon import language as gl
from triton.experimental.gluon._runtime import GluonASTSource

from crosspool.kernels import megakernel as mk
from crosspool.kernels.megakernel import chain

sys.path.insert(0, str(Path(__file__).resolve().parent))
from megakernel_options import add_options, constexprs  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stages", type=int, default=6)
    p.add_argument("--boxes", type=int, default=4)
    p.add_argument("--warps", type=int, default=4)
    p.add_argument("--sass", help="write the SASS here")
    p.add_argument("--by-source", type=int, default=0, metavar="N", help="print the N functions with the most SASS "
                   "instructions")
    p.add_argument("--ptx", help="write the PTX here")
    p.add_argument("--profile", action="store_true", help="with the cycle counters")
    p.add_argument("--scatter", action="store_true", help="with scattered sums (`Phase.scatter`)")
    add_options(p)
    p.add_argument("--fold-heads", action="store_true", help="with a fold (`decode_chain(fold_heads=True)`)")
    p.add_argument("--dynamic", action="store_true", help="with dynamic phases (`Chain(dynamic=True)`)")
    p.add_argument("--consumer-ranks", action="store_true", help="with the consumers' ranking compiled in (CRANK: "
                   "a chain with a router the producer does not rank; the OLMoE step has none)")
    p.add_argument("--splits", type=int, default=0, help="attention splits (SPLITS; 0: no attention phases)")
    p.add_argument("--engine", action="store_true",
                   help="as the engine launches it (`DecodeStep`): a bf16 input row, int64 context and block table")
    args = p.parse_args()
    layout = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=16, rank=3)
    desc = f"tensordesc<bf16[{args.boxes}, {mk.ROWS}, {mk.CHUNK}],{layout!r}>"
    sig = {"d0": desc, "d1": desc, "d2": desc, "d3": desc,
           "dkv": f"tensordesc<bf16[{mk.BLOCK}, 1, {mk.HEAD_DIM}],{layout!r}>", "table_ptr": "*i32",
           "num_phases": "i32",
           "tiles_ptr": "*i32", "tiles_stride": "i32", "x_ptr": "*bf16" if args.engine else "*fp32",
           "last_ptr": "*fp32", "norms_ptr": "*bf16", "eps": "fp32",
           "words_ptr": "*i64", "routes_ptr": "*i32", "experts_ptr": "*i32", "n_ord": "i32", "epoch_ptr": "*i32",
           "done_ptr": "*i32", "err_ptr": "*i32", "nprog": "i32",
           "prof_ptr": "*i64", "kv_ptr": "*bf16", "kv_layers": "i32",
           "ctx_ptr": "*i64" if args.engine else "*i32", "bt_ptr": "*i64" if args.engine else "*i32",
           "cos_ptr": "*fp32", "sin_ptr": "*fp32", "counters_ptr": "*i32", "fold_ptr": "*bf16",
           "accf_ptr": "*fp32"}
    const = dict(STAGES=args.stages, BOXES=args.boxes, WARPS=args.warps, POLLS=1 << 22, COMPUTE=True,
                 PROFILE=args.profile, SPLITS=args.splits,
                 DYNAMIC=args.dynamic, FOLD=args.fold_heads, SCATTER=args.scatter, CRANK=args.consumer_ranks,
                 **constexprs(args))
    kernel = triton.compile(GluonASTSource(chain._chain_kernel, sig, const), target=GPUTarget("cuda", 90, 32),
                            options=dict(num_warps=args.warps))
    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    cubin = Path(os.environ.get("TMPDIR", "/tmp")) / "megakernel_chain.cubin"
    cubin.write_bytes(kernel.asm["cubin"])
    usage = subprocess.run([tools / "cuobjdump", "-res-usage", cubin], capture_output=True, text=True).stdout
    line = next((s.strip() for s in usage.splitlines() if "REG:" in s), usage.strip())
    print(f"triton {triton.__version__}: shared memory {kernel.metadata.shared} B; {line}")
    if args.ptx:
        Path(args.ptx).write_text(kernel.asm["ptx"])
    if args.sass:
        sass = subprocess.run([tools / "nvdisasm", "-c", cubin], capture_output=True, text=True).stdout
        Path(args.sass).write_text(sass)
    if args.by_source:
        lined = subprocess.run([tools / "nvdisasm", "-c", "-g", cubin], capture_output=True, text=True).stdout
        counts = by_source(lined)
        print(f"{sum(counts.values())} SASS instructions; by function:")
        for name, n in counts.most_common(args.by_source):
            print(f"{n:7d}  {name}")


def by_source(lined_sass: str) -> Counter:
    """Instructions of `nvdisasm -g` output counted by the Python function (file:function) of the line each one
    comes from (the innermost, where it was inlined)."""
    spans: dict[str, list[tuple[int, int, str]]] = {}

    def function_of(path: str, line: int) -> str:
        if path not in spans:
            try:
                tree = ast.parse(Path(path).read_text())
            except (OSError, SyntaxError):
                tree = ast.Module(body=[], type_ignores=[])
            spans[path] = [(n.lineno, n.end_lineno or n.lineno, n.name) for n in ast.walk(tree)
                           if isinstance(n, ast.FunctionDef)]
        inner = max((s for s in spans[path] if s[0] <= line <= s[1]), default=(0, 0, "?"))
        return f"{Path(path).name}:{inner[2]}"

    counts: Counter = Counter()
    where = None
    for text in lined_sass.splitlines():
        found = re.search(r'//## File "([^"]+)", line (\d+)', text)
        if found:
            where = function_of(found[1], int(found[2]))
        elif where and re.search(r"/\*[0-9a-f]{4,}\*/\s+\S", text):
            counts[where] += 1
    return counts


if __name__ == "__main__":
    main()
