// Segmented Gram matrices of T task gradients, all segments in one pass.
//
//   grads: T x [N] fp32 / bf16 / fp16,  offsets: int64 [S + 1]  ->  gram: float32 [S, T, T]
//
// Kernel 1 (gram_partial_kernel, one block per tile of `tile` elements): every non-empty
// (segment, tile) intersection is reduced to the float32 Gram (upper triangle, P = T(T+1)/2
// values) of its elements. A segment that lies inside the tile is then complete and is
// written straight into `gram` (with its mirror); a piece of a segment spanning several
// tiles goes to its own workspace slot 2b or 2b + 1 (see common.cuh), so the workspace is
// 2 ceil(N / tile) P floats, whatever the number of segments. Intersections of at least
// tile / kMaxBig elements are processed by the whole block with 128-bit loads (a scalar head
// and tail around the aligned body); shorter ones are spread over the warps, one intersection
// per warp, so a tile full of tiny segments keeps every warp busy and a long segment uses
// every block it spans.
// Kernel 2 (gram_finalize_kernel, one warp per segment, grid-stride): writes zeros for empty
// segments, skips single-tile ones (already written) and sums a multi-tile segment's slots in
// a fixed order (lane k takes its k-th, (k+32)-th, ... slot in increasing order, float64,
// then the xor butterfly), writes gram[s] and its mirror. No atomics anywhere, so results
// are bitwise reproducible.
#include "common.cuh"

namespace bucketmoo {
namespace cuda {
namespace detail {

constexpr int kGramThreads = 256;
constexpr int kFinalizeThreads = 256;  // 8 warps, one segment each per grid-stride step
constexpr int64_t kFinalizeMaxBlocks = 4096;
// At most this many "big" intersections per tile: an intersection is big when it has at least
// tile / kMaxBig elements, so two of them start >= that far apart and (start - t0) / big is a
// distinct index for each.
constexpr int kMaxBig = 8;

// acc[(i, j)] += x_i * x_j for i <= j (fixed order).
template <int T>
__device__ __forceinline__ void accumulate_outer(float (&acc)[T * (T + 1) / 2], const float (&x)[T]) {
#pragma unroll
  for (int i = 0; i < T; ++i) {
#pragma unroll
    for (int j = i; j < T; ++j) acc[tri_index(i, j, T)] = fmaf(x[i], x[j], acc[tri_index(i, j, T)]);
  }
}

template <typename scalar_t, int T>
__device__ __forceinline__ void accumulate_element(float (&acc)[T * (T + 1) / 2], const GradPtrs& ptrs, int64_t n) {
  float x[T];
#pragma unroll
  for (int t = 0; t < T; ++t) x[t] = load_scalar<scalar_t>(ptrs.ptr[t], n);
  accumulate_outer<T>(acc, x);
}

template <typename scalar_t, int T>
__device__ __forceinline__ void accumulate_vector(float (&acc)[T * (T + 1) / 2], const GradPtrs& ptrs, int64_t n) {
  constexpr int V = Elem<scalar_t>::kVec;
  float v[T][V];
#pragma unroll
  for (int t = 0; t < T; ++t) load_vec<scalar_t>(ptrs.ptr[t], n, v[t]);
#pragma unroll
  for (int k = 0; k < V; ++k) {
    float x[T];
#pragma unroll
    for (int t = 0; t < T; ++t) x[t] = v[t][k];
    accumulate_outer<T>(acc, x);
  }
}

// Write the P upper-triangle sums of segment s as its full T x T Gram (value and mirror).
template <int T, typename acc_t>
__device__ __forceinline__ void store_gram(const acc_t (&sums)[T * (T + 1) / 2], float* __restrict__ gram,
                                           int64_t s) {
  float* dst = gram + s * T * T;
#pragma unroll
  for (int i = 0; i < T; ++i) {
#pragma unroll
    for (int j = i; j < T; ++j) {
      const float value = static_cast<float>(sums[tri_index(i, j, T)]);
      dst[i * T + j] = value;
      dst[j * T + i] = value;
    }
  }
}

template <typename scalar_t, int T, bool kVectorized>
__global__ void __launch_bounds__(kGramThreads)
gram_partial_kernel(GradPtrs ptrs, int64_t numel, const int64_t* __restrict__ offsets, int64_t num_segments,
                    int64_t tile, float* __restrict__ partial, float* __restrict__ gram) {
  constexpr int P = T * (T + 1) / 2;
  constexpr int V = Elem<scalar_t>::kVec;
  constexpr int kWarps = kGramThreads / kWarpSize;
  __shared__ int64_t s_range[2];
  __shared__ int64_t s_big[kMaxBig];
  __shared__ float s_red[kWarps][P];
  __shared__ float s_sum[P];

  const int64_t b = blockIdx.x;
  const int64_t t0 = b * tile;
  const int64_t t1 = min(numel, t0 + tile);
  const int64_t big = tile / kMaxBig;
  if (threadIdx.x == 0) {
    const int64_t s0 = segment_of(offsets, 0, num_segments - 1, t0);
    s_range[0] = s0;
    s_range[1] = segment_of(offsets, s0, num_segments - 1, t1 - 1);
  }
  if (threadIdx.x < kMaxBig) s_big[threadIdx.x] = -1;
  __syncthreads();
  const int64_t s0 = s_range[0];
  const int64_t s1 = s_range[1];
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;

  // Pass 1: short intersections, one per warp (round robin); note the big ones.
  for (int64_t s = s0 + warp; s <= s1; s += kWarps) {
    const int64_t lo = max(offsets[s], t0);
    const int64_t hi = min(offsets[s + 1], t1);
    if (hi <= lo) continue;
    if (hi - lo >= big) {
      if (lane == 0) s_big[(lo - t0) / big] = s;
      continue;
    }
    float acc[P];
#pragma unroll
    for (int e = 0; e < P; ++e) acc[e] = 0.f;
    for (int64_t n = lo + lane; n < hi; n += kWarpSize) accumulate_element<scalar_t, T>(acc, ptrs, n);
#pragma unroll
    for (int e = 0; e < P; ++e) acc[e] = warp_allreduce(acc[e]);
    if (lane == 0) {
      if (single_tile(offsets[s], offsets[s + 1], tile)) {
        store_gram<T>(acc, gram, s);
      } else {
        float* dst = partial + partial_slot(lo, b, tile) * P;
#pragma unroll
        for (int e = 0; e < P; ++e) dst[e] = acc[e];
      }
    }
  }
  __syncthreads();

  // Pass 2: big intersections, the whole block each (s_big is uniform across the block).
  for (int k = 0; k < kMaxBig; ++k) {
    const int64_t s = s_big[k];
    if (s < 0) continue;
    const int64_t lo = max(offsets[s], t0);
    const int64_t hi = min(offsets[s + 1], t1);
    float acc[P];
#pragma unroll
    for (int e = 0; e < P; ++e) acc[e] = 0.f;
    if (kVectorized) {
      const int64_t body_lo = ceil_div(lo, V) * V;
      const int64_t body_hi = max(body_lo, (hi / V) * V);
      // Head [lo, body_lo) and tail [body_hi, hi): fewer than V elements each.
      if (threadIdx.x < body_lo - lo && lo + threadIdx.x < hi) {
        accumulate_element<scalar_t, T>(acc, ptrs, lo + threadIdx.x);
      }
      if (threadIdx.x < hi - body_hi) {
        accumulate_element<scalar_t, T>(acc, ptrs, body_hi + threadIdx.x);
      }
      for (int64_t n = body_lo + static_cast<int64_t>(threadIdx.x) * V; n < body_hi;
           n += static_cast<int64_t>(kGramThreads) * V) {
        accumulate_vector<scalar_t, T>(acc, ptrs, n);
      }
    } else {
      for (int64_t n = lo + threadIdx.x; n < hi; n += kGramThreads) accumulate_element<scalar_t, T>(acc, ptrs, n);
    }
    block_reduce_store<P, kGramThreads>(acc, s_red, s_sum);  // ends with a barrier
    if (threadIdx.x < P) {
      if (single_tile(offsets[s], offsets[s + 1], tile)) {
        int i, j;
        tri_pair(threadIdx.x, T, &i, &j);
        gram[(s * T + i) * T + j] = s_sum[threadIdx.x];
        gram[(s * T + j) * T + i] = s_sum[threadIdx.x];
      } else {
        partial[partial_slot(lo, b, tile) * P + threadIdx.x] = s_sum[threadIdx.x];
      }
    }
    // s_sum[e] is read and rewritten (next big intersection) only by thread e: no barrier.
  }
}

template <int T>
__global__ void __launch_bounds__(kFinalizeThreads)
gram_finalize_kernel(const float* __restrict__ partial, const int64_t* __restrict__ offsets, int64_t num_segments,
                     int64_t tile, float* __restrict__ gram) {
  constexpr int P = T * (T + 1) / 2;
  constexpr int kWarps = kFinalizeThreads / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  // One warp per segment; every lane of a warp sees the same s (uniform trip count).
  for (int64_t s = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / kWarpSize; s < num_segments;
       s += static_cast<int64_t>(gridDim.x) * kWarps) {
    const int64_t begin = offsets[s];
    const int64_t end = offsets[s + 1];
    if (end > begin && single_tile(begin, end, tile)) continue;  // written by gram_partial_kernel
    double acc[P];
#pragma unroll
    for (int e = 0; e < P; ++e) acc[e] = 0.0;
    if (end > begin) {
      const int64_t num_slots = last_tile(end, tile) - first_tile(begin, tile) + 1;
      for (int64_t k = lane; k < num_slots; k += kWarpSize) {
        const float* src = partial + segment_slot(begin, tile, k) * P;
#pragma unroll
        for (int e = 0; e < P; ++e) acc[e] += static_cast<double>(src[e]);
      }
    }
#pragma unroll
    for (int e = 0; e < P; ++e) acc[e] = warp_allreduce(acc[e]);
    if (lane == 0) store_gram<T>(acc, gram, s);
  }
}

int64_t gram_tile(int num_tasks, DType dtype) {
  // About 128 KiB of gradient bytes per block, between 8192 and 65536 elements (a power of
  // two, so a multiple of every vector width and of kMaxBig).
  int64_t tile = 8192;
  while (tile < 65536 && tile * 2 * num_tasks * dtype_size(dtype) <= 131072) tile *= 2;
  return tile;
}

}  // namespace detail

size_t gram_workspace_bytes(int num_tasks, DType dtype, int64_t numel, int64_t num_segments) {
  if (num_tasks < 1 || num_tasks > kMaxTasks || numel < 0 || num_segments < 0) return 0;
  const int64_t tile = detail::gram_tile(num_tasks, dtype);
  const int64_t pairs = num_tasks * (num_tasks + 1) / 2;
  // max(1, ...): a valid (non-null) workspace even when N = 0.
  const int64_t slots = detail::num_partial_slots(numel, tile);
  return static_cast<size_t>((slots > 0 ? slots : 1) * pairs) * sizeof(float);
}

cudaError_t gram_cuda(const void* const* grads, int num_tasks, DType dtype, int64_t numel,
                      const int64_t* offsets, int64_t num_segments, float* gram, void* workspace,
                      size_t workspace_bytes, cudaStream_t stream) {
  using namespace detail;
  if (num_tasks < 1 || num_tasks > kMaxTasks || numel < 0 || num_segments < 0) return cudaErrorInvalidValue;
  if (num_segments == 0) return cudaSuccess;
  if (offsets == nullptr || gram == nullptr) return cudaErrorInvalidValue;
  if (numel > 0 && (workspace == nullptr ||
                    workspace_bytes < gram_workspace_bytes(num_tasks, dtype, numel, num_segments))) {
    return cudaErrorInvalidValue;
  }
  GradPtrs ptrs{};
  bool vectorized = true;
  for (int t = 0; t < num_tasks; ++t) {
    if (grads[t] == nullptr && numel > 0) return cudaErrorInvalidValue;
    ptrs.ptr[t] = grads[t];
    vectorized = vectorized && aligned16(grads[t]);
  }
  const int64_t tile = gram_tile(num_tasks, dtype);
  const int64_t num_tiles = ceil_div(numel, tile);
  if (num_tiles > 0x7fffffff) return cudaErrorInvalidValue;
  float* partial = static_cast<float*>(workspace);
  const int64_t warps_needed = ceil_div(num_segments, kFinalizeThreads / kWarpSize);
  const unsigned finalize_blocks =
      static_cast<unsigned>(warps_needed < kFinalizeMaxBlocks ? warps_needed : kFinalizeMaxBlocks);
  return dispatch_dtype_tasks(dtype, num_tasks, [&](auto tag, auto tasks) -> cudaError_t {
    using scalar_t = decltype(tag);
    constexpr int T = decltype(tasks)::value;
    if (num_tiles > 0) {
      if (vectorized) {
        gram_partial_kernel<scalar_t, T, true><<<static_cast<unsigned>(num_tiles), kGramThreads, 0, stream>>>(
            ptrs, numel, offsets, num_segments, tile, partial, gram);
      } else {
        gram_partial_kernel<scalar_t, T, false><<<static_cast<unsigned>(num_tiles), kGramThreads, 0, stream>>>(
            ptrs, numel, offsets, num_segments, tile, partial, gram);
      }
      const cudaError_t err = cudaGetLastError();
      if (err != cudaSuccess) return err;
    }
    gram_finalize_kernel<T><<<finalize_blocks, kFinalizeThreads, 0, stream>>>(partial, offsets, num_segments,
                                                                               tile, gram);
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace bucketmoo
