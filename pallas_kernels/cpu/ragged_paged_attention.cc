// Ragged paged attention for CPUs, registered with XLA as a typed FFI handler.
//
// Same contract as pallas_kernels/reference.py: packed queries q[T, Hq, D], KV pages
// [num_blocks, KVH, block_size, D] (fp32, bf16, or int8 / fp8 e4m3fn / fp8 e5m2 holding
// K / k_scale and V / v_scale with f32[KVH] scales), kv_lens i32[S], block_tables i32[S, W],
// cu_q_lens i32[S + 1]. Each work item is (sequence, KV head, query tile, KV block range): it
// reads every KV block of its range once and uses it for all query rows of the tile and of the
// GQA group. Softmax is online, in fp32. Keys at positions >= kv_len are never read, so garbage
// (even NaN) in unused pages or padding entries cannot leak. Padded query rows get zeros.
// A sequence's lone query token (decode) keeps its rows in row-major arrays; the tokens of a
// longer chunk (prefill) go on vector lanes, whatever their tile's size.
//
// Work runs on the thread pool XLA hands to FFI handlers; the calling thread works too. A decode
// item's keys are split at fixed positions (every kSegmentTokens) into pieces that threads run
// in parallel, and the pieces' softmax states are merged in key order afterwards; prefill items
// (many per chunk) are not split.
//
// Batch invariance: a query row's result depends only on its own sequence's keys, its position
// and whether its chunk is one token or more, never on the other sequences of the call, the
// tiles, or the thread count (the lanes arithmetic is the same on every lane, the prefill key
// groups and the decode segments are fixed positions). So a token gets the same bits in any
// batch, as long as the scheduler gives it the same kind of chunk (jpaged's never leaves a
// prompt token alone in a chunk).

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <numeric>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include "xla/ffi/api/ffi.h"
#include "ffi_helpers.h"

// No contraction of a * b + c into FMAs at the compiler's choice: it fused them in some inlined
// copies of a computation and not in others, so on an AVX2 build a prompt row's bits depended
// on its tile (one token or more). The hot multiply-adds are explicit FMAs (MulAdd) instead.
#pragma GCC optimize("O3", "fp-contract=off")
#include "vector_math.h"

#if defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif

namespace {

using jpaged_cpu::Dims;
using jpaged_cpu::ExpV;
using jpaged_cpu::LoadV;
using jpaged_cpu::MulAdd;
using jpaged_cpu::ParallelFor;
using jpaged_cpu::SoftCapV;
using jpaged_cpu::SplatV;
using jpaged_cpu::StoreV;
namespace ffi = xla::ffi;

// Eight fp32 lanes: one AVX register, or a pair of SSE / NEON registers.
typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef uint16_t v8h __attribute__((vector_size(16)));
typedef uint32_t v8u __attribute__((vector_size(32)));
typedef int8_t v8c __attribute__((vector_size(8)));
typedef uint8_t v8b __attribute__((vector_size(8)));

constexpr int kLanes = 8;

// The lanes layout (prefill tiles) uses the widest vectors the CPU has: 16 fp32 lanes with
// AVX-512, else 8. Twice the lanes is twice the multiply-adds per instruction.
#if defined(__AVX512F__)
constexpr int kWide = 16;
#else
constexpr int kWide = 8;
#endif
typedef float vwf __attribute__((vector_size(kWide * 4)));
typedef int32_t vwi __attribute__((vector_size(kWide * 4)));

// Query rows (tokens x GQA group) one item keeps in its fp32 accumulators: three wide vectors.
constexpr int kTileRows = 3 * kWide;
// A decode item's keys are split into pieces at multiples of this many positions (rounded to
// whole blocks): fixed positions, so the split never depends on the rest of the batch. 512
// splits one stream's three KV heads about as finely as two threads need, while a batch's
// usual contexts stay whole (with 256, merging cost ~8 % at 64 x 400).
constexpr int kSegmentTokens = 512;

// A prefill tile takes its keys this many at a time per online-softmax step (whole blocks, at
// least one): with 16-token blocks, 4 blocks per step cost 11-17 % less than one, from fewer
// loads and stores of the accumulators and the softmax state. Groups start at multiples of
// their block count, so a key's group never depends on the tile.
constexpr int kGroupKeys = 64;
constexpr int kGroupBlocksMax = 8;  // the most blocks a group holds (blocks of 8+ tokens)
inline int64_t GroupBlocks(int64_t block_size) {
  return std::clamp<int64_t>(kGroupKeys / block_size, 1, kGroupBlocksMax);
}

inline v8f Load(const float* p) {
  v8f v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void Store(float* p, v8f v) { std::memcpy(p, &v, sizeof(v)); }

// v, kept in a register: GCC otherwise folds a load into every multiply-add that uses its
// value, reading the same bytes once per use (the decode scores loaded twice per multiply-add,
// load-bound at ~1.7x the multiply-adds' time on a Zen 4). Only with AVX, where a v8f is one
// register; without it the constraint is impossible and GCC keeps the pair of halves.
inline v8f InRegister(v8f v) {
#if defined(__AVX__)
  __asm__("" : "+x"(v));
#endif
  return v;
}

inline v8f Splat(float x) { return v8f{x, x, x, x, x, x, x, x}; }

inline float Sum(v8f v) {
  return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

inline float Bf16ToFloat(uint16_t h) {
  uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

inline uint16_t FloatToBf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  if (std::isnan(f)) return static_cast<uint16_t>((bits >> 16) | 0x40);
  bits += 0x7FFF + ((bits >> 16) & 1);  // round to nearest even
  return static_cast<uint16_t>(bits >> 16);
}

// Eight bf16 values widened to fp32 (exact: bf16 is the top half of an fp32).
inline v8f LoadBf16(const uint16_t* p) {
  v8h h;
  std::memcpy(&h, p, sizeof(h));
  v8u bits = __builtin_convertvector(h, v8u) << 16;
  v8f v;
  std::memcpy(&v, &bits, sizeof(v));
  return v;
}

inline v8f Exp(v8f x) { return ExpV<v8f, v8i>(x); }

struct Shapes {
  int64_t num_tokens, num_q_heads, head_dim;
  int64_t num_blocks, num_kv_heads, block_size;
  int64_t num_seqs, pages_per_seq;
  int64_t group;
};

struct Options {
  float sm_scale;
  int32_t sliding_window;  // 0: none
  float soft_cap;          // 0: none
  const float* k_scale;    // f32[num_kv_heads]: stored K = K / k_scale (1 unless quantized)
  const float* v_scale;    // f32[num_kv_heads]: stored V = V / v_scale
};

// fp8 page elements: e4m3fn (1 sign, 4 exponent bits with bias 7, 3 mantissa bits; no inf,
// NaN = S.1111.111) and e5m2 (1 sign, 5 exponent bits with bias 15, 2 mantissa bits: the top
// byte of an IEEE fp16, inf and NaN included).
struct Fp8E4M3FN {
  uint8_t bits;
};
struct Fp8E5M2 {
  uint8_t bits;
};

// An IEEE fp16 as fp32, exactly (subnormals, inf and NaN included).
inline float HalfToFloat(uint16_t h) {
  const int exponent = (h >> 10) & 0x1F, mantissa = h & 0x3FF;
  float magnitude;
  if (exponent == 0x1F) {
    magnitude = mantissa ? NAN : INFINITY;
  } else if (exponent == 0) {
    magnitude = std::ldexp(static_cast<float>(mantissa), -24);
  } else {
    magnitude = std::ldexp(static_cast<float>(1024 + mantissa), exponent - 25);
  }
  return h & 0x8000 ? -magnitude : magnitude;
}

// Eight fp16 bit patterns as fp32, exactly: one vcvtph2ps with F16C (which converts fp16
// subnormals even under XLA's denormals-are-zero mode), else one at a time.
inline v8f HalvesToFloats(v8h h) {
#if defined(__F16C__)
  __m128i bits;
  std::memcpy(&bits, &h, sizeof(bits));
  const __m256 f = _mm256_cvtph_ps(bits);
  v8f v;
  std::memcpy(&v, &f, sizeof(v));
  return v;
#else
  v8f v;
  for (int i = 0; i < kLanes; ++i) v[i] = HalfToFloat(h[i]);
  return v;
#endif
}

// Eight bytes widened to 16 bits (zero-extended): one vpmovzxbw with AVX2. GCC 12 compiles
// __builtin_convertvector of 8-byte vectors to scalar code, hence the intrinsics.
inline v8h LoadBytesAsHalves(const void* p) {
#if defined(__AVX2__)
  const __m128i wide = _mm_cvtepu8_epi16(_mm_loadl_epi64(static_cast<const __m128i*>(p)));
  v8h h;
  std::memcpy(&h, &wide, sizeof(h));
  return h;
#else
  v8b b;
  std::memcpy(&b, p, sizeof(b));
  return __builtin_convertvector(b, v8h);
#endif
}

// Eight int8 values as fp32 (exact).
inline v8f LoadInt8(const int8_t* p) {
#if defined(__AVX2__)
  const __m256 f = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  v8f v;
  std::memcpy(&v, &f, sizeof(v));
  return v;
#else
  v8c c;
  std::memcpy(&c, p, sizeof(c));
  return __builtin_convertvector(c, v8f);
#endif
}

// Eight fp8 e5m2 values as fp32: byte << 8 is the same number as an fp16.
inline v8f LoadE5M2(const Fp8E5M2* p) { return HalvesToFloats(LoadBytesAsHalves(p) << 8); }

// Eight fp8 e4m3fn values as fp32: the 7 magnitude bits shifted into an fp16 (exponent bias 15
// instead of 7, subnormals onto subnormals) are the value / 2^8; S.1111.111 is NaN.
inline v8f LoadE4M3(const Fp8E4M3FN* p) {
  const v8h b = LoadBytesAsHalves(p);
  const v8h magnitude = b & 0x7F;
  const v8f v = HalvesToFloats((magnitude << 7) | ((b & 0x80) << 8)) * Splat(256.0f);
  // S.1111.111 became 1.875 * 2^0 * 2^8 = 480, a value no other byte gives.
  return (v == Splat(480.0f)) | (v == Splat(-480.0f)) ? Splat(NAN) : v;
}

// One query tile of one (sequence, KV head): tokens [tok_begin, tok_end) of the sequence's
// new tokens, which sit at positions first_pos + t.
struct Item {
  int32_t seq, kv_head;
  int32_t row_begin;  // first packed query row (token index in q)
  int32_t tok_begin, tok_end;
  int32_t first_pos;  // position of the sequence's first new token: kv_len - q_len
  int32_t kv_len;
  int32_t blk_begin, blk_end;  // KV blocks this item must read
  bool lanes;  // its sequence has more than one query token this call: the lanes layout
};

// A contiguous block range of one item; `partial` >= 0 when the item is split.
struct Piece {
  int32_t item;
  int32_t blk_begin, blk_end;
  int64_t partial;  // offset into the partial buffers, or -1: write the output directly
  int64_t work;
};

// fp32 scratch for one piece: queries and accumulators (rows x head_dim, or head_dim x lanes),
// per-row softmax state, scores of one step's keys (a block, or a prefill tile's key group),
// and that step's K and V widened to fp32.
struct Scratch {
  std::vector<float> q, qt, acc, m, l, alpha, pos, lo, scores, k, v;
  // Lanes layout: every real row sees keys [max_lo, min_pos] (rows lie at consecutive positions).
  int64_t min_pos = 0, max_lo = 0;
};

// Running softmax state written by a split piece: m[rows], l[rows], acc[rows, head_dim].
struct Partials {
  std::vector<float> m, l, acc;
};

// Cache lines of the next KV blocks, requested a few at a time from inside the compute loops.
// Issued all at once they would fill the core's miss buffers and stall the loads of the block
// being computed; spread evenly over the block's work they keep misses in flight throughout.
// A range goes to L1 (prefetcht0) or only to L2 (prefetcht1). L2's miss queue is deeper: on a
// Zen 4 a read-only walk over decode blocks in memory ran at 30 GB/s on one core with
// prefetcht1 one block ahead and at 16 with prefetcht0 (19 without prefetching). So a decode
// step requests the block after next into L2 and the next block, by then mostly in L2, into L1.
struct PrefetchCursor {
  // K and V of each block of a prefill group, or of a decode step's two blocks ahead
  static constexpr int kMaxRanges = 2 * std::max(kGroupBlocksMax, 2);
  const char *at = nullptr, *end = nullptr;  // lines being requested: [at, end)
  bool to_l1 = true;                         // where they go
  const char* queued_at[kMaxRanges];         // the ranges after it: [queued_at[r], queued_end[r])
  const char* queued_end[kMaxRanges];        // for r in [taken, queued)
  bool queued_to_l1[kMaxRanges];
  int queued = 0, taken = 0;
  int per_step = 1;

  void Clear() {
    at = end = nullptr;
    queued = taken = 0;
  }
  // Queues the K and the V of one block (`bytes` each), for L1 or for L2 only.
  void Add(const char* k, const char* v, int64_t bytes, bool into_l1) {
    queued_to_l1[queued] = queued_to_l1[queued + 1] = into_l1;
    queued_at[queued] = k;
    queued_end[queued++] = k + bytes;
    queued_at[queued] = v;
    queued_end[queued++] = v + bytes;
  }
  // Spreads the queued lines over `steps` calls of Step().
  void Pace(int64_t steps) {
    int64_t bytes = end - at;
    for (int r = taken; r < queued; ++r) bytes += queued_end[r] - queued_at[r];
    per_step = static_cast<int>(((bytes + 63) / 64 + steps - 1) / std::max<int64_t>(steps, 1));
  }
  // Called from the innermost loops: kept small (the refill out of line) so they inline it.
  inline void Step() {
    for (int i = 0; i < per_step; ++i) {
      if (at >= end && !Refill()) return;
      if (to_l1) {
        __builtin_prefetch(at, 0, 3);  // prefetcht0
      } else {
        __builtin_prefetch(at, 0, 2);  // prefetcht1
      }
      at += 64;
    }
  }
  // Moves on to the next queued range; false when none is left.
  __attribute__((noinline)) bool Refill() {
    if (taken >= queued) return false;
    at = queued_at[taken];
    end = queued_end[taken];
    to_l1 = queued_to_l1[taken++];
    return true;
  }
  // Requests every line still queued.
  void Drain() {
    per_step = 64;
    while (at < end || taken < queued) Step();
  }
};

template <typename QT>
inline void LoadQueryRow(const QT* src, float scale, int64_t d, float* dst) {
  for (int64_t i = 0; i < d; ++i) {
    if constexpr (std::is_same_v<QT, float>) {
      dst[i] = src[i] * scale;
    } else {
      dst[i] = Bf16ToFloat(src[i]) * scale;
    }
  }
}

template <typename QT>
inline void StoreOutputRow(const float* acc, float inv_l, int64_t d, QT* dst) {
  for (int64_t i = 0; i < d; ++i) {
    if constexpr (std::is_same_v<QT, float>) {
      dst[i] = acc[i] * inv_l;
    } else {
      dst[i] = FloatToBf16(acc[i] * inv_l);
    }
  }
}

// Eight K or V elements as fp32, widened in registers (exact for every page type).
inline v8f LoadKV(const float* p) { return Load(p); }
inline v8f LoadKV(const uint16_t* p) { return LoadBf16(p); }
inline v8f LoadKV(const int8_t* p) { return LoadInt8(p); }
inline v8f LoadKV(const Fp8E4M3FN* p) { return LoadE4M3(p); }
inline v8f LoadKV(const Fp8E5M2* p) { return LoadE5M2(p); }

// K or V rows [n, d] of one (block, KV head) as fp32: fp32 rows in place, others widened into
// buf (d is a multiple of 8).
template <typename KVT>
inline const float* BlockRows(const KVT* src, int64_t n, int64_t d, float* buf) {
  if constexpr (std::is_same_v<KVT, float>) {
    return src;
  } else {
    for (int64_t i = 0; i < n * d; i += kLanes) Store(buf + i, LoadKV(src + i));
    return buf;
  }
}

// Two-input lane shuffles: GCC's and Clang's builtins spell them differently.
#if defined(__clang__)
#define SHUFFLE8(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define SHUFFLE8(a, b, ...) __builtin_shuffle(a, b, v8i{__VA_ARGS__})
#endif

// Eight horizontal sums at once, {Sum(x0), ..., Sum(x7)}, by a transpose-and-add tree (unpack,
// shuffle and 128-bit permute on AVX), far cheaper than eight separate reductions. Its levels
// are separate so callers can fold pairs as soon as they have them:
// SumPair(x0, x1) = {x0_0+x0_2, x1_0+x1_2, x0_1+x0_3, x1_1+x1_3 | the same over lanes 4..7},
// SumQuad(pair01, pair23) = {x0..x3 summed over lanes 0..3 | x0..x3 summed over lanes 4..7},
// SumOct(quad0123, quad4567) = {Sum(x0), ..., Sum(x7)}.
inline v8f SumPair(v8f x0, v8f x1) {
  return SHUFFLE8(x0, x1, 0, 8, 1, 9, 4, 12, 5, 13) + SHUFFLE8(x0, x1, 2, 10, 3, 11, 6, 14, 7, 15);
}

inline v8f SumQuad(v8f p01, v8f p23) {
  return SHUFFLE8(p01, p23, 0, 1, 8, 9, 4, 5, 12, 13) +
         SHUFFLE8(p01, p23, 2, 3, 10, 11, 6, 7, 14, 15);
}

inline v8f SumOct(v8f w0, v8f w1) {
  return SHUFFLE8(w0, w1, 0, 1, 2, 3, 8, 9, 10, 11) + SHUFFLE8(w0, w1, 4, 5, 6, 7, 12, 13, 14, 15);
}

// Keys whose scores one step of ScoreRows<NR> computes together: about 12 independent sums
// in flight (FMA latency x throughput), within the 16 vector registers of AVX2.
template <int NR>
constexpr int kScoreKeys = NR == 1 ? 8 : NR <= 3 ? 4 : 2;

// scores[r, j] = q[r] . k[j] for NR rows and keys j < round_up(n, 8), kScoreKeys<NR> keys per
// step; each pair of keys is folded as soon as it is done, each group of eight at the end.
// Keys j >= n read row n - 1 (their scores are masked later). q: [NR, d], k: [n, d],
// scores: [NR, ld]. One pf.Step() per step.
template <int NR, typename KT>
inline void ScoreRows(const float* q, const KT* k, int64_t n, int64_t d, float* scores,
                      int64_t ld, PrefetchCursor& pf) {
  constexpr int NK = kScoreKeys<NR>;
  for (int64_t j0 = 0; j0 < n; j0 += kLanes) {
    v8f pairs[NR][kLanes / 2];  // SumPair of keys (2p, 2p + 1)
    for (int jj = 0; jj < kLanes; jj += NK) {
      pf.Step();
      const KT* kj[NK];
      for (int t = 0; t < NK; ++t) kj[t] = k + std::min<int64_t>(j0 + jj + t, n - 1) * d;
      v8f a[NK][NR] = {};
      for (int64_t i = 0; i < d; i += kLanes) {
        v8f qr[NR];
        for (int r = 0; r < NR; ++r) qr[r] = InRegister(Load(q + r * d + i));
        for (int t = 0; t < NK; ++t) {
          const v8f kv = InRegister(LoadKV(kj[t] + i));
          for (int r = 0; r < NR; ++r) a[t][r] = MulAdd(qr[r], kv, a[t][r]);
        }
      }
      for (int t = 0; t < NK; t += 2)
        for (int r = 0; r < NR; ++r) pairs[r][(jj + t) / 2] = SumPair(a[t][r], a[t + 1][r]);
    }
    for (int r = 0; r < NR; ++r) {
      const v8f sums = SumOct(SumQuad(pairs[r][0], pairs[r][1]), SumQuad(pairs[r][2], pairs[r][3]));
      Store(scores + r * ld + j0, sums);
    }
  }
}

// Calls fn(std::integral_constant<int, N>, first) over [begin, end) in groups of kMax, then
// the remainder in one smaller group, so fn can keep N rows or columns in registers.
template <int kMax, typename F>
inline void ForGroups(int64_t begin, int64_t end, const F& fn) {
  for (; begin + kMax <= end; begin += kMax) fn(std::integral_constant<int, kMax>(), begin);
  if constexpr (kMax > 1) {
    if (begin < end) ForGroups<kMax - 1>(begin, end, fn);
  }
}

// acc[r] += sum_j p[r, j] * v[j] for NR rows, NC * 8 columns of acc at a time in registers.
// p: [NR, ld], v: [n, d], acc: [NR, d]. One pf.Step() per key.
template <int NR, int NC, typename VT>
inline void AccumulateColumns(const float* p, int64_t ld, const VT* v, int64_t n, int64_t d,
                              int64_t col, float* acc, PrefetchCursor& pf) {
  v8f a[NR][NC];
  for (int r = 0; r < NR; ++r)
    for (int c = 0; c < NC; ++c) a[r][c] = Load(acc + r * d + col + c * kLanes);
  for (int64_t j = 0; j < n; ++j) {
    pf.Step();
    v8f vj[NC];  // loaded (and widened) once for all NR rows
    for (int c = 0; c < NC; ++c) vj[c] = InRegister(LoadKV(v + j * d + col + c * kLanes));
    for (int r = 0; r < NR; ++r) {
      const v8f pr = Splat(p[r * ld + j]);
      for (int c = 0; c < NC; ++c) a[r][c] = MulAdd(pr, vj[c], a[r][c]);
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int c = 0; c < NC; ++c) Store(acc + r * d + col + c * kLanes, a[r][c]);
}

// Column vectors AccumulateRows<NR> keeps in registers per pass: about 12 accumulators.
template <int NR>
constexpr int kAccumulateColumns = NR == 1 ? 8 : 12 / NR;

template <int NR, typename VT>
inline void AccumulateRows(const float* p, int64_t ld, const VT* v, int64_t n, int64_t d,
                           float* acc, PrefetchCursor& pf) {
  ForGroups<kAccumulateColumns<NR>>(0, d / kLanes, [&](auto nc, int64_t c0) {
    AccumulateColumns<NR, decltype(nc)::value, VT>(p, ld, v, n, d, c0 * kLanes, acc, pf);
  });
}

// pf.Step() calls AttendBlockRows makes for `rows` rows and n keys.
inline int64_t RowsSteps(int64_t rows, int64_t n, int64_t d) {
  int64_t steps = 0;
  ForGroups<4>(0, rows, [&](auto nr, int64_t) {
    constexpr int NR = decltype(nr)::value, NC = kAccumulateColumns<NR>;
    const int64_t chunks = d / kLanes;
    steps += (n + kLanes - 1) / kLanes * (kLanes / kScoreKeys<NR>);
    steps += n * (chunks / NC + (chunks % NC != 0));
  });
  return steps;
}

// Online-softmax update of every row of one piece with one KV block of n valid keys; rows
// in row-major arrays (few rows: decode). k, v: the block's [n, d] rows, fp32 or bf16.
template <typename KT>
inline void AttendBlockRows(const Shapes& sh, const Options& opt, const Item& it, int64_t rows,
                            int64_t blk, const KT* k, const KT* v, int64_t n, Scratch& s,
                            PrefetchCursor& pf) {
  const int64_t d = sh.head_dim, g = sh.group;
  const int64_t ld = (sh.block_size + kLanes - 1) / kLanes * kLanes;
  const int64_t width = (n + kLanes - 1) / kLanes * kLanes;  // scores computed per row
  float* scores = s.scores.data();
  ForGroups<4>(0, rows, [&](auto nr, int64_t r0) {
    ScoreRows<decltype(nr)::value, KT>(s.q.data() + r0 * d, k, n, d, scores + r0 * ld, ld, pf);
  });
  const v8f neg_inf = Splat(-INFINITY);
  v8i lane;  // {0, 1, ..., 7}
  for (int e = 0; e < kLanes; ++e) lane[e] = e;
  const int64_t key0 = blk * sh.block_size;  // the block's first position
  for (int64_t r = 0; r < rows; ++r) {
    float* sc = scores + r * ld;
    // Key j is visible when j < n and lo <= key0 + j <= pos.
    const int64_t pos = it.first_pos + it.tok_begin + r / g;
    const int64_t lo = opt.sliding_window > 0 ? pos - opt.sliding_window + 1 : 0;
    const int64_t j_begin = std::clamp<int64_t>(lo - key0, 0, n);
    const v8i begin = v8i{} + static_cast<int32_t>(j_begin);
    const v8i end = v8i{} + static_cast<int32_t>(std::clamp<int64_t>(pos - key0 + 1, j_begin, n));
    v8f vmax = neg_inf;
    for (int64_t j = 0; j < width; j += kLanes) {
      v8f x = Load(sc + j);
      if (opt.soft_cap > 0.0f) x = SoftCapV<v8f, v8i>(x, opt.soft_cap);
      const v8i key = lane + static_cast<int32_t>(j);
      x = (key >= begin) & (key < end) ? x : neg_inf;
      Store(sc + j, x);
      vmax = vmax > x ? vmax : x;
    }
    float row_max = vmax[0];
    for (int e = 1; e < kLanes; ++e) row_max = std::max(row_max, vmax[e]);
    if (row_max == -INFINITY) {  // nothing visible: this row's state is unchanged
      std::fill(sc, sc + width, 0.0f);
      continue;
    }
    const float m_new = std::max(s.m[r], row_max);
    // 0 on the first visible block (m = -inf); 1, without an exp, while the max holds.
    const float alpha = m_new == s.m[r] ? 1.0f : std::exp(s.m[r] - m_new);
    v8f row_sum = Splat(0.0f);
    for (int64_t j = 0; j < width; j += kLanes) {
      const v8f p = Exp(Load(sc + j) - Splat(m_new));
      Store(sc + j, p);
      row_sum += p;
    }
    s.l[r] = s.l[r] * alpha + Sum(row_sum);
    s.m[r] = m_new;
    if (alpha != 1.0f) {
      float* acc = s.acc.data() + r * d;
      for (int64_t i = 0; i < d; i += kLanes) Store(acc + i, Load(acc + i) * Splat(alpha));
    }
  }
  ForGroups<4>(0, rows, [&](auto nr, int64_t r0) {
    AccumulateRows<decltype(nr)::value, KT>(scores + r0 * ld, ld, v, n, d, s.acc.data() + r0 * d,
                                            pf);
  });
}

// The lanes layout (many rows: prefill) puts query rows on vector lanes, so a broadcast key or
// value element meets kWide rows per instruction and the softmax runs kWide rows at a time:
// qt [d, rp] and acct [d, rp] (rp = rows rounded up to kWide), st [n, rp], m/l/alpha [rp].

// st[j, lanes] = sum_i k[j, i] * qt[i, lanes] for NJ keys x NV lane vectors.
template <int NJ, int NV>
inline void ScoreLanes(const float* qt, int64_t rp, const float* k, int64_t d, int64_t j0,
                       int64_t v0, float* st, PrefetchCursor& pf) {
  vwf a[NJ][NV] = {};
  for (int64_t i = 0; i < d; ++i) {
    pf.Step();
    vwf qv[NV];
    for (int c = 0; c < NV; ++c) qv[c] = LoadV<vwf>(qt + i * rp + (v0 + c) * kWide);
    for (int j = 0; j < NJ; ++j) {
      const vwf kv = SplatV<vwf>(k[(j0 + j) * d + i]);
      for (int c = 0; c < NV; ++c) a[j][c] = MulAdd(kv, qv[c], a[j][c]);
    }
  }
  for (int j = 0; j < NJ; ++j)
    for (int c = 0; c < NV; ++c) StoreV(st + (j0 + j) * rp + (v0 + c) * kWide, a[j][c]);
}

// The keys of one online-softmax step of a prefill tile: `count` consecutive blocks of the
// sequence from key position first_key, fp32 rows [n[b], d] of K and V each. Only the last
// block can be partial, so key j of the group sits at position first_key + j.
struct KeyGroup {
  int64_t first_key = 0, count = 0, keys = 0;
  const float* k[kGroupBlocksMax];
  const float* v[kGroupBlocksMax];
  int64_t n[kGroupBlocksMax];
};

// acct[i, lanes] = alpha[lanes] * acct[i, lanes] + sum_j v[j, i] * p[j, lanes] over the group's
// keys j in order, for ND head_dim elements x NV lane vectors.
template <int ND, int NV>
inline void AccumulateLanes(const float* p, int64_t rp, const KeyGroup& group, int64_t d,
                            const float* alpha, int64_t i0, int64_t v0, float* acct) {
  vwf a[ND][NV];
  for (int i = 0; i < ND; ++i)
    for (int c = 0; c < NV; ++c) {
      const int64_t at = (i0 + i) * rp + (v0 + c) * kWide;
      a[i][c] = LoadV<vwf>(acct + at) * LoadV<vwf>(alpha + (v0 + c) * kWide);
    }
  for (int64_t b = 0; b < group.count; ++b) {
    const float* v = group.v[b] + i0;
    for (int64_t j = 0; j < group.n[b]; ++j, p += rp) {
      vwf pv[NV];
      for (int c = 0; c < NV; ++c) pv[c] = LoadV<vwf>(p + (v0 + c) * kWide);
      for (int i = 0; i < ND; ++i) {
        const vwf vv = SplatV<vwf>(v[j * d + i]);
        for (int c = 0; c < NV; ++c) a[i][c] = MulAdd(vv, pv[c], a[i][c]);
      }
    }
  }
  for (int i = 0; i < ND; ++i)
    for (int c = 0; c < NV; ++c) StoreV(acct + (i0 + i) * rp + (v0 + c) * kWide, a[i][c]);
}

// pf.Step() calls AttendGroupLanes makes for rp lanes: one per head_dim element of each score
// group of each block.
inline int64_t LanesSteps(int64_t rp, const KeyGroup& group, int64_t d) {
  int64_t groups = 0;
  for (int64_t b = 0; b < group.count; ++b) {
    ForGroups<kWide / 2>(0, group.n[b], [&](auto, int64_t) {
      ForGroups<3>(0, rp / kWide, [&](auto, int64_t) { ++groups; });
    });
  }
  return groups * d;
}

// Online-softmax update of all rows (on lanes) with one group of keys. The next group's lines
// are requested while its scores are computed (pf.Pace(LanesSteps(...))): in the first half of
// the group's work, a line every 24 multiply-adds with 48 rows.
inline void AttendGroupLanes(const Options& opt, int64_t d, int64_t rp, const KeyGroup& group,
                             Scratch& s, PrefetchCursor& pf) {
  const int64_t nv = rp / kWide, n = group.keys;
  float* st = s.scores.data();
  for (int64_t b = 0, j_base = 0; b < group.count; j_base += group.n[b++]) {
    ForGroups<kWide / 2>(0, group.n[b], [&](auto nj, int64_t j0) {
      ForGroups<3>(0, nv, [&](auto nvs, int64_t v0) {
        ScoreLanes<decltype(nj)::value, decltype(nvs)::value>(s.q.data(), rp, group.k[b], d, j0,
                                                               v0, st + j_base * rp, pf);
      });
    });
  }
  const vwf neg_inf = SplatV<vwf>(-INFINITY);
  // Every key of the group visible to every real row: no masks (padded lanes are never stored).
  const int64_t first_key = group.first_key;
  const bool visible = first_key + n - 1 <= s.min_pos && first_key >= s.max_lo;
  for (int64_t c = 0; c < nv; ++c) {
    const vwf pos = LoadV<vwf>(s.pos.data() + c * kWide), lo = LoadV<vwf>(s.lo.data() + c * kWide);
    vwf row_max = neg_inf;
    for (int64_t j = 0; j < n; ++j) {
      float* sj = st + j * rp + c * kWide;
      vwf x = LoadV<vwf>(sj);
      if (opt.soft_cap > 0.0f) x = SoftCapV<vwf, vwi>(x, opt.soft_cap);
      if (!visible) {
        const vwf key = SplatV<vwf>(static_cast<float>(first_key + j));
        x = ((key <= pos) & (key >= lo)) ? x : neg_inf;
      }
      if (!visible || opt.soft_cap > 0.0f) StoreV(sj, x);
      row_max = row_max > x ? row_max : x;
    }
    const vwf m_old = LoadV<vwf>(s.m.data() + c * kWide);
    const vwf m_new = m_old > row_max ? m_old : row_max;
    // Rows that have seen nothing yet keep m = -inf; subtracting 0 keeps their p at 0, not NaN.
    const vwf m_ref = m_new == neg_inf ? SplatV<vwf>(0.0f) : m_new;
    const vwf alpha = ExpV<vwf, vwi>(m_old - m_ref);
    vwf row_sum = SplatV<vwf>(0.0f);
    for (int64_t j = 0; j < n; ++j) {
      float* sj = st + j * rp + c * kWide;
      const vwf p = ExpV<vwf, vwi>(LoadV<vwf>(sj) - m_ref);
      StoreV(sj, p);
      row_sum += p;
    }
    StoreV(s.l.data() + c * kWide, LoadV<vwf>(s.l.data() + c * kWide) * alpha + row_sum);
    StoreV(s.m.data() + c * kWide, m_new);
    StoreV(s.alpha.data() + c * kWide, alpha);
  }
  ForGroups<kWide / 2>(0, d, [&](auto nd, int64_t i0) {
    ForGroups<3>(0, nv, [&](auto nvs, int64_t v0) {
      AccumulateLanes<decltype(nd)::value, decltype(nvs)::value>(st, rp, group, d, s.alpha.data(),
                                                                  i0, v0, s.acc.data());
    });
  });
}

// Runs one piece. `next` is the piece this thread runs after it, or null.
template <typename QT, typename KVT>
void RunPiece(const Shapes& sh, const Options& opt, const QT* q, const KVT* k_pages,
              const KVT* v_pages, const int32_t* block_tables, const std::vector<Item>& items,
              const Piece& pc, const Piece* next, QT* out, Partials& partials, Scratch& s) {
  const Item& it = items[pc.item];
  const int64_t d = sh.head_dim, g = sh.group;
  const int64_t rows = (it.tok_end - it.tok_begin) * g;
  const bool lanes = it.lanes;
  const int64_t rp = lanes ? (rows + kWide - 1) / kWide * kWide : (rows + kLanes - 1) / kLanes * kLanes;
  const int64_t ld = (sh.block_size + kLanes - 1) / kLanes * kLanes;
  s.q.assign(rp * d, 0.0f);
  s.acc.assign(rp * d, 0.0f);
  s.m.assign(rp, -INFINITY);
  s.l.assign(rp, 0.0f);
  const int64_t group_blocks = GroupBlocks(sh.block_size);
  s.scores.resize(lanes ? group_blocks * sh.block_size * rp : rows * ld);
  s.k.resize(group_blocks * sh.block_size * d);
  s.v.resize(group_blocks * sh.block_size * d);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t token = it.row_begin + r / g;
    const int64_t head = it.kv_head * g + r % g;
    LoadQueryRow(q + (token * sh.num_q_heads + head) * d, opt.sm_scale * opt.k_scale[it.kv_head],
                 d, s.q.data() + r * d);
  }
  if (lanes) {
    // Queries to [d, rp]; each lane's visible key positions are [lo, pos] (padding: none).
    s.qt.resize(rp * d);
    for (int64_t r = 0; r < rp; ++r)
      for (int64_t i = 0; i < d; ++i) s.qt[i * rp + r] = s.q[r * d + i];
    std::swap(s.q, s.qt);
    s.alpha.resize(rp);
    s.pos.assign(rp, -1.0f);
    s.lo.assign(rp, 0.0f);
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t pos = it.first_pos + it.tok_begin + r / g;
      s.pos[r] = static_cast<float>(pos);
      if (opt.sliding_window > 0) s.lo[r] = static_cast<float>(pos - opt.sliding_window + 1);
    }
    s.min_pos = it.first_pos + it.tok_begin;
    s.max_lo = opt.sliding_window > 0 ? it.first_pos + it.tok_end - opt.sliding_window : 0;
  }
  const int64_t tile = sh.block_size * d;  // elements of one (block, KV head)
  // One step takes one block (decode rows) or the blocks of one key group (prefill tiles;
  // groups start at multiples of group_blocks, so the first may be shorter).
  auto step_end = [&](const Item& sit, int64_t b, int64_t blk_end) {
    return sit.lanes ? std::min<int64_t>(blk_end, (b / group_blocks + 1) * group_blocks) : b + 1;
  };
  // The K and V of block b of an item: pointers into the pages and the block's valid keys.
  auto block_at = [&](const Item& bit, int64_t b, const KVT** kb, const KVT** vb) {
    const int32_t* table = block_tables + bit.seq * sh.pages_per_seq;
    const int64_t block = std::clamp<int64_t>(table[b], 0, sh.num_blocks - 1);
    const int64_t offset = (block * sh.num_kv_heads + bit.kv_head) * tile;
    *kb = k_pages + offset;
    *vb = v_pages + offset;
    return std::min<int64_t>(sh.block_size, bit.kv_len - b * sh.block_size);
  };
  // Blocks are scattered over the pool, beyond what hardware prefetchers predict: the K and V
  // of the blocks ahead (past the last, those of the thread's next piece) are requested while a
  // step is computed, a few lines at a time: over all of a decode block's loops (the next block
  // into L1, the one after into L2), over the score loop of a prefill group (the next group;
  // requested at once, they stalled the tile: its first prefetches waited for free miss
  // buffers, 17 % of a long prompt's attention time).
  PrefetchCursor pf;
  auto queue = [&](const Item& qit, int64_t b, int64_t blk_end, bool into_l1) {
    for (int64_t e = step_end(qit, b, blk_end); b < e; ++b) {
      const KVT *kb, *vb;
      const int64_t n = block_at(qit, b, &kb, &vb);
      pf.Add(reinterpret_cast<const char*>(kb), reinterpret_cast<const char*>(vb),
             n * d * int64_t{sizeof(KVT)}, into_l1);
    }
  };
  // Queues the step starting at block e of this piece, else the next piece's first step, or
  // (e past blk_end) the decode block `e - blk_end` steps into a decode piece, if there is one.
  auto queue_step = [&](int64_t e, bool into_l1) {
    if (e < pc.blk_end) {
      queue(it, e, pc.blk_end, into_l1);
    } else if (next != nullptr && (e == pc.blk_end || !items[next->item].lanes) &&
               next->blk_begin + (e - pc.blk_end) < next->blk_end) {
      queue(items[next->item], next->blk_begin + (e - pc.blk_end), next->blk_end, into_l1);
    }
  };
  if (pc.blk_begin < pc.blk_end) {
    queue(it, pc.blk_begin, pc.blk_end, true);
    pf.Drain();
  }
  if (lanes) {  // prefill tiles compute long enough per block to widen it into scratch
    for (int64_t b = pc.blk_begin; b < pc.blk_end;) {
      const int64_t e = step_end(it, b, pc.blk_end);
      pf.Drain();  // the previous step's lines all requested, the next step's queued
      pf.Clear();
      queue_step(e, true);
      KeyGroup group;
      group.first_key = b * sh.block_size;
      for (; b < e; ++b, ++group.count) {
        const KVT *kb, *vb;
        const int64_t n = block_at(it, b, &kb, &vb);
        const int64_t at = group.keys * d;
        group.k[group.count] = BlockRows(kb, n, d, s.k.data() + at);
        group.v[group.count] = BlockRows(vb, n, d, s.v.data() + at);
        group.n[group.count] = n;
        group.keys += n;
      }
      pf.Pace(LanesSteps(rp, group, d));
      AttendGroupLanes(opt, d, rp, group, s, pf);
    }
  } else {  // decode rows do too little work per element to copy it: they widen in registers
    for (int64_t b = pc.blk_begin; b < pc.blk_end; ++b) {
      pf.Drain();
      pf.Clear();
      queue_step(b + 1, true);
      queue_step(b + 2, false);
      const KVT *kb, *vb;
      const int64_t n = block_at(it, b, &kb, &vb);
      pf.Pace(RowsSteps(rows, n, d));
      AttendBlockRows(sh, opt, it, rows, b, kb, vb, n, s, pf);
    }
  }
  if (lanes) {  // accumulators back to [rows, d]
    s.q.resize(rp * d);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t i = 0; i < d; ++i) s.q[r * d + i] = s.acc[i * rp + r];
    std::swap(s.q, s.acc);
  }
  if (pc.partial >= 0) {
    std::copy_n(s.m.begin(), rows, partials.m.begin() + pc.partial);
    std::copy_n(s.l.begin(), rows, partials.l.begin() + pc.partial);
    std::copy_n(s.acc.begin(), rows * d, partials.acc.begin() + pc.partial * d);
    return;
  }
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t token = it.row_begin + r / g;
    const int64_t head = it.kv_head * g + r % g;
    const float inv_l = s.l[r] > 0.0f ? opt.v_scale[it.kv_head] / s.l[r] : 0.0f;
    StoreOutputRow(s.acc.data() + r * d, inv_l, d, out + (token * sh.num_q_heads + head) * d);
  }
}

// Merges the partial softmax states of one split item's pieces, in piece order.
template <typename QT>
void MergePieces(const Shapes& sh, const Options& opt, const Item& it, const Piece* pieces,
                 int64_t count, const Partials& partials, QT* out) {
  const int64_t d = sh.head_dim, g = sh.group;
  const int64_t rows = (it.tok_end - it.tok_begin) * g;
  std::vector<float> acc(d);
  for (int64_t r = 0; r < rows; ++r) {
    float m = -INFINITY;
    for (int64_t p = 0; p < count; ++p) m = std::max(m, partials.m[pieces[p].partial + r]);
    float l = 0.0f;
    std::fill(acc.begin(), acc.end(), 0.0f);
    if (m != -INFINITY) {
      for (int64_t p = 0; p < count; ++p) {
        const int64_t at = pieces[p].partial + r;
        const float w = std::exp(partials.m[at] - m);
        l += w * partials.l[at];
        const float* src = partials.acc.data() + at * d;
        for (int64_t i = 0; i < d; ++i) acc[i] += w * src[i];
      }
    }
    const int64_t token = it.row_begin + r / g;
    const int64_t head = it.kv_head * g + r % g;
    StoreOutputRow(acc.data(), l > 0.0f ? opt.v_scale[it.kv_head] / l : 0.0f, d,
                   out + (token * sh.num_q_heads + head) * d);
  }
}

// Query tiles of every sequence. Padded sequences (q_len 0) give none.
std::vector<Item> PlanItems(const Shapes& sh, const Options& opt, const int32_t* kv_lens,
                            const int32_t* cu_q_lens) {
  std::vector<Item> items;
  const int64_t tile_tokens = std::max<int64_t>(1, kTileRows / sh.group);
  const int64_t max_kv = sh.pages_per_seq * sh.block_size;
  for (int64_t s = 0; s < sh.num_seqs; ++s) {
    const int64_t q_begin = std::clamp<int64_t>(cu_q_lens[s], 0, sh.num_tokens);
    const int64_t q_end = std::clamp<int64_t>(cu_q_lens[s + 1], q_begin, sh.num_tokens);
    const int64_t kv_len = std::clamp<int64_t>(kv_lens[s], 0, max_kv);
    const int64_t q_len = q_end - q_begin;
    const int64_t first_pos = kv_len - q_len;
    for (int64_t t0 = 0; t0 < q_len; t0 += tile_tokens) {
      const int64_t t1 = std::min(q_len, t0 + tile_tokens);
      const int64_t last_pos = first_pos + t1 - 1;  // keys beyond it are invisible to the tile
      const int64_t key_end = std::clamp<int64_t>(last_pos + 1, 0, kv_len);
      int64_t key_begin = 0;
      if (opt.sliding_window > 0) {
        key_begin = std::clamp<int64_t>(first_pos + t0 - opt.sliding_window + 1, 0, key_end);
      }
      for (int64_t h = 0; h < sh.num_kv_heads; ++h) {
        Item it;
        it.seq = s;
        it.kv_head = h;
        it.row_begin = q_begin + t0;
        it.tok_begin = t0;
        it.tok_end = t1;
        it.first_pos = first_pos;
        it.kv_len = kv_len;
        it.blk_begin = key_begin / sh.block_size;
        it.blk_end = (key_end + sh.block_size - 1) / sh.block_size;
        if (it.blk_begin >= it.blk_end) it.blk_begin = it.blk_end = 0;
        it.lanes = q_len > 1;
        items.push_back(it);
      }
    }
  }
  return items;
}

// Splits each decode item's block range at every multiple of the segment's blocks.
std::vector<Piece> PlanPieces(const Shapes& sh, const std::vector<Item>& items,
                              int64_t* partial_rows) {
  const int64_t segment = std::max<int64_t>(1, kSegmentTokens / sh.block_size);
  std::vector<Piece> pieces;
  *partial_rows = 0;
  for (size_t i = 0; i < items.size(); ++i) {
    const Item& it = items[i];
    const int64_t rows = (it.tok_end - it.tok_begin) * sh.group;
    auto piece_end = [&](int64_t begin) {
      return it.lanes ? it.blk_end : std::min<int64_t>(it.blk_end, (begin / segment + 1) * segment);
    };
    const bool split = piece_end(it.blk_begin) < it.blk_end;
    int64_t begin = it.blk_begin;
    do {
      Piece pc;
      pc.item = static_cast<int32_t>(i);
      pc.blk_begin = static_cast<int32_t>(begin);
      pc.blk_end = static_cast<int32_t>(piece_end(begin));
      pc.partial = -1;
      if (split) {
        pc.partial = *partial_rows;
        *partial_rows += rows;
      }
      pc.work = rows * (pc.blk_end - pc.blk_begin + 1);
      pieces.push_back(pc);
      begin = pc.blk_end;
    } while (begin < it.blk_end);
  }
  return pieces;
}

template <typename QT, typename KVT>
void Attend(ffi::ThreadPool& pool, const Shapes& sh, const Options& opt, const QT* q,
            const KVT* k_pages, const KVT* v_pages, const int32_t* kv_lens,
            const int32_t* block_tables, const int32_t* cu_q_lens, QT* out) {
  // Rows no sequence owns (padding after cu_q_lens[-1]) are zeros.
  const int64_t row_elems = sh.num_q_heads * sh.head_dim;
  const int64_t used_begin = std::clamp<int64_t>(cu_q_lens[0], 0, sh.num_tokens);
  const int64_t used_end = std::clamp<int64_t>(cu_q_lens[sh.num_seqs], used_begin, sh.num_tokens);
  std::fill(out, out + used_begin * row_elems, QT{0});
  std::fill(out + used_end * row_elems, out + sh.num_tokens * row_elems, QT{0});

  const std::vector<Item> items = PlanItems(sh, opt, kv_lens, cu_q_lens);
  int64_t partial_rows = 0;
  const std::vector<Piece> pieces = PlanPieces(sh, items, &partial_rows);
  Partials partials;
  partials.m.resize(partial_rows);
  partials.l.resize(partial_rows);
  partials.acc.resize(partial_rows * sh.head_dim);

  // Heaviest pieces first, so the last ones to finish are short.
  std::vector<int64_t> order(pieces.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return pieces[a].work > pieces[b].work; });
  ParallelFor(pool, static_cast<int64_t>(order.size()), [&](int64_t i, int64_t next) {
    thread_local Scratch scratch;
    RunPiece(sh, opt, q, k_pages, v_pages, block_tables, items, pieces[order[i]],
             next >= 0 ? &pieces[order[next]] : nullptr, out, partials, scratch);
  });

  // Split items: merge their pieces (adjacent in `pieces`, in block order).
  std::vector<std::pair<size_t, size_t>> splits;  // (first piece, piece count) per split item
  for (size_t p = 0; p < pieces.size();) {
    size_t e = p + 1;
    while (e < pieces.size() && pieces[e].item == pieces[p].item) ++e;
    if (pieces[p].partial >= 0) splits.emplace_back(p, e - p);
    p = e;
  }
  ParallelFor(pool, static_cast<int64_t>(splits.size()), [&](int64_t i, int64_t) {
    const auto [first, count] = splits[i];
    MergePieces(sh, opt, items[pieces[first].item], &pieces[first], count, partials, out);
  });
}

// Pointers to the operands, typed by the caller's dispatch.
struct Operands {
  const void *q, *k_pages, *v_pages;
  const int32_t *kv_lens, *block_tables, *cu_q_lens;
  void* out;
};

template <typename QT>
ffi::Error AttendForKV(ffi::ThreadPool& pool, const Shapes& sh, const Options& opt,
                       ffi::DataType kv_type, const Operands& o) {
  auto run = [&](auto kv_tag) {
    using KVT = decltype(kv_tag);
    Attend(pool, sh, opt, static_cast<const QT*>(o.q), static_cast<const KVT*>(o.k_pages),
           static_cast<const KVT*>(o.v_pages), o.kv_lens, o.block_tables, o.cu_q_lens,
           static_cast<QT*>(o.out));
    return ffi::Error::Success();
  };
  switch (kv_type) {
    case ffi::DataType::F32: return run(float{});
    case ffi::DataType::BF16: return run(uint16_t{});
    case ffi::DataType::S8: return run(int8_t{});
    case ffi::DataType::F8E4M3FN: return run(Fp8E4M3FN{});
    case ffi::DataType::F8E5M2: return run(Fp8E5M2{});
    default:
      return ffi::Error::InvalidArgument(
          "ragged_paged_attention: KV pages must be float32, bfloat16, int8, float8_e4m3fn or "
          "float8_e5m2");
  }
}

ffi::Error RaggedPagedAttentionImpl(ffi::ThreadPool pool, ffi::AnyBuffer q,
                                    ffi::AnyBuffer k_pages, ffi::AnyBuffer v_pages,
                                    ffi::Buffer<ffi::S32> kv_lens,
                                    ffi::Buffer<ffi::S32> block_tables,
                                    ffi::Buffer<ffi::S32> cu_q_lens,
                                    ffi::Buffer<ffi::F32> k_scale, ffi::Buffer<ffi::F32> v_scale,
                                    ffi::Result<ffi::AnyBuffer> out, float sm_scale,
                                    int32_t sliding_window, float soft_cap) {
  auto qd = q.dimensions();
  auto kd = k_pages.dimensions();
  auto bd = block_tables.dimensions();
  if (qd.size() != 3 || kd.size() != 4 || bd.size() != 2) {
    return ffi::Error::InvalidArgument("ragged_paged_attention: bad ranks: q " + Dims(qd) +
                                       ", k_pages " + Dims(kd) + ", block_tables " + Dims(bd));
  }
  Shapes sh{qd[0], qd[1], qd[2], kd[0], kd[1], kd[2], bd[0], bd[1], 0};
  if (sh.num_kv_heads <= 0 || sh.num_q_heads % sh.num_kv_heads != 0 || kd[3] != sh.head_dim ||
      sh.head_dim % kLanes != 0 || v_pages.dimensions().size() != 4 ||
      !std::equal(kd.begin(), kd.end(), v_pages.dimensions().begin()) ||
      k_pages.element_type() != v_pages.element_type() ||
      kv_lens.dimensions()[0] != sh.num_seqs || cu_q_lens.dimensions()[0] != sh.num_seqs + 1 ||
      k_scale.element_count() != static_cast<size_t>(sh.num_kv_heads) ||
      v_scale.element_count() != static_cast<size_t>(sh.num_kv_heads)) {
    return ffi::Error::InvalidArgument(
        "ragged_paged_attention: inconsistent shapes: q " + Dims(qd) + ", k_pages " + Dims(kd) +
        ", v_pages " + Dims(v_pages.dimensions()) + ", kv_lens " + Dims(kv_lens.dimensions()) +
        ", block_tables " + Dims(bd) + ", cu_q_lens " + Dims(cu_q_lens.dimensions()) +
        ", k_scale " + Dims(k_scale.dimensions()) + ", v_scale " + Dims(v_scale.dimensions()));
  }
  sh.group = sh.num_q_heads / sh.num_kv_heads;
  if (sh.num_seqs == 0 || sh.num_tokens == 0) return ffi::Error::Success();
  const Options opt{sm_scale, sliding_window, soft_cap, k_scale.typed_data(),
                    v_scale.typed_data()};
  const Operands o{q.untyped_data(),      k_pages.untyped_data(),    v_pages.untyped_data(),
                   kv_lens.typed_data(),  block_tables.typed_data(), cu_q_lens.typed_data(),
                   out->untyped_data()};
  if (out->element_type() != q.element_type()) {
    return ffi::Error::InvalidArgument("ragged_paged_attention: out and q dtypes differ");
  }
  switch (q.element_type()) {
    case ffi::DataType::F32: return AttendForKV<float>(pool, sh, opt, k_pages.element_type(), o);
    case ffi::DataType::BF16:
      return AttendForKV<uint16_t>(pool, sh, opt, k_pages.element_type(), o);
    default:
      return ffi::Error::InvalidArgument("ragged_paged_attention: q must be float32 or bfloat16");
  }
}

// Copies each new token's K and V rows ([num_kv_heads, head_dim], any element type) into the
// slot slot_mapping[t] of the pages, in place: the outputs alias the page operands. XLA's own
// scatter rewrites the whole pool for 2-byte float pages on CPU (it widens them to f32 first).
ffi::Error WriteKVImpl(ffi::AnyBuffer k_pages, ffi::AnyBuffer v_pages, ffi::AnyBuffer k,
                       ffi::AnyBuffer v, ffi::Buffer<ffi::S32> slot_mapping,
                       ffi::Result<ffi::AnyBuffer> k_out, ffi::Result<ffi::AnyBuffer> v_out) {
  auto pd = k_pages.dimensions();
  auto kd = k.dimensions();
  if (pd.size() != 4 || kd.size() != 3 || k.element_type() != k_pages.element_type() ||
      v.element_type() != v_pages.element_type() ||
      k_pages.element_type() != v_pages.element_type() ||
      !std::equal(pd.begin(), pd.end(), v_pages.dimensions().begin()) ||
      !std::equal(kd.begin(), kd.end(), v.dimensions().begin()) || kd[1] != pd[1] ||
      kd[2] != pd[3] || slot_mapping.dimensions()[0] != kd[0]) {
    return ffi::Error::InvalidArgument("write_kv: inconsistent operands: pages " + Dims(pd) +
                                       ", k " + Dims(kd) + ", slot_mapping " +
                                       Dims(slot_mapping.dimensions()));
  }
  const int64_t num_blocks = pd[0], heads = pd[1], block_size = pd[2];
  const size_t row_bytes = k.size_bytes() / std::max<int64_t>(1, kd[0] * heads);
  const int32_t* slots = slot_mapping.typed_data();
  auto write = [&](const ffi::AnyBuffer& pages, const ffi::AnyBuffer& src, ffi::AnyBuffer* dst) {
    auto* out = static_cast<char*>(dst->untyped_data());
    if (out != pages.untyped_data()) std::memcpy(out, pages.untyped_data(), pages.size_bytes());
    const auto* in = static_cast<const char*>(src.untyped_data());
    for (int64_t t = 0; t < kd[0]; ++t) {
      const int64_t block = std::clamp<int64_t>(slots[t] / block_size, 0, num_blocks - 1);
      const int64_t offset = std::clamp<int64_t>(slots[t] % block_size, 0, block_size - 1);
      for (int64_t h = 0; h < heads; ++h) {
        std::memcpy(out + ((block * heads + h) * block_size + offset) * row_bytes,
                    in + (t * heads + h) * row_bytes, row_bytes);
      }
    }
  };
  write(k_pages, k, &*k_out);
  write(v_pages, v, &*v_out);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JpagedRaggedPagedAttention, RaggedPagedAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()          // q
                                  .Arg<ffi::AnyBuffer>()          // k_pages
                                  .Arg<ffi::AnyBuffer>()          // v_pages
                                  .Arg<ffi::Buffer<ffi::S32>>()  // kv_lens
                                  .Arg<ffi::Buffer<ffi::S32>>()  // block_tables
                                  .Arg<ffi::Buffer<ffi::S32>>()  // cu_q_lens
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k_scale
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v_scale
                                  .Ret<ffi::AnyBuffer>()          // out
                                  .Attr<float>("sm_scale")
                                  .Attr<int32_t>("sliding_window")
                                  .Attr<float>("soft_cap"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JpagedWriteKV, WriteKVImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()          // k_pages
                                  .Arg<ffi::AnyBuffer>()          // v_pages
                                  .Arg<ffi::AnyBuffer>()          // k
                                  .Arg<ffi::AnyBuffer>()          // v
                                  .Arg<ffi::Buffer<ffi::S32>>()  // slot_mapping
                                  .Ret<ffi::AnyBuffer>()          // k_pages (aliases arg 0)
                                  .Ret<ffi::AnyBuffer>());        // v_pages (aliases arg 1)
