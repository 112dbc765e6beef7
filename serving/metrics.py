"""Prometheus metrics for GET /metrics: vLLM's names, each under `jpaged:` and `vllm:`.

Both prefixes carry the same values, so dashboards built for vLLM work unchanged. Engine-wide
gauges, counters and the step-size histogram are read from `get_stats_per_engine()` at scrape
time, one sample per engine labelled engine="i" (several with --data-parallel-size, as vLLM labels
them); the per-request histograms are observed by the server as a request streams and when it
finishes.
"""

import itertools
import time

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from jpaged.admission import QUEUE_LIMIT_REASONS
from jpaged.async_llm import AsyncLLM
from jpaged.outputs import ITERATION_TOKENS_BUCKETS, EngineStats, PoolingRequestOutput, RequestOutput

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
                    7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_N_BUCKETS = (1, 2, 5, 10, 20)
_PREEMPTION_BUCKETS = (1, 2, 3, 4, 5, 10, 20)
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
            ("prompt_tokens_cached", "Prompt tokens found in the prefix cache when a request was first "
             "scheduled.", "prompt_tokens_cached"),
            ("generation_tokens", "Tokens generated.", "generation_tokens_total"),
        )
        # Labelled families: (type, name, documentation, label, {label value: value of an EngineStats}).
        by_label = (
            (GaugeMetricFamily, "num_requests_waiting_by_reason", "Waiting requests by reason: capacity (waiting "
             "for room in the batch or pool), deferred (held back by the LoRA budget, --max-loras); they sum to "
             "num_requests_waiting.", "reason", {"capacity": lambda s: s.num_waiting - s.num_waiting_deferred,
                                                 "deferred": lambda s: s.num_waiting_deferred}),
            (GaugeMetricFamily, "engine_sleep_state", "Engine sleep state (sleep mode): awake 1 while awake, 0 "
             "while asleep; weights_offloaded 1 at sleep level 1; discard_all 1 at level 2.", "sleep_state",
             {"awake": lambda s: int(s.sleep_level is None), "weights_offloaded": lambda s: int(s.sleep_level == 1),
              "discard_all": lambda s: int(s.sleep_level == 2)}),
            (CounterMetricFamily, "prompt_tokens_by_source", "Prompt tokens of requests when first scheduled, by "
             "source.", "source", {"local_compute": lambda s: s.prompt_tokens_computed,
                                   "local_cache_hit": lambda s: s.prompt_tokens_cached,
                                   "external_kv_transfer": lambda s: 0}),
            (CounterMetricFamily, "prompt_tokens_cached_by_source", "Prefix-cache hit tokens by the tier that "
             "held them (device: the KV pool; the others are never used).", "source",
             {"device": lambda s: s.prefix_cache_hits, "host": lambda s: 0, "p2p": lambda s: 0,
              "disk": lambda s: 0, "external_unspecified": lambda s: 0}),
        )
        for prefix in PREFIXES:
            for family_type, metrics in ((GaugeMetricFamily, gauges), (CounterMetricFamily, counters)):
                for name, documentation, field in metrics:
                    family = family_type(f"{prefix}:{name}", documentation, labels=["model_name", "engine"])
                    for index, stats in enumerate(per_engine):
                        family.add_metric([self.model_name, str(index)], getattr(stats, field))
                    yield family
            for family_type, name, documentation, label, values in by_label:
                family = family_type(f"{prefix}:{name}", documentation, labels=["model_name", "engine", label])
                for (index, stats), (label_value, value) in itertools.product(enumerate(per_engine), values.items()):
                    family.add_metric([self.model_name, str(index), label_value], value(stats))
                yield family
            family = HistogramMetricFamily(f"{prefix}:iteration_tokens_total", "Tokens per engine step (prompt "
                                           "tokens computed + tokens sampled).", labels=["model_name", "engine"])
            for index, stats in enumerate(per_engine):
                cumulative = itertools.accumulate(stats.iteration_tokens_counts)
                bounds = [str(float(b)) for b in ITERATION_TOKENS_BUCKETS] + ["+Inf"]
                family.add_metric([self.model_name, str(index)], list(zip(bounds, cumulative)),
                                  stats.iteration_tokens_sum)
            yield family
            yield self._cache_config_info(prefix, per_engine)
            if self.engine.engine_args.enable_lora:
                yield self._lora_requests_info(prefix, per_engine)
            if self.engine.engine_args.speculative_config is not None:
                yield from self._spec_decode_counters(prefix, per_engine)

    def _spec_decode_counters(self, prefix: str, per_engine: list[EngineStats]):
        """vLLM's speculative-decoding counters (with --speculative-config)."""
        for name, documentation, field in (
                ("spec_decode_num_drafts", "Number of spec decoding drafts.", "spec_num_drafts"),
                ("spec_decode_num_draft_tokens", "Number of draft tokens.", "spec_num_draft_tokens"),
                ("spec_decode_num_accepted_tokens", "Number of accepted tokens.", "spec_num_accepted_tokens")):
            family = CounterMetricFamily(f"{prefix}:{name}", documentation, labels=["model_name", "engine"])
            for index, stats in enumerate(per_engine):
                family.add_metric([self.model_name, str(index)], getattr(stats, field))
            yield family
        family = CounterMetricFamily(f"{prefix}:spec_decode_num_accepted_tokens_per_pos",
                                     "Accepted tokens per draft position.", labels=["model_name", "engine", "position"])
        for index, stats in enumerate(per_engine):
            for position, count in enumerate(stats.spec_accepted_tokens_per_pos):
                family.add_metric([self.model_name, str(index), str(position)], count)
        yield family

    def _cache_config_info(self, prefix: str, per_engine: list[EngineStats]) -> GaugeMetricFamily:
        """vLLM's info gauge (1, the settings as labels) of each engine's KV cache."""
        args = self.engine.engine_args
        info = {
            "block_size": args.block_size, "cache_dtype": args.kv_cache_dtype,
            "enable_prefix_caching": args.enable_prefix_caching,
            "gpu_memory_utilization": args.gpu_memory_utilization, "kv_cache_memory": args.kv_cache_memory,
            "num_gpu_blocks_override": args.num_gpu_blocks_override, "swap_space": args.swap_space,
            "prefix_caching_hash_algo": "sha256", "sliding_window": self.engine.model_config.sliding_window}
        family = GaugeMetricFamily(f"{prefix}:cache_config_info", "Information of the LLMEngine CacheConfig",
                                   labels=[*info, "num_gpu_blocks", "num_cpu_blocks", "engine"])
        for index, stats in enumerate(per_engine):
            family.add_metric([*map(str, info.values()), str(stats.num_kv_blocks), str(stats.num_swap_blocks),
                               str(index)], 1)
        return family

    def _lora_requests_info(self, prefix: str, per_engine: list[EngineStats]) -> GaugeMetricFamily:
        """vLLM's LoRA gauge: the running and waiting adapters' names as labels, the time as value."""
        def names(field):
            return ",".join(dict.fromkeys(name for stats in per_engine for name in getattr(stats, field)))

        family = GaugeMetricFamily(f"{prefix}:lora_requests_info", "Running stats on lora requests.",
                                   labels=["max_lora", "waiting_lora_adapters", "running_lora_adapters"])
        family.add_metric([str(self.engine.engine_args.max_loras), names("waiting_lora_adapters"),
                           names("running_lora_adapters")], time.time())
        return family


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
        self.request_num_preemptions = histogram(
            "request_num_preemptions", "Times a finished request was preempted (all n samples).", _PREEMPTION_BUCKETS)
        self.request_params_max_tokens = histogram(
            "request_params_max_tokens", "The max_tokens of finished requests that set it.", _TOKEN_BUCKETS)
        self.request_success = [Counter(f"{prefix}:request_success", "Finished requests, by finish reason.",
                                        ["model_name", "finished_reason"], registry=self.registry)
                                for prefix in PREFIXES]
        for counter in self.request_success:  # every reason's series from the start, at 0, as vLLM's
            for reason in ("stop", "length", "abort", "error", "repetition"):
                counter.labels(model_name, reason)
        self.admission_rejections = [Counter(f"{prefix}:admission_rejections", "Requests refused by a queue limit "
                                             "(--max-num-queued-reqs / --max-num-queued-tokens), by reason.",
                                             ["model_name", "reason"], registry=self.registry)
                                     for prefix in PREFIXES]
        for counter in self.admission_rejections:
            for reason in QUEUE_LIMIT_REASONS:
                counter.labels(model_name, reason)

    def observe_token_gap(self, gap_s: float, num_tokens: int) -> None:
        """A streamed output carried `num_tokens` new tokens `gap_s` after the previous one."""
        for _ in range(num_tokens):
            self.inter_token_latency.observe(self.model_name, gap_s / num_tokens)

    def observe_finished(self, output: RequestOutput | PoolingRequestOutput, num_generation_tokens: int,
                         longest_output: int, finish_reason: str, streamed: bool, n: int,
                         max_tokens: int | None) -> None:
        """Records one finished request (an embedding's too: no generation tokens); `longest_output`
        = tokens of its longest sample; `n` and `max_tokens`: its parameters (max_tokens None when unset)."""
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
        self.request_num_preemptions.observe(label, m.num_preemptions)
        if max_tokens is not None:
            self.request_params_max_tokens.observe(label, max_tokens)
        for counter in self.request_success:
            counter.labels(label, finish_reason).inc()

    def observe_aborted(self) -> None:
        """A request whose client went away before it finished (`finished_reason` "abort")."""
        for counter in self.request_success:
            counter.labels(self.model_name, "abort").inc()

    def observe_rejected(self, reason: str) -> None:
        """A request refused by the queue limit `reason` (jpaged.admission.QUEUE_LIMIT_REASONS)."""
        for counter in self.admission_rejections:
            counter.labels(self.model_name, reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
