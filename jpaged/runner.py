"""ModelRunner: the one host<->device boundary. Owns the params, the KV pool and the compiled steps.

Per step: swap blocks out/in if the scheduler asked, pack the forward blob and the sampling blob
(two int32 transfers), run the precompiled forward for the step's (num_tokens, num_seqs,
pages_per_seq) bucket with the KV pool donated, run the precompiled sampler on the sampled rows'
logits, and copy the sampled ids (plus logprobs when a request asked) back in one device_get.
"""

import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jpaged import kv_pool, kv_quantization
from jpaged.attention_backend import decode_only_attention, select_attention, select_kv_writer
from jpaged.buckets import Buckets, next_power_of_2, pick, power_of_2_buckets
from jpaged.models import llama, quantization
from jpaged.sampler import logprob_outputs, sample
from jpaged.step_metadata import SamplingMetadata, StepMetadata, logit_entries, pack_sampling, pack_step
from jpaged.structured_output.manager import bitmask_width

logger = logging.getLogger(__name__)


def _forward_step(params, kv_cache, kv_scales, blob, *, config, attention_fn, write_kv_fn, num_tokens, num_seqs,
                  pages_per_seq):
    meta = StepMetadata.unpack(blob, num_tokens, num_seqs, pages_per_seq)
    hidden, kv_cache = llama.forward(params, config, meta.token_ids, meta.positions, kv_cache, meta.attn,
                                     attention_fn, write_kv_fn, kv_scales=kv_scales)
    logits = llama.compute_logits(params, config, hidden[meta.logits_indices])  # f32[num_seqs, vocab]
    return logits, hidden, kv_cache


def _prompt_logprobs_step(params, hidden, targets, *, config, max_logprobs):
    """Raw log-softmax of every packed row's logits at its next prompt token, with the top ones.

    hidden: [num_tokens, hidden_size]; targets: i32[num_tokens] (the token each row predicts).
    """
    logits = llama.compute_logits(params, config, hidden)  # f32[T, vocab]
    return logprob_outputs(logits, targets, min(max_logprobs, logits.shape[1]))


def _sample_step(logits, blob, token_bitmask=None, *, num_seqs, num_entries, max_logprobs):
    return sample(logits, SamplingMetadata.unpack(blob, num_seqs, num_entries), token_bitmask, max_logprobs)


def _gather_blocks(kv_cache, block_ids):
    return [(k[block_ids], v[block_ids]) for k, v in kv_cache]


def _scatter_blocks(kv_cache, block_ids, blocks):
    return [(k.at[block_ids].set(nk), v.at[block_ids].set(nv)) for (k, v), (nk, nv) in zip(kv_cache, blocks)]


@dataclasses.dataclass
class RunnerOutput:
    """Host copies of one step's samples; row i belongs to scheduled[i]."""

    token_ids: np.ndarray  # i32[num_seqs]
    # Present only when a scheduled request asked for logprobs:
    logprobs: np.ndarray | None = None  # f32[num_seqs]: the sampled token's
    ranks: np.ndarray | None = None  # i32[num_seqs]
    top_logprobs: np.ndarray | None = None  # f32[num_seqs, max_logprobs]
    top_token_ids: np.ndarray | None = None  # i32[num_seqs, max_logprobs]
    # Present only when a scheduled request asked for prompt_logprobs; one row per packed token
    # (row r of scheduled[i] is at position start_position + r - its offset and predicts the next token):
    prompt_logprobs: tuple[np.ndarray, ...] | None = None  # (logprob f32[T], rank i32[T], top f32[T, K], ids i32[T, K])


class ModelRunner:
    """Runs scheduled batches on one device.

    Args:
      model_config: jpaged.models.config.ModelConfig. params: its params pytree (on device).
      pool_spec: kv_pool.KVPoolSpec. num_swap_blocks: host blocks for swapping (0: none).
      attention_fn: a paged attention with the reference signature; write_kv_fn: the KV write to go with it.
      bucket_pages: bucket the block-table width (for attention whose cost follows the width).
      max_entries_per_seq: the most sampler entries (logit_bias, min_tokens masks, distinct
        penalty tokens) one request can bring; max_logprobs: the widest top-logprobs request.
      decode_attention_fn: None, or an attention for steps where every sequence has one new
        token (the pallas decode kernel); such steps then run their own compiled programs.
      kv_scales: None, or per layer (k_scale, v_scale) f32[num_kv_heads] for int8 / fp8 pages
        (`jpaged.kv_quantization`); static: never donated, never changed by a step or a swap.
      recalibrate_kv: None, or a function of the params giving new kv_scales, called by
        update_weights (scales calibrated at start follow the weights; a checkpoint's do not).
    """

    def __init__(self, model_config, params, *, pool_spec, num_swap_blocks: int, max_num_batched_tokens: int,
                 max_num_seqs: int, max_model_len: int, attention_fn, write_kv_fn, bucket_pages: bool, device,
                 max_entries_per_seq: int, max_logprobs: int, decode_attention_fn=None, kv_scales=None,
                 recalibrate_kv=None):
        self.model_config = model_config
        self.params = params
        self.kv_scales = None if kv_scales is None else jax.device_put(kv_scales, device)
        self._recalibrate_kv = recalibrate_kv
        self.pool_spec = pool_spec
        self.block_size = pool_spec.block_size
        self.max_model_len = max_model_len
        self.device = device
        self.buckets = Buckets.create(max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs,
                                      max_model_len=max_model_len, block_size=pool_spec.block_size,
                                      bucket_pages=bucket_pages, max_entries_per_seq=max_entries_per_seq)
        self.kv_cache = kv_pool.allocate(pool_spec, device)
        options = quantization.compiler_options(params, device.platform)  # programs that read the weights
        self._forward_jit = jax.jit(
            functools.partial(_forward_step, config=model_config, attention_fn=attention_fn, write_kv_fn=write_kv_fn),
            static_argnames=("num_tokens", "num_seqs", "pages_per_seq"), donate_argnums=(1,), compiler_options=options)
        self._decode_jit = None if decode_attention_fn is None else jax.jit(
            functools.partial(_forward_step, config=model_config, attention_fn=decode_attention_fn,
                              write_kv_fn=write_kv_fn),
            static_argnames=("num_tokens", "num_seqs", "pages_per_seq"), donate_argnums=(1,), compiler_options=options)
        self._sample_jit = jax.jit(functools.partial(_sample_step, max_logprobs=max_logprobs),
                                   static_argnames=("num_seqs", "num_entries"))
        self._prompt_logprobs_jit = jax.jit(
            functools.partial(_prompt_logprobs_step, config=model_config, max_logprobs=max_logprobs),
            compiler_options=options)
        self._prompt_logprobs = {}  # num_tokens -> compiled
        self._forward = {}  # (num_tokens, num_seqs, pages_per_seq, decode_only) -> compiled
        self._sample = {}  # (num_seqs, num_entries, masked) -> compiled
        self._swap = {}  # ("out" | "in", count bucket) -> compiled
        self.num_swap_blocks = num_swap_blocks
        self.swap_buckets = ()
        if num_swap_blocks:
            self.swap_buckets = power_of_2_buckets(1, next_power_of_2(min(num_swap_blocks, pool_spec.num_blocks)))
            shape = pool_spec.page_shape[1:]
            dtype = jnp.dtype(pool_spec.dtype)  # ml_dtypes' fp8 types for fp8 pages
            self._host_k = [np.zeros((num_swap_blocks, *shape), dtype) for _ in range(pool_spec.num_layers)]
            self._host_v = [np.zeros((num_swap_blocks, *shape), dtype) for _ in range(pool_spec.num_layers)]

    # ---- compilation -------------------------------------------------------------------------

    def _abstract(self, tree):
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)

    def _spec(self, shape: tuple[int, ...], dtype):
        """An input placed on the runner's device: programs compile for it, not for jax.devices()[0]."""
        return jax.ShapeDtypeStruct(shape, dtype, sharding=jax.sharding.SingleDeviceSharding(self.device))

    def _blob_spec(self, size: int):
        return self._spec((size,), jnp.int32)

    def _compile_forward(self, t: int, s: int, p: int, decode_only: bool = False):
        blob = self._blob_spec(StepMetadata.blob_size(t, s, p))
        jitted = self._decode_jit if decode_only else self._forward_jit
        lowered = jitted.lower(self._abstract(self.params), self._abstract(self.kv_cache),
                               self._abstract(self.kv_scales), blob, num_tokens=t, num_seqs=s, pages_per_seq=p)
        self._forward[(t, s, p, decode_only)] = lowered.compile()

    def _compile_sample(self, s: int, e: int, masked: bool):
        vocab = self.model_config.vocab_size
        logits = self._spec((s, vocab), jnp.float32)
        blob = self._blob_spec(SamplingMetadata.blob_size(s, e))
        bitmask = self._spec((s, bitmask_width(vocab)), jnp.int32) if masked else None
        self._sample[(s, e, masked)] = self._sample_jit.lower(logits, blob, bitmask, num_seqs=s,
                                                              num_entries=e).compile()

    def _compile_prompt_logprobs(self, t: int):
        hidden = self._spec((t, self.model_config.hidden_size), jnp.dtype(self.model_config.dtype))
        self._prompt_logprobs[t] = self._prompt_logprobs_jit.lower(
            self._abstract(self.params), hidden, self._blob_spec(t)).compile()

    def _compile_swap(self, direction: str, n: int):
        ids = self._spec((n,), jnp.int32)
        kv = self._abstract(self.kv_cache)
        if direction == "out":
            compiled = jax.jit(_gather_blocks).lower(kv, ids).compile()
        else:
            blocks = [(self._spec((n, *k.shape[1:]), k.dtype),) * 2 for k, _ in kv]
            compiled = jax.jit(_scatter_blocks, donate_argnums=(0,)).lower(kv, ids, blocks).compile()
        self._swap[(direction, n)] = compiled

    def warmup(self, show_progress: bool = True) -> int:
        """Compiles every program a step can run: the forward per bucket, the sampler per
        (num_seqs, num_entries) bucket, plain and token-masked (structured outputs), prompt
        logprobs per token bucket and the swap copies. Returns the number of programs compiled
        (or loaded from the compilation cache)."""
        jobs = [functools.partial(self._compile_forward, *shape) for shape in self.buckets.step_shapes()]
        if self._decode_jit is not None:  # decode-only steps hold at most max_num_seqs tokens
            most = pick(self.buckets.num_tokens, min(self.buckets.num_seqs[-1], self.buckets.num_tokens[-1]))
            jobs += [functools.partial(self._compile_forward, *shape, True)
                     for shape in self.buckets.step_shapes() if shape[0] <= most]
        jobs += [functools.partial(self._compile_sample, *shape, masked)
                 for shape in self.buckets.sampler_shapes() for masked in (False, True)]
        jobs += [functools.partial(self._compile_prompt_logprobs, t) for t in self.buckets.num_tokens]
        jobs += [functools.partial(self._compile_swap, d, n) for d in ("out", "in") for n in self.swap_buckets]
        for job in tqdm(jobs, desc="Compiling step buckets", disable=not show_progress, unit="program"):
            job()
        return len(jobs)

    # ---- execution ---------------------------------------------------------------------------

    def swap_out(self, pairs: list[tuple[int, int]]) -> None:
        """Copies device blocks to host slots: pairs of (device block id, host slot)."""
        if not pairs:
            return
        n = pick(self.swap_buckets, len(pairs))
        ids = np.zeros(n, np.int32)
        ids[:len(pairs)] = [b for b, _ in pairs]
        if ("out", n) not in self._swap:
            self._compile_swap("out", n)
        blocks = jax.device_get(self._swap[("out", n)](self.kv_cache, jax.device_put(ids, self.device)))
        slots = [slot for _, slot in pairs]
        for layer, (k, v) in enumerate(blocks):
            self._host_k[layer][slots] = k[:len(pairs)]
            self._host_v[layer][slots] = v[:len(pairs)]

    def swap_in(self, pairs: list[tuple[int, int]]) -> None:
        """Copies host slots back into device blocks: pairs of (host slot, device block id)."""
        if not pairs:
            return
        n = pick(self.swap_buckets, len(pairs))
        ids = np.zeros(n, np.int32)  # padding rewrites the null block
        ids[:len(pairs)] = [b for _, b in pairs]
        slots = [slot for slot, _ in pairs] + [0] * (n - len(pairs))
        blocks = [(hk[slots], hv[slots]) for hk, hv in zip(self._host_k, self._host_v)]
        if ("in", n) not in self._swap:
            self._compile_swap("in", n)
        self.kv_cache = self._swap[("in", n)](self.kv_cache, jax.device_put(ids, self.device),
                                              jax.device_put(blocks, self.device))

    def execute(self, scheduler_output, seeds: list[int], token_bitmask: np.ndarray | None = None) -> RunnerOutput:
        """Runs one scheduled step. `seeds[i]` is scheduled[i]'s resolved sampling seed.

        token_bitmask: None, or i32[len(scheduled), cdiv(vocab, 32)] of the tokens each row may
        sample (structured outputs); it travels in the same device_put as the step's blobs.
        """
        self.swap_out(scheduler_output.blocks_to_swap_out)
        self.swap_in(scheduler_output.blocks_to_swap_in)
        scheduled = scheduler_output.scheduled
        max_context = max(r.start_position + len(r.token_ids) for r in scheduled)
        t, s, p = self.buckets.for_step(scheduler_output.total_num_scheduled_tokens, len(scheduled), max_context,
                                        self.block_size)
        forward_blob = pack_step(scheduled, t, s, p, self.block_size)
        entries = [logit_entries(r) for r in scheduled]
        e = pick(self.buckets.entries_for_seqs(s), sum(map(len, entries)))
        sampling_blob = pack_sampling(scheduled, seeds, s, e, entries)
        masked = token_bitmask is not None
        if masked:  # padded rows allow every token
            token_bitmask = np.pad(token_bitmask, ((0, s - len(token_bitmask)), (0, 0)), constant_values=-1)
        forward_blob, sampling_blob, token_bitmask = jax.device_put((forward_blob, sampling_blob, token_bitmask),
                                                                    self.device)
        decode_only = self._decode_jit is not None and all(len(r.token_ids) == 1 for r in scheduled)
        # Programs missing here only with enforce_eager (warmup compiles every shape): compiled on first use.
        if (t, s, p, decode_only) not in self._forward:
            self._compile_forward(t, s, p, decode_only)
        if (s, e, masked) not in self._sample:
            self._compile_sample(s, e, masked)
        logits, hidden, self.kv_cache = self._forward[(t, s, p, decode_only)](self.params, self.kv_cache,
                                                                              self.kv_scales, forward_blob)
        out = self._sample[(s, e, masked)](logits, sampling_blob, token_bitmask)
        prompt_logprobs = None
        if any(r.sampling_params.prompt_logprobs is not None for r in scheduled):
            prompt_logprobs = self._run_prompt_logprobs(scheduled, hidden, t)
        if any(r.sampling_params.logprobs is not None for r in scheduled):
            ids, lps, ranks, top_lps, top_ids = jax.device_get(
                (out.token_ids, out.logprobs, out.ranks, out.top_logprobs, out.top_token_ids))
            return RunnerOutput(ids, lps, ranks, top_lps, top_ids, prompt_logprobs)
        return RunnerOutput(np.asarray(out.token_ids), prompt_logprobs=prompt_logprobs)

    def _run_prompt_logprobs(self, scheduled, hidden, num_tokens: int):
        """Prompt logprobs for every packed row."""
        targets = np.zeros(num_tokens, np.int32)
        start = 0
        for req in scheduled:
            n = len(req.token_ids)
            prompt = req.prompt_token_ids
            nxt = np.arange(req.start_position + 1, req.start_position + n + 1)
            in_prompt = nxt < len(prompt)
            targets[start:start + n][in_prompt] = np.asarray(prompt, np.int32)[nxt[in_prompt]]
            start += n
        if num_tokens not in self._prompt_logprobs:  # only with enforce_eager
            self._compile_prompt_logprobs(num_tokens)
        return jax.device_get(self._prompt_logprobs[num_tokens](self.params, hidden,
                                                                jax.device_put(targets, self.device)))

    def kv_pool_lost(self) -> bool:
        """True when a failed step consumed the donated KV pool (its buffers are deleted)."""
        return any(array.is_deleted() for array in jax.tree.leaves(self.kv_cache))

    def update_weights(self, params) -> None:
        """Replaces the params with a pytree of the same structure, shapes and dtypes (no recompile)."""
        old = jax.tree.structure(self.params)
        new = jax.tree.structure(params)
        if old != new:
            raise ValueError(f"update_weights: the params tree structure differs from the loaded model's "
                             f"({new} vs {old}).")
        for path_old, path_new in zip(jax.tree.leaves_with_path(self.params), jax.tree.leaves_with_path(params)):
            (path, a), (_, b) = path_old, path_new
            if a.shape != b.shape or a.dtype != b.dtype:
                raise ValueError(f"update_weights: {jax.tree_util.keystr(path)} is {b.dtype}{list(b.shape)}, "
                                 f"the model's is {a.dtype}{list(a.shape)}.")
        self.params = jax.device_put(params, self.device)
        if self._recalibrate_kv is not None:
            self.kv_scales = jax.device_put(self._recalibrate_kv(self.params), self.device)


def device_platform() -> str:
    """"gpu" or "cpu" (or another jax platform name) for the default device."""
    platform = jax.devices()[0].platform
    return "gpu" if platform in ("gpu", "cuda", "rocm") else platform


def enable_compilation_cache(cache_dir: str) -> None:
    """Turns on JAX's persistent compilation cache in `cache_dir` ("" leaves it off)."""
    if cache_dir and not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)


def build_runner(model_config, params, args, max_model_len: int, devices=None, *, tokenizer=None,
                 model_path: str | None = None) -> ModelRunner:
    """Picks the attention backend, sizes the KV pool and swap space from EngineArgs.

    devices: the engine's devices (a data-parallel replica's slice of jax.devices()); None means
    jax.devices()[:tensor_parallel_size]. Params and pool go on devices[0].
    For an int8 / fp8 KV cache the scales come from the checkpoint at `model_path`, else from a
    calibration pass over `tokenizer`'s encoding of the built-in text (`jpaged.kv_quantization`).
    """
    enable_compilation_cache(args.compilation_cache_dir)
    if devices is None:
        devices = jax.devices()[:args.tensor_parallel_size]
    device = devices[0]
    backend, attention_fn = select_attention(args.attention_backend, device_platform())
    decode_attention_fn = decode_only_attention(backend)
    logger.info("attention backend: %s on %s", backend, device)
    kv_dtype = kv_quantization.page_dtype(args.kv_cache_dtype, model_config.dtype)
    kv_quantization.check_backend(backend, kv_dtype, device)
    params = jax.device_put(params, device)  # before sizing: the pool gets what the weights leave
    kv_scales, recalibrate_kv = kv_quantization.kv_cache_scales(model_config, params, kv_dtype, args.block_size,
                                                                tokenizer, model_path)
    step_bytes = functools.partial(largest_step_bytes, model_config, params, attention_fn, select_kv_writer(backend),
                                   args, max_model_len, kv_dtype, bucket_pages=backend == "reference")
    pool_spec = kv_pool.size_pool(model_config, args, max_model_len, kv_dtype, device, step_bytes=step_bytes)
    return ModelRunner(model_config, params, pool_spec=pool_spec,
                       num_swap_blocks=kv_pool.num_swap_blocks(model_config, args, kv_dtype),
                       max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=args.max_num_seqs,
                       max_model_len=max_model_len, attention_fn=attention_fn,
                       write_kv_fn=select_kv_writer(backend), bucket_pages=backend == "reference", device=device,
                       max_entries_per_seq=max_sampler_entries(model_config, args, max_model_len),
                       max_logprobs=args.max_logprobs, decode_attention_fn=decode_attention_fn,
                       kv_scales=kv_scales, recalibrate_kv=recalibrate_kv)


def max_sampler_entries(model_config, args, max_model_len: int) -> int:
    """The most sampler entries one request can bring: logit_bias, a min_tokens mask over its
    stop_token_ids and EOS ids, one penalty entry per distinct token of its context."""
    return (args.max_logit_bias + args.max_stop_token_ids + len(model_config.eos_token_ids)
            + max_model_len)


def largest_step_bytes(model_config, params, attention_fn, write_kv_fn, args, max_model_len: int, kv_dtype: str, *,
                       bucket_pages: bool) -> int:
    """Device bytes the largest bucket's forward plus its sampler need besides the weights and the
    pool (`kv_pool.compiled_step_bytes`), compiled once against a one-sequence pool (with the pool
    donated, the temporaries do not depend on its size). Used to size the pool on a GPU."""
    buckets = Buckets.create(max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=args.max_num_seqs,
                             max_model_len=max_model_len, block_size=args.block_size, bucket_pages=bucket_pages)
    t, p = buckets.num_tokens[-1], buckets.pages_per_seq[-1]
    s = buckets.seqs_for_tokens(t)
    page = jax.ShapeDtypeStruct(kv_pool.KVPoolSpec(p + 1, args.block_size, model_config.num_layers,
                                                   model_config.num_kv_heads, model_config.head_dim,
                                                   kv_dtype).page_shape, kv_dtype)
    scale = jax.ShapeDtypeStruct((model_config.num_kv_heads,), jnp.float32)
    scales = [(scale, scale)] * model_config.num_layers if kv_quantization.is_quantized(kv_dtype) else None
    forward = jax.jit(functools.partial(_forward_step, config=model_config, attention_fn=attention_fn,
                                        write_kv_fn=write_kv_fn),
                      static_argnames=("num_tokens", "num_seqs", "pages_per_seq"), donate_argnums=(1,))
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    blob = jax.ShapeDtypeStruct((StepMetadata.blob_size(t, s, p),), jnp.int32)
    compiled = forward.lower(abstract, [(page, page)] * model_config.num_layers, scales, blob, num_tokens=t,
                             num_seqs=s, pages_per_seq=p).compile()
    vocab = model_config.vocab_size
    e = s * max_sampler_entries(model_config, args, max_model_len)  # the largest sampler: all entries, masked
    sampler = jax.jit(functools.partial(_sample_step, max_logprobs=args.max_logprobs),
                      static_argnames=("num_seqs", "num_entries")).lower(
        jax.ShapeDtypeStruct((s, vocab), jnp.float32), jax.ShapeDtypeStruct((SamplingMetadata.blob_size(s, e),), jnp.int32),
        jax.ShapeDtypeStruct((s, bitmask_width(vocab)), jnp.int32), num_seqs=s, num_entries=e).compile()
    return kv_pool.compiled_step_bytes(compiled.memory_analysis()) + kv_pool.compiled_step_bytes(
        sampler.memory_analysis())
