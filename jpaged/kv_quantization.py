"""Quantized KV cache (--kv-cache-dtype int8 / fp8 / fp8_e4m3 / fp8_e5m2): page dtypes and scales.

Pages of a 1-byte dtype hold K / k_scale and V / v_scale (see `pallas_kernels.reference`), with
static scales f32[num_kv_heads] per layer. Where they come from (`kv_cache_scales`):
1. the checkpoint, when its safetensors hold `*.self_attn.k_scale` / `*.self_attn.v_scale` for
   every layer (as vLLM and compressed-tensors store them: a scalar or one value per KV head);
2. otherwise calibration at start (`calibrate`): one paged forward (reference attention, fp32
   pool) over a short built-in text (chat-formatted when the tokenizer has a template, so special tokens are seen), then
   scale = absmax of that layer and head's K (or V) x KV_SCALE_MARGIN / the dtype's largest
   value (127 for int8, 448 for e4m3, 57344 for e5m2). Values beyond that are clipped.
vLLM's default for fp8 is scale 1.0; calibrated scales agree better here (docs/quantization.md).
"""

import functools
import glob
import logging
import os

import jax
import jax.numpy as jnp
import jinja2
import numpy as np

from jpaged.config import KV_CACHE_DTYPES

logger = logging.getLogger(__name__)

# --kv-cache-dtype name -> page dtype (jnp name); auto means the model's dtype.
_PAGE_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "int8": "int8", "fp8": "float8_e4m3fn",
                "fp8_e4m3": "float8_e4m3fn", "fp8_e5m2": "float8_e5m2"}
# Largest magnitude each quantized page dtype stores.
QMAX = {"int8": 127.0, "float8_e4m3fn": 448.0, "float8_e5m2": 57344.0}
# Headroom over the calibration absmax, per page dtype (docs/quantization.md has the measurements).
KV_SCALE_MARGIN = {"int8": 1.0, "float8_e4m3fn": 1.2, "float8_e5m2": 1.2}

CALIBRATION_MESSAGES = [
    {"role": "system", "content": "You are a careful assistant. Answer briefly and precisely."},
    {"role": "user", "content": "Which river flows through Vienna, and how long is it? Also convert "
                                "72 degrees Fahrenheit to Celsius, showing the steps."},
    {"role": "assistant", "content": "The Danube flows through Vienna; it is about 2,850 km long. "
                                     "(72 - 32) x 5 / 9 = 22.2, so 72 F is roughly 22 C."},
    {"role": "user", "content": "Write a Python function that returns the n-th prime, then summarise "
                                "the plot of a story about a lighthouse keeper in two sentences."},
    {"role": "assistant", "content": "def nth_prime(n):\n    found, k = 0, 1\n    while found < n:\n"
                                     "        k += 1\n        if all(k % d for d in range(2, int(k**0.5) + 1)):\n"
                                     "            found += 1\n    return k\n\nA keeper alone on a rock "
                                     "logs ships for forty years. When the light is automated, he rows "
                                     "ashore and finds the town has kept every one of his letters."},
    {"role": "user", "content": "Translate 'good morning, the train leaves at 7:45' into French, German "
                                "and Spanish; list them as JSON with keys fr, de, es."},
]


def page_dtype(kv_cache_dtype: str, model_dtype: str) -> str:
    """The pool's page dtype (a jnp dtype name) for a --kv-cache-dtype value."""
    if kv_cache_dtype == "auto":
        return model_dtype
    if kv_cache_dtype not in _PAGE_DTYPES:
        raise ValueError(f"kv_cache_dtype={kv_cache_dtype!r} is not one of {list(KV_CACHE_DTYPES)}.")
    return _PAGE_DTYPES[kv_cache_dtype]


def is_quantized(dtype: str) -> bool:
    """Whether pages of this dtype need scales (int8 / fp8)."""
    return jnp.dtype(dtype).itemsize == 1


def calibration_token_ids(tokenizer) -> list[int]:
    """The built-in calibration text as token ids (chat-formatted when the tokenizer can)."""
    try:
        text = tokenizer.apply_chat_template(CALIBRATION_MESSAGES, add_generation_prompt=True)
        return tokenizer.encode(text, add_special_tokens=False)
    except (ValueError, jinja2.TemplateError):  # no chat template, or one that refuses these roles
        return tokenizer.encode("\n\n".join(m["content"] for m in CALIBRATION_MESSAGES))


def calibrate(params, config, token_ids: list[int], dtype: str, block_size: int = 16,
              margin: float | None = None) -> list[tuple[jax.Array, jax.Array]]:
    """Per layer (k_scale, v_scale), each f32[num_kv_heads]: absmax x margin (None:
    KV_SCALE_MARGIN[dtype]) / QMAX[dtype] of the K and V that one paged forward over `token_ids`
    (one sequence from position 0) writes into an fp32 pool."""
    dtype = jnp.dtype(dtype).name
    margin = KV_SCALE_MARGIN[dtype] if margin is None else margin
    found = _kv_absmax(params, jnp.asarray(token_ids, jnp.int32), config=config, block_size=block_size)
    # A head that never saw a nonzero value keeps scale 1 (any scale stores its zeros exactly).
    return [tuple(jnp.where(m > 0, m * margin / QMAX[dtype], 1.0).astype(jnp.float32) for m in pair)
            for pair in found]


@functools.partial(jax.jit, static_argnames=("config", "block_size"))
def _kv_absmax(params, token_ids, *, config, block_size: int):
    """Per layer (|K| max, |V| max) f32[num_kv_heads] over token_ids i32[n] at positions 0..n-1,
    written by llama.forward into an fp32 pool (reference attention; block 0 stays unused).
    Module-level, so update_weights recalibrates without compiling again."""
    from jpaged.models import llama
    from jpaged.models.attention_metadata import AttentionMetadata
    from pallas_kernels import reference

    n = token_ids.shape[0]
    num_pages = -(-n // block_size)
    shape = reference.get_kv_cache_shape(num_pages + 1, block_size, config.num_kv_heads, config.head_dim)
    meta = AttentionMetadata(
        slot_mapping=jnp.arange(block_size, block_size + n, dtype=jnp.int32),
        block_tables=jnp.arange(1, num_pages + 1, dtype=jnp.int32)[None],
        kv_lens=jnp.asarray([n], jnp.int32), cu_q_lens=jnp.asarray([0, n], jnp.int32))
    cache = [(jnp.zeros(shape, jnp.float32), jnp.zeros(shape, jnp.float32)) for _ in range(config.num_layers)]
    _, cache = llama.forward(params, config, token_ids, jnp.arange(n, dtype=jnp.int32), cache, meta,
                             reference.ragged_paged_attention, reference.write_kv)
    return [(jnp.abs(k).max(axis=(0, 2, 3)), jnp.abs(v).max(axis=(0, 2, 3))) for k, v in cache]


def checkpoint_scales(model_path: str, num_layers: int, num_kv_heads: int):
    """Per layer (k_scale, v_scale) f32[num_kv_heads] from an HF folder's safetensors, or None
    when it has none (or not for every layer). Scalars are broadcast over the heads."""
    files = sorted(glob.glob(os.path.join(model_path, "*.safetensors"))) if os.path.isdir(model_path) else []
    if not files:
        return None
    from safetensors import safe_open

    found = {}
    for path in files:
        with safe_open(path, framework="numpy") as f:
            for name in f.keys():
                parts = name.split(".")
                if parts[-1] in ("k_scale", "v_scale") and "layers" in parts:
                    layer = int(parts[parts.index("layers") + 1])
                    found[(layer, parts[-1])] = np.asarray(f.get_tensor(name), np.float32).reshape(-1)
    if not found:
        return None
    if len(found) != 2 * num_layers:
        logger.warning("the checkpoint has k_scale/v_scale for only some layers; calibrating the KV scales instead")
        return None
    scales = []
    for layer in range(num_layers):
        pair = []
        for key in ("k_scale", "v_scale"):
            value = found[(layer, key)]
            if value.size not in (1, num_kv_heads):
                raise ValueError(f"{model_path}: layer {layer} {key} has {value.size} values; expected 1 or "
                                 f"num_kv_heads={num_kv_heads}")
            pair.append(jnp.asarray(np.broadcast_to(value, (num_kv_heads,)), jnp.float32))
        scales.append(tuple(pair))
    return scales


def kv_cache_scales(config, dtype: str, block_size: int, tokenizer, model_path: str | None):
    """(kv_scales, calibrate) for a pool of `dtype` pages: (None, None) unless int8 / fp8.

    kv_scales: per layer (k_scale, v_scale) f32[num_kv_heads] from the checkpoint at
    `model_path`, and calibrate None; or kv_scales None and calibrate: params -> calibrated
    kv_scales over `tokenizer`'s encoding of the built-in text, which the runner calls on the
    params its steps run (at start and in update_weights).
    """
    if not is_quantized(dtype):
        return None, None
    found = checkpoint_scales(model_path, config.num_layers, config.num_kv_heads) if model_path else None
    if found is not None:
        logger.info("KV cache %s: k_scale / v_scale from the checkpoint", dtype)
        return found, None
    if tokenizer is None:
        raise ValueError(f"a {dtype} KV cache needs scales: the checkpoint has none and no tokenizer was "
                         f"given to calibrate them.")
    ids = calibration_token_ids(tokenizer)
    logger.info("KV cache %s: k_scale / v_scale calibrated on %d tokens (absmax x %g / %g per layer and KV head)",
                dtype, len(ids), KV_SCALE_MARGIN[dtype], QMAX[dtype])
    return None, functools.partial(calibrate, config=config, token_ids=ids, dtype=dtype, block_size=block_size)


def check_backend(backend: str, dtype: str, device) -> None:
    """Fails, saying what would work, when the attention backend cannot read `dtype` pages on
    `device`: Triton converts fp8 e4m3 only on compute capability >= 8.9 (Ada, Hopper)."""
    if backend != "pallas" or jnp.dtype(dtype) != jnp.dtype("float8_e4m3fn"):
        return
    capability = getattr(device, "compute_capability", None)
    if capability is not None and tuple(int(x) for x in str(capability).split(".")) < (8, 9):
        raise ValueError(
            f"--kv-cache-dtype fp8 (e4m3) needs compute capability >= 8.9 for the pallas attention "
            f"backend; this GPU ({device.device_kind}) has {capability}. Use --kv-cache-dtype fp8_e5m2 "
            f"or int8, or --attention-backend reference.")
