// What the packed matmul and the greedy lm_head kernels share: the K chunk whose partial sums
// the packed matmul adds up, the GGUF block, and the walk over blocks of rows. The greedy
// lm_head recomputes a logit in the packed matmul's order (greedy_lm_head.cc), so both must
// cut K the same way.

#ifndef JPAGED_CPU_PACKED_MATMUL_H_
#define JPAGED_CPU_PACKED_MATMUL_H_

#include <cstdint>
#include <type_traits>

namespace jpaged_cpu {

#if defined(__AVX512F__)
constexpr int64_t kChunkK = 256;  // k per chunk: 48 KiB of f32 panel rows (24 of bf16), in L2
#else
// 24 KiB of f32 panel rows, so a q4 / q8 chunk's dequantized rows stay in a 32 KiB L1 while the
// row blocks pass over them (256 made the q4 format 0.7x the f32 one on a Zen 3 with AVX2).
constexpr int64_t kChunkK = 128;
#endif
constexpr int64_t kQuantBlock = 32;  // rows of a GGUF block: one scale (and offset) per column

// fn(std::integral_constant<int, R>, r) for blocks of R rows starting at row r that cover
// `rows` rows (any count): blocks of ROWS, then the rest as one block of its size. A block
// passes over the weights once, so 3 rows cost one pass, not two (a block of 2, then of 1): where
// the weights stream from memory per block (few rows, dequantized in registers) that is most of
// a pass's cost. Each row's sums are the same in any block.
template <int ROWS, typename F>
inline void ForRowBlocks(int64_t rows, const F& fn, int64_t r = 0) {
  for (; rows >= ROWS; rows -= ROWS, r += ROWS) fn(std::integral_constant<int, ROWS>(), r);
  if constexpr (ROWS > 1) {
    if (rows > 0) ForRowBlocks<ROWS - 1>(rows, fn, r);
  }
}

}  // namespace jpaged_cpu

#endif  // JPAGED_CPU_PACKED_MATMUL_H_
