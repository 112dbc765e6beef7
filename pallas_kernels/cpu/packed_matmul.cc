// x @ w for CPUs with w prepacked into column panels, registered with XLA as typed FFI handlers.
//
// Same contract as pallas_kernels/reference.py's packed_matmul, in two formats:
//   float32:  x f32[M, K], panels f32[P, K, 48]: w f32[K, N] as P = ceil(N / 48) panels of 48
//             columns (the last one zero-padded);
//   bfloat16: x bf16[M, K], panels bf16[P, K / 2, 48, 2]: the same panels with each pair of
//             rows k, k + 1 interleaved, so one 32-bit lane holds a column's two weights (K even).
//   q4:       x f32[M, K], values u8[P, K / 2, 48], scale and offset f32[P, K / 32, 48]: 4-bit
//             weights (GGUF Q4_0 / Q4_1) in the same panels. Byte (k / 2, c) holds column c's
//             values of rows k and k + 1 in its low and high nibble, and each 32-row block of a
//             column has w = nibble * scale + offset.
//   q8:       x f32[M, K], values i8[P, K, 48], scale f32[P, K / 32, 48]: 8-bit weights (GGUF
//             Q8_0), w = value * scale of its 32-row block.
// For q4 and q8, K is a multiple of 32. out is f32[M, N] in every format. Only x's first
// num_rows rows (an i32 scalar, clamped to [0, M]) are multiplied; out's rows from num_rows on
// are zeros, so a step padded to a bucket pays for its real tokens only. A panel is contiguous, so the kernel streams each weight byte once
// from memory in address order, however few rows x has; XLA:CPU's dot reads w [K, N] with a
// stride of N and falls behind at decode sizes (M <= 64), in bfloat16 by 10-15x at M = 1.
//
// Work items are (row chunk, panel) pairs on XLA's FFI thread pool, each thread taking a
// contiguous range of them, so its panels stream from memory as one run. Within an item, K is cut
// into chunks (256 k with AVX-512, 128 otherwise) whose panel rows stay in cache while every
// 8-row (AVX-512) or 4-row (otherwise) block of x passes over them; each block keeps its 8 x 48
// or 4 x 24 outputs in registers for the whole chunk, then adds them to the output. The order of
// the additions depends on neither the split between threads nor the number of rows, so neither
// do the results.
//
// q4 and q8 panels are dequantized a chunk at a time into float32 panel rows, which are exactly
// the values dequantizing at load would have packed (value * scale is exact in float32), and are
// multiplied as float32: the results are bit-identical to the float32 format's, from a fifth
// (q4, 6 bits per weight) or a third (q8) of the bytes. Work items of few rows (decode) instead
// dequantize each panel row in registers right before its multiply-adds, once per block of rows:
// the same values and sums, without the round trip through cache.
//
// bfloat16 products use AMX tiles where the CPU and the OS allow it and K is a multiple of 32
// (6.5x vdpbf16ps at 512 rows on a Sapphire Rapids-class core), else AVX512-BF16's vdpbf16ps
// (both weights of a lane times the matching pair of x, added in float32), else the pairs
// widened to float32 in registers (a bfloat16 is the top half of a float32) and FMAs. Which one
// depends only on the CPU and K, never on the rows, so a row's result is the same in any batch.
//
// q4 rows from the caller's `vector_rows` on (an i32 scalar; the engine's prompt rows, packed
// after the decodes) use AMX tiles where the CPU and the OS allow it: x split exactly into three
// bfloat16, nibbles as bfloat16, scale and offset applied per GGUF block (AmxQ4PanelProduct).
// Rows before it, and every row elsewhere, take the vector path. Each row's sums are its own on
// either path, so a row's result depends on its side of vector_rows, never on the other rows.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#include <sys/syscall.h>
#include <unistd.h>
#define JPAGED_AMX 1
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

constexpr int64_t kPanel = 48;  // columns per panel: 3 AVX-512 or 6 AVX2 vectors

#if defined(__AVX512F__)
constexpr int kLanes = 16;
constexpr int kBlockRows = 8;  // 8 rows x 3 vectors = 24 accumulators of 32 registers
#else
constexpr int kLanes = 8;
constexpr int kBlockRows = 4;  // 4 rows x 3 vectors = 12 accumulators of 16 registers
#endif
typedef float vec __attribute__((vector_size(kLanes * 4)));
typedef uint32_t uvec __attribute__((vector_size(kLanes * 4)));
typedef int32_t ivec __attribute__((vector_size(kLanes * 4)));
constexpr int kVectors = 3;                        // vectors per row of a block
constexpr int64_t kSliceCols = kVectors * kLanes;  // 48 with AVX-512, 24 otherwise

constexpr int64_t kPrefetchRows = 32;  // panel rows ahead of the one being read
constexpr int64_t kRowChunk = 256;  // rows of x per work item
constexpr int64_t kValuePrefetchBytes = 2304;  // q4 / q8 values ahead of those dequantized
// Work items of at most this many rows of x (decode) dequantize q4 / q8 weights in registers,
// each block of rows anew, instead of once per chunk into cache. Measured on one Zen 5 core, q4
// gate-sized weights streamed from memory: with AVX-512 1.65x at 4 rows, 1.2x at 8, 1.06x at 16,
// even at 24, 0.96x at 32; AVX2 code, 1.5x at 1 and 2 rows, 1.3x at 4, even at 16.
#if defined(__AVX512F__)
constexpr int64_t kMaxInRegisterRows = 16;
#else
constexpr int64_t kMaxInRegisterRows = 4;
#endif

// The two formats. A panel row holds kDepth consecutive k of kPanel columns (192 bytes in both);
// its 32-bit lanes hold one float, or the two bfloat16 weights of one column.
struct F32 {
  using T = float;
  static constexpr int64_t kDepth = 1;
};
struct BF16 {
  using T = uint16_t;  // the bits of a bfloat16
  static constexpr int64_t kDepth = 2;
};

template <typename V>
inline V LoadVec(const void* p) {
  V v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void StoreVec(float* p, vec v) { std::memcpy(p, &v, sizeof(v)); }

// kLanes bytes from p, widened to 32-bit lanes (zero- or sign-extended): GCC turns
// __builtin_convertvector into scalar code here.
template <bool kSigned>
inline ivec WidenBytes(const uint8_t* p) {
#if defined(__AVX512F__)
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return (ivec)(kSigned ? _mm512_cvtepi8_epi32(bytes) : _mm512_cvtepu8_epi32(bytes));
#elif defined(__AVX2__)
  const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  return (ivec)(kSigned ? _mm256_cvtepi8_epi32(bytes) : _mm256_cvtepu8_epi32(bytes));
#else
  ivec v;
  for (int i = 0; i < kLanes; ++i) v[i] = kSigned ? int32_t{static_cast<int8_t>(p[i])} : int32_t{p[i]};
  return v;
#endif
}

inline vec ToFloat(ivec v) { return __builtin_convertvector(v, vec); }

inline float WidenBF16(uint16_t bits) {  // a bfloat16 is the top half of a float32
  const uint32_t wide = uint32_t{bits} << 16;
  float f;
  std::memcpy(&f, &wide, sizeof(f));
  return f;
}

// acc[r] += x row r's k values of panel row `row` times that row's kSliceCols columns.
template <typename Format, int ROWS>
inline void Accumulate(const typename Format::T* x, int64_t ldx, const typename Format::T* row,
                       vec (&acc)[ROWS][kVectors]) {
  if constexpr (Format::kDepth == 1) {
    vec w[kVectors];
#pragma GCC unroll 3
    for (int j = 0; j < kVectors; ++j) w[j] = LoadVec<vec>(row + j * kLanes);
#if defined(__AVX2__) && !defined(__AVX512F__)
    // Keep the 3 weight vectors in registers (12 accumulators + 3 + the broadcast x = all 16):
    // GCC otherwise reloads them as memory operands of each FMA, 16 loads per 12 FMAs, and the
    // kernel ran at 0.73x XLA's dot at 512 rows on a Zen 3, load-port bound.
    asm("" : "+x"(w[0]), "+x"(w[1]), "+x"(w[2]));
#endif
#pragma GCC unroll 8
    for (int r = 0; r < ROWS; ++r) {
      const float a = x[r * ldx];
#pragma GCC unroll 3
      for (int j = 0; j < kVectors; ++j) acc[r][j] += a * w[j];
    }
  } else {
#if defined(__AVX512BF16__)
    __m512bh w[kVectors];
#pragma GCC unroll 3
    for (int j = 0; j < kVectors; ++j) w[j] = LoadVec<__m512bh>(row + 2 * j * kLanes);
#pragma GCC unroll 8
    for (int r = 0; r < ROWS; ++r) {
      const __m512bh a = (__m512bh)_mm512_set1_epi32(LoadVec<int32_t>(x + r * ldx));
#pragma GCC unroll 3
      for (int j = 0; j < kVectors; ++j) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], a, w[j]);
    }
#else
    float a[ROWS][2];
#pragma GCC unroll 8
    for (int r = 0; r < ROWS; ++r) {
      a[r][0] = WidenBF16(x[r * ldx]);
      a[r][1] = WidenBF16(x[r * ldx + 1]);
    }
#pragma GCC unroll 3
    for (int j = 0; j < kVectors; ++j) {
      const uvec pairs = LoadVec<uvec>(row + 2 * j * kLanes);
      const vec even = (vec)(pairs << 16);         // the weights of row k
      const vec odd = (vec)(pairs & 0xFFFF0000u);  // the weights of row k + 1
#pragma GCC unroll 8
      for (int r = 0; r < ROWS; ++r) {
        acc[r][j] += a[r][0] * even;
        acc[r][j] += a[r][1] * odd;
      }
    }
#endif
  }
}

// out[r, slice] = acc[r] (or += with `accumulate`) for a block's ROWS rows.
template <int ROWS>
inline void StoreBlock(const vec (&acc)[ROWS][kVectors], float* out, int64_t ldo, bool accumulate) {
#pragma GCC unroll 8
  for (int r = 0; r < ROWS; ++r) {
#pragma GCC unroll 3
    for (int j = 0; j < kVectors; ++j) {
      float* o = out + r * ldo + j * kLanes;
      StoreVec(o, accumulate ? LoadVec<vec>(o) + acc[r][j] : acc[r][j]);
    }
  }
}

// out[r, 0:kSliceCols] (+)= x[r, 0:kc] @ w[0:kc, slice] for ROWS rows, where the slice's panel
// rows start at b, kDepth * kPanel elements apart. With `prefetch`, the panel rows
// kPrefetchRows ahead are requested into L2 (prefetcht1, whose miss queue is deeper than L1's:
// on a Zen 4 the 210 fp32 linears took 20 ms at 16 rows with it, 23-27 with prefetcht0). The
// chunk's sum starts from zero and is added to `out` at the end: sums of short runs round less
// than one long running sum.
template <typename Format, int ROWS>
inline void Block(const typename Format::T* x, int64_t ldx, const typename Format::T* b, int64_t kc,
                  float* out, int64_t ldo, bool accumulate, bool prefetch) {
  constexpr int64_t kRowElems = Format::kDepth * kPanel;
  vec acc[ROWS][kVectors] = {};
  for (int64_t k = 0; k < kc; k += Format::kDepth) {
    const typename Format::T* row = b + k * kPanel;
    if (prefetch) {
      const char* ahead = reinterpret_cast<const char*>(row + kPrefetchRows * kRowElems);
      __builtin_prefetch(ahead, 0, 2);
      __builtin_prefetch(ahead + 64, 0, 2);
      __builtin_prefetch(ahead + 128, 0, 2);
    }
    Accumulate<Format, ROWS>(x + k, ldx, row, acc);
  }
  StoreBlock(acc, out, ldo, accumulate);
}

// Where the product of panel p and rows r0.. of x goes: straight into out f32[M, N], or for a
// last panel narrower than kPanel into `tail` (kRowChunk x kPanel floats of scratch), whose
// padded columns must not reach out; CopyTail then moves its real columns.
struct PanelOutput {
  float* dst;   // row r0, the panel's first column
  int64_t ldo;  // floats from one row of dst to the next
};

inline PanelOutput PanelDestination(float* out, int64_t N, int64_t p, int64_t r0, float* tail) {
  if (N - p * kPanel < kPanel) return {tail, kPanel};
  return {out + r0 * N + p * kPanel, N};
}

inline void CopyTail(const float* tail, float* out, int64_t N, int64_t p, int64_t r0, int64_t r1) {
  const int64_t col0 = p * kPanel, width = N - col0;
  if (width >= kPanel) return;
  for (int64_t r = r0; r < r1; ++r) {
    std::memcpy(out + r * N + col0, tail + (r - r0) * kPanel, width * sizeof(float));
  }
}

#if defined(JPAGED_AMX)
// AMX (Sapphire Rapids and later): one TDPBF16PS multiplies a tile of 16 rows x 32 k of x by a
// tile of 16 pairs of rows x 16 columns of weights, 8,192 multiply-adds, 16x a vdpbf16ps. A
// bfloat16 panel row (one pair of k, 48 columns x 2) is 192 bytes, so 16 consecutive panel rows
// are three weight tiles of 64-byte rows 192 bytes apart: the panels are read in place.

// Whether this process may use AMX: Linux grants the tile state on request, once per process.
bool AmxUsable() {
  constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  static const bool usable = syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  return usable;
}

// Tiles 0-2: the outputs of `rows` rows x 48 columns (float32, 16 columns each); tile 3: those
// rows' x, 32 k; tiles 4-6: 32 k of the panel, 16 columns each.
void ConfigureTiles(int rows) {
  struct alignas(64) {
    uint8_t palette = 1, start_row = 0, reserved[14] = {};
    uint16_t bytes_per_row[16] = {};
    uint8_t rows[16] = {};
  } config;
  for (int t = 0; t < 7; ++t) {
    config.bytes_per_row[t] = 64;
    config.rows[t] = t >= 4 ? 16 : rows;
  }
  _tile_loadconfig(&config);
}

// out[0:rows, 0:48] = x[0:rows, 0:K] @ one bfloat16 panel, K a multiple of 32, rows the count
// ConfigureTiles was given. Each row's sum is its own, so it does not depend on the other rows.
void AmxBlock(const uint16_t* x, int64_t K, const uint16_t* panel, float* out, int64_t ldo) {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  for (int64_t k = 0; k < K; k += 32) {
    const uint16_t* rows = panel + k * kPanel;  // panel row k / 2
    _tile_loadd(3, x + k, K * 2);
    _tile_loadd(4, rows, kPanel * 4);
    _tile_loadd(5, rows + 32, kPanel * 4);
    _tile_loadd(6, rows + 64, kPanel * 4);
    _tile_dpbf16ps(0, 3, 4);
    _tile_dpbf16ps(1, 3, 5);
    _tile_dpbf16ps(2, 3, 6);
  }
  _tile_stored(0, out, ldo * 4);
  _tile_stored(1, out + 16, ldo * 4);
  _tile_stored(2, out + 32, ldo * 4);
}

// PanelProduct's work with AMX, for K a multiple of 32: blocks of 16 rows of x, then one of the
// rest, each over the whole panel (K / 2 x 192 bytes, in L2 after the first block).
void AmxPanelProduct(const uint16_t* x, int64_t K, int64_t N, const uint16_t* panel, int64_t p, int64_t r0,
                     int64_t r1, float* out, float* tail) {
  const PanelOutput to = PanelDestination(out, N, p, r0, tail);
  float* const dst = to.dst;
  const int64_t ldo = to.ldo;
  int configured = 0;
  for (int64_t r = r0; r < r1; r += 16) {
    const int rows = static_cast<int>(std::min<int64_t>(16, r1 - r));
    if (rows != configured) ConfigureTiles(configured = rows);
    AmxBlock(x + r * K, K, panel, dst + (r - r0) * ldo, ldo);
  }
  _tile_release();
  CopyTail(tail, out, N, p, r0, r1);
}
#endif  // JPAGED_AMX

// Where PanelProduct finds a chunk of one panel's rows. Float32 and bfloat16 panels are read in
// place, from memory, so the first pass over a chunk requests its rows ahead.
template <typename Format>
struct InPlaceChunks {
  static constexpr bool kFromMemory = true;
  const typename Format::T* panel;
  const typename Format::T* Rows(int64_t k0, int64_t) const { return panel + k0 * kPanel; }
};

template <typename Format>
struct InPlacePanels {
  const typename Format::T* panels;  // [P, K * kPanel] elements
  InPlaceChunks<Format> Panel(int64_t p, int64_t K) const { return {panels + p * K * kPanel}; }
};

// q4 (kBits 4) or q8 (kBits 8) panel rows k0 .. k0 + kc dequantized into `rows` (f32[kc, kPanel],
// in cache), k0 a multiple of kQuantBlock and kc even.
template <int kBits>
struct QuantizedChunks {
  static constexpr bool kFromMemory = false;
  const uint8_t* values;  // u8[K / 2, kPanel] (q4) or i8[K, kPanel] (q8)
  const float* scale;     // [K / 32, kPanel]
  const float* offset;    // [K / 32, kPanel] (q4)
  float* rows;            // kChunkK * kPanel floats of the calling thread

  // A work item streams one panel's few KiB: too short a run for the hardware prefetcher. At
  // panel row k, whose values are at v and scales (and offsets) at `block`, requests the values
  // kValuePrefetchBytes ahead and, at a GGUF block's first row, the scales two blocks ahead.
  void RequestAhead(const uint8_t* v, int64_t k, int64_t block) const {
    __builtin_prefetch(v + kValuePrefetchBytes, 0, 2);
    if (k % kQuantBlock == 0) {
      for (int64_t line = 0; line < kPanel * 4; line += 64) {
        __builtin_prefetch(reinterpret_cast<const char*>(scale + block + 2 * kPanel) + line, 0, 2);
        if constexpr (kBits == 4) {
          __builtin_prefetch(reinterpret_cast<const char*>(offset + block + 2 * kPanel) + line, 0, 2);
        }
      }
    }
  }

  // GGUF block by block, and within a block kLanes columns at a time, so each scale (and offset)
  // vector is loaded once per block. The pointers are copied to locals: the stores (memcpy)
  // may alias the struct's members, which GCC otherwise reloads for every vector.
  const float* Rows(int64_t k0, int64_t kc) const {
    constexpr int64_t kRowsPerStep = kBits == 4 ? 2 : 1;  // weight rows per kPanel bytes of values
    constexpr int64_t kSteps = kQuantBlock / kRowsPerStep;  // kPanel-byte steps per GGUF block
    const uint8_t* const first_value = values;
    const float* const block_scale = scale;
    const float* const block_offset = offset;
    float* const out = rows;
    for (int64_t k = 0; k < kc; k += kQuantBlock) {
      const uint8_t* v = first_value + (k0 + k) / kRowsPerStep * kPanel;
      const int64_t block = (k0 + k) / kQuantBlock * kPanel;  // the block's scales (and offsets)
      for (int64_t step = 0; step < kSteps; ++step) {
        RequestAhead(v + step * kPanel, k0 + k + step * kRowsPerStep, block);
      }
      float* row = out + k * kPanel;
      for (int64_t c = 0; c < kPanel; c += kLanes) {
        const vec sv = LoadVec<vec>(block_scale + block + c);
        if constexpr (kBits == 4) {
          const vec ov = LoadVec<vec>(block_offset + block + c);
#pragma GCC unroll 4
          for (int64_t step = 0; step < kSteps; ++step) {
            const ivec pair = WidenBytes<false>(v + step * kPanel + c);
            StoreVec(row + 2 * step * kPanel + c, ToFloat(pair & 15) * sv + ov);
            StoreVec(row + (2 * step + 1) * kPanel + c, ToFloat(pair >> 4) * sv + ov);
          }
        } else {
#pragma GCC unroll 4
          for (int64_t step = 0; step < kSteps; ++step) {
            StoreVec(row + step * kPanel + c, ToFloat(WidenBytes<true>(v + step * kPanel + c)) * sv);
          }
        }
      }
    }
    return rows;
  }

  // out[r, c:c + kSliceCols] (+)= x[r, 0:kc] @ the slice's panel rows k0 .. k0 + kc for ROWS rows,
  // dequantizing each pair of panel rows (q4) or each row (q8) in registers just before its
  // multiply-adds. The same products and sums as Rows() then Block(), so the same results.
  template <int ROWS>
  void Multiply(int64_t k0, int64_t kc, int64_t c, const float* x, int64_t ldx, float* out, int64_t ldo,
                bool accumulate) const {
    constexpr int64_t kRowsPerStep = kBits == 4 ? 2 : 1;
    vec acc[ROWS][kVectors] = {};
    for (int64_t k = 0; k < kc; k += kRowsPerStep) {
      const uint8_t* v = values + (k0 + k) / kRowsPerStep * kPanel + c;
      const int64_t block = (k0 + k) / kQuantBlock * kPanel + c;
      RequestAhead(v, k0 + k, block);
      vec w[kRowsPerStep][kVectors];
#pragma GCC unroll 3
      for (int j = 0; j < kVectors; ++j) {
        const vec sv = LoadVec<vec>(scale + block + j * kLanes);
        if constexpr (kBits == 4) {
          const ivec pair = WidenBytes<false>(v + j * kLanes);
          const vec ov = LoadVec<vec>(offset + block + j * kLanes);
          w[0][j] = ToFloat(pair & 15) * sv + ov;
          w[1][j] = ToFloat(pair >> 4) * sv + ov;
        } else {
          w[0][j] = ToFloat(WidenBytes<true>(v + j * kLanes)) * sv;
        }
      }
#pragma GCC unroll 2
      for (int h = 0; h < kRowsPerStep; ++h) {
#pragma GCC unroll 8
        for (int r = 0; r < ROWS; ++r) {
          const float a = x[r * ldx + k + h];
#pragma GCC unroll 3
          for (int j = 0; j < kVectors; ++j) acc[r][j] += a * w[h][j];
        }
      }
    }
    StoreBlock(acc, out, ldo, accumulate);
  }
};

template <int kBits>
struct QuantizedPanels {
  const uint8_t* values;
  const float* scale;
  const float* offset;  // nullptr for q8
  QuantizedChunks<kBits> Panel(int64_t p, int64_t K) const {
    thread_local float rows[kChunkK * kPanel];
    const int64_t blocks = K / kQuantBlock * kPanel;
    return {values + p * (K * kBits / 8) * kPanel, scale + p * blocks,
            offset == nullptr ? nullptr : offset + p * blocks, rows};
  }
};

#if defined(JPAGED_AMX) && defined(__AVX512VBMI__)
#define JPAGED_AMX_Q4 1
// q4 panels on AMX tiles, for the rows after the caller's `vector_rows`. Over one GGUF block (32
// k) of a column, x . w = scale * (x . nibbles) + offset * sum(x). The nibbles are exact in
// bfloat16 and x splits exactly into three bfloat16 (hi, mid, lo: 8 significant bits each), so
// three tile products give x . nibbles from exact products added in float32: as close to the
// exact sums as the FMA path's, but rounded differently, hence for whole classes of rows only.

// x f32[rows, K] split for the tiles: three bfloat16 pieces (hi, mid, lo) of each value, as
// x tiles of 16 rows x 32 k (1 KiB), ordered by GGUF block, then by block of 16 rows, then by
// piece, so the tiles a GGUF block's pass reads lie one after the other (rows padded to a
// multiple of 16 with zeros); and the sum of each GGUF block of each row, block_sums f32[rows, K / 32].
struct SplitRows {
  static constexpr int64_t kTile = 16 * kQuantBlock;  // bfloat16 per x tile
  uint16_t* pieces;
  float* block_sums;
  int64_t row_blocks;  // padded rows / 16

  uint16_t* Tile(int64_t block, int64_t row_block, int64_t piece) const {
    return pieces + ((block * row_blocks + row_block) * 3 + piece) * kTile;
  }
};

inline __m256i TopHalves(__m512i bits) { return _mm512_cvtepi32_epi16(_mm512_srli_epi32(bits, 16)); }

// Row r of x (at x, K a multiple of 32) into `split`.
void SplitRow(const float* x, int64_t K, int64_t r, const SplitRows& split) {
  const __m512i top = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  for (int64_t b = 0; b < K / kQuantBlock; ++b) {
    __m512 sum = _mm512_setzero_ps();
    uint16_t* hi = split.Tile(b, r / 16, 0) + (r % 16) * kQuantBlock;
    for (int64_t h = 0; h < kQuantBlock; h += 16) {
      const __m512 v = _mm512_loadu_ps(x + b * kQuantBlock + h);
      const __m512i hi_bits = _mm512_and_si512(_mm512_castps_si512(v), top);
      const __m512 rest = _mm512_sub_ps(v, _mm512_castsi512_ps(hi_bits));  // exact: 16 bits at most
      const __m512i mid_bits = _mm512_and_si512(_mm512_castps_si512(rest), top);
      const __m512 last = _mm512_sub_ps(rest, _mm512_castsi512_ps(mid_bits));  // exact: 8 bits at most
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(hi + h), TopHalves(hi_bits));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(hi + SplitRows::kTile + h), TopHalves(mid_bits));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(hi + 2 * SplitRows::kTile + h),
                          TopHalves(_mm512_castps_si512(last)));
      sum = _mm512_add_ps(sum, v);
    }
    split.block_sums[r * (K / kQuantBlock) + b] = _mm512_reduce_add_ps(sum);
  }
}

// One GGUF block of a q4 panel (16 panel rows of 48 bytes: pairs of k) as the three weight tiles
// of TDPBF16PS: tile j's row i holds columns 16j .. 16j + 15 of pair i, each column's 32-bit
// lane the bfloat16 of its low nibble (k even) under that of its high one (k odd).
struct NibbleTiles {
  __m512i spread;  // byte 4c + t <- byte c: each column's byte in all four bytes of its lane
  __m512i table;   // byte n: low byte of bfloat16(n); byte 16 + n: its high byte (n < 16)

  NibbleTiles() {
    alignas(64) uint8_t spread_bytes[64], table_bytes[64] = {};
    for (int i = 0; i < 64; ++i) spread_bytes[i] = static_cast<uint8_t>(i / 4);
    for (int n = 0; n < 16; ++n) {
      const float f = static_cast<float>(n);
      uint32_t bits;
      std::memcpy(&bits, &f, sizeof(bits));
      table_bytes[n] = static_cast<uint8_t>(bits >> 16);
      table_bytes[16 + n] = static_cast<uint8_t>(bits >> 24);
    }
    spread = _mm512_load_si512(spread_bytes);
    table = _mm512_load_si512(table_bytes);
  }

  void Convert(const uint8_t* values, uint32_t (*tiles)[16][16]) const {
    const __m512i nibble = _mm512_set1_epi8(15);
    const __m512i byte_of_bf16 = _mm512_set1_epi32(0x10001000);  // + 16 for the high bytes
    for (int i = 0; i < 16; ++i) {
#pragma GCC unroll 3
      for (int j = 0; j < 3; ++j) {
        const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(values + i * kPanel + 16 * j));
        const __m512i v = _mm512_permutexvar_epi8(spread, _mm512_castsi128_si512(bytes));
        const __m512i low = _mm512_and_si512(v, nibble);
        const __m512i high = _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble);
        const __m512i n = _mm512_mask_blend_epi8(0xCCCCCCCCCCCCCCCCull, low, high);  // bytes 2, 3: k odd
        _mm512_store_si512(tiles[j][i], _mm512_permutexvar_epi8(_mm512_or_si512(n, byte_of_bf16), table));
      }
    }
  }
};

// out[r0:r1, panel p's columns] = x[r0:r1] @ q4 panel p, x given as `split` (r0 a multiple of 16).
// GGUF blocks outermost: a block's weight tiles stay loaded while every 16 rows pass over them,
// and out, in cache, holds the running sums of the blocks so far.
void AmxQ4PanelProduct(const SplitRows& split, int64_t K, int64_t N, const QuantizedChunks<4>& panel, int64_t p,
                       int64_t r0, int64_t r1, float* out, float* tail) {
  // The running sums go to `tail`, dense rows of 48 floats (out's rows, N floats apart, alias
  // in L1 every few rows); the last GGUF block's sums go to out (or stay in `tail` for a last
  // panel narrower than 48 columns, then CopyTail).
  const PanelOutput to = PanelDestination(out, N, p, r0, tail);
  const int64_t blocks = K / kQuantBlock;
  const NibbleTiles nibbles;
  alignas(64) uint32_t weights[3][16][16];
  alignas(64) float sums[16][kPanel];  // one tile product of 16 rows, 48 columns
  ConfigureTiles(16);
  for (int64_t b = 0; b < blocks; ++b) {
    const uint8_t* values = panel.values + b * (kQuantBlock / 2) * kPanel;
    __builtin_prefetch(values + (kQuantBlock / 2) * kPanel * 2);
    nibbles.Convert(values, weights);
    _tile_loadd(4, weights[0], 64);
    _tile_loadd(5, weights[1], 64);
    _tile_loadd(6, weights[2], 64);
    vec scale[kVectors], offset[kVectors];
    for (int j = 0; j < kVectors; ++j) {
      scale[j] = LoadVec<vec>(panel.scale + b * kPanel + j * kLanes);
      offset[j] = LoadVec<vec>(panel.offset + b * kPanel + j * kLanes);
    }
    for (int64_t r = r0; r < r1; r += 16) {
      // The next x tiles (the next GGUF block's at the last rows), a piece at a time: the
      // hardware prefetchers leave the first load of each block of rows waiting.
      const char* next = reinterpret_cast<const char*>(r + 16 < r1 ? split.Tile(b, r / 16 + 1, 0)
                                                                    : split.Tile(b + 1, r0 / 16, 0));
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      for (int piece = 0; piece < 3; ++piece) {
        for (int64_t line = 0; line < SplitRows::kTile * 2; line += 64) {
          __builtin_prefetch(next + piece * SplitRows::kTile * 2 + line);
        }
        _tile_loadd(3, split.Tile(b, r / 16, piece), kQuantBlock * 2);
        _tile_dpbf16ps(0, 3, 4);
        _tile_dpbf16ps(1, 3, 5);
        _tile_dpbf16ps(2, 3, 6);
      }
      _tile_stored(0, &sums[0][0], kPanel * 4);
      _tile_stored(1, &sums[0][16], kPanel * 4);
      _tile_stored(2, &sums[0][32], kPanel * 4);
      const int64_t rows = std::min<int64_t>(16, r1 - r);
      const bool last = b == blocks - 1;
      for (int64_t i = 0; i < rows; ++i) {
        const float x_sum = split.block_sums[(r + i) * blocks + b];
        const float* running = tail + (r - r0 + i) * kPanel;
        float* o = last ? to.dst + (r - r0 + i) * to.ldo : tail + (r - r0 + i) * kPanel;
#pragma GCC unroll 3
        for (int j = 0; j < kVectors; ++j) {
          const vec block = scale[j] * LoadVec<vec>(&sums[i][j * kLanes]) + offset[j] * x_sum;
          StoreVec(o + j * kLanes, b > 0 ? LoadVec<vec>(running + j * kLanes) + block : block);
        }
      }
    }
  }
  _tile_release();
  CopyTail(tail, out, N, p, r0, r1);
}
#endif  // JPAGED_AMX_Q4

// out[r0:r1, panel columns] = x[r0:r1] @ the panel that `chunks` reads. `tail` is scratch of
// kRowChunk x kPanel floats for a last panel narrower than kPanel, whose padded columns must
// not reach `out`.
template <typename Format, typename Chunks>
void PanelProduct(const typename Format::T* x, int64_t K, int64_t N, const Chunks& chunks,
                  int64_t p, int64_t r0, int64_t r1, float* out, float* tail) {
  const PanelOutput to = PanelDestination(out, N, p, r0, tail);
  float* const dst = to.dst;
  const int64_t ldo = to.ldo;
  for (int64_t k0 = 0; k0 < K; k0 += kChunkK) {
    const int64_t kc = std::min(kChunkK, K - k0);
    const typename Format::T* xc = x + r0 * K + k0;
    if constexpr (!Chunks::kFromMemory) {
      if (r1 - r0 <= kMaxInRegisterRows) {
        for (int64_t c = 0; c < kPanel; c += kSliceCols) {
          ForRowBlocks<kBlockRows>(r1 - r0, [&](auto block_rows, int64_t r) {
            chunks.template Multiply<decltype(block_rows)::value>(k0, kc, c, xc + r * K, K, dst + r * ldo + c,
                                                                  ldo, k0 > 0);
          });
        }
        continue;
      }
    }
    const typename Format::T* rows = chunks.Rows(k0, kc);
    for (int64_t c = 0; c < kPanel; c += kSliceCols) {  // a slice is c columns in
      ForRowBlocks<kBlockRows>(r1 - r0, [&](auto block_rows, int64_t r) {
        // The first block over a chunk read from memory requests its rows ahead into L1.
        Block<Format, decltype(block_rows)::value>(xc + r * K, K, rows + c * Format::kDepth, kc, dst + r * ldo + c,
                                                   ldo, k0 > 0, Chunks::kFromMemory && c == 0 && r == 0);
      });
    }
  }
  CopyTail(tail, out, N, p, r0, r1);
}

// out f32[M, N] = x [M, K] @ panels (InPlacePanels<Format>, or QuantizedPanels with F32 x).
template <typename Format, typename Panels>
void PackedMatmul(ffi::ThreadPool& pool, const typename Format::T* x, const Panels& panels,
                  float* out, int64_t M, int64_t K, int64_t N) {
  if (M == 0 || N == 0) return;
  const int64_t num_panels = (N + kPanel - 1) / kPanel;
  const int64_t row_chunks = (M + kRowChunk - 1) / kRowChunk;
  // Each thread's items run row chunk by row chunk, so a chunk of x stays in cache while panels
  // stream past.
#if defined(JPAGED_AMX)
  bool amx = false;
  if constexpr (std::is_same_v<Format, BF16>) amx = K % 32 == 0 && AmxUsable();
#endif
  ParallelForInRanges(pool, row_chunks * num_panels, [&](int64_t item) {
    thread_local float tail[kRowChunk * kPanel];
    const int64_t chunk = item / num_panels, p = item % num_panels;
    const int64_t r0 = chunk * kRowChunk, r1 = std::min(M, r0 + kRowChunk);
#if defined(JPAGED_AMX)
    if constexpr (std::is_same_v<Format, BF16>) {
      if (amx) return AmxPanelProduct(x, K, N, panels.Panel(p, K).panel, p, r0, r1, out, tail);
    }
#endif
    PanelProduct<Format>(x, K, N, panels.Panel(p, K), p, r0, r1, out, tail);
  });
}

#if defined(JPAGED_AMX_Q4)
// out f32[M, N] = x f32[M, K] @ q4 panels on AMX tiles (K a multiple of 32): x split once into
// the calling thread's scratch, then (row chunk, panel) items as in PackedMatmul.
void AmxQ4Matmul(ffi::ThreadPool& pool, const float* x, const QuantizedPanels<4>& panels, float* out, int64_t M,
                 int64_t K, int64_t N) {
  if (M == 0 || N == 0) return;
  thread_local std::vector<uint16_t> pieces;
  thread_local std::vector<float> block_sums;
  const int64_t row_blocks = (M + 15) / 16;
  pieces.resize(row_blocks * 16 * K * 3);
  block_sums.resize(M * (K / kQuantBlock));
  const SplitRows split{pieces.data(), block_sums.data(), row_blocks};
  ParallelFor(pool, row_blocks, [&](int64_t row_block, int64_t) {
    const int64_t r0 = row_block * 16, r1 = std::min(M, r0 + 16);
    for (int64_t r = r0; r < r1; ++r) SplitRow(x + r * K, K, r, split);
    for (int64_t b = 0; r1 < r0 + 16 && b < K / kQuantBlock; ++b) {  // the padding rows: zeros
      for (int64_t piece = 0; piece < 3; ++piece) {
        std::memset(split.Tile(b, row_block, piece) + (r1 - r0) * kQuantBlock, 0,
                    (r0 + 16 - r1) * kQuantBlock * sizeof(uint16_t));
      }
    }
  });
  const int64_t num_panels = (N + kPanel - 1) / kPanel;
  const int64_t row_chunks = (M + kRowChunk - 1) / kRowChunk;
  ParallelForInRanges(pool, row_chunks * num_panels, [&](int64_t item) {
    thread_local float tail[kRowChunk * kPanel];
    const int64_t chunk = item / num_panels, p = item % num_panels;
    const int64_t r0 = chunk * kRowChunk, r1 = std::min(M, r0 + kRowChunk);
    AmxQ4PanelProduct(split, K, N, panels.Panel(p, K), p, r0, r1, out, tail);
  });
}
#endif  // JPAGED_AMX_Q4

// An i32 scalar operand clamped to [low, high], or false when it is not one int32.
bool ClampedCount(ffi::Buffer<ffi::S32> count, int64_t low, int64_t high, int64_t* value) {
  if (count.element_count() != 1) return false;
  *value = std::clamp<int64_t>(*count.typed_data(), low, high);
  return true;
}

// out f32[M, N]: x's first num_rows rows (clamped to [0, M]) times the panels, zeros after them.
// With q4 panels and `vector_rows` (an i32 scalar, clamped to [0, num_rows]), the rows from
// vector_rows on are multiplied on AMX tiles where the CPU and the OS allow it; the first
// vector_rows rows, and all rows elsewhere, on the vector path.
template <typename Format, typename Panels>
ffi::Error MultiplyRealRows(ffi::ThreadPool& pool, const typename Format::T* x, const Panels& panels,
                            ffi::Buffer<ffi::S32> num_rows, float* out, int64_t M, int64_t K, int64_t N,
                            const ffi::Buffer<ffi::S32>* vector_rows = nullptr) {
  int64_t rows = 0;
  if (!ClampedCount(num_rows, 0, M, &rows)) {
    return ffi::Error::InvalidArgument("packed_matmul: num_rows must be one int32, got " +
                                       Dims(num_rows.dimensions()));
  }
  int64_t vector = rows;
  if (vector_rows != nullptr && !ClampedCount(*vector_rows, 0, rows, &vector)) {
    return ffi::Error::InvalidArgument("packed_matmul: vector_rows must be one int32, got " +
                                       Dims(vector_rows->dimensions()));
  }
#if defined(JPAGED_AMX_Q4)
  if constexpr (std::is_same_v<Panels, QuantizedPanels<4>>) {
    if (vector < rows && AmxUsable()) {
      PackedMatmul<Format>(pool, x, panels, out, vector, K, N);
      AmxQ4Matmul(pool, x + vector * K, panels, out + vector * N, rows - vector, K, N);
      std::memset(out + rows * N, 0, (M - rows) * N * sizeof(float));
      return ffi::Error::Success();
    }
  }
#endif
  PackedMatmul<Format>(pool, x, panels, out, rows, K, N);
  std::memset(out + rows * N, 0, (M - rows) * N * sizeof(float));
  return ffi::Error::Success();
}

ffi::Error PackedMatmulF32(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> panels,
                           ffi::Buffer<ffi::S32> num_rows, ffi::Result<ffi::Buffer<ffi::F32>> out) {
  auto xd = x.dimensions();
  auto pd = panels.dimensions();
  auto od = out->dimensions();
  if (xd.size() != 2 || pd.size() != 3 || od.size() != 2 || pd[2] != kPanel || pd[1] != xd[1] ||
      od[0] != xd[0] || pd[0] != (od[1] + kPanel - 1) / kPanel) {
    return ffi::Error::InvalidArgument("packed_matmul: need x [M, K], panels [ceil(N / 48), K, 48]"
                                       " and out [M, N]; got x " + Dims(xd) + ", panels " +
                                       Dims(pd) + ", out " + Dims(od));
  }
  return MultiplyRealRows<F32>(pool, x.typed_data(), InPlacePanels<F32>{panels.typed_data()}, num_rows,
                              out->typed_data(), xd[0], xd[1], od[1]);
}

ffi::Error PackedMatmulBF16(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> x, ffi::Buffer<ffi::BF16> panels,
                            ffi::Buffer<ffi::S32> num_rows, ffi::Result<ffi::Buffer<ffi::F32>> out) {
  auto xd = x.dimensions();
  auto pd = panels.dimensions();
  auto od = out->dimensions();
  if (xd.size() != 2 || pd.size() != 4 || od.size() != 2 || pd[2] != kPanel || pd[3] != 2 ||
      xd[1] % 2 != 0 || pd[1] * 2 != xd[1] || od[0] != xd[0] || pd[0] != (od[1] + kPanel - 1) / kPanel) {
    return ffi::Error::InvalidArgument("packed_matmul: need x [M, K] with K even, panels [ceil(N / 48),"
                                       " K / 2, 48, 2] and out [M, N]; got x " + Dims(xd) +
                                       ", panels " + Dims(pd) + ", out " + Dims(od));
  }
  return MultiplyRealRows<BF16>(pool, x.typed_data(), InPlacePanels<BF16>{panels.typed_data()}, num_rows,
                               out->typed_data(), xd[0], xd[1], od[1]);
}

// The q4 and q8 formats: `values` and `scales` (scale, and offset for q4) as the format says.
template <int kBits, typename Values>
ffi::Error QuantizedMatmul(ffi::ThreadPool& pool, ffi::Buffer<ffi::F32> x, Values values,
                           const ffi::Buffer<ffi::F32>* offset, ffi::Buffer<ffi::F32> scale,
                           ffi::Buffer<ffi::S32> num_rows, const ffi::Buffer<ffi::S32>* vector_rows,
                           ffi::Result<ffi::Buffer<ffi::F32>> out) {
  auto xd = x.dimensions();
  auto vd = values.dimensions();
  auto sd = scale.dimensions();
  auto od = out->dimensions();
  const bool offset_ok = offset == nullptr || (offset->dimensions().size() == sd.size() &&
                                               std::equal(sd.begin(), sd.end(), offset->dimensions().begin()));
  if (xd.size() != 2 || vd.size() != 3 || sd.size() != 3 || od.size() != 2 || !offset_ok ||
      xd[1] % kQuantBlock != 0 || vd[2] != kPanel || vd[1] * 8 / kBits != xd[1] || sd[0] != vd[0] ||
      sd[1] * kQuantBlock != xd[1] || sd[2] != kPanel || od[0] != xd[0] || vd[0] != (od[1] + kPanel - 1) / kPanel) {
    const std::string rows = kBits == 4 ? "K / 2" : "K";
    return ffi::Error::InvalidArgument(
        "packed_matmul: need x [M, K] with K a multiple of 32, values [ceil(N / 48), " + rows +
        ", 48], scales [ceil(N / 48), K / 32, 48] and out [M, N]; got x " + Dims(xd) + ", values " + Dims(vd) +
        ", scale " + Dims(sd) + (offset == nullptr ? "" : ", offset " + Dims(offset->dimensions())) +
        ", out " + Dims(od));
  }
  const QuantizedPanels<kBits> panels{reinterpret_cast<const uint8_t*>(values.typed_data()), scale.typed_data(),
                                      offset == nullptr ? nullptr : offset->typed_data()};
  return MultiplyRealRows<F32>(pool, x.typed_data(), panels, num_rows, out->typed_data(), xd[0], xd[1], od[1],
                              vector_rows);
}

ffi::Error PackedMatmulQ4(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> values,
                          ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> offset, ffi::Buffer<ffi::S32> num_rows,
                          ffi::Buffer<ffi::S32> vector_rows, ffi::Result<ffi::Buffer<ffi::F32>> out) {
  return QuantizedMatmul<4>(pool, x, values, &offset, scale, num_rows, &vector_rows, out);
}

ffi::Error PackedMatmulQ8(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> values,
                          ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::S32> num_rows,
                          ffi::Result<ffi::Buffer<ffi::F32>> out) {
  return QuantizedMatmul<8>(pool, x, values, nullptr, scale, num_rows, nullptr, out);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JpagedPackedMatmul, PackedMatmulF32,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // x
                                  .Arg<ffi::Buffer<ffi::F32>>()   // panels
                                  .Arg<ffi::Buffer<ffi::S32>>()   // num_rows
                                  .Ret<ffi::Buffer<ffi::F32>>());  // out

XLA_FFI_DEFINE_HANDLER_SYMBOL(JpagedPackedMatmulBF16, PackedMatmulBF16,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()  // x
                                  .Arg<ffi::Buffer<ffi::BF16>>()  // panels
                                  .Arg<ffi::Buffer<ffi::S32>>()   // num_rows
                                  .Ret<ffi::Buffer<ffi::F32>>());  // out

XLA_FFI_DEFINE_HANDLER_SYMBOL(JpagedPackedMatmulQ4, PackedMatmulQ4,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // x
                                  .Arg<ffi::Buffer<ffi::U8>>()    // values
                                  .Arg<ffi::Buffer<ffi::F32>>()   // scale
                                  .Arg<ffi::Buffer<ffi::F32>>()   // offset
                                  .Arg<ffi::Buffer<ffi::S32>>()   // num_rows
                                  .Arg<ffi::Buffer<ffi::S32>>()   // vector_rows
                                  .Ret<ffi::Buffer<ffi::F32>>());  // out

XLA_FFI_DEFINE_HANDLER_SYMBOL(JpagedPackedMatmulQ8, PackedMatmulQ8,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // x
                                  .Arg<ffi::Buffer<ffi::S8>>()    // values
                                  .Arg<ffi::Buffer<ffi::F32>>()   // scale
                                  .Arg<ffi::Buffer<ffi::S32>>()   // num_rows
                                  .Ret<ffi::Buffer<ffi::F32>>());  // out
