// What the packed matmul and the greedy lm_head kernels share: the K chunk whose partial sums
// the packed matmul adds up, and the GGUF block. The greedy lm_head recomputes a q8 logit in
// the packed matmul's order (greedy_lm_head.cc), so both must cut K the same way.

#ifndef JPAGED_CPU_PACKED_MATMUL_H_
#define JPAGED_CPU_PACKED_MATMUL_H_

#include <cstdint>

namespace jpaged_cpu {

#if defined(__AVX512F__)
constexpr int64_t kChunkK = 256;  // k per chunk: 48 KiB of f32 panel rows (24 of bf16), in L2
#else
// 24 KiB of f32 panel rows, so a q4 / q8 chunk's dequantized rows stay in a 32 KiB L1 while the
// row blocks pass over them (256 made the q4 format 0.7x the f32 one on a Zen 3 with AVX2).
constexpr int64_t kChunkK = 128;
#endif
constexpr int64_t kQuantBlock = 32;  // rows of a GGUF block: one scale (and offset) per column

}  // namespace jpaged_cpu

#endif  // JPAGED_CPU_PACKED_MATMUL_H_
