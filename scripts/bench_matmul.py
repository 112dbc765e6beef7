"""Linear-layer speed on CPU: XLA's dot over [in, out] weights vs the C++ matmul over packed
panels (`pallas_kernels.cpu.packed_matmul`), measured in the same run, calls interleaved.

    python scripts/bench_matmul.py [--dtype float32|bfloat16] [--rows 1 16 64 256 512] [--repeats 9]
    python scripts/bench_matmul.py --weights gguf   # float32 panels vs GGUF-block (q4 / q8) panels
    python scripts/bench_matmul.py --weights q4-tiles   # q4 panels: vector path vs AMX tiles

With --weights gguf (float32 only) the two sides are the packed kernel over float32 panels and
over the same weights as GGUF blocks, kept the way the default .gguf load keeps them: Q4_1-like
q4 panels for the linears, Q8_0-like q8 panels for the lm_head (random values and f16-valued
scales); their outputs must be bit-identical. With --weights q4-tiles the same q4 panels run
on the vector path and with every row on AMX tiles (`vector_rows=0`, the prompt rows' path; on
a CPU without AMX both sides take the vector path); only the 30 layers run.

Two programs per row count, each jitted once per side:
  - "30 layers": the 210 linears of SmolLM2-135M (q, k, v, o, gate, up, down of 30 layers; 425 MB
    of fp32 weights or 212 MB of bf16, each read from memory once per call, as in an engine
    step), chained as the model chains them;
  - "lm_head": the tied 49,152 x 576 lm_head, from the embedding [vocab, hidden] for XLA (the
    engine's einsum) and from its packed copy for the kernel.
Each time is the best of --repeats calls (this machine is shared: the best call is the one least
disturbed); the median is printed next to it. Prints a Markdown table.
"""

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import cpu, reference

HIDDEN, INTERMEDIATE, KV_WIDTH, LAYERS, VOCAB = 576, 1536, 192, 30, 49152
SHAPES = {"q": (HIDDEN, HIDDEN), "k": (HIDDEN, KV_WIDTH), "v": (HIDDEN, KV_WIDTH), "o": (HIDDEN, HIDDEN),
          "gate": (HIDDEN, INTERMEDIATE), "up": (HIDDEN, INTERMEDIATE), "down": (INTERMEDIATE, HIDDEN)}


def xla_dot(x, w):
    return jnp.einsum("mi,io->mo", x, w, preferred_element_type=jnp.float32).astype(x.dtype)


def layers(x, weights, dot):
    """The 7 linears of each layer, chained as in the model (attention replaced by a broadcast)."""
    for w in weights:
        q, k, v = dot(x, w["q"]), dot(x, w["k"]), dot(x, w["v"])
        x = x + dot(q + jnp.tile(k + v, 3), w["o"])
        x = x + dot(jax.nn.silu(dot(x, w["gate"])) * dot(x, w["up"]), w["down"])
    return x


def seconds(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args).block_until_ready()
    return time.perf_counter() - start


def gguf_weights(rng, k, n, bits):
    """(w f32[k, n], (its q4 or q8 panels, their scales as packed_matmul's keywords)) for random
    GGUF-like blocks."""
    f16 = lambda shape, s: (rng.standard_normal(shape) * s).astype(np.float16).astype(np.float32)  # noqa: E731
    scale = f16((k // reference.QUANT_BLOCK, n), 0.004)
    block = lambda a: np.repeat(a, reference.QUANT_BLOCK, axis=0)  # noqa: E731
    if bits == 4:
        nibbles, offset = rng.integers(0, 16, (k, n)).astype(np.uint8), f16(scale.shape, 0.03)
        panels, scale_panels, offset_panels = reference.pack_q4_panels(nibbles, scale, offset)
        return nibbles * block(scale) + block(offset), (panels, dict(scale=scale_panels, offset=offset_panels))
    values = rng.integers(-128, 128, (k, n)).astype(np.int8)
    panels, scale_panels = reference.pack_q8_panels(values, scale)
    return values * block(scale), (panels, dict(scale=scale_panels))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 16, 64, 256, 512])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="of x and the weights (both kernels accumulate in float32)")
    parser.add_argument("--weights", choices=["dense", "gguf", "q4-tiles"], default="dense",
                        help="dense: XLA's dot vs the packed kernel; gguf: the packed kernel over float32 "
                             "panels vs over q4 (linears) / q8 (lm_head) panels of the same weights; "
                             "q4-tiles: q4 panels on the vector path vs on AMX tiles")
    args = parser.parse_args()
    dtype = jnp.dtype(args.dtype)
    if args.weights != "dense" and dtype != jnp.float32:
        parser.error(f"--weights {args.weights} compares float32 steps")
    if not cpu.is_available():
        raise SystemExit(f"the C++ CPU kernels are unavailable: {cpu.load_error()}")
    rng = np.random.default_rng(0)

    def draw(*shape):
        return jnp.asarray(rng.standard_normal(shape, np.float32) * 0.02, dtype)

    pack = jax.jit(reference.pack_panels)
    widths = {name: shape[1] for name, shape in SHAPES.items()}

    @functools.partial(jax.jit, static_argnames="tiles")
    def packed_layers(x, operands, tiles=False):  # per layer {name: (panels, scales)}; the widths stay static
        rows = {"vector_rows": 0} if tiles else {}
        return layers(x, [{n: (p, widths[n], s) for n, (p, s) in layer.items()} for layer in operands],
                      lambda x, w: cpu.packed_matmul(x, w[0], w[1], **w[2], **rows).astype(x.dtype))

    @jax.jit
    def packed_lm_head(x, operands):
        return cpu.packed_matmul(x, operands[0], VOCAB, **operands[1])

    if args.weights == "dense":
        columns = ("XLA dot", "packed kernel")
        plain = [{name: draw(*shape) for name, shape in SHAPES.items()} for _ in range(LAYERS)]
        packed = [{name: pack(w) for name, w in layer.items()} for layer in plain]
        embed = draw(VOCAB, HIDDEN)
        lm_head = pack(embed.T)
        programs = {
            "30 layers": (jax.jit(lambda x, w: layers(x, w, xla_dot)), plain,
                          packed_layers, [{n: (a, {}) for n, a in layer.items()} for layer in packed]),
            "lm_head": (jax.jit(lambda x, e: jnp.einsum("nh,vh->nv", x, e, preferred_element_type=jnp.float32)),
                        embed, packed_lm_head, (lm_head, {})),
        }
    elif args.weights == "q4-tiles":
        columns = ("q4, vector path", "q4, AMX tiles")
        quantized = [{n: gguf_weights(rng, *shape, bits=4)[1] for n, shape in SHAPES.items()} for _ in range(LAYERS)]
        programs = {"30 layers": (packed_layers, quantized, functools.partial(packed_layers, tiles=True), quantized)}
    else:
        columns = ("float32 panels", "q4 / q8 panels")
        quantized = [{n: gguf_weights(rng, *shape, bits=4) for n, shape in SHAPES.items()} for _ in range(LAYERS)]
        lm_w, lm_operands = gguf_weights(rng, HIDDEN, VOCAB, bits=8)
        programs = {
            "30 layers": (packed_layers, [{n: (pack(jnp.asarray(w)), {}) for n, (w, _) in layer.items()}
                                          for layer in quantized],
                          packed_layers, [{n: operands for n, (_, operands) in layer.items()} for layer in quantized]),
            "lm_head": (packed_lm_head, (pack(jnp.asarray(lm_w)), {}), packed_lm_head, lm_operands),
        }
    print(f"| program | rows | {columns[0]}, ms (best / median) | {columns[1]}, ms | speed-up (best) |")
    print("|---|---|---|---|---|")
    for name, (base_fn, base_w, packed_fn, packed_w) in programs.items():
        for rows in args.rows:
            x = draw(rows, HIDDEN)
            tolerance = 1e-3 if dtype == jnp.float32 else 3e-2  # bf16 activations round between layers
            if args.weights == "gguf":
                tolerance = 0  # the same dequantized values, multiplied in the same order
            if args.weights == "q4-tiles":
                tolerance = 1e-4  # the same weights, sums rounded differently
            np.testing.assert_allclose(np.asarray(packed_fn(x, packed_w), np.float32),
                                       np.asarray(base_fn(x, base_w), np.float32),
                                       rtol=tolerance, atol=tolerance)  # also the warm-up call of each
            base_times, packed_times = [], []
            for _ in range(args.repeats):  # interleaved, so both see the same neighbours
                base_times.append(seconds(base_fn, x, base_w))
                packed_times.append(seconds(packed_fn, x, packed_w))
            xb, pb = min(base_times), min(packed_times)
            print(f"| {name} | {rows} | {xb * 1e3:.1f} / {np.median(base_times) * 1e3:.1f} | "
                  f"{pb * 1e3:.1f} / {np.median(packed_times) * 1e3:.1f} | {xb / pb:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
