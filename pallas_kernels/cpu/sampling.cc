// One token per row of a step's logits, drawn from what the sampling parameters leave of
// softmax(logits / temperature): the min_p, top_k and top_p masks, then the inverse CDF of the
// kept tokens' probabilities, in token-id order, at a uniform hashed from the row's (seed,
// output index). The contract is pallas_kernels/reference.py's sample_tokens; rows with
// temperature <= 0 are not drawn (id 0: the sampler takes their argmax).
//
// Per row, in a scratch row of V floats: every token's weight w = exp((logit - largest) /
// temperature), so the largest has weight 1 and min_p keeps w >= min_p; NaN logits weigh 0.
// top_k and top_p become one threshold on w (ties at it are kept, as in the reference):
// - Tokens with w >= 2^-20 are collected, in id order, as candidates. When they number at least
//   top_k (top_k set) or hold at least top_p of the mass (top_p alone), every kept token is among
//   them (almost always: the other tokens weigh at most V * 2^-20 together); else every token
//   with w > 0 is a candidate.
// - A histogram of the candidates' weights over 2048 bins (a weight's exponent and top 3
//   mantissa bits; bins in value order) finds the bin holding the top_k-th largest weight, then
//   the bin where the mass from the top reaches top_p of what top_k kept; only those bins'
//   weights are sorted.
// The draw then scans the kept weights in id order until their running sum passes u * total.
// The same thresholds also mask logits for the logprobs of sampled rows (TopKTopPMask, the
// contract of reference.apply_top_k_top_p). LogprobOutputs is reference.logprob_outputs: the
// largest scores and the chosen token's value and rank in three passes over each wanted row
// instead of a sort. Rows run in parallel on XLA's FFI thread pool.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <vector>

#include "xla/ffi/api/ffi.h"
#include "ffi_helpers.h"
#include "vector_math.h"

#if defined(__AVX__)
#include <immintrin.h>
#endif

namespace {

using jpaged_cpu::Dims;
using jpaged_cpu::ExpV;
using jpaged_cpu::LoadV;
using jpaged_cpu::ParallelFor;
using jpaged_cpu::SplatV;
using jpaged_cpu::StoreV;
namespace ffi = xla::ffi;

#if defined(__AVX512F__)
constexpr int kLanes = 16;
#else
constexpr int kLanes = 8;
#endif
typedef float vf __attribute__((vector_size(kLanes * 4)));
typedef int32_t vi __attribute__((vector_size(kLanes * 4)));

constexpr float kCandidateWeight = 0x1p-20f;
constexpr int kBinShift = 20;                    // a weight's bin: its bits >> 20
constexpr int kNumBins = 1 << (31 - kBinShift);  // weights are >= 0: the sign bit is clear

struct Candidate {
  float weight;
  int32_t id;
};

// What one thread reuses from row to row.
struct Scratch {
  std::vector<float> weights;
  std::vector<Candidate> candidates;
  std::vector<float> bin;  // the weights of one histogram bin
  std::vector<int64_t> count = std::vector<int64_t>(kNumBins);
  std::vector<double> mass = std::vector<double>(kNumBins);
};

inline uint32_t Mix32(uint32_t x) {  // murmur3's finalizer, as reference._mix32
  x ^= x >> 16;
  x *= 0x85EBCA6Bu;
  x ^= x >> 13;
  x *= 0xC2B2AE35u;
  return x ^ (x >> 16);
}

// The row's uniform in (0, 1), bit for bit reference.row_uniform's.
inline float RowUniform(int32_t seed, int32_t output_index) {
  const uint32_t key = Mix32(static_cast<uint32_t>(seed) ^
                             Mix32(static_cast<uint32_t>(output_index) * 0x9E3779B9u + 0x632BE5ABu));
  return (static_cast<float>(Mix32(key) >> 8) + 0.5f) * 0x1p-24f;
}

inline int Bin(float weight) {
  uint32_t bits;
  std::memcpy(&bits, &weight, sizeof(bits));
  return static_cast<int>(bits >> kBinShift);
}

// The largest logit of the row, NaN skipped (-inf when there is none).
float Largest(const float* x, int64_t n) {
  vf m = SplatV<vf>(-INFINITY);
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    const vf v = LoadV<vf>(x + i);
    m = v > m ? v : m;
  }
  float largest = -INFINITY;
  for (int l = 0; l < kLanes; ++l) largest = m[l] > largest ? m[l] : largest;
  for (; i < n; ++i) largest = x[i] > largest ? x[i] : largest;
  return largest;
}

// w = exp((x - largest) * inv_temperature), 0 below min_p and for NaN. Returns the sum of w.
double Weights(const float* x, int64_t n, float largest, float inv_temperature, float min_p, float* w) {
  const auto weigh = [&](vf v) {
    vf d = (v - largest) * inv_temperature;
    d = d == d ? d : SplatV<vf>(-INFINITY);
    const vf e = ExpV<vf, vi>(d);
    return e >= min_p ? e : SplatV<vf>(0.0f);
  };
  vf sum = SplatV<vf>(0.0f);
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    const vf e = weigh(LoadV<vf>(x + i));
    StoreV(w + i, e);
    sum += e;
  }
  if (i < n) {  // the tail, padded with -inf (weight 0)
    vf v = SplatV<vf>(-INFINITY);
    std::memcpy(&v, x + i, (n - i) * sizeof(float));
    const vf e = weigh(v);
    std::memcpy(w + i, &e, (n - i) * sizeof(float));
    sum += e;
  }
  double total = 0;
  for (int l = 0; l < kLanes; ++l) total += sum[l];
  return total;
}

// Bit l set where lane l of v is > bound (kStrict) or >= bound; clear for NaN.
template <bool kStrict>
inline uint32_t LaneMask(vf v, float bound) {
#if defined(__AVX__)
  constexpr int kPredicate = kStrict ? _CMP_GT_OQ : _CMP_GE_OQ;
#endif
#if defined(__AVX512F__)
  return _mm512_cmp_ps_mask(reinterpret_cast<__m512>(v), _mm512_set1_ps(bound), kPredicate);
#elif defined(__AVX__)
  return _mm256_movemask_ps(_mm256_cmp_ps(reinterpret_cast<__m256>(v), _mm256_set1_ps(bound), kPredicate));
#else
  uint32_t bits = 0;
  for (int l = 0; l < kLanes; ++l) bits |= static_cast<uint32_t>(kStrict ? v[l] > bound : v[l] >= bound) << l;
  return bits;
#endif
}

// Collects the tokens with w >= least, in id order. Returns their mass.
double Collect(const float* w, int64_t n, float least, std::vector<Candidate>& candidates) {
  candidates.clear();
  double mass = 0;
  const auto take = [&](int64_t i) {
    candidates.push_back({w[i], static_cast<int32_t>(i)});
    mass += w[i];
  };
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (uint32_t hits = LaneMask<false>(LoadV<vf>(w + i), least); hits != 0; hits &= hits - 1) take(i + __builtin_ctz(hits));
  }
  for (; i < n; ++i) {
    if (w[i] >= least) take(i);
  }
  return mass;
}

// The weights of the candidates in bin b that are >= least, into out.
void GatherBin(const std::vector<Candidate>& candidates, int b, float least, std::vector<float>& out) {
  out.clear();
  for (const Candidate& c : candidates) {
    if (Bin(c.weight) == b && c.weight >= least) out.push_back(c.weight);
  }
}

// The least weight a token needs to be kept by top_k (0: off) and top_p (1: off); 0 keeps
// every token. s.candidates hold every token it keeps when it is > 0.
float Threshold(const float* w, int64_t n, double total, int32_t top_k, float top_p, Scratch& s) {
  const bool by_k = top_k > 0 && top_k < n, by_p = top_p < 1.0f;
  if (!by_k && !by_p) return 0.0f;
  const double collected = Collect(w, n, kCandidateWeight, s.candidates);
  const bool enough = by_k ? static_cast<int64_t>(s.candidates.size()) >= top_k : collected >= top_p * total;
  if (!enough) Collect(w, n, std::numeric_limits<float>::denorm_min(), s.candidates);
  // top_k restricts unless fewer tokens than top_k weigh > 0.
  const bool k_restricts = by_k && static_cast<int64_t>(s.candidates.size()) >= top_k;
  if (!k_restricts && !by_p) return 0.0f;

  std::fill(s.count.begin(), s.count.end(), 0);
  std::fill(s.mass.begin(), s.mass.end(), 0.0);
  for (const Candidate& c : s.candidates) {
    const int b = Bin(c.weight);
    s.count[b] += 1;
    s.mass[b] += c.weight;
  }

  float threshold_k = 0.0f;
  int bin_k = -1;         // the bin of the top_k-th largest weight (-1: top_k keeps every candidate)
  double kept_mass = total;  // what top_k keeps
  double bin_k_mass = 0;     // of which in bin_k
  if (k_restricts) {
    int64_t above = 0;
    double mass_above = 0;
    int b = kNumBins - 1;
    for (; above + s.count[b] < top_k; --b) {
      above += s.count[b];
      mass_above += s.mass[b];
    }
    GatherBin(s.candidates, b, 0.0f, s.bin);
    const auto nth = s.bin.begin() + (top_k - above - 1);
    std::nth_element(s.bin.begin(), nth, s.bin.end(), std::greater<float>());
    threshold_k = *nth;
    for (float x : s.bin) bin_k_mass += x >= threshold_k ? x : 0.0;
    bin_k = b;
    kept_mass = mass_above + bin_k_mass;
  }
  if (!by_p) return threshold_k;

  // top_p of what top_k kept: bins above bin_k whole, bin_k's kept part, nothing below.
  const double target = top_p * kept_mass;
  double above = 0;
  int b = kNumBins - 1;
  for (; b >= 0 && b >= bin_k; --b) {
    const double m = b == bin_k ? bin_k_mass : s.mass[b];
    if (above + m >= target) break;
    above += m;
  }
  if (b < 0 || b < bin_k) return threshold_k;  // rounding: the whole of top_k's set
  GatherBin(s.candidates, b, threshold_k, s.bin);
  std::sort(s.bin.begin(), s.bin.end(), std::greater<float>());
  float threshold_p = s.bin.empty() ? threshold_k : s.bin.back();
  for (float x : s.bin) {
    above += x;
    if (above >= target) {
      threshold_p = x;
      break;
    }
  }
  return std::max(threshold_k, threshold_p);
}

// The first token, in id order, whose running weight passes u * total (total: the sum of w):
// chunks of kChunk tokens first (their sums in vector lanes), then token by token.
int32_t DrawFromRow(const float* w, int64_t n, double total, float u) {
  constexpr int64_t kChunk = 16 * kLanes;
  const double target = static_cast<double>(u) * total;
  double running = 0;
  int64_t i = 0;
  for (; i + kChunk <= n; i += kChunk) {
    vf lanes = LoadV<vf>(w + i);
    for (int64_t j = kLanes; j < kChunk; j += kLanes) lanes += LoadV<vf>(w + i + j);
    double chunk = 0;
    for (int l = 0; l < kLanes; ++l) chunk += lanes[l];
    if (running + chunk > target) break;
    running += chunk;
  }
  for (; i < n; ++i) {
    running += w[i];
    if (w[i] > 0 && running > target) return static_cast<int32_t>(i);
  }
  for (i = n - 1; i > 0 && !(w[i] > 0); --i) {
  }
  return static_cast<int32_t>(i);  // rounding left the target past the sum: the last token that weighs
}

// The same over the candidates with weight >= threshold.
int32_t DrawFromCandidates(const std::vector<Candidate>& candidates, float threshold, float u) {
  double total = 0;
  for (const Candidate& c : candidates) total += c.weight >= threshold ? c.weight : 0.0;
  const double target = static_cast<double>(u) * total;
  double running = 0;
  int32_t last = 0;
  for (const Candidate& c : candidates) {
    if (c.weight < threshold) continue;
    running += c.weight;
    last = c.id;
    if (running > target) return c.id;
  }
  return last;
}

int32_t SampleRow(const float* logits, int64_t n, float temperature, int32_t top_k, float top_p, float min_p,
                  int32_t seed, int32_t output_index, Scratch& s) {
  const float largest = Largest(logits, n);
  if (!std::isfinite(largest)) {  // no finite logit: the first largest (an inf), else token 0
    const float* at = std::find(logits, logits + n, largest);
    return at == logits + n ? 0 : static_cast<int32_t>(at - logits);
  }
  s.weights.resize(n);
  float* w = s.weights.data();
  // 1 / temperature stays finite, so the largest logit weighs exp(0 * inv) = 1 for any temperature > 0.
  const float inv_temperature = std::min(1.0f / temperature, std::numeric_limits<float>::max());
  const double total = Weights(logits, n, largest, inv_temperature, min_p, w);
  const float u = RowUniform(seed, output_index);
  const float threshold = Threshold(w, n, total, top_k, top_p, s);
  return threshold > 0.0f ? DrawFromCandidates(s.candidates, threshold, u) : DrawFromRow(w, n, total, u);
}

ffi::Error SampleTokens(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> logits, ffi::Buffer<ffi::F32> temperature,
                        ffi::Buffer<ffi::S32> top_k, ffi::Buffer<ffi::F32> top_p, ffi::Buffer<ffi::F32> min_p,
                        ffi::Buffer<ffi::S32> seeds, ffi::Buffer<ffi::S32> output_index,
                        ffi::Result<ffi::Buffer<ffi::S32>> token_ids) {
  const auto ld = logits.dimensions();
  const int64_t rows = ld.size() == 2 ? ld[0] : -1;
  for (int64_t count : {temperature.element_count(), top_k.element_count(), top_p.element_count(),
                        min_p.element_count(), seeds.element_count(), output_index.element_count(),
                        token_ids->element_count()}) {
    if (rows < 0 || count != rows || ld[1] < 1 || ld[1] > INT32_MAX) {
      return ffi::Error::InvalidArgument("sample_tokens: need logits [S, V] (0 < V < 2^31) and temperature, "
                                         "top_k, top_p, min_p, seeds, output_index and token_ids [S]; got logits " +
                                         Dims(ld));
    }
  }
  const int64_t n = ld[1];
  int32_t* out = token_ids->typed_data();
  ParallelFor(pool, rows, [&](int64_t r, int64_t) {
    thread_local Scratch scratch;
    const float t = temperature.typed_data()[r];
    out[r] = t > 0.0f ? SampleRow(logits.typed_data() + r * n, n, t, top_k.typed_data()[r], top_p.typed_data()[r],
                                  min_p.typed_data()[r], seeds.typed_data()[r], output_index.typed_data()[r], scratch)
                      : 0;
  });
  return ffi::Error::Success();
}

// Each row of logits (already divided by its temperature) with what top_k (0: off) and top_p
// (1: off) drop set to -inf: the draw's kept tokens, as the least logit among them.
ffi::Error TopKTopPMask(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> logits, ffi::Buffer<ffi::S32> top_k,
                        ffi::Buffer<ffi::F32> top_p, ffi::Result<ffi::Buffer<ffi::F32>> masked) {
  const auto ld = logits.dimensions();
  const int64_t rows = ld.size() == 2 ? ld[0] : -1;
  if (rows < 0 || ld[1] < 1 || ld[1] > INT32_MAX || top_k.element_count() != rows || top_p.element_count() != rows ||
      masked->element_count() != logits.element_count()) {
    return ffi::Error::InvalidArgument("apply_top_k_top_p: need logits [S, V] (0 < V < 2^31), top_k and top_p [S]; "
                                       "got logits " + Dims(ld));
  }
  const int64_t n = ld[1];
  ParallelFor(pool, rows, [&](int64_t r, int64_t) {
    thread_local Scratch scratch;
    const float* x = logits.typed_data() + r * n;
    float* out = masked->typed_data() + r * n;
    float floor = -INFINITY;  // keeps every logit but NaN
    const float largest = Largest(x, n);
    if (std::isfinite(largest)) {
      scratch.weights.resize(n);
      const double total = Weights(x, n, largest, 1.0f, 0.0f, scratch.weights.data());
      const float threshold =
          Threshold(scratch.weights.data(), n, total, top_k.typed_data()[r], top_p.typed_data()[r], scratch);
      if (threshold > 0.0f) {
        floor = INFINITY;
        for (const Candidate& c : scratch.candidates) {
          if (c.weight >= threshold) floor = std::min(floor, x[c.id]);
        }
      }
    }
    for (int64_t i = 0; i < n; ++i) out[i] = x[i] >= floor ? x[i] : -INFINITY;
  });
  return ffi::Error::Success();
}

// The k largest of a row in one pass, in descending order, ties by lower id: a sorted list
// that a score enters only when it is above the list's last (scanning in id order, an equal
// score comes after the one already there).
struct Scored {
  float score;
  int32_t id;
};

struct TopK {
  std::vector<Scored> list;  // descending; ids ascending among equal scores

  void Insert(float x, int32_t id, size_t k) {
    size_t at = list.size();
    while (at > 0 && x > list[at - 1].score) --at;
    if (list.size() < k) list.push_back({});
    else if (at == list.size()) return;
    std::move_backward(list.begin() + at, list.end() - 1, list.end());
    list[at] = {x, id};
  }

  void Scan(const float* x, int64_t n, size_t k) {
    list.clear();
    if (k == 0) return;
    int64_t i = 0;
    for (; i < n && list.size() < k; ++i) Insert(x[i], static_cast<int32_t>(i), k);
    for (; i + kLanes <= n; i += kLanes) {
      for (uint32_t hits = LaneMask<true>(LoadV<vf>(x + i), list.back().score); hits != 0; hits &= hits - 1) {
        const int64_t j = i + __builtin_ctz(hits);
        Insert(x[j], static_cast<int32_t>(j), k);
      }
    }
    for (; i < n; ++i) {
      if (x[i] > list.back().score) Insert(x[i], static_cast<int32_t>(i), k);
    }
  }
};

// log(sum(exp(x - largest))) for a finite largest (NaN scores make it NaN). Lanes sum 1,024
// terms at a time in float, then into a double: one float accumulator over a 262k vocabulary
// would be off by ~1e-5.
float LogSumExp(const float* x, int64_t n, float largest) {
  constexpr int64_t kChunk = 1024;
  double total = 0;
  int64_t i = 0;
  while (i + kLanes <= n) {
    vf sum = SplatV<vf>(0.0f);
    for (const int64_t end = std::min(n, i + kChunk); i + kLanes <= end; i += kLanes) {
      sum += ExpV<vf, vi>(LoadV<vf>(x + i) - largest);
    }
    for (int l = 0; l < kLanes; ++l) total += sum[l];
  }
  for (; i < n; ++i) total += std::exp(x[i] - largest);
  return static_cast<float>(std::log(total));
}

// How many of (x - shift) - offset are > value: the reference's order of operations, so the
// count is over the same rounded values it compares.
int64_t CountAbove(const float* x, int64_t n, float shift, float offset, float value) {
  int64_t count = 0;
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    count += __builtin_popcount(LaneMask<true>((LoadV<vf>(x + i) - shift) - offset, value));
  }
  for (; i < n; ++i) count += (x[i] - shift) - offset > value;
  return count;
}

// reference.logprob_outputs per row: chosen [S], ranks [S], top [S, K], top_ids [S, K].
ffi::Error LogprobOutputs(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> scores, ffi::Buffer<ffi::S32> token_ids,
                          ffi::Buffer<ffi::S32> wanted, bool normalize, ffi::Result<ffi::Buffer<ffi::F32>> chosen,
                          ffi::Result<ffi::Buffer<ffi::S32>> ranks, ffi::Result<ffi::Buffer<ffi::F32>> top,
                          ffi::Result<ffi::Buffer<ffi::S32>> top_ids) {
  const auto sd = scores.dimensions(), td = top->dimensions();
  const int64_t rows = sd.size() == 2 ? sd[0] : -1;
  if (rows < 0 || sd[1] < 1 || sd[1] > INT32_MAX || token_ids.element_count() != rows ||
      wanted.element_count() != rows || chosen->element_count() != rows || ranks->element_count() != rows ||
      td.size() != 2 || td[0] != rows || td[1] < 0 || td[1] > sd[1] || top_ids->element_count() != rows * td[1]) {
    return ffi::Error::InvalidArgument("logprob_outputs: need scores [S, V] (0 < V < 2^31), token_ids and wanted "
                                       "[S], top and top_ids [S, K] (0 <= K <= V); got scores " + Dims(sd) +
                                       ", top " + Dims(td));
  }
  const int64_t n = sd[1], k = td[1];
  ParallelFor(pool, rows, [&](int64_t r, int64_t) {
    float* row_top = top->typed_data() + r * k;
    int32_t* row_ids = top_ids->typed_data() + r * k;
    if (!wanted.typed_data()[r]) {
      chosen->typed_data()[r] = 0.0f;
      ranks->typed_data()[r] = 0;
      std::fill(row_top, row_top + k, 0.0f);
      std::fill(row_ids, row_ids + k, 0);
      return;
    }
    thread_local TopK top_k;
    const float* x = scores.typed_data() + r * n;
    top_k.Scan(x, n, static_cast<size_t>(k));
    float shift = 0.0f, offset = 0.0f;  // values are (x - shift) - offset
    if (normalize) {
      shift = Largest(x, n);
      offset = std::isfinite(shift) ? LogSumExp(x, n, shift) : NAN;
    }
    const int32_t token = std::clamp<int32_t>(token_ids.typed_data()[r], 0, static_cast<int32_t>(n - 1));
    const float value = (x[token] - shift) - offset;
    chosen->typed_data()[r] = value;
    ranks->typed_data()[r] = static_cast<int32_t>(1 + CountAbove(x, n, shift, offset, value));
    for (int64_t i = 0; i < k; ++i) {
      row_top[i] = (top_k.list[i].score - shift) - offset;
      row_ids[i] = top_k.list[i].id;
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JpagedSampleTokens, SampleTokens,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // logits
                                  .Arg<ffi::Buffer<ffi::F32>>()   // temperature
                                  .Arg<ffi::Buffer<ffi::S32>>()   // top_k
                                  .Arg<ffi::Buffer<ffi::F32>>()   // top_p
                                  .Arg<ffi::Buffer<ffi::F32>>()   // min_p
                                  .Arg<ffi::Buffer<ffi::S32>>()   // seeds
                                  .Arg<ffi::Buffer<ffi::S32>>()   // output_index
                                  .Ret<ffi::Buffer<ffi::S32>>());  // token_ids

XLA_FFI_DEFINE_HANDLER_SYMBOL(JpagedTopKTopPMask, TopKTopPMask,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // logits
                                  .Arg<ffi::Buffer<ffi::S32>>()   // top_k
                                  .Arg<ffi::Buffer<ffi::F32>>()   // top_p
                                  .Ret<ffi::Buffer<ffi::F32>>());  // masked

XLA_FFI_DEFINE_HANDLER_SYMBOL(JpagedLogprobOutputs, LogprobOutputs,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // scores
                                  .Arg<ffi::Buffer<ffi::S32>>()   // token_ids
                                  .Arg<ffi::Buffer<ffi::S32>>()   // wanted
                                  .Attr<bool>("normalize")
                                  .Ret<ffi::Buffer<ffi::F32>>()   // chosen
                                  .Ret<ffi::Buffer<ffi::S32>>()   // ranks
                                  .Ret<ffi::Buffer<ffi::F32>>()   // top
                                  .Ret<ffi::Buffer<ffi::S32>>());  // top_ids
