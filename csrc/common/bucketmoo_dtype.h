// bucketmoo_dtype.h -- the element type of the task gradients, one enum for the CPU and CUDA
// kernels (the glue in python/*.cpp maps torch dtypes onto it; Python: inputs.SUPPORTED_DTYPES
// in the same order).
#pragma once

namespace bucketmoo {

enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

}  // namespace bucketmoo
