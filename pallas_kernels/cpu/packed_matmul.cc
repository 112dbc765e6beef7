// x @ w for CPUs with w prepacked into column panels, registered with XLA as typed FFI handlers.
//
// Same contract as pallas_kernels/reference.py's packed_matmul, in two formats:
//   float32:  x f32[M, K], panels f32[P, K, 48]: w f32[K, N] as P = ceil(N / 48) panels of 48
//             columns (the last one zero-padded);
//   bfloat16: x bf16[M, K], panels bf16[P, K / 2, 48, 2]: the same panels with each pair of
//             rows k, k + 1 interleaved, so one 32-bit lane holds a column's two weights (K even).
// out is f32[M, N] in both. Only x's first num_rows rows (an i32 scalar, clamped to [0, M]) are
// multiplied; out's rows from num_rows on are zeros, so a step padded to a bucket pays for its
// real tokens only. A panel is contiguous, so the kernel streams each weight byte once
// from memory in address order, however few rows x has; XLA:CPU's dot reads w [K, N] with a
// stride of N and falls behind at decode sizes (M <= 64), in bfloat16 by 10-15x at M = 1.
//
// Work items are (row chunk, panel) pairs on XLA's FFI thread pool. Within an item, K is cut
// into chunks whose panel rows stay in L2 while every 8-row (AVX-512) or 4-row (otherwise) block
// of x passes over them; each block keeps its 8 x 48 or 4 x 24 outputs in registers for the
// whole chunk, then adds them to the output. The order of the additions does not depend on the
// split between threads, so neither do the results.
//
// bfloat16 products use AVX512-BF16's vdpbf16ps where the CPU has it (both weights of a lane
// times the matching pair of x, added in float32); elsewhere the pairs are widened to float32
// in registers (a bfloat16 is the top half of a float32) and multiplied with FMAs.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>

#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"
#include "ffi_helpers.h"

namespace {

using jpaged_cpu::Dims;
using jpaged_cpu::ParallelFor;
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
constexpr int kVectors = 3;                        // vectors per row of a block
constexpr int64_t kSliceCols = kVectors * kLanes;  // 48 with AVX-512, 24 otherwise

constexpr int64_t kChunkK = 256;  // k per chunk: 48 KiB of f32 panel rows (24 of bf16), in L2
constexpr int64_t kPrefetchRows = 32;  // panel rows ahead of the one being read
constexpr int64_t kRowChunk = 256;  // rows of x per work item

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

// out[r, 0:kSliceCols] (+)= x[r, 0:kc] @ w[0:kc, slice] for ROWS rows, where the slice's panel
// rows start at b, kDepth * kPanel elements apart. With `prefetch`, the panel rows
// kPrefetchRows ahead are requested. The chunk's sum starts from zero and is added to `out` at
// the end: sums of short runs round less than one long running sum.
template <typename Format, int ROWS>
inline void Block(const typename Format::T* x, int64_t ldx, const typename Format::T* b, int64_t kc,
                  float* out, int64_t ldo, bool accumulate, bool prefetch) {
  constexpr int64_t kRowElems = Format::kDepth * kPanel;
  vec acc[ROWS][kVectors] = {};
  for (int64_t k = 0; k < kc; k += Format::kDepth) {
    const typename Format::T* row = b + k * kPanel;
    if (prefetch) {
      const char* ahead = reinterpret_cast<const char*>(row + kPrefetchRows * kRowElems);
      __builtin_prefetch(ahead);
      __builtin_prefetch(ahead + 64);
      __builtin_prefetch(ahead + 128);
    }
    Accumulate<Format, ROWS>(x + k, ldx, row, acc);
  }
#pragma GCC unroll 8
  for (int r = 0; r < ROWS; ++r) {
#pragma GCC unroll 3
    for (int j = 0; j < kVectors; ++j) {
      float* o = out + r * ldo + j * kLanes;
      StoreVec(o, accumulate ? LoadVec<vec>(o) + acc[r][j] : acc[r][j]);
    }
  }
}

// Block over `rows` rows (any count), as blocks of kBlockRows and then halves of it.
template <typename Format, int ROWS>
void Rows(int64_t rows, const typename Format::T* x, int64_t ldx, const typename Format::T* b,
          int64_t kc, float* out, int64_t ldo, bool accumulate, bool prefetch) {
  while (rows >= ROWS) {
    Block<Format, ROWS>(x, ldx, b, kc, out, ldo, accumulate, prefetch);
    prefetch = false;  // the first block brought the chunk into L1
    rows -= ROWS;
    x += ROWS * ldx;
    out += ROWS * ldo;
  }
  if constexpr (ROWS > 1) {
    if (rows > 0) Rows<Format, ROWS / 2>(rows, x, ldx, b, kc, out, ldo, accumulate, prefetch);
  }
}

// out[r0:r1, panel columns] = x[r0:r1] @ panel. `tail` is scratch of kRowChunk x kPanel floats
// for a last panel narrower than kPanel, whose padded columns must not reach `out`.
template <typename Format>
void PanelProduct(const typename Format::T* x, int64_t K, int64_t N, const typename Format::T* panel,
                  int64_t p, int64_t r0, int64_t r1, float* out, float* tail) {
  const int64_t col0 = p * kPanel;
  const int64_t width = std::min(kPanel, N - col0);
  float* dst = width == kPanel ? out + r0 * N + col0 : tail;
  const int64_t ldo = width == kPanel ? N : kPanel;
  for (int64_t k0 = 0; k0 < K; k0 += kChunkK) {
    const int64_t kc = std::min(kChunkK, K - k0);
    for (int64_t c = 0; c < kPanel; c += kSliceCols) {
      // The chunk's panel rows start k0 * kPanel elements into the panel; a slice is c columns in.
      Rows<Format, kBlockRows>(r1 - r0, x + r0 * K + k0, K, panel + k0 * kPanel + c * Format::kDepth,
                               kc, dst + c, ldo, k0 > 0, c == 0);
    }
  }
  if (width < kPanel) {
    for (int64_t r = r0; r < r1; ++r) {
      std::memcpy(out + r * N + col0, tail + (r - r0) * kPanel, width * sizeof(float));
    }
  }
}

// out f32[M, N] = x [M, K] @ panels, both of Format.
template <typename Format>
void PackedMatmul(ffi::ThreadPool& pool, const typename Format::T* x, const typename Format::T* panels,
                  float* out, int64_t M, int64_t K, int64_t N) {
  if (M == 0 || N == 0) return;
  const int64_t num_panels = (N + kPanel - 1) / kPanel;
  const int64_t row_chunks = (M + kRowChunk - 1) / kRowChunk;
  // Items run row chunk by row chunk, so a chunk of x stays in cache while panels stream past.
  ParallelFor(pool, row_chunks * num_panels, [&](int64_t item, int64_t) {
    thread_local float tail[kRowChunk * kPanel];
    const int64_t chunk = item / num_panels, p = item % num_panels;
    const int64_t r0 = chunk * kRowChunk, r1 = std::min(M, r0 + kRowChunk);
    PanelProduct<Format>(x, K, N, panels + p * K * kPanel, p, r0, r1, out, tail);
  });
}

// out f32[M, N]: x's first num_rows rows (clamped to [0, M]) times the panels, zeros after them.
template <typename Format>
ffi::Error MultiplyRealRows(ffi::ThreadPool& pool, const typename Format::T* x, const typename Format::T* panels,
                            ffi::Buffer<ffi::S32> num_rows, float* out, int64_t M, int64_t K, int64_t N) {
  if (num_rows.element_count() != 1) {
    return ffi::Error::InvalidArgument("packed_matmul: num_rows must be one int32, got " +
                                       Dims(num_rows.dimensions()));
  }
  const int64_t rows = std::clamp<int64_t>(*num_rows.typed_data(), 0, M);
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
  return MultiplyRealRows<F32>(pool, x.typed_data(), panels.typed_data(), num_rows, out->typed_data(), xd[0],
                              xd[1], od[1]);
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
  return MultiplyRealRows<BF16>(pool, x.typed_data(), panels.typed_data(), num_rows, out->typed_data(), xd[0],
                              xd[1], od[1]);
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
