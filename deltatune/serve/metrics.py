"""Prometheus metrics of a server (prometheus_client), each in its own CollectorRegistry.

Per-adapter series carry the adapter's public name as the label `adapter` ("base" for the base model), so
dashboards aggregate or split by adapter without parsing names.
"""
from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401  (re-exported for the server)

_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_TPOT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class ServeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("deltatune_requests", "Finished requests by adapter and outcome",
                                ["adapter", "outcome"], registry=r)
        self.rejected = Counter("deltatune_rejected_requests", "Requests refused before generating (bad field, unknown "
                                "model, body too large, connection cap, timeout, ...) by HTTP status and error code",
                                ["status", "code"], registry=r)
        self.prompt_tokens = Counter("deltatune_prompt_tokens", "Prompt tokens processed", ["adapter"], registry=r)
        self.generation_tokens = Counter("deltatune_generation_tokens", "Tokens generated", ["adapter"], registry=r)
        self.ttft = Histogram("deltatune_time_to_first_token_seconds", "Time from arrival to the first token",
                              ["adapter"], buckets=_TTFT_BUCKETS, registry=r)
        self.tpot = Histogram("deltatune_time_per_output_token_seconds", "Mean time per token after the first",
                              ["adapter"], buckets=_TPOT_BUCKETS, registry=r)
        self.queue = Gauge("deltatune_queue_length", "Requests waiting to join the running batch", registry=r)
        self.running = Gauge("deltatune_running_requests", "Requests in the running batch", registry=r)
        self.resident = Gauge("deltatune_adapters_resident", "Adapters loaded in memory", registry=r)
        self.resident_bytes = Gauge("deltatune_adapters_resident_bytes", "Bytes of all resident adapters", registry=r)
        self.adapter_bytes = Gauge("deltatune_adapter_bytes", "Bytes of one resident adapter", ["adapter"], registry=r)
        self.loads = Counter("deltatune_adapter_loads", "Adapters loaded (from disk or blended)", ["adapter"], registry=r)
        self.load_seconds = Histogram("deltatune_adapter_load_seconds", "Time to load an adapter", registry=r)
        self.evictions = Counter("deltatune_adapter_evictions", "Adapters evicted to fit the memory budget",
                                 ["adapter"], registry=r)
        self.hits = Counter("deltatune_adapter_cache_hits", "Requests whose adapter was already resident",
                            ["adapter"], registry=r)
        self.prefix_bytes = Gauge("deltatune_prefix_cache_bytes", "Bytes of K/V held by the prefix cache", registry=r)
        self.prefix_hits = Gauge("deltatune_prefix_cache_hit_tokens", "Prompt tokens whose K/V came from the prefix "
                                 "cache, since start", registry=r)
        self.prefix_queries = Gauge("deltatune_prefix_cache_query_tokens", "Prompt tokens looked up in the prefix "
                                    "cache, since start", registry=r)

    def watch(self, queue: Callable[[], float], running: Callable[[], float], resident: Callable[[], float],
              resident_bytes: Callable[[], float]) -> None:
        """Gauges read at scrape time."""
        self.queue.set_function(queue)
        self.running.set_function(running)
        self.resident.set_function(resident)
        self.resident_bytes.set_function(resident_bytes)

    def watch_prefix(self, cache) -> None:
        """The engine's prefix cache (deltatune.serve.prefix.PrefixCache), read at scrape time."""
        self.prefix_bytes.set_function(lambda: cache.bytes)
        self.prefix_hits.set_function(lambda: cache.hits)
        self.prefix_queries.set_function(lambda: cache.queries)

    # ---- called by the registry ------------------------------------------------------------------------
    def adapter_hit(self, name: str) -> None:
        self.hits.labels(name).inc()

    def adapter_loaded(self, name: str, nbytes: int, seconds: float) -> None:
        self.loads.labels(name).inc()
        self.adapter_bytes.labels(name).set(nbytes)
        self.load_seconds.observe(seconds)

    def adapter_removed(self, name: str, evicted: bool) -> None:
        if evicted:
            self.evictions.labels(name).inc()
        try:
            self.adapter_bytes.remove(name)
        except KeyError:
            pass

    def request_rejected(self, status: int, code: str | None) -> None:
        """A refused request: labels are the status and OpenAI's error code, never client-chosen text."""
        self.rejected.labels(str(status), code or "none").inc()

    # ---- called when a request ends --------------------------------------------------------------------
    def request_done(self, adapter: str, outcome: str, prompt_tokens: int, generated: int,
                     ttft: float | None, total: float | None) -> None:
        self.requests.labels(adapter, outcome).inc()
        self.prompt_tokens.labels(adapter).inc(prompt_tokens)
        self.generation_tokens.labels(adapter).inc(generated)
        if ttft is not None:
            self.ttft.labels(adapter).observe(ttft)
            if total is not None and generated > 1:
                self.tpot.labels(adapter).observe((total - ttft) / (generated - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)
