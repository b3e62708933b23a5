"""Prometheus metrics of the server (prometheus_client, one registry per app).

Counters observed by the HTTP layer: requests by route and status, prompt and generated
tokens; histograms: time to first token and inter-token latency as the client sees them.
Read at scrape time from the engine and pool: running / waiting sequences, resident
adapters and their bytes, slot-table bytes, adapter loads, evictions and load failures.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

_LAT = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class _EngineCollector:
    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        st, pool = self.engine.stats(), self.engine.pool
        yield GaugeMetricFamily("lfm_num_requests_running", "sequences in the running batch", value=st["running"])
        yield GaugeMetricFamily("lfm_num_requests_waiting", "requests queued for admission", value=st["waiting"])
        info = pool.info()
        yield GaugeMetricFamily("lfm_adapters_resident", "adapters with weights in a slot",
                                value=sum(1 for i in info if i["slot"] >= 0))
        yield GaugeMetricFamily("lfm_adapters_registered", "adapters known by name", value=len(info))
        yield GaugeMetricFamily("lfm_adapter_pool_capacity", "adapter slots", value=pool.capacity)
        yield GaugeMetricFamily("lfm_adapter_resident_bytes", "real A/B bytes of resident adapters",
                                value=pool.resident_bytes())
        yield GaugeMetricFamily("lfm_adapter_table_bytes", "bytes of the padded slot tables", value=pool.table_bytes())
        for key, doc in (("loads", "adapter loads into a slot"), ("evictions", "adapters evicted (LRU)"),
                         ("load_failures", "adapter loads that failed")):
            yield CounterMetricFamily(f"lfm_adapter_{key}", doc, value=pool.counters[key])


class Metrics:
    def __init__(self, engine):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("lfm_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.prompt_tokens = Counter("lfm_prompt_tokens", "prompt tokens processed", registry=r)
        self.generation_tokens = Counter("lfm_generation_tokens", "tokens generated", registry=r)
        self.ttft = Histogram("lfm_time_to_first_token_seconds", "request arrival to first token", buckets=_LAT,
                              registry=r)
        self.itl = Histogram("lfm_inter_token_latency_seconds", "time between streamed tokens", buckets=_LAT,
                             registry=r)
        r.register(_EngineCollector(engine))

    def render(self) -> bytes:
        return generate_latest(self.registry)
