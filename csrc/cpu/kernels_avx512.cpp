// The gram/combine chunk loops compiled for AVX-512 F/VL/BW/DQ (+ AVX2, FMA, F16C): 8-double
// zmm vectors. Picked at run time when the CPU has them (see kernels.cpp). The gram keeps
// every pair's lane order (two pairs' 4-lane accumulators share one zmm) and all products
// are exact in float64: this variant gives the same bits as the AVX2 and baseline ones.
#include <cstdint>

#include "bucketmoo_cpu.h"
#include "kernels_variants.h"

#if BUCKETMOO_HAVE_AVX512_VARIANT
#define BUCKETMOO_AVX512_TARGET "avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,f16c"
#pragma GCC push_options
// GCC 12's _mm512_cvtps_pd passes _mm512_undefined_pd() as the (fully masked-off) source.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,f16c")  // = BUCKETMOO_AVX512_TARGET
#define BUCKETMOO_ISA_NS isa_avx512
#define BUCKETMOO_ISA_AVX2 1
#define BUCKETMOO_ISA_AVX512 1
#include "kernels_impl.h"
#pragma GCC diagnostic pop
#pragma GCC pop_options

namespace bucketmoo {
namespace cpu {

__attribute__((target(BUCKETMOO_AVX512_TARGET)))
void gram_chunk_avx512(const void* const* grads, int T, DType dt, int64_t begin, int64_t end,
                       double* partial, double* scratch) {
  isa_avx512::gram_chunk(grads, T, dt, begin, end, partial, scratch);
}

__attribute__((target(BUCKETMOO_AVX512_TARGET)))
void combine_range_avx512(void* out, const void* const* grads, int T, DType dt, const double* w,
                          int64_t begin, int64_t end, bool stream) {
  isa_avx512::combine_range(out, grads, T, dt, w, begin, end, stream);
}

}  // namespace cpu
}  // namespace bucketmoo
#endif
