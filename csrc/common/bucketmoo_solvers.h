// bucketmoo_solvers.h -- per-segment solver math shared by the CPU and CUDA backends.
//
// Plain C++17, torch-free, no dynamic allocation, no exceptions, no std:: containers: every
// function below runs unchanged on the host (g++/clang) and inside one CUDA thread (nvcc),
// where it is marked __host__ __device__ through BUCKETMOO_HD.
//
// ============================== API ==============================================
// Conventions (one segment = one call):
//   gram    const double*  row-major [T, T] Gram matrix M of the segment (float64; the
//                          callers convert the float32 Gram once). It is not modified.
//   w       double*        [T] output weights, in the method's paper scale, exactly as
//                          bucketmoo_kernels/methods/*.py returns them.
//   T       int            number of tasks, 1 <= T <= kMaxTasks (kMaxExactTasks for the
//                          exact solvers). Callers validate T first with the *_check()
//                          functions (they return nullptr when fine, else a message).
//
//   mgda_solve(gram, T, solver, max_iter, tol, w)    solver: kAuto/kClosedForm/kExact/kPgd
//       mgda_closed_form(gram, w)                    T == 2
//       mgda_exact(gram, T, w)                       T <= 8, enumerates the 2^T-1 faces
//       mgda_pgd(gram, T, max_iter, tol, w)          T <= 32, FISTA + adaptive restart
//   pcgrad_solve(gram, T, orders, w)                 orders: int64 [T, T-1] row-major
//   cagrad_solve(gram, T, c, rescale, w)             T <= 8
//   mgda_check(T, solver) / pcgrad_check(T) / cagrad_check(T, c, rescale) -> const char*
//
//   segment_weights(gram32, T, spec, losses, w32)    the whole weight step of one segment,
//       as bucketmoo_kernels/weight_step.py::compute_weights does it: float32 Gram -> float64, optional
//       normalisation (congruence by the scales n_t), the method, w_t / n_t, optional
//       rescale to sum 1, rounded once to float32. spec: WeightStep; method_check(spec, T).
//       = weight_step_prepare + weight_step_method + weight_step_finish.
//
// Numeric contract (bucketmoo_kernels/methods/simplex.py): ridge RIDGE_REL*mean(diag M) +
// RIDGE_ABS on the diagonal; a face candidate is feasible when all weights are finite and
// >= -FEASIBLE_TOL; among candidates whose objective is <= best + TIE_REL*max(diag M, 0)
// the one with the most tasks wins, then the lowest subset bitmask; the pick is clamped at
// 0 and renormalised. Subset k (0-based) is the bitmask k+1, task t is bit t.
//
// Differences from the torch reference that are within rounding only: the face systems are
// solved by Gaussian elimination with partial pivoting on the |A| x |A| subsystem (torch:
// LAPACK on the padded T x T system), and the PGD early stop is decided per segment (torch:
// when the largest move over all segments is <= tol; with tol = 0 both run max_iter).
// ==================================================================================
#pragma once

#include <math.h>
#include <stdint.h>

#if defined(__CUDACC__)
#define BUCKETMOO_HD __host__ __device__ inline
#else
#define BUCKETMOO_HD inline
#endif

namespace bucketmoo {
namespace solver {

// The constants of bucketmoo_kernels/methods/simplex.py (keep in sync; a test checks).
constexpr double kRidgeRel = 1e-9;
constexpr double kRidgeAbs = 1e-200;
constexpr double kTieRel = 1e-10;
constexpr double kFeasibleTol = 1e-9;
constexpr double kTinyF64 = 2.2250738585072014e-308;  // torch.finfo(float64).tiny
constexpr int kMaxExactTasks = 8;   // exact solvers: 2^T - 1 face systems
constexpr int kMaxTasks = 32;       // iterative MGDA (pgd) and PCGrad

enum MgdaSolver : int { kAuto = 0, kClosedForm = 1, kExact = 2, kPgd = 3 };

BUCKETMOO_HD bool is_finite(double x) { return (x - x) == 0.0; }
BUCKETMOO_HD double dmax(double a, double b) { return a > b ? a : b; }

// ---------------------------------------------------------------- validation (host side)
BUCKETMOO_HD int mgda_resolve_solver(int solver, int T) {
  if (solver != kAuto) return solver;
  return T == 2 ? kClosedForm : (T <= kMaxExactTasks ? kExact : kPgd);
}

BUCKETMOO_HD const char* mgda_check(int T, int solver) {
  if (T < 1 || T > kMaxTasks) return "mgda: the native solvers handle 1 <= T <= 32 tasks";
  if (solver < kAuto || solver > kPgd)
    return "mgda: solver must be 0 (auto), 1 (closed_form), 2 (exact) or 3 (pgd)";
  int s = mgda_resolve_solver(solver, T);
  if (T > 1 && s == kClosedForm && T != 2) return "mgda: the closed-form solver needs T = 2 tasks";
  if (s == kExact && T > kMaxExactTasks)
    return "mgda: the exact solver handles at most 8 tasks (use solver=pgd)";
  return nullptr;
}

BUCKETMOO_HD const char* pcgrad_check(int T) {
  return (T < 1 || T > kMaxTasks) ? "pcgrad: the native solver handles 1 <= T <= 32 tasks" : nullptr;
}

BUCKETMOO_HD const char* cagrad_check(int T, double c, int rescale) {
  if (T < 1 || T > kMaxExactTasks) return "cagrad: the native solver handles 1 <= T <= 8 tasks";
  if (!(c >= 0)) return "cagrad: c must be >= 0";
  if (rescale < 0 || rescale > 2) return "cagrad: rescale must be 0, 1 or 2";
  return nullptr;
}

// ---------------------------------------------------------------- shared pieces
// RIDGE_REL * mean(diag M) + RIDGE_ABS
BUCKETMOO_HD double ridge(const double* gram, int T) {
  double s = 0.0;
  for (int t = 0; t < T; ++t) s += gram[t * T + t];
  return kRidgeRel * (s / T) + kRidgeAbs;
}

// max(max(diag M), 0): the tie scale (NaN propagates like torch's amax + clamp_min).
BUCKETMOO_HD double tie_scale(const double* gram, int T) {
  double m = gram[0];
  for (int t = 1; t < T; ++t) {
    double v = gram[t * T + t];
    if (v != v || v > m) m = (m != m) ? m : v;
  }
  return (m != m) ? m : dmax(m, 0.0);
}

// m = gram + ridge * I   (m: [T*T])
BUCKETMOO_HD void add_ridge(const double* gram, int T, double* m) {
  double r = ridge(gram, T);
  for (int i = 0; i < T * T; ++i) m[i] = gram[i];
  for (int t = 0; t < T; ++t) m[t * T + t] += r;
}

BUCKETMOO_HD double quad_form(const double* m, int T, const double* w) {
  double q = 0.0;
  for (int t = 0; t < T; ++t) {
    double row = 0.0;
    for (int u = 0; u < T; ++u) row += m[t * T + u] * w[u];
    q += w[t] * row;
  }
  return q;
}

// Solve M_AA [x | y] = [1_A | b_A] on the face `mask` (nrhs = 1: x only; 2: also y with
// b = rhs2). Gaussian elimination with partial pivoting; outside the face x = y = 0. A zero
// pivot gives NaN (the candidate is then infeasible). T <= kMaxExactTasks.
BUCKETMOO_HD void face_solve(const double* m, int T, unsigned mask, const double* rhs2, int nrhs,
                             double* x, double* y) {
  double a[kMaxExactTasks][kMaxExactTasks];
  double b[kMaxExactTasks][2];
  int idx[kMaxExactTasks];
  int n = 0;
  for (int t = 0; t < T; ++t)
    if (mask & (1u << t)) idx[n++] = t;
  for (int i = 0; i < n; ++i) {
    for (int j = 0; j < n; ++j) a[i][j] = m[idx[i] * T + idx[j]];
    b[i][0] = 1.0;
    b[i][1] = nrhs > 1 ? rhs2[idx[i]] : 0.0;
  }
  bool singular = false;
  for (int k = 0; k < n; ++k) {
    int p = k;
    double best = fabs(a[k][k]);
    for (int i = k + 1; i < n; ++i) {
      double v = fabs(a[i][k]);
      if (v > best) { best = v; p = i; }
    }
    if (!(best > 0.0)) { singular = true; break; }
    if (p != k) {
      for (int j = 0; j < n; ++j) { double tmp = a[k][j]; a[k][j] = a[p][j]; a[p][j] = tmp; }
      for (int r = 0; r < 2; ++r) { double tmp = b[k][r]; b[k][r] = b[p][r]; b[p][r] = tmp; }
    }
    for (int i = k + 1; i < n; ++i) {
      double f = a[i][k] / a[k][k];
      for (int j = k + 1; j < n; ++j) a[i][j] -= f * a[k][j];
      b[i][0] -= f * b[k][0];
      b[i][1] -= f * b[k][1];
    }
  }
  double sol[kMaxExactTasks][2];
  for (int i = n - 1; i >= 0; --i) {
    for (int r = 0; r < 2; ++r) {
      double s = b[i][r];
      for (int j = i + 1; j < n; ++j) s -= a[i][j] * sol[j][r];
      sol[i][r] = singular ? NAN : s / a[i][i];
    }
  }
  for (int t = 0; t < T; ++t) { x[t] = 0.0; if (y) y[t] = 0.0; }
  for (int i = 0; i < n; ++i) {
    x[idx[i]] = sol[i][0];
    if (y) y[idx[i]] = sol[i][1];
  }
}

BUCKETMOO_HD bool feasible(const double* w, int T) {
  for (int t = 0; t < T; ++t)
    if (!is_finite(w[t]) || !(w[t] >= -kFeasibleTol)) return false;
  return true;
}

BUCKETMOO_HD int popcount_u(unsigned v) {
  int c = 0;
  while (v) { c += v & 1u; v >>= 1; }
  return c;
}

// The pick rule of simplex.pick_candidate over K = 2^T - 1 objectives (already +inf where
// infeasible). Returns the chosen subset index k (bitmask k + 1).
BUCKETMOO_HD int pick_index(const double* objective, int T, double scale) {
  const int K = (1 << T) - 1;
  double best = INFINITY;
  for (int k = 0; k < K; ++k) best = objective[k] < best ? objective[k] : best;
  double limit = best + kTieRel * scale;
  int chosen = 0;
  double chosen_score = -2.0;
  for (int k = 0; k < K; ++k) {
    double score = (objective[k] <= limit) ? double(popcount_u(unsigned(k + 1))) * K - k : -1.0;
    if (score > chosen_score) { chosen_score = score; chosen = k; }
  }
  return chosen;
}

// clamp >= 0 and renormalise
BUCKETMOO_HD void clamp_normalise(double* w, int T) {
  double s = 0.0;
  for (int t = 0; t < T; ++t) { w[t] = w[t] > 0.0 ? w[t] : (w[t] != w[t] ? w[t] : 0.0); s += w[t]; }
  for (int t = 0; t < T; ++t) w[t] /= s;
}

// Euclidean projection onto the probability simplex (sort-based; Duchi et al. 2008), in place.
BUCKETMOO_HD void project_to_simplex(double* v, int T) {
  double u[kMaxTasks];
  for (int t = 0; t < T; ++t) u[t] = v[t];
  for (int i = 1; i < T; ++i) {  // insertion sort, descending
    double key = u[i];
    int j = i - 1;
    while (j >= 0 && u[j] < key) { u[j + 1] = u[j]; --j; }
    u[j + 1] = key;
  }
  double css = 0.0, theta_css = u[0] - 1.0;
  int rho = 0;
  for (int k = 0; k < T; ++k) {
    css += u[k];
    double c = css - 1.0;
    if (u[k] - c / double(k + 1) > 0) { rho = k; theta_css = c; }
  }
  double theta = theta_css / double(rho + 1);
  for (int t = 0; t < T; ++t) { double d = v[t] - theta; v[t] = d > 0.0 ? d : 0.0; }
}

// ---------------------------------------------------------------- MGDA
BUCKETMOO_HD void mgda_closed_form(const double* gram, double* w) {
  double m[4];
  add_ridge(gram, 2, m);
  double m11 = m[0], m12 = m[1], m22 = m[3];
  double denom = m11 + m22 - 2 * m12;
  double gamma = denom > 0 ? (m22 - m12) / denom : 0.5;
  gamma = gamma < 0 ? 0.0 : (gamma > 1 ? 1.0 : gamma);  // NaN stays NaN, like torch.clamp
  w[0] = gamma;
  w[1] = 1 - gamma;
}

// w_A = M_AA^{-1} 1 / (1^T M_AA^{-1} 1) for subset index k
BUCKETMOO_HD void mgda_face(const double* m, int T, int k, double* w) {
  face_solve(m, T, unsigned(k + 1), nullptr, 1, w, nullptr);
  double s = 0.0;
  for (int t = 0; t < T; ++t) s += w[t];
  for (int t = 0; t < T; ++t) w[t] /= s;
}

BUCKETMOO_HD void mgda_exact(const double* gram, int T, double* w) {
  double m[kMaxExactTasks * kMaxExactTasks];
  double objective[(1 << kMaxExactTasks) - 1];
  add_ridge(gram, T, m);
  const int K = (1 << T) - 1;
  for (int k = 0; k < K; ++k) {
    mgda_face(m, T, k, w);
    double obj = quad_form(m, T, w);
    objective[k] = (feasible(w, T) && is_finite(obj)) ? obj : INFINITY;
  }
  int chosen = pick_index(objective, T, tie_scale(gram, T));
  mgda_face(m, T, chosen, w);
  clamp_normalise(w, T);
}

// The ridged matrix M + ridge I is never copied: its entries are formed where they are read
// (the same one addition, so the same bits as a copy), so `gram` may live in global or
// shared memory and a GPU thread keeps only the four T-vectors below (no T x T local buffer:
// the driver reserves a thread's local memory for every thread the GPU can hold).
BUCKETMOO_HD double ridged_entry(const double* gram, int T, double r, int t, int u) {
  return t == u ? gram[t * T + u] + r : gram[t * T + u];
}

BUCKETMOO_HD void mgda_pgd(const double* gram, int T, int max_iter, double tol, double* w) {
  const double r = ridge(gram, T);
  double lip = 0.0;
  for (int t = 0; t < T; ++t) {
    double s = 0.0;
    for (int u = 0; u < T; ++u) s += fabs(ridged_entry(gram, T, r, t, u));
    lip = (s > lip || s != s) ? s : lip;
  }
  double step = 1.0 / (lip > kTinyF64 || lip != lip ? lip : kTinyF64);
  double y[kMaxTasks], grad[kMaxTasks], w_next[kMaxTasks];
  for (int t = 0; t < T; ++t) { w[t] = 1.0 / T; y[t] = w[t]; }
  double t_k = 1.0;
  for (int it = 0; it < max_iter; ++it) {
    for (int t = 0; t < T; ++t) {
      double s = 0.0;
      for (int u = 0; u < T; ++u) s += ridged_entry(gram, T, r, t, u) * y[u];
      grad[t] = 2 * s;
    }
    for (int t = 0; t < T; ++t) w_next[t] = y[t] - (step / 2) * grad[t];
    project_to_simplex(w_next, T);
    double t_next = (1 + sqrt(1 + 4 * t_k * t_k)) / 2;
    double dir = 0.0;
    for (int t = 0; t < T; ++t) dir += grad[t] * (w_next[t] - w[t]);
    bool uphill = dir > 0;
    double momentum = uphill ? 0.0 : (t_k - 1) / t_next;
    if (uphill) t_next = 1.0;
    double moved = 0.0;
    for (int t = 0; t < T; ++t) {
      double d = w_next[t] - w[t];
      y[t] = w_next[t] + momentum * d;
      double a = fabs(d);
      moved = (a > moved || a != a) ? a : moved;
      w[t] = w_next[t];
    }
    t_k = t_next;
    if (tol > 0 && it % 50 == 49 && moved <= tol) break;
  }
}

BUCKETMOO_HD void mgda_solve(const double* gram, int T, int solver, int max_iter, double tol,
                             double* w) {
  if (T == 1) { w[0] = 1.0; return; }
  switch (mgda_resolve_solver(solver, T)) {
    case kClosedForm: mgda_closed_form(gram, w); break;
    case kExact: mgda_exact(gram, T, w); break;
    default: mgda_pgd(gram, T, max_iter, tol, w); break;
  }
}

// ---------------------------------------------------------------- PCGrad
// Mean of the projected gradients' coefficients (methods/pcgrad.py); no ridge.
BUCKETMOO_HD void pcgrad_solve(const double* gram, int T, const int64_t* orders, double* w) {
  double coef[kMaxTasks];
  for (int t = 0; t < T; ++t) w[t] = 0.0;
  for (int i = 0; i < T; ++i) {
    for (int t = 0; t < T; ++t) coef[t] = (t == i) ? 1.0 : 0.0;
    for (int o = 0; o < T - 1; ++o) {
      int j = int(orders[i * (T - 1) + o]);
      double dot = 0.0;
      for (int t = 0; t < T; ++t) dot += coef[t] * gram[t * T + j];
      double sq = gram[j * T + j];
      if (dot < 0 && sq > 0) coef[j] -= dot / sq;
    }
    for (int t = 0; t < T; ++t) w[t] += coef[t];
  }
  for (int t = 0; t < T; ++t) w[t] /= T;
}

// ---------------------------------------------------------------- CAGrad
// Candidate on face k for  min a^T w + r |g_w|  (methods/cagrad.py, _cagrad_inner).
BUCKETMOO_HD void cagrad_face(const double* m, int T, int k, const double* a, double radius,
                              double* w) {
  unsigned mask = unsigned(k + 1);
  if (popcount_u(mask) == 1) {
    for (int t = 0; t < T; ++t) w[t] = (mask >> t) & 1u ? 1.0 : 0.0;
    return;
  }
  double y[kMaxExactTasks];
  face_solve(m, T, mask, a, 2, w, y);
  double sx = 0.0, sy = 0.0, ay = 0.0;
  for (int t = 0; t < T; ++t) { sx += w[t]; sy += y[t]; ay += a[t] * y[t]; }
  double disc = sy * sy - sx * (ay - radius * radius);
  double root = sqrt(disc > 0 ? disc : 0.0);
  double lam = (sy + root) / sx;
  for (int t = 0; t < T; ++t) w[t] = disc > 0 ? (lam * w[t] - y[t]) / root : NAN;
}

BUCKETMOO_HD void cagrad_solve(const double* gram, int T, double c, int rescale, double* w) {
  double m[kMaxExactTasks * kMaxExactTasks];
  double a[kMaxExactTasks];
  add_ridge(gram, T, m);
  const double mean_w = 1.0 / T;
  double g0_sq = 0.0;
  for (int t = 0; t < T; ++t) {
    double s = 0.0;
    for (int u = 0; u < T; ++u) s += m[t * T + u] * mean_w;
    a[t] = s;
    g0_sq += s * mean_w;
  }
  double radius = c * sqrt(g0_sq > 0 ? g0_sq : 0.0);
  if (T == 1) {
    w[0] = 1.0;
  } else {
    double objective[(1 << kMaxExactTasks) - 1];
    const int K = (1 << T) - 1;
    for (int k = 0; k < K; ++k) {
      cagrad_face(m, T, k, a, radius, w);
      double quad = quad_form(m, T, w);
      double obj = radius * sqrt(quad > 0 ? quad : 0.0);
      double lin = 0.0;
      for (int t = 0; t < T; ++t) lin += a[t] * w[t];
      obj = lin + obj;
      objective[k] = (feasible(w, T) && is_finite(obj)) ? obj : INFINITY;
    }
    int chosen = pick_index(objective, T, tie_scale(gram, T));
    cagrad_face(m, T, chosen, a, radius, w);
    clamp_normalise(w, T);
  }
  double gw_sq = quad_form(gram, T, w);
  double gw_norm = sqrt(gw_sq > 0 ? gw_sq : 0.0);
  double dmx = tie_scale(gram, T);
  double tiny = 1e-12 * sqrt(dmx);
  double lam = gw_norm > tiny ? radius / gw_norm : 0.0;
  double divisor = rescale == 0 ? 1.0 : (rescale == 1 ? 1.0 + c * c : 1.0 + c);
  for (int t = 0; t < T; ++t) w[t] = (mean_w + lam * w[t]) / divisor;
}

// ---------------------------------------------------------------- the weight step
// Methods and normalisations the native weight step runs (bucketmoo_kernels/weight_step.py,
// WeightStep.native_codes, makes these codes from the method registry; the MGDA solver comes
// already resolved for T, never kAuto, though kAuto is still accepted).
enum Method : int { kMethodMean = 0, kMethodMgda = 1, kMethodPcgrad = 2, kMethodCagrad = 3 };
enum Normalization : int { kNormNone = 0, kNormL2 = 1, kNormLoss = 2, kNormLossL2 = 3 };

struct WeightStep {
  int method = kMethodMgda;
  int solver = kAuto;                // mgda
  int max_iter = 500;                // mgda (pgd)
  double tol = 1e-10;                // mgda (pgd)
  const int64_t* orders = nullptr;   // pcgrad: [T, T-1], validated by the caller
  double c = 0.4;                    // cagrad
  int rescale = 1;                   // cagrad
  int normalization = kNormNone;
  bool normalize_weights = true;     // rescale the weights to sum to 1 (when the sum is > 0)
};

BUCKETMOO_HD bool uses_losses(int normalization) {
  return normalization == kNormLoss || normalization == kNormLossL2;
}

BUCKETMOO_HD const char* method_check(const WeightStep& m, int T) {
  if (m.normalization < kNormNone || m.normalization > kNormLossL2)
    return "normalization must be 0 (none), 1 (l2), 2 (loss) or 3 (loss+)";
  switch (m.method) {
    case kMethodMean:
      return (T < 1 || T > kMaxTasks) ? "mean: the native weight step handles 1 <= T <= 32 tasks"
                                      : nullptr;
    case kMethodMgda:
      if (m.max_iter < 0) return "mgda: max_iter must be >= 0";
      return mgda_check(T, m.solver);
    case kMethodPcgrad:
      return pcgrad_check(T);
    case kMethodCagrad:
      return cagrad_check(T, m.c, m.rescale);
    default:
      return "method must be 0 (mean), 1 (mgda), 2 (pcgrad) or 3 (cagrad)";
  }
}

// The weight step in three parts, so that a caller can run the method its own way (the CUDA
// kernel spreads exact MGDA's faces over a warp) between the first and the last:
//   weight_step_prepare   float32 Gram -> float64 g, normalised by the scales n_t (zero or
//                         NaN -> 1), M_ab / (n_a n_b); returns whether it scaled
//   weight_step_method    the method's weights on g, in its paper scale
//   weight_step_finish    w_t / n_t, rescale to sum 1 (if asked and the sum is > 0), float32
// The same float64 operations, in the same order, as weight_step.compute_weights on the torch side, except
// the final sum, which runs in task order here. g, scale: [T*T] and [T] caller buffers;
// losses: [T] when the normalisation uses them, else ignored.
BUCKETMOO_HD bool weight_step_prepare(const float* gram32, int T, const WeightStep& m,
                                      const double* losses, double* g, double* scale) {
  for (int i = 0; i < T * T; ++i) g[i] = double(gram32[i]);
  if (m.normalization == kNormNone) return false;
  for (int t = 0; t < T; ++t) {
    double s = 1.0;
    if (m.normalization == kNormL2 || m.normalization == kNormLossL2) {
      double d = g[t * T + t];
      s = s * sqrt(d < 0 ? 0.0 : d);
    }
    if (uses_losses(m.normalization)) s = s * losses[t];
    scale[t] = s > 0 ? s : 1.0;
  }
  for (int a = 0; a < T; ++a)
    for (int b = 0; b < T; ++b) g[a * T + b] = g[a * T + b] / (scale[a] * scale[b]);
  return true;
}

BUCKETMOO_HD void weight_step_method(const double* g, int T, const WeightStep& m, double* w) {
  switch (m.method) {
    case kMethodMean:
      for (int t = 0; t < T; ++t) w[t] = 1.0 / T;
      break;
    case kMethodMgda: mgda_solve(g, T, m.solver, m.max_iter, m.tol, w); break;
    case kMethodPcgrad: pcgrad_solve(g, T, m.orders, w); break;
    default: cagrad_solve(g, T, m.c, m.rescale, w); break;
  }
}

BUCKETMOO_HD void weight_step_finish(double* w, int T, const WeightStep& m, bool scaled,
                                     const double* scale, float* w32) {
  if (scaled)
    for (int t = 0; t < T; ++t) w[t] = w[t] / scale[t];
  if (m.normalize_weights) {
    double total = 0.0;
    for (int t = 0; t < T; ++t) total += w[t];
    if (total > 0)
      for (int t = 0; t < T; ++t) w[t] = w[t] / total;
  }
  for (int t = 0; t < T; ++t) w32[t] = float(w[t]);
}

// The non-finite policy of every backend (weight_step.nan_where_not_finite on the torch side): a
// segment whose Gram holds a NaN or an Inf gets NaN weights, so its combined gradient is NaN.
BUCKETMOO_HD void nan_weights_if_not_finite(const float* gram32, int T, float* w32) {
  bool finite = true;
  for (int i = 0; i < T * T; ++i) finite = finite && is_finite(double(gram32[i]));
  if (!finite)
    for (int t = 0; t < T; ++t) w32[t] = float(NAN);
}

// gram32: [T, T] float32 Gram of one segment -> w32: [T] float32 weights (the three parts).
BUCKETMOO_HD void segment_weights(const float* gram32, int T, const WeightStep& m,
                                  const double* losses, float* w32) {
  double g[kMaxTasks * kMaxTasks];
  double scale[kMaxTasks];
  double w[kMaxTasks];
  const bool scaled = weight_step_prepare(gram32, T, m, losses, g, scale);
  weight_step_method(g, T, m, w);
  weight_step_finish(w, T, m, scaled, scale, w32);
  nan_weights_if_not_finite(gram32, T, w32);
}

}  // namespace solver
}  // namespace bucketmoo
