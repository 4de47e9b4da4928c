"""`crosspool` command line: make-model | generate | demo."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def _device(arg: str | None) -> str:
    if arg:
        return arg
    return "cuda" if torch.cuda.is_available() else "cpu"


def _add_layout_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("pool layout")
    g.add_argument("--device", default=None, help="cpu | cuda[:N] (default: cuda when present)")
    g.add_argument("--kv-devices", default=None, help="device(s) of the KV-cache pool, e.g. cuda:0")
    g.add_argument("--weights-devices", default=None, help="device(s) of the weights pool, e.g. cuda:1,cuda:2")
    g.add_argument("--kv-ranks", type=int, default=None, help="CPU: KV-pool processes (gloo)")
    g.add_argument("--weights-ranks", type=int, default=None, help="CPU: weights-pool processes (gloo)")
    g.add_argument("--kernels", choices=["torch", "triton"], default=None,
                   help="torch reference ops, or the Triton kernels (paged attention, fused MoE); "
                        "default: triton on a GPU, torch on the CPU")
    g.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false", default=None,
                   help="run decode steps eagerly instead of replaying CUDA graphs")


def _layout(args: argparse.Namespace) -> dict[str, object]:
    from crosspool.config import layout_settings

    return {**layout_settings(args.kv_devices, args.weights_devices, args.kv_ranks, args.weights_ranks,
                              default_device=_device(args.device)), "kernels": args.kernels,
            "cuda_graphs": args.cuda_graphs}


def cmd_make_model(args: argparse.Namespace) -> int:
    from crosspool.models.make_model import make_model

    out = make_model(args.preset, args.out, layers=args.layers, seed=args.seed, dtype=args.dtype,
                     progress=not args.quiet, device=args.device)
    print(f"wrote {args.preset} to {out}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from crosspool import LLM, EngineConfig

    with LLM(args.model, EngineConfig(**_layout(args))) as llm:
        return _generate_one(llm, args)


def _generate_one(llm, args: argparse.Namespace) -> int:  # noqa: ANN001
    from crosspool import SamplingParams

    name = llm.model_names[0]
    prompt = args.prompt
    if args.chat:
        tok = llm.engine.models[name].tokenizer
        prompt = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed, stop=args.stop or [], ignore_eos=args.ignore_eos)
    out = llm.generate(prompt, params)[0]
    if args.json:
        print(json.dumps({
            "model": name, "text": out.text, "prompt_token_ids": out.prompt_token_ids,
            "token_ids": out.token_ids, "finish_reason": out.finish_reason, "ttft_s": out.ttft_s,
            "tbt_s": out.tbt_s,
        }, indent=2))
    else:
        print(out.text)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from crosspool.server.serve import parse_models, serve

    models, layout = parse_models(args.model or []), _layout(args)
    if args.plan:
        from crosspool.server.serve import apply_plan

        given = any(getattr(args, f) for f in ("kv_devices", "weights_devices", "kv_ranks", "weights_ranks"))
        models, layout = apply_plan(args.plan, models, layout, layout_given=given)
    if not models:
        raise ValueError("no models: give --model NAME=DIR (repeatable) or --plan FILE")
    return serve(models, layout, args.host, args.port, args.api_key, args.max_in_flight,
                 args.shutdown_timeout, args.kv_cache_gb)


def cmd_demo(args: argparse.Namespace) -> int:
    from crosspool.demo import run_demo

    return run_demo(models_dir=Path(args.models_dir), layout=_layout(args), num_requests=args.requests,
                    max_tokens=args.max_tokens, seed=args.seed)


def cmd_bench(args: argparse.Namespace) -> int:
    from crosspool.bench import decode

    return decode.main(args.rest)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="crosspool", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    m = sub.add_parser("make-model", help="write a random-weight HF checkpoint with a preset's real shapes")
    m.add_argument("--preset", required=True)
    m.add_argument("--out", required=True)
    m.add_argument("--layers", type=int, default=None, help="override num_hidden_layers")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--dtype", default="bf16", help="bf16 | fp16 | fp32")
    m.add_argument("--quiet", action="store_true")
    m.add_argument("--device", default="cpu", help="draw the random values here (cuda: much faster for large presets)")
    m.set_defaults(func=cmd_make_model)

    g = sub.add_parser("generate", help="complete one prompt offline")
    g.add_argument("--model", required=True, help="checkpoint directory")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-tokens", type=int, default=32)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=-1)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--json", action="store_true", help="print token ids and timings as JSON")
    _add_layout_flags(g)
    g.set_defaults(func=cmd_generate)

    sv = sub.add_parser("serve", help="OpenAI-compatible server for several models")
    sv.add_argument("--model", action="append", metavar="NAME=DIR", help="repeatable (default: the plan's models)")
    sv.add_argument("--plan", default=None, help="plan file from `crosspool plan`: pool sizes, devices, KV caps")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (admin endpoints always)")
    sv.add_argument("--max-in-flight", type=int, default=256, help="requests in flight before 503")
    sv.add_argument("--shutdown-timeout", type=float, default=30.0, help="seconds to drain on SIGTERM")
    sv.add_argument("--kv-cache-gb", type=float, default=None, help="KV pool size (default: what is left)")
    _add_layout_flags(sv)
    sv.set_defaults(func=cmd_serve)

    from crosspool.planner.cli import add_plan_parser

    add_plan_parser(sub)

    b = sub.add_parser("bench", help="benchmarks: `crosspool bench decode --help`", add_help=False)
    b.add_argument("which", choices=["decode"])
    b.add_argument("rest", nargs=argparse.REMAINDER)
    b.set_defaults(func=cmd_bench)

    d = sub.add_parser("demo", help="serve a mixed workload over tiny models of several families")
    d.add_argument("--models-dir", default="models/demo")
    d.add_argument("--requests", type=int, default=24)
    d.add_argument("--max-tokens", type=int, default=24)
    d.add_argument("--seed", type=int, default=0)
    _add_layout_flags(d)
    d.set_defaults(func=cmd_demo)
    return p


def _torchrun_rank(args: argparse.Namespace) -> int | None:
    """Under torchrun every rank runs this command; ranks > 0 become KV or weights ranks of the layout."""
    import os

    import torch.distributed as dist

    if not dist.is_torchelastic_launched() or int(os.environ["RANK"]) == 0 or not hasattr(args, "kv_devices"):
        return None
    from crosspool.config import EngineConfig
    from crosspool.pools.ranks import rank_main
    from crosspool.pools.world import DTYPE_NAMES

    cfg = EngineConfig(**_layout(args))
    kv = list(cfg.kv_devices) or [cfg.device]
    devices = kv + list(cfg.weights_devices)
    rank = int(os.environ["RANK"])
    rank_main(["--kv-ranks", str(len(kv)), "--weights-ranks", str(len(cfg.weights_devices)),
               "--device", devices[rank], "--dtype", DTYPE_NAMES[cfg.dtype]])
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rank_rc = _torchrun_rank(args)
    if rank_rc is not None:
        return rank_rc
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"crosspool {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
