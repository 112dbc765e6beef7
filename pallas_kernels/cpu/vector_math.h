// Vector helpers the CPU kernels share, over GCC vector types (any width the target has):
// unaligned loads and stores, a scalar in every lane, a fused multiply-add, and exp for x <= 0.

#ifndef JPAGED_CPU_VECTOR_MATH_H_
#define JPAGED_CPU_VECTOR_MATH_H_

#include <cstring>

#if defined(__FMA__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace jpaged_cpu {

// a * b + c rounded once (an FMA) where the CPU has one, for 8- or 16-lane fp32 vectors. A file
// compiled without contraction (-ffp-contract=off, to keep its bits the same in every inlined
// copy) writes its multiply-adds with this.
template <typename V>
inline V MulAdd(V a, V b, V c) {
#if defined(__AVX512F__)
  if constexpr (sizeof(V) == 64) return (V)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
#endif
#if defined(__FMA__)
  if constexpr (sizeof(V) == 32) return (V)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
#endif
  return a * b + c;
}

template <typename V>
inline V LoadV(const float* p) {
  V v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <typename V>
inline void StoreV(float* p, V v) {
  std::memcpy(p, &v, sizeof(v));
}

// The scalar in every lane: one vbroadcastss, which can read x straight from memory. x - 0.0 is
// x for every x, so the compiler drops the subtraction; V{} + x would cost a scalar add first
// (-0.0 + 0.0 is +0.0, so that add cannot be dropped).
template <typename V>
inline V SplatV(float x) {
  return x - V{};
}

// exp for x <= 0 (Cody-Waite reduction + the Cephes expf polynomial, about 1 ulp);
// exactly 0 below -87.3, including -inf. VF/VI: an fp32 vector type and its int32 twin.
template <typename VF, typename VI>
inline VF ExpV(VF x) {
  const VF lo = SplatV<VF>(-87.3f);
  VI underflow = x < lo;
  x = underflow ? lo : x;
  VF n = x * SplatV<VF>(1.44269504088896341f);
  n = (n + SplatV<VF>(12582912.0f)) - SplatV<VF>(12582912.0f);  // round to nearest
  VF r = x - n * SplatV<VF>(0.693359375f) - n * SplatV<VF>(-2.12194440e-4f);
  VF p = SplatV<VF>(1.9875691500e-4f);
  p = p * r + SplatV<VF>(1.3981999507e-3f);
  p = p * r + SplatV<VF>(8.3334519073e-3f);
  p = p * r + SplatV<VF>(4.1665795894e-2f);
  p = p * r + SplatV<VF>(1.6666665459e-1f);
  p = p * r + SplatV<VF>(5.0000001201e-1f);
  p = p * r * r + r + SplatV<VF>(1.0f);
  VI scale = (__builtin_convertvector(n, VI) + 127) << 23;
  VF two_n;
  std::memcpy(&two_n, &scale, sizeof(two_n));
  return underflow ? SplatV<VF>(0.0f) : p * two_n;
}

// cap * tanh(x / cap), Gemma 2's soft cap on attention scores: cap * (1 - e) / (1 + e) with
// e = exp(-2|x| / cap), signed as x. Off by at most a few ulp of cap (std::tanh is closer for
// |x| << cap, where the capped score is then off by ~1e-7 x cap); +-inf give +-cap, NaN stays NaN.
template <typename VF, typename VI>
inline VF SoftCapV(VF x, float cap) {
  const VI negative = x < SplatV<VF>(0.0f);
  const VF magnitude = negative ? -x : x;
  const VF e = ExpV<VF, VI>(magnitude * SplatV<VF>(-2.0f / cap));
  const VF capped = SplatV<VF>(cap) * (SplatV<VF>(1.0f) - e) / (SplatV<VF>(1.0f) + e);
  return negative ? -capped : capped;
}

}  // namespace jpaged_cpu

#endif  // JPAGED_CPU_VECTOR_MATH_H_
