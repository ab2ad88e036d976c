"""Prometheus metrics of the server: requests, tokens, latency histograms, queue and slot gauges.

One :class:`ServingMetrics` per server, on its own registry (several servers can live in one process,
as the tests do). The engine side feeds it through :class:`~graphopt.runtime.async_llm.AsyncLLM`'s
observer hooks; the HTTP side counts responses by endpoint and status code.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from graphopt.runtime.llm import RequestOutput
from graphopt.runtime.prefix_cache import PrefixStats

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0)
RATE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)
LENGTH_BUCKETS = (1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0, 12.0, 17.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class ServingMetrics:
    """Counters, histograms and gauges; ``render()`` is the /metrics body."""

    def __init__(self, queue_length: Callable[[], int], slots_in_use: Callable[[], int], max_slots: int) -> None:
        disable_created_metrics()  # no *_created series: they double the page and nobody graphs them
        self.registry = CollectorRegistry()
        self.total_prompt_tokens = self.total_generation_tokens = 0  # plain totals for the throughput log
        reg = self.registry
        self.http = Counter("graphopt_http_requests", "HTTP responses by endpoint and status code",
                            ["endpoint", "status"], registry=reg)
        self.requests = Counter("graphopt_requests", "Generation requests by how they ended "
                                "(stop, length, cancelled, error)", ["status"], registry=reg)
        self.prompt_tokens = Counter("graphopt_prompt_tokens", "Prompt tokens of requests that produced a token",
                                     registry=reg)
        self.generation_tokens = Counter("graphopt_generation_tokens", "Generated tokens", registry=reg)
        self.ttft = Histogram("graphopt_time_to_first_token_seconds", "Arrival to first token",
                              buckets=LATENCY_BUCKETS, registry=reg)
        self.itl = Histogram("graphopt_inter_token_latency_seconds", "Time between a request's tokens",
                             buckets=LATENCY_BUCKETS, registry=reg)
        self.latency = Histogram("graphopt_request_latency_seconds", "Arrival to last token",
                                 buckets=LATENCY_BUCKETS, registry=reg)
        Gauge("graphopt_queue_length", "Requests waiting for a slot", registry=reg).set_function(queue_length)
        Gauge("graphopt_slots_in_use", "KV slots held by requests", registry=reg).set_function(slots_in_use)
        Gauge("graphopt_slots_total", "KV slots", registry=reg).set(max_slots)
        self.spec_drafts = Counter("graphopt_spec_draft_tokens", "Speculative draft tokens verified", registry=reg)
        self.spec_accepted = Counter("graphopt_spec_accepted_tokens", "Speculative draft tokens accepted",
                                     registry=reg)
        self.spec_rounds = Counter("graphopt_spec_verifications", "Speculative verification rounds", registry=reg)
        self._spec_totals = [0, 0, 0]  # rounds, drafts, accepted: the gauges below are ratios of these
        Gauge("graphopt_spec_acceptance_rate", "Accepted / verified draft tokens since start",
              registry=reg).set_function(lambda: self._spec_totals[2] / max(self._spec_totals[1], 1))
        Gauge("graphopt_spec_mean_accepted_length", "Tokens per verification round (accepted drafts + 1)",
              registry=reg).set_function(self._mean_accepted_length)
        self.spec_request_rate = Histogram("graphopt_spec_request_acceptance_rate", "Per finished request that "
                                           "speculated: accepted / verified drafts", buckets=RATE_BUCKETS, registry=reg)
        self.spec_request_length = Histogram("graphopt_spec_request_mean_accepted_length", "Per finished request "
                                             "that speculated: tokens per verification round", buckets=LENGTH_BUCKETS,
                                             registry=reg)

    # ---- observer hooks (AsyncLLM) -----------------------------------------------------------------------
    def on_token(self, output: RequestOutput, ttft: float | None, itl: float | None) -> None:
        self.generation_tokens.inc(len(output.token_ids))
        self.total_generation_tokens += len(output.token_ids)
        if output.num_drafted:
            self.spec_rounds.inc()
            self.spec_drafts.inc(output.num_drafted)
            self.spec_accepted.inc(output.num_accepted)
            for i, value in enumerate((1, output.num_drafted, output.num_accepted)):
                self._spec_totals[i] += value
        if ttft is not None:
            self.ttft.observe(ttft)
            self.prompt_tokens.inc(output.seq.num_prompt)
            self.total_prompt_tokens += output.seq.num_prompt
        if itl is not None:
            self.itl.observe(itl)

    def _mean_accepted_length(self) -> float:
        rounds, _, accepted = self._spec_totals
        return accepted / rounds + 1.0 if rounds else 0.0

    def on_finish(self, output: RequestOutput) -> None:
        self.requests.labels(output.finish_reason).inc()
        seq = output.seq
        if seq.last_token_time is not None and output.finish_reason != "cancelled":
            self.latency.observe(seq.last_token_time - seq.arrival_time)
        if seq.spec.rounds:
            self.spec_request_rate.observe(seq.spec.acceptance_rate)
            self.spec_request_length.observe(seq.spec.mean_accepted_length)

    def on_error(self) -> None:
        self.requests.labels("error").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def watch_prefix_cache(self, stats: Callable[[], PrefixStats]) -> None:
        """Export the prefix cache's counters (read when /metrics is scraped)."""
        self.registry.register(_PrefixCacheCollector(stats))


class _PrefixCacheCollector:
    def __init__(self, stats: Callable[[], PrefixStats]) -> None:
        self.stats = stats

    def collect(self):
        stats = self.stats()
        for name, help_text, value in (
                ("queries", "Requests admitted while the prefix cache was on", stats.lookups),
                ("hits", "Requests that started from a cached prefix", stats.hits),
                ("reused_tokens", "Prompt tokens whose KV came from the prefix cache", stats.tokens_reused),
                ("evictions", "Finished sequences' cached tokens dropped to make room", stats.evictions)):
            yield CounterMetricFamily(f"graphopt_prefix_cache_{name}", help_text, value=value)
        yield GaugeMetricFamily("graphopt_prefix_cache_hit_rate", "Hits / queries since start", value=stats.hit_rate)

