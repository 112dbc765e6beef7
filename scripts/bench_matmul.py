"""Linear-layer speed on CPU: XLA's dot over [in, out] weights vs the C++ matmul over packed
panels (`pallas_kernels.cpu.packed_matmul`), measured in the same run, calls interleaved.

    python scripts/bench_matmul.py [--dtype float32|bfloat16] [--rows 1 16 64 256 512] [--repeats 9]

Two programs per row count, each jitted once:
  - "30 layers": the 210 linears of SmolLM2-135M (q, k, v, o, gate, up, down of 30 layers; 425 MB
    of fp32 weights or 212 MB of bf16, each read from memory once per call, as in an engine
    step), chained as the model chains them;
  - "lm_head": the tied 49,152 x 576 lm_head, from the embedding [vocab, hidden] for XLA (the
    engine's einsum) and from its packed copy for the kernel.
Each time is the best of --repeats calls (this machine is shared: the best call is the one least
disturbed); the median is printed next to it. Prints a Markdown table.
"""

import argparse
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 16, 64, 256, 512])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="of x and the weights (both kernels accumulate in float32)")
    args = parser.parse_args()
    dtype = jnp.dtype(args.dtype)
    if not cpu.is_available():
        raise SystemExit(f"the C++ CPU kernels are unavailable: {cpu.load_error()}")
    rng = np.random.default_rng(0)

    def draw(*shape):
        return jnp.asarray(rng.standard_normal(shape, np.float32) * 0.02, dtype)

    plain = [{name: draw(*shape) for name, shape in SHAPES.items()} for _ in range(LAYERS)]
    pack = jax.jit(reference.pack_panels)
    packed = [{name: pack(w) for name, w in layer.items()} for layer in plain]
    widths = {name: shape[1] for name, shape in SHAPES.items()}
    embed = draw(VOCAB, HIDDEN)
    lm_head = pack(embed.T)

    programs = {
        "30 layers": (jax.jit(lambda x, w: layers(x, w, xla_dot)), plain,
                      jax.jit(lambda x, p: layers(x, [{n: (a, widths[n]) for n, a in l.items()} for l in p],
                                                  lambda x, w: cpu.packed_matmul(x, *w).astype(x.dtype))), packed),
        "lm_head": (jax.jit(lambda x, e: jnp.einsum("nh,vh->nv", x, e, preferred_element_type=jnp.float32)), embed,
                    jax.jit(lambda x, p: cpu.packed_matmul(x, p, VOCAB)), lm_head),
    }
    print("| program | rows | XLA dot, ms (best / median) | packed kernel, ms | speed-up (best) |")
    print("|---|---|---|---|---|")
    for name, (xla_fn, xla_w, packed_fn, packed_w) in programs.items():
        for rows in args.rows:
            x = draw(rows, HIDDEN)
            tolerance = 1e-3 if dtype == jnp.float32 else 3e-2  # bf16 activations round between layers
            np.testing.assert_allclose(np.asarray(packed_fn(x, packed_w), np.float32),
                                       np.asarray(xla_fn(x, xla_w), np.float32),
                                       rtol=tolerance, atol=tolerance)  # also the warm-up call of each
            xla_times, packed_times = [], []
            for _ in range(args.repeats):  # interleaved, so both see the same neighbours
                xla_times.append(seconds(xla_fn, x, xla_w))
                packed_times.append(seconds(packed_fn, x, packed_w))
            xb, pb = min(xla_times), min(packed_times)
            print(f"| {name} | {rows} | {xb * 1e3:.1f} / {np.median(xla_times) * 1e3:.1f} | "
                  f"{pb * 1e3:.1f} / {np.median(packed_times) * 1e3:.1f} | {xb / pb:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
