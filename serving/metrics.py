"""Prometheus metrics for GET /metrics: vLLM's names, each under `jpaged:` and `vllm:`.

Both prefixes carry the same values, so dashboards built for vLLM work unchanged. Engine-wide
gauges and counters are read from `get_stats_per_engine()` at scrape time, one sample per engine
labelled engine="i" (several with --data-parallel-size, as vLLM labels them); the per-request
histograms are observed by the server as a request streams and when it finishes.
"""

import time

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from jpaged.async_llm import AsyncLLM
from jpaged.outputs import RequestOutput

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
                    7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_N_BUCKETS = (1, 2, 5, 10, 20)
_TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)
PREFIXES = ("jpaged", "vllm")


class EngineStatsCollector:
    """Turns the `get_stats_per_engine()` snapshots into the engine gauges and counters."""

    def __init__(self, engine: AsyncLLM, model_name: str):
        self.engine = engine
        self.model_name = model_name

    def collect(self):
        per_engine = self.engine.get_stats_per_engine()
        gauges = (
            ("num_requests_running", "Requests in the running batch.", "num_running"),
            ("num_requests_waiting", "Requests waiting to be scheduled.", "num_waiting"),
            ("kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0..1).", "kv_cache_usage"),
        )
        counters = (
            ("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", "prefix_cache_queries"),
            ("prefix_cache_hits", "Prompt tokens found in the prefix cache.", "prefix_cache_hits"),
            ("num_preemptions", "Preemptions of running requests.", "num_preemptions"),
            ("prompt_tokens", "Prompt tokens processed.", "prompt_tokens_total"),
            ("generation_tokens", "Tokens generated.", "generation_tokens_total"),
        )
        for prefix in PREFIXES:
            for family_type, metrics in ((GaugeMetricFamily, gauges), (CounterMetricFamily, counters)):
                for name, documentation, field in metrics:
                    family = family_type(f"{prefix}:{name}", documentation, labels=["model_name", "engine"])
                    for index, stats in enumerate(per_engine):
                        family.add_metric([self.model_name, str(index)], getattr(stats, field))
                    yield family


class _Histogram:
    """One histogram under every prefix in PREFIXES."""

    def __init__(self, registry, name: str, documentation: str, buckets):
        self.histograms = [Histogram(f"{prefix}:{name}", documentation, ["model_name"], buckets=buckets,
                                     registry=registry) for prefix in PREFIXES]

    def observe(self, label: str, value: float) -> None:
        for histogram in self.histograms:
            histogram.labels(label).observe(value)


class ServerMetrics:
    """A private registry (several servers may live in one process, e.g. in tests)."""

    def __init__(self, engine: AsyncLLM, model_name: str):
        self.model_name = model_name
        self.registry = CollectorRegistry()
        self.registry.register(EngineStatsCollector(engine, model_name))

        def histogram(name, documentation, buckets):
            return _Histogram(self.registry, name, documentation, buckets)

        self.time_to_first_token = histogram(
            "time_to_first_token_seconds", "Time from arrival to the first token.", _LATENCY_BUCKETS)
        self.time_per_output_token = [histogram(
            name, "Mean time between output tokens of a request, after the first.", _LATENCY_BUCKETS)
            for name in ("time_per_output_token_seconds",  # vLLM's older name, kept for older dashboards
                         "request_time_per_output_token_seconds")]
        self.inter_token_latency = histogram(
            "inter_token_latency_seconds", "Time between two output tokens of a request (one observation per "
            "token after the first; a non-streamed request contributes its mean gap).", _LATENCY_BUCKETS)
        self.e2e_request_latency = histogram(
            "e2e_request_latency_seconds", "Time from arrival to the last token.", _LATENCY_BUCKETS)
        self.request_queue_time = histogram(
            "request_queue_time_seconds", "Time from arrival to first scheduling.", _LATENCY_BUCKETS)
        self.request_prefill_time = histogram(
            "request_prefill_time_seconds", "Time from first scheduling to the first token.", _LATENCY_BUCKETS)
        self.request_decode_time = histogram(
            "request_decode_time_seconds", "Time from the first token to the last.", _LATENCY_BUCKETS)
        self.request_inference_time = histogram(
            "request_inference_time_seconds", "Time from first scheduling to the last token.", _LATENCY_BUCKETS)
        self.request_prompt_tokens = histogram(
            "request_prompt_tokens", "Prompt length of finished requests.", _TOKEN_BUCKETS)
        self.request_generation_tokens = histogram(
            "request_generation_tokens", "Tokens generated by finished requests (all n samples).", _TOKEN_BUCKETS)
        self.request_max_num_generation_tokens = histogram(
            "request_max_num_generation_tokens", "Tokens of a finished request's longest sample.", _TOKEN_BUCKETS)
        self.request_prefill_kv_computed_tokens = histogram(
            "request_prefill_kv_computed_tokens", "Prompt tokens a finished request computed (not from the prefix "
            "cache).", _TOKEN_BUCKETS)
        self.request_params_n = histogram("request_params_n", "The n of finished requests.", _N_BUCKETS)
        self.request_params_max_tokens = histogram(
            "request_params_max_tokens", "The max_tokens of finished requests that set it.", _TOKEN_BUCKETS)
        self.request_success = [Counter(f"{prefix}:request_success", "Finished requests, by finish reason.",
                                        ["model_name", "finished_reason"], registry=self.registry)
                                for prefix in PREFIXES]
        for counter in self.request_success:  # every reason's series from the start, at 0, as vLLM's
            for reason in ("stop", "length", "abort", "error"):
                counter.labels(model_name, reason)

    def observe_token_gap(self, gap_s: float, num_tokens: int) -> None:
        """A streamed output carried `num_tokens` new tokens `gap_s` after the previous one."""
        for _ in range(num_tokens):
            self.inter_token_latency.observe(self.model_name, gap_s / num_tokens)

    def observe_finished(self, output: RequestOutput, num_generation_tokens: int, longest_output: int,
                         finish_reason: str, streamed: bool, n: int, max_tokens: int | None) -> None:
        """Records one finished request; `longest_output` = tokens of its longest sample; `n` and
        `max_tokens`: its parameters (max_tokens None when unset)."""
        m = output.metrics
        finished = m.finished_time or time.time()
        label = self.model_name
        if m.arrival_time is not None:
            self.e2e_request_latency.observe(label, finished - m.arrival_time)
            if m.first_token_time is not None:
                self.time_to_first_token.observe(label, m.first_token_time - m.arrival_time)
            if m.first_scheduled_time is not None:
                self.request_queue_time.observe(label, m.first_scheduled_time - m.arrival_time)
        if m.first_scheduled_time is not None and m.first_token_time is not None:
            self.request_prefill_time.observe(label, m.first_token_time - m.first_scheduled_time)
        if m.first_token_time is not None and m.last_token_time is not None:
            self.request_decode_time.observe(label, m.last_token_time - m.first_token_time)
            if m.first_scheduled_time is not None:
                self.request_inference_time.observe(label, m.last_token_time - m.first_scheduled_time)
            if longest_output > 1:
                mean_gap = (m.last_token_time - m.first_token_time) / (longest_output - 1)
                for histogram in self.time_per_output_token:
                    histogram.observe(label, mean_gap)
                if not streamed:
                    for _ in range(longest_output - 1):
                        self.inter_token_latency.observe(label, mean_gap)
        self.request_prompt_tokens.observe(label, len(output.prompt_token_ids))
        self.request_generation_tokens.observe(label, num_generation_tokens)
        self.request_max_num_generation_tokens.observe(label, longest_output)
        self.request_prefill_kv_computed_tokens.observe(
            label, len(output.prompt_token_ids) - min(output.num_cached_tokens, len(output.prompt_token_ids)))
        self.request_params_n.observe(label, n)
        if max_tokens is not None:
            self.request_params_max_tokens.observe(label, max_tokens)
        for counter in self.request_success:
            counter.labels(label, finish_reason).inc()

    def observe_aborted(self) -> None:
        """A request whose client went away before it finished (`finished_reason` "abort")."""
        for counter in self.request_success:
            counter.labels(self.model_name, "abort").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
