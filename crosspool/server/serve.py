"""`crosspool serve`: build the engine over the pools, print what is loaded where, run uvicorn."""

from __future__ import annotations

import json
import logging
import os
import sys
import time

from crosspool.config import EngineConfig
from crosspool.engine.llm import create_engine

LOG_FIELDS = ("request_id", "model", "prompt_tokens", "completion_tokens", "finish_reason", "path", "in_flight")


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line, with the request id and other context fields when present."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": round(record.created, 3), "level": record.levelname, "msg": record.getMessage()}
        out.update({k: getattr(record, k) for k in LOG_FIELDS if hasattr(record, k)})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def setup_logging() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLogFormatter())
    logger = logging.getLogger("crosspool")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False


def parse_models(specs: list[str]) -> dict[str, str]:
    models: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--model takes NAME=DIR, got {spec!r}")
        if name in models:
            raise ValueError(f"model name {name!r} given twice")
        models[name] = path
    return models


def device_memory_bytes(device: str) -> int:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_properties(torch.device(device)).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def apply_plan(plan_path: str, models: dict[str, str], layout: dict[str, object],
               layout_given: bool) -> tuple[dict[str, str], dict[str, object]]:
    """Models and EngineConfig settings from a plan file (`crosspool plan`). Refuses, with the plan's
    own message, a plan that does not fit these devices or models it does not cover."""
    from crosspool.config import layout_settings
    from crosspool.planner.plan import load_plan

    plan = load_plan(plan_path)
    planned = {m.name: m.path for m in plan.models}
    models = models or planned
    missing = sorted(set(models) - set(planned))
    if missing:
        raise ValueError(f"the plan {plan_path} has no traffic model for {missing}; re-plan with them")
    if not layout_given:
        layout = {**layout, **layout_settings(",".join(plan.kv_devices), ",".join(plan.weights_devices))}
    plan.check_fits([device_memory_bytes(d) for d in plan.devices])
    kv_ranks = len(layout.get("kv_devices") or ()) or 1
    return models, {**layout, "kv_cache_bytes": plan.kv_pool_bytes // kv_ranks,
                    "kv_caps_bytes": plan.per_model_kv_caps}


def describe(engine) -> str:  # noqa: ANN001
    cfg = engine.config
    pool = engine.kv_pool
    lines = [f"KV pool: {pool.total_pages * pool.page_bytes / 2**30:.2f} GiB on "
             f"{list(cfg.kv_devices) or [cfg.device]} ({pool.total_pages} pages of {pool.page_bytes >> 20} MiB)"]
    weights = getattr(engine.layout, "weights", None) if hasattr(engine, "layout") else None
    where = list(cfg.weights_devices) if cfg.weights_ranks else [cfg.device]
    for name, served in engine.models.items():
        wb = f", FFN {weights.model_bytes(name) / 2**20:,.1f} MiB" if weights is not None else ""
        lines.append(f"model {name}: {served.model.spec.architecture} from {served.path}; attention on the KV "
                     f"pool, FFN on {where}{wb}; max context {served.max_model_len}")
    return "\n".join(lines)


def serve(models: dict[str, str], layout: dict[str, object], host: str, port: int, api_key: str | None,
          max_in_flight: int, shutdown_timeout_s: float, kv_cache_gb: float | None) -> int:
    """Run the server (blocks until SIGTERM/SIGINT). `layout` holds EngineConfig settings."""
    import uvicorn

    from crosspool.server.app import build_app
    from crosspool.server.runtime import EngineRuntime

    setup_logging()
    t0 = time.perf_counter()
    if kv_cache_gb:
        layout = {**layout, "kv_cache_bytes": int(kv_cache_gb * 2**30)}
    cfg = EngineConfig(**layout)
    engine = create_engine(models, cfg)
    print(f"loaded {len(models)} model(s) in {time.perf_counter() - t0:.1f} s\n{describe(engine)}", flush=True)
    if hasattr(engine, "capture_graphs") and cfg.cuda_graphs:
        for name, seconds in engine.capture_graphs().items():
            print(f"model {name}: CUDA graphs captured in {seconds:.1f} s", flush=True)
    runtime = EngineRuntime(engine, max_in_flight=max_in_flight)
    app = build_app(runtime, api_key=api_key, shutdown_timeout_s=shutdown_timeout_s)
    print(f"serving on http://{host}:{port}/v1 (OpenAI API; /health, /metrics)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=int(shutdown_timeout_s) + 5)
    return 0
