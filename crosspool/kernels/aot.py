"""Compile the Triton kernels for a GPU target on a machine without one (Hopper, sm_90, by default).

    python -m crosspool.kernels.aot [--arch 90] [--only NAME ...]

Triton lowers a kernel to PTX and runs ptxas without a driver, so code-generation errors (a constexpr branch
that does not type-check, an intrinsic the target lacks, a register blow-up) show here, before device time is
spent. Each kernel is compiled with the constexprs of a real call (OLMoE / Qwen3 shapes, bf16) and with and
without programmatic dependent launch (`kernels.pdl`). Pointer arguments are bf16 unless named in `_PTR`;
integer arguments i32; `eps`/`scale` fp32. Run it with TRITON_INTERPRET unset (the interpreter wraps kernels
so they cannot be compiled).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field

_FLOATS = {"eps", "scale", "scale_log2"}


@dataclass(frozen=True)
class Case:
    module: str
    kernel: str
    constexprs: dict[str, object]
    pointers: dict[str, str] = field(default_factory=dict)     # argument -> Triton pointer type, e.g. "*fp32"


_GEMV_TILE = {"BLOCK_N": 16, "BLOCK_K": 128}
_GEMM_TILE = {"BLOCK_N": 128, "BLOCK_K": 64, "DOT_PRECISION": "tf32"}

CASES = [
    Case("norm_rope", "_rms_norm_kernel", {"HAS_RESIDUAL": True, "BLOCK": 2048, "TOP_K": 0}),
    Case("norm_rope", "_rms_norm_kernel", {"HAS_RESIDUAL": False, "BLOCK": 128, "TOP_K": 0}),
    Case("norm_rope", "_rms_norm_kernel", {"HAS_RESIDUAL": True, "BLOCK": 2048, "TOP_K": 8}, {"x_ptr": "*fp32"}),
    Case("norm_rope", "_rope_write_kv_kernel",
         {"HALF": 64, "BLOCK_HALF": 64, "DV": 128, "BLOCK_DV": 128, "BLOCK_HQ": 16, "BLOCK_HKV": 16,
          "PAGE_SIZE": 16, "INTERLEAVED": False, "HAS_V": True, "NORM": 2},
         {"cos_ptr": "*fp32", "sin_ptr": "*fp32", "slots_ptr": "*i64"}),
    Case("paged_attention", "_paged_attention_kernel",
         {"GROUP": 1, "HEAD_BLOCKS": 1, "NUM_SPLITS": 8, "D": 128, "BLOCK_D": 128, "PE_DIM": 0, "BLOCK_PE": 16,
          "DV": 128, "BLOCK_DV": 128, "V_IS_K": False, "PAGE_SIZE": 16, "BLOCK_Q": 1, "BLOCK_H": 16,
          "BLOCK_N": 64, "IS_DECODE": True, "DOT_PRECISION": "tf32"},
         {"block_tables_ptr": "*i64", "cu_q_ptr": "*i64", "context_lens_ptr": "*i64", "out_ptr": "*fp32",
          "lse_ptr": "*fp32"}),
    Case("paged_attention", "_paged_attention_kernel",         # Qwen3 prefill: GQA group 8, 8 tokens x 8 heads
         {"GROUP": 8, "HEAD_BLOCKS": 1, "NUM_SPLITS": 1, "D": 128, "BLOCK_D": 128, "PE_DIM": 0, "BLOCK_PE": 16,
          "DV": 128, "BLOCK_DV": 128, "V_IS_K": False, "PAGE_SIZE": 16, "BLOCK_Q": 8, "BLOCK_H": 8,
          "BLOCK_N": 64, "IS_DECODE": False, "DOT_PRECISION": "tf32"},
         {"block_tables_ptr": "*i64", "cu_q_ptr": "*i32", "context_lens_ptr": "*i64"}),
    Case("paged_attention", "_paged_attention_kernel",         # DeepSeek MLA decode over the cached latent
         {"GROUP": 16, "HEAD_BLOCKS": 1, "NUM_SPLITS": 4, "D": 512, "BLOCK_D": 512, "PE_DIM": 64, "BLOCK_PE": 64,
          "DV": 512, "BLOCK_DV": 512, "V_IS_K": True, "PAGE_SIZE": 16, "BLOCK_Q": 1, "BLOCK_H": 16,
          "BLOCK_N": 32, "IS_DECODE": True, "DOT_PRECISION": "tf32"},
         {"block_tables_ptr": "*i64", "cu_q_ptr": "*i64", "context_lens_ptr": "*i64", "out_ptr": "*fp32",
          "lse_ptr": "*fp32"}),
    Case("rope_decode", "_rope_decode_kernel",             # OLMoE decode, q/k norm over all heads
         {"GROUP": 1, "HEAD_BLOCKS": 1, "NUM_SPLITS": 8, "HALF": 64, "BLOCK_HALF": 64, "DV": 128, "BLOCK_DV": 128,
          "PAGE_SIZE": 16, "BLOCK_H": 16, "BLOCK_N": 128, "BLOCK_HQ": 16, "BLOCK_HKV": 16, "INTERLEAVED": False,
          "NORM": 3, "DOT_PRECISION": "tf32"},
         {"cos_ptr": "*fp32", "sin_ptr": "*fp32", "slots_ptr": "*i64", "block_tables_ptr": "*i64",
          "context_lens_ptr": "*i64", "out_ptr": "*fp32", "lse_ptr": "*fp32"}),
    Case("rope_decode", "_rope_decode_kernel",             # the same, 64-key blocks (CROSSPOOL_FUSED_BLOCK_N)
         {"GROUP": 1, "HEAD_BLOCKS": 1, "NUM_SPLITS": 8, "HALF": 64, "BLOCK_HALF": 64, "DV": 128, "BLOCK_DV": 128,
          "PAGE_SIZE": 16, "BLOCK_H": 16, "BLOCK_N": 64, "BLOCK_HQ": 16, "BLOCK_HKV": 16, "INTERLEAVED": False,
          "NORM": 3, "DOT_PRECISION": "tf32"},
         {"cos_ptr": "*fp32", "sin_ptr": "*fp32", "slots_ptr": "*i64", "block_tables_ptr": "*i64",
          "context_lens_ptr": "*i64", "out_ptr": "*fp32", "lse_ptr": "*fp32"}),
    Case("rope_decode", "_rope_decode_kernel",             # Qwen3 decode: GQA group 8, per-head q/k norm
         {"GROUP": 8, "HEAD_BLOCKS": 1, "NUM_SPLITS": 1, "HALF": 64, "BLOCK_HALF": 64, "DV": 128, "BLOCK_DV": 128,
          "PAGE_SIZE": 16, "BLOCK_H": 16, "BLOCK_N": 64, "BLOCK_HQ": 32, "BLOCK_HKV": 4, "INTERLEAVED": False,
          "NORM": 1, "DOT_PRECISION": "tf32"},
         {"cos_ptr": "*fp32", "sin_ptr": "*fp32", "slots_ptr": "*i64", "block_tables_ptr": "*i64",
          "context_lens_ptr": "*i64"}),
    Case("paged_attention", "_combine_kernel",
         {"NUM_SPLITS": 8, "BLOCK_S": 8, "DV": 128, "BLOCK_DV": 128, "BLOCK_HC": 1},
         {"part_ptr": "*fp32", "lse_ptr": "*fp32"}),
    Case("paged_attention", "_combine_kernel",             # Qwen3's 64 splits at batch 1 (a serving bucket)
         {"NUM_SPLITS": 64, "BLOCK_S": 64, "DV": 128, "BLOCK_DV": 128, "BLOCK_HC": 1},
         {"part_ptr": "*fp32", "lse_ptr": "*fp32"}),
    Case("routing", "_route_kernel",
         {"TOP_K": 8, "BLOCK_K": 8, "BLOCK_E": 64, "SIGMOID": False, "NORMALIZE": False, "SPLIT": 0},
         {"weights_ptr": "*fp32", "ids_ptr": "*i64"}),
    Case("routing", "_route_kernel",
         {"TOP_K": 8, "BLOCK_K": 8, "BLOCK_E": 128, "SIGMOID": False, "NORMALIZE": True, "SPLIT": 4},
         {"logits_ptr": "*fp32", "weights_ptr": "*fp32", "ids_ptr": "*i64"}),
    Case("fused_moe", "_gate_up_gemv_kernel", {"TOP_K": 8, "STREAM": False, **_GEMV_TILE}, {"ids_ptr": "*i64"}),
    Case("fused_moe", "_down_gemv_kernel", {"TOP_K": 8, "STREAM": False, **_GEMV_TILE},
         {"y_ptr": "*fp32", "ids_ptr": "*i64", "weights_ptr": "*fp32"}),
    Case("fused_moe", "_gate_up_gemv_kernel", {"TOP_K": 8, "STREAM": True, **_GEMV_TILE}, {"ids_ptr": "*i64"}),
    Case("fused_moe", "_down_gemv_kernel", {"TOP_K": 8, "STREAM": True, **_GEMV_TILE},
         {"ids_ptr": "*i64", "weights_ptr": "*fp32", "y_ptr": "*fp32"}),
    Case("fused_moe", "_gate_up_gemv_tma_kernel", {"TOP_K": 8, "BLOCK_N": 16, "BLOCK_K": 256, "STAGES": 4},
         {"ids_ptr": "*i64", "w_desc": "tensordesc<bf16[1,16,256]>"}),
    Case("fused_moe", "_down_gemv_tma_kernel", {"BLOCK_N": 16, "BLOCK_K": 256, "STAGES": 4},
         {"ids_ptr": "*i64", "weights_ptr": "*fp32", "y_ptr": "*fp32", "w_desc": "tensordesc<bf16[1,16,256]>"}),
    Case("prefetch", "_prefetch_kernel", {"LINE": 64, "BLOCK": 256}),
    Case("fused_moe", "_topk_sum_kernel", {"TOP_K": 8, "BLOCK": 1024}, {"y_ptr": "*fp32"}),
    Case("fused_moe", "_gate_up_kernel", {"TOP_K": 8, "BLOCK_M": 16, **_GEMM_TILE},
         {"sorted_pairs_ptr": "*i64", "block_experts_ptr": "*i64"}),
    Case("fused_moe", "_down_kernel", {"BLOCK_M": 16, **_GEMM_TILE},
         {"weights_ptr": "*fp32", "sorted_pairs_ptr": "*i64", "block_experts_ptr": "*i64"}),
    Case("gemv", "_gemv_kernel", {"BLOCK_T": 1, "SPLIT_K": 4, "HAS_BIAS": False, **_GEMV_TILE},
         {"out_ptr": "*fp32"}),
    Case("gemv", "_gemv_kernel", {"BLOCK_T": 8, "SPLIT_K": 1, "HAS_BIAS": True, **_GEMV_TILE}),
    Case("gemv", "_gemv_kernel", {"BLOCK_T": 1, "SPLIT_K": 1, "HAS_BIAS": False, **_GEMV_TILE}),
    Case("embed", "_embed_rope_kernel", {"BLOCK_H": 1024, "BLOCK_F": 64},
         {"ids_ptr": "*i64", "src_ptr": "*i64", "tokens_ptr": "*i64", "positions_ptr": "*i64",
          "inv_freq_ptr": "*fp32", "cos_ptr": "*fp32", "sin_ptr": "*fp32"}),
    Case("argmax", "_chunk_max_kernel", {"BLOCK": 4096}, {"x_ptr": "*fp32", "max_ptr": "*fp32", "idx_ptr": "*i32"}),
    Case("argmax", "_pick_kernel", {"BLOCK_C": 64}, {"max_ptr": "*fp32", "idx_ptr": "*i32", "out_ptr": "*i64"}),
    Case("gemv", "_norm_gemv_kernel", {"BLOCK_T": 1, "SPLIT_K": 4, **_GEMV_TILE}, {"out_ptr": "*fp32"}),
    Case("gemv", "_split_sum_kernel", {"SPLIT_K": 4, "HAS_BIAS": False, "BLOCK": 64}, {"part_ptr": "*fp32"}),
]


def _jit_function(obj: object) -> object:
    """The JITFunction under an autotuner (or other wrappers)."""
    from triton.runtime.jit import JITFunction

    while not isinstance(obj, JITFunction):
        obj = obj.fn
    return obj


def compile_case(case: Case, pdl: bool, arch: int) -> float:
    """Compile one case (to a cubin); returns the seconds it took. Raises on a compile error."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _jit_function(getattr(importlib.import_module(f"crosspool.kernels.{case.module}"), case.kernel))
    constexprs = dict(case.constexprs)
    if "USE_PDL" in fn.arg_names:
        constexprs["USE_PDL"] = pdl
    signature = {}
    for i, name in enumerate(fn.arg_names):
        if i in fn.constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_desc"):                  # a TMA descriptor: "tensordesc<dtype[block shape]>"
            signature[name] = case.pointers[name]
        elif name.endswith("_ptr"):
            signature[name] = case.pointers.get(name, "*bf16")
        else:
            signature[name] = "fp32" if name in _FLOATS else "i32"
    missing = [n for n, t in signature.items() if t == "constexpr" and n not in constexprs]
    if missing:
        raise ValueError(f"{case.kernel}: no value for constexprs {missing}")
    t = time.perf_counter()
    compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                              target=GPUTarget("cuda", arch, 32))
    if pdl and "USE_PDL" in fn.arg_names and "griddepcontrol" not in compiled.asm["ptx"]:
        raise AssertionError(f"{case.kernel}: USE_PDL=True emitted no griddepcontrol instruction")
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m crosspool.kernels.aot", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: Hopper)")
    p.add_argument("--only", nargs="*", default=None, help="kernel names to compile (default: all)")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        p.error("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
    cases = [c for c in CASES if args.only is None or c.kernel in args.only]
    failed = 0
    for case in cases:
        for pdl in (False, True):
            label = f"{case.module}.{case.kernel} {case.constexprs} pdl={pdl}"
            try:
                seconds = compile_case(case, pdl, args.arch)
                print(f"ok   {seconds:5.1f} s  {label}", flush=True)
            except Exception as exc:   # report every failing case, then fail
                failed += 1
                print(f"FAIL {label}: {type(exc).__name__}: {exc}", flush=True)
    print(f"{len(cases) * 2 - failed}/{len(cases) * 2} compiled for sm_{args.arch}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
