// The gram/combine chunk loops compiled for AVX2 + FMA + F16C (x86-64 with GCC or Clang).
// Picked at run time when the CPU has them (see kernels.cpp). Products of fp32/bf16/fp16
// values are exact in float64, so FMA contraction does not change any result: this variant
// gives the same bits as the baseline one.
#include <cstdint>

#include "bucketmoo_cpu.h"
#include "kernels_variants.h"

#if BUCKETMOO_HAVE_AVX2_VARIANT
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define BUCKETMOO_ISA_NS isa_avx2
#define BUCKETMOO_ISA_AVX2 1
#include "kernels_impl.h"
#pragma GCC pop_options

namespace bucketmoo {
namespace cpu {

__attribute__((target("avx2,fma,f16c")))
void gram_chunk_avx2(const void* const* grads, int T, DType dt, int64_t begin, int64_t end,
                     double* partial, double* scratch) {
  isa_avx2::gram_chunk(grads, T, dt, begin, end, partial, scratch);
}

__attribute__((target("avx2,fma,f16c")))
void combine_range_avx2(void* out, const void* const* grads, int T, DType dt, const double* w,
                        int64_t begin, int64_t end, bool stream) {
  isa_avx2::combine_range(out, grads, T, dt, w, begin, end, stream);
}

}  // namespace cpu
}  // namespace bucketmoo
#endif
