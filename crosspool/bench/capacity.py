"""The longest single request a layout can hold (issue 8): one GPU holding every pool vs KV devices apart.

    python -m crosspool.bench.capacity --model DIR [--copies 4] [--kv-devices cuda:0,cuda:1]
        [--weights-devices cuda:2,cuda:3] [--run]

`--copies` models (the checkpoint under names m0..) are loaded into the layout. A request's KV lives on one KV
device, so its ceiling is the KV pool of that device: on one GPU what the weights of every model leave, on a
KV device of a split layout nearly the whole device. Prints the pool size, the KV bytes per token and the
tokens one request of m0 could hold; `--run` then prefills one request of min(that, the model's context limit)
- 8 tokens and generates 4, to show it fits.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from crosspool.bench import provenance
from crosspool.config import EngineConfig, layout_settings
from crosspool.engine.llm import create_engine
from crosspool.engine.sampling import SamplingParams


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--copies", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--kv-devices", default=None)
    p.add_argument("--weights-devices", default=None)
    p.add_argument("--run", action="store_true")
    p.add_argument("--max-position", type=int, default=None,
                   help="serve the checkpoint with max_position_embeddings raised to this (a view of the "
                        "directory with a patched config.json), so the pool, not the config, is the limit")
    p.add_argument("--run-tokens", type=int, default=None, help="--run: prompt tokens at most (prefill time)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    config = EngineConfig(**layout_settings(args.kv_devices, args.weights_devices, default_device=args.device))
    t0 = time.perf_counter()
    model_dir = _long_context_view(args.model, args.max_position) if args.max_position else args.model
    engine = create_engine({f"m{i}": model_dir for i in range(args.copies)}, config)
    try:
        served = engine.models["m0"]
        spec = served.model.spec
        blocks = served.blocks
        per_token = blocks.kv.block_bytes / config.block_size
        fit = blocks.num_blocks * config.block_size
        row = {"layout": f"kv {args.kv_devices or args.device} weights {args.weights_devices or 'same'}",
               "copies": args.copies, "load_s": time.perf_counter() - t0,
               "kv_pool_bytes": engine.kv_pool.total_pages * engine.kv_pool.page_bytes,
               "kv_bytes_per_token": per_token, "tokens_one_request": fit, "model_context_limit": served.max_model_len}
        if args.run:
            length = min(fit, served.max_model_len, args.run_tokens or fit) - 8
            vocab = spec.vocab_size
            prompt = torch.randint(0, vocab - 10, (length,), generator=torch.Generator().manual_seed(0)).tolist()
            t = time.perf_counter()
            out = [o for o in _generate(engine, prompt) if o.finished][0]
            row.update({"ran_prompt_tokens": length, "generated": len(out.token_ids), "run_s": time.perf_counter() - t})
        print(json.dumps(row, indent=1))
        if args.json:
            with open(args.json, "w") as f:
                json.dump({**provenance.stamp(engine.device), **row}, f, indent=2)
    finally:
        engine.close()
    return 0


def _long_context_view(model_dir: str, max_position: int) -> str:
    """A temporary directory linking every file of `model_dir` but config.json, whose max_position_embeddings
    is `max_position`: the same weights, a context limit that the KV pool rather than the config bounds."""
    src = Path(model_dir).resolve()
    view = Path(tempfile.mkdtemp(prefix="crosspool-long-"))
    for f in src.iterdir():
        if f.name != "config.json":
            (view / f.name).symlink_to(f)
    config = json.loads((src / "config.json").read_text())
    config["max_position_embeddings"] = max_position
    (view / "config.json").write_text(json.dumps(config, indent=1))
    return str(view)


def _generate(engine, prompt: list[int]) -> list:  # noqa: ANN001
    engine.add_request("m0", prompt, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
    return outs


if __name__ == "__main__":
    raise SystemExit(main())
