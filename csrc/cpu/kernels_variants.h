// Internal: the instruction-set variants of the chunk loops (kernels_baseline.cpp,
// kernels_avx2.cpp, kernels_avx512.cpp) and whether the AVX2 / AVX-512 ones are compiled in.
#pragma once

#include <cstdint>

#include "bucketmoo_cpu.h"

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__)) && \
    !defined(BUCKETMOO_NO_AVX2_VARIANT)
#define BUCKETMOO_HAVE_AVX2_VARIANT 1
#else
#define BUCKETMOO_HAVE_AVX2_VARIANT 0
#endif
// AVX-512 F/VL/BW/DQ (+ AVX2, FMA, F16C): GCC >= 8 or Clang, only with the AVX2 one.
#if BUCKETMOO_HAVE_AVX2_VARIANT && !defined(BUCKETMOO_NO_AVX512_VARIANT) && \
    (defined(__clang__) || __GNUC__ >= 8)
#define BUCKETMOO_HAVE_AVX512_VARIANT 1
#else
#define BUCKETMOO_HAVE_AVX512_VARIANT 0
#endif

// SSE non-temporal stores (part of baseline x86-64) for the float32 combine output.
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define BUCKETMOO_HAVE_STREAM_STORES 1
#else
#define BUCKETMOO_HAVE_STREAM_STORES 0
#endif

namespace bucketmoo {
namespace cpu {

void gram_chunk_baseline(const void* const* grads, int T, DType dt, int64_t begin, int64_t end,
                         double* partial, double* scratch);
void combine_range_baseline(void* out, const void* const* grads, int T, DType dt,
                            const double* w, int64_t begin, int64_t end, bool stream);
#if BUCKETMOO_HAVE_AVX2_VARIANT
void gram_chunk_avx2(const void* const* grads, int T, DType dt, int64_t begin, int64_t end,
                     double* partial, double* scratch);
void combine_range_avx2(void* out, const void* const* grads, int T, DType dt, const double* w,
                        int64_t begin, int64_t end, bool stream);
#endif
#if BUCKETMOO_HAVE_AVX512_VARIANT
void gram_chunk_avx512(const void* const* grads, int T, DType dt, int64_t begin, int64_t end,
                       double* partial, double* scratch);
void combine_range_avx512(void* out, const void* const* grads, int T, DType dt, const double* w,
                          int64_t begin, int64_t end, bool stream);
#endif

}  // namespace cpu
}  // namespace bucketmoo
