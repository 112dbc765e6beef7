"""LLMEngine: the synchronous host loop tying the scheduler, the runner and the detokenizer.

`add_request` fans a request with n > 1 out into child requests f"{i}_{request_id}" (seeds
seed + i), `step` runs one scheduled batch and returns the RequestOutputs it produced (merged
per parent, shaped by the request's output_kind), `abort_request` ends a request and returns
its final output. JAX is reached only through the runner. Not thread-safe: one caller at a time.
"""

import bisect
import dataclasses
import functools
import logging
import threading
import time

import numpy as np

from jpaged import kv_pool, kv_quantization, lora, multihost, sharding
from jpaged.config import EngineArgs, server_max_num_batched_tokens
from jpaged.cpu_features import resolve_cpu_dtype
from jpaged.detokenizer import IncrementalDetokenizer
from jpaged.engine import Request, RequestStatus, Scheduler, block_pool
from jpaged.engine.speculative import SpeculativeConfig
from jpaged.loaders import load_model
from jpaged.models.quantization import param_bytes
from jpaged.outputs import (ITERATION_TOKENS_BUCKETS, CompletionOutput, EngineStats, Logprob, PoolingOutput,
                             PoolingRequestOutput, RequestMetrics, RequestOutput)
from jpaged.pooling import PoolingParams, PromptPooler, resolve_pooler_config, resolve_runner
from jpaged.profiler import StepProfiler
from jpaged.reasoning import ThinkingBudget, reasoning_tokens
from jpaged.request_validation import ContextLengthError, InvalidRequestError, RequestValidator
from jpaged.runner import build_runner, device_platform, packs_gguf_blocks
from jpaged.sampling_params import RequestOutputKind, SamplingParams
from jpaged.structured_output import StructuredOutputManager
from jpaged.structured_output.manager import bitmask_width
from jpaged.token_restrictions import allowed_bitmask, bad_words_token_ids, banned_tokens, clear_bits

logger = logging.getLogger(__name__)

STATS_INTERVAL_S = 5.0
# Sleep mode (vLLM's values): levels, what happens to requests in flight, what wake_up takes back.
SLEEP_LEVELS = (0, 1, 2)
SLEEP_MODES = ("abort", "wait", "keep")
SLEEP_TAGS = ("weights", "kv_cache", "scheduling")


class EngineDeadError(RuntimeError):
    """The engine can no longer be trusted (its KV pool was lost in a failed step); it refuses
    every request until the process restarts."""


@dataclasses.dataclass
class _Sample:
    """One child request's output state."""

    request: Request
    index: int
    seed: int
    detokenizer: IncrementalDetokenizer | None
    logprobs: list[dict[int, Logprob]] | None
    cumulative_logprob: float = 0.0
    matcher: object | None = None  # llguidance LLMatcher of a structured-outputs request, fed every output token
    grammar_started: bool = True  # False until the output holds structured_outputs.after_token_ids
    thinking_budget: ThinkingBudget | None = None  # of a thinking_token_budget request, fed every output token
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    # What outputs already carried (text: DELTA only):
    sent_text_len: int = 0
    sent_tokens: int = 0


@dataclasses.dataclass
class _Parent:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    samples: list[_Sample]
    # [None, then one entry per prompt token from the second on] when prompt_logprobs is set.
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    sent_prompt_logprobs: bool = False
    error: str | None = None  # why a failed step ended this request
    # allowed_token_ids as a token bitmask row, bad_words as token sequences (jpaged/token_restrictions.py)
    allowed_bitmask: np.ndarray | None = None
    bad_words_token_ids: list[list[int]] = dataclasses.field(default_factory=list)
    # A pooling request's settings and the pooling of its prompt's hidden states (jpaged/pooling.py).
    pooling_params: PoolingParams | None = None
    pooler: PromptPooler | None = None

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.samples)


def resolve_max_model_len(args: EngineArgs, model_config, platform: str) -> int:
    """--max-model-len, or the model's limit; never above the model's limit. On CPU the default is
    also capped at what one sequence's KV fits in (`kv_pool.cpu_sequence_capacity`), with a log
    line, so a long-context model starts with the pool it has rather than failing."""
    model_max = model_config.max_position_embeddings
    if args.max_model_len is None:
        if platform != "cpu":
            return model_max
        kv_dtype = kv_quantization.page_dtype(args.kv_cache_dtype, model_config.dtype)
        capacity = kv_pool.cpu_sequence_capacity(model_config, args, kv_dtype,
                                                 sharding.kv_shards(model_config, args.tensor_parallel_size))
        if 0 < capacity < model_max:
            logger.warning("max_model_len %d: the most tokens of KV one sequence fits in the KV cache (the model "
                           "allows %d); raise --kv-cache-memory for more.", capacity, model_max)
            return capacity
        return model_max
    if args.max_model_len > model_max:
        raise ValueError(f"--max-model-len {args.max_model_len} exceeds the model's max_position_embeddings "
                         f"({model_max}); use --max-model-len {model_max} or less.")
    return args.max_model_len


def _cache_salt(prompt, cache_salt: str | None) -> str | None:
    """A request's cache_salt: the argument or the prompt dict's "cache_salt" (not both); a
    non-empty str or None, else InvalidRequestError (vLLM's message)."""
    if isinstance(prompt, dict) and prompt.get("cache_salt") is not None:
        if cache_salt is not None:
            raise InvalidRequestError("cache_salt is given twice: in the prompt dict and as an argument.",
                                      param="cache_salt")
        cache_salt = prompt["cache_salt"]
    if cache_salt is not None and not (isinstance(cache_salt, str) and cache_salt):
        raise InvalidRequestError("Parameter 'cache_salt' must be a non-empty string if provided.", param="cache_salt")
    return cache_salt


class LLMEngine:
    """Loads the model, sizes and allocates the KV pool, precompiles every step bucket (blocking).

    devices: the jax devices the engine runs on (None: the first --tensor-parallel-size of
    jax.devices()). flax_model, params: a user's Flax model of the Llama family and its params
    pytree (docs/models.md, "Your own Flax model"); --model then supplies only the tokenizer.
    """

    def __init__(self, engine_args: EngineArgs, show_progress: bool = True, *, devices=None, flax_model=None,
                 params=None):
        if (flax_model is None) != (params is None):
            raise ValueError("pass flax_model and params together (a Flax model and its params pytree), or neither.")
        if flax_model is not None and engine_args.enable_lora:
            raise ValueError("enable_lora works with the built-in Llama-family model, not with a flax_model.")
        self.engine_args = args = engine_args
        kv_pool.configure_xla_allocator(args.gpu_memory_utilization)  # before JAX starts its GPU client
        multihost.initialize(args.distributed_coordinator, args.num_hosts, args.host_id)
        platform = device_platform()
        if args.max_num_batched_tokens is None:
            self.engine_args = args = dataclasses.replace(
                args, max_num_batched_tokens=server_max_num_batched_tokens(platform))
        dtype = resolve_cpu_dtype(args.dtype) if platform == "cpu" else args.dtype
        # Also for update_weights_from_disk, which must load a checkpoint the same way.
        self.keep_gguf_blocks = packs_gguf_blocks(args, platform, dtype, flax_model)
        loaded = load_model(args.model, dtype=dtype, load_format=args.load_format, revision=args.revision,
                            tokenizer=args.tokenizer, tokenizer_revision=args.tokenizer_revision,
                            chat_template=args.chat_template, download_dir=args.download_dir,
                            trust_remote_code=args.trust_remote_code, quantization=args.quantization,
                            keep_gguf_blocks=self.keep_gguf_blocks, hf_overrides=args.hf_overrides,
                            hf_token=args.hf_token)
        logger.info("weights: %.1f MiB (quantization: %s)", param_bytes(loaded.params) / 2**20, loaded.quantization)
        self.model_config = loaded.config
        if args.disable_sliding_window and loaded.config.sliding_window is not None:
            window = loaded.config.sliding_window
            logger.info("--disable-sliding-window: full attention, context capped at the window (%d tokens)", window)
            self.model_config = loaded.config.replace(
                sliding_window=None, max_position_embeddings=min(window, loaded.config.max_position_embeddings))
        if flax_model is not None:
            self.model_config = flax_model.config.replace(eos_token_ids=loaded.tokenizer.eos_token_ids)
            flax_model = flax_model.clone(config=self.model_config)
        self.tokenizer = loaded.tokenizer
        self.model_path = loaded.model_path
        params = loaded.params if params is None else params
        # --runner pooling: embeddings (jpaged/pooling.py); None for a generating engine.
        self.pooler_config = None
        if resolve_runner(args.runner, self.model_path) == "pooling":
            self.pooler_config = self._pooling_setup(args)
            logger.info("pooling runner: %s pooling, normalize=%s", self.pooler_config.pooling_type,
                        self.pooler_config.normalize)
            params = {name: value for name, value in params.items() if name != "lm_head"}  # it computes no logits
            self.model_config = self.model_config.replace(tie_word_embeddings=True)
            flax_model = None if flax_model is None else flax_model.clone(config=self.model_config)
        self.max_model_len = resolve_max_model_len(args, self.model_config, platform)
        self.runner = build_runner(self.model_config, params, args, self.max_model_len, devices=devices,
                                   model=flax_model, tokenizer=self.tokenizer, model_path=self.model_path,
                                   pooling=self.pooler_config is not None)
        speculative_config = None
        if args.speculative_config is not None:
            speculative_config = SpeculativeConfig.from_dict(args.speculative_config)
            logger.info("speculative decoding: prompt lookup (ngram %d-%d), up to %d drafts per step",
                        speculative_config.prompt_lookup_min, speculative_config.prompt_lookup_max,
                        speculative_config.num_speculative_tokens)
        self.scheduler = Scheduler(
            num_blocks=self.runner.pool_spec.num_blocks, block_size=args.block_size,
            max_num_seqs=args.max_num_active_seqs or args.max_num_seqs,  # the runner's shapes: max_num_seqs
            max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=self.max_model_len,
            enable_prefix_caching=args.enable_prefix_caching,
            enable_chunked_prefill=args.enable_chunked_prefill, num_swap_blocks=self.runner.num_swap_blocks,
            num_scheduler_steps=self.runner.num_scheduler_steps,
            scheduler_delay_factor=args.scheduler_delay_factor,
            scheduler_finish_first=args.scheduler_finish_first, max_loras=args.max_loras if args.enable_lora else 0,
            scheduling_policy=args.scheduling_policy, speculative_config=speculative_config,
            long_prefill_token_threshold=args.long_prefill_token_threshold,
            long_prefill_token_threshold_adaptive=args.long_prefill_token_threshold_adaptive)
        # LoRA adapters (jpaged/lora.py): host copies and which one sits in which device slot.
        self.lora_adapters = self.lora_slot_table = None
        if args.enable_lora:
            self.lora_adapters = lora.AdapterCache(args.max_cpu_loras, functools.partial(
                lora.load_adapter, model_config=self.model_config, max_lora_rank=args.max_lora_rank,
                download_dir=args.download_dir, token=args.hf_token))
            self.lora_slot_table = lora.SlotTable(args.max_loras)
        self.structured_output = StructuredOutputManager(self.tokenizer.hf, self.model_config.vocab_size,
                                                         self.model_config.eos_token_ids)
        self.validator = RequestValidator.from_engine_args(args, self.model_config.vocab_size, self.max_model_len)
        self.reasoning_tokens = reasoning_tokens(args.reasoning_parser, args.reasoning_config, self.tokenizer)
        if args.enforce_eager:
            logger.info("enforce_eager: no precompilation; each step shape compiles on first use")
        else:
            start = time.perf_counter()
            num_programs, num_loaded = self.runner.warmup(show_progress)
            logger.info("compiled %d programs in %.1f s (%d loaded from the executable cache)", num_programs,
                        time.perf_counter() - start, num_loaded)
        # Why the engine stopped trusting its device state (None while healthy).
        self.dead_reason: str | None = None
        self.num_failed_steps = 0
        self._seed_stream = np.random.default_rng(args.seed)
        self._parents: dict[str, _Parent] = {}
        self._samples: dict[str, tuple[_Parent, _Sample]] = {}  # child request id -> its parent, state
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self._prefill_tokens_total = 0  # prompt tokens computed (recomputed ones again), for the stats log
        self._iteration_tokens_counts = [0] * (len(ITERATION_TOKENS_BUCKETS) + 1)  # see EngineStats
        self._iteration_tokens_sum = 0
        # Speculative decoding counters (EngineStats.spec_*).
        self.spec_num_drafts = self.spec_num_draft_tokens = self.spec_num_accepted_tokens = 0
        self.spec_accepted_tokens_per_pos = [0] * (0 if speculative_config is None
                                                   else speculative_config.num_speculative_tokens)
        self._last_spec_log = (0, 0, 0)  # (drafts, draft tokens, kept) at the last stats log
        self._populates_kv_cache = False  # populate_kv_cache was called: wake_up populates the new pool
        self.profiler = None if args.profiler_config is None else StepProfiler(args.profiler_config)
        self._asleep: set[str] = set()  # of SLEEP_TAGS: what sleep() released and wake_up() has not taken back
        self.sleep_level = 0  # the deepest level slept at since fully awake (0: awake, or only scheduling paused)
        self._last_log = (time.monotonic(), 0, 0)  # (time, prefill tokens, generation tokens) at the last stats log

    def _pooling_setup(self, args: EngineArgs):
        """The PoolerConfig of a pooling engine; ValueError for a setting that generates tokens."""
        if args.speculative_config is not None:
            raise ValueError("--speculative-config drafts tokens, which a pooling runner never generates.")
        if args.data_parallel_size > 1 or args.num_hosts > 1:
            raise ValueError("--runner pooling runs on one engine on one host (no --data-parallel-size, no "
                             "multi-host).")
        return resolve_pooler_config(self.model_path, args.pooler_config, args.hf_overrides)

    # ---- requests ----------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt, params: SamplingParams | PoolingParams | None = None,
                    arrival_time: float | None = None, lora_request: lora.LoRARequest | None = None,
                    priority: int = 0, cache_salt: str | None = None) -> None:
        """Queues a prompt (str, token ids, or {"prompt"| "prompt_token_ids": ..., "cache_salt": ...}).

        InvalidRequestError (a ValueError; jpaged/request_validation.py) or ValueError, with the
        numbers and the flag to change, for a request that cannot run (an adapter that cannot be
        loaded too); EngineDeadError once the engine lost its device state. `arrival_time`
        (time.time()) defaults to now. lora_request: the LoRA adapter to run it with. priority:
        lower runs earlier, with scheduling_policy "priority" (else it must be 0). cache_salt (or
        the prompt dict's, not both): a non-empty str; requests share prefix-cache blocks only
        with requests of the same salt (vLLM's, e.g. one per tenant). A pooling engine (--runner
        pooling) takes PoolingParams (None: the defaults) and gives one PoolingRequestOutput.
        """
        if self.dead_reason is not None:
            raise EngineDeadError(self.dead_reason)
        if request_id in self._parents:
            raise ValueError(f"Request id {request_id!r} is already in use.")
        prompt_text, prompt_ids = self.tokenizer.prompt_and_ids(prompt)
        pooling_params = None
        if self.pooler_config is not None or isinstance(params, PoolingParams):
            pooling_params, params = params, self._pooling_request(params, len(prompt_ids))
        params = SamplingParams() if params is None else params
        self.validator.validate(prompt_ids, params)
        adapter_digest = None if lora_request is None else self._adapter(lora_request).digest
        block_hash_seed = block_pool.block_hash_seed(adapter_digest, _cache_salt(prompt, cache_salt))
        if params.structured_outputs is not None:
            self.structured_output.compile(params.structured_outputs)  # ValueError before anything is queued
        if params.thinking_token_budget is not None and self.reasoning_tokens is None:
            raise InvalidRequestError("thinking_token_budget is set but reasoning_config is not configured. Please "
                                      "set --reasoning-parser and/or --reasoning-config to use thinking_token_budget.",
                                      param="thinking_token_budget")
        base_seed = params.seed if params.seed is not None else int(self._seed_stream.integers(0, 2**31))
        parent = _Parent(request_id, prompt_text, prompt_ids, params, [],
                         [None] if params.prompt_logprobs is not None else None)
        if pooling_params is not None:
            parent.pooling_params = pooling_params
            parent.pooler = PromptPooler(self.pooler_config.pooling_type, len(prompt_ids))
        if params.allowed_token_ids is not None:
            parent.allowed_bitmask = allowed_bitmask(params.allowed_token_ids, self.model_config.vocab_size)
        if params.bad_words:
            try:
                parent.bad_words_token_ids = bad_words_token_ids(self.tokenizer, params.bad_words)
            except ValueError as exc:
                raise InvalidRequestError(str(exc), param="bad_words") from None
        child_ids = [request_id] if params.n == 1 else [f"{i}_{request_id}" for i in range(params.n)]
        arrival_time = time.time() if arrival_time is None else arrival_time
        added = []
        try:
            for index, child_id in enumerate(child_ids):
                child_params = params.clone()
                child_params.n = 1
                request = Request(child_id, prompt_ids, child_params, self.model_config.eos_token_ids, arrival_time,
                                  lora_request, block_hash_seed, priority)
                self.scheduler.add_request(request)
                added.append(child_id)
                detokenizer = IncrementalDetokenizer(self.tokenizer, prompt_ids, params) if params.detokenize else None
                sample = _Sample(request, index, base_seed + index, detokenizer,
                                 [] if params.num_logprobs is not None else None)
                if params.structured_outputs is not None:
                    sample.matcher = self.structured_output.new_matcher(params.structured_outputs)
                    sample.grammar_started = params.structured_outputs.after_token_ids is None
                if params.thinking_token_budget is not None:
                    sample.thinking_budget = ThinkingBudget(self.reasoning_tokens, params.thinking_token_budget,
                                                            prompt_ids)
                parent.samples.append(sample)
                self._samples[child_id] = (parent, sample)
        except ValueError:
            self.scheduler.abort_requests(added)
            for child_id in added:
                del self._samples[child_id]
            raise
        self._parents[request_id] = parent

    def _pooling_request(self, params: PoolingParams | None, num_prompt_tokens: int) -> SamplingParams:
        """The SamplingParams a pooling request runs with: its prompt, then one placeholder token
        (never sampled: the runner computes no logits) that ends it. ValueError for a request the
        engine cannot pool."""
        if self.pooler_config is None:
            raise ValueError("PoolingParams need a pooling engine; this one generates text. Start it with "
                             "--runner pooling to compute embeddings.")
        if params is None:
            params = PoolingParams()
        if not isinstance(params, PoolingParams):
            raise ValueError("this engine runs --runner pooling (embeddings): requests take PoolingParams "
                             f"(LLM.embed, /v1/embeddings), not {type(params).__name__}.")
        try:
            self.pooler_config.check(params, (self.engine_args.served_model_name or [self.model_path])[0],
                                     self.model_config.hidden_size)
        except ValueError as exc:
            raise InvalidRequestError(str(exc), param="dimensions") from None
        if num_prompt_tokens >= self.max_model_len:
            raise ContextLengthError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{num_prompt_tokens} tokens in the input for embedding generation (at most "
                f"{self.max_model_len - 1} fit). Please reduce the length of the input.", param="input")
        return SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True, detokenize=False,
                              skip_reading_prefix_cache=self.pooler_config.skips_prefix_cache,
                              output_kind=RequestOutputKind.FINAL_ONLY)

    def add_lora(self, lora_request: lora.LoRARequest) -> bool:
        """Loads an adapter into host memory (if it is not there); True. ValueError when LoRA is
        off or the adapter cannot be served (jpaged.lora.load_adapter says why)."""
        self._adapter(lora_request)
        return True

    def _adapter(self, lora_request: lora.LoRARequest) -> lora.LoRAAdapter:
        if self.lora_adapters is None:
            raise ValueError(f"LoRA adapter {lora_request.lora_name!r} requested, but LoRA is not enabled: start the "
                             "engine with enable_lora=True (--enable-lora).")
        return self.lora_adapters.get(lora_request)

    def remove_lora(self, lora_int_id: int) -> bool:
        """Drops an adapter from host memory; requests that still name it read it again. Whether it was there."""
        return self.lora_adapters is not None and self.lora_adapters.remove(lora_int_id)

    def list_loras(self) -> set[int]:
        """The ids of the adapters in host memory."""
        return set() if self.lora_adapters is None else {r.lora_int_id for r in self.lora_adapters.requests()}

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Ends a request (all its samples) with finish_reason "abort"; returns its final output."""
        parent = self._parents.get(request_id)
        if parent is None:
            return None
        live = [s for s in parent.samples if s.finish_reason is None]
        self.scheduler.abort_requests([s.request.request_id for s in live])
        for sample in live:
            sample.finish_reason, sample.stop_reason = "abort", None
        return self._make_output(parent, live)

    def follow(self) -> None:
        """On a host other than 0 (multi-host): runs every step host 0 runs, until its shutdown()."""
        if multihost.is_leader():
            raise RuntimeError("follow() runs on hosts other than 0; host 0 schedules the steps.")
        steps = self.runner.follow()
        logger.info("host 0 stopped after %d steps", steps)

    def shutdown(self) -> None:
        """On host 0 of a multi-host engine: ends the other hosts' follow(). Nothing on one host."""
        multihost.stop_followers()

    def abort_all_requests(self) -> list[RequestOutput]:
        return [self.abort_request(request_id) for request_id in list(self._parents)]

    def has_unfinished_requests(self) -> bool:
        return bool(self._parents)

    def is_prefilling(self, request_id: str) -> bool:
        """Whether the request is unfinished and none of its sequences has sampled a token yet."""
        parent = self._parents.get(request_id)
        return parent is not None and all(not s.request.output_token_ids for s in parent.samples)

    # ---- sleep mode --------------------------------------------------------------------------

    def sleep(self, level: int = 1, mode: str = "abort") -> list[RequestOutput]:
        """vLLM's sleep mode (needs enable_sleep_mode): stops scheduling and, from level 1, releases
        the KV cache's memory (its blocks and the prefix cache are forgotten) and the weights'
        (level 1 keeps a host copy, which on CPU is the weights themselves; level 2 drops them:
        update_weights gives new ones). The requests in flight: "abort" ends them (their outputs
        are returned), "keep" keeps them queued, to recompute after wake_up, and "wait" needs no
        request running (AsyncLLM waits for that, admitting no new ones). New requests may be
        added while asleep; they run after wake_up."""
        self.check_sleep_args(level, mode)
        outputs = self.pause(mode, clear_cache=False)
        if level >= 1:
            # "keep": they recompute; a swapped request keeps its host blocks
            self.reset_prefix_cache(reset_running_requests=True)
            if "kv_cache" not in self._asleep:
                self.runner.release_kv_cache()
                self._asleep.add("kv_cache")
            if "weights" not in self._asleep or level == 2:
                self.runner.release_weights(keep_on_host=level == 1)
                self._asleep.add("weights")
        self.sleep_level = max(self.sleep_level, level)
        logger.info("sleeping (level %d): %s released", level, ", ".join(sorted(self._asleep)))
        return outputs

    def pause(self, mode: str = "abort", clear_cache: bool = True) -> list[RequestOutput]:
        """vLLM's pause_generation (sleep level 0; needs no enable_sleep_mode), e.g. around a weight
        update: nothing is scheduled until resume(); requests may still be added, and wait. The
        requests in flight: "abort" ends them (their outputs are returned), "keep" freezes them
        where they are (their KV blocks kept), "wait" needs none running (AsyncLLM waits for that,
        admitting no new ones). clear_cache (ignored with "keep"): reset_prefix_cache() too."""
        if mode not in SLEEP_MODES:
            raise ValueError(f"pause mode must be one of {SLEEP_MODES}, got {mode!r}.")
        outputs = []
        if mode == "abort":
            outputs = [output for output in self.abort_all_requests() if output is not None]
        elif mode == "wait" and self.scheduler.num_running:
            raise ValueError(f"mode='wait' needs the running requests to finish first "
                             f"({self.scheduler.num_running} are running).")
        self._asleep.add("scheduling")
        if clear_cache and mode != "keep":
            self.reset_prefix_cache()
        return outputs

    def resume(self) -> None:
        """Scheduling goes on after pause() (wake_up(["scheduling"]): ValueError while the weights
        or the KV cache still sleep)."""
        self.wake_up(["scheduling"])

    def is_paused(self) -> bool:
        """Whether scheduling is paused (by pause() or sleep()), or about to be (a "wait" draining)."""
        return "scheduling" in self._asleep or self.scheduler.admission_paused

    def reset_prefix_cache(self, reset_running_requests: bool = False) -> bool:
        """vLLM's reset_prefix_cache: later requests find no cached prefix (a benchmark's passes
        must not reuse each other's KV; KV computed under replaced weights). Blocks in use stay
        with their requests, uncached; reset_running_requests preempts the running requests first,
        so they recompute their KV. Unlike vLLM's, it also succeeds while blocks are in use: True."""
        if reset_running_requests:
            self.scheduler.preempt_all()
        self.scheduler.kv_cache_manager.block_pool.reset_prefix_cache()
        return True

    def check_sleep_args(self, level: int, mode: str) -> None:
        """ValueError unless sleep mode is enabled and level and mode are sleep()'s."""
        if not self.engine_args.enable_sleep_mode:
            raise ValueError("sleep mode is not enabled: start the engine with enable_sleep_mode=True "
                             "(--enable-sleep-mode).")
        if self.engine_args.num_hosts > 1:
            raise ValueError("sleep mode is not supported with --num-hosts > 1 (the other hosts would keep "
                             "their memory).")
        if level not in SLEEP_LEVELS:
            raise ValueError(f"sleep level must be one of {SLEEP_LEVELS}, got {level!r}.")
        if mode not in SLEEP_MODES:
            raise ValueError(f"sleep mode must be one of {SLEEP_MODES}, got {mode!r}.")

    def drained_for_pause(self) -> bool:
        """For pause / sleep with mode "wait": admits no new request from now on; whether none is running."""
        self.scheduler.admission_paused = True
        return self.scheduler.num_running == 0

    def wake_up(self, tags: list[str] | None = None) -> bool:
        """Takes back what sleep released: tags among "weights", "kv_cache" and "scheduling" (None:
        all). Returns whether the engine is fully awake. Scheduling resumes only once the weights
        and the KV cache are back; weights dropped at level 2 come back only through update_weights."""
        tags = list(SLEEP_TAGS) if tags is None else list(tags)
        unknown = sorted(set(tags) - set(SLEEP_TAGS))
        if unknown:
            raise ValueError(f"wake_up tags must be among {SLEEP_TAGS}, got {unknown}.")
        if "weights" in tags and "weights" in self._asleep:
            if not self.runner.restore_weights():
                raise ValueError("sleep level 2 dropped the weights: load new ones with update_weights(params) "
                                 "(or update_weights_from_disk), then wake_up.")
            self._asleep.discard("weights")
        if "kv_cache" in tags and "kv_cache" in self._asleep:
            self.runner.allocate_kv_cache()
            self._asleep.discard("kv_cache")
            if self._populates_kv_cache:
                self.populate_kv_cache()
        if "scheduling" in tags and "scheduling" in self._asleep:
            still_asleep = sorted(self._asleep - {"scheduling"})
            if still_asleep:
                raise ValueError(f"wake_up: scheduling cannot resume before {' and '.join(still_asleep)} "
                                 f"(wake_up(tags=None) takes back everything).")
            self._asleep.discard("scheduling")
            self.scheduler.admission_paused = False
        if not self._asleep:
            self.sleep_level = 0
        return not self._asleep

    def is_sleeping(self) -> bool:
        """Whether any of the weights, the KV cache or scheduling is still asleep."""
        return bool(self._asleep)

    def populate_kv_cache(self) -> threading.Thread:
        """Faults in the CPU KV pool's pages on a background thread (`kv_pool.populate`: no-op
        elsewhere) instead of inside the steps that first write them; again for the new pool
        after each wake_up. Steps may run meanwhile (the pool's contents do not change). The
        server does this at start when blocks are reused last (prefix caching): every block then
        gets written. Returns the thread."""
        self._populates_kv_cache = True
        ranges = kv_pool.page_ranges(self.runner.kv_cache)

        def populate():
            start = time.perf_counter()
            populated = kv_pool.populate(ranges)
            if populated:
                logger.info("KV cache: %.2f GiB populated in %.1f s", populated / kv_pool.GIB,
                            time.perf_counter() - start)

        thread = threading.Thread(target=populate, name="populate-kv-cache", daemon=True)
        thread.start()
        return thread

    # ---- the step ----------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Schedules and runs one batch; returns the outputs it produced (none while asleep)."""
        if "scheduling" in self._asleep:
            return []
        scheduler_output = self.scheduler.schedule()
        scheduled = scheduler_output.scheduled
        if not scheduled:
            return []
        seeds = [self._samples[r.request_id][1].seed for r in scheduled]
        num_prompt_tokens = sum(
            max(0, min(r.start_position + len(r.token_ids), len(r.prompt_token_ids)) - r.start_position)
            for r in scheduled)
        self._prefill_tokens_total += num_prompt_tokens
        try:
            result = self.runner.execute(scheduler_output, seeds, self._token_bitmask(scheduled),
                                         self._lora_slots(scheduled))
        except Exception as exc:  # a device, compiler or sampler fault: fail this step's requests only
            return self._fail_step(scheduled, exc)
        if result.prompt_logprobs is not None:
            self._record_prompt_logprobs(scheduled, result.prompt_logprobs)
        if result.hidden is not None:
            self._pool_chunks(scheduled, result.hidden)
        new_tokens = self._new_tokens(scheduler_output, result.token_ids)
        outputs = []
        # A request's tokens are recorded one at a time (a multi-step round's, or drafts kept and
        # the token after them), so a request that stops drops the tokens after its stop.
        for step in range(max((len(tokens) for tokens, _ in new_tokens.values()), default=1)):
            sampled, rows = {}, {}
            for rid, (tokens, token_rows) in new_tokens.items():
                if step < len(tokens) and rid in self.scheduler.requests:
                    sampled[rid], rows[rid] = tokens[step], token_rows[step]
            if step and not sampled:
                break
            generated_before = self.generation_tokens_total
            outputs += self._record_step(scheduler_output, sampled, result, rows, step)
            step_tokens = (0 if step else num_prompt_tokens) + self.generation_tokens_total - generated_before
            self._iteration_tokens_counts[bisect.bisect_left(ITERATION_TOKENS_BUCKETS, step_tokens)] += 1
            self._iteration_tokens_sum += step_tokens
        if not self.engine_args.disable_log_stats:
            self._maybe_log_stats()
        if self.profiler is not None:
            self.profiler.on_step()
        return outputs

    def start_profile(self, profile_prefix: str | None = None, delay_iterations: int | None = None,
                      max_iterations: int | None = None) -> None:
        """vLLM's: a JAX trace of the next steps into profiler_config's jax_profiler_dir (under
        profile_prefix if given), from now or after delay_iterations steps, until stop_profile()
        or max_iterations steps (jpaged/profiler.py). ValueError without profiler_config."""
        self._profiler().start(profile_prefix, delay_iterations, max_iterations)

    def stop_profile(self) -> None:
        self._profiler().stop()

    def _profiler(self) -> StepProfiler:
        if self.profiler is None:
            raise ValueError("profiling is off: start the engine with profiler_config={\"profiler\": \"jax\", "
                             "\"jax_profiler_dir\": \"/abs/dir\"} (--profiler-config).")
        return self.profiler

    def _new_tokens(self, scheduler_output, token_ids: np.ndarray) -> dict[str, tuple[list[int], list[int]]]:
        """Each sampling request's new tokens in order, with the runner-output row of each (where
        its logprobs are): request id -> (token ids, rows). token_ids: the runner's ids,
        i32[num_steps, rows] for a multi-step round, else i32[rows].

        A request with drafts keeps the drafts up to the first one that differs from the token
        sampled in its place, then that sampled token (or the one after the last draft): every
        kept token is the one a plain decode would have sampled there (the sampler draws by
        (seed, output index)), so drafts change how many tokens a step gives, not which."""
        token_ids = np.reshape(token_ids, (scheduler_output.num_steps, -1))
        new_tokens = {}
        row = 0
        for r in scheduler_output.scheduled:
            if r.sample and scheduler_output.num_steps > 1:
                new_tokens[r.request_id] = (token_ids[:, row].tolist(), [row] * scheduler_output.num_steps)
            elif r.sample:
                sampled = token_ids[0, row:row + r.num_sample_rows].tolist()
                drafts = r.draft_token_ids
                kept = 0
                while kept < len(drafts) and drafts[kept] == sampled[kept]:
                    kept += 1
                new_tokens[r.request_id] = (sampled[:kept + 1], list(range(row, row + kept + 1)))
                if r.num_draft_tokens:
                    self._record_drafts(r.num_draft_tokens, kept)
            row += r.num_sample_rows
        return new_tokens

    def _pool_chunks(self, scheduled, hidden: np.ndarray) -> None:
        """Hands each scheduled prompt chunk's rows of a pooling step's hidden states to its pooler."""
        start = 0
        for r in scheduled:
            end = start + len(r.token_ids)
            self._samples[r.request_id][0].pooler.add_chunk(hidden[start:end], r.start_position)
            start = end

    def _record_drafts(self, num_drafts: int, num_kept: int) -> None:
        self.spec_num_drafts += 1
        self.spec_num_draft_tokens += num_drafts
        self.spec_num_accepted_tokens += num_kept
        for position in range(num_kept):
            self.spec_accepted_tokens_per_pos[position] += 1

    def _record_step(self, scheduler_output, sampled: dict[str, int], result, rows: dict[str, int],
                     token_index: int) -> list[RequestOutput]:
        """Appends one token per request (request id -> token id; rows: request id -> its
        runner-output row) and returns the outputs."""
        updated = self.scheduler.update_from_output(scheduler_output, sampled, token_index)
        if self.pooler_config is None:  # a pooling request's one token is a placeholder
            self.generation_tokens_total += len(updated)
        touched: dict[str, tuple[_Parent, list[_Sample]]] = {}
        for request in updated:
            if request.num_output_tokens == 1:  # vLLM counts a prompt once its first token is out
                self.prompt_tokens_total += request.num_prompt_tokens
            parent, sample = self._samples[request.request_id]
            self._append_token(sample, request, result, rows[request.request_id])
            if sample.matcher is not None and sample.finish_reason is None:
                self._advance_grammar(sample, request)
            if sample.thinking_budget is not None:
                sample.thinking_budget.append(request.output_token_ids[-1])
            touched.setdefault(parent.request_id, (parent, []))[1].append(sample)
        outputs = []
        for parent, samples in touched.values():
            output = self._make_output(parent, samples)
            if output is not None:
                outputs.append(output)
        return outputs

    def _token_bitmask(self, scheduled) -> np.ndarray | None:
        """The allowed tokens of the rows sampled this step under a grammar, allowed_token_ids,
        bad_words or a thinking budget's forced token (None when there are none)."""
        grammar_rows, restricted, forced = [], [], []
        for i, r in enumerate(scheduled):
            parent, sample = self._samples[r.request_id]
            if r.sample and sample.matcher is not None and sample.grammar_started:
                grammar_rows.append((i, sample.matcher, r.sampling_params.stop_token_ids))
            if r.sample and r.sampling_params.restricts_tokens:
                restricted.append((i, parent, sample.request))
            if (r.sample and sample.thinking_budget is not None
                    and (token := sample.thinking_budget.forced_token()) is not None):
                forced.append((i, token))
        if not grammar_rows and not restricted and not forced:
            return None
        if grammar_rows:
            bitmask = self.structured_output.fill_bitmask(grammar_rows, len(scheduled))
        else:
            bitmask = np.full((len(scheduled), bitmask_width(self.model_config.vocab_size)), -1, np.int32)
        for i, parent, request in restricted:
            if parent.allowed_bitmask is not None:
                bitmask[i] &= parent.allowed_bitmask
            clear_bits(bitmask[i], banned_tokens(parent.bad_words_token_ids, request.output_token_ids))
        for i, token_id in forced:
            bitmask[i] = allowed_bitmask([token_id], self.model_config.vocab_size)
        return bitmask

    def _lora_slots(self, scheduled) -> list[int] | None:
        """Each scheduled request's LoRA slot (0: none), after loading the adapters the step needs
        into free slots or those of adapters no running request uses (the scheduler keeps the
        running requests' adapters within max_loras). None with LoRA off."""
        if self.lora_slot_table is None:
            return None
        requests = [self._samples[r.request_id][1].request for r in scheduled]
        adapters = [None if r.lora_request is None else self.lora_adapters.get(r.lora_request) for r in requests]
        keep = {self.lora_adapters.peek(r.lora_request) for r in self.scheduler.running if r.lora_request is not None}
        slots, loads = self.lora_slot_table.assign(set(adapters) - {None}, keep)
        for slot, adapter in loads:
            try:
                self.runner.set_lora_slot(slot, adapter)
            except Exception:
                self.lora_slot_table.evict(adapter)
                raise
        return [slots.get(adapter, 0) for adapter in adapters]

    def _advance_grammar(self, sample: _Sample, request: Request) -> None:
        """Feeds the new output token to the request's matcher. A complete grammar (nothing but EOS
        may follow) finishes the request with "stop"; a rejected token ends it with "abort".
        Before the grammar starts, only watches for the after_token_ids that start it."""
        if not sample.grammar_started:
            after = request.sampling_params.structured_outputs.after_token_ids
            sample.grammar_started = request.output_token_ids[-len(after):] == after
            return
        token_id = request.output_token_ids[-1]
        if not sample.matcher.consume_token(token_id):
            logger.warning("request %s: the grammar rejected token %d (%s); aborting it", request.request_id,
                           token_id, sample.matcher.get_error())
            status, reason = RequestStatus.FINISHED_ABORTED, "abort"
        elif sample.matcher.is_stopped():
            status, reason = RequestStatus.FINISHED_STOPPED, "stop"
        else:
            return
        self.scheduler.finish_requests([request.request_id], status)
        sample.finish_reason, sample.stop_reason = reason, None

    def _fail_step(self, scheduled, exc: Exception) -> list[RequestOutput]:
        """Ends every request of a failed step (all samples of their parents) with finish_reason
        "error", freeing their blocks, and returns their final outputs. Raises EngineDeadError
        instead when the failure consumed the donated KV pool: nothing computed later could be
        trusted."""
        self.num_failed_steps += 1
        message = f"the engine step running this request failed ({type(exc).__name__}: {exc})"
        parents = {self._samples[r.request_id][0].request_id: self._samples[r.request_id][0] for r in scheduled}
        logger.error("step failed for requests %s: %s", sorted(parents), message, exc_info=exc)
        outputs = []
        for parent in parents.values():
            live = [s for s in parent.samples if s.finish_reason is None]
            self.scheduler.abort_requests([s.request.request_id for s in live])
            for sample in live:
                sample.finish_reason, sample.stop_reason = "error", None
            parent.error = message
            output = self._make_output(parent, live)
            if output is not None:
                outputs.append(output)
        if self.runner.kv_pool_lost():
            self.dead_reason = (f"the KV cache was lost when a step failed ({type(exc).__name__}: {exc}); "
                                "restart the server")
            raise EngineDeadError(self.dead_reason) from exc
        return outputs

    def _maybe_log_stats(self) -> None:
        """Every STATS_INTERVAL_S seconds: throughputs, queue sizes, KV usage and prefix-cache hit rate."""
        now = time.monotonic()
        then, prompt_then, generation_then = self._last_log
        if now - then < STATS_INTERVAL_S:
            return
        self._last_log = (now, self._prefill_tokens_total, self.generation_tokens_total)
        stats = self.scheduler.get_stats()
        hit_rate = stats.prefix_cache_hits / stats.prefix_cache_queries if stats.prefix_cache_queries else 0.0
        logger.info(
            "Avg prompt throughput: %.1f tokens/s, Avg generation throughput: %.1f tokens/s, Running: %d reqs, "
            "Waiting: %d reqs, KV cache usage: %.1f%%, Prefix cache hit rate: %.1f%%, Preemptions: %d",
            (self._prefill_tokens_total - prompt_then) / (now - then),
            (self.generation_tokens_total - generation_then) / (now - then), stats.num_running, stats.num_waiting,
            100 * stats.kv_cache_usage, 100 * hit_rate, stats.num_preemptions)
        drafts, draft_tokens, kept = (self.spec_num_drafts - self._last_spec_log[0],
                                      self.spec_num_draft_tokens - self._last_spec_log[1],
                                      self.spec_num_accepted_tokens - self._last_spec_log[2])
        if drafts:  # vLLM's line (its per-position rates are cumulative here)
            self._last_spec_log = (self.spec_num_drafts, self.spec_num_draft_tokens, self.spec_num_accepted_tokens)
            logger.info("SpecDecoding metrics: Mean acceptance length: %.2f, Accepted throughput: %.2f tokens/s, "
                        "Drafted throughput: %.2f tokens/s, Accepted: %d tokens, Drafted: %d tokens, "
                        "Avg Draft acceptance rate: %.1f%%", 1 + kept / drafts, kept / (now - then),
                        draft_tokens / (now - then), kept, draft_tokens, 100 * kept / draft_tokens)

    def _append_token(self, sample: _Sample, request: Request, result, row: int) -> None:
        token_id = request.output_token_ids[-1]
        params = request.sampling_params
        if sample.logprobs is not None:
            listed = params.logprob_token_ids  # in place of the top ones
            entry = self._logprob_entry(0 if listed else params.logprobs, token_id, result.logprobs[row],
                                        result.ranks[row], result.top_token_ids[row], result.top_logprobs[row])
            if listed:
                self._add_listed_logprobs(entry, listed, result.listed_logprobs[row])
            sample.logprobs.append(entry)
            sample.cumulative_logprob += float(result.logprobs[row])
        stopped_by_token = request.finish_reason == "stop"
        if sample.detokenizer is not None and not (stopped_by_token and not params.include_stop_str_in_output):
            stop_str = sample.detokenizer.append(token_id)
            if stop_str is not None:
                if not request.is_finished():
                    self.scheduler.finish_requests([request.request_id], RequestStatus.FINISHED_STOPPED, stop_str)
                sample.finish_reason, sample.stop_reason = "stop", stop_str
                return
        if request.is_finished():
            sample.finish_reason, sample.stop_reason = request.finish_reason, request.stop_reason

    def _record_prompt_logprobs(self, scheduled, arrays) -> None:
        """Appends the entries of prompt tokens this step computed (sample 0 of each parent)."""
        chosen, ranks, top_logprobs, top_ids = arrays
        offset = 0
        for req in scheduled:
            parent, sample = self._samples[req.request_id]
            entries = parent.prompt_logprobs
            if entries is not None and sample.index == 0:
                num = parent.params.prompt_logprobs
                for row in range(offset, offset + len(req.token_ids)):
                    target_position = req.start_position + row - offset + 1
                    if target_position == len(entries) < len(parent.prompt_token_ids):  # skip recomputed rows
                        entries.append(self._logprob_entry(num, parent.prompt_token_ids[target_position],
                                                           chosen[row], ranks[row], top_ids[row], top_logprobs[row]))
            offset += len(req.token_ids)

    def _logprob_entry(self, num: int, token_id: int, logprob, rank, top_ids, top_logprobs) -> dict[int, Logprob]:
        """{token_id: its Logprob, then the top `num` tokens'} (the sampled/prompt token first)."""
        decode = self.tokenizer.decode
        entry = {token_id: Logprob(float(logprob), int(rank), decode([token_id], skip_special_tokens=False))}
        for top_rank, (tok, lp) in enumerate(zip(top_ids[:num], top_logprobs[:num]), 1):
            tok = int(tok)
            if tok not in entry:
                entry[tok] = Logprob(float(lp), top_rank, decode([tok], skip_special_tokens=False))
        return entry

    def _add_listed_logprobs(self, entry: dict[int, Logprob], token_ids: list[int], logprobs) -> None:
        """logprob_token_ids' entries after the sampled token's; each one's rank is its place in the
        list (1-based), as vLLM reports them."""
        for place, (tok, lp) in enumerate(zip(token_ids, logprobs), 1):
            if tok not in entry:
                entry[tok] = Logprob(float(lp), place, self.tokenizer.decode([tok], skip_special_tokens=False))

    # ---- outputs -----------------------------------------------------------------------------

    def _completion(self, sample: _Sample, delta: bool) -> CompletionOutput:
        finished = sample.finish_reason is not None
        det = sample.detokenizer
        text = det.visible_text(finished) if det is not None else ""
        token_ids = sample.request.output_token_ids
        logprobs = sample.logprobs
        if delta:
            new_text, text_start = text[sample.sent_text_len:], sample.sent_text_len
            start = sample.sent_tokens
            sample.sent_text_len, sample.sent_tokens = max(text_start, len(text)), len(token_ids)
            text, token_ids = new_text, token_ids[start:]
            logprobs = None if logprobs is None else logprobs[start:]
        else:
            token_ids = list(token_ids)
            logprobs = None if logprobs is None else list(logprobs)
        return CompletionOutput(
            index=sample.index, text=text, token_ids=token_ids,
            cumulative_logprob=sample.cumulative_logprob if sample.logprobs is not None else None,
            logprobs=logprobs, finish_reason=sample.finish_reason, stop_reason=sample.stop_reason)

    def _make_output(self, parent: _Parent, samples: list[_Sample]) -> RequestOutput | PoolingRequestOutput | None:
        """The RequestOutput for `parent` after `samples` changed, per its output_kind and stream
        interval (None: nothing to send); a pooling request's PoolingRequestOutput once it ends."""
        finished = parent.finished
        if parent.pooler is not None:
            return self._pooling_output(parent) if finished else None
        kind = parent.params.output_kind
        if finished:
            self._forget(parent)
        if kind == RequestOutputKind.FINAL_ONLY and not finished:
            return None
        interval = max(self.engine_args.stream_interval, parent.params.stream_interval or 1)
        if interval > 1 and not finished:
            # A sample is due with its first token, its finish, or `interval` tokens since it was last sent;
            # the others keep theirs for a later output (DELTA slices from what was sent).
            samples = [s for s in samples if s.sent_tokens == 0 or s.finish_reason is not None
                       or len(s.request.output_token_ids) - s.sent_tokens >= interval]
            if not samples:
                return None
        if kind == RequestOutputKind.DELTA:
            completions = [self._completion(s, delta=True) for s in samples]
        else:
            completions = [self._completion(s, delta=False) for s in parent.samples]
            for s in parent.samples:
                s.sent_tokens = len(s.request.output_token_ids)
        first = parent.samples[0].request
        prompt_logprobs = None
        if parent.prompt_logprobs is not None and len(parent.prompt_logprobs) == len(parent.prompt_token_ids):
            if kind != RequestOutputKind.DELTA or not parent.sent_prompt_logprobs:
                prompt_logprobs = parent.prompt_logprobs
                parent.sent_prompt_logprobs = True
        metrics = RequestMetrics(
            arrival_time=first.arrival_time,
            first_scheduled_time=min((s.request.first_scheduled_time for s in parent.samples
                                      if s.request.first_scheduled_time is not None), default=None),
            first_token_time=min((s.request.first_token_time for s in parent.samples
                                  if s.request.first_token_time is not None), default=None),
            last_token_time=max((s.request.last_token_time for s in parent.samples
                                 if s.request.last_token_time is not None), default=None),
            finished_time=time.time() if finished else None,
            num_preemptions=sum(s.request.num_preemptions for s in parent.samples))
        return RequestOutput(
            request_id=parent.request_id, prompt=parent.prompt, prompt_token_ids=parent.prompt_token_ids,
            prompt_logprobs=prompt_logprobs, outputs=completions, finished=finished, metrics=metrics,
            num_cached_tokens=first.num_cached_tokens, error=parent.error)

    def _pooling_output(self, parent: _Parent) -> PoolingRequestOutput:
        """A finished pooling request's output: its vector, or None when it was aborted or failed."""
        self._forget(parent)
        request = parent.samples[0].request
        outputs = None
        if parent.samples[0].finish_reason == "length":  # its placeholder token: the prompt is pooled
            outputs = PoolingOutput(self.pooler_config.finish(parent.pooler.pooled(), parent.pooling_params))
        metrics = RequestMetrics(arrival_time=request.arrival_time, first_scheduled_time=request.first_scheduled_time,
                                 first_token_time=request.first_token_time, last_token_time=request.last_token_time,
                                 finished_time=time.time(), num_preemptions=request.num_preemptions)
        return PoolingRequestOutput(parent.request_id, parent.prompt_token_ids, outputs, True, metrics,
                                    request.num_cached_tokens, parent.error)

    def _forget(self, parent: _Parent) -> None:
        self._parents.pop(parent.request_id, None)
        for sample in parent.samples:
            self._samples.pop(sample.request.request_id, None)

    # ---- misc --------------------------------------------------------------------------------

    def get_stats(self) -> EngineStats:
        stats = self.scheduler.get_stats()
        return EngineStats(
            num_running=stats.num_running, num_waiting=stats.num_waiting,
            num_waiting_deferred=stats.num_waiting_deferred, kv_cache_usage=stats.kv_cache_usage,
            prefix_cache_queries=stats.prefix_cache_queries, prefix_cache_hits=stats.prefix_cache_hits,
            num_preemptions=stats.num_preemptions, prompt_tokens_total=self.prompt_tokens_total,
            generation_tokens_total=self.generation_tokens_total, prompt_tokens_cached=stats.prompt_tokens_cached,
            prompt_tokens_computed=stats.prompt_tokens_computed,
            iteration_tokens_counts=tuple(self._iteration_tokens_counts),
            iteration_tokens_sum=self._iteration_tokens_sum,
            running_lora_adapters=stats.running_lora_adapters, waiting_lora_adapters=stats.waiting_lora_adapters,
            num_kv_blocks=self.runner.pool_spec.num_blocks, num_swap_blocks=self.runner.num_swap_blocks,
            sleep_level=self.sleep_level if self._asleep else None, spec_num_drafts=self.spec_num_drafts,
            spec_num_draft_tokens=self.spec_num_draft_tokens, spec_num_accepted_tokens=self.spec_num_accepted_tokens,
            spec_accepted_tokens_per_pos=tuple(self.spec_accepted_tokens_per_pos))

    def update_weights(self, params) -> None:
        """Swaps in new params of the same structure, shapes and dtypes (between steps; no recompile).

        The prefix cache is emptied: its blocks hold KV computed with the old weights. While
        asleep, the new weights end the weights' sleep (the way back from level 2)."""
        self.runner.update_weights(params)
        self.reset_prefix_cache()
        self._asleep.discard("weights")
