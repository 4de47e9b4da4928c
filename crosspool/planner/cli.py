"""`crosspool plan`: the planner's command line.

Owns the argument parsing of the `plan` subcommand (registered into the main parser with
`add_plan_parser`), turning flags into `ModelInput`s and `PlanSettings`, reading device memory, and
writing the plan JSON, its summary and its PNG. `python -m crosspool.planner.cli plan ...` runs it alone.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

from crosspool.planner.plan import GIB, Plan
from crosspool.planner.sizing import DEFAULT_DECODE_TPS, DEFAULT_PREFILL_TPS, ModelInput, PlanSettings, make_plan
from crosspool.planner.step_clock import StepTimeModel
from crosspool.planner.workload import (
    BUILTIN_WORKLOADS,
    LONGALIGN,
    SHAREGPT,
    BurstProcess,
    ModelTraffic,
    read_trace,
    trace_traffic,
)

DTYPE_BYTES = {"bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2, "fp32": 4, "float32": 4, "fp8": 1}


def add_plan_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "plan", help="size the KV-cache and weights pools from traffic (Monte-Carlo)",
        description="Simulate the aggregate KV demand of the models under the given traffic, size the shared "
                    "KV pool to a percentile of it, place the pools on devices, and write a plan for serve.")
    p.add_argument("--model", action="append", required=True, metavar="NAME=DIR",
                   help="model name and checkpoint directory (repeatable)")
    p.add_argument("--rate", action="append", default=[], metavar="NAME=RPS",
                   help="mean requests/s of a model (repeatable; with a trace file, default: the trace's rate)")
    p.add_argument("--workload", default="sharegpt", metavar="sharegpt|longalign|FILE",
                   help="request lengths: built-in ShareGPT-like or LongAlign-like, or a JSONL trace of "
                        '{"model", "arrival_s", "prompt_tokens", "output_tokens"}')
    p.add_argument("--burstiness", type=float, default=None,
                   help="gamma shape of inter-arrival gaps: 1 = Poisson, < 1 burstier (default 1; fitted from a trace)")
    p.add_argument("--burst-factor", type=float, default=1.0,
                   help="rate multiplier during on/off bursts (1 = none); the mean rate is kept")
    p.add_argument("--burst-on-s", type=float, default=10.0, help="mean burst length")
    p.add_argument("--burst-off-s", type=float, default=90.0, help="mean time between bursts")
    p.add_argument("--independent-bursts", action="store_true",
                   help="each model bursts on its own (default: bursts are shared by all models)")
    p.add_argument("--percentile", type=float, default=99.0, help="size the KV pool to this percentile of demand")
    p.add_argument("--confidence", type=float, default=0.95, help="level of the quantile's confidence interval")
    p.add_argument("--devices", default="cuda:0", help="comma list; one device holds both pools")
    p.add_argument("--device-memory-gb", default=None,
                   help="memory per device in GiB (one value or a comma list) when planning without the GPUs")
    p.add_argument("--headroom", type=float, default=0.10, help="fraction of each device kept free")
    p.add_argument("--decode-tps", action="append", default=[], metavar="[NAME=]TPS",
                   help=f"decode tokens/s per sequence (default {DEFAULT_DECODE_TPS:g}; repeatable per model)")
    p.add_argument("--prefill-tps", action="append", default=[], metavar="[NAME=]TPS",
                   help=f"prefill tokens/s per request (default {DEFAULT_PREFILL_TPS:g}; repeatable per model)")
    p.add_argument("--step-time", default=None, metavar="B,M,S,C,K,T,P",
                   help="engine step seconds = B + M*models + S*sequences + C*context tokens + K*prompt chunks + "
                        "T*prompt tokens + P*prompt pairs (as fitted by crosspool.bench.plan_vs_measured); "
                        "replaces the per-model speeds")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPE_BYTES), help="KV cache and weights dtype")
    p.add_argument("--max-num-seqs", type=int, default=64, help="per model, for the worst-case reservation")
    p.add_argument("--max-model-len", type=int, default=None, help="default: each model's context length")
    p.add_argument("--horizon-s", type=float, default=600.0, help="simulated seconds per trial")
    p.add_argument("--trials", type=int, default=200, help="independent trials")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="plan.json", help="plan file")
    p.add_argument("--png", default=None, help="demand plot (default: the plan path with .png)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_plan)


def _pairs(values: list[str], flag: str, names: list[str], allow_bare: bool = False) -> dict[str, float]:
    """NAME=NUMBER flags as a dict; a bare NUMBER (when allowed) applies to every model."""
    out: dict[str, float] = {}
    for v in values:
        name, sep, num = v.rpartition("=")
        if not sep and not allow_bare:
            raise ValueError(f"{flag} {v!r}: expected NAME=NUMBER")
        try:
            x = float(num)
        except ValueError:
            raise ValueError(f"{flag} {v!r}: {num!r} is not a number") from None
        if not (math.isfinite(x) and x >= 0):
            raise ValueError(f"{flag} {v!r}: must be a finite number >= 0")
        if sep and name not in names:
            raise ValueError(f"{flag} {v!r}: unknown model {name!r}; models are {names}")
        for n in [name] if sep else names:
            out[n] = x
    return out


def _models(values: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for v in values:
        name, sep, path = v.partition("=")
        if not sep:
            name, path = Path(v).name, v
        if not name or not path:
            raise ValueError(f"--model {v!r}: expected NAME=DIR")
        if name in out:
            raise ValueError(f"--model {name!r} given twice")
        out[name] = path
    return out


def device_memory(devices: list[str], memory_gb: str | None) -> list[int]:
    if memory_gb:
        sizes = [float(x) for x in memory_gb.split(",")]
        if len(sizes) == 1:
            sizes *= len(devices)
        if len(sizes) != len(devices) or min(sizes) <= 0:
            raise ValueError(f"--device-memory-gb: need one size > 0 or one per device {devices}, got {memory_gb}")
        return [int(x * GIB) for x in sizes]
    out = []
    for d in devices:
        if d == "cpu":
            out.append(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
            continue
        import torch

        if not d.startswith("cuda") or not torch.cuda.is_available():
            raise ValueError(f"cannot read the memory of {d} here: pass --device-memory-gb")
        out.append(torch.cuda.get_device_properties(torch.device(d)).total_memory)
    return out


def build_inputs(args: argparse.Namespace) -> tuple[list[ModelInput], PlanSettings]:
    from crosspool.models.loader import load_spec

    paths = _models(args.model)
    names = list(paths)
    rates = _pairs(args.rate, "--rate", names)
    decode = _pairs(args.decode_tps, "--decode-tps", names, allow_bare=True)
    prefill = _pairs(args.prefill_tps, "--prefill-tps", names, allow_bare=True)
    for flag, d in (("--decode-tps", decode), ("--prefill-tps", prefill)):
        if any(v <= 0 for v in d.values()):
            raise ValueError(f"{flag} must be > 0")
    if args.burstiness is not None and not args.burstiness > 0:
        raise ValueError(f"--burstiness must be > 0, got {args.burstiness}")
    trace = None
    if args.workload not in BUILTIN_WORKLOADS:
        trace = read_trace(args.workload)
    inputs = []
    for name, path in paths.items():
        if not Path(path).is_dir():
            raise FileNotFoundError(f"--model {name}: {path!r} is not a checkpoint directory")
        if trace is not None:
            rate, shape, lengths = trace_traffic(trace, name)
            rate = rates.get(name, rate)
            shape = args.burstiness or shape
        else:
            if name not in rates:
                raise ValueError(f"no --rate for model {name!r} (give --rate {name}=RPS)")
            rate, shape = rates[name], args.burstiness or 1.0
            lengths = SHAREGPT if args.workload == "sharegpt" else LONGALIGN
        inputs.append(ModelInput(
            name=name, spec=load_spec(path), traffic=ModelTraffic(rate, shape, lengths), path=str(path),
            decode_tps=decode.get(name, DEFAULT_DECODE_TPS), prefill_tps=prefill.get(name, DEFAULT_PREFILL_TPS),
            max_model_len=args.max_model_len,
        ))
    burst = BurstProcess(args.burst_factor, args.burst_on_s, args.burst_off_s, not args.independent_bursts)
    step_time = None
    if args.step_time:
        try:
            coefs = [float(x) for x in args.step_time.split(",")]
        except ValueError:
            raise ValueError(f"--step-time {args.step_time!r}: expected comma-separated seconds") from None
        if len(coefs) != 7:
            raise ValueError(f"--step-time needs 7 coefficients (B,M,S,C,K,T,P), got {len(coefs)}")
        step_time = StepTimeModel(*coefs)
    settings = PlanSettings(
        percentile=args.percentile, confidence=args.confidence, horizon_s=args.horizon_s, trials=args.trials,
        seed=args.seed, block_size=args.block_size, dtype_bytes=DTYPE_BYTES[args.dtype],
        max_num_seqs=args.max_num_seqs, headroom_fraction=args.headroom, burst=burst,
        workload=Path(args.workload).name if trace is not None else args.workload, step_time=step_time,
    )
    return inputs, settings


def cmd_plan(args: argparse.Namespace) -> int:
    devices = [d.strip() for d in args.devices.split(",") if d.strip()]
    models, settings = build_inputs(args)
    memory = device_memory(devices, args.device_memory_gb)
    plan: Plan = make_plan(models, settings, devices, memory, progress=not args.quiet)
    print(plan.summary())
    plan.check_fits(plan.device_memory_bytes)
    plan.save(args.out)
    png = args.png or str(Path(args.out).with_suffix(".png"))
    try:
        plan.write_png(png)
    except ImportError:
        print("matplotlib is not installed: no demand plot (pip install matplotlib)", file=sys.stderr)
        png = None
    print(f"wrote {args.out}" + (f" and {png}" if png else ""))
    return 0
