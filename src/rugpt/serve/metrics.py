"""Prometheus metrics of one server: queue depth, running batch, tokens, latency, rejections.

Each app gets its own registry, so several apps in one process (tests, a benchmark) never share counts.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128, 300)


class ServerMetrics:
    """The counters the scheduler and the routes update; `render()` is the /metrics page."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.queue_depth = Gauge("rugpt_queue_depth", "requests waiting for a decode slot", registry=r)
        self.running_rows = Gauge("rugpt_running_rows", "sequences in the running batch", registry=r)
        self.running_requests = Gauge("rugpt_running_requests", "requests being decoded", registry=r)
        self.tokens = Counter("rugpt_generated_tokens", "tokens generated", registry=r)
        self.prompt_tokens = Counter("rugpt_prompt_tokens", "prompt tokens prefilled", registry=r)
        self.steps = Counter("rugpt_decode_steps", "batched decode steps", registry=r)
        self.requests = Counter("rugpt_requests", "requests answered, by route and HTTP status",
                                ["route", "status"], registry=r)
        self.rejections = Counter("rugpt_rejections", "requests refused or ended early, by reason",
                                  ["reason"], registry=r)
        self.cancellations = Counter("rugpt_cancellations", "requests cancelled while waiting or running, by cause",
                                     ["cause"], registry=r)
        self.latency = Histogram("rugpt_request_latency_seconds", "time from arrival to the last byte, by route",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram("rugpt_queue_wait_seconds", "time a request waited for a decode slot",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.prefix_cache_lookups = Counter("rugpt_prefix_cache_lookups", "prompts looked up in the prefix cache",
                                            registry=r)
        self.prefix_cache_hits = Counter("rugpt_prefix_cache_hits", "prompts that started from cached blocks",
                                         registry=r)
        self.prefix_cache_saved_tokens = Counter("rugpt_prefix_cache_saved_tokens",
                                                 "prompt tokens taken from the prefix cache instead of computed",
                                                 registry=r)
        self.prefix_cache_hit_rate = Gauge("rugpt_prefix_cache_hit_rate", "prefix cache hits / lookups so far",
                                           registry=r)
        self.prefix_cache_bytes = Gauge("rugpt_prefix_cache_bytes", "memory held by the prefix cache's blocks",
                                        registry=r)
        self.drafted_tokens = Counter("rugpt_speculative_drafted_tokens", "draft tokens checked (--speculate)",
                                      registry=r)
        self.accepted_tokens = Counter("rugpt_speculative_accepted_tokens",
                                       "draft tokens the model agreed with (--speculate)", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
