// The greedy token of each row, argmax_v (hidden @ w.T)[v], for an lm_head w [V, K] of Q8_0 or
// float32 rows, without computing every logit in float32; registered with XLA as typed FFI
// handlers.
//
// Same contract as pallas_kernels/reference.py's greedy_lm_head: the id and the logit are those
// of the packed matmul (packed_matmul.cc, q8 or float32 panels of the same w), bit for bit, so a
// greedy token is the one that argmax over the packed matmul's logits picks (the first on ties).
//
// 1. Each row of hidden is quantized per 32-block b to int8: h ~ s_b * hq (|hq| <= 127,
//    s_b = max |h| / 127), so |h_k - s_b hq_k| <= s_b / 2.
// 2. w is kept as int8 blocks too, w ~ d_vb * q_vk (a Q8_0 lm_head is exactly that; float32 rows
//    are rounded per block, |w - d q| <= e_vb). For every entry v, integer dot products give
//    the approximate logit  A_v = sum_b s_b d_vb sum_{k in b} hq_k q_vk  and the bound on its error
//    B_v = sum_b (s_b * bound_vb + l1_b * e_vb),  bound_vb = |d_vb| sum |q_vk| / 2,  l1_b =
//    sum_{k in b} |h_k| (the second term for float32 rows only). The packed matmul's float32
//    logit F_v differs from the exact dot product by less than B_v / 100 (K * 2^-24 *
//    sum |h_k w_vk| <= 577 * 2^-24 * 254 B_v), so with B'_v = 1.02 B_v every v with
//    A_v + B'_v < max_u (A_u - B'_u) has F_v < F_u of that u: it cannot win.
// 3. The few candidates left (about 4-60 of 49,152 for SmolLM2's hidden states) get their logit
//    recomputed from the lm_head's own rows in the packed matmul's order (K in kChunkK chunks,
//    each summed by FMAs from zero, the chunks added in order), and the largest wins.
// A row with a non-finite value keeps every entry as a candidate (the first NaN wins, as in
// jnp.argmax).
//
// The integer dot products: with AVX512-VNNI, vpdpbusd's u8 x s8 products (4 per 32-bit lane
// added into it, 4x the multiply-adds of a float32 FMA) of the weights' q + 128 and hq, less
// 128 * sum(hq); with AVX2, vpmaddubsw's u8 x s8 products of |q| and hq with q's sign (pairs
// added in 16 bits: at most 2 * 128 * 127, no saturation), then vpmaddwd's pairs of those into
// 32-bit lanes: a sign and 3 integer instructions per 32 multiply-adds, spread over more
// vector pipes than the FMA's.
//
// Layout (`reference.pack_greedy_lm_head`): the int8 blocks of 16 entries side by side,
// values u8[T, K / 4, 16, 4] = q + 128 (T = ceil(V / 16)), scale d, bound and (float32 rows) e
// f32[T, K / 32, 16]; and the lm_head's rows for the recomputation: i8[V, K] with f16 scales
// [V, K / 32] (JpagedGreedyLmHeadQ8), or f32[V, K] (JpagedGreedyLmHeadF32). Needs AVX512-VNNI and
// AVX512-BW, or AVX2; and F16C; elsewhere the handlers return an error and
// JpagedGreedyLmHeadSupported() is 0.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__F16C__)
#define JPAGED_GREEDY_LM_HEAD 1
#define JPAGED_GREEDY_VNNI 1
#include <immintrin.h>
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define JPAGED_GREEDY_LM_HEAD 1
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"
#include "ffi_helpers.h"
#include "packed_matmul.h"

namespace {

using jpaged_cpu::Dims;
using jpaged_cpu::ForRowBlocks;
using jpaged_cpu::kChunkK;
using jpaged_cpu::kQuantBlock;
using jpaged_cpu::ParallelFor;
using jpaged_cpu::ParallelForInRanges;
namespace ffi = xla::ffi;

constexpr int64_t kTile = 16;          // vocabulary entries per VNNI tile (one vector of int32 sums)
constexpr int64_t kTilesPerItem = 32;  // tiles per work item
constexpr int64_t kItemEntries = kTile * (kTilesPerItem + 1);  // 512 entries, and room for a whole last store
constexpr int64_t kMaxChunkRows = 64;  // rows per pass over the weights (their bounds stay in L3)
constexpr float kBoundSlack = 1.02f;   // B'_v = kBoundSlack * B_v (see the header comment)

#if defined(JPAGED_GREEDY_LM_HEAD)

// The rows r0 .. r0 + rows of hidden, quantized per 32-block.
struct QuantizedRows {
  std::vector<int8_t> values;      // [rows, K]
  std::vector<float> scale;        // [rows, K / 32]: s_b
  std::vector<int32_t> offset;     // [rows, K / 32]: -128 * sum_b hq, undoing the weights' +128
  std::vector<float> l1;           // [rows, K / 32]: sum_b |h|, rounded up
  std::vector<uint8_t> finite;     // [rows]
};

void QuantizeRows(const float* hidden, int64_t K, int64_t rows, QuantizedRows& q) {
  const int64_t blocks = K / kQuantBlock;
  q.values.assign(rows * K, 0);
  q.scale.assign(rows * blocks, 0.0f);
  q.offset.assign(rows * blocks, 0);
  q.l1.assign(rows * blocks, 0.0f);
  q.finite.assign(rows, 1);
  for (int64_t r = 0; r < rows; ++r) {
    const float* h = hidden + r * K;
    for (int64_t b = 0; b < blocks; ++b) {
      float amax = 0.0f;
      for (int64_t k = b * kQuantBlock; k < (b + 1) * kQuantBlock; ++k) amax = std::max(amax, std::fabs(h[k]));
      if (!std::isfinite(amax)) {  // inf, or a NaN (std::max keeps 0 then, so look again)
        q.finite[r] = 0;
        continue;
      }
      for (int64_t k = b * kQuantBlock; k < (b + 1) * kQuantBlock; ++k) {
        if (std::isnan(h[k])) q.finite[r] = 0;
      }
      if (amax == 0.0f) continue;
      const float s = amax / 127.0f;
      int32_t sum = 0;
      for (int64_t k = b * kQuantBlock; k < (b + 1) * kQuantBlock; ++k) {
        const int32_t v = static_cast<int32_t>(std::nearbyint(std::clamp(h[k] / s, -127.0f, 127.0f)));
        q.values[r * K + k] = static_cast<int8_t>(v);
        sum += v;
      }
      float l1 = 0.0f;
      for (int64_t k = b * kQuantBlock; k < (b + 1) * kQuantBlock; ++k) l1 += std::fabs(h[k]);
      q.scale[r * blocks + b] = s;
      q.offset[r * blocks + b] = -128 * sum;
      q.l1[r * blocks + b] = l1 * (1.0f + 0x1p-16f);  // 32 roundings of at most 2^-24 each
    }
  }
}

// One work item's entries that may still win, per row: those whose A + B' reached the largest
// A - B' of the item's entries up to them (later entries may raise it; pass 2 filters again).
struct ItemCandidates {
  int32_t* ids;      // [rows, kItemEntries], in index order
  float* upper;      // [rows, kItemEntries]: their A + B'
  int32_t* count;    // [rows]
  float* lower_max;  // [rows]: the largest A - B' of the item's entries so far
};

#if defined(JPAGED_GREEDY_VNNI)
constexpr int kMaxBlockRows = 8;

// Rows r0 .. r0 + ROWS over one tile (entries v0 .. v0 + 16, the first `valid` of them real):
// A and B' of each, and the ones that may win appended to `c`.
template <int ROWS, bool kError>
inline void TileCandidates(const uint8_t* values, const float* scale, const float* bound, const float* error,
                           int64_t K, const QuantizedRows& q, int64_t r0, int64_t v0, int64_t valid,
                           ItemCandidates& c) {
  const int64_t blocks = K / kQuantBlock;
  __m512 approx[ROWS], bounds[ROWS];
#pragma GCC unroll 8
  for (int r = 0; r < ROWS; ++r) approx[r] = bounds[r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    __m512i w[kQuantBlock / 4];
#pragma GCC unroll 8
    for (int g = 0; g < kQuantBlock / 4; ++g) {
      w[g] = _mm512_loadu_si512(values + (b * kQuantBlock / 4 + g) * kTile * 4);
    }
    const __m512 d = _mm512_loadu_ps(scale + b * kTile);
    const __m512 bd = _mm512_loadu_ps(bound + b * kTile);
#pragma GCC unroll 8
    for (int r = 0; r < ROWS; ++r) {
      const int8_t* hq = q.values.data() + (r0 + r) * K + b * kQuantBlock;
      __m512i sum = _mm512_set1_epi32(q.offset[(r0 + r) * blocks + b]);
#pragma GCC unroll 8
      for (int g = 0; g < kQuantBlock / 4; ++g) {
        int32_t four;
        std::memcpy(&four, hq + 4 * g, sizeof(four));
        sum = _mm512_dpbusd_epi32(sum, w[g], _mm512_set1_epi32(four));
      }
      const __m512 s = _mm512_set1_ps(q.scale[(r0 + r) * blocks + b]);
      approx[r] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(sum), s), d, approx[r]);
      bounds[r] = _mm512_fmadd_ps(s, bd, bounds[r]);
      if constexpr (kError) {
        bounds[r] = _mm512_fmadd_ps(_mm512_set1_ps(q.l1[(r0 + r) * blocks + b]), _mm512_loadu_ps(error + b * kTile),
                                    bounds[r]);
      }
    }
  }
  const __mmask16 lanes = valid >= kTile ? 0xFFFF : static_cast<__mmask16>((1u << valid) - 1);
  const __m512 slack = _mm512_set1_ps(kBoundSlack);
  const __m512i ids = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int32_t>(v0)),
                                       _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
#pragma GCC unroll 8
  for (int r = 0; r < ROWS; ++r) {
    const int64_t row = r0 + r;
    const __m512 upper = _mm512_fmadd_ps(bounds[r], slack, approx[r]);
    const __m512 lower = _mm512_fnmadd_ps(bounds[r], slack, approx[r]);
    const float lower_max = std::max(c.lower_max[row], _mm512_mask_reduce_max_ps(lanes, lower));
    c.lower_max[row] = lower_max;
    const __mmask16 may_win = _mm512_mask_cmp_ps_mask(lanes, upper, _mm512_set1_ps(lower_max), _CMP_GE_OQ);
    const int64_t at = row * kItemEntries + c.count[row];
    // Compressed in registers and stored whole (a compressing store to memory is microcoded on
    // Zen 4): the lanes past the count are overwritten by the next tile's or ignored.
    _mm512_storeu_si512(c.ids + at, _mm512_maskz_compress_epi32(may_win, ids));
    _mm512_storeu_ps(c.upper + at, _mm512_maskz_compress_ps(may_win, upper));
    c.count[row] += __builtin_popcount(may_win);
  }
}
#else  // AVX2
constexpr int kMaxBlockRows = 4;  // 4 sums, 4 A and 4 B of 8 entries, and the operands: 16 registers or so

// TileCandidates for half of a tile (`half` 0 or 1: entries v0 + 8 * half .. + 8, the first
// `valid` of them real; `values`, `scale`, `bound` and `error` at the whole tile's).
template <int ROWS, bool kError>
inline void HalfTileCandidates(const uint8_t* values, const float* scale, const float* bound, const float* error,
                               int64_t K, const QuantizedRows& q, int64_t r0, int64_t half, int64_t v0,
                               int64_t valid, ItemCandidates& c) {
  const int64_t blocks = K / kQuantBlock;
  const __m256i bias = _mm256_set1_epi8(static_cast<char>(0x80));
  const __m256i ones = _mm256_set1_epi16(1);
  const int8_t* hq_rows = q.values.data() + r0 * K;
  __m256 approx[ROWS], bounds[ROWS];
#pragma GCC unroll 4
  for (int r = 0; r < ROWS; ++r) approx[r] = bounds[r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    __m256i sum[ROWS];
#pragma GCC unroll 4
    for (int r = 0; r < ROWS; ++r) sum[r] = _mm256_setzero_si256();
#pragma GCC unroll 8
    for (int g = 0; g < kQuantBlock / 4; ++g) {
      const __m256i w = _mm256_loadu_si256(
          reinterpret_cast<const __m256i*>(values + ((b * kQuantBlock / 4 + g) * kTile + 8 * half) * 4));
      const __m256i signed_w = _mm256_xor_si256(w, bias);   // q
      const __m256i magnitude = _mm256_abs_epi8(signed_w);  // |q| <= 128 as u8
#pragma GCC unroll 4
      for (int r = 0; r < ROWS; ++r) {
        int32_t four;
        std::memcpy(&four, hq_rows + r * K + b * kQuantBlock + 4 * g, sizeof(four));
        const __m256i hq = _mm256_sign_epi8(_mm256_set1_epi32(four), signed_w);  // hq * sign(q)
        sum[r] = _mm256_add_epi32(sum[r], _mm256_madd_epi16(_mm256_maddubs_epi16(magnitude, hq), ones));
        // Keeps each row's sum in a register and the adds in order: GCC otherwise regroups the
        // integer adds into trees that spill every product to the stack (7.2 -> 6.7 ms for 16
        // rows of SmolLM2's lm_head on a Zen 3).
        asm("" : "+x"(sum[r]));
      }
    }
    const __m256 d = _mm256_loadu_ps(scale + b * kTile + 8 * half);
    const __m256 bd = _mm256_loadu_ps(bound + b * kTile + 8 * half);
#pragma GCC unroll 4
    for (int r = 0; r < ROWS; ++r) {
      const __m256 s = _mm256_set1_ps(q.scale[(r0 + r) * blocks + b]);
      approx[r] = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(sum[r]), s), d, approx[r]);
      bounds[r] = _mm256_fmadd_ps(s, bd, bounds[r]);
      if constexpr (kError) {
        bounds[r] = _mm256_fmadd_ps(_mm256_set1_ps(q.l1[(r0 + r) * blocks + b]),
                                    _mm256_loadu_ps(error + b * kTile + 8 * half), bounds[r]);
      }
    }
  }
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256 real = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int32_t>(
                                                                 std::min<int64_t>(valid, 8))), lane));
  const __m256 slack = _mm256_set1_ps(kBoundSlack);
  const __m256 minus_inf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
#pragma GCC unroll 4
  for (int r = 0; r < ROWS; ++r) {
    const int64_t row = r0 + r;
    const __m256 upper = _mm256_fmadd_ps(bounds[r], slack, approx[r]);
    const __m256 lower = _mm256_blendv_ps(minus_inf, _mm256_fnmadd_ps(bounds[r], slack, approx[r]), real);
    alignas(32) float lowers[8], uppers[8];
    _mm256_store_ps(lowers, lower);
    _mm256_store_ps(uppers, upper);
    float lower_max = c.lower_max[row];
    for (int i = 0; i < 8; ++i) lower_max = std::max(lower_max, lowers[i]);
    c.lower_max[row] = lower_max;
    unsigned may_win = _mm256_movemask_ps(_mm256_and_ps(_mm256_cmp_ps(upper, _mm256_set1_ps(lower_max), _CMP_GE_OQ),
                                                        real));
    int32_t* ids = c.ids + row * kItemEntries;
    float* uppers_out = c.upper + row * kItemEntries;
    for (; may_win != 0; may_win &= may_win - 1) {
      const int i = __builtin_ctz(may_win);
      ids[c.count[row]] = static_cast<int32_t>(v0 + 8 * half + i);
      uppers_out[c.count[row]++] = uppers[i];
    }
  }
}

// Rows r0 .. r0 + ROWS over one tile (entries v0 .. v0 + 16, the first `valid` of them real):
// A and B' of each, and the ones that may win appended to `c`, in index order.
template <int ROWS, bool kError>
inline void TileCandidates(const uint8_t* values, const float* scale, const float* bound, const float* error,
                           int64_t K, const QuantizedRows& q, int64_t r0, int64_t v0, int64_t valid,
                           ItemCandidates& c) {
  HalfTileCandidates<ROWS, kError>(values, scale, bound, error, K, q, r0, 0, v0, valid, c);
  if (valid > 8) HalfTileCandidates<ROWS, kError>(values, scale, bound, error, K, q, r0, 1, v0, valid - 8, c);
}
#endif  // JPAGED_GREEDY_VNNI

// The lm_head's rows, for the exact logits: Q8_0 (value * f16 scale, exact in float32) or float32.
struct Q8Rows {
  const int8_t* values;    // [V, K]
  const uint16_t* scale;   // [V, K / 32], f16 bits
  int64_t K;
  float Weight(int64_t v, int64_t k) const {
    return static_cast<float>(values[v * K + k]) * _cvtsh_ss(scale[v * (K / kQuantBlock) + k / kQuantBlock]);
  }
};
struct F32Rows {
  const float* values;  // [V, K]
  int64_t K;
  float Weight(int64_t v, int64_t k) const { return values[v * K + k]; }
};

// The packed matmul's float32 logit of entry v (q8 or float32 panels of the same rows): K cut
// into kChunkK chunks, each summed by FMAs from zero, the chunk sums added in order.
template <typename Rows>
inline float ExactLogit(const float* h, const Rows& rows, int64_t v) {
  const int64_t K = rows.K;
  float logit = 0.0f;
  for (int64_t k0 = 0; k0 < K; k0 += kChunkK) {
    float acc = 0.0f;
    for (int64_t k = k0; k < std::min(K, k0 + kChunkK); ++k) acc = std::fma(h[k], rows.Weight(v, k), acc);
    logit = k0 == 0 ? acc : logit + acc;
  }
  return logit;
}

// Whether `logit` at a later index replaces `best`, as jnp.argmax: larger, or the first NaN.
inline bool Replaces(float logit, float best) {
  return !std::isnan(best) && (std::isnan(logit) || logit > best);
}

template <typename Rows>
void GreedyRows(ffi::ThreadPool& pool, const float* hidden, int64_t rows, int64_t K, int64_t V,
                const uint8_t* values, const float* scale, const float* bound, const float* error,
                const Rows& lm_head, int32_t* ids, float* logits) {
  const int64_t blocks = K / kQuantBlock;
  const int64_t tiles = (V + kTile - 1) / kTile;
  const int64_t items = (tiles + kTilesPerItem - 1) / kTilesPerItem;
  QuantizedRows q;
  QuantizeRows(hidden, K, rows, q);
  // Per work item: [rows, kItemEntries] candidate ids and bounds, the counts, the lower maxima.
  thread_local std::vector<int32_t> id_buffer;
  thread_local std::vector<float> upper_buffer;
  id_buffer.resize(items * rows * kItemEntries);
  upper_buffer.resize(items * rows * kItemEntries);
  std::vector<int32_t> counts(items * rows, 0);
  std::vector<float> lower_max(items * rows, -std::numeric_limits<float>::infinity());
  auto item_candidates = [&, ids = id_buffer.data(), upper = upper_buffer.data()](int64_t item) {
    return ItemCandidates{ids + item * rows * kItemEntries, upper + item * rows * kItemEntries,
                          counts.data() + item * rows, lower_max.data() + item * rows};
  };
  ParallelForInRanges(pool, items, [&](int64_t item) {  // the tiles stream as one run per thread
    ItemCandidates c = item_candidates(item);
    for (int64_t t = item * kTilesPerItem; t < std::min(tiles, (item + 1) * kTilesPerItem); ++t) {
      ForRowBlocks<kMaxBlockRows>(rows, [&](auto block_rows, int64_t r) {
        const int64_t at = t * blocks * kTile;
        if (error == nullptr) {
          TileCandidates<decltype(block_rows)::value, false>(values + t * (K / 4) * kTile * 4, scale + at, bound + at,
                                                             nullptr, K, q, r, t * kTile, V - t * kTile, c);
        } else {
          TileCandidates<decltype(block_rows)::value, true>(values + t * (K / 4) * kTile * 4, scale + at, bound + at,
                                                            error + at, K, q, r, t * kTile, V - t * kTile, c);
        }
      });
    }
  });
  ParallelFor(pool, rows, [&](int64_t r, int64_t) {
    float threshold = -std::numeric_limits<float>::infinity();
    for (int64_t item = 0; item < items; ++item) threshold = std::max(threshold, lower_max[item * rows + r]);
    const float* h = hidden + r * K;
    int32_t best_id = -1;
    float best = 0.0f;
    auto consider = [&](int64_t v) {
      const float logit = ExactLogit(h, lm_head, v);
      if (best_id < 0 || Replaces(logit, best)) {
        best = logit;
        best_id = static_cast<int32_t>(v);
      }
    };
    if (!q.finite[r]) {
      for (int64_t v = 0; v < V; ++v) consider(v);
    } else {
      for (int64_t item = 0; item < items; ++item) {  // in index order, so ties keep the first
        const ItemCandidates c = item_candidates(item);
        for (int32_t j = 0; j < c.count[r]; ++j) {
          if (c.upper[r * kItemEntries + j] >= threshold) consider(c.ids[r * kItemEntries + j]);
        }
      }
    }
    ids[r] = best_id;
    logits[r] = best;
  });
}

#endif  // JPAGED_GREEDY_LM_HEAD

#if defined(JPAGED_GREEDY_LM_HEAD)
// Checks the shapes; extra_dims describes the operand that extra_ok checked (lm_head_scale or error).
ffi::Error CheckShapes(ffi::AnyBuffer::Dimensions hd, ffi::AnyBuffer::Dimensions vd, ffi::AnyBuffer::Dimensions sd,
                       ffi::AnyBuffer::Dimensions bd, ffi::AnyBuffer::Dimensions ld, const std::string& extra_dims,
                       bool extra_ok, int64_t num_rows_count, int64_t ids_count, int64_t logits_count) {
  if (hd.size() != 2 || ld.size() != 2 || vd.size() != 4 || sd.size() != 3 || bd.size() != 3 || !extra_ok ||
      num_rows_count != 1 || hd[1] % kQuantBlock != 0 || ld[1] != hd[1] || vd[0] != (ld[0] + kTile - 1) / kTile ||
      vd[1] * 4 != hd[1] || vd[2] != kTile || vd[3] != 4 || sd[0] != vd[0] || sd[1] * kQuantBlock != hd[1] ||
      sd[2] != kTile || !std::equal(sd.begin(), sd.end(), bd.begin()) || ids_count != hd[0] ||
      logits_count != hd[0]) {
    return ffi::Error::InvalidArgument(
        "greedy_lm_head: need hidden [M, K] with K a multiple of 32, one int32 num_rows, values [ceil(V / 16), "
        "K / 4, 16, 4], scale, bound (and error for float32 rows) [ceil(V / 16), K / 32, 16], lm_head [V, K] "
        "(with lm_head_scale [V, K / 32] for int8 rows), ids and logits [M]; got hidden " + Dims(hd) + ", values " + Dims(vd) + ", scale " +
        Dims(sd) + ", bound " + Dims(bd) + ", lm_head " + Dims(ld) + extra_dims);
  }
  return ffi::Error::Success();
}

// ids and logits for hidden's first num_rows rows (clamped to [0, M]), zeros after them.
template <typename Rows>
void GreedyLmHead(ffi::ThreadPool& pool, ffi::Buffer<ffi::F32> hidden, ffi::Buffer<ffi::S32> num_rows,
                  ffi::Buffer<ffi::U8> values, ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> bound,
                  const float* error, const Rows& lm_head, int64_t V, int32_t* ids, float* logits) {
  const int64_t M = hidden.dimensions()[0], K = hidden.dimensions()[1];
  const int64_t rows = std::clamp<int64_t>(*num_rows.typed_data(), 0, M);
  for (int64_t r0 = 0; r0 < rows; r0 += kMaxChunkRows) {
    GreedyRows(pool, hidden.typed_data() + r0 * K, std::min(kMaxChunkRows, rows - r0), K, V, values.typed_data(),
               scale.typed_data(), bound.typed_data(), error, lm_head, ids + r0, logits + r0);
  }
  std::fill(ids + rows, ids + M, 0);
  std::fill(logits + rows, logits + M, 0.0f);
}
#endif  // JPAGED_GREEDY_LM_HEAD

const char kUnsupported[] = "greedy_lm_head needs a CPU with AVX512-VNNI and AVX512-BW, or AVX2 and FMA; and F16C";

ffi::Error GreedyLmHeadQ8(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> hidden, ffi::Buffer<ffi::S32> num_rows,
                          ffi::Buffer<ffi::U8> values, ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> bound,
                          ffi::Buffer<ffi::S8> lm_head, ffi::Buffer<ffi::F16> lm_head_scale,
                          ffi::Result<ffi::Buffer<ffi::S32>> ids, ffi::Result<ffi::Buffer<ffi::F32>> logits) {
#if defined(JPAGED_GREEDY_LM_HEAD)
  auto ld = lm_head.dimensions();
  auto lsd = lm_head_scale.dimensions();
  const bool scale_ok = lsd.size() == 2 && ld.size() == 2 && lsd[0] == ld[0] && lsd[1] * kQuantBlock == ld[1];
  ffi::Error status = CheckShapes(hidden.dimensions(), values.dimensions(), scale.dimensions(), bound.dimensions(), ld,
                                  ", lm_head_scale " + Dims(lsd), scale_ok, num_rows.element_count(),
                                  ids->element_count(), logits->element_count());
  if (status.failure()) return status;
  const Q8Rows rows{reinterpret_cast<const int8_t*>(lm_head.typed_data()),
                    reinterpret_cast<const uint16_t*>(lm_head_scale.typed_data()), ld[1]};
  GreedyLmHead(pool, hidden, num_rows, values, scale, bound, nullptr, rows, ld[0], ids->typed_data(),
               logits->typed_data());
  return ffi::Error::Success();
#else
  return ffi::Error::Internal(kUnsupported);
#endif
}

ffi::Error GreedyLmHeadF32(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> hidden, ffi::Buffer<ffi::S32> num_rows,
                           ffi::Buffer<ffi::U8> values, ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> bound,
                           ffi::Buffer<ffi::F32> error, ffi::Buffer<ffi::F32> lm_head, ffi::Result<ffi::Buffer<ffi::S32>> ids,
                           ffi::Result<ffi::Buffer<ffi::F32>> logits) {
#if defined(JPAGED_GREEDY_LM_HEAD)
  auto ld = lm_head.dimensions();
  auto sd = scale.dimensions();
  auto ed = error.dimensions();
  const bool error_ok = ed.size() == sd.size() && std::equal(sd.begin(), sd.end(), ed.begin());
  ffi::Error status = CheckShapes(hidden.dimensions(), values.dimensions(), sd, bound.dimensions(), ld,
                                  ", error " + Dims(ed), error_ok, num_rows.element_count(), ids->element_count(),
                                  logits->element_count());
  if (status.failure()) return status;
  const F32Rows rows{lm_head.typed_data(), ld[1]};
  GreedyLmHead(pool, hidden, num_rows, values, scale, bound, error.typed_data(), rows, ld[0], ids->typed_data(),
               logits->typed_data());
  return ffi::Error::Success();
#else
  return ffi::Error::Internal(kUnsupported);
#endif
}

}  // namespace

extern "C" int JpagedGreedyLmHeadSupported() {
#if defined(JPAGED_GREEDY_LM_HEAD)
  return 1;
#else
  return 0;
#endif
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(JpagedGreedyLmHeadQ8, GreedyLmHeadQ8,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // hidden
                                  .Arg<ffi::Buffer<ffi::S32>>()   // num_rows
                                  .Arg<ffi::Buffer<ffi::U8>>()    // values
                                  .Arg<ffi::Buffer<ffi::F32>>()   // scale
                                  .Arg<ffi::Buffer<ffi::F32>>()   // bound
                                  .Arg<ffi::Buffer<ffi::S8>>()    // lm_head
                                  .Arg<ffi::Buffer<ffi::F16>>()   // lm_head_scale
                                  .Ret<ffi::Buffer<ffi::S32>>()   // ids
                                  .Ret<ffi::Buffer<ffi::F32>>());  // logits

XLA_FFI_DEFINE_HANDLER_SYMBOL(JpagedGreedyLmHeadF32, GreedyLmHeadF32,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // hidden
                                  .Arg<ffi::Buffer<ffi::S32>>()   // num_rows
                                  .Arg<ffi::Buffer<ffi::U8>>()    // values
                                  .Arg<ffi::Buffer<ffi::F32>>()   // scale
                                  .Arg<ffi::Buffer<ffi::F32>>()   // bound
                                  .Arg<ffi::Buffer<ffi::F32>>()   // error
                                  .Arg<ffi::Buffer<ffi::F32>>()   // lm_head
                                  .Ret<ffi::Buffer<ffi::S32>>()   // ids
                                  .Ret<ffi::Buffer<ffi::F32>>());  // logits
