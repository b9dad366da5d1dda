// cpu_ops.cpp -- the CPU binding: defines the torch.ops.bucketmoo schemas (TORCH_LIBRARY) and
// registers the CPU implementations, which check their inputs and call the torch-free kernels
// of csrc/cpu with raw pointers. Built as the Python module bucketmoo_kernels._cpu.
#include <Python.h>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include "../csrc/common/bucketmoo_solvers.h"
#include "../csrc/cpu/bucketmoo_cpu.h"
#include "bucketmoo_ops.h"

namespace bucketmoo {
namespace {

cpu::DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return cpu::DType::kFloat32;
    case at::kBFloat16: return cpu::DType::kBFloat16;
    default: return cpu::DType::kFloat16;
  }
}

void check_cpu(const at::Tensor& t, const char* what, const char* op) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", what, " must be a CPU tensor for the cpu backend; got ",
              t.device());
}

std::vector<const void*> grad_pointers(const std::vector<at::Tensor>& grads) {
  std::vector<const void*> ptrs(grads.size());
  for (size_t t = 0; t < grads.size(); ++t) ptrs[t] = grads[t].data_ptr();
  return ptrs;
}

// Checks shared by gram and combine_; returns S.
int64_t check_grads_offsets(const std::vector<at::Tensor>& grads, const at::Tensor& offsets,
                            const char* op) {
  ops::check_grads(grads, op);
  check_cpu(grads[0], "grads", op);
  ops::check_offsets(offsets, grads[0].device(), op);
  const int64_t S = offsets.numel() - 1;
  ops::check_offsets_values(offsets.data_ptr<int64_t>(), S, grads[0].numel(), op);
  return S;
}

at::Tensor gram_cpu(std::vector<at::Tensor> grads, at::Tensor offsets) {
  const char* op = "bucketmoo::gram";
  const int64_t S = check_grads_offsets(grads, offsets, op);
  const int64_t T = int64_t(grads.size());
  at::Tensor out = at::empty({S, T, T}, grads[0].options().dtype(at::kFloat));
  std::vector<const void*> ptrs = grad_pointers(grads);
  cpu::gram(ptrs.data(), int(T), to_dtype(grads[0].scalar_type()), offsets.data_ptr<int64_t>(), S,
            out.data_ptr<float>(), at::get_num_threads());
  return out;
}

void combine_cpu(at::Tensor out, std::vector<at::Tensor> grads, at::Tensor weights,
                 at::Tensor offsets) {
  const char* op = "bucketmoo::combine_";
  const int64_t S = check_grads_offsets(grads, offsets, op);
  const int64_t T = int64_t(grads.size());
  ops::check_out(out, grads[0], op);
  ops::check_weights(weights, S, T, grads[0].device(), op);
  std::vector<const void*> ptrs = grad_pointers(grads);
  cpu::combine(out.data_ptr(), ptrs.data(), int(T), to_dtype(grads[0].scalar_type()),
               weights.data_ptr<float>(), offsets.data_ptr<int64_t>(), S, at::get_num_threads());
}

at::Tensor solve_mgda_cpu(at::Tensor gram, int64_t solver, int64_t max_iter, double tol) {
  const char* op = "bucketmoo::solve_mgda";
  check_cpu(gram, "gram", op);
  const int64_t T = ops::check_gram64(gram, op);
  TORCH_CHECK(solver >= 0 && solver <= 3, op,
              ": solver must be 0 (auto), 1 (closed_form), 2 (exact) or 3 (pgd); got ", solver);
  TORCH_CHECK(max_iter >= 0, op, ": max_iter must be >= 0; got ", max_iter);
  ops::check_solver_message(solver::mgda_check(int(T), int(solver)), op);
  const int64_t S = gram.size(0);
  at::Tensor w = at::empty({S, T}, gram.options());
  cpu::solve_mgda(gram.data_ptr<double>(), S, int(T), int(solver), int(max_iter), tol,
                  w.data_ptr<double>(), at::get_num_threads());
  return w;
}

at::Tensor solve_pcgrad_cpu(at::Tensor gram, at::Tensor orders) {
  const char* op = "bucketmoo::solve_pcgrad";
  check_cpu(gram, "gram", op);
  const int64_t T = ops::check_gram64(gram, op);
  ops::check_solver_message(solver::pcgrad_check(int(T)), op);
  ops::check_orders(orders, T, gram.device(), op);
  const int64_t* ord = orders.data_ptr<int64_t>();
  ops::check_orders_values(ord, T, op);
  const int64_t S = gram.size(0);
  at::Tensor w = at::empty({S, T}, gram.options());
  cpu::solve_pcgrad(gram.data_ptr<double>(), S, int(T), ord, w.data_ptr<double>(),
                    at::get_num_threads());
  return w;
}

at::Tensor solve_cagrad_cpu(at::Tensor gram, double c, int64_t rescale) {
  const char* op = "bucketmoo::solve_cagrad";
  check_cpu(gram, "gram", op);
  const int64_t T = ops::check_gram64(gram, op);
  ops::check_solver_message(solver::cagrad_check(int(T), c, int(rescale)), op);
  const int64_t S = gram.size(0);
  at::Tensor w = at::empty({S, T}, gram.options());
  cpu::solve_cagrad(gram.data_ptr<double>(), S, int(T), c, int(rescale), w.data_ptr<double>(),
                    at::get_num_threads());
  return w;
}

at::Tensor solve_dual_cone_cpu(at::Tensor gram, int64_t method, double norm_eps, double reg_eps,
                               int64_t max_iter) {
  const char* op = "bucketmoo::solve_dual_cone";
  check_cpu(gram, "gram", op);
  const int64_t T = ops::check_gram64(gram, op);
  const solver::WeightStep spec = ops::dual_cone_spec(T, method, norm_eps, reg_eps, max_iter, op);
  const int64_t S = gram.size(0);
  at::Tensor w = at::empty({S, T}, gram.options());
  cpu::solve_dual_cone(gram.data_ptr<double>(), S, int(T), spec, w.data_ptr<double>(),
                       at::get_num_threads());
  return w;
}

// ops::weight_step, and on the CPU also the values of PCGrad's orders.
solver::WeightStep cpu_weight_step(const std::optional<at::Tensor>& orders,
                                   const std::optional<at::Tensor>& losses, int64_t S, int64_t T,
                                   int64_t method, int64_t solver_code, int64_t max_iter,
                                   double tol, double c, int64_t rescale, int64_t normalization,
                                   bool normalize_weights, const char* op) {
  const solver::WeightStep spec =
      ops::weight_step(orders, losses, S, T, at::Device(at::kCPU), method, solver_code, max_iter,
                       tol, c, rescale, normalization, normalize_weights, op);
  if (spec.orders != nullptr) ops::check_orders_values(spec.orders, T, op);
  return spec;
}

at::Tensor weights_cpu(at::Tensor gram, std::optional<at::Tensor> orders,
                       std::optional<at::Tensor> losses, int64_t method, int64_t solver_code,
                       int64_t max_iter, double tol, double c, int64_t rescale,
                       int64_t normalization, bool normalize_weights) {
  const char* op = "bucketmoo::weights";
  check_cpu(gram, "gram", op);
  const int64_t T = ops::check_gram(gram, at::kFloat, op), S = gram.size(0);
  const solver::WeightStep spec = cpu_weight_step(orders, losses, S, T, method, solver_code, max_iter,
                                                  tol, c, rescale, normalization, normalize_weights, op);
  at::Tensor w = at::empty({S, T}, gram.options());
  cpu::weights(gram.data_ptr<float>(), S, int(T), spec, ops::losses_ptr(losses, spec),
               w.data_ptr<float>(), at::get_num_threads());
  return w;
}

std::tuple<at::Tensor, at::Tensor> fused_cpu(at::Tensor out, std::vector<at::Tensor> grads,
                                             at::Tensor offsets, std::optional<at::Tensor> orders,
                                             std::optional<at::Tensor> losses, int64_t method,
                                             int64_t solver_code, int64_t max_iter, double tol,
                                             double c, int64_t rescale, int64_t normalization,
                                             bool normalize_weights) {
  const char* op = "bucketmoo::fused_";
  const int64_t S = check_grads_offsets(grads, offsets, op);
  const int64_t T = int64_t(grads.size());
  ops::check_out(out, grads[0], op);
  const solver::WeightStep spec = cpu_weight_step(orders, losses, S, T, method, solver_code, max_iter,
                                                  tol, c, rescale, normalization, normalize_weights, op);
  at::Tensor gram = at::empty({S, T, T}, grads[0].options().dtype(at::kFloat));
  at::Tensor w = at::empty({S, T}, grads[0].options().dtype(at::kFloat));
  std::vector<const void*> ptrs = grad_pointers(grads);
  cpu::fused(out.data_ptr(), ptrs.data(), int(T), to_dtype(grads[0].scalar_type()),
             offsets.data_ptr<int64_t>(), S, spec, ops::losses_ptr(losses, spec),
             gram.data_ptr<float>(), w.data_ptr<float>(), at::get_num_threads());
  return {gram, w};
}

}  // namespace
}  // namespace bucketmoo

TORCH_LIBRARY(bucketmoo, m) { bucketmoo::ops::define_ops(m); }

TORCH_LIBRARY_IMPL(bucketmoo, CPU, m) {
  m.impl("gram", &bucketmoo::gram_cpu);
  m.impl("solve_mgda", &bucketmoo::solve_mgda_cpu);
  m.impl("solve_pcgrad", &bucketmoo::solve_pcgrad_cpu);
  m.impl("solve_cagrad", &bucketmoo::solve_cagrad_cpu);
  m.impl("solve_dual_cone", &bucketmoo::solve_dual_cone_cpu);
  m.impl("combine_", &bucketmoo::combine_cpu);
  m.impl("weights", &bucketmoo::weights_cpu);
  m.impl("fused_", &bucketmoo::fused_cpu);
}

// ---- the Python module: importing it registers the ops above; it also says which
// instruction-set variant of the loops runs and whether OpenMP is compiled in.
namespace {

PyObject* py_isa(PyObject*, PyObject*) { return PyUnicode_FromString(bucketmoo::cpu::isa_name()); }

PyObject* py_openmp(PyObject*, PyObject*) {
#ifdef _OPENMP
  Py_RETURN_TRUE;
#else
  Py_RETURN_FALSE;
#endif
}

PyMethodDef kMethods[] = {
    {"isa", py_isa, METH_NOARGS, "Instruction-set variant of the gram/combine loops in use."},
    {"openmp", py_openmp, METH_NOARGS, "Whether the kernels were compiled with OpenMP."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_cpu",
                       "Native CPU kernels of bucketmoo_kernels (registers torch.ops.bucketmoo.*).",
                       -1, kMethods, nullptr, nullptr, nullptr, nullptr};

}  // namespace

PyMODINIT_FUNC PyInit__cpu(void) { return PyModule_Create(&kModule); }
