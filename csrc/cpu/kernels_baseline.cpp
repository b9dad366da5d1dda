// The gram/combine chunk loops for the compiler's baseline target (x86-64: SSE2), so the
// extension runs on any CPU; -march is never set unless BUCKETMOO_CPU_NATIVE=1 at build time.
#include <cstdint>

#include "bucketmoo_cpu.h"
#include "kernels_variants.h"

#define BUCKETMOO_ISA_NS isa_baseline
#include "kernels_impl.h"

namespace bucketmoo {
namespace cpu {

void gram_chunk_baseline(const void* const* grads, int T, DType dt, int64_t begin, int64_t end,
                         double* partial, double* scratch) {
  isa_baseline::gram_chunk(grads, T, dt, begin, end, partial, scratch);
}

void combine_range_baseline(void* out, const void* const* grads, int T, DType dt,
                            const double* w, int64_t begin, int64_t end, bool stream) {
  isa_baseline::combine_range(out, grads, T, dt, w, begin, end, stream);
}

}  // namespace cpu
}  // namespace bucketmoo
