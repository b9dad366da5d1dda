// kernels.cpp -- drivers of the CPU gram / combine / solvers: the fixed chunking, the
// OpenMP loops and the choice of instruction-set variant. Torch-free.
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "../common/bucketmoo_solvers.h"
#include "bucketmoo_cpu.h"
#include "kernels_variants.h"

namespace bucketmoo {
namespace cpu {
namespace {

using GramChunkFn = void (*)(const void* const*, int, DType, int64_t, int64_t, double*, double*);
using CombineRangeFn = void (*)(void*, const void* const*, int, DType, const double*, int64_t,
                                int64_t, bool);

struct Variant {
  GramChunkFn gram_chunk;
  CombineRangeFn combine_range;
  const char* name;
};

Variant pick_variant() {
  const char* env = std::getenv("BUCKETMOO_CPU_ISA");  // "baseline" forces the portable loops
  bool want_baseline = env != nullptr && std::strcmp(env, "baseline") == 0;
#if BUCKETMOO_HAVE_AVX2_VARIANT
  __builtin_cpu_init();
  if (!want_baseline && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
      __builtin_cpu_supports("f16c"))
    return {gram_chunk_avx2, combine_range_avx2, "avx2"};
#endif
  (void)want_baseline;
  return {gram_chunk_baseline, combine_range_baseline, "baseline"};
}

const Variant& variant() {
  static const Variant v = pick_variant();
  return v;
}

// Below this many elements in all, the loops run on the calling thread only (same chunks,
// so the same result).
constexpr int64_t kParallelMin = 2 * kChunk;

// Outputs at least this large (bytes) are written with non-temporal stores when they alias
// no input: far beyond the last-level cache, a normal store would first read every line.
constexpr int64_t kStreamMinBytes = int64_t(64) << 20;
constexpr bool kStreamStoresDefault = true;

int threads_for(int num_threads) {
#ifdef _OPENMP
  return num_threads > 0 ? num_threads : omp_get_max_threads();
#else
  (void)num_threads;
  return 1;
#endif
}

// first[s] = index of the first chunk of segment s; first[S] = number of chunks.
std::vector<int64_t> chunk_starts(const int64_t* offsets, int64_t S) {
  std::vector<int64_t> first(size_t(S) + 1);
  first[0] = 0;
  for (int64_t s = 0; s < S; ++s) {
    int64_t len = offsets[s + 1] - offsets[s];
    first[s + 1] = first[s] + (len + kChunk - 1) / kChunk;
  }
  return first;
}

// BUCKETMOO_CPU_STREAM_STORES=0/1 turns the non-temporal combine stores off/on (read once).
bool stream_stores_enabled() {
  static const bool enabled = [] {
    const char* env = std::getenv("BUCKETMOO_CPU_STREAM_STORES");
    return env == nullptr ? kStreamStoresDefault : std::strcmp(env, "0") != 0;
  }();
  return enabled;
}

// Chunks handed out at a time by the dynamic schedule: about kChunk elements' worth, so that
// layouts with many tiny segments do not pay one scheduling step per segment. (Dynamic, not
// static: on a machine shared with other processes a descheduled thread then delays
// nobody. Which thread runs a chunk never changes the result.)
inline int64_t dynamic_grain(int64_t num_chunks, int64_t n) {
  if (n <= 0) return 1;
  int64_t g = (num_chunks * kChunk + n - 1) / n;
  return g < 1 ? 1 : g;
}

// Segment of chunk c (skips empty segments: the last s with first[s] <= c).
inline int64_t segment_of(const std::vector<int64_t>& first, int64_t c) {
  return int64_t(std::upper_bound(first.begin(), first.end(), c) - first.begin()) - 1;
}

}  // namespace

const char* isa_name() { return variant().name; }

void gram(const void* const* grads, int T, DType dtype, const int64_t* offsets, int64_t S,
          float* gram_out, int num_threads) {
  const Variant& v = variant();
  const std::vector<int64_t> first = chunk_starts(offsets, S);
  const int64_t C = first[size_t(S)];
  const int P = T * (T + 1) / 2;
  const int64_t N = offsets[S];
  std::vector<double> partial(size_t(C) * P);
  const int nt = threads_for(num_threads);
  const int64_t grain = dynamic_grain(C, N);
#pragma omp parallel num_threads(nt) if (N >= kParallelMin && nt > 1)
  {
    std::vector<double> scratch(T > 8 ? static_cast<size_t>(T) * 256 : 0);
#pragma omp for schedule(dynamic, grain)
    for (int64_t c = 0; c < C; ++c) {
      const int64_t s = segment_of(first, c);
      const int64_t begin = offsets[s] + (c - first[size_t(s)]) * kChunk;
      const int64_t end = std::min(begin + kChunk, offsets[s + 1]);
      v.gram_chunk(grads, T, dtype, begin, end, partial.data() + size_t(c) * P, scratch.data());
    }
  }
  // Reduce the chunks of each segment in chunk order (fixed, thread-count independent).
#pragma omp parallel for schedule(static) num_threads(nt) if (S >= 4096 && nt > 1)
  for (int64_t s = 0; s < S; ++s) {
    double acc[8 * 9 / 2];
    std::vector<double> big(P > 36 ? P : 0);
    double* sum = P > 36 ? big.data() : acc;
    for (int p = 0; p < P; ++p) sum[p] = 0.0;
    for (int64_t c = first[size_t(s)]; c < first[size_t(s) + 1]; ++c)
      for (int p = 0; p < P; ++p) sum[p] += partial[size_t(c) * P + p];
    float* g = gram_out + s * T * T;
    int p = 0;
    for (int a = 0; a < T; ++a)
      for (int b = a; b < T; ++b, ++p) {
        g[a * T + b] = float(sum[p]);
        g[b * T + a] = float(sum[p]);
      }
  }
}

void combine(void* out, const void* const* grads, int T, DType dtype, const float* weights,
             const int64_t* offsets, int64_t S, int num_threads) {
  const Variant& v = variant();
  const std::vector<int64_t> first = chunk_starts(offsets, S);
  const int64_t C = first[size_t(S)];
  const int64_t N = offsets[S];
  const int nt = threads_for(num_threads);
  const int64_t grain = dynamic_grain(C, N);
  bool stream = stream_stores_enabled() && dtype == DType::kFloat32 && N * 4 >= kStreamMinBytes;
  for (int t = 0; t < T; ++t) stream = stream && grads[t] != out;
#pragma omp parallel num_threads(nt) if (N >= kParallelMin && nt > 1)
  {
    std::vector<double> w(static_cast<size_t>(T));
#pragma omp for schedule(dynamic, grain)
    for (int64_t c = 0; c < C; ++c) {
      const int64_t s = segment_of(first, c);
      const int64_t begin = offsets[s] + (c - first[size_t(s)]) * kChunk;
      const int64_t end = std::min(begin + kChunk, offsets[s + 1]);
      for (int t = 0; t < T; ++t) w[size_t(t)] = double(weights[s * T + t]);
      v.combine_range(out, grads, T, dtype, w.data(), begin, end, stream);
    }
  }
}

void solve_mgda(const double* gram64, int64_t S, int T, int solver, int max_iter, double tol,
                double* weights, int num_threads) {
  const int nt = threads_for(num_threads);
#pragma omp parallel for schedule(dynamic, 16) num_threads(nt) if (S >= 64 && nt > 1)
  for (int64_t s = 0; s < S; ++s)
    solver::mgda_solve(gram64 + s * T * T, T, solver, max_iter, tol, weights + s * T);
}

void solve_pcgrad(const double* gram64, int64_t S, int T, const int64_t* orders, double* weights,
                  int num_threads) {
  const int nt = threads_for(num_threads);
#pragma omp parallel for schedule(static) num_threads(nt) if (S >= 256 && nt > 1)
  for (int64_t s = 0; s < S; ++s)
    solver::pcgrad_solve(gram64 + s * T * T, T, orders, weights + s * T);
}

void solve_cagrad(const double* gram64, int64_t S, int T, double c, int rescale, double* weights,
                  int num_threads) {
  const int nt = threads_for(num_threads);
#pragma omp parallel for schedule(dynamic, 16) num_threads(nt) if (S >= 64 && nt > 1)
  for (int64_t s = 0; s < S; ++s)
    solver::cagrad_solve(gram64 + s * T * T, T, c, rescale, weights + s * T);
}

}  // namespace cpu
}  // namespace bucketmoo
