// bucketmoo_cpu.h -- the native CPU kernels of bucketmoo_kernels (torch-free, raw pointers).
//
//   gram      T task gradients (unit stride, fp32/bf16/fp16) + int64 offsets [S+1]
//             -> float [S, T, T]; accumulated in float64.
//   combine   out[n] = sum_t weights[s(n), t] * grads[t][n], computed in float64 per
//             element in task order (t = 0..T-1), rounded once to the output dtype; `out`
//             may be the storage of one of the gradients.
//   solve_*   per-segment solvers of csrc/common/bucketmoo_solvers.h over S segments.
//   weights   the whole weight step (solver::segment_weights) over S float32 Grams.
//   fused     gram -> weights -> combine in one sweep: each segment of at most
//             fused_group_bytes() of gradients is swept by one thread (its combine finds it
//             in that core's cache); larger ones by all threads together.
//             Same chunks, same sums, same weight step as gram + weights + combine:
//             bit-identical results.
//
// Threading: OpenMP, `num_threads` threads (the binding passes torch's at::get_num_threads()).
// Work is cut into fixed chunks of kChunk elements inside each segment, independent of the
// thread count; per-chunk partial Grams are reduced in chunk order, so results are
// bit-identical for any number of threads.
#pragma once

#include <cstdint>

#include "../common/bucketmoo_dtype.h"
#include "../common/bucketmoo_solvers.h"

namespace bucketmoo {
namespace cpu {

using ::bucketmoo::DType;  // csrc/common/bucketmoo_dtype.h

// Elements per work chunk (per-chunk partial Gram; unit of the OpenMP schedule).
constexpr int64_t kChunk = 16384;

// grads: T pointers to N elements of `dtype`; offsets: S+1 non-decreasing, offsets[S] = N.
// gram: [S, T, T] float32 output (written, symmetric).
void gram(const void* const* grads, int num_tasks, DType dtype, const int64_t* offsets,
          int64_t num_segments, float* gram, int num_threads);

// weights: [S, T] float32; out: N elements of `dtype` (may alias grads[k]).
void combine(void* out, const void* const* grads, int num_tasks, DType dtype,
             const float* weights, const int64_t* offsets, int64_t num_segments, int num_threads);

// gram64: [S, T, T] float64 -> weights [S, T] float64. Arguments already validated with the
// *_check() functions of bucketmoo_solvers.h.
void solve_mgda(const double* gram64, int64_t num_segments, int num_tasks, int solver,
                int max_iter, double tol, double* weights, int num_threads);
void solve_pcgrad(const double* gram64, int64_t num_segments, int num_tasks,
                  const int64_t* orders, double* weights, int num_threads);
void solve_cagrad(const double* gram64, int64_t num_segments, int num_tasks, double c,
                  int rescale, double* weights, int num_threads);
// UPGrad or DualProj (spec.method, .norm_eps, .reg_eps, .max_iter; checked by method_check).
void solve_dual_cone(const double* gram64, int64_t num_segments, int num_tasks,
                     const solver::WeightStep& spec, double* weights, int num_threads);

// gram: [S, T, T] float32 -> weights [S, T] float32. losses: [S, T] float64 when
// solver::uses_losses(spec.normalization), else unused. spec checked with method_check().
void weights(const float* gram, int64_t num_segments, int num_tasks,
             const solver::WeightStep& spec, const double* losses, float* weights,
             int num_threads);

// gram + weights + combine in one sweep over groups of segments (see above). Writes gram
// [S, T, T] float32, weights [S, T] float32 and out (N elements of `dtype`, may alias grads[k]).
void fused(void* out, const void* const* grads, int num_tasks, DType dtype,
           const int64_t* offsets, int64_t num_segments, const solver::WeightStep& spec,
           const double* losses, float* gram, float* weights, int num_threads);

// Largest segment (and run of segments) fused() sweeps on one thread, in gradient bytes (T
// rows together): BUCKETMOO_CPU_FUSED_GROUP_BYTES, else half the L2 cache. Read once.
int64_t fused_group_bytes();

// Which instruction-set variant of the gram/combine loops runs here ("avx2" or "baseline").
const char* isa_name();

}  // namespace cpu
}  // namespace bucketmoo
