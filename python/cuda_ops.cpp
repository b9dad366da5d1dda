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
#include <Python.h>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <optional>
#include <vector>

#include "../csrc/common/bucketmoo_solvers.h"
#include "../csrc/cuda/bucketmoo_cuda.h"
#include "bucketmoo_ops.h"

namespace bucketmoo {
namespace {

using at::Tensor;
namespace bc = bucketmoo::cuda;

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, " (CUDA backend) failed: ", cudaGetErrorString(err));
}

void check_cuda(const Tensor& t, const char* what, const char* op) {
  TORCH_CHECK(t.is_cuda(), op, ": ", what, " must be a CUDA tensor for the cuda backend; got ", t.device());
}

bc::DType to_dtype(at::ScalarType type) {
  return type == at::kFloat ? bc::DType::kFloat32
                            : (type == at::kBFloat16 ? bc::DType::kBFloat16 : bc::DType::kFloat16);
}

cudaStream_t current_stream(const at::Device& device) {
  return c10::cuda::getCurrentCUDAStream(device.index()).stream();
}

std::vector<const void*> grad_pointers(const std::vector<Tensor>& grads) {
  std::vector<const void*> ptrs(grads.size());
  for (size_t t = 0; t < grads.size(); ++t) ptrs[t] = grads[t].data_ptr();
  return ptrs;
}

// Checks shared by gram and combine_ (the shared ones of bucketmoo_ops.h plus the CUDA task
// limit); returns S. The offsets' values cannot be read without a device sync: the Python
// layer validated them on the host (Segments) before copying them to the device.
int64_t check_grads_offsets(const std::vector<Tensor>& grads, const Tensor& offsets, const char* op) {
  ops::check_grads(grads, op);
  check_cuda(grads[0], "grads", op);
  TORCH_CHECK(static_cast<int64_t>(grads.size()) <= bc::kMaxTasks, op, ": the cuda backend handles at most ",
              bc::kMaxTasks, " task gradients; got T = ", grads.size());
  ops::check_offsets(offsets, grads[0].device(), op);
  return offsets.numel() - 1;
}

int checked_int(int64_t value, const char* name, const char* op) {
  TORCH_CHECK(value >= 0 && value <= std::numeric_limits<int>::max(), op, ": ", name,
              " must be in [0, 2^31); got ", value);
  return static_cast<int>(value);
}

// ------------------------------------------------------------------------------------ ops

Tensor gram_cuda(std::vector<Tensor> grads, Tensor offsets) {
  const char* op = "bucketmoo::gram";
  const int64_t num_segments = check_grads_offsets(grads, offsets, op);
  const at::Device device = grads[0].device();
  const c10::cuda::CUDAGuard guard(device);
  const int num_tasks = static_cast<int>(grads.size());
  const int64_t numel = grads[0].numel();
  const bc::DType dtype = to_dtype(grads[0].scalar_type());
  const auto options = grads[0].options();
  Tensor gram = at::empty({num_segments, num_tasks, num_tasks}, options.dtype(at::kFloat));
  const size_t bytes = bc::gram_workspace_bytes(num_tasks, dtype, numel, num_segments);
  Tensor workspace = at::empty({static_cast<int64_t>(bytes)}, options.dtype(at::kByte));
  const std::vector<const void*> ptrs = grad_pointers(grads);
  check_launch(bc::gram_cuda(ptrs.data(), num_tasks, dtype, numel, offsets.data_ptr<int64_t>(), num_segments,
                             gram.data_ptr<float>(), workspace.data_ptr(), bytes, current_stream(device)),
               op);
  return gram;
}

void combine_cuda(Tensor out, std::vector<Tensor> grads, Tensor weights, Tensor offsets) {
  const char* op = "bucketmoo::combine_";
  const int64_t num_segments = check_grads_offsets(grads, offsets, op);
  const int num_tasks = static_cast<int>(grads.size());
  const at::Device device = grads[0].device();
  ops::check_out(out, grads[0], op);
  ops::check_weights(weights, num_segments, num_tasks, device, op);
  // out may be exactly one of the grads (in place) but must not partly overlap any of them:
  // the kernel reads each element's inputs and writes it from the same thread, which is only
  // safe for the same element.
  const std::vector<const void*> ptrs = grad_pointers(grads);
  const auto bytes = static_cast<uintptr_t>(out.numel()) * static_cast<uintptr_t>(out.element_size());
  const auto out_begin = reinterpret_cast<uintptr_t>(out.data_ptr());
  for (int t = 0; t < num_tasks; ++t) {
    const auto begin = reinterpret_cast<uintptr_t>(ptrs[t]);
    const bool overlap = bytes > 0 && out_begin < begin + bytes && begin < out_begin + bytes;
    TORCH_CHECK(!overlap || begin == out_begin, op, ": out partially overlaps grads[", t,
                "]; it must be exactly that tensor (in place) or not overlap it");
  }
  const c10::cuda::CUDAGuard guard(device);
  check_launch(bc::combine_cuda(out.data_ptr(), ptrs.data(), num_tasks, to_dtype(grads[0].scalar_type()),
                                out.numel(), weights.data_ptr<float>(), offsets.data_ptr<int64_t>(), num_segments,
                                current_stream(device)),
               op);
}

Tensor solve_mgda_cuda(Tensor gram, int64_t solver_id, int64_t max_iter, double tol) {
  const char* op = "bucketmoo::solve_mgda";
  check_cuda(gram, "gram", op);
  const int64_t num_tasks = ops::check_gram64(gram, op);
  TORCH_CHECK(solver_id >= 0 && solver_id <= 3, op,
              ": solver must be 0 (auto), 1 (closed_form), 2 (exact) or 3 (pgd); got ", solver_id);
  const int iters = checked_int(max_iter, "max_iter", op);
  ops::check_solver_message(solver::mgda_check(static_cast<int>(num_tasks), static_cast<int>(solver_id)), op);
  const c10::cuda::CUDAGuard guard(gram.device());
  Tensor weights = at::empty({gram.size(0), num_tasks}, gram.options());
  check_launch(bc::solve_mgda_cuda(gram.data_ptr<double>(), gram.size(0), static_cast<int>(num_tasks),
                                   static_cast<int>(solver_id), iters, tol, weights.data_ptr<double>(),
                                   current_stream(gram.device())),
               op);
  return weights;
}

// The values of `orders` stay on the device (reading them would sync): the Python layer builds
// them with methods.pcgrad.pcgrad_orders, a permutation of the other tasks in every row.
Tensor solve_pcgrad_cuda(Tensor gram, Tensor orders) {
  const char* op = "bucketmoo::solve_pcgrad";
  check_cuda(gram, "gram", op);
  const int64_t num_tasks = ops::check_gram64(gram, op);
  ops::check_solver_message(solver::pcgrad_check(static_cast<int>(num_tasks)), op);
  ops::check_orders(orders, num_tasks, gram.device(), op);
  const c10::cuda::CUDAGuard guard(gram.device());
  Tensor weights = at::empty({gram.size(0), num_tasks}, gram.options());
  check_launch(bc::solve_pcgrad_cuda(gram.data_ptr<double>(), gram.size(0), static_cast<int>(num_tasks),
                                     orders.data_ptr<int64_t>(), weights.data_ptr<double>(),
                                     current_stream(gram.device())),
               op);
  return weights;
}

Tensor solve_cagrad_cuda(Tensor gram, double c, int64_t rescale) {
  const char* op = "bucketmoo::solve_cagrad";
  check_cuda(gram, "gram", op);
  const int64_t num_tasks = ops::check_gram64(gram, op);
  TORCH_CHECK(rescale >= 0 && rescale <= 2, op, ": rescale must be 0, 1 or 2; got ", rescale);
  ops::check_solver_message(solver::cagrad_check(static_cast<int>(num_tasks), c, static_cast<int>(rescale)), op);
  const c10::cuda::CUDAGuard guard(gram.device());
  Tensor weights = at::empty({gram.size(0), num_tasks}, gram.options());
  check_launch(bc::solve_cagrad_cuda(gram.data_ptr<double>(), gram.size(0), static_cast<int>(num_tasks), c,
                                     static_cast<int>(rescale), weights.data_ptr<double>(),
                                     current_stream(gram.device())),
               op);
  return weights;
}

Tensor solve_dual_cone_cuda(Tensor gram, int64_t method, double norm_eps, double reg_eps,
                            int64_t max_iter) {
  const char* op = "bucketmoo::solve_dual_cone";
  check_cuda(gram, "gram", op);
  const int64_t num_tasks = ops::check_gram64(gram, op);
  checked_int(max_iter, "max_iter", op);
  const solver::WeightStep spec = ops::dual_cone_spec(num_tasks, method, norm_eps, reg_eps, max_iter, op);
  const c10::cuda::CUDAGuard guard(gram.device());
  Tensor weights = at::empty({gram.size(0), num_tasks}, gram.options());
  check_launch(bc::solve_dual_cone_cuda(gram.data_ptr<double>(), gram.size(0), static_cast<int>(num_tasks),
                                        spec, weights.data_ptr<double>(), current_stream(gram.device())),
               op);
  return weights;
}

// The whole weight step in one launch (solver::segment_weights on the device). orders and
// losses stay on the device unread, like solve_pcgrad's orders.
Tensor weights_cuda(Tensor gram, std::optional<Tensor> orders, std::optional<Tensor> losses,
                    int64_t method, int64_t solver_code, int64_t max_iter, double tol, double c,
                    int64_t rescale, int64_t normalization, bool normalize_weights) {
  const char* op = "bucketmoo::weights";
  check_cuda(gram, "gram", op);
  const int64_t num_tasks = ops::check_gram(gram, at::kFloat, op), num_segments = gram.size(0);
  checked_int(max_iter, "max_iter", op);
  const solver::WeightStep spec =
      ops::weight_step(orders, losses, num_segments, num_tasks, gram.device(), method, solver_code,
                       max_iter, tol, c, rescale, normalization, normalize_weights, op);
  const c10::cuda::CUDAGuard guard(gram.device());
  Tensor weights = at::empty({num_segments, num_tasks}, gram.options());
  check_launch(bc::weights_cuda(gram.data_ptr<float>(), num_segments, static_cast<int>(num_tasks), spec,
                                ops::losses_ptr(losses, spec), weights.data_ptr<float>(),
                                current_stream(gram.device())),
               op);
  return weights;
}

}  // namespace
}  // namespace bucketmoo

TORCH_LIBRARY_IMPL(bucketmoo, CUDA, m) {
  m.impl("gram", &bucketmoo::gram_cuda);
  m.impl("solve_mgda", &bucketmoo::solve_mgda_cuda);
  m.impl("solve_pcgrad", &bucketmoo::solve_pcgrad_cuda);
  m.impl("solve_cagrad", &bucketmoo::solve_cagrad_cuda);
  m.impl("solve_dual_cone", &bucketmoo::solve_dual_cone_cuda);
  m.impl("combine_", &bucketmoo::combine_cuda);
  m.impl("weights", &bucketmoo::weights_cuda);
}

// ---- the Python module bucketmoo_kernels._cuda: importing it registers the CUDA kernels above.
namespace {

PyObject* py_max_tasks(PyObject*, PyObject*) { return PyLong_FromLong(bucketmoo::cuda::kMaxTasks); }

PyMethodDef kMethods[] = {
    {"max_tasks", py_max_tasks, METH_NOARGS, "Most task gradients the CUDA gram/combine kernels take."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_cuda",
                       "Native CUDA kernels of bucketmoo_kernels (CUDA implementations of torch.ops.bucketmoo.*).",
                       -1, kMethods, nullptr, nullptr, nullptr, nullptr};

}  // namespace

PyMODINIT_FUNC PyInit__cuda(void) { return PyModule_Create(&kModule); }
