// x @ w for CPUs with w prepacked into column panels, registered with XLA as a typed FFI handler.
//
// Same contract as pallas_kernels/reference.py's packed_matmul: x f32[M, K], panels
// f32[P, K, 48] holding w f32[K, N] as P = ceil(N / 48) panels of 48 columns (the last one
// zero-padded), out f32[M, N]. A panel is contiguous, so the kernel streams each weight byte
// once from memory in address order, however few rows x has; XLA:CPU's dot reads w [K, N] with
// a stride of N floats and falls behind at decode sizes (M <= 64).
//
// Work items are (row chunk, panel) pairs on XLA's FFI thread pool. Within an item, K is cut
// into chunks whose panel rows stay in L2 while every 8-row (AVX-512) or 4-row (otherwise) block
// of x passes over them; each block keeps its 8 x 48 or 4 x 24 outputs in registers for the
// whole chunk, then adds them to the output. The order of the additions does not depend on the
// split between threads, so neither do the results.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>

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
constexpr int kVectors = 3;                        // vectors per row of a block
constexpr int64_t kSliceCols = kVectors * kLanes;  // 48 with AVX-512, 24 otherwise

constexpr int64_t kChunkK = 256;  // panel rows per chunk: 48 KiB, resident in L2
constexpr int64_t kPrefetchK = 32;  // panel rows ahead of the one being read
constexpr int64_t kRowChunk = 256;  // rows of x per work item

inline vec LoadVec(const float* p) {
  vec v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void StoreVec(float* p, vec v) { std::memcpy(p, &v, sizeof(v)); }

// out[r, 0:kSliceCols] (+)= x[r, 0:kc] @ b[0:kc, 0:kSliceCols] for ROWS rows; b's rows are
// kPanel floats apart. With `prefetch`, the panel rows kPrefetchK ahead are requested. The
// chunk's sum starts from zero and is added to `out` at the end: sums of short runs round
// less than one long running sum.
template <int ROWS>
inline void Block(const float* x, int64_t ldx, const float* b, int64_t kc, float* out,
                  int64_t ldo, bool accumulate, bool prefetch) {
  vec acc[ROWS][kVectors] = {};
  for (int64_t k = 0; k < kc; ++k) {
    const float* row = b + k * kPanel;
    if (prefetch) {
      const char* ahead = reinterpret_cast<const char*>(row + kPrefetchK * kPanel);
      __builtin_prefetch(ahead);
      __builtin_prefetch(ahead + 64);
      __builtin_prefetch(ahead + 128);
    }
    vec w[kVectors];
#pragma GCC unroll 3
    for (int j = 0; j < kVectors; ++j) w[j] = LoadVec(row + j * kLanes);
#pragma GCC unroll 8
    for (int r = 0; r < ROWS; ++r) {
      const float a = x[r * ldx + k];
#pragma GCC unroll 3
      for (int j = 0; j < kVectors; ++j) acc[r][j] += a * w[j];
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < ROWS; ++r) {
#pragma GCC unroll 3
    for (int j = 0; j < kVectors; ++j) {
      float* o = out + r * ldo + j * kLanes;
      StoreVec(o, accumulate ? LoadVec(o) + acc[r][j] : acc[r][j]);
    }
  }
}

// Block over `rows` rows (any count), as blocks of kBlockRows and then halves of it.
template <int ROWS>
void Rows(int64_t rows, const float* x, int64_t ldx, const float* b, int64_t kc, float* out,
          int64_t ldo, bool accumulate, bool prefetch) {
  while (rows >= ROWS) {
    Block<ROWS>(x, ldx, b, kc, out, ldo, accumulate, prefetch);
    prefetch = false;  // the first block brought the chunk into L1
    rows -= ROWS;
    x += ROWS * ldx;
    out += ROWS * ldo;
  }
  if constexpr (ROWS > 1) {
    if (rows > 0) Rows<ROWS / 2>(rows, x, ldx, b, kc, out, ldo, accumulate, prefetch);
  }
}

// out[r0:r1, panel columns] = x[r0:r1] @ panel. `tail` is scratch of kRowChunk x kPanel floats
// for a last panel narrower than kPanel, whose padded columns must not reach `out`.
void PanelProduct(const float* x, int64_t K, int64_t N, const float* panel, int64_t p, int64_t r0,
                  int64_t r1, float* out, float* tail) {
  const int64_t col0 = p * kPanel;
  const int64_t width = std::min(kPanel, N - col0);
  float* dst = width == kPanel ? out + r0 * N + col0 : tail;
  const int64_t ldo = width == kPanel ? N : kPanel;
  for (int64_t k0 = 0; k0 < K; k0 += kChunkK) {
    const int64_t kc = std::min(kChunkK, K - k0);
    for (int64_t c = 0; c < kPanel; c += kSliceCols) {
      Rows<kBlockRows>(r1 - r0, x + r0 * K + k0, K, panel + k0 * kPanel + c, kc, dst + c, ldo,
                       k0 > 0, c == 0);
    }
  }
  if (width < kPanel) {
    for (int64_t r = r0; r < r1; ++r) {
      std::memcpy(out + r * N + col0, tail + (r - r0) * kPanel, width * sizeof(float));
    }
  }
}

ffi::Error PackedMatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                            ffi::Buffer<ffi::F32> panels, ffi::Result<ffi::Buffer<ffi::F32>> out) {
  auto xd = x.dimensions();
  auto pd = panels.dimensions();
  auto od = out->dimensions();
  if (xd.size() != 2 || pd.size() != 3 || od.size() != 2 || pd[2] != kPanel || pd[1] != xd[1] ||
      od[0] != xd[0] || pd[0] != (od[1] + kPanel - 1) / kPanel) {
    return ffi::Error::InvalidArgument("packed_matmul: need x [M, K], panels [ceil(N / 48), K, 48]"
                                       " and out [M, N]; got x " + Dims(xd) + ", panels " +
                                       Dims(pd) + ", out " + Dims(od));
  }
  const int64_t M = xd[0], K = xd[1], N = od[1], num_panels = pd[0];
  if (M == 0 || N == 0) return ffi::Error::Success();
  const int64_t row_chunks = (M + kRowChunk - 1) / kRowChunk;
  const float* xp = x.typed_data();
  const float* wp = panels.typed_data();
  float* op = out->typed_data();
  // Items run row chunk by row chunk, so a chunk of x stays in cache while panels stream past.
  ParallelFor(pool, row_chunks * num_panels, [&](int64_t item, int64_t) {
    thread_local float tail[kRowChunk * kPanel];
    const int64_t chunk = item / num_panels, p = item % num_panels;
    const int64_t r0 = chunk * kRowChunk, r1 = std::min(M, r0 + kRowChunk);
    PanelProduct(xp, K, N, wp + p * K * kPanel, p, r0, r1, op, tail);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JpagedPackedMatmul, PackedMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // x
                                  .Arg<ffi::Buffer<ffi::F32>>()   // panels
                                  .Ret<ffi::Buffer<ffi::F32>>());  // out
