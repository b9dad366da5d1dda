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
//       mgda_pgd(gram, T, max_iter, tol, chol, w)    T <= 32, FISTA + adaptive restart, then
//                                                    an active-set polish (chol: scratch)
//   pcgrad_solve(gram, T, orders, w)                 orders: int64 [T, T-1] row-major
//   cagrad_solve(gram, T, c, rescale, w)             T <= 8
//   upgrad_solve / dualproj_solve(gram, T, norm_eps, reg_eps, max_iter, w)   T <= 16
//   mgda_check(T, solver) / pcgrad_check(T) / cagrad_check(T, c, rescale) /
//   dual_cone_check(T, max_iter, norm_eps, reg_eps) -> const char*
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
// 0 and renormalised. Subset k (0-based) is the bitmask k+1, task t is bit t. UPGrad and
// DualProj follow methods/dual_cone.py instead (their own ridge reg_eps on the trace-normalised
// Gram, a strictly convex QP with one minimiser: no ties to break; a zero segment gets u).
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

// The polish after PGD (methods/mgda.py, mgda_polish): primal active-set steps on the simplex
// QP from the PGD iterate, at most mgda_polish_steps(T); the same rule, step and stop as the
// torch function (its face solve is LAPACK's LU of the padded T x T system, here a Cholesky
// factor of M_FF: the same point up to rounding).
constexpr double kMgdaKktTol = 1e-13;  // mgda.MGDA_KKT_TOL
BUCKETMOO_HD int mgda_polish_steps(int T) { return 2 * T + 4; }

// x = (M + r I)_FF^{-1} 1_F on the free set F (free[t]), 0 elsewhere, by a packed Cholesky
// factor in `chol` ([T (T + 1) / 2] scratch); a non-positive or NaN pivot gives NaN.
BUCKETMOO_HD void mgda_face_solve(const double* gram, int T, double r, const bool* free,
                                  double* chol, double* x) {
  int idx[kMaxTasks];
  int n = 0;
  for (int t = 0; t < T; ++t) {
    x[t] = 0.0;
    if (free[t]) idx[n++] = t;
  }
  for (int i = 0; i < n; ++i) {  // L packed by rows: L[i][j] = chol[i (i + 1) / 2 + j]
    for (int j = 0; j <= i; ++j) {
      double v = ridged_entry(gram, T, r, idx[i], idx[j]);
      for (int k = 0; k < j; ++k) v -= chol[i * (i + 1) / 2 + k] * chol[j * (j + 1) / 2 + k];
      if (j < i) {
        chol[i * (i + 1) / 2 + j] = v / chol[j * (j + 1) / 2 + j];
      } else if (v > 0.0 && is_finite(v)) {
        chol[i * (i + 1) / 2 + i] = sqrt(v);
      } else {
        for (int k = 0; k < n; ++k) x[idx[k]] = NAN;
        return;
      }
    }
  }
  // L z = 1, then L^T x_F = z (z kept in x's slots idx[i]: each is written once per pass).
  for (int i = 0; i < n; ++i) {
    double v = 1.0;
    for (int k = 0; k < i; ++k) v -= chol[i * (i + 1) / 2 + k] * x[idx[k]];
    x[idx[i]] = v / chol[i * (i + 1) / 2 + i];
  }
  for (int i = n - 1; i >= 0; --i) {
    double v = x[idx[i]];
    for (int k = i + 1; k < n; ++k) v -= chol[k * (k + 1) / 2 + i] * x[idx[k]];
    x[idx[i]] = v / chol[i * (i + 1) / 2 + i];
  }
}

// w: a point of the simplex in, the polished weights out (clamped, renormalised).
BUCKETMOO_HD void mgda_polish(const double* gram, int T, double r, double scale, double* chol,
                              double* w) {
  bool free[kMaxTasks];
  double y[kMaxTasks];
  for (int t = 0; t < T; ++t) free[t] = w[t] > 0.0;
  const double limit = kMgdaKktTol * scale;
  const int steps = mgda_polish_steps(T);
  for (int step = 0; step < steps; ++step) {
    mgda_face_solve(gram, T, r, free, chol, y);
    double sum = 0.0;
    for (int t = 0; t < T; ++t) sum += y[t];
    bool usable = true, inside = true;
    for (int t = 0; t < T; ++t) {
      y[t] = y[t] / sum;
      usable = usable && is_finite(y[t]);
      inside = inside && !(free[t] && y[t] <= 0.0);
    }
    if (!usable) break;
    if (inside) {
      // (M y)_t is formed twice (for y^T M y, then per task) rather than kept: one T-vector
      // less in the thread (CUDA local memory).
      double value = 0.0;
      for (int t = 0; t < T; ++t) {
        double g = 0.0;
        for (int u = 0; u < T; ++u) g += ridged_entry(gram, T, r, t, u) * y[u];
        value += g * y[t];
      }
      double worst = 0.0, best = -INFINITY;
      int enter = 0;
      for (int t = 0; t < T; ++t) {
        w[t] = y[t];
        double g = 0.0;
        for (int u = 0; u < T && !free[t]; ++u) g += ridged_entry(gram, T, r, t, u) * y[u];
        const double gap = free[t] ? 0.0 : value - g;
        worst = (gap > worst || gap != gap) ? gap : worst;
        const double violation = free[t] ? 0.0 : gap / ridged_entry(gram, T, r, t, t);
        if (violation > best) { best = violation; enter = t; }
      }
      if (worst <= limit) break;  // KKT point
      free[enter] = true;
    } else {
      double alpha = INFINITY;
      int leave = 0;
      for (int t = 0; t < T; ++t) {
        const double ratio = (free[t] && y[t] <= 0.0) ? w[t] / (w[t] - y[t]) : INFINITY;
        if (ratio < alpha) { alpha = ratio; leave = t; }
      }
      for (int t = 0; t < T; ++t) {
        const double stepped = free[t] ? w[t] + alpha * (y[t] - w[t]) : 0.0;
        const bool left = t == leave || !(stepped > 0.0);
        w[t] = left ? 0.0 : stepped;
        free[t] = free[t] && !left;
      }
    }
  }
  clamp_normalise(w, T);
}

// chol: [T (T + 1) / 2] scratch for the polish's face solves.
BUCKETMOO_HD void mgda_pgd(const double* gram, int T, int max_iter, double tol, double* chol,
                           double* w) {
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
  mgda_polish(gram, T, r, tie_scale(gram, T), chol, w);
}

BUCKETMOO_HD void mgda_solve(const double* gram, int T, int solver, int max_iter, double tol,
                             double* w) {
  if (T == 1) { w[0] = 1.0; return; }
  switch (mgda_resolve_solver(solver, T)) {
    case kClosedForm: mgda_closed_form(gram, w); break;
    case kExact: mgda_exact(gram, T, w); break;
    default: {
      double chol[kMaxTasks * (kMaxTasks + 1) / 2];
      mgda_pgd(gram, T, max_iter, tol, chol, w);
      break;
    }
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

// cagrad_solve in three parts, so that a caller can run the face loop its own way (the CUDA
// weight step spreads the faces over a warp, m and a in shared memory) between them:
//   cagrad_setup      m = gram + ridge I, a = m 1/T; returns the radius c |g_0|
//   cagrad_objective  face k's candidate (left in w) and its objective (+inf if infeasible)
//   cagrad_finish     the chosen simplex point w -> the CAGrad weights, in place
// m: [T*T], a: [T] caller buffers.
BUCKETMOO_HD double cagrad_setup(const double* gram, int T, double c, double* m, double* a) {
  add_ridge(gram, T, m);
  const double mean_w = 1.0 / T;
  double g0_sq = 0.0;
  for (int t = 0; t < T; ++t) {
    double s = 0.0;
    for (int u = 0; u < T; ++u) s += m[t * T + u] * mean_w;
    a[t] = s;
    g0_sq += s * mean_w;
  }
  return c * sqrt(g0_sq > 0 ? g0_sq : 0.0);
}

BUCKETMOO_HD double cagrad_objective(const double* m, int T, int k, const double* a, double radius,
                                     double* w) {
  cagrad_face(m, T, k, a, radius, w);
  double quad = quad_form(m, T, w);
  double obj = radius * sqrt(quad > 0 ? quad : 0.0);
  double lin = 0.0;
  for (int t = 0; t < T; ++t) lin += a[t] * w[t];
  obj = lin + obj;
  return (feasible(w, T) && is_finite(obj)) ? obj : INFINITY;
}

BUCKETMOO_HD void cagrad_finish(const double* gram, int T, double c, int rescale, double radius,
                                double* w) {
  const double mean_w = 1.0 / T;
  double gw_sq = quad_form(gram, T, w);
  double gw_norm = sqrt(gw_sq > 0 ? gw_sq : 0.0);
  double dmx = tie_scale(gram, T);
  double tiny = 1e-12 * sqrt(dmx);
  double lam = gw_norm > tiny ? radius / gw_norm : 0.0;
  double divisor = rescale == 0 ? 1.0 : (rescale == 1 ? 1.0 + c * c : 1.0 + c);
  for (int t = 0; t < T; ++t) w[t] = (mean_w + lam * w[t]) / divisor;
}

BUCKETMOO_HD void cagrad_solve(const double* gram, int T, double c, int rescale, double* w) {
  double m[kMaxExactTasks * kMaxExactTasks];
  double a[kMaxExactTasks];
  const double radius = cagrad_setup(gram, T, c, m, a);
  if (T == 1) {
    w[0] = 1.0;
  } else {
    double objective[(1 << kMaxExactTasks) - 1];
    const int K = (1 << T) - 1;
    for (int k = 0; k < K; ++k) objective[k] = cagrad_objective(m, T, k, a, radius, w);
    int chosen = pick_index(objective, T, tie_scale(gram, T));
    cagrad_face(m, T, chosen, a, radius, w);
    clamp_normalise(w, T);
  }
  cagrad_finish(gram, T, c, rescale, radius, w);
}

// ---------------------------------------------------------------- UPGrad / DualProj
// Projections onto the dual cone of the task gradients (methods/dual_cone.py): for each
// preference vector u, v = u + x with x = argmin 1/2 x^T A x + b^T x, x >= 0, where
// A = G / trace(G) + reg_eps I (the G part zero when trace(G) <= norm_eps, NaN included) and
// b = A u. DualProj: one projection, u = 1/T; weights v. UPGrad: T projections, u = e_i / T;
// weights sum_i v_i. The default preference (1/T) only: a caller's pref_vector runs in torch.
//
// The QP (dual_cone_qp) is solved as batched_solvers.nonneg_qp solves it, with the same
// residual, stopping tolerance and candidate rule, so both land on the same unique minimiser
// (A is positive definite for reg_eps > 0, which the Python side requires before it runs this
// natively): primal-dual active-set steps (Hintermueller, Ito & Kunisch 2002) from x = 0, each
// an equality solve on the free set by Cholesky of A_FF (packed, no pivoting: A_FF is SPD;
// a non-positive pivot makes the candidate infeasible), then rounds of kDualConeChunk projected
// Gauss-Seidel sweeps (the torch function runs FISTA iterations there) followed by T + 2
// active-set steps from the iterate. Per segment the candidate of least natural KKT residual
// is kept; it stops once that residual is <= kDualConeTol or after max_iter sweeps (a bound
// on the work, fixed for given T and max_iter; no allocation, no host sync).
constexpr int kMaxDualConeTasks = 16;   // packed Cholesky factor: T (T + 1) / 2 doubles
constexpr double kDualConeTol = 1e-12;  // batched_solvers.nonneg_qp: tol
constexpr int kDualConeChunk = 25;      // sweeps per round (nonneg_qp: chunk)

BUCKETMOO_HD const char* dual_cone_check(int T, int max_iter, double norm_eps, double reg_eps) {
  if (T < 1 || T > kMaxDualConeTasks)
    return "upgrad/dualproj: the native solver handles 1 <= T <= 16 tasks";
  if (max_iter < 0) return "upgrad/dualproj: max_iter must be >= 0";
  if (!(norm_eps >= 0)) return "upgrad/dualproj: norm_eps must be >= 0";
  if (!(reg_eps > 0)) return "upgrad/dualproj: the native solver needs reg_eps > 0";
  return nullptr;
}

// The QP's matrix A, formed entry by entry where it is read (no T x T copy): the same
// operations as dual_cone.regularised_gram, (G_tu / trace) + reg_eps [t == u].
struct DualConeMatrix {
  const double* g;
  int T;
  double trace;  // 1 when the G part is dropped (keep == false)
  bool keep;
  double reg;
  BUCKETMOO_HD double operator()(int t, int u) const {
    const double normed = keep ? g[t * T + u] / trace : 0.0;
    return normed + (t == u ? reg : 0.0);
  }
};

BUCKETMOO_HD DualConeMatrix dual_cone_matrix(const double* g, int T, double norm_eps, double reg_eps) {
  double trace = 0.0;
  for (int t = 0; t < T; ++t) trace += g[t * T + t];
  const bool keep = trace > norm_eps;
  return DualConeMatrix{g, T, keep ? trace : 1.0, keep, reg_eps};
}

// grad = A x + b
BUCKETMOO_HD void dual_cone_gradient(const DualConeMatrix& a, const double* b, const double* x,
                                     double* grad) {
  for (int t = 0; t < a.T; ++t) {
    double s = 0.0;
    for (int u = 0; u < a.T; ++u) s += a(t, u) * x[u];
    grad[t] = s + b[t];
  }
}

// nonneg_qp_residual: max_i |x_i - max(0, x_i - grad_i / A_ii)| / max(1, max_i |x_i|), at x
// clamped at 0 (x is finite and >= 0 where this is called).
BUCKETMOO_HD double dual_cone_residual(const DualConeMatrix& a, const double* b, const double* x) {
  double grad[kMaxDualConeTasks];
  dual_cone_gradient(a, b, x, grad);
  double res = 0.0, big = 1.0;
  for (int t = 0; t < a.T; ++t) {
    double d = a(t, t);
    d = d > kTinyF64 ? d : kTinyF64;  // clamp_min(tiny); NaN stays NaN
    const double stepped = x[t] - grad[t] / d;
    const double r = fabs(x[t] - (stepped > 0.0 ? stepped : (stepped != stepped ? stepped : 0.0)));
    res = (r > res || r != r) ? r : res;
    const double ax = fabs(x[t]);
    big = ax > big ? ax : big;
  }
  return res / big;
}

// y solves A_FF y_F = -b_F on the free set F (free[t]), y = 0 elsewhere, by a packed
// Cholesky factor of A_FF; a non-positive or NaN pivot gives y_F = NaN. Returns |F|.
BUCKETMOO_HD int dual_cone_free_solve(const DualConeMatrix& a, const double* b, const bool* free,
                                      double* y) {
  const int T = a.T;
  double chol[kMaxDualConeTasks * (kMaxDualConeTasks + 1) / 2];
  double z[kMaxDualConeTasks];
  int idx[kMaxDualConeTasks];
  int n = 0;
  for (int t = 0; t < T; ++t) {
    y[t] = 0.0;
    if (free[t]) idx[n++] = t;
  }
  // A_FF = L L^T, L packed by rows: L[i][j] = chol[i (i + 1) / 2 + j], j <= i.
  for (int i = 0; i < n; ++i) {
    for (int j = 0; j <= i; ++j) {
      double v = a(idx[i], idx[j]);
      for (int k = 0; k < j; ++k) v -= chol[i * (i + 1) / 2 + k] * chol[j * (j + 1) / 2 + k];
      if (j < i) {
        chol[i * (i + 1) / 2 + j] = v / chol[j * (j + 1) / 2 + j];
      } else if (v > 0.0 && is_finite(v)) {
        chol[i * (i + 1) / 2 + i] = sqrt(v);
      } else {
        for (int k = 0; k < n; ++k) y[idx[k]] = NAN;
        return n;
      }
    }
  }
  for (int i = 0; i < n; ++i) {  // L z = -b_F
    double v = -b[idx[i]];
    for (int k = 0; k < i; ++k) v -= chol[i * (i + 1) / 2 + k] * z[k];
    z[i] = v / chol[i * (i + 1) / 2 + i];
  }
  for (int i = n - 1; i >= 0; --i) {  // L^T y_F = z
    double v = z[i];
    for (int k = i + 1; k < n; ++k) v -= chol[k * (k + 1) / 2 + i] * z[k];
    z[i] = v / chol[i * (i + 1) / 2 + i];
  }
  for (int i = 0; i < n; ++i) y[idx[i]] = z[i];
  return n;
}

// One primal-dual active-set step from x (nonneg_qp's _active_set_step): free set
// F = {x_i A_ii > (A x + b)_i}, y = the free-set solve on F.
BUCKETMOO_HD void dual_cone_active_set_step(const DualConeMatrix& a, const double* b,
                                            const double* x, double* y) {
  double mu[kMaxDualConeTasks];
  bool free[kMaxDualConeTasks];
  dual_cone_gradient(a, b, x, mu);
  for (int t = 0; t < a.T; ++t) free[t] = x[t] * a(t, t) > mu[t];
  dual_cone_free_solve(a, b, free, y);
}

// Primal active-set steps (Lawson & Hanson's NNLS order, for a QP) from a feasible x >= 0,
// in place: solve on the free set; if that point is feasible, move there and free the bound
// coordinate whose KKT violation -grad_j / A_jj is largest (above kDualConeTol times
// max(1, max x): below it the point already meets the stop rule); else step towards it up to
// the first bound that blocks and fix that coordinate at 0. The objective never increases,
// so where the primal-dual steps cycle (ill-conditioned, rank-deficient Grams) this still
// gets to the minimiser; `steps` bounds it.
BUCKETMOO_HD void dual_cone_primal_active_set(const DualConeMatrix& a, const double* b, int steps,
                                              double* x) {
  const int T = a.T;
  bool free[kMaxDualConeTasks];
  double y[kMaxDualConeTasks], grad[kMaxDualConeTasks];
  for (int t = 0; t < T; ++t) free[t] = x[t] > 0.0;
  for (int step = 0; step < steps; ++step) {
    dual_cone_free_solve(a, b, free, y);
    bool finite = true, inside = true;
    for (int t = 0; t < T; ++t) {
      finite = finite && is_finite(y[t]);
      inside = inside && !(free[t] && y[t] <= 0.0);
    }
    if (!finite) return;
    if (inside) {
      double big = 1.0;
      for (int t = 0; t < T; ++t) {
        x[t] = y[t];
        big = x[t] > big ? x[t] : big;
      }
      dual_cone_gradient(a, b, x, grad);
      int enter = -1;
      double worst = kDualConeTol * big;
      for (int t = 0; t < T; ++t) {
        const double violation = free[t] ? 0.0 : -grad[t] / a(t, t);
        if (violation > worst) { worst = violation; enter = t; }
      }
      if (enter < 0) return;  // KKT point
      free[enter] = true;
    } else {
      double alpha = 1.0;
      int leave = -1;
      for (int t = 0; t < T; ++t) {
        if (free[t] && y[t] <= 0.0) {
          const double r = x[t] / (x[t] - y[t]);
          if (r < alpha || leave < 0) { alpha = r < alpha ? r : alpha; leave = t; }
        }
      }
      for (int t = 0; t < T; ++t) {
        if (!free[t]) continue;
        x[t] = x[t] + alpha * (y[t] - x[t]);
        if (t == leave || !(x[t] > 0.0)) { x[t] = 0.0; free[t] = false; }
      }
    }
  }
}

// x = argmin 1/2 x^T A x + b^T x, x >= 0 (see above). x: [T] output.
BUCKETMOO_HD void dual_cone_qp(const DualConeMatrix& a, const double* b, int max_iter, double* x) {
  const int T = a.T;
  double it[kMaxDualConeTasks];    // the Gauss-Seidel iterate
  double grad[kMaxDualConeTasks];  // A it + b during a round of sweeps
  double cand[kMaxDualConeTasks], next[kMaxDualConeTasks];
  for (int t = 0; t < T; ++t) { it[t] = 0.0; x[t] = 0.0; }
  double best_res = dual_cone_residual(a, b, x);  // x holds the best candidate so far
  const int polish_steps = T + 2;
  int done = 0;
  for (;;) {  // at most ceil(max_iter / kDualConeChunk) + 1 rounds
    for (int t = 0; t < T; ++t) cand[t] = it[t];
    for (int k = 0; k <= polish_steps + 1; ++k) {
      if (k > 0 && k <= polish_steps) {
        dual_cone_active_set_step(a, b, cand, next);
        for (int t = 0; t < T; ++t) cand[t] = next[t];
      } else if (k > polish_steps) {  // the primal-dual steps did not settle it
        for (int t = 0; t < T; ++t) cand[t] = x[t];
        dual_cone_primal_active_set(a, b, 3 * T + 8, cand);
      }
      bool feasible = true;
      for (int t = 0; t < T; ++t) feasible = feasible && is_finite(cand[t]) && cand[t] >= 0.0;
      if (feasible) {
        const double res = dual_cone_residual(a, b, cand);
        if (res < best_res) {
          best_res = res;
          for (int t = 0; t < T; ++t) x[t] = cand[t];
        }
      }
      for (int t = 0; t < T; ++t)
        if (!is_finite(cand[t])) cand[t] = x[t];
      if (best_res <= kDualConeTol) return;
    }
    if (done >= max_iter) return;
    const int sweeps = max_iter - done < kDualConeChunk ? max_iter - done : kDualConeChunk;
    dual_cone_gradient(a, b, it, grad);
    for (int sweep = 0; sweep < sweeps; ++sweep) {
      for (int i = 0; i < T; ++i) {  // projected Gauss-Seidel: exact minimisation in x_i
        const double d = a(i, i);
        double xi = it[i] - grad[i] / d;
        xi = xi > 0.0 ? xi : 0.0;
        const double delta = xi - it[i];
        if (delta != 0.0 && is_finite(delta)) {
          it[i] = xi;
          for (int t = 0; t < T; ++t) grad[t] += a(t, i) * delta;
        }
      }
    }
    done += sweeps;
  }
}

// v = u + argmin over the dual cone (see above) for the preference u: [T]. v: [T] output.
BUCKETMOO_HD void dual_cone_project(const DualConeMatrix& a, const double* u, int max_iter, double* v) {
  const int T = a.T;
  double b[kMaxDualConeTasks] = {};
  for (int t = 0; t < T; ++t) {
    double s = 0.0;
    for (int k = 0; k < T; ++k) s += a(t, k) * u[k];
    b[t] = s;
  }
  dual_cone_qp(a, b, max_iter, v);
  for (int t = 0; t < T; ++t) v[t] = u[t] + v[t];
}

// DualProj weights (default preference 1/T): the projection of the mean direction.
BUCKETMOO_HD void dualproj_solve(const double* gram, int T, double norm_eps, double reg_eps,
                                 int max_iter, double* w) {
  const DualConeMatrix a = dual_cone_matrix(gram, T, norm_eps, reg_eps);
  double u[kMaxDualConeTasks];
  for (int t = 0; t < T; ++t) u[t] = 1.0 / T;
  dual_cone_project(a, u, max_iter, w);
}

// UPGrad's projection i: v = u + x for u = e_i / T. (The CUDA weight step runs projection i
// on lane i of a warp and sums them on lane 0 in the order below.)
BUCKETMOO_HD void upgrad_projection(const DualConeMatrix& a, int i, int max_iter, double* v) {
  double u[kMaxDualConeTasks];
  for (int t = 0; t < a.T; ++t) u[t] = t == i ? 1.0 / a.T : 0.0;
  dual_cone_project(a, u, max_iter, v);
}

// UPGrad weights (default preference 1/T): the sum of the T projections, in task order
// (w_t = ((0 + v_0t) + v_1t) + ...).
BUCKETMOO_HD void upgrad_solve(const double* gram, int T, double norm_eps, double reg_eps,
                               int max_iter, double* w) {
  const DualConeMatrix a = dual_cone_matrix(gram, T, norm_eps, reg_eps);
  double v[kMaxDualConeTasks];
  for (int t = 0; t < T; ++t) w[t] = 0.0;
  for (int i = 0; i < T; ++i) {
    upgrad_projection(a, i, max_iter, v);
    for (int t = 0; t < T; ++t) w[t] += v[t];
  }
}

// ---------------------------------------------------------------- the weight step
// Methods and normalisations the native weight step runs (bucketmoo_kernels/weight_step.py,
// WeightStep.native_codes, makes these codes from the method registry; the MGDA solver comes
// already resolved for T, never kAuto, though kAuto is still accepted).
enum Method : int {
  kMethodMean = 0, kMethodMgda = 1, kMethodPcgrad = 2, kMethodCagrad = 3, kMethodUpgrad = 4,
  kMethodDualproj = 5
};
enum Normalization : int { kNormNone = 0, kNormL2 = 1, kNormLoss = 2, kNormLossL2 = 3 };

struct WeightStep {
  int method = kMethodMgda;
  int solver = kAuto;                // mgda
  int max_iter = 500;                // mgda (pgd)
  double tol = 1e-10;                // mgda (pgd)
  const int64_t* orders = nullptr;   // pcgrad: [T, T-1], validated by the caller
  double c = 0.4;                    // cagrad
  int rescale = 1;                   // cagrad
  double norm_eps = 0.0;             // upgrad, dualproj (the ops pass it as `tol`)
  double reg_eps = 1e-4;             // upgrad, dualproj (the ops pass it as `c`)
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
    case kMethodUpgrad:
    case kMethodDualproj:
      return dual_cone_check(T, m.max_iter, m.norm_eps, m.reg_eps);
    default:
      return "method must be 0 (mean), 1 (mgda), 2 (pcgrad), 3 (cagrad), 4 (upgrad) or 5 (dualproj)";
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
    case kMethodUpgrad: upgrad_solve(g, T, m.norm_eps, m.reg_eps, m.max_iter, w); break;
    case kMethodDualproj: dualproj_solve(g, T, m.norm_eps, m.reg_eps, m.max_iter, w); break;
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
