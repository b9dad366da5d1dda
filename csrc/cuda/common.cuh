// Device helpers shared by the CUDA kernels: element types, 128-bit vector loads, warp
// reductions, segment lookup, the tile layout, and the dtype x T dispatch of the launchers.
// Torch-free; included only by the .cu files of csrc/cuda.
#pragma once

#include <cstdint>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "bucketmoo_cuda.h"

namespace bucketmoo {
namespace cuda {
namespace detail {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;

// ---------------------------------------------------------------------------------------------
// Element types. kVec elements make one 16-byte (128-bit) vector.

template <typename scalar_t>
struct Elem;

template <>
struct Elem<float> {
  static constexpr int kVec = 4;
  __device__ __forceinline__ static float to_float(float x) { return x; }
  __device__ __forceinline__ static float from_float(float x) { return x; }
};

template <>
struct Elem<__nv_bfloat16> {
  static constexpr int kVec = 8;
  __device__ __forceinline__ static float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  __device__ __forceinline__ static __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
};

template <>
struct Elem<__half> {
  static constexpr int kVec = 8;
  __device__ __forceinline__ static float to_float(__half x) { return __half2float(x); }
  __device__ __forceinline__ static __half from_float(float x) { return __float2half_rn(x); }
};

// T pointers by value (a kernel argument of 8 * kMaxTasks bytes).
struct GradPtrs {
  const void* ptr[kMaxTasks];
};

template <typename scalar_t>
__device__ __forceinline__ float load_scalar(const void* base, int64_t n) {
  return Elem<scalar_t>::to_float(static_cast<const scalar_t*>(base)[n]);
}

// Load the 16-byte vector starting at element n (n a multiple of kVec, base 16-byte aligned)
// and widen it to float.
template <typename scalar_t>
__device__ __forceinline__ void load_vec(const void* base, int64_t n, float (&out)[Elem<scalar_t>::kVec]) {
  const uint4 raw = *reinterpret_cast<const uint4*>(static_cast<const scalar_t*>(base) + n);
  const scalar_t* e = reinterpret_cast<const scalar_t*>(&raw);
#pragma unroll
  for (int k = 0; k < Elem<scalar_t>::kVec; ++k) out[k] = Elem<scalar_t>::to_float(e[k]);
}

template <typename scalar_t>
__device__ __forceinline__ void store_vec(void* base, int64_t n, const float (&in)[Elem<scalar_t>::kVec]) {
  uint4 raw;
  scalar_t* e = reinterpret_cast<scalar_t*>(&raw);
#pragma unroll
  for (int k = 0; k < Elem<scalar_t>::kVec; ++k) e[k] = Elem<scalar_t>::from_float(in[k]);
  *reinterpret_cast<uint4*>(static_cast<scalar_t*>(base) + n) = raw;
}

// ---------------------------------------------------------------------------------------------
// Reductions. The xor butterfly leaves the same bits in every lane (each step adds the same
// two numbers, a + b == b + a), and its order is fixed, so results are run-to-run identical.

template <typename acc_t>
__device__ __forceinline__ acc_t warp_allreduce(acc_t v) {
#pragma unroll
  for (int mask = kWarpSize / 2; mask > 0; mask >>= 1) v += __shfl_xor_sync(kFullMask, v, mask);
  return v;
}

// Sum acc[0..P) over the block and write the P sums to dst[0..P) (fixed order: warps'
// butterflies, then warp 0, 1, ... in sequence). `scratch` holds NumThreads/32 * P values.
// Every thread of the block must call it; it ends with a barrier so scratch can be reused.
template <int P, int NumThreads, typename acc_t, typename out_t>
__device__ __forceinline__ void block_reduce_store(acc_t (&acc)[P], acc_t (*scratch)[P], out_t* dst) {
  constexpr int kWarps = NumThreads / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
#pragma unroll
  for (int e = 0; e < P; ++e) acc[e] = warp_allreduce(acc[e]);
  if (lane == 0) {
#pragma unroll
    for (int e = 0; e < P; ++e) scratch[warp][e] = acc[e];
  }
  __syncthreads();
  if (threadIdx.x < P) {
    acc_t sum = scratch[0][threadIdx.x];
#pragma unroll
    for (int w = 1; w < kWarps; ++w) sum += scratch[w][threadIdx.x];
    dst[threadIdx.x] = static_cast<out_t>(sum);
  }
  __syncthreads();
}

// ---------------------------------------------------------------------------------------------
// Segments and tiles (host and device, so the index math can be unit-tested on the host).
//
// The N elements are cut into tiles of `tile` elements; block b of a kernel owns tile b.
// A tile meets one or more segments. A segment that lies inside one tile ("single-tile") is
// reduced completely by that tile's block, which writes its Gram straight into the output.
// Every other non-empty (segment, tile b) intersection -- a piece of a segment that spans
// several tiles -- gets its own partial slot:
//
//   slot 2b      the intersection contains the tile's first element t0 (the segment started
//                at or before t0);
//   slot 2b + 1  it starts after t0 (then it must run to the tile's end).
//
// At most one segment contains t0, and at most one intersection that starts after t0 runs to
// the tile's end, so the map is injective and 2 ceil(N / tile) slots always suffice, whatever
// S is (the workspace does not grow with the number of segments). The slots of a multi-tile
// segment with tiles b0 < ... < b1 are partial_slot(begin, b0) < 2(b0 + 1) < ... < 2 b1: the
// finalize kernel reads them in that (increasing) order.
// The segment holding element n: the largest s in [lo, hi] with offsets[s] <= n. Requires
// offsets[lo] <= n < offsets[hi + 1]; empty segments are never returned.
__host__ __device__ __forceinline__ int64_t segment_of(const int64_t* offsets, int64_t lo, int64_t hi,
                                                       int64_t n) {
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo + 1) / 2;
    if (offsets[mid] <= n) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

__host__ __device__ __forceinline__ int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

__host__ __device__ __forceinline__ int64_t num_partial_slots(int64_t numel, int64_t tile) {
  return 2 * ceil_div(numel, tile);
}

// Tiles [first, last] of a non-empty segment [begin, end).
__host__ __device__ __forceinline__ int64_t first_tile(int64_t begin, int64_t tile) { return begin / tile; }
__host__ __device__ __forceinline__ int64_t last_tile(int64_t end, int64_t tile) { return (end - 1) / tile; }

__host__ __device__ __forceinline__ bool single_tile(int64_t begin, int64_t end, int64_t tile) {
  return first_tile(begin, tile) == last_tile(end, tile);
}

// Slot of the intersection [lo, ...) of a multi-tile segment with tile b (see above).
__host__ __device__ __forceinline__ int64_t partial_slot(int64_t lo, int64_t b, int64_t tile) {
  return 2 * b + (lo == b * tile ? 0 : 1);
}

// The k-th slot (k = 0 .. last_tile - first_tile) of the multi-tile segment starting at begin.
__host__ __device__ __forceinline__ int64_t segment_slot(int64_t begin, int64_t tile, int64_t k) {
  const int64_t b0 = first_tile(begin, tile);
  return k == 0 ? partial_slot(begin, b0, tile) : 2 * (b0 + k);
}

// Upper-triangle index e of (i, j), i <= j, row-major: (0,0), (0,1), ..., (0,T-1), (1,1), ...
__host__ __device__ __forceinline__ constexpr int tri_index(int i, int j, int num_tasks) {
  return i * num_tasks - i * (i - 1) / 2 + (j - i);
}

__host__ __device__ __forceinline__ void tri_pair(int e, int num_tasks, int* i_out, int* j_out) {
  int i = 0;
  while (e >= num_tasks - i) {
    e -= num_tasks - i;
    ++i;
  }
  *i_out = i;
  *j_out = i + e;
}

// ---------------------------------------------------------------------------------------------
// Launcher dispatch over the element type and the (compile-time) number of tasks.
// fn(scalar_t{}, std::integral_constant<int, T>{}) -> cudaError_t.

template <typename scalar_t, typename Fn>
cudaError_t dispatch_tasks(int num_tasks, Fn&& fn) {
  switch (num_tasks) {
    case 1: return fn(scalar_t{}, std::integral_constant<int, 1>{});
    case 2: return fn(scalar_t{}, std::integral_constant<int, 2>{});
    case 3: return fn(scalar_t{}, std::integral_constant<int, 3>{});
    case 4: return fn(scalar_t{}, std::integral_constant<int, 4>{});
    case 5: return fn(scalar_t{}, std::integral_constant<int, 5>{});
    case 6: return fn(scalar_t{}, std::integral_constant<int, 6>{});
    case 7: return fn(scalar_t{}, std::integral_constant<int, 7>{});
    case 8: return fn(scalar_t{}, std::integral_constant<int, 8>{});
    default: return cudaErrorInvalidValue;
  }
}
static_assert(kMaxTasks == 8, "dispatch_tasks instantiates T = 1..8: extend it with kMaxTasks");

template <typename Fn>
cudaError_t dispatch_dtype_tasks(DType dtype, int num_tasks, Fn&& fn) {
  switch (dtype) {
    case DType::kFloat32: return dispatch_tasks<float>(num_tasks, fn);
    case DType::kBFloat16: return dispatch_tasks<__nv_bfloat16>(num_tasks, fn);
    case DType::kFloat16: return dispatch_tasks<__half>(num_tasks, fn);
    default: return cudaErrorInvalidValue;
  }
}

inline int dtype_size(DType dtype) { return dtype == DType::kFloat32 ? 4 : 2; }

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

}  // namespace detail
}  // namespace cuda
}  // namespace bucketmoo
