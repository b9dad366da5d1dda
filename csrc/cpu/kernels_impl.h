// kernels_impl.h -- the per-chunk loops of the CPU gram and combine, compiled once per
// instruction-set variant (kernels_baseline.cpp, kernels_avx2.cpp). Each includer defines
// BUCKETMOO_ISA_NS to a distinct namespace so the variants never merge at link time.
//
// No std:: calls in here (only builtins): an inline std function instantiated under a
// `#pragma GCC target` could otherwise be picked by the linker for the baseline variant.
//
// Loops use a fixed number of lanes (kLanes) per accumulator so that the summation order is
// fixed by the source, not by the vector width the compiler picks.
#ifndef BUCKETMOO_ISA_NS
#error "define BUCKETMOO_ISA_NS before including kernels_impl.h"
#endif

namespace bucketmoo {
namespace cpu {
namespace BUCKETMOO_ISA_NS {

constexpr int kLanes = 8;  // lanes of the generic gram loop and of the tail
// Lanes of the register-blocked gram: T(T+1)/2 accumulators x lanes must fit the vector
// registers (AVX2: 16 x 4 doubles). Depends on T only, never on the ISA variant.
template <int T>
constexpr int gram_lanes() { return T <= 2 ? 8 : 4; }
constexpr int kBlock = 256;  // elements per combine / generic-gram block (multiple of kLanes)

inline float bits_to_float(uint32_t u) { float f; __builtin_memcpy(&f, &u, 4); return f; }
inline uint32_t float_to_bits(float f) { uint32_t u; __builtin_memcpy(&u, &f, 4); return u; }

// ---- loads (exact conversions to float)
inline float load(const float* p, int64_t i) { return p[i]; }
inline float load(const uint16_t* p, int64_t i, DType dt) {
  uint32_t h = p[i];
  if (dt == DType::kBFloat16) return bits_to_float(h << 16);
  // IEEE half -> float, branch-free; half subnormals via an exact int->float product so
  // that a DAZ/FTZ floating-point mode cannot zero them.
  uint32_t sign = (h & 0x8000u) << 16;
  uint32_t em = h & 0x7fffu;
  float normal = bits_to_float(em << 13) * 0x1p112f;
  float sub = float(int(em)) * 0x1p-24f;
  float mag = em < 0x0400u ? sub : normal;
  uint32_t bits = float_to_bits(mag);
  bits = em >= 0x7c00u ? ((em << 13) | 0x7f800000u) : bits;
  return bits_to_float(bits | sign);
}

// ---- stores (round to nearest even, NaN kept NaN; same results as c10's conversions)
inline uint16_t to_bf16(float f) {
  uint32_t u = float_to_bits(f);
  uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return (f != f) ? uint16_t(0x7fc0u) : uint16_t(rounded);
}
inline uint16_t to_fp16(float f) {
  uint32_t u = float_to_bits(f);
  uint32_t sign = u & 0x80000000u;
  u ^= sign;
  // |f| >= 65536 (or inf/nan): inf, or a quiet NaN
  uint32_t big = u > 0x7f800000u ? 0x7e00u : 0x7c00u;
  // |f| < 2^-14: subnormal half via the magic-number add (rounds to nearest even)
  const uint32_t denorm_magic = ((127u - 15u) + (23u - 10u) + 1u) << 23;
  uint32_t small = float_to_bits(bits_to_float(u) + bits_to_float(denorm_magic)) - denorm_magic;
  // normal: rebias and round the mantissa to nearest even
  uint32_t mant_odd = (u >> 13) & 1u;
  uint32_t normal = (u + (uint32_t(15 - 127) << 23) + 0xfffu + mant_odd) >> 13;
  uint32_t o = u >= 0x47800000u ? big : (u < (113u << 23) ? small : normal);
  return uint16_t(o | (sign >> 16));
}

// ---- gram: register-blocked for a compile-time T (2..8)
template <int T, typename Src>
inline void gram_chunk_fixed(const Src* const* g, DType dt, int64_t begin, int64_t end,
                             double* partial) {
  constexpr int P = T * (T + 1) / 2;
  constexpr int L = gram_lanes<T>();
  double acc[P][L];
  for (int p = 0; p < P; ++p)
    for (int l = 0; l < L; ++l) acc[p][l] = 0.0;
  int64_t i = begin;
  const int64_t full_end = begin + (end - begin) / L * L;
  for (; i < full_end; i += L) {
    double x[T][L];
    for (int t = 0; t < T; ++t)
      for (int l = 0; l < L; ++l) {
        if constexpr (sizeof(Src) == 4) x[t][l] = double(load(g[t], i + l));
        else x[t][l] = double(load(g[t], i + l, dt));
      }
    int p = 0;
    for (int a = 0; a < T; ++a)
      for (int b = a; b < T; ++b, ++p)
        for (int l = 0; l < L; ++l) acc[p][l] += x[a][l] * x[b][l];
  }
  for (int l = 0; i < end; ++i, ++l) {  // tail: element i goes to lane l
    double x[T];
    for (int t = 0; t < T; ++t) {
      if constexpr (sizeof(Src) == 4) x[t] = double(load(g[t], i));
      else x[t] = double(load(g[t], i, dt));
    }
    int p = 0;
    for (int a = 0; a < T; ++a)
      for (int b = a; b < T; ++b, ++p) acc[p][l] += x[a] * x[b];
  }
  for (int p = 0; p < P; ++p) {
    double s = 0.0;
    for (int l = 0; l < L; ++l) s += acc[p][l];
    partial[p] = s;
  }
}

// ---- gram: any T, blocks of kBlock elements converted to double, then one dot per pair
template <typename Src>
inline void gram_chunk_generic(const Src* const* g, int T, DType dt, int64_t begin, int64_t end,
                               double* partial, double* scratch /* [T * kBlock] */) {
  const int P = T * (T + 1) / 2;
  for (int p = 0; p < P; ++p) partial[p] = 0.0;
  for (int64_t b0 = begin; b0 < end; b0 += kBlock) {
    const int n = int(end - b0 < kBlock ? end - b0 : kBlock);
    for (int t = 0; t < T; ++t) {
      double* row = scratch + t * kBlock;
      for (int k = 0; k < n; ++k) {
        if constexpr (sizeof(Src) == 4) row[k] = double(load(g[t], b0 + k));
        else row[k] = double(load(g[t], b0 + k, dt));
      }
      for (int k = n; k < kBlock; ++k) row[k] = 0.0;
    }
    int p = 0;
    for (int a = 0; a < T; ++a)
      for (int b = a; b < T; ++b, ++p) {
        const double* ra = scratch + a * kBlock;
        const double* rb = scratch + b * kBlock;
        double acc[kLanes] = {0, 0, 0, 0, 0, 0, 0, 0};
        for (int k = 0; k < kBlock; k += kLanes)
          for (int l = 0; l < kLanes; ++l) acc[l] += ra[k + l] * rb[k + l];
        double s = 0.0;
        for (int l = 0; l < kLanes; ++l) s += acc[l];
        partial[p] += s;
      }
  }
}

// partial: P = T(T+1)/2 doubles (upper triangle, row-major). scratch: T * kBlock doubles.
template <typename Src>
inline void gram_chunk_typed(const Src* const* g, int T, DType dt, int64_t begin, int64_t end,
                             double* partial, double* scratch) {
  switch (T) {
    case 1: return gram_chunk_fixed<1>(g, dt, begin, end, partial);
    case 2: return gram_chunk_fixed<2>(g, dt, begin, end, partial);
    case 3: return gram_chunk_fixed<3>(g, dt, begin, end, partial);
    case 4: return gram_chunk_fixed<4>(g, dt, begin, end, partial);
    case 5: return gram_chunk_fixed<5>(g, dt, begin, end, partial);
    case 6: return gram_chunk_fixed<6>(g, dt, begin, end, partial);
    case 7: return gram_chunk_fixed<7>(g, dt, begin, end, partial);
    case 8: return gram_chunk_fixed<8>(g, dt, begin, end, partial);
    default: return gram_chunk_generic(g, T, dt, begin, end, partial, scratch);
  }
}

inline void gram_chunk(const void* const* grads, int T, DType dt, int64_t begin, int64_t end,
                       double* partial, double* scratch) {
  if (dt == DType::kFloat32) {
    return gram_chunk_typed(reinterpret_cast<const float* const*>(grads), T, dt, begin, end, partial,
                            scratch);
  }
  return gram_chunk_typed(reinterpret_cast<const uint16_t* const*>(grads), T, dt, begin, end, partial,
                          scratch);
}

// ---- combine: out[i] = sum_t w[t] * g[t][i] in double, task order, one rounding.
// All T reads of a block happen before its writes, so `out` may alias any g[t].
template <typename Src>
inline double load_f64(const Src* p, int64_t i, DType dt) {
  if constexpr (sizeof(Src) == 4) { (void)dt; return double(load(p, i)); }
  else return double(load(p, i, dt));
}

// acc[k] for k < n: T compile-time (1..8) keeps a group of kLanes sums in registers across
// all tasks (one pass over memory, no accumulator round trips); TT = 0: any T, task by task.
template <int TT, typename Src>
inline void combine_sums(double* acc, const Src* const* g, int T, DType dt, const double* w,
                         int64_t b0, int n) {
  if constexpr (TT > 0) {
    int k = 0;
    for (; k + kLanes <= n; k += kLanes) {
      double a[kLanes];
      for (int l = 0; l < kLanes; ++l) a[l] = w[0] * load_f64(g[0], b0 + k + l, dt);
      for (int t = 1; t < TT; ++t)
        for (int l = 0; l < kLanes; ++l) a[l] += w[t] * load_f64(g[t], b0 + k + l, dt);
      for (int l = 0; l < kLanes; ++l) acc[k + l] = a[l];
    }
    for (; k < n; ++k) {
      double a = w[0] * load_f64(g[0], b0 + k, dt);
      for (int t = 1; t < TT; ++t) a += w[t] * load_f64(g[t], b0 + k, dt);
      acc[k] = a;
    }
  } else {
    for (int k = 0; k < n; ++k) acc[k] = w[0] * load_f64(g[0], b0 + k, dt);
    for (int t = 1; t < T; ++t) {
      const double wt = w[t];
      for (int k = 0; k < n; ++k) acc[k] += wt * load_f64(g[t], b0 + k, dt);
    }
  }
}

template <typename Src>
inline void combine_block(void* out, const Src* const* g, int T, DType dt, const double* w,
                          int64_t b0, int n, bool stream) {
  double acc[kBlock];
  switch (T) {
    case 1: combine_sums<1>(acc, g, T, dt, w, b0, n); break;
    case 2: combine_sums<2>(acc, g, T, dt, w, b0, n); break;
    case 3: combine_sums<3>(acc, g, T, dt, w, b0, n); break;
    case 4: combine_sums<4>(acc, g, T, dt, w, b0, n); break;
    case 5: combine_sums<5>(acc, g, T, dt, w, b0, n); break;
    case 6: combine_sums<6>(acc, g, T, dt, w, b0, n); break;
    case 7: combine_sums<7>(acc, g, T, dt, w, b0, n); break;
    case 8: combine_sums<8>(acc, g, T, dt, w, b0, n); break;
    default: combine_sums<0>(acc, g, T, dt, w, b0, n); break;
  }
  if (dt == DType::kFloat32) {
    float* o = static_cast<float*>(out) + b0;
#if BUCKETMOO_HAVE_STREAM_STORES
    if (stream) {  // non-temporal stores: no read-for-ownership of the output lines
      float rounded[kBlock];
      for (int k = 0; k < n; ++k) rounded[k] = float(acc[k]);
      int k = 0;
      for (; k < n && (reinterpret_cast<uintptr_t>(o + k) & 15u) != 0; ++k) o[k] = rounded[k];
      for (; k + 4 <= n; k += 4) _mm_stream_ps(o + k, _mm_loadu_ps(rounded + k));
      for (; k < n; ++k) o[k] = rounded[k];
      return;
    }
#endif
    for (int k = 0; k < n; ++k) o[k] = float(acc[k]);
  } else if (dt == DType::kBFloat16) {
    uint16_t* o = static_cast<uint16_t*>(out) + b0;
    for (int k = 0; k < n; ++k) o[k] = to_bf16(float(acc[k]));
  } else {
    uint16_t* o = static_cast<uint16_t*>(out) + b0;
    for (int k = 0; k < n; ++k) o[k] = to_fp16(float(acc[k]));
  }
}

// w: the segment's T weights as double (exact copies of the float32 weights). stream: use
// non-temporal stores for a float32 output (only when it aliases no input and is far larger
// than the caches; the caller decides). Ends with a store fence when it streamed.
inline void combine_range(void* out, const void* const* grads, int T, DType dt, const double* w,
                          int64_t begin, int64_t end, bool stream) {
  for (int64_t b0 = begin; b0 < end; b0 += kBlock) {
    const int n = int(end - b0 < kBlock ? end - b0 : kBlock);
    if (dt == DType::kFloat32)
      combine_block(out, reinterpret_cast<const float* const*>(grads), T, dt, w, b0, n, stream);
    else
      combine_block(out, reinterpret_cast<const uint16_t* const*>(grads), T, dt, w, b0, n, stream);
  }
#if BUCKETMOO_HAVE_STREAM_STORES
  if (stream) _mm_sfence();
#endif
}

}  // namespace BUCKETMOO_ISA_NS
}  // namespace cpu
}  // namespace bucketmoo
