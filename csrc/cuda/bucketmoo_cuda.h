// Public launchers of the CUDA backend: torch-free, raw device pointers, sizes and a stream.
//
// Every launcher only enqueues kernels on `stream`: it allocates nothing, never synchronises
// with the host and never reads device memory from the host, so it can be captured in a CUDA
// graph. Scratch memory ("workspace") is passed in by the caller (the torch glue allocates it
// through the caching allocator). Each returns cudaSuccess or the first CUDA error (bad
// arguments give cudaErrorInvalidValue without launching anything).
//
// Conventions (T tasks, N elements, S segments):
//   grads    T device pointers to N elements each, all of `dtype`, unit stride. They may be
//            rows of one [T, N] buffer or separate buffers. T <= kMaxTasks.
//   offsets  device int64 [S + 1], non-decreasing, offsets[0] = 0, offsets[S] = N
//            (empty segments allowed). Not checked on the device.
//   gram     device float32 [S, T, T] (row-major, symmetric).
//   weights  device float32 [S, T] for combine; float64 [S, T] out of the solvers.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

#include "../common/bucketmoo_dtype.h"
#include "../common/bucketmoo_solvers.h"

namespace bucketmoo {
namespace cuda {

// Most task gradients the CUDA kernels take (pointers travel by value in a kernel argument,
// and the Gram / combine kernels are instantiated for T = 1..kMaxTasks).
constexpr int kMaxTasks = 8;

// Element type of the gradients: bucketmoo::DType (csrc/common/bucketmoo_dtype.h), shared
// with the CPU kernels.
using ::bucketmoo::DType;

// Bytes of workspace `gram_cuda` needs for these sizes: float32 partial sums of the pieces of
// segments that span several tiles, 2 ceil(N / tile) T(T+1)/2 floats (at least one slot),
// independent of the number of segments. Returns 0 for bad arguments (T outside 1..kMaxTasks).
size_t gram_workspace_bytes(int num_tasks, DType dtype, int64_t numel, int64_t num_segments);

// Per-segment Gram matrices: gram[s] = G_s G_s^T, float32 accumulation, deterministic
// (fixed partial slots and a fixed-order float64 final sum; no float atomics).
// Two kernels: the Grams of single-tile segments and the partial Grams of the pieces of
// longer ones, then (one warp per segment) the final sums and the zeros of empty segments.
cudaError_t gram_cuda(const void* const* grads, int num_tasks, DType dtype, int64_t numel,
                      const int64_t* offsets, int64_t num_segments, float* gram, void* workspace,
                      size_t workspace_bytes, cudaStream_t stream);

// out[n] = sum_t weights[s(n), t] * grads[t][n], float32 accumulation in task order, rounded
// once to `dtype`. `out` may be exactly one of the grads (same pointer): every element's T
// inputs are read by the thread that then writes it. Partial overlap is not allowed.
cudaError_t combine_cuda(void* out, const void* const* grads, int num_tasks, DType dtype,
                         int64_t numel, const float* weights, const int64_t* offsets,
                         int64_t num_segments, cudaStream_t stream);

// MGDA weights of every segment from float64 Gram matrices [S, T, T] into weights [S, T]
// (one thread per segment; math from csrc/common). solver: 0 auto, 1 closed form (T = 2),
// 2 exact enumeration (T <= 8), 3 projected gradient (max_iter, tol).
cudaError_t solve_mgda_cuda(const double* gram, int64_t num_segments, int num_tasks, int solver,
                            int max_iter, double tol, double* weights, cudaStream_t stream);

// PCGrad weights; orders is device int64 [T, T-1] (row i: the order in which task i meets
// the others).
cudaError_t solve_pcgrad_cuda(const double* gram, int64_t num_segments, int num_tasks,
                              const int64_t* orders, double* weights, cudaStream_t stream);

// CAGrad weights (paper scale: divided per `rescale`), T <= 8.
cudaError_t solve_cagrad_cuda(const double* gram, int64_t num_segments, int num_tasks, double c,
                              int rescale, double* weights, cudaStream_t stream);

// UPGrad or DualProj weights (spec.method 4 or 5 with norm_eps, reg_eps, max_iter; default
// preference), T <= 16; one thread per segment. spec checked with method_check.
cudaError_t solve_dual_cone_cuda(const double* gram, int64_t num_segments, int num_tasks,
                                 const solver::WeightStep& spec, double* weights, cudaStream_t stream);

// The whole weight step of every segment (solver::segment_weights: normalisation, method,
// unscale, rescale to sum 1) from float32 Grams [S, T, T] into float32 weights [S, T]; one
// warp per segment. spec.orders (pcgrad) is a device int64 [T, T-1]; losses a device float64
// [S, T] when the normalisation uses them, else may be null. spec checked with method_check.
cudaError_t weights_cuda(const float* gram, int64_t num_segments, int num_tasks,
                         const solver::WeightStep& spec, const double* losses, float* weights,
                         cudaStream_t stream);

}  // namespace cuda
}  // namespace bucketmoo
