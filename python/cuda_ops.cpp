// Torch glue of the CUDA backend: CUDA implementations of the bucketmoo:: ops.
//
// The schemas are defined once, with TORCH_LIBRARY(bucketmoo, m), by the CPU binding in
// python/; this file only adds TORCH_LIBRARY_IMPL(bucketmoo, CUDA, m). Each function checks
// its tensors (device, dtype, shape, stride; messages name the argument and say what they
// got), allocates outputs and workspace with torch (the caching allocator), and calls the
// torch-free launchers of csrc/cuda on the current stream of the tensors' device. Nothing here
// synchronises with the host, so the ops can be captured in CUDA graphs.
//
// Not checked here (that would need a device-to-host copy): the *values* of `offsets`
// (0 = offsets[0] <= ... <= offsets[S] = N) and of `orders`; the Python layer validates them
// on the host before they reach the device.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <vector>

#include "common/bucketmoo_solvers.h"
#include "cuda/bucketmoo_cuda.h"

namespace {

using at::Tensor;
namespace bc = bucketmoo::cuda;

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "bucketmoo::", op, " (CUDA backend) failed: ", cudaGetErrorString(err));
}

bc::GradDType grad_dtype(at::ScalarType type, const char* name) {
  TORCH_CHECK(type == at::kFloat || type == at::kBFloat16 || type == at::kHalf, name,
              " must be float32, bfloat16 or float16; got ", type);
  return type == at::kFloat ? bc::GradDType::kFloat32
                            : (type == at::kBFloat16 ? bc::GradDType::kBFloat16 : bc::GradDType::kFloat16);
}

// The T task gradients as raw pointers, after checking that they are T <= kMaxTasks 1-D CUDA
// tensors of one dtype, device and length, each with unit stride.
struct Grads {
  std::vector<const void*> ptrs;
  bc::GradDType dtype;
  at::ScalarType scalar_type;
  int64_t numel;
  at::Device device;
};

Grads check_grads(at::TensorList grads) {
  TORCH_CHECK(!grads.empty(), "grads must hold at least one tensor; got an empty list");
  TORCH_CHECK(static_cast<int64_t>(grads.size()) <= bc::kMaxTasks, "grads: the CUDA backend handles at most ",
              bc::kMaxTasks, " tasks; got ", grads.size());
  const Tensor& first = grads[0];
  Grads out{{}, grad_dtype(first.scalar_type(), "grads[0]"), first.scalar_type(), first.numel(), first.device()};
  for (size_t t = 0; t < grads.size(); ++t) {
    const Tensor& g = grads[t];
    TORCH_CHECK(g.is_cuda(), "grads[", t, "] must be a CUDA tensor; got device ", g.device());
    TORCH_CHECK(g.device() == out.device, "grads[", t, "] is on ", g.device(), " but grads[0] is on ", out.device);
    TORCH_CHECK(g.dim() == 1, "grads[", t, "] must be 1-D; got shape ", g.sizes());
    TORCH_CHECK(g.scalar_type() == out.scalar_type, "grads[", t, "] has dtype ", g.scalar_type(),
                " but grads[0] has ", out.scalar_type);
    TORCH_CHECK(g.numel() == out.numel, "grads[", t, "] has ", g.numel(), " elements but grads[0] has ", out.numel);
    TORCH_CHECK(g.numel() <= 1 || g.stride(0) == 1, "grads[", t, "] must have unit stride; got stride ",
                g.stride(0));
    out.ptrs.push_back(g.data_ptr());
  }
  return out;
}

int64_t check_offsets(const Tensor& offsets, const at::Device& device) {
  TORCH_CHECK(offsets.device() == device, "offsets must be on the grads' device ", device, "; got ",
              offsets.device());
  TORCH_CHECK(offsets.scalar_type() == at::kLong, "offsets must be int64; got ", offsets.scalar_type());
  TORCH_CHECK(offsets.dim() == 1 && offsets.numel() >= 2, "offsets must be 1-D with S + 1 >= 2 entries; got shape ",
              offsets.sizes());
  TORCH_CHECK(offsets.is_contiguous(), "offsets must be contiguous");
  return offsets.numel() - 1;
}

// gram: float64 [S, T, T] on a CUDA device, made contiguous. Returns T.
int check_gram(const Tensor& gram) {
  TORCH_CHECK(gram.is_cuda(), "gram must be a CUDA tensor; got device ", gram.device());
  TORCH_CHECK(gram.scalar_type() == at::kDouble, "gram must be float64; got ", gram.scalar_type());
  TORCH_CHECK(gram.dim() == 3 && gram.size(1) == gram.size(2) && gram.size(1) >= 1,
              "gram must have shape [S, T, T] with T >= 1; got ", gram.sizes());
  return static_cast<int>(gram.size(1));
}

int to_int(int64_t value, const char* name) {
  TORCH_CHECK(value >= 0 && value <= std::numeric_limits<int>::max(), name, " must be in [0, 2^31); got ", value);
  return static_cast<int>(value);
}

// ------------------------------------------------------------------------------------ ops

// gram(Tensor[] grads, Tensor offsets) -> Tensor   float32 [S, T, T]
Tensor gram_cuda(at::TensorList grads, const Tensor& offsets) {
  const Grads g = check_grads(grads);
  const int64_t num_segments = check_offsets(offsets, g.device);
  const c10::cuda::CUDAGuard guard(g.device);
  const int num_tasks = static_cast<int>(g.ptrs.size());
  const auto options = grads[0].options();
  Tensor gram = at::empty({num_segments, num_tasks, num_tasks}, options.dtype(at::kFloat));
  const size_t bytes = bc::gram_workspace_bytes(num_tasks, g.dtype, g.numel, num_segments);
  Tensor workspace = at::empty({static_cast<int64_t>(bytes)}, options.dtype(at::kByte));
  check_launch(bc::gram_cuda(g.ptrs.data(), num_tasks, g.dtype, g.numel, offsets.data_ptr<int64_t>(), num_segments,
                             gram.data_ptr<float>(), workspace.data_ptr(), bytes,
                             c10::cuda::getCurrentCUDAStream(g.device.index())),
               "gram");
  return gram;
}

// solve_mgda(Tensor gram, int solver, int max_iter, float tol) -> Tensor   float64 [S, T]
Tensor solve_mgda_cuda(const Tensor& gram, int64_t solver, int64_t max_iter, double tol) {
  const int num_tasks = check_gram(gram);
  const int solver_id = to_int(solver, "solver");
  const char* problem = bucketmoo::solver::mgda_check(num_tasks, solver_id);
  TORCH_CHECK(problem == nullptr, problem, " (got T = ", num_tasks, ", solver = ", solver, ")");
  const c10::cuda::CUDAGuard guard(gram.device());
  const Tensor m = gram.contiguous();
  Tensor weights = at::empty({gram.size(0), num_tasks}, gram.options());
  check_launch(bc::solve_mgda_cuda(m.data_ptr<double>(), gram.size(0), num_tasks, solver_id,
                                   to_int(max_iter, "max_iter"), tol, weights.data_ptr<double>(),
                                   c10::cuda::getCurrentCUDAStream(gram.device().index())),
               "solve_mgda");
  return weights;
}

// solve_pcgrad(Tensor gram, Tensor orders) -> Tensor   float64 [S, T]
Tensor solve_pcgrad_cuda(const Tensor& gram, const Tensor& orders) {
  const int num_tasks = check_gram(gram);
  const char* problem = bucketmoo::solver::pcgrad_check(num_tasks);
  TORCH_CHECK(problem == nullptr, problem, " (got T = ", num_tasks, ")");
  TORCH_CHECK(orders.device() == gram.device(), "orders must be on the gram's device ", gram.device(), "; got ",
              orders.device());
  TORCH_CHECK(orders.scalar_type() == at::kLong, "orders must be int64; got ", orders.scalar_type());
  TORCH_CHECK(orders.dim() == 2 && orders.size(0) == num_tasks && orders.size(1) == num_tasks - 1,
              "orders must have shape [T, T-1] = [", num_tasks, ", ", num_tasks - 1, "]; got ", orders.sizes());
  const c10::cuda::CUDAGuard guard(gram.device());
  const Tensor m = gram.contiguous();
  const Tensor ord = orders.contiguous();
  Tensor weights = at::empty({gram.size(0), num_tasks}, gram.options());
  check_launch(bc::solve_pcgrad_cuda(m.data_ptr<double>(), gram.size(0), num_tasks, ord.data_ptr<int64_t>(),
                                     weights.data_ptr<double>(),
                                     c10::cuda::getCurrentCUDAStream(gram.device().index())),
               "solve_pcgrad");
  return weights;
}

// solve_cagrad(Tensor gram, float c, int rescale) -> Tensor   float64 [S, T]
Tensor solve_cagrad_cuda(const Tensor& gram, double c, int64_t rescale) {
  const int num_tasks = check_gram(gram);
  TORCH_CHECK(rescale >= 0 && rescale <= 2, "rescale must be 0, 1 or 2; got ", rescale);
  const char* problem = bucketmoo::solver::cagrad_check(num_tasks, c, static_cast<int>(rescale));
  TORCH_CHECK(problem == nullptr, problem, " (got T = ", num_tasks, ", c = ", c, ")");
  const c10::cuda::CUDAGuard guard(gram.device());
  const Tensor m = gram.contiguous();
  Tensor weights = at::empty({gram.size(0), num_tasks}, gram.options());
  check_launch(bc::solve_cagrad_cuda(m.data_ptr<double>(), gram.size(0), num_tasks, c, static_cast<int>(rescale),
                                     weights.data_ptr<double>(),
                                     c10::cuda::getCurrentCUDAStream(gram.device().index())),
               "solve_cagrad");
  return weights;
}

// combine_(Tensor(a!) out, Tensor[] grads, Tensor weights, Tensor offsets) -> ()
void combine_cuda_(at::Tensor& out, at::TensorList grads, const Tensor& weights, const Tensor& offsets) {
  const Grads g = check_grads(grads);
  const int64_t num_segments = check_offsets(offsets, g.device);
  const int num_tasks = static_cast<int>(g.ptrs.size());
  TORCH_CHECK(out.device() == g.device, "out must be on the grads' device ", g.device, "; got ", out.device());
  TORCH_CHECK(out.scalar_type() == g.scalar_type, "out must have the grads' dtype ", g.scalar_type, "; got ",
              out.scalar_type());
  TORCH_CHECK(out.dim() == 1 && out.numel() == g.numel, "out must be 1-D with N = ", g.numel,
              " elements; got shape ", out.sizes());
  TORCH_CHECK(out.numel() <= 1 || out.stride(0) == 1, "out must have unit stride; got stride ", out.stride(0));
  TORCH_CHECK(weights.device() == g.device, "weights must be on the grads' device ", g.device, "; got ",
              weights.device());
  TORCH_CHECK(weights.scalar_type() == at::kFloat, "weights must be float32; got ", weights.scalar_type());
  TORCH_CHECK(weights.dim() == 2 && weights.size(0) == num_segments && weights.size(1) == num_tasks,
              "weights must have shape [S, T] = [", num_segments, ", ", num_tasks, "]; got ", weights.sizes());
  // out may be exactly one of the grads (in place), but must not partly overlap any of them.
  const int64_t bytes = g.numel * static_cast<int64_t>(out.element_size());
  const auto out_begin = reinterpret_cast<uintptr_t>(out.data_ptr());
  for (int t = 0; t < num_tasks; ++t) {
    const auto begin = reinterpret_cast<uintptr_t>(g.ptrs[t]);
    const bool overlap = bytes > 0 && out_begin < begin + bytes && begin < out_begin + bytes;
    TORCH_CHECK(!overlap || begin == out_begin, "out partially overlaps grads[", t,
                "]; it must either be exactly that tensor (in place) or not overlap it");
  }
  const c10::cuda::CUDAGuard guard(g.device);
  const Tensor w = weights.contiguous();
  check_launch(bc::combine_cuda(out.data_ptr(), g.ptrs.data(), num_tasks, g.dtype, g.numel, w.data_ptr<float>(),
                                offsets.data_ptr<int64_t>(), num_segments,
                                c10::cuda::getCurrentCUDAStream(g.device.index())),
               "combine_");
}

}  // namespace

TORCH_LIBRARY_IMPL(bucketmoo, CUDA, m) {
  m.impl("gram", &gram_cuda);
  m.impl("solve_mgda", &solve_mgda_cuda);
  m.impl("solve_pcgrad", &solve_pcgrad_cuda);
  m.impl("solve_cagrad", &solve_cagrad_cuda);
  m.impl("combine_", &combine_cuda_);
}
