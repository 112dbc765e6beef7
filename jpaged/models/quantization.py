"""Weight leaves other than plain arrays, one `linear` over all of them, one embedding lookup.

A weight leaf of the params pytree is a plain array (linears [in, out], the embedding
[vocab, hidden]), a `QuantizedWeight`, or a `PackedWeight` (a float32 or bfloat16 linear, or a
GGUF-block one computed in float32, repacked for the C++ CPU matmul kernel by `pack_linears`,
which the runner applies on CPU). A QuantizedWeight
always stores its rows as OUTPUT channels (HF's and GGUF's [out, in] orientation), so one layout
serves a linear, the embedding gather (a row per token) and the tied lm_head (a row per
vocabulary entry).

Formats (`QuantizedWeight.format`):
  int8   data i8[out, in], scale f32[out]: w = data * scale (per output channel, symmetric).
  fp8    data float8_e4m3fn[out, in], scale f32[out]: the same with e4m3 values (GPU only).
  q8_0   GGUF Q8_0: data i8[out, in], scale f16[out, in/32]: w = data * scale of its 32-block.
  q4_0   GGUF Q4_0: data u8[out, in/2], scale f16[out, in/32]: each 16-byte group holds a
         block's 32 values, element j in the low nibble of byte j and element j+16 in the high
         nibble; w = (nibble - 8) * scale.
  q4_1   GGUF Q4_1: as q4_0 plus offset f16[out, in/32]: w = nibble * scale + offset.

Dequantizing reproduces gguf.quants.dequantize bit for bit (f16 scales widened to f32, the same
operations in the same order), so a kept-quantized GGUF computes with the exact weights the
dequantize-at-load path would hold.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels.cpu as cpu_kernels
from pallas_kernels import reference

# --quantization values (vLLM's names). gguf: keep a GGUF file's Q8_0/Q4_0/Q4_1 blocks.
METHODS = ("int8", "fp8", "gguf")
GGUF_FORMATS = ("q8_0", "q4_0", "q4_1")
GGUF_BLOCK = 32  # values per GGUF quantization block (Q8_0, Q4_0, Q4_1)
# Dequantized values per chunk of a GGUF-block linear: 2.25 MiB of f32, about one core's L2.
_CHUNK_VALUES = 1024 * 576
_QMAX = {"int8": 127.0, "fp8": float(jnp.finfo(jnp.float8_e4m3fn).max)}  # 448 for e4m3


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    """A weight matrix of logical shape [out, in] kept quantized (see the module docstring)."""

    data: jax.Array  # i8 | float8_e4m3fn [out, in], or u8[out, in/2] for q4_*
    scale: jax.Array  # f32[out] (int8, fp8) or f16[out, in/32] (GGUF)
    offset: jax.Array | None  # f16[out, in/32] for q4_1, else None
    format: str = dataclasses.field(metadata=dict(static=True))

    @property
    def shape(self) -> tuple[int, int]:
        """The logical [out, in] shape."""
        out, cols = self.data.shape
        return out, cols * 2 if self.format in ("q4_0", "q4_1") else cols

    @property
    def nbytes(self) -> int:
        return sum(int(a.nbytes) for a in (self.data, self.scale, self.offset) if a is not None)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PackedWeight:
    """A linear weight [in, out] as the CPU matmul kernel's column panels: float32 or bfloat16
    (`pallas_kernels.reference.pack_panels`: panels f32[ceil(out / 48), in, 48] or
    bf16[ceil(out / 48), in / 2, 48, 2]), or GGUF blocks for float32 x (`pack_q4_panels`: u8
    panels [ceil(out / 48), in / 2, 48], scale and offset f32[ceil(out / 48), in / 32, 48];
    `pack_q8_panels`: i8 panels [ceil(out / 48), in, 48] and scale)."""

    panels: jax.Array
    out_features: int = dataclasses.field(metadata=dict(static=True))
    scale: jax.Array | None = None  # quantized panels only
    offset: jax.Array | None = None  # q4 panels only

    @property
    def shape(self) -> tuple[int, int]:
        """The logical [in, out] shape."""
        rows_per_entry = 2 if self.panels.ndim == 4 or self.panels.dtype == jnp.uint8 else 1
        return self.panels.shape[1] * rows_per_entry, self.out_features


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class GreedyLmHead:
    """A Q8_0 or float32 lm_head's operands for the C++ kernel that finds greedy tokens without
    computing every logit (`pallas_kernels.cpu.greedy_lm_head`): `reference.pack_greedy_lm_head`'s
    values, scale and bound, and the lm_head's own rows (the tied embedding's, not copied)."""

    values: jax.Array  # u8[ceil(vocab / 16), hidden / 4, 16, 4]
    scale: jax.Array  # f32[ceil(vocab / 16), hidden / 32, 16]
    bound: jax.Array  # f32[ceil(vocab / 16), hidden / 32, 16]
    error: jax.Array | None  # f32[ceil(vocab / 16), hidden / 32, 16] for float32 rows, else None
    rows: jax.Array  # i8[vocab, hidden] (Q8_0) or f32[vocab, hidden]
    row_scale: jax.Array | None  # f16[vocab, hidden / 32] (Q8_0), else None


def check_method(method: str | None, platform: str | None = None) -> None:
    """ValueError saying what works when `method` is unknown or `platform` (a jax platform name;
    None: not checked) cannot run it."""
    works = ("int8 (weight-only, per-channel scales, any checkpoint), fp8 (e4m3, GPU only) or gguf (keep a "
             ".gguf file's Q8_0/Q4_0/Q4_1 blocks); compressed-tensors int8 checkpoints load without the flag")
    if method is not None and method not in METHODS:
        raise ValueError(f"quantization={method!r} is not supported by jpaged; use {works}.")
    if method == "fp8" and platform is not None and platform not in ("gpu", "cuda", "rocm"):
        raise ValueError(f"quantization='fp8' needs a GPU: XLA on {platform} has no fp8 matmul; "
                         "use --quantization int8 (or gguf for a .gguf model) instead.")


def linear(x, weight, bias=None, out_dtype=None, num_rows=None, num_decode_rows=None):
    """x [..., in] @ weight (+ bias [out]) with float32 accumulation, returned in out_dtype
    (default x.dtype).

    num_rows: None, or an i32 scalar saying that only the first num_rows rows of x (flattened
    over its leading dims) are real: the rows after them are padding, whose results are
    unspecified (the C++ kernel skips them and returns bias; the other paths compute them).
    num_decode_rows: None, or an i32 scalar: x's first num_decode_rows rows are decode tokens
    and the rows after them (up to num_rows) prompt tokens. It picks the C++ kernel's path, not
    the math: q4 weights multiply prompt rows on AMX tiles where the CPU has them (sums rounded
    differently from the vector path's, as close to the exact ones), so a token's result depends
    on its role, never on the batch it runs in (`pallas_kernels.cpu.packed_matmul`'s vector_rows).
    None: every row on the vector path.

    weight: a plain [in, out] array, a PackedWeight (x of its dtype: the C++ CPU kernel) or a
    QuantizedWeight of logical shape [out, in]. int8/fp8 weights enter the dot converted to
    x.dtype and their per-channel scale multiplies the f32 result; GGUF block formats are
    dequantized to x.dtype first (their scales vary along `in`).
    """
    if isinstance(weight, PackedWeight):
        lead, k = x.shape[:-1], x.shape[-1]
        y = cpu_kernels.packed_matmul(x.reshape(-1, k), weight.panels, weight.out_features, num_rows,
                                      scale=weight.scale, offset=weight.offset, vector_rows=num_decode_rows)
        y = y.reshape(*lead, weight.out_features)
    elif not isinstance(weight, QuantizedWeight):
        y = jnp.einsum("...i,io->...o", x, weight, preferred_element_type=jnp.float32)
    elif weight.format in _QMAX:
        y = jnp.einsum("...i,oi->...o", x, weight.data.astype(x.dtype), preferred_element_type=jnp.float32)
        y = y * weight.scale
    else:
        y = _block_linear(x, weight)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y.astype(out_dtype or x.dtype)


def _block_linear(x, weight: QuantizedWeight):
    """f32 x [..., in] @ a GGUF-block weight, dequantized _CHUNK_ROWS output rows at a time so that
    each dequantized chunk stays in cache until its dot reads it (a whole f32 copy would not)."""
    out, cols = weight.shape
    rows = max(d for d in range(1, out + 1) if out % d == 0 and d * cols <= _CHUNK_VALUES)
    if rows == out:
        return jnp.einsum("...i,oi->...o", x, dequantize(weight, x.dtype), preferred_element_type=jnp.float32)
    chunks = jax.tree.map(lambda a: a.reshape(out // rows, rows, *a.shape[1:]), weight)  # [chunks, rows, ...]
    y = jax.lax.map(lambda w: jnp.einsum("...i,oi->...o", x, dequantize(w, x.dtype), preferred_element_type=jnp.float32),
                    chunks)  # [chunks, ..., rows]
    return jnp.moveaxis(y, 0, -2).reshape(*x.shape[:-1], out)


def greedy_token_ids(hidden, weight: GreedyLmHead, num_rows=None):
    """i32[n]: each row's argmax over `linear(hidden, PackedWeight of the same lm_head)` (the
    first index on ties), from the C++ kernel that skips the entries that cannot win.
    hidden f32[n, in]; rows from num_rows (an i32 scalar; None: n) on get 0."""
    rows = hidden.shape[0] if num_rows is None else num_rows
    return cpu_kernels.greedy_lm_head(hidden, rows, weight.values, weight.scale, weight.bound, weight.error,
                                      weight.rows, weight.row_scale)[0]


def embed(table, token_ids, dtype):
    """Rows of the embedding `table` ([vocab, hidden] array or QuantizedWeight) for token_ids
    i32[...], as dtype [..., hidden]. A quantized table is gathered first, then dequantized."""
    if not isinstance(table, QuantizedWeight):
        return jnp.take(table, token_ids, axis=0).astype(dtype)
    rows = jax.tree.map(lambda a: jnp.take(a, token_ids, axis=0), table)
    return dequantize(rows, dtype)


def dequantize(weight: QuantizedWeight, dtype=jnp.float32):
    """The logical [..., out, in] weight in dtype (leading axes: gathered rows)."""
    if weight.format in _QMAX:
        return (weight.data.astype(jnp.float32) * weight.scale[..., None]).astype(dtype)
    lead = weight.data.shape[:-1]
    blocks = weight.scale.shape[-1]
    scale = weight.scale.astype(jnp.float32)[..., None]  # [..., blocks, 1]
    if weight.format == "q8_0":
        values = weight.data.reshape(*lead, blocks, GGUF_BLOCK).astype(jnp.float32)
        w = scale * values
    else:
        packed = weight.data.reshape(*lead, blocks, GGUF_BLOCK // 2)
        nibbles = jnp.concatenate([packed & 0xF, packed >> 4], axis=-1)  # [..., blocks, 32]
        if weight.format == "q4_0":
            w = scale * (nibbles.astype(jnp.int8) - 8).astype(jnp.float32)
        else:
            w = scale * nibbles.astype(jnp.float32) + weight.offset.astype(jnp.float32)[..., None]
    return w.reshape(*lead, blocks * GGUF_BLOCK).astype(dtype)


def quantize(w_out_in, fmt: str) -> QuantizedWeight:
    """Per-output-channel symmetric int8 or fp8 from a float [out, in] numpy array (host side).

    scale = max|row| / qmax (127 for int8, 448 for e4m3); int8 rounds to nearest. An all-zero
    row gets scale 1 so that it dequantizes to zeros.
    """
    w = np.asarray(w_out_in, np.float32)
    amax = np.abs(w).max(axis=1)
    scale = np.where(amax > 0, amax / _QMAX[fmt], 1.0).astype(np.float32)
    scaled = w / scale[:, None]
    if fmt == "int8":
        data = np.clip(np.rint(scaled), -127, 127).astype(np.int8)
    else:
        data = scaled.astype(jnp.float8_e4m3fn)
    return QuantizedWeight(data=jnp.asarray(data), scale=jnp.asarray(scale), offset=None, format=fmt)


def from_gguf_blocks(raw: np.ndarray, fmt: str) -> QuantizedWeight:
    """A QuantizedWeight over a GGUF tensor's bytes u8[out, bytes per row] (Q8_0, Q4_0, Q4_1),
    split into its fields without changing a value."""
    out = raw.shape[0]
    header = {"q8_0": 2, "q4_0": 2, "q4_1": 4}[fmt]  # f16 d (and f16 m for q4_1) lead each block
    block_bytes = header + (GGUF_BLOCK if fmt == "q8_0" else GGUF_BLOCK // 2)
    blocks = np.ascontiguousarray(raw).reshape(out, -1, block_bytes)
    scale = blocks[..., 0:2].copy().view(np.float16)[..., 0]  # [out, blocks]
    offset = blocks[..., 2:4].copy().view(np.float16)[..., 0] if fmt == "q4_1" else None
    data = blocks[..., header:].reshape(out, -1).copy()
    if fmt == "q8_0":
        data = data.view(np.int8)
    return QuantizedWeight(data=jnp.asarray(data), scale=jnp.asarray(scale),
                           offset=None if offset is None else jnp.asarray(offset), format=fmt)


def quantize_params(params: dict, fmt: str) -> dict:
    """The params with every linear (a layer's "*_proj" [in, out] array) quantized to fmt ("int8"
    or "fp8") per output channel; leaves that are already QuantizedWeight are kept as they are.

    The embedding and lm_head stay in the model dtype (docs/quantization.md: measured when XLA:CPU
    still materialised the converted weight, the int8 lm_head made the logits 4x slower).
    """
    def convert(layer):
        return {k: quantize(np.asarray(v).T, fmt) if k.endswith("_proj") and not isinstance(v, QuantizedWeight)
                else v for k, v in layer.items()}

    return {**params, "layers": [convert(layer) for layer in params["layers"]]}


def pack_linears(params: dict, dtype="float32", with_lm_head: bool = True) -> dict:
    """The params with their linears (a layer's "*_proj" and the "lm_head") as PackedWeights for
    the C++ CPU matmul kernel: float32 or bfloat16 [in, out] arrays (bfloat16 ones with an even
    `in`), and, when the step computes in float32 (`dtype`), GGUF Q4_0 / Q4_1 / Q8_0
    QuantizedWeights, which keep their values and scales (the kernel's results are bit-identical
    to those of the dequantized weights). Other leaves (int8 / fp8 weights, norms) are kept. An
    embedding tied to the lm_head stays for the token lookup and gets a packed "lm_head" copy of
    its transpose (vocab x hidden elements more, or its blocks again). In a float32 step, a Q8_0
    lm_head or a tied float32 embedding also gets "lm_head_greedy" (`GreedyLmHead`, vocab x hidden
    bytes more) where the CPU runs `pallas_kernels.cpu.greedy_lm_head`. with_lm_head False (a
    pooling runner, which computes no logits): neither copy."""
    gguf = jnp.dtype(dtype) == jnp.float32

    def pack(name, w):
        if not (name.endswith("_proj") or name == "lm_head"):
            return w
        if isinstance(w, QuantizedWeight):
            return _pack_gguf(w) if gguf and w.format in GGUF_FORMATS else w
        if not _is_packable(w):
            return w
        return PackedWeight(panels=_pack_panels(w), out_features=w.shape[1])

    packed = {name: pack(name, w) for name, w in params.items() if name != "layers"}
    packed["layers"] = [{name: pack(name, w) for name, w in layer.items()} for layer in params["layers"]]
    embed = params["embed"]
    if not with_lm_head:
        return packed
    if gguf and cpu_kernels.greedy_lm_head_supported():
        greedy = _greedy_lm_head(params)
        if greedy is not None:
            packed["lm_head_greedy"] = greedy
    if "lm_head" not in params:
        lm_head = pack("lm_head", embed if isinstance(embed, QuantizedWeight) else embed.T)  # [hidden, vocab] to x
        if isinstance(lm_head, PackedWeight):
            packed["lm_head"] = lm_head
    return packed


def _greedy_lm_head(params: dict) -> GreedyLmHead | None:
    """The GreedyLmHead of the params' lm_head when its rows are entries: a Q8_0 QuantizedWeight
    ([vocab, hidden], tied or not) or a tied float32 embedding; None for anything else (an untied
    float lm_head is [hidden, vocab], and its rows would be a copy)."""
    lm_head = params.get("lm_head", params["embed"])
    if isinstance(lm_head, QuantizedWeight):
        return _greedy_from_rows(lm_head.data, lm_head.scale) if lm_head.format == "q8_0" else None
    if "lm_head" in params or lm_head.dtype != jnp.float32 or lm_head.shape[1] % GGUF_BLOCK:
        return None
    return _greedy_from_rows(lm_head, None)


def _greedy_from_rows(rows, row_scale) -> GreedyLmHead:
    """A GreedyLmHead over rows i8[vocab, hidden] with f16 scales, or f32 rows (row_scale None)."""
    packed = _pack_greedy(rows) if row_scale is None else _pack_greedy(rows, row_scale)
    return GreedyLmHead(*packed, rows=rows, row_scale=row_scale)


def refresh_greedy_lm_head(params: dict) -> dict:
    """The params with "lm_head_greedy" (if any) packed again from its own rows: for a
    transformed copy of packed params, whose derived int8 operands a transformation would not
    keep consistent with the rows."""
    greedy = params.get("lm_head_greedy")
    if greedy is None:
        return params
    return {**params, "lm_head_greedy": _greedy_from_rows(greedy.rows, greedy.row_scale)}


def _is_packable(w) -> bool:
    """A plain float32 array, or bfloat16 [in, out] with `in` even (the kernel pairs its rows)."""
    if isinstance(w, (QuantizedWeight, PackedWeight)):
        return False
    return w.dtype == jnp.float32 or w.dtype == jnp.bfloat16 and w.ndim == 2 and w.shape[0] % 2 == 0


_pack_panels = jax.jit(reference.pack_panels)
_pack_greedy = jax.jit(reference.pack_greedy_lm_head)


@jax.jit
def _gguf_panels(weight: QuantizedWeight):
    """q4 or q8 panel arrays (values, scale[, offset]) of a GGUF-block [out, in] weight, for x @ w
    with w [in, out]: the same values and f16 scales widened to f32, so nothing is rounded."""
    out, cols = weight.shape
    scale = weight.scale.astype(jnp.float32)  # [out, blocks]
    if weight.format == "q8_0":
        return reference.pack_q8_panels(weight.data.T, scale.T)
    packed = weight.data.reshape(out, -1, GGUF_BLOCK // 2)  # a block's 32 values in 16 bytes
    nibbles = jnp.concatenate([packed & 0xF, packed >> 4], axis=-1).reshape(out, cols)
    # Q4_0's w = (nibble - 8) * scale is nibble * scale + (-8 * scale), exactly: every term is exact.
    offset = -8.0 * scale if weight.format == "q4_0" else weight.offset.astype(jnp.float32)
    return reference.pack_q4_panels(nibbles.T, scale.T, offset.T)


def _pack_gguf(weight: QuantizedWeight) -> PackedWeight:
    """A GGUF-block QuantizedWeight [out, in] as q4 / q8 panels for the C++ kernel."""
    panels, scale, *offset = _gguf_panels(weight)
    return PackedWeight(panels=panels, out_features=weight.shape[0], scale=scale,
                        offset=offset[0] if offset else None)


def compiler_options(params, platform: str) -> dict:
    """XLA options for programs that take `params`: on CPU with int8/fp8 weights, let YNNPACK fuse
    elementwise ops (the weight's conversion) into its dot fusions. XLA:CPU's default converts
    each weight to a whole f32 copy before the dot; fused, int8 weights decode as fast as fp32
    (docs/quantization.md). Results are unchanged. GGUF blocks are dequantized in cache-sized
    chunks instead (`_block_linear`), which the fusion slows down, so they keep XLA's defaults."""
    formats = {w.format for w in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, QuantizedWeight))
               if isinstance(w, QuantizedWeight)}
    if platform != "cpu" or not formats & set(_QMAX):
        return {}
    return {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_ELTWISE"}


def param_bytes(params) -> int:
    """Bytes of every array in a params pytree (quantized leaves count data, scales and offsets)."""
    return sum(int(a.nbytes) for a in jax.tree.leaves(params))
