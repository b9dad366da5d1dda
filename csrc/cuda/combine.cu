// In-place weighted combination of T task gradients, all segments in one pass.
//
//   out[n] = sum_t weights[s(n), t] * grads[t][n]
//   grads: T x [N] fp32 / bf16 / fp16, weights: float32 [S, T], offsets: int64 [S + 1]
//   out:   [N] in the grads' dtype; may be exactly one of the grads
//
// One block per tile of kCombineVecsPerThread * kCombineThreads vectors. Each thread takes
// whole 16-byte vectors (or single elements when some pointer is not 16-byte aligned), reads
// the T inputs of its elements, and only then writes those elements: with out == grads[k]
// no thread ever reads an element another thread writes. Accumulation: float32, fmaf in
// task order 0..T-1 (the same order in the vector and the scalar path), rounded once.
#include "common.cuh"

namespace bucketmoo {
namespace cuda {
namespace detail {

constexpr int kCombineThreads = 256;
constexpr int kCombineVecsPerThread = 4;

template <typename scalar_t>
__host__ __device__ constexpr int64_t combine_tile() {
  return static_cast<int64_t>(kCombineThreads) * kCombineVecsPerThread * Elem<scalar_t>::kVec;
}

template <int T>
__device__ __forceinline__ void load_weights(float (&w)[T], const float* __restrict__ weights, int64_t s) {
#pragma unroll
  for (int t = 0; t < T; ++t) w[t] = weights[s * T + t];
}

template <typename scalar_t, int T, bool kVectorized>
__global__ void __launch_bounds__(kCombineThreads)
combine_kernel(void* out, GradPtrs ptrs, int64_t numel, const float* __restrict__ weights,
               const int64_t* __restrict__ offsets, int64_t num_segments) {
  // Not __restrict__: out may be one of the grads.
  constexpr int V = Elem<scalar_t>::kVec;
  constexpr int64_t kTile = combine_tile<scalar_t>();
  __shared__ int64_t s_range[2];
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t t1 = min(numel, t0 + kTile);
  if (threadIdx.x == 0) {
    const int64_t s0 = segment_of(offsets, 0, num_segments - 1, t0);
    s_range[0] = s0;
    s_range[1] = segment_of(offsets, s0, num_segments - 1, t1 - 1);
  }
  __syncthreads();
  const int64_t s0 = s_range[0];
  const int64_t s1 = s_range[1];

  int64_t cached = -1;  // segment whose weights are in w
  float w[T];
  // Each thread takes chunks of V consecutive elements (one vector when aligned).
  for (int64_t n0 = t0 + static_cast<int64_t>(threadIdx.x) * V; n0 < t1; n0 += static_cast<int64_t>(kCombineThreads) * V) {
    int64_t s = (s0 == s1) ? s0 : segment_of(offsets, s0, s1, n0);
    if (kVectorized && n0 + V <= t1 && (s0 == s1 || n0 + V <= offsets[s + 1])) {
      if (s != cached) {
        load_weights<T>(w, weights, s);
        cached = s;
      }
      float acc[V];
      float x[V];
      load_vec<scalar_t>(ptrs.ptr[0], n0, x);
#pragma unroll
      for (int k = 0; k < V; ++k) acc[k] = w[0] * x[k];
#pragma unroll
      for (int t = 1; t < T; ++t) {
        load_vec<scalar_t>(ptrs.ptr[t], n0, x);
#pragma unroll
        for (int k = 0; k < V; ++k) acc[k] = fmaf(w[t], x[k], acc[k]);
      }
      store_vec<scalar_t>(out, n0, acc);
    } else {
      // Element by element: the chunk crosses a segment boundary, ends the array, or some
      // pointer is not 16-byte aligned.
      const int64_t end = min(n0 + V, t1);
      for (int64_t n = n0; n < end; ++n) {
        while (offsets[s + 1] <= n) ++s;
        if (s != cached) {
          load_weights<T>(w, weights, s);
          cached = s;
        }
        float acc = w[0] * load_scalar<scalar_t>(ptrs.ptr[0], n);
#pragma unroll
        for (int t = 1; t < T; ++t) acc = fmaf(w[t], load_scalar<scalar_t>(ptrs.ptr[t], n), acc);
        static_cast<scalar_t*>(out)[n] = Elem<scalar_t>::from_float(acc);
      }
    }
  }
}

}  // namespace detail

cudaError_t combine_cuda(void* out, const void* const* grads, int num_tasks, DType dtype, int64_t numel,
                         const float* weights, const int64_t* offsets, int64_t num_segments,
                         cudaStream_t stream) {
  using namespace detail;
  if (num_tasks < 1 || num_tasks > kMaxTasks || numel < 0 || num_segments < 0) return cudaErrorInvalidValue;
  if (numel == 0) return cudaSuccess;
  if (out == nullptr || weights == nullptr || offsets == nullptr || num_segments == 0) return cudaErrorInvalidValue;
  GradPtrs ptrs{};
  bool vectorized = aligned16(out);
  for (int t = 0; t < num_tasks; ++t) {
    if (grads[t] == nullptr) return cudaErrorInvalidValue;
    ptrs.ptr[t] = grads[t];
    vectorized = vectorized && aligned16(grads[t]);
  }
  return dispatch_dtype_tasks(dtype, num_tasks, [&](auto tag, auto tasks) -> cudaError_t {
    using scalar_t = decltype(tag);
    constexpr int T = decltype(tasks)::value;
    const int64_t blocks = ceil_div(numel, combine_tile<scalar_t>());
    if (blocks > 0x7fffffff) return cudaErrorInvalidValue;
    if (vectorized) {
      combine_kernel<scalar_t, T, true><<<static_cast<unsigned>(blocks), kCombineThreads, 0, stream>>>(
          out, ptrs, numel, weights, offsets, num_segments);
    } else {
      combine_kernel<scalar_t, T, false><<<static_cast<unsigned>(blocks), kCombineThreads, 0, stream>>>(
          out, ptrs, numel, weights, offsets, num_segments);
    }
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace bucketmoo
