"""Prometheus metrics with vLLM's names under the `crosspool:` prefix (label `model_name`), plus the
pools' own: KV bytes mapped per model, KV pool usage, weights pool bytes."""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily

from crosspool.engine.output import RequestOutput

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                   7.5, 10.0, 20.0, 40.0, 80.0)


class _PoolCollector:
    """Gauges read from the engine at scrape time (plain integer reads; no engine call)."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def collect(self):  # noqa: ANN201 - prometheus_client collector protocol
        running = GaugeMetricFamily("crosspool:num_requests_running", "Requests in the running batch",
                                    labels=["model_name"])
        waiting = GaugeMetricFamily("crosspool:num_requests_waiting", "Requests waiting to run",
                                    labels=["model_name"])
        usage = GaugeMetricFamily("crosspool:kv_cache_usage_perc", "KV blocks in use / blocks the model could hold",
                                  labels=["model_name"])
        mapped = GaugeMetricFamily("crosspool:kv_bytes_mapped", "KV bytes mapped for the model",
                                   labels=["model_name"])
        for name, served in list(self.engine.models.items()):
            sched, blocks = served.scheduler, served.blocks
            running.add_metric([name], len(sched.running))
            waiting.add_metric([name], len(sched.waiting))
            usage.add_metric([name], blocks.usage)
            mapped.add_metric([name], blocks.kv.mapped_bytes)
        pool = self.engine.kv_pool
        pool_usage = GaugeMetricFamily("crosspool:kv_pool_usage_perc", "Pages of the shared KV pool in use")
        pool_usage.add_metric([], pool.usage)
        pool_bytes = GaugeMetricFamily("crosspool:kv_pool_bytes", "Size of the shared KV pool")
        pool_bytes.add_metric([], pool.total_pages * pool.page_bytes)
        out = [running, waiting, usage, mapped, pool_usage, pool_bytes]
        weights = getattr(self.engine.layout, "weights", None) if hasattr(self.engine, "layout") else None
        if weights is not None:
            wb = GaugeMetricFamily("crosspool:weights_pool_bytes", "FFN bytes held by the weights pool",
                                   labels=["model_name"])
            for name in list(weights.models):
                wb.add_metric([name], weights.model_bytes(name))
            out.append(wb)
        yield from out


class Metrics:
    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.registry = CollectorRegistry()
        r, m = self.registry, ["model_name"]
        self.ttft = Histogram("crosspool:time_to_first_token_seconds", "Time to first token", m,
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("crosspool:inter_token_latency_seconds", "Time between tokens", m,
                             buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("crosspool:e2e_request_latency_seconds", "Request latency", m,
                             buckets=LATENCY_BUCKETS, registry=r)
        self.queue = Histogram("crosspool:request_queue_time_seconds", "Time waiting before first scheduled", m,
                               buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("crosspool:prompt_tokens", "Prompt tokens processed", m, registry=r)
        self.generation_tokens = Counter("crosspool:generation_tokens", "Tokens generated", m, registry=r)
        self.preemptions = Counter("crosspool:num_preemptions", "Preemptions (recompute)", m, registry=r)
        self.success = Counter("crosspool:request_success", "Finished requests", m + ["finished_reason"], registry=r)
        self.aborts = Counter("crosspool:request_aborted", "Requests aborted (client gone, shutdown)", registry=r)
        r.register(_PoolCollector(engine))
        self._seen: dict[str, int] = {}

    def observe(self, out: RequestOutput, model: str, prompt_tokens: int, arrival_s: float) -> None:
        seen = self._seen.get(out.request_id, 0)
        new = len(out.token_ids) - seen
        self._seen[out.request_id] = len(out.token_ids)
        self.generation_tokens.labels(model).inc(new)
        if seen == 0 and out.ttft_s is not None:
            self.ttft.labels(model).observe(out.ttft_s)
            self.prompt_tokens.labels(model).inc(prompt_tokens)
            if out.queue_s is not None:
                self.queue.labels(model).observe(out.queue_s)
        for gap in out.tbt_s[max(0, seen - 1):]:
            self.itl.labels(model).observe(gap)
        if out.finished:
            self._seen.pop(out.request_id, None)
            self.e2e.labels(model).observe(time.perf_counter() - arrival_s)
            self.success.labels(model, out.finish_reason or "unknown").inc()
            if out.num_preemptions:
                self.preemptions.labels(model).inc(out.num_preemptions)

    def aborted(self, request_id: str) -> None:
        self._seen.pop(request_id, None)
        self.aborts.inc()
