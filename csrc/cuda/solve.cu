// Per-segment weights from float64 Gram matrices, all segments in one launch.
//
//   gram: float64 [S, T, T] -> weights: float64 [S, T]   (the method's paper scale)
//
// The math is csrc/common/bucketmoo_solvers.h, the same code the CPU backend runs (results
// agree up to the compilers' floating-point contraction choices). MGDA's exact solver runs a
// warp per segment (lanes share the face candidates); everything else runs one thread per
// segment. The work is tiny and latency-bound; small blocks spread segments over the SMs.
// Each thread works in local buffers and writes its T weights once.
#include "common.cuh"

#include "../common/bucketmoo_solvers.h"

namespace bucketmoo {
namespace cuda {
namespace detail {

constexpr int kSolveThreads = 64;
constexpr int kExactWarps = kSolveThreads / kWarpSize;
constexpr int kMaxFaces = (1 << solver::kMaxExactTasks) - 1;

// MGDA for T = 1 (w = 1) and T = 2 (closed form): one thread per segment.
__global__ void __launch_bounds__(kSolveThreads)
solve_mgda_small_kernel(const double* __restrict__ gram, int64_t num_segments, int num_tasks,
                        double* __restrict__ weights) {
  for (int64_t s = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; s < num_segments;
       s += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    double w[2] = {1.0, 0.0};
    if (num_tasks == 2) solver::mgda_closed_form(gram + s * 4, w);
    for (int t = 0; t < num_tasks; ++t) weights[s * num_tasks + t] = w[t];
  }
}

// MGDA, exact face enumeration (T <= 8): one warp per segment. The lanes share the 2^T - 1
// face candidates (solver::mgda_face / quad_form / feasible, exactly the loop body of
// solver::mgda_exact), the objectives meet in shared memory, and lane 0 applies the same
// pick rule (solver::pick_index) and finishing step as solver::mgda_exact. Same result, about
// 32x less latency than one thread walking all 255 faces at T = 8.
__global__ void __launch_bounds__(kSolveThreads)
solve_mgda_exact_kernel(const double* __restrict__ gram, int64_t num_segments, int num_tasks,
                        double* __restrict__ weights) {
  __shared__ double s_objective[kExactWarps][kMaxFaces];
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int num_faces = (1 << num_tasks) - 1;
  // Uniform trip count per warp: every lane of a warp sees the same s.
  for (int64_t s = static_cast<int64_t>(blockIdx.x) * kExactWarps + warp; s < num_segments;
       s += static_cast<int64_t>(gridDim.x) * kExactWarps) {
    const double* g = gram + s * num_tasks * num_tasks;
    double m[solver::kMaxExactTasks * solver::kMaxExactTasks];
    double w[solver::kMaxExactTasks];
    solver::add_ridge(g, num_tasks, m);
    for (int k = lane; k < num_faces; k += kWarpSize) {
      solver::mgda_face(m, num_tasks, k, w);
      const double obj = solver::quad_form(m, num_tasks, w);
      s_objective[warp][k] = (solver::feasible(w, num_tasks) && solver::is_finite(obj)) ? obj : INFINITY;
    }
    __syncwarp();
    if (lane == 0) {
      const int chosen = solver::pick_index(s_objective[warp], num_tasks, solver::tie_scale(g, num_tasks));
      solver::mgda_face(m, num_tasks, chosen, w);
      solver::clamp_normalise(w, num_tasks);
      for (int t = 0; t < num_tasks; ++t) weights[s * num_tasks + t] = w[t];
    }
    __syncwarp();  // s_objective is rewritten for the next segment
  }
}

// MGDA, projected gradient (any T <= 32): one thread per segment. Needs ~12 KiB of local
// memory per thread (the header's fixed 32 x 32 work matrix).
__global__ void __launch_bounds__(kSolveThreads)
solve_mgda_pgd_kernel(const double* __restrict__ gram, int64_t num_segments, int num_tasks, int max_iter,
                      double tol, double* __restrict__ weights) {
  for (int64_t s = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; s < num_segments;
       s += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    double w[solver::kMaxTasks];
    solver::mgda_pgd(gram + s * num_tasks * num_tasks, num_tasks, max_iter, tol, w);
    for (int t = 0; t < num_tasks; ++t) weights[s * num_tasks + t] = w[t];
  }
}

__global__ void __launch_bounds__(kSolveThreads)
solve_pcgrad_kernel(const double* __restrict__ gram, int64_t num_segments, int num_tasks,
                    const int64_t* __restrict__ orders, double* __restrict__ weights) {
  for (int64_t s = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; s < num_segments;
       s += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    double w[solver::kMaxTasks];
    solver::pcgrad_solve(gram + s * num_tasks * num_tasks, num_tasks, orders, w);
    for (int t = 0; t < num_tasks; ++t) weights[s * num_tasks + t] = w[t];
  }
}

__global__ void __launch_bounds__(kSolveThreads)
solve_cagrad_kernel(const double* __restrict__ gram, int64_t num_segments, int num_tasks, double c,
                    int rescale, double* __restrict__ weights) {
  for (int64_t s = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; s < num_segments;
       s += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    double w[solver::kMaxExactTasks];
    solver::cagrad_solve(gram + s * num_tasks * num_tasks, num_tasks, c, rescale, w);
    for (int t = 0; t < num_tasks; ++t) weights[s * num_tasks + t] = w[t];
  }
}

inline unsigned solve_blocks(int64_t num_segments) {
  const int64_t blocks = ceil_div(num_segments, kSolveThreads);
  return static_cast<unsigned>(blocks < 0x7fffffff ? blocks : 0x7fffffff);  // grid-stride beyond
}

}  // namespace detail

cudaError_t solve_mgda_cuda(const double* gram, int64_t num_segments, int num_tasks, int solver_id,
                            int max_iter, double tol, double* weights, cudaStream_t stream) {
  using namespace detail;
  if (solver::mgda_check(num_tasks, solver_id) != nullptr || num_segments < 0 || max_iter < 0) {
    return cudaErrorInvalidValue;
  }
  if (num_segments == 0) return cudaSuccess;
  if (gram == nullptr || weights == nullptr) return cudaErrorInvalidValue;
  const int resolved = solver::mgda_resolve_solver(solver_id, num_tasks);
  if (num_tasks <= 1 || resolved == solver::kClosedForm) {
    solve_mgda_small_kernel<<<solve_blocks(num_segments), kSolveThreads, 0, stream>>>(gram, num_segments,
                                                                                     num_tasks, weights);
  } else if (resolved == solver::kExact) {
    const int64_t blocks = ceil_div(num_segments, kExactWarps);
    solve_mgda_exact_kernel<<<static_cast<unsigned>(blocks < 0x7fffffff ? blocks : 0x7fffffff), kSolveThreads, 0,
                              stream>>>(gram, num_segments, num_tasks, weights);
  } else {
    solve_mgda_pgd_kernel<<<solve_blocks(num_segments), kSolveThreads, 0, stream>>>(
        gram, num_segments, num_tasks, max_iter, tol, weights);
  }
  return cudaGetLastError();
}

cudaError_t solve_pcgrad_cuda(const double* gram, int64_t num_segments, int num_tasks,
                              const int64_t* orders, double* weights, cudaStream_t stream) {
  if (solver::pcgrad_check(num_tasks) != nullptr || num_segments < 0) return cudaErrorInvalidValue;
  if (num_segments == 0) return cudaSuccess;
  if (gram == nullptr || weights == nullptr || (orders == nullptr && num_tasks > 1)) return cudaErrorInvalidValue;
  detail::solve_pcgrad_kernel<<<detail::solve_blocks(num_segments), detail::kSolveThreads, 0, stream>>>(
      gram, num_segments, num_tasks, orders, weights);
  return cudaGetLastError();
}

cudaError_t solve_cagrad_cuda(const double* gram, int64_t num_segments, int num_tasks, double c,
                              int rescale, double* weights, cudaStream_t stream) {
  if (solver::cagrad_check(num_tasks, c, rescale) != nullptr || num_segments < 0) return cudaErrorInvalidValue;
  if (num_segments == 0) return cudaSuccess;
  if (gram == nullptr || weights == nullptr) return cudaErrorInvalidValue;
  detail::solve_cagrad_kernel<<<detail::solve_blocks(num_segments), detail::kSolveThreads, 0, stream>>>(
      gram, num_segments, num_tasks, c, rescale, weights);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace bucketmoo
