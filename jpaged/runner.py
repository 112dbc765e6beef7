"""ModelRunner: the one host<->device boundary. Owns the params, the KV pool and the compiled steps.

It runs on a mesh of the engine's devices (jpaged/sharding.py): one device, or tensor parallel
over several, where every program runs SPMD with params and pool split by the logical rules and
the step's inputs and sampled outputs replicated.

Per step: swap blocks out/in if the scheduler asked, pack the forward blob and the sampling blob
(two int32 transfers), run the precompiled forward for the step's (num_tokens, num_seqs,
pages_per_seq) bucket with the KV pool donated, run the precompiled sampler on the sampled rows'
logits, and copy the sampled ids (plus logprobs when a request asked) back in one device_get.
A multi-step round (the scheduler's num_steps > 1) runs num_steps forwards and samplers in one
program instead (`_decode_steps`).
"""

import dataclasses
import functools
import inspect
import logging
import os
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jax.sharding import NamedSharding, PartitionSpec

import pallas_kernels.cpu as cpu_kernels

from jpaged import executable_cache, kv_pool, kv_quantization, lora, multihost, sharding
from jpaged.attention_backend import decode_only_attention, select_attention, select_kv_writer, select_sampling_kernels
from jpaged.buckets import Buckets, next_power_of_2, pick, power_of_2_buckets
from jpaged.config import DEFAULT_CPU_SCHEDULER_STEPS, LOGPROBS_MODES
from jpaged.models import llama, quantization
from jpaged.sampler import SamplingKernels, sample
from jpaged.sampling_params import MAX_LOGPROB_TOKEN_IDS
from jpaged.step_metadata import SamplingMetadata, StepMetadata, pack_sampling, pack_step, row_entries
from jpaged.structured_output.manager import bitmask_width

logger = logging.getLogger(__name__)


def _forward(params, kv_cache, kv_scales, meta: StepMetadata, *, model, attention_fn, write_kv_fn):
    """The model over one step's packed tokens: (logits f32[num_seqs, vocab] at meta.logits_indices, hidden,
    kv_cache).
    model: a Flax module with the engine's model contract (docs/models.md)."""
    hidden, kv_cache = _forward_hidden(params, kv_cache, kv_scales, meta, model=model, attention_fn=attention_fn,
                                       write_kv_fn=write_kv_fn)
    logits = model.apply({"params": params}, hidden[meta.logits_indices], method="compute_logits",
                         **_real_rows(model, "compute_logits", meta))  # f32[num_seqs, vocab]
    return logits, hidden, kv_cache


def _forward_hidden(params, kv_cache, kv_scales, meta: StepMetadata, *, model, attention_fn, write_kv_fn):
    """The model's __call__ over one step's packed tokens: (hidden [num_tokens, hidden_size], kv_cache)."""
    extra = {} if kv_scales is None else {"kv_scales": kv_scales}  # a user's model may not take them
    if "lora" in params:
        extra["lora_slots"] = meta.lora_slots
    return model.apply({"params": params}, meta.token_ids, meta.positions, kv_cache, meta.attn, attention_fn,
                       write_kv_fn, **extra)


def _hidden_step(params, kv_cache, kv_scales, blob, *, num_tokens, num_seqs, pages_per_seq, **model_fns):
    """A pooling runner's step (no lm_head): (hidden [num_tokens, hidden_size], kv_cache)."""
    return _forward_hidden(params, kv_cache, kv_scales, StepMetadata.unpack(blob, num_tokens, num_seqs, pages_per_seq),
                           **model_fns)


def _real_rows(model, method: str, meta: StepMetadata) -> dict:
    """{"num_rows": the number of real logits rows} when the model's `method` takes num_rows
    (docs/models.md): the padded rows after them need no lm_head. Else {}."""
    if "num_rows" in inspect.signature(getattr(type(model), method)).parameters:
        return {"num_rows": meta.num_logits_rows()}
    return {}


def _forward_step(params, kv_cache, kv_scales, blob, *, num_tokens, num_seqs, pages_per_seq, **model_fns):
    """One step from its forward blob; model_fns: _forward's model, attention_fn and write_kv_fn."""
    return _forward(params, kv_cache, kv_scales, StepMetadata.unpack(blob, num_tokens, num_seqs, pages_per_seq),
                    **model_fns)


def _decode_steps(params, kv_cache, kv_scales, blob, sampling_blob, *, num_tokens, num_seqs, pages_per_seq,
                  num_steps, block_size, max_logprobs, sampling_kernels, model, **model_fns):
    """num_steps decode steps of a decode-only batch in one program (multi-step scheduling):
    each step samples one token per sequence and feeds it to the next one.

    blob and sampling_blob describe the first step (one new token per sequence, packed in
    sequence order, no sampler entries); the scheduler has allocated the KV blocks of every
    position the steps write. When every row is greedy and the model has compute_greedy_ids,
    a step's ids come from it instead of the logits and the sampler (the same ids).
    Returns (sampled ids i32[num_steps, num_seqs], kv_cache).
    """
    meta = StepMetadata.unpack(blob, num_tokens, num_seqs, pages_per_seq)
    sampling = SamplingMetadata.unpack(sampling_blob, num_seqs, 0)
    attn = meta.attn
    real_seq = jnp.diff(attn.cu_q_lens) > 0
    rows = jnp.arange(num_tokens)
    real_row = rows < attn.cu_q_lens[-1]
    row_seq = jnp.minimum(rows, num_seqs - 1)  # decode rows are packed in sequence order
    feed = jnp.where(real_seq, meta.logits_indices, num_tokens)  # each sampled id's next row; padding: dropped

    def step(i, carry):
        kv_cache, token_ids, sampled = carry
        positions = jnp.where(real_row, meta.positions + i, 0)
        slots = attn.block_tables[row_seq, positions // block_size] * block_size + positions % block_size
        # Every row of a round is a decode (the scheduler's rule). A constant: the blob's count, a
        # runtime operand of every linear inside this loop, cost ~7 % of a round here.
        step_attn = dataclasses.replace(attn, slot_mapping=jnp.where(real_row, slots, 0),
                                        kv_lens=jnp.where(real_seq, attn.kv_lens + i, 0),
                                        num_decode_tokens=jnp.int32(num_tokens))
        step_meta = StepMetadata(token_ids=token_ids, positions=positions, attn=step_attn,
                                 logits_indices=meta.logits_indices, lora_slots=meta.lora_slots)
        hidden, kv_cache = _forward_hidden(params, kv_cache, kv_scales, step_meta, model=model, **model_fns)
        step_sampling = dataclasses.replace(sampling, output_index=sampling.output_index + i)

        def sampled_ids(hidden):
            logits = model.apply({"params": params}, hidden, method="compute_logits",
                                 **_real_rows(model, "compute_logits", step_meta))
            return sample(logits, step_sampling, max_logprobs=max_logprobs, kernels=sampling_kernels).token_ids

        def greedy_ids(hidden):  # the same ids, where the model finds them without every logit
            return model.apply({"params": params}, hidden, method="compute_greedy_ids",
                               **_real_rows(model, "compute_greedy_ids", step_meta))

        hidden = hidden[meta.logits_indices]
        if hasattr(type(model), "compute_greedy_ids"):
            ids = jax.lax.cond(jnp.all(step_sampling.temperature <= 0.0), greedy_ids, sampled_ids, hidden)
        else:
            ids = sampled_ids(hidden)
        return kv_cache, token_ids.at[feed].set(ids, mode="drop"), sampled.at[i].set(ids)

    init = (kv_cache, meta.token_ids, jnp.zeros((num_steps, num_seqs), jnp.int32))
    kv_cache, _, sampled = jax.lax.fori_loop(0, num_steps, step, init)
    return sampled, kv_cache


def _prompt_logprobs_step(params, hidden, targets, *, model, max_logprobs, sampling_kernels, logprobs_mode):
    """Every packed row's logits at its next prompt token, with the top ones: log-softmax, or
    the logits themselves in the *_logits modes (prompts are never processed, as in vLLM).

    hidden: [num_tokens, hidden_size]; targets: i32[num_tokens] (the token each row predicts, -1
    for rows no request asked about: their outputs are zeros).
    """
    logits = model.apply({"params": params}, hidden, method="compute_logits")  # f32[T, vocab]
    return sampling_kernels.logprob_outputs(logits, jnp.maximum(targets, 0), targets >= 0,
                                            min(max_logprobs, logits.shape[1]),
                                            normalize=logprobs_mode.endswith("logprobs"))


def _sample_step(logits, blob, token_bitmask=None, *, num_seqs, num_entries, max_logprobs, sampling_kernels,
                 logprobs_mode):
    return sample(logits, SamplingMetadata.unpack(blob, num_seqs, num_entries), token_bitmask, max_logprobs,
                  sampling_kernels, logprobs_mode)


def _gather_blocks(kv_cache, block_ids):
    return [(k[block_ids], v[block_ids]) for k, v in kv_cache]


def _scatter_blocks(kv_cache, block_ids, blocks):
    return [(k.at[block_ids].set(nk), v.at[block_ids].set(nv)) for (k, v), (nk, nv) in zip(kv_cache, blocks)]


def _to_host(tree):
    """numpy copies of replicated device arrays (one device->host copy), from this host's replica:
    on several hosts the arrays span devices this process cannot read."""
    return jax.device_get(jax.tree.map(lambda x: x if x.is_fully_addressable else x.addressable_data(0), tree))


def _prompt_targets(scheduled, num_tokens: int) -> np.ndarray:
    """i32[num_tokens]: the prompt token each packed row of a request with prompt_logprobs
    predicts; -1 past the prompt, for other requests' rows and in padding."""
    targets = np.full(num_tokens, -1, np.int32)
    start = 0
    for req in scheduled:
        n = len(req.token_ids)
        if req.sampling_params.prompt_logprobs is None:
            start += n
            continue
        prompt = req.prompt_token_ids
        nxt = np.arange(req.start_position + 1, req.start_position + n + 1)
        in_prompt = nxt < len(prompt)
        targets[start:start + n][in_prompt] = np.asarray(prompt, np.int32)[nxt[in_prompt]]
        start += n
    return targets


def _listed_logprobs(scheduled, entries, entry_logprobs: np.ndarray) -> list[np.ndarray | None]:
    """Per sampled row, the logprobs of its request's logprob_token_ids (the last entries of the
    row's, step_metadata.logit_entries), or None."""
    listed, end, row = [], 0, 0
    for r in scheduled:
        token_ids = r.sampling_params.logprob_token_ids
        for _ in range(r.num_sample_rows):
            end += len(entries[row])
            listed.append(None if token_ids is None else entry_logprobs[end - len(token_ids):end])
            row += 1
    return listed


@dataclasses.dataclass
class RunnerOutput:
    """Host copies of one step's samples, one row per sampled row: scheduled[i] has
    num_sample_rows of them (one, or with drafts one more per draft), in batch order."""

    token_ids: np.ndarray  # i32[num_seqs]; i32[num_steps, num_seqs] for a multi-step decode
    # Present only when a scheduled request asked for logprobs:
    logprobs: np.ndarray | None = None  # f32[num_seqs]: the sampled token's
    ranks: np.ndarray | None = None  # i32[num_seqs]
    top_logprobs: np.ndarray | None = None  # f32[num_seqs, max_logprobs]
    top_token_ids: np.ndarray | None = None  # i32[num_seqs, max_logprobs]
    # per row, f32[len(logprob_token_ids)] of a request with logprob_token_ids, else None
    listed_logprobs: list[np.ndarray | None] | None = None
    # Present only when a scheduled request asked for prompt_logprobs; one row per packed token
    # (row r of scheduled[i] is at position start_position + r - its offset and predicts the next token):
    prompt_logprobs: tuple[np.ndarray, ...] | None = None  # (logprob f32[T], rank i32[T], top f32[T, K], ids i32[T, K])
    # A pooling runner's only output (its token_ids are placeholders): the final-norm hidden states
    # f32[T, hidden_size] of the step's T scheduled tokens, packed in batch order.
    hidden: np.ndarray | None = None


class ModelRunner:
    """Runs scheduled batches on a mesh of devices (tensor parallel over its "tp" axis).

    Args:
      model_config: jpaged.models.config.ModelConfig. params: its params pytree (placed with
        `sharding.param_shardings`, or abstract shapes for lowering only).
      mesh: a `sharding.make_mesh` mesh. model: the Flax module (default
        `LlamaForCausalLM(model_config)`; docs/models.md gives the contract for others).
      pool_spec: kv_pool.KVPoolSpec. num_swap_blocks: host blocks for swapping (0: none).
      attention_fn: a paged attention with the reference signature; write_kv_fn: the KV write to go with it.
      sampling_kernels: the sampler's vocabulary-wide work (`sampler.SamplingKernels`).
      logprobs_mode: what logprobs and prompt_logprobs return (`jpaged.config.LOGPROBS_MODES`).
      bucket_pages: bucket the block-table width (for attention whose cost follows the width).
      max_entries_per_seq: the most sampler entries (logit_bias, min_tokens masks, distinct
        penalty tokens) one request can bring; max_logprobs: the widest top-logprobs request.
      decode_attention_fn: None, or an attention for steps where every sequence has one new
        token (the pallas decode kernel); such steps then run their own compiled programs.
      kv_scales: None, or per layer (k_scale, v_scale) f32[num_kv_heads] for int8 / fp8 pages
        (`jpaged.kv_quantization`); static: never donated, never changed by a step or a swap.
      recalibrate_kv: None, or a function of the params giving kv_scales, called on the runner's
        params at start (when kv_scales is None) and by update_weights (calibrated scales follow
        the weights; a checkpoint's do not).
      pack_params: None, or a function applied to `params` (and to update_weights' params) before
        they are used: `quantization.pack_linears` for the C++ CPU matmul kernel.
      num_scheduler_steps: decode steps one multi-step program runs (`_decode_steps`); 1: none.
      executable_cache_dir: None, or a folder where compiled programs are kept and loaded from
        without tracing (`jpaged.executable_cache`).
      pooling: a pooling runner (jpaged/pooling.py): its steps return hidden states, with no
        lm_head, sampler or decode programs (it needs num_scheduler_steps 1 and no decode_attention_fn).
    """

    def __init__(self, model_config, params, *, pool_spec, num_swap_blocks: int, max_num_batched_tokens: int,
                 max_num_seqs: int, max_model_len: int, attention_fn, write_kv_fn, bucket_pages: bool, mesh,
                 max_entries_per_seq: int, max_logprobs: int, decode_attention_fn=None, model=None, kv_scales=None,
                 recalibrate_kv=None, pack_params=None, num_scheduler_steps: int = 1,
                 sampling_kernels=SamplingKernels(), logprobs_mode: str = LOGPROBS_MODES[0],
                 executable_cache_dir: str | None = None, pooling: bool = False):
        if pooling and (num_scheduler_steps != 1 or decode_attention_fn is not None):
            raise ValueError("a pooling runner runs single steps of its own program: num_scheduler_steps=1 "
                             "and no decode_attention_fn")
        self.model_config = model_config
        self.pooling = pooling
        self.model = llama.LlamaForCausalLM(model_config) if model is None else model
        self._param_avals = self._abstract(params)  # what update_weights must be given
        self._pack_params = pack_params
        self.params = params if pack_params is None else pack_params(params)
        is_packed = lambda x: isinstance(x, quantization.PackedWeight)  # noqa: E731
        packed = [w for w in jax.tree.leaves(self.params, is_leaf=is_packed) if is_packed(w)]
        if packed:
            logger.info("%d linears (%s) packed for the C++ CPU matmul kernel", len(packed),
                        ", ".join(sorted({str(w.panels.dtype) for w in packed})))
        self._recalibrate_kv = recalibrate_kv
        self.block_size = pool_spec.block_size
        self.max_model_len = max_model_len
        self.mesh = mesh
        tp = mesh.shape[sharding.TP_AXIS]
        # Step inputs and sampled outputs are replicated on every device of the mesh (programs
        # compile for these devices, not for jax.devices()[0]: a data-parallel replica has its own).
        self.replicated = NamedSharding(mesh, PartitionSpec())
        self.kv_sharding = NamedSharding(mesh, sharding.kv_spec(model_config, tp))
        self.kv_scale_sharding = NamedSharding(mesh, sharding.kv_scale_spec(model_config, tp))
        if kv_scales is None and recalibrate_kv is not None:
            # On the params the steps run (packed, for the C++ matmul): a lossy cache's rounding
            # follows its scales closely.
            kv_scales = recalibrate_kv(self.params)
        self.kv_scales = None if kv_scales is None else jax.device_put(kv_scales, self.kv_scale_sharding)
        if tp > 1:
            attention_fn, write_kv = sharding.shard_attention(attention_fn, write_kv_fn, mesh, model_config)
            if decode_attention_fn is not None:
                decode_attention_fn, _ = sharding.shard_attention(decode_attention_fn, write_kv_fn, mesh, model_config)
            write_kv_fn = write_kv
        forward_out = None if tp == 1 else (self.replicated, self.replicated,
                                            [(self.kv_sharding,) * 2] * pool_spec.num_layers)
        self.buckets = Buckets.create(max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs,
                                      max_model_len=max_model_len, block_size=pool_spec.block_size,
                                      bucket_pages=bucket_pages, max_entries_per_seq=max_entries_per_seq)
        self.kv_cache = kv_pool.allocate(pool_spec, self.kv_sharding)
        # Fewer blocks than sized when the device's allocator could not place them all.
        pool_spec = self.pool_spec = dataclasses.replace(pool_spec, num_blocks=self.kv_cache[0][0].shape[0])
        options = quantization.compiler_options(params, mesh.devices.flat[0].platform)  # programs that read the weights
        replicated_out = None if tp == 1 else self.replicated  # readable on every host
        self.num_scheduler_steps = num_scheduler_steps
        steps = dict(static_argnames=("num_tokens", "num_seqs", "pages_per_seq"), donate_argnums=(1,),
                     compiler_options=options)
        programs = {  # name -> (function, jax.jit options)
            "forward": (functools.partial(_hidden_step if pooling else _forward_step, model=self.model,
                                          attention_fn=attention_fn, write_kv_fn=write_kv_fn),
                        dict(steps, out_shardings=forward_out[1:] if pooling and forward_out else forward_out)),
            "decode_steps": (functools.partial(_decode_steps, model=self.model,
                                               attention_fn=decode_attention_fn or attention_fn,
                                               write_kv_fn=write_kv_fn, num_steps=num_scheduler_steps,
                                               block_size=pool_spec.block_size, max_logprobs=max_logprobs,
                                               sampling_kernels=sampling_kernels),
                             dict(steps, out_shardings=None if tp == 1 else (self.replicated, forward_out[2]))),
            "sample": (functools.partial(_sample_step, max_logprobs=max_logprobs, sampling_kernels=sampling_kernels,
                                         logprobs_mode=logprobs_mode),
                       dict(static_argnames=("num_seqs", "num_entries"), out_shardings=replicated_out)),
            "prompt_logprobs": (functools.partial(_prompt_logprobs_step, model=self.model, max_logprobs=max_logprobs,
                                                  sampling_kernels=sampling_kernels, logprobs_mode=logprobs_mode),
                                dict(out_shardings=replicated_out, compiler_options=options)),
            "swap_out": (_gather_blocks, {}),
            "swap_in": (_scatter_blocks, dict(donate_argnums=(0,))),
            "set_lora": (lora.set_lora_slot, dict(donate_argnums=(0,))),
        }
        if decode_attention_fn is not None:
            programs["decode"] = (functools.partial(_forward_step, model=self.model, attention_fn=decode_attention_fn,
                                                    write_kv_fn=write_kv_fn), dict(steps, out_shardings=forward_out))
        self._executables = self._open_executable_cache(executable_cache_dir, programs)
        named = (lambda name, function: function) if self._executables is None else self._executables.named
        jitted = {name: jax.jit(named(name, function), **jit_options)
                  for name, (function, jit_options) in programs.items()}
        self._forward_jit, self._decode_jit = jitted["forward"], jitted.get("decode")
        self._decode_steps_jit, self._sample_jit = jitted["decode_steps"], jitted["sample"]
        self._prompt_logprobs_jit = jitted["prompt_logprobs"]
        self._swap_out_jit, self._swap_in_jit = jitted["swap_out"], jitted["swap_in"]
        self._set_lora_jit = jitted["set_lora"]
        self._set_lora = {}  # 0 -> compiled, with LoRA slots in the params
        self._prompt_logprobs = {}  # num_tokens -> compiled
        self._forward = {}  # (num_tokens, num_seqs, pages_per_seq, decode_only) -> compiled
        self._decode_steps = {}  # (num_tokens, num_seqs, pages_per_seq) -> compiled, with num_scheduler_steps > 1
        self._sample = {}  # (num_seqs, num_entries, masked) -> compiled
        self._swap = {}  # ("out" | "in", count bucket) -> compiled
        # Sleep mode: while the weights are released, their shardings and (level 1 on a GPU) a host copy.
        self._host_params = None
        self._param_shardings = None
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

    def _input_spec(self, shape: tuple[int, ...], dtype=jnp.int32):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=self.replicated)

    def _blob_spec(self, size: int):
        return self._input_spec((size,))

    # A program is (name, key): the table it goes in ("forward": self._forward, ...) and its
    # static shape key there. _lower traces and lowers one; _compile loads it from the
    # executable cache or compiles it (XLA may find it in its own compilation cache) into its table.

    def _open_executable_cache(self, directory: str | None, programs: dict):
        if directory is None or jax.process_count() > 1:
            return None
        avals = executable_cache.avals
        sources = (programs, self.model_config, self.pool_spec, avals(self.params), avals(self.kv_cache),
                   avals(self.kv_scales))
        try:
            return executable_cache.ExecutableCache(
                directory, executable_cache.fingerprint(sources, list(self.mesh.devices.flat)))
        except executable_cache.Unfingerprintable as reason:
            logger.info("executable cache off for this model: %s", reason)
            return None

    def _table(self, name: str) -> dict:
        return {"forward": self._forward, "decode_steps": self._decode_steps, "sample": self._sample,
                "prompt_logprobs": self._prompt_logprobs, "swap": self._swap, "set_lora": self._set_lora}[name]

    def _lower(self, name: str, key) -> jax.stages.Lowered:
        params, kv_cache, kv_scales = (self._abstract(x) for x in (self.params, self.kv_cache, self.kv_scales))
        if name == "forward":
            t, s, p, decode_only = key
            jitted = self._decode_jit if decode_only else self._forward_jit
            return jitted.lower(params, kv_cache, kv_scales, self._blob_spec(StepMetadata.blob_size(t, s, p)),
                                num_tokens=t, num_seqs=s, pages_per_seq=p)
        if name == "decode_steps":
            t, s, p = key
            return self._decode_steps_jit.lower(
                params, kv_cache, kv_scales, self._blob_spec(StepMetadata.blob_size(t, s, p)),
                self._blob_spec(SamplingMetadata.blob_size(s, 0)), num_tokens=t, num_seqs=s, pages_per_seq=p)
        if name == "sample":
            s, e, masked = key
            vocab = self.model_config.vocab_size
            bitmask = self._input_spec((s, bitmask_width(vocab))) if masked else None
            return self._sample_jit.lower(self._input_spec((s, vocab), jnp.float32),
                                          self._blob_spec(SamplingMetadata.blob_size(s, e)), bitmask,
                                          num_seqs=s, num_entries=e)
        if name == "prompt_logprobs":
            hidden = self._input_spec((key, self.model_config.hidden_size), jnp.dtype(self.model_config.dtype))
            return self._prompt_logprobs_jit.lower(params, hidden, self._blob_spec(key))
        if name == "set_lora":
            slot = jax.tree.map(lambda x: self._input_spec((1, *x.shape[1:]), x.dtype), params["lora"])
            return self._set_lora_jit.lower(params["lora"], self._input_spec(()), slot)
        direction, n = key  # swap
        ids = self._input_spec((n,))
        if direction == "out":
            return self._swap_out_jit.lower(kv_cache, ids)
        blocks = [(jax.ShapeDtypeStruct((n, *k.shape[1:]), k.dtype, sharding=k.sharding),) * 2 for k, _ in kv_cache]
        return self._swap_in_jit.lower(kv_cache, ids, blocks)

    def _decode_shapes(self):
        """The step shapes of decode-only steps, which hold at most max_num_seqs tokens."""
        most = pick(self.buckets.num_tokens, min(self.buckets.num_seqs[-1], self.buckets.num_tokens[-1]))
        return [shape for shape in self.buckets.step_shapes() if shape[0] <= most]

    def _compile(self, name: str, key, lowered: jax.stages.Lowered | None = None) -> bool:
        """Puts program (name, key) in its table: loaded from the executable cache unless
        `lowered` is given, else compiled from `lowered` (or a fresh lowering) and stored there.
        Returns whether it was loaded."""
        compiled = None
        if lowered is None and self._executables is not None:
            compiled = self._executables.load(name, key, list(self.mesh.devices.flat))
        loaded = compiled is not None
        if not loaded:
            lowered = lowered or self._lower(name, key)
            compiled = lowered.compile() if self._executables is None else self._executables.compile(name, key, lowered)
        self._table(name)[key] = compiled
        return loaded

    def warmup(self, show_progress: bool = True) -> tuple[int, int]:
        """Compiles every program a step can run: the forward per bucket, the sampler per
        (num_seqs, num_entries) bucket, plain and token-masked (structured outputs), prompt
        logprobs per token bucket, the swap copies and, with num_scheduler_steps > 1, the
        multi-step decode per decode bucket (a pooling runner: the forward and the copies).
        Returns (the number of programs, how many of them were loaded from the executable cache
        without tracing).

        Tracing and lowering hold the GIL; XLA's compiling (or loading from a cache) does not, so
        it runs on a thread pool while the next programs are traced."""
        programs = [("forward", (*shape, False)) for shape in self.buckets.step_shapes()]
        if not self.pooling:  # a pooling runner's forward is its whole step
            if self._decode_jit is not None:
                programs += [("forward", (*shape, True)) for shape in self._decode_shapes()]
            if self.num_scheduler_steps > 1:
                programs += [("decode_steps", shape) for shape in self._decode_shapes()]
            programs += [("sample", (*shape, masked))
                         for shape in self.buckets.sampler_shapes() for masked in (False, True)]
            programs += [("prompt_logprobs", t) for t in self.buckets.num_tokens]
        programs += [("swap", (d, n)) for d in ("out", "in") for n in self.swap_buckets]
        if "lora" in self.params:
            programs.append(("set_lora", 0))
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="jpaged-compile") as pool:
            futures = []
            for name, key in tqdm(programs, desc="Compiling step buckets", disable=not show_progress, unit="program"):
                cached = self._executables is not None and self._executables.contains(name, key)
                futures.append(pool.submit(self._compile, name, key, None if cached else self._lower(name, key)))
            num_loaded = sum(future.result() for future in futures)
        return len(programs), num_loaded

    # ---- execution ---------------------------------------------------------------------------

    def set_lora_slot(self, slot: int, adapter: lora.LoRAAdapter) -> None:
        """Puts `adapter`'s weights in LoRA slot `slot` (1..max_loras), between steps."""
        weights = lora.slot_weights(adapter, self.params["lora"])
        if 0 not in self._set_lora:  # only with enforce_eager
            self._compile("set_lora", 0)
        self.params = {**self.params, "lora": self._set_lora[0](
            self.params["lora"], jax.device_put(np.int32(slot), self.replicated),
            jax.device_put(weights, self.replicated))}

    def swap_out(self, pairs: list[tuple[int, int]]) -> None:
        """Copies device blocks to host slots: pairs of (device block id, host slot)."""
        if not pairs:
            return
        n = pick(self.swap_buckets, len(pairs))
        ids = np.zeros(n, np.int32)
        ids[:len(pairs)] = [b for b, _ in pairs]
        if ("out", n) not in self._swap:
            self._compile("swap", ("out", n))
        blocks = jax.device_get(self._swap[("out", n)](self.kv_cache, jax.device_put(ids, self.replicated)))
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
            self._compile("swap", ("in", n))
        self.kv_cache = self._swap[("in", n)](self.kv_cache, jax.device_put(ids, self.replicated),
                                              jax.device_put(blocks, self.kv_sharding))

    def execute(self, scheduler_output, seeds: list[int], token_bitmask: np.ndarray | None = None,
                lora_slots: list[int] | None = None) -> RunnerOutput:
        """Runs one scheduled step. `seeds[i]` is scheduled[i]'s resolved sampling seed.

        token_bitmask: None, or i32[len(scheduled), cdiv(vocab, 32)] of the tokens each request may
        sample (structured outputs), the same for each of its rows; it travels in the same
        device_put as the step's blobs.
        lora_slots: None, or scheduled[i]'s LoRA slot (0: none; set_lora_slot filled them).
        On several hosts, host 0 first sends the step to the others (jpaged/multihost.py).
        """
        self.swap_out(scheduler_output.blocks_to_swap_out)
        self.swap_in(scheduler_output.blocks_to_swap_in)
        if self.pooling:
            return self._execute_pooling(scheduler_output, lora_slots)
        if scheduler_output.num_steps > 1:
            return self._execute_decode_steps(scheduler_output, seeds, lora_slots)
        scheduled = scheduler_output.scheduled
        max_context = max(r.start_position + len(r.token_ids) for r in scheduled)
        num_rows = [r.num_sample_rows for r in scheduled]
        t, s, p = self.buckets.for_step(scheduler_output.total_num_scheduled_tokens, sum(num_rows), max_context,
                                        self.block_size)
        entries = [e for r in scheduled for e in row_entries(r)]  # one list per sampled row
        e = pick(self.buckets.entries_for_seqs(s), sum(map(len, entries)))
        if token_bitmask is not None:  # padded rows allow every token
            token_bitmask = np.repeat(token_bitmask, num_rows, axis=0)
            token_bitmask = np.pad(token_bitmask, ((0, s - len(token_bitmask)), (0, 0)), constant_values=-1)
        step = multihost.StepInputs(
            t, s, p, e, decode_only=self._decode_jit is not None and all(len(r.token_ids) == 1 for r in scheduled),
            forward_blob=pack_step(scheduled, t, s, p, self.block_size, lora_slots),
            sampling_blob=pack_sampling(scheduled, seeds, s, e, entries), token_bitmask=token_bitmask,
            prompt_targets=_prompt_targets(scheduled, t) if any(
                r.sampling_params.prompt_logprobs is not None for r in scheduled) else None)
        if jax.process_count() > 1:
            multihost.send_step(step)
        out, prompt_logprobs = self._run(step)
        prompt_logprobs = None if prompt_logprobs is None else _to_host(prompt_logprobs)
        if any(r.sampling_params.num_logprobs is not None for r in scheduled):
            ids, lps, ranks, top_lps, top_ids, entry_lps = _to_host(
                (out.token_ids, out.logprobs, out.ranks, out.top_logprobs, out.top_token_ids, out.entry_logprobs))
            return RunnerOutput(ids, lps, ranks, top_lps, top_ids, _listed_logprobs(scheduled, entries, entry_lps),
                                prompt_logprobs)
        return RunnerOutput(_to_host(out.token_ids), prompt_logprobs=prompt_logprobs)

    def _execute_decode_steps(self, scheduler_output, seeds: list[int], lora_slots: list[int] | None) -> RunnerOutput:
        """A multi-step decode (the scheduler checked that every request can run ahead: one
        pending token each, no sampler entries, logprobs or token masks): num_steps tokens per
        request from one program."""
        scheduled, num_steps = scheduler_output.scheduled, scheduler_output.num_steps
        if num_steps != self.num_scheduler_steps:
            raise ValueError(f"a step of {num_steps} decode steps, but the runner compiles {self.num_scheduler_steps}")
        max_context = max(r.start_position + num_steps for r in scheduled)  # the last step's kv_len
        t, s, p = self.buckets.for_step(len(scheduled), len(scheduled), max_context, self.block_size)
        blobs = jax.device_put((pack_step(scheduled, t, s, p, self.block_size, lora_slots),
                                pack_sampling(scheduled, seeds, s, 0, [()] * len(scheduled))), self.replicated)
        if (t, s, p) not in self._decode_steps:  # only with enforce_eager
            self._compile("decode_steps", (t, s, p))
        sampled, self.kv_cache = self._decode_steps[(t, s, p)](self.params, self.kv_cache, self.kv_scales, *blobs)
        return RunnerOutput(_to_host(sampled))

    def _execute_pooling(self, scheduler_output, lora_slots: list[int] | None) -> RunnerOutput:
        """A pooling runner's step: the hidden states of its tokens on the host, one placeholder
        token id (0) per request."""
        scheduled = scheduler_output.scheduled
        num_tokens = scheduler_output.total_num_scheduled_tokens
        max_context = max(r.start_position + len(r.token_ids) for r in scheduled)
        t, s, p = self.buckets.for_step(num_tokens, len(scheduled), max_context, self.block_size)
        blob = jax.device_put(pack_step(scheduled, t, s, p, self.block_size, lora_slots), self.replicated)
        if (t, s, p, False) not in self._forward:  # only with enforce_eager
            self._compile("forward", (t, s, p, False))
        hidden, self.kv_cache = self._forward[(t, s, p, False)](self.params, self.kv_cache, self.kv_scales, blob)
        # The whole padded array: a slice on the device would be a program of its own per shape.
        hidden = np.asarray(_to_host(hidden)[:num_tokens], np.float32)
        return RunnerOutput(token_ids=np.zeros(len(scheduled), np.int32), hidden=hidden)

    def _run(self, step: "multihost.StepInputs"):
        """The device part of a step: (sampler output, prompt logprobs or None), on device."""
        t, s, p, e, decode_only = step.num_tokens, step.num_seqs, step.pages_per_seq, step.num_entries, step.decode_only
        masked = step.token_bitmask is not None
        forward_blob, sampling_blob, token_bitmask = jax.device_put(
            (step.forward_blob, step.sampling_blob, step.token_bitmask), self.replicated)
        # Programs missing here only with enforce_eager (warmup compiles every shape): compiled on first use.
        if (t, s, p, decode_only) not in self._forward:
            self._compile("forward", (t, s, p, decode_only))
        if (s, e, masked) not in self._sample:
            self._compile("sample", (s, e, masked))
        logits, hidden, self.kv_cache = self._forward[(t, s, p, decode_only)](self.params, self.kv_cache,
                                                                              self.kv_scales, forward_blob)
        out = self._sample[(s, e, masked)](logits, sampling_blob, token_bitmask)
        prompt_logprobs = None
        if step.prompt_targets is not None:
            if t not in self._prompt_logprobs:  # only with enforce_eager
                self._compile("prompt_logprobs", t)
            prompt_logprobs = self._prompt_logprobs[t](self.params, hidden,
                                                       jax.device_put(step.prompt_targets, self.replicated))
        return out, prompt_logprobs

    def follow(self) -> int:
        """On a host other than 0: runs the steps host 0 sends until it stops; returns their number."""
        steps = 0
        while (step := multihost.receive_step(StepMetadata.blob_size, SamplingMetadata.blob_size)) is not None:
            self._run(step)
            steps += 1
        return steps

    def kv_pool_lost(self) -> bool:
        """True when a failed step consumed the donated KV pool (its buffers are deleted)."""
        return any(array.is_deleted() for array in jax.tree.leaves(self.kv_cache))

    # ---- sleep mode: release and take back the KV pool's and the weights' memory -------------

    def release_kv_cache(self) -> None:
        """Frees the KV pool's memory; its contents are gone (allocate_kv_cache makes a new one)."""
        released = 0
        for array in jax.tree.leaves(self.kv_cache):
            released += kv_pool.release_pages(array)
            array.delete()
        self.kv_cache = None
        logger.info("KV cache released (%.2f GiB of host pages)", released / kv_pool.GIB)

    def allocate_kv_cache(self) -> None:
        """A new KV pool of the same spec (zeros where it is read before written)."""
        self.kv_cache = kv_pool.allocate(self.pool_spec, self.kv_sharding)

    def release_weights(self, keep_on_host: bool) -> None:
        """Lets go of the weights (LoRA slots stay), keeping a host copy with `keep_on_host` for
        restore_weights; on CPU the device memory is the host's, so a kept copy stays in place.
        Their memory is freed where the runner held the last reference: arrays a caller passed to
        update_weights (on the same device, so not copied) stay the caller's, untouched."""
        if keep_on_host and self.mesh.devices.flat[0].platform == "cpu":
            return
        base = self._base_params()
        if self._param_shardings is None:  # not released already (a level-1 sleep on a GPU, then level 2)
            self._host_params = jax.device_get(base) if keep_on_host else None
            self._param_shardings = jax.tree.map(lambda x: x.sharding, base)
        elif not keep_on_host:
            self._host_params = None
        self.params = {"lora": self.params["lora"]} if self._has_lora_slots() else {}

    def restore_weights(self) -> bool:
        """Puts the weights kept by release_weights back on the devices; False when they were
        not kept (only update_weights can give the runner weights then)."""
        if not self.weights_released:
            return True
        if self._host_params is None:
            return False
        restored = jax.device_put(self._host_params, self._param_shardings)
        self.params = {**restored, "lora": self.params["lora"]} if self._has_lora_slots() else restored
        self._host_params = self._param_shardings = None
        return True

    @property
    def weights_released(self) -> bool:
        return self._param_shardings is not None

    def _base_params(self):
        """The params without the LoRA slots (which sleep mode leaves in place)."""
        if self._has_lora_slots():
            return {k: v for k, v in self.params.items() if k != "lora"}
        return self.params

    def _has_lora_slots(self) -> bool:
        return isinstance(self.params, dict) and "lora" in self.params

    def update_weights(self, params) -> None:
        """Replaces the params with a pytree of the same structure, shapes and dtypes (no recompile):
        those of the params the runner was built with, or of `self.params` (packed, with pack_params)."""
        if jax.process_count() > 1:
            raise ValueError("update_weights is not supported on a multi-host engine (the other hosts would keep "
                             "the old weights).")
        if "lora" in self.params and "lora" not in params:  # the adapters stay
            params = {**params, "lora": self.params["lora"]}
        expected, pack = self._param_avals, self._pack_params
        if pack is not None and jax.tree.structure(params) == jax.tree.structure(self.params):
            expected, pack = self._abstract(self.params), None  # e.g. a transformed copy of self.params
            params = quantization.refresh_greedy_lm_head(params)  # its int8 operands follow its rows
        old = jax.tree.structure(expected)
        new = jax.tree.structure(params)
        if old != new:
            raise ValueError(f"update_weights: the params tree structure differs from the loaded model's "
                             f"({new} vs {old}).")
        for path_old, path_new in zip(jax.tree.leaves_with_path(expected), jax.tree.leaves_with_path(params)):
            (path, a), (_, b) = path_old, path_new
            if a.shape != b.shape or a.dtype != b.dtype:
                raise ValueError(f"update_weights: {jax.tree_util.keystr(path)} is {b.dtype}{list(b.shape)}, "
                                 f"the model's is {a.dtype}{list(a.shape)}.")
        params = jax.device_put(params, jax.tree.map(lambda x: x.sharding, expected))
        self.params = params if pack is None else pack(params)
        self._host_params = self._param_shardings = None  # new weights supersede any kept by release_weights
        if self._recalibrate_kv is not None:
            self.kv_scales = jax.device_put(self._recalibrate_kv(self.params), self.kv_scale_sharding)


def device_platform() -> str:
    """"gpu" or "cpu" (or another jax platform name) for the default device."""
    platform = jax.devices()[0].platform
    return "gpu" if platform in ("gpu", "cuda", "rocm") else platform


def enable_compilation_cache(cache_dir: str) -> None:
    """Turns on JAX's persistent compilation cache in `cache_dir` ("" leaves it off)."""
    if cache_dir and not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)


def executable_cache_dir(compilation_cache_dir: str) -> str | None:
    """Where compiled programs are kept (`jpaged.executable_cache`): a folder inside JAX's
    compilation cache, off with it."""
    return os.path.join(compilation_cache_dir, "executables") if compilation_cache_dir else None


def scheduler_steps(args) -> int:
    """The decode steps of a multi-step round: --num-scheduler-steps, by default
    DEFAULT_CPU_SCHEDULER_STEPS on CPU and 1 elsewhere; 1 on several hosts, which replay single
    steps only (multihost.StepInputs)."""
    if jax.process_count() > 1:
        return 1
    if args.num_scheduler_steps is not None:
        return args.num_scheduler_steps
    return DEFAULT_CPU_SCHEDULER_STEPS if device_platform() == "cpu" else 1


def build_runner(model_config, params, args, max_model_len: int, devices=None, model=None, *, tokenizer=None,
                 model_path: str | None = None, pooling: bool = False) -> ModelRunner:
    """Builds the mesh, picks the attention backend, places the params, sizes the KV pool (per
    device) and swap space from EngineArgs.

    devices: the engine's devices (a data-parallel replica's slice of jax.devices()); None means
    jax.devices()[:tensor_parallel_size]. model: the Flax module (None: `LlamaForCausalLM(model_config)`).
    For an int8 / fp8 KV cache the scales come from the checkpoint at `model_path`, else from a
    calibration pass over `tokenizer`'s encoding of the built-in text (`jpaged.kv_quantization`).
    pooling: a pooling runner (`ModelRunner`'s pooling).
    """
    enable_compilation_cache(args.compilation_cache_dir)
    tp = args.tensor_parallel_size
    devices = jax.devices()[:tp] if devices is None else list(devices)
    if len(devices) != tp:
        raise ValueError(f"--tensor-parallel-size {tp} needs {tp} devices, but the engine got {len(devices)} "
                         f"(jax sees {jax.device_count()}: {jax.devices()}).")
    mesh = sharding.make_mesh(devices)
    model = llama.LlamaForCausalLM(model_config) if model is None else model
    backend, attention_fn = select_attention(args.attention_backend, device_platform())
    decode_attention_fn = None if pooling else decode_only_attention(backend)
    logger.info("attention backend: %s on %s", backend, ", ".join(map(str, devices)))
    if tp > 1:
        logger.info("tensor parallel over %d devices: %s", tp, sharding.describe(model_config, tp))
    kv_dtype = kv_quantization.page_dtype(args.kv_cache_dtype, model_config.dtype)
    kv_quantization.check_backend(backend, kv_dtype, devices[0])
    # Before sizing: the pool gets what the weights (and the LoRA slots) leave.
    params = jax.device_put(params, sharding.param_shardings(model, params, mesh))
    if args.enable_lora:
        params = {**params, "lora": lora.empty_lora_params(model_config, args.max_loras, args.max_lora_rank,
                                                           NamedSharding(mesh, PartitionSpec()))}
    pack_params = (functools.partial(quantization.pack_linears, dtype=model_config.dtype, with_lm_head=not pooling)
                   if packs_linears(backend, tp, type(model)) else None)
    kv_scales, recalibrate_kv = kv_quantization.kv_cache_scales(model_config, kv_dtype, args.block_size, tokenizer,
                                                                model_path)
    step_bytes = functools.partial(largest_step_bytes, model_config, params, attention_fn, select_kv_writer(backend),
                                   args, max_model_len, kv_dtype, bucket_pages=backend == "reference", mesh=mesh,
                                   model=model)
    pool_spec = kv_pool.size_pool(model_config, args, max_model_len, kv_dtype, devices[0], step_bytes=step_bytes,
                                  kv_shards=sharding.kv_shards(model_config, tp))
    return ModelRunner(model_config, params, pool_spec=pool_spec,
                       num_swap_blocks=kv_pool.num_swap_blocks(model_config, args, kv_dtype),
                       max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=args.max_num_seqs,
                       max_model_len=max_model_len, attention_fn=attention_fn,
                       write_kv_fn=select_kv_writer(backend), bucket_pages=backend == "reference", mesh=mesh,
                       max_entries_per_seq=max_sampler_entries(model_config, args, max_model_len),
                       max_logprobs=args.max_logprobs, decode_attention_fn=decode_attention_fn, model=model,
                       kv_scales=kv_scales, recalibrate_kv=recalibrate_kv, pack_params=pack_params,
                       num_scheduler_steps=1 if pooling else scheduler_steps(args),
                       sampling_kernels=select_sampling_kernels(backend, tp), logprobs_mode=args.logprobs_mode,
                       executable_cache_dir=executable_cache_dir(args.compilation_cache_dir), pooling=pooling)


def packs_linears(backend: str, tp: int, model_class) -> bool:
    """Whether the runner packs the linears for the C++ CPU matmul (`quantization.pack_linears`):
    its library comes with the cpu attention backend, and it runs on one device, where the
    built-in model calls `quantization.linear`."""
    return backend == "cpu" and tp == 1 and model_class is llama.LlamaForCausalLM


def packs_gguf_blocks(args, platform: str, dtype: str, model=None) -> bool:
    """Whether a .gguf's Q4_0 / Q4_1 / Q8_0 tensors should load as they are with --quantization
    unset: where the runner will pack them for the C++ CPU matmul in a float32 step, whose results
    are bit-identical to those of the dequantized weights, from a fifth of their bytes.
    model: the engine's Flax module (None: the built-in one)."""
    if platform != "cpu" or dtype not in ("auto", "float32"):
        return False  # and the C++ library is not built where it cannot be used
    cpu_backend = args.attention_backend in ("auto", "cpu") and cpu_kernels.is_available()
    model_class = llama.LlamaForCausalLM if model is None else type(model)
    return packs_linears("cpu" if cpu_backend else args.attention_backend, args.tensor_parallel_size, model_class)


def max_sampler_entries(model_config, args, max_model_len: int) -> int:
    """The most sampler entries one request can bring: logit_bias, a min_tokens mask over its
    stop_token_ids and EOS ids, one penalty entry per distinct token of its context, its
    logprob_token_ids."""
    return (args.max_logit_bias + args.max_stop_token_ids + len(model_config.eos_token_ids)
            + max_model_len + MAX_LOGPROB_TOKEN_IDS)


def largest_step_bytes(model_config, params, attention_fn, write_kv_fn, args, max_model_len: int, kv_dtype: str, *,
                       bucket_pages: bool, mesh=None, model=None) -> int:
    """Device bytes (per device) the largest bucket's forward plus its sampler need besides the
    weights and the pool (`kv_pool.compiled_step_bytes`), compiled once against a one-sequence
    pool (with the pool donated, the temporaries do not depend on its size). Used to size the
    pool on a GPU. params: arrays or ShapeDtypeStructs, placed on `mesh` (None: one device)."""
    buckets = Buckets.create(max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=args.max_num_seqs,
                             max_model_len=max_model_len, block_size=args.block_size, bucket_pages=bucket_pages)
    t, p = buckets.num_tokens[-1], buckets.pages_per_seq[-1]
    s = buckets.seqs_for_tokens(t)
    mesh = sharding.make_mesh(jax.devices()[:1]) if mesh is None else mesh
    model = llama.LlamaForCausalLM(model_config) if model is None else model
    tp = mesh.shape[sharding.TP_AXIS]
    replicated = NamedSharding(mesh, PartitionSpec())
    kv_sharding = NamedSharding(mesh, sharding.kv_spec(model_config, tp))
    if tp > 1:
        attention_fn, write_kv_fn = sharding.shard_attention(attention_fn, write_kv_fn, mesh, model_config)
    page = jax.ShapeDtypeStruct(kv_pool.KVPoolSpec(p + 1, args.block_size, model_config.num_layers,
                                                   model_config.num_kv_heads, model_config.head_dim,
                                                   kv_dtype).page_shape, kv_dtype, sharding=kv_sharding)
    scale = jax.ShapeDtypeStruct((model_config.num_kv_heads,), jnp.float32,
                                 sharding=NamedSharding(mesh, sharding.kv_scale_spec(model_config, tp)))
    scales = [(scale, scale)] * model_config.num_layers if kv_quantization.is_quantized(kv_dtype) else None
    forward = jax.jit(functools.partial(_forward_step, model=model, attention_fn=attention_fn, write_kv_fn=write_kv_fn),
                      static_argnames=("num_tokens", "num_seqs", "pages_per_seq"), donate_argnums=(1,),
                      out_shardings=None if tp == 1 else (replicated, replicated,
                                                          [(kv_sharding,) * 2] * model_config.num_layers))
    shardings = sharding.param_shardings(model, params, mesh)
    abstract = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), params, shardings)
    blob = jax.ShapeDtypeStruct((StepMetadata.blob_size(t, s, p),), jnp.int32, sharding=replicated)
    compiled = forward.lower(abstract, [(page, page)] * model_config.num_layers, scales, blob, num_tokens=t,
                             num_seqs=s, pages_per_seq=p).compile()
    vocab = model_config.vocab_size
    e = s * max_sampler_entries(model_config, args, max_model_len)  # the largest sampler: all entries, masked
    spec = lambda shape, dtype=jnp.int32: jax.ShapeDtypeStruct(shape, dtype, sharding=replicated)  # noqa: E731
    sampler = jax.jit(functools.partial(_sample_step, max_logprobs=args.max_logprobs,
                                        sampling_kernels=SamplingKernels(),  # the GPU's
                                        logprobs_mode=args.logprobs_mode),
                      static_argnames=("num_seqs", "num_entries")).lower(
        spec((s, vocab), jnp.float32), spec((SamplingMetadata.blob_size(s, e),)),
        spec((s, bitmask_width(vocab))), num_seqs=s, num_entries=e).compile()
    return kv_pool.compiled_step_bytes(compiled.memory_analysis()) + kv_pool.compiled_step_bytes(
        sampler.memory_analysis())
