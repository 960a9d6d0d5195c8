"""Prometheus metrics, one registry per daemon (tests run several daemons in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("offgridd_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=r)
        self.prompt_tokens = Counter("offgridd_prompt_tokens", "Tokens read from prompts", ["model"], registry=r)
        self.completion_tokens = Counter("offgridd_completion_tokens", "Tokens generated", ["model"], registry=r)
        self.ttft = Histogram("offgridd_time_to_first_token_seconds", "Request arrival to first token",
                              ["model"], registry=r,
                              buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.speed = Histogram("offgridd_generation_tokens_per_second", "Decode speed of each request",
                               ["model"], registry=r, buckets=(1, 2, 5, 10, 20, 30, 50, 75, 100, 150, 200, 400))
        self.queue_depth = Gauge("offgridd_queue_depth", "Requests waiting for a worker", registry=r)
        self.in_flight = Gauge("offgridd_requests_in_flight", "Inference requests being served", registry=r)
        self.worker_restarts = Counter("offgridd_worker_restarts", "Inference worker restarts", ["model"],
                                       registry=r)
        self.abandoned = Counter("offgridd_requests_abandoned", "Generations stopped because the client left",
                                 ["model"], registry=r)
        self.rejected = Counter("offgridd_admission_rejected", "Requests turned away by admission control",
                                ["reason"], registry=r)
        self.degraded = Gauge("offgridd_degraded", "1 while a degradation step is active", ["step"], registry=r)
        self.memory_available = Gauge("offgridd_memory_available_bytes", "MemAvailable as last sampled",
                                      registry=r)
        self.temperature = Gauge("offgridd_temperature_celsius", "Hottest thermal zone as last sampled", registry=r)
        self.admission_slots = Gauge("offgridd_admission_slots", "Requests the worker may run at once", registry=r)
        self.threads = Gauge("offgridd_threads", "llama.cpp threads per worker", registry=r)
        self.peers = Gauge("offgridd_peers", "Peers of the same fleet heard from recently", registry=r)
        self.peer_datagrams_dropped = Counter("offgridd_peer_datagrams_dropped", "Peer datagrams dropped",
                                              ["reason"], registry=r)
        self.peer_refusals = Counter("offgridd_peer_exchanges_refused", "Calls and answers between peers refused",
                                     ["reason"], registry=r)
        self.peer_pull_bytes = Counter("offgridd_peer_pull_bytes", "Model bytes pulled from peers", ["source"],
                                       registry=r)
        self.routed = Counter("offgridd_requests_routed", "Requests served by a peer", ["peer"], registry=r)
        self.model_loaded = Gauge("offgridd_model_loaded", "1 when the model's worker is ready", ["model"],
                                  registry=r)

    def add_model(self, name: str) -> None:
        """Export a model's counters as 0 from the start, so rates and tests need not wait for a first event."""
        for counter in (self.prompt_tokens, self.completion_tokens, self.worker_restarts, self.abandoned):
            counter.labels(name)
        self.model_loaded.labels(name).set(0)

    def render(self) -> bytes:
        return generate_latest(self.registry)
