// kernels.cpp -- drivers of the CPU gram / combine / solvers: the fixed chunking, the
// OpenMP loops and the choice of instruction-set variant. Torch-free.
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <vector>

#include <unistd.h>

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

// The best variant this CPU runs; BUCKETMOO_CPU_ISA=baseline|avx2|avx512 picks one (if the CPU
// has it; an unknown or unavailable name gets the best available). All give the same bits.
Variant pick_variant() {
  const char* env = std::getenv("BUCKETMOO_CPU_ISA");
  const bool want_baseline = env != nullptr && std::strcmp(env, "baseline") == 0;
  const bool want_avx2 = env != nullptr && std::strcmp(env, "avx2") == 0;
  if (want_baseline) return {gram_chunk_baseline, combine_range_baseline, "baseline"};
#if BUCKETMOO_HAVE_AVX2_VARIANT
  __builtin_cpu_init();
  const bool has_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                        __builtin_cpu_supports("f16c");
#if BUCKETMOO_HAVE_AVX512_VARIANT
  const bool has_avx512 = has_avx2 && __builtin_cpu_supports("avx512f") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512dq");
  if (has_avx512 && !want_avx2) return {gram_chunk_avx512, combine_range_avx512, "avx512"};
#endif
  if (has_avx2) return {gram_chunk_avx2, combine_range_avx2, "avx2"};
#endif
  (void)want_avx2;
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

// The chunks of a layout and one partial Gram (P = T(T+1)/2 doubles) per chunk.
struct GramChunks {
  std::vector<int64_t> first;  // chunk_starts()
  int64_t C, N, grain;
  int P;
  std::vector<double> partial;
  GramChunks(const int64_t* offsets, int64_t S, int T)
      : first(chunk_starts(offsets, S)), C(first[size_t(S)]), N(offsets[S]),
        grain(dynamic_grain(C, N)), P(T * (T + 1) / 2), partial(size_t(C) * P) {}
  double* partial_of(int64_t c) { return partial.data() + size_t(c) * P; }
};

// Segment s and element range [begin, end) of chunk c.
struct ChunkRange {
  int64_t s, begin, end;
};
inline ChunkRange chunk_range(const std::vector<int64_t>& first, const int64_t* offsets, int64_t c) {
  const int64_t s = segment_of(first, c);
  const int64_t begin = offsets[s] + (c - first[size_t(s)]) * kChunk;
  return {s, begin, std::min(begin + kChunk, offsets[s + 1])};
}

// Sums the chunk partials of segment s in chunk order (fixed, thread-count independent) and
// writes its symmetric float32 Gram [T, T].
void reduce_segment(const double* partial, const std::vector<int64_t>& first, int64_t s, int T,
                    float* gram_out) {
  const int P = T * (T + 1) / 2;
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

inline int64_t element_bytes(DType dt) { return dt == DType::kFloat32 ? 4 : 2; }

// Non-temporal combine stores: float32 output far beyond the caches that aliases no input.
bool use_stream_stores(const void* out, const void* const* grads, int T, DType dtype, int64_t N) {
  bool stream = stream_stores_enabled() && dtype == DType::kFloat32 && N * 4 >= kStreamMinBytes;
  for (int t = 0; t < T; ++t) stream = stream && grads[t] != out;
  return stream;
}

// What fused() does with each segment: runs of consecutive small segments (each, and each
// run in all, at most `budget` gradient bytes), each run swept by one thread while it is in
// that core's cache; and the large segments, each swept by all threads together.
struct SweepPlan {
  std::vector<int64_t> run_starts;  // run r: segments run_starts[r] .. run_ends[r]
  std::vector<int64_t> run_ends;
  std::vector<int64_t> large;
};

SweepPlan plan_sweep(const int64_t* offsets, int64_t S, int64_t row_bytes, int64_t budget) {
  SweepPlan plan;
  int64_t bytes = 0;
  bool open = false;
  for (int64_t s = 0; s < S; ++s) {
    const int64_t b = (offsets[s + 1] - offsets[s]) * row_bytes;
    if (b > budget) {
      plan.large.push_back(s);
      open = false;
      continue;
    }
    if (!open || bytes + b > budget) {
      plan.run_starts.push_back(s);
      plan.run_ends.push_back(s);
      bytes = 0;
      open = true;
    }
    plan.run_ends.back() = s + 1;
    bytes += b;
  }
  return plan;
}

int64_t default_group_bytes() {
  int64_t bytes = int64_t(256) << 10;
#ifdef _SC_LEVEL2_CACHE_SIZE
  const long l2 = sysconf(_SC_LEVEL2_CACHE_SIZE);
  if (l2 > 0) bytes = int64_t(l2) / 2;  // half the core's L2: room for the output and the rest
#endif
  return std::max<int64_t>(bytes, int64_t(64) << 10);
}

}  // namespace

const char* isa_name() { return variant().name; }

int64_t fused_group_bytes() {
  static const int64_t bytes = [] {
    const char* env = std::getenv("BUCKETMOO_CPU_FUSED_GROUP_BYTES");
    if (env != nullptr) {
      const long long v = std::atoll(env);
      if (v > 0) return int64_t(v);
    }
    return default_group_bytes();
  }();
  return bytes;
}

void gram(const void* const* grads, int T, DType dtype, const int64_t* offsets, int64_t S,
          float* gram_out, int num_threads) {
  const Variant& v = variant();
  GramChunks plan(offsets, S, T);
  const std::vector<int64_t>& first = plan.first;
  const int nt = threads_for(num_threads);
#pragma omp parallel num_threads(nt) if (plan.N >= kParallelMin && nt > 1)
  {
    std::vector<double> scratch(T > 8 ? static_cast<size_t>(T) * 256 : 0);
#pragma omp for schedule(dynamic, plan.grain)
    for (int64_t c = 0; c < plan.C; ++c) {
      const ChunkRange r = chunk_range(first, offsets, c);
      v.gram_chunk(grads, T, dtype, r.begin, r.end, plan.partial_of(c), scratch.data());
    }
  }
#pragma omp parallel for schedule(static) num_threads(nt) if (S >= 4096 && nt > 1)
  for (int64_t s = 0; s < S; ++s) reduce_segment(plan.partial.data(), first, s, T, gram_out);
}

void combine(void* out, const void* const* grads, int T, DType dtype, const float* weights,
             const int64_t* offsets, int64_t S, int num_threads) {
  const Variant& v = variant();
  const std::vector<int64_t> first = chunk_starts(offsets, S);
  const int64_t C = first[size_t(S)];
  const int64_t N = offsets[S];
  const int nt = threads_for(num_threads);
  const int64_t grain = dynamic_grain(C, N);
  const bool stream = use_stream_stores(out, grads, T, dtype, N);
#pragma omp parallel num_threads(nt) if (N >= kParallelMin && nt > 1)
  {
    std::vector<double> w(static_cast<size_t>(T));
#pragma omp for schedule(dynamic, grain)
    for (int64_t c = 0; c < C; ++c) {
      const ChunkRange r = chunk_range(first, offsets, c);
      for (int t = 0; t < T; ++t) w[size_t(t)] = double(weights[r.s * T + t]);
      v.combine_range(out, grads, T, dtype, w.data(), r.begin, r.end, stream);
    }
  }
}

void weights(const float* gram, int64_t S, int T, const solver::WeightStep& spec,
             const double* losses, float* w, int num_threads) {
  const int nt = threads_for(num_threads);
  const bool per_task_losses = solver::uses_losses(spec.normalization);
#pragma omp parallel for schedule(dynamic, 16) num_threads(nt) if (S >= 64 && nt > 1)
  for (int64_t s = 0; s < S; ++s)
    solver::segment_weights(gram + s * T * T, T, spec, per_task_losses ? losses + s * T : nullptr,
                            w + s * T);
}

// Small segments: a thread takes a run and, segment by segment, computes its Gram, weights
// and combine while the segment is still in its cache (no barrier). Large segments: all
// threads share the gram chunks, one thread does the weight step, all share the combine
// chunks. (Combining a large segment from its end, to reuse what the last-level cache still
// holds, measured slower here than the forward order the hardware prefetchers follow.)
// Segments touch disjoint elements and their own partial / gram / weight slots, so only the
// steps inside one large segment wait for each other.
void fused(void* out, const void* const* grads, int T, DType dtype, const int64_t* offsets,
           int64_t S, const solver::WeightStep& spec, const double* losses, float* gram_out,
           float* weights_out, int num_threads) {
  const Variant& v = variant();
  GramChunks chunks(offsets, S, T);
  const std::vector<int64_t>& first = chunks.first;
  const int64_t N = chunks.N, grain = chunks.grain;
  const SweepPlan plan =
      plan_sweep(offsets, S, int64_t(T) * element_bytes(dtype), fused_group_bytes());
  const int64_t runs = int64_t(plan.run_starts.size());
  const int nt = threads_for(num_threads);
  const bool stream = use_stream_stores(out, grads, T, dtype, N);
  const bool per_task_losses = solver::uses_losses(spec.normalization);
#pragma omp parallel num_threads(nt) if (N >= kParallelMin && nt > 1)
  {
    std::vector<double> scratch(T > 8 ? static_cast<size_t>(T) * 256 : 0);
    std::vector<double> w(static_cast<size_t>(T));
    auto gram_chunks = [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const ChunkRange r = chunk_range(first, offsets, c);
        v.gram_chunk(grads, T, dtype, r.begin, r.end, chunks.partial_of(c), scratch.data());
      }
    };
    auto weight_step = [&](int64_t s) {
      reduce_segment(chunks.partial.data(), first, s, T, gram_out);
      solver::segment_weights(gram_out + s * T * T, T, spec,
                              per_task_losses ? losses + s * T : nullptr, weights_out + s * T);
    };
    auto combine_chunk = [&](int64_t c) {
      const ChunkRange r = chunk_range(first, offsets, c);
      for (int t = 0; t < T; ++t) w[size_t(t)] = double(weights_out[r.s * T + t]);
      v.combine_range(out, grads, T, dtype, w.data(), r.begin, r.end, stream);
    };
#pragma omp for schedule(dynamic, 1) nowait
    for (int64_t r = 0; r < runs; ++r) {
      for (int64_t s = plan.run_starts[size_t(r)]; s < plan.run_ends[size_t(r)]; ++s) {
        gram_chunks(first[size_t(s)], first[size_t(s) + 1]);
        weight_step(s);
        for (int64_t c = first[size_t(s)]; c < first[size_t(s) + 1]; ++c) combine_chunk(c);
      }
    }
    for (const int64_t s : plan.large) {
      const int64_t c0 = first[size_t(s)], c1 = first[size_t(s) + 1];
#pragma omp for schedule(dynamic, grain)
      for (int64_t c = c0; c < c1; ++c) gram_chunks(c, c + 1);
#pragma omp single
      weight_step(s);
#pragma omp for schedule(dynamic, grain) nowait
      for (int64_t c = c0; c < c1; ++c) combine_chunk(c);
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

void solve_dual_cone(const double* gram64, int64_t S, int T, const solver::WeightStep& spec,
                     double* weights, int num_threads) {
  const int nt = threads_for(num_threads);
#pragma omp parallel for schedule(dynamic, 16) num_threads(nt) if (S >= 64 && nt > 1)
  for (int64_t s = 0; s < S; ++s)
    solver::weight_step_method(gram64 + s * T * T, T, spec, weights + s * T);
}

}  // namespace cpu
}  // namespace bucketmoo
