// bucketmoo_ops.h -- the torch.ops.bucketmoo schema and the input checks shared by the CPU
// binding (python/cpu_ops.cpp) and the CUDA binding (python/cuda_ops.cpp).
//
// Schemas (namespace `bucketmoo`; the CPU extension owns the TORCH_LIBRARY block, the CUDA
// extension only adds TORCH_LIBRARY_IMPL(bucketmoo, CUDA, m); bucketmoo_kernels/native.py
// defines the same schemas from Python when only the CUDA extension is present):
//
//   gram(Tensor[] grads, Tensor offsets) -> Tensor
//       grads: T 1-D tensors of length N, one dtype (fp32/bf16/fp16), one device, unit
//       stride; offsets: int64 [S+1] on the grads' device. -> [S, T, T] float32.
//   solve_mgda(Tensor gram, int solver, int max_iter, float tol) -> Tensor
//       gram [S, T, T] float64; solver 0 auto, 1 closed_form, 2 exact, 3 pgd -> [S, T] f64.
//   solve_pcgrad(Tensor gram, Tensor orders) -> Tensor
//       orders int64 [T, T-1] (methods.pcgrad.pcgrad_orders) on the gram's device -> [S, T] f64.
//   solve_cagrad(Tensor gram, float c, int rescale) -> Tensor      (T <= 8) -> [S, T] f64.
//   solve_dual_cone(Tensor gram, int method, float norm_eps, float reg_eps, int max_iter) -> Tensor
//       method 4 (upgrad) or 5 (dualproj), default preference, T <= 16 -> [S, T] f64.
//       The four solve_* ops are not used by the backends (weights runs the whole step);
//       they stay as the tests' float64-in/float64-out handle on the shared solvers, checked
//       against the methods' torch functions at 1e-12 (the float32 weights op cannot be).
//   combine_(Tensor(a!) out, Tensor[] grads, Tensor weights, Tensor offsets) -> ()
//       weights [S, T] float32; out [N] in the grads' dtype; out may be the storage of a grad.
//   weights(Tensor gram, Tensor? orders, Tensor? losses, <method>) -> Tensor
//       gram [S, T, T] float32 -> [S, T] float32: the whole weight step (normalisation,
//       method, rescale; solver::segment_weights). CPU and CUDA.
//   fused_(Tensor(a!) out, Tensor[] grads, Tensor offsets, Tensor? orders, Tensor? losses,
//          <method>) -> (Tensor, Tensor)
//       gram + weights + combine_ in one cache-blocked sweep; returns (gram [S, T, T] f32,
//       weights [S, T] f32). CPU only.
//   <method> = int method, int solver, int max_iter, float tol, float c, int rescale,
//       int normalization, bool normalize_weights   (codes: solver::Method, ::Normalization;
//       made by bucketmoo_kernels.weight_step.WeightStep.native_codes, solver resolved for T;
//       upgrad/dualproj take norm_eps as `tol` and reg_eps as `c`, max_iter as theirs)
//       orders: int64 [T, T-1] (pcgrad) or None; losses: float64 [S, T] (loss, loss+) or None.
//
// Every check throws (TORCH_CHECK -> RuntimeError in Python) before anything is written,
// naming the argument and giving expected vs got.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <vector>

#include "../csrc/common/bucketmoo_solvers.h"

namespace bucketmoo {
namespace ops {

constexpr const char* kGramSchema = "gram(Tensor[] grads, Tensor offsets) -> Tensor";
constexpr const char* kSolveMgdaSchema =
    "solve_mgda(Tensor gram, int solver, int max_iter, float tol) -> Tensor";
constexpr const char* kSolvePcgradSchema = "solve_pcgrad(Tensor gram, Tensor orders) -> Tensor";
constexpr const char* kSolveCagradSchema = "solve_cagrad(Tensor gram, float c, int rescale) -> Tensor";
constexpr const char* kSolveDualConeSchema =
    "solve_dual_cone(Tensor gram, int method, float norm_eps, float reg_eps, int max_iter) -> Tensor";
constexpr const char* kCombineSchema =
    "combine_(Tensor(a!) out, Tensor[] grads, Tensor weights, Tensor offsets) -> ()";

#define BUCKETMOO_METHOD_ARGS                                                              \
  "int method, int solver, int max_iter, float tol, float c, int rescale, int normalization, " \
  "bool normalize_weights"
constexpr const char* kWeightsSchema =
    "weights(Tensor gram, Tensor? orders, Tensor? losses, " BUCKETMOO_METHOD_ARGS ") -> Tensor";
constexpr const char* kFusedSchema =
    "fused_(Tensor(a!) out, Tensor[] grads, Tensor offsets, Tensor? orders, Tensor? losses, "
    BUCKETMOO_METHOD_ARGS ") -> (Tensor, Tensor)";
#undef BUCKETMOO_METHOD_ARGS

inline void define_ops(torch::Library& m) {
  m.def(kGramSchema);
  m.def(kSolveMgdaSchema);
  m.def(kSolvePcgradSchema);
  m.def(kSolveCagradSchema);
  m.def(kSolveDualConeSchema);
  m.def(kCombineSchema);
  m.def(kWeightsSchema);
  m.def(kFusedSchema);
}

// grads: non-empty, 1-D, one supported dtype, one device, one length, unit stride.
inline void check_grads(const std::vector<at::Tensor>& grads, const char* op) {
  TORCH_CHECK(!grads.empty(), op, ": grads must hold at least one task; got an empty list");
  const at::Tensor& g0 = grads[0];
  const auto dtype = g0.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, op,
              ": grads must be float32, bfloat16 or float16; got ", dtype);
  for (size_t t = 0; t < grads.size(); ++t) {
    const at::Tensor& g = grads[t];
    TORCH_CHECK(g.dim() == 1, op, ": grads[", t, "] must be 1-D; got shape ", g.sizes());
    TORCH_CHECK(g.scalar_type() == dtype, op, ": grads[", t, "] has dtype ", g.scalar_type(),
                " but grads[0] has ", dtype, "; all task gradients must share one dtype");
    TORCH_CHECK(g.device() == g0.device(), op, ": grads[", t, "] is on ", g.device(),
                " but grads[0] is on ", g0.device());
    TORCH_CHECK(g.numel() == g0.numel(), op, ": grads[", t, "] has ", g.numel(),
                " elements but grads[0] has ", g0.numel());
    TORCH_CHECK(g.numel() <= 1 || g.stride(0) == 1, op, ": grads[", t,
                "] must have unit stride; got stride ", g.stride(0), " (pass .contiguous())");
  }
}

// offsets: int64 [S+1] on `device`, contiguous (values are checked where they can be read
// without a device sync: check_offsets_values on CPU).
inline void check_offsets(const at::Tensor& offsets, const at::Device& device, const char* op) {
  TORCH_CHECK(offsets.scalar_type() == at::kLong, op, ": offsets must be int64; got ",
              offsets.scalar_type());
  TORCH_CHECK(offsets.dim() == 1 && offsets.numel() >= 2, op,
              ": offsets must be a 1-D tensor of S+1 >= 2 values; got shape ", offsets.sizes());
  TORCH_CHECK(offsets.device() == device, op, ": offsets is on ", offsets.device(),
              " but the gradients are on ", device);
  TORCH_CHECK(offsets.is_contiguous(), op, ": offsets must be contiguous");
}

// Host-readable offsets: start at 0, end at N, non-decreasing.
inline void check_offsets_values(const int64_t* off, int64_t num_segments, int64_t n,
                                 const char* op) {
  TORCH_CHECK(off[0] == 0 && off[num_segments] == n, op, ": offsets must start at 0 and end at N=",
              n, "; got first=", off[0], ", last=", off[num_segments]);
  for (int64_t s = 0; s < num_segments; ++s)
    TORCH_CHECK(off[s] <= off[s + 1], op, ": offsets must be non-decreasing; offsets[", s, "]=",
                off[s], " > offsets[", s + 1, "]=", off[s + 1]);
}

// gram: [S, T, T] of `dtype` (float64 for the solvers, float32 for weights), contiguous.
// Returns T.
inline int64_t check_gram(const at::Tensor& gram, at::ScalarType dtype, const char* op) {
  TORCH_CHECK(gram.scalar_type() == dtype, op, ": gram must be ",
              dtype == at::kDouble ? "float64" : "float32", "; got ", gram.scalar_type());
  TORCH_CHECK(gram.dim() == 3 && gram.size(1) == gram.size(2) && gram.size(1) >= 1, op,
              ": gram must have shape [S, T, T] with T >= 1; got ", gram.sizes());
  TORCH_CHECK(gram.is_contiguous(), op, ": gram must be contiguous");
  return gram.size(1);
}

inline int64_t check_gram64(const at::Tensor& gram, const char* op) {
  return check_gram(gram, at::kDouble, op);
}

// weights: float32 [S, T] contiguous on `device`.
inline void check_weights(const at::Tensor& weights, int64_t num_segments, int64_t num_tasks,
                          const at::Device& device, const char* op) {
  TORCH_CHECK(weights.scalar_type() == at::kFloat, op, ": weights must be float32; got ",
              weights.scalar_type());
  TORCH_CHECK(weights.dim() == 2 && weights.size(0) == num_segments && weights.size(1) == num_tasks,
              op, ": weights must have shape [S, T] = [", num_segments, ", ", num_tasks, "]; got ",
              weights.sizes());
  TORCH_CHECK(weights.device() == device, op, ": weights is on ", weights.device(),
              " but the gradients are on ", device);
  TORCH_CHECK(weights.is_contiguous(), op, ": weights must be contiguous");
}

// out: [N] in the grads' dtype, unit stride, on `device`.
inline void check_out(const at::Tensor& out, const at::Tensor& g0, const char* op) {
  TORCH_CHECK(out.dim() == 1 && out.numel() == g0.numel(), op, ": out must be a 1-D tensor of N=",
              g0.numel(), " elements; got shape ", out.sizes());
  TORCH_CHECK(out.scalar_type() == g0.scalar_type(), op, ": out must have the gradients' dtype ",
              g0.scalar_type(), "; got ", out.scalar_type());
  TORCH_CHECK(out.device() == g0.device(), op, ": out is on ", out.device(),
              " but the gradients are on ", g0.device());
  TORCH_CHECK(out.numel() <= 1 || out.stride(0) == 1, op, ": out must have unit stride; got ",
              out.stride(0));
}

// orders: int64 [T, T-1] on `device`, contiguous.
inline void check_orders(const at::Tensor& orders, int64_t num_tasks, const at::Device& device,
                         const char* op) {
  TORCH_CHECK(orders.scalar_type() == at::kLong, op, ": orders must be int64; got ",
              orders.scalar_type());
  TORCH_CHECK(orders.dim() == 2 && orders.size(0) == num_tasks && orders.size(1) == num_tasks - 1,
              op, ": orders must have shape [T, T-1] = [", num_tasks, ", ", num_tasks - 1, "]; got ",
              orders.sizes());
  TORCH_CHECK(orders.device() == device, op, ": orders is on ", orders.device(),
              " but gram is on ", device);
  TORCH_CHECK(orders.is_contiguous(), op, ": orders must be contiguous");
}

// orders values: row i lists the other tasks (each in [0, T), not i). Host-readable.
inline void check_orders_values(const int64_t* ord, int64_t num_tasks, const char* op) {
  for (int64_t i = 0; i < num_tasks; ++i)
    for (int64_t o = 0; o < num_tasks - 1; ++o) {
      const int64_t j = ord[i * (num_tasks - 1) + o];
      TORCH_CHECK(j >= 0 && j < num_tasks && j != i, op, ": orders[", i, ", ", o,
                  "] must be another task index in [0, T) (not ", i, "); got ", j);
    }
}

inline void check_solver_message(const char* message, const char* op);

// The <method> arguments of weights / fused_ as a solver::WeightStep, checked against T; orders
// and losses must be present exactly where the method / normalisation uses them, with the
// right dtype, shape and device. Their values are not read (on CUDA that would sync).
inline solver::WeightStep weight_step(const std::optional<at::Tensor>& orders,
                                      const std::optional<at::Tensor>& losses, int64_t S,
                                      int64_t T, const at::Device& device, int64_t method,
                                      int64_t solver_code, int64_t max_iter, double tol, double c,
                                      int64_t rescale, int64_t normalization,
                                      bool normalize_weights, const char* op) {
  solver::WeightStep spec;
  spec.method = int(method);
  spec.solver = int(solver_code);
  spec.max_iter = int(max_iter < INT32_MAX ? max_iter : INT32_MAX);
  spec.tol = tol;
  spec.c = c;
  spec.rescale = int(rescale);
  spec.normalization = int(normalization);
  spec.normalize_weights = normalize_weights;
  if (spec.method == solver::kMethodUpgrad || spec.method == solver::kMethodDualproj) {
    spec.norm_eps = tol;  // the schema's two float slots carry the dual-cone options
    spec.reg_eps = c;
  }
  check_solver_message(solver::method_check(spec, int(T)), op);
  if (spec.method == solver::kMethodPcgrad) {
    TORCH_CHECK(orders.has_value(), op, ": method 2 (pcgrad) needs orders [T, T-1]; got None");
    check_orders(*orders, T, device, op);
    spec.orders = orders->data_ptr<int64_t>();
  }
  if (solver::uses_losses(spec.normalization)) {
    TORCH_CHECK(losses.has_value(), op, ": normalization ", normalization,
                " (loss, loss+) needs losses [S, T]; got None");
    const at::Tensor& l = *losses;
    TORCH_CHECK(l.scalar_type() == at::kDouble && l.dim() == 2 && l.size(0) == S &&
                    l.size(1) == T && l.is_contiguous(),
                op, ": losses must be a contiguous float64 [S, T] = [", S, ", ", T,
                "] tensor; got ", l.scalar_type(), " ", l.sizes());
    TORCH_CHECK(l.device() == device, op, ": losses is on ", l.device(), " but the Gram is on ",
                device);
  }
  return spec;
}

// The losses of a spec made by weight_step: their data where the normalisation uses them.
inline const double* losses_ptr(const std::optional<at::Tensor>& losses,
                                const solver::WeightStep& spec) {
  return solver::uses_losses(spec.normalization) ? losses->data_ptr<double>() : nullptr;
}

inline void check_solver_message(const char* message, const char* op) {
  TORCH_CHECK(message == nullptr, op, ": ", message ? message : "");
}

// The arguments of solve_dual_cone as a solver::WeightStep (upgrad or dualproj), checked
// against T; throws naming the bad one.
inline solver::WeightStep dual_cone_spec(int64_t T, int64_t method, double norm_eps,
                                         double reg_eps, int64_t max_iter, const char* op) {
  TORCH_CHECK(method == solver::kMethodUpgrad || method == solver::kMethodDualproj, op,
              ": method must be 4 (upgrad) or 5 (dualproj); got ", method);
  TORCH_CHECK(max_iter >= 0, op, ": max_iter must be >= 0; got ", max_iter);
  solver::WeightStep spec;
  spec.method = int(method);
  spec.max_iter = int(max_iter < INT32_MAX ? max_iter : INT32_MAX);
  spec.norm_eps = norm_eps;
  spec.reg_eps = reg_eps;
  check_solver_message(solver::dual_cone_check(int(T), spec.max_iter, norm_eps, reg_eps), op);
  return spec;
}

}  // namespace ops
}  // namespace bucketmoo
