// Per-segment weights, all segments in one launch:
//
//   solve_*: gram float64 [S, T, T] -> weights float64 [S, T]   (the method's paper scale)
//   weights: gram float32 [S, T, T] -> weights float32 [S, T]   (the whole weight step)
//
// The math is csrc/common/bucketmoo_solvers.h, the same code the CPU backend runs (results
// agree up to the compilers' floating-point contraction choices). MGDA's exact solver and
// CAGrad run a warp per segment (lanes share the face candidates; the face objectives and the
// ridged matrix in shared memory); everything else runs one thread per segment. The work is
// tiny and latency-bound; small blocks spread segments over the SMs.
// No thread keeps a T x T matrix in local memory (the weight step's Gram is in shared memory,
// PGD reads its matrix in place, its polish factors in shared memory); each writes its T
// weights once.
#include "common.cuh"

#include "../common/bucketmoo_solvers.h"

namespace bucketmoo {
namespace cuda {
namespace detail {

constexpr int kSolveThreads = 64;
constexpr int kExactWarps = kSolveThreads / kWarpSize;
constexpr int kMaxFaces = (1 << solver::kMaxExactTasks) - 1;
constexpr int kMaxExact2 = solver::kMaxExactTasks * solver::kMaxExactTasks;

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

// MGDA, exact face enumeration (T <= 8) of one segment on one warp. Lane 0 forms the ridged
// matrix in `m` (this warp's shared slot, kMaxExactTasks^2 doubles), the lanes share the
// 2^T - 1 face candidates (solver::mgda_face / quad_form / feasible, exactly the loop body of
// solver::mgda_exact), the objectives meet in `objective` (this warp's shared slots), and
// lane 0 applies the same pick rule (solver::pick_index) and finishing step as
// solver::mgda_exact, leaving the weights in its `w`. Same result, about 32x less latency
// than one thread walking all 255 faces at T = 8. All lanes of the warp must call it.
__device__ void mgda_exact_on_warp(const double* g, int num_tasks, double* m, double* objective, int lane,
                                   double* w) {
  const int num_faces = (1 << num_tasks) - 1;
  if (lane == 0) solver::add_ridge(g, num_tasks, m);
  __syncwarp();
  for (int k = lane; k < num_faces; k += kWarpSize) {
    solver::mgda_face(m, num_tasks, k, w);
    const double obj = solver::quad_form(m, num_tasks, w);
    objective[k] = (solver::feasible(w, num_tasks) && solver::is_finite(obj)) ? obj : INFINITY;
  }
  __syncwarp();
  if (lane == 0) {
    const int chosen = solver::pick_index(objective, num_tasks, solver::tie_scale(g, num_tasks));
    solver::mgda_face(m, num_tasks, chosen, w);
    solver::clamp_normalise(w, num_tasks);
  }
  __syncwarp();  // `m` and `objective` are rewritten for the warp's next segment
}

// CAGrad (T <= 8) of one segment on one warp, as mgda_exact_on_warp: lane 0 runs
// solver::cagrad_setup into `m` and `a` (this warp's shared slots: kMaxExactTasks^2 and
// kMaxExactTasks doubles), the lanes share the 2^T - 1 face objectives
// (solver::cagrad_objective, the loop body of solver::cagrad_solve) in `objective`, and lane 0
// picks, finishes (solver::cagrad_finish) and leaves the weights in its `w`: the operations of
// solver::cagrad_solve, with no face table or T x T matrix in any thread's local memory.
// All lanes of the warp must call it.
__device__ void cagrad_on_warp(const double* g, int num_tasks, double c, int rescale, double* m, double* a,
                               double* objective, int lane, double* w) {
  double radius = 0.0;
  if (lane == 0) radius = solver::cagrad_setup(g, num_tasks, c, m, a);
  radius = __shfl_sync(kFullMask, radius, 0);
  __syncwarp();  // m and a are visible to every lane
  if (num_tasks > 1) {
    const int num_faces = (1 << num_tasks) - 1;
    for (int k = lane; k < num_faces; k += kWarpSize) {
      objective[k] = solver::cagrad_objective(m, num_tasks, k, a, radius, w);
    }
    __syncwarp();
  }
  if (lane == 0) {
    if (num_tasks == 1) {
      w[0] = 1.0;
    } else {
      const int chosen = solver::pick_index(objective, num_tasks, solver::tie_scale(g, num_tasks));
      solver::cagrad_face(m, num_tasks, chosen, a, radius, w);
      solver::clamp_normalise(w, num_tasks);
    }
    solver::cagrad_finish(g, num_tasks, c, rescale, radius, w);
  }
  __syncwarp();  // `m`, `a` and `objective` are rewritten for the warp's next segment
}

// MGDA, exact (T <= 8): one warp per segment (mgda_exact_on_warp).
__global__ void __launch_bounds__(kSolveThreads)
solve_mgda_exact_kernel(const double* __restrict__ gram, int64_t num_segments, int num_tasks,
                        double* __restrict__ weights) {
  __shared__ double s_objective[kExactWarps][kMaxFaces];
  __shared__ double s_ridged[kExactWarps][kMaxExact2];
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  // Uniform trip count per warp: every lane of a warp sees the same s.
  for (int64_t s = static_cast<int64_t>(blockIdx.x) * kExactWarps + warp; s < num_segments;
       s += static_cast<int64_t>(gridDim.x) * kExactWarps) {
    double w[solver::kMaxExactTasks];
    mgda_exact_on_warp(gram + s * num_tasks * num_tasks, num_tasks, s_ridged[warp], s_objective[warp], lane, w);
    if (lane == 0)
      for (int t = 0; t < num_tasks; ++t) weights[s * num_tasks + t] = w[t];
  }
}

// MGDA, projected gradient (any T <= 32) and its active-set polish: one warp per segment, on
// lane 0, reading its Gram in place from global memory (solver::mgda_pgd copies no T x T
// matrix; its T-vectors are in the thread, see tools/check_cuda_local_memory.sh). The
// polish's packed Cholesky factor lives in this warp's shared-memory slot.
constexpr int kPolishScratch = solver::kMaxTasks * (solver::kMaxTasks + 1) / 2;

__global__ void __launch_bounds__(kSolveThreads)
solve_mgda_pgd_kernel(const double* __restrict__ gram, int64_t num_segments, int num_tasks, int max_iter,
                      double tol, double* __restrict__ weights) {
  __shared__ double s_chol[kExactWarps][kPolishScratch];
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  for (int64_t s = static_cast<int64_t>(blockIdx.x) * kExactWarps + warp; s < num_segments;
       s += static_cast<int64_t>(gridDim.x) * kExactWarps) {
    if (lane == 0) {
      double w[solver::kMaxTasks];
      solver::mgda_pgd(gram + s * num_tasks * num_tasks, num_tasks, max_iter, tol, s_chol[warp], w);
      for (int t = 0; t < num_tasks; ++t) weights[s * num_tasks + t] = w[t];
    }
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

// UPGrad / DualProj (T <= 16, default preference): one thread per segment.
__global__ void __launch_bounds__(kSolveThreads)
solve_dual_cone_kernel(const double* __restrict__ gram, int64_t num_segments, int num_tasks,
                       solver::WeightStep spec, double* __restrict__ weights) {
  for (int64_t s = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; s < num_segments;
       s += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    double w[solver::kMaxDualConeTasks];
    const double* g = gram + s * num_tasks * num_tasks;
    if (spec.method == solver::kMethodUpgrad)
      solver::upgrad_solve(g, num_tasks, spec.norm_eps, spec.reg_eps, spec.max_iter, w);
    else
      solver::dualproj_solve(g, num_tasks, spec.norm_eps, spec.reg_eps, spec.max_iter, w);
    for (int t = 0; t < num_tasks; ++t) weights[s * num_tasks + t] = w[t];
  }
}

// UPGrad on one warp: lane i < T solves projection i (solver::upgrad_projection) on the
// segment's Gram `g` (shared memory), and lane 0 adds them up in task order, as
// solver::upgrad_solve does, into its `w`. All lanes of the warp must call it.
__device__ void upgrad_on_warp(const double* g, int num_tasks, const solver::WeightStep& spec,
                               int lane, double* w) {
  const solver::DualConeMatrix a = solver::dual_cone_matrix(g, num_tasks, spec.norm_eps, spec.reg_eps);
  double v[solver::kMaxDualConeTasks];
  if (lane < num_tasks) solver::upgrad_projection(a, lane, spec.max_iter, v);
  for (int t = 0; t < num_tasks; ++t) {
    double total = 0.0;
    for (int i = 0; i < num_tasks; ++i) total += __shfl_sync(0xffffffffu, lane < num_tasks ? v[t] : 0.0, i);
    if (lane == 0) w[t] = total;
  }
}

// CAGrad (T <= 8): one warp per segment (cagrad_on_warp).
__global__ void __launch_bounds__(kSolveThreads)
solve_cagrad_kernel(const double* __restrict__ gram, int64_t num_segments, int num_tasks, double c,
                    int rescale, double* __restrict__ weights) {
  __shared__ double s_objective[kExactWarps][kMaxFaces];
  __shared__ double s_ridged[kExactWarps][kMaxExact2];
  __shared__ double s_a[kExactWarps][solver::kMaxExactTasks];
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  for (int64_t s = static_cast<int64_t>(blockIdx.x) * kExactWarps + warp; s < num_segments;
       s += static_cast<int64_t>(gridDim.x) * kExactWarps) {
    double w[solver::kMaxExactTasks];
    cagrad_on_warp(gram + s * num_tasks * num_tasks, num_tasks, c, rescale, s_ridged[warp], s_a[warp],
                   s_objective[warp], lane, w);
    if (lane == 0)
      for (int t = 0; t < num_tasks; ++t) weights[s * num_tasks + t] = w[t];
  }
}

// The whole weight step (solver::segment_weights) from float32 Grams: one warp per segment.
// Lane 0 prepares the normalised float64 Gram in this warp's shared-memory slot; exact MGDA
// and CAGrad spread their faces over the warp (every lane reads the slot and the ridged
// matrix beside it), every other method runs on lane 0, which also finishes (unscale,
// rescale to sum 1) and writes the segment's T float32 weights.
//
// Local memory: the driver reserves a kernel's per-thread stack frame for every thread the
// GPU can hold (on an H100, 132 SMs x 2048 threads: 1 KiB a thread is 270 MiB, held for the
// life of the context), so no thread keeps a T x T matrix: the normalised Gram lives in shared
// memory (kCap^2 doubles a warp: 16 KiB a block at kCap = 32), and PGD reads it in place
// (solver::mgda_pgd forms the ridged entries where it reads them). kCap bounds T and the
// per-thread T-vectors; kCagrad: the CAGrad kernel, which runs only CAGrad (cagrad_on_warp:
// the 255 face objectives, the ridged matrix and a = M 1/T in shared memory, not in a thread);
// kDualCone: the UPGrad/DualProj kernel (kCap = 16), which runs only those two (UPGrad's T
// projections on T lanes, upgrad_on_warp; DualProj on lane 0). The stack frame of every
// kernel is checked against a budget by tools/check_cuda_local_memory.sh.
template <int kCap, bool kCagrad, bool kDualCone>
__global__ void __launch_bounds__(kSolveThreads)
weights_kernel(const float* __restrict__ gram, int64_t num_segments, int num_tasks,
               solver::WeightStep spec, const double* __restrict__ losses,
               float* __restrict__ weights) {
  __shared__ double s_objective[kExactWarps][kMaxFaces];
  __shared__ double s_gram[kExactWarps][kCap * kCap];
  __shared__ double s_ridged[kExactWarps][kMaxExact2];                         // exact MGDA, CAGrad
  __shared__ double s_a[kExactWarps][kCagrad ? solver::kMaxExactTasks : 1];  // CAGrad
  // the PGD polish's packed Cholesky factor (kCap = 8 never runs PGD: one slot)
  __shared__ double s_chol[kExactWarps][kCap > solver::kMaxExactTasks ? kCap * (kCap + 1) / 2 : 1];
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int mgda_solver = solver::mgda_resolve_solver(spec.solver, num_tasks);
  const bool exact_on_warp =
      spec.method == solver::kMethodMgda && num_tasks >= 2 && mgda_solver == solver::kExact;
  const bool per_task_losses = solver::uses_losses(spec.normalization);
  double* g = s_gram[warp];
  for (int64_t s = static_cast<int64_t>(blockIdx.x) * kExactWarps + warp; s < num_segments;
       s += static_cast<int64_t>(gridDim.x) * kExactWarps) {
    double scale[kCap];
    double w[kCap];
    bool scaled = false;
    if (lane == 0) {
      scaled = solver::weight_step_prepare(gram + s * num_tasks * num_tasks, num_tasks, spec,
                                           per_task_losses ? losses + s * num_tasks : nullptr, g, scale);
    }
    __syncwarp();  // the normalised Gram is in s_gram[warp] for every lane
    if constexpr (kCagrad) {  // the launcher sends only CAGrad here
      cagrad_on_warp(g, num_tasks, spec.c, spec.rescale, s_ridged[warp], s_a[warp], s_objective[warp], lane, w);
    } else if constexpr (kDualCone) {
      if (spec.method == solver::kMethodUpgrad) {
        upgrad_on_warp(g, num_tasks, spec, lane, w);
      } else if (lane == 0) {
        solver::dualproj_solve(g, num_tasks, spec.norm_eps, spec.reg_eps, spec.max_iter, w);
      }
    } else if (exact_on_warp) {
      mgda_exact_on_warp(g, num_tasks, s_ridged[warp], s_objective[warp], lane, w);
    } else if (lane == 0) {
      // solver::weight_step_method, written out so that kCap = 8 never calls mgda_pgd.
      if (spec.method == solver::kMethodMean) {
        for (int t = 0; t < num_tasks; ++t) w[t] = 1.0 / num_tasks;
      } else if (spec.method == solver::kMethodMgda) {
        if (num_tasks == 1) w[0] = 1.0;
        else if (mgda_solver == solver::kClosedForm) solver::mgda_closed_form(g, w);
        else if constexpr (kCap > solver::kMaxExactTasks) solver::mgda_pgd(g, num_tasks, spec.max_iter, spec.tol, s_chol[warp], w);
      } else if (spec.method == solver::kMethodPcgrad) {
        solver::pcgrad_solve(g, num_tasks, spec.orders, w);
      }
    }
    if (lane == 0) {
      float w32[kCap];
      solver::weight_step_finish(w, num_tasks, spec, scaled, scale, w32);
      solver::nan_weights_if_not_finite(gram + s * num_tasks * num_tasks, num_tasks, w32);
      for (int t = 0; t < num_tasks; ++t) weights[s * num_tasks + t] = w32[t];
    }
    __syncwarp();  // s_gram[warp] is rewritten for the warp's next segment
  }
}

inline unsigned solve_blocks(int64_t num_segments) {
  const int64_t blocks = ceil_div(num_segments, kSolveThreads);
  return static_cast<unsigned>(blocks < 0x7fffffff ? blocks : 0x7fffffff);  // grid-stride beyond
}

inline unsigned warp_blocks(int64_t num_segments) {  // one warp per segment
  const int64_t blocks = ceil_div(num_segments, kExactWarps);
  return static_cast<unsigned>(blocks < 0x7fffffff ? blocks : 0x7fffffff);
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
    solve_mgda_exact_kernel<<<warp_blocks(num_segments), kSolveThreads, 0, stream>>>(
        gram, num_segments, num_tasks, weights);
  } else {
    solve_mgda_pgd_kernel<<<warp_blocks(num_segments), kSolveThreads, 0, stream>>>(
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
  detail::solve_cagrad_kernel<<<detail::warp_blocks(num_segments), detail::kSolveThreads, 0, stream>>>(
      gram, num_segments, num_tasks, c, rescale, weights);
  return cudaGetLastError();
}

cudaError_t solve_dual_cone_cuda(const double* gram, int64_t num_segments, int num_tasks,
                                 const solver::WeightStep& spec, double* weights, cudaStream_t stream) {
  if ((spec.method != solver::kMethodUpgrad && spec.method != solver::kMethodDualproj) ||
      solver::method_check(spec, num_tasks) != nullptr || num_segments < 0) {
    return cudaErrorInvalidValue;
  }
  if (num_segments == 0) return cudaSuccess;
  if (gram == nullptr || weights == nullptr) return cudaErrorInvalidValue;
  detail::solve_dual_cone_kernel<<<detail::solve_blocks(num_segments), detail::kSolveThreads, 0, stream>>>(
      gram, num_segments, num_tasks, spec, weights);
  return cudaGetLastError();
}

cudaError_t weights_cuda(const float* gram, int64_t num_segments, int num_tasks,
                         const solver::WeightStep& spec, const double* losses, float* weights,
                         cudaStream_t stream) {
  if (solver::method_check(spec, num_tasks) != nullptr || num_segments < 0) return cudaErrorInvalidValue;
  if (num_segments == 0) return cudaSuccess;
  if (gram == nullptr || weights == nullptr ||
      (spec.method == solver::kMethodPcgrad && spec.orders == nullptr && num_tasks > 1) ||
      (solver::uses_losses(spec.normalization) && losses == nullptr)) {
    return cudaErrorInvalidValue;
  }
  const bool pgd = spec.method == solver::kMethodMgda &&
                   solver::mgda_resolve_solver(spec.solver, num_tasks) == solver::kPgd && num_tasks > 1;
  const unsigned blocks = detail::warp_blocks(num_segments);
  constexpr int kSmall = solver::kMaxExactTasks, kBig = solver::kMaxTasks, kThreads = detail::kSolveThreads;
  constexpr int kDual = solver::kMaxDualConeTasks;
  if (spec.method == solver::kMethodCagrad) {  // T <= 8 (method_check)
    detail::weights_kernel<kSmall, true, false><<<blocks, kThreads, 0, stream>>>(
        gram, num_segments, num_tasks, spec, losses, weights);
  } else if (spec.method == solver::kMethodUpgrad || spec.method == solver::kMethodDualproj) {
    detail::weights_kernel<kDual, false, true><<<blocks, kThreads, 0, stream>>>(  // T <= 16
        gram, num_segments, num_tasks, spec, losses, weights);
  } else if (num_tasks <= kSmall && !pgd) {
    detail::weights_kernel<kSmall, false, false><<<blocks, kThreads, 0, stream>>>(
        gram, num_segments, num_tasks, spec, losses, weights);
  } else {
    detail::weights_kernel<kBig, false, false><<<blocks, kThreads, 0, stream>>>(
        gram, num_segments, num_tasks, spec, losses, weights);
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace bucketmoo
