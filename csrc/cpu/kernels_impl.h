// kernels_impl.h -- the per-chunk loops of the CPU gram and combine, compiled once per
// instruction-set variant (kernels_baseline.cpp, kernels_avx2.cpp, kernels_avx512.cpp). Each
// includer defines BUCKETMOO_ISA_NS to a distinct namespace so the variants never merge at link
// time, BUCKETMOO_ISA_AVX2 to 1 where AVX2, FMA and F16C (half <-> float) intrinsics may be
// used, and BUCKETMOO_ISA_AVX512 to 1 where AVX-512 F/VL/BW/DQ ones may be used as well.
//
// No std:: calls in here (only builtins, GCC vector extensions and intrinsics): an inline std
// function instantiated under a `#pragma GCC target` could otherwise be picked by the linker
// for the baseline variant.
//
// The summation order is fixed by the source, not by the vector width the compiler picks:
// the gram keeps kLanes = 8 lanes per pair accumulator for every T, lane l summing the
// elements at l (mod 8) from the chunk's start in element order, the lanes added in order at
// the end. The lanes are one zmm register in the AVX-512 variant, two 4-double vectors (v4d)
// elsewhere: two ymm registers under AVX2, four xmm on the baseline. Every product of two
// fp32/bf16/fp16 values (and of a float32 weight and such a value) is exact in float64, so
// FMA contraction never changes a bit either: all variants give the same results.
//
// The loops are templates over the source type (F32, BF16, FP16): no dtype branch inside a
// loop, so the conversions vectorise (F16C for float16 in the AVX2 variant).
//
// The tiled gram (T <= 8) sums each pair exactly as the generic loop does; the grouping of
// the pairs into register tiles (which may differ per variant) never changes a result.
#ifndef BUCKETMOO_ISA_NS
#error "define BUCKETMOO_ISA_NS before including kernels_impl.h"
#endif
#ifndef BUCKETMOO_ISA_AVX2
#define BUCKETMOO_ISA_AVX2 0
#endif
#ifndef BUCKETMOO_ISA_AVX512
#define BUCKETMOO_ISA_AVX512 0
#endif
#if BUCKETMOO_ISA_AVX512 && !BUCKETMOO_ISA_AVX2
#error "BUCKETMOO_ISA_AVX512 needs BUCKETMOO_ISA_AVX2"
#endif

namespace bucketmoo {
namespace cpu {
namespace BUCKETMOO_ISA_NS {

// Lanes of every pair accumulator of the gram (any T, every variant): with 8, one zmm holds
// a pair and T = 3, 4 still have enough independent FMA chains on AVX-512.
constexpr int kLanes = 8;
constexpr int kBlock = 256;  // elements per combine / generic-gram block (multiple of kLanes)
// Elements per block of the tiled gram: T rows of it (at most 8 KiB) stay in L1 while every
// register tile sweeps it. A multiple of 8.
constexpr int kGramBlock = 256;

typedef double v4d __attribute__((vector_size(32)));
typedef float v4f __attribute__((vector_size(16)));
typedef uint16_t v4u16 __attribute__((vector_size(8)));
typedef uint32_t v4u32 __attribute__((vector_size(16)));

inline float bits_to_float(uint32_t u) { float f; __builtin_memcpy(&f, &u, 4); return f; }
inline uint32_t float_to_bits(float f) { uint32_t u; __builtin_memcpy(&u, &f, 4); return u; }
// (Vectors are passed by reference only: by value they would change the baseline's ABI.)
inline void load4(v4d& v, const double* p) { __builtin_memcpy(&v, p, sizeof v); }
inline void store4(double* p, const v4d& v) { __builtin_memcpy(p, &v, sizeof v); }

// ---- source types of the loops (compile time)
struct F32 { using Elem = float; static constexpr DType dtype = DType::kFloat32; };
struct BF16 { using Elem = uint16_t; static constexpr DType dtype = DType::kBFloat16; };
struct FP16 { using Elem = uint16_t; static constexpr DType dtype = DType::kFloat16; };

// ---- exact scalar conversions to float
inline float to_float(F32, float x) { return x; }
inline float to_float(BF16, uint16_t h) { return bits_to_float(uint32_t(h) << 16); }
// IEEE half -> float, branch-free; half subnormals via an exact int->float product so that a
// DAZ/FTZ floating-point mode cannot zero them. (The F16C instruction is exact and ignores
// DAZ as well, so both give the same bits.)
inline float to_float(FP16, uint16_t h16) {
  uint32_t h = h16;
  uint32_t sign = (h & 0x8000u) << 16;
  uint32_t em = h & 0x7fffu;
  float normal = bits_to_float(em << 13) * 0x1p112f;
  float sub = float(int(em)) * 0x1p-24f;
  float mag = em < 0x0400u ? sub : normal;
  uint32_t bits = float_to_bits(mag);
  bits = em >= 0x7c00u ? ((em << 13) | 0x7f800000u) : bits;
  return bits_to_float(bits | sign);
}

// ---- stores (round to nearest even, NaN kept NaN; same results as c10's conversions)
inline uint16_t to_bf16(float f) {
  uint32_t u = float_to_bits(f);
  uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return (f != f) ? uint16_t(0x7fc0u) : uint16_t(rounded);
}
inline uint16_t to_fp16(float f) {
  uint32_t u = float_to_bits(f);
  uint32_t sign = u & 0x80000000u;
  u ^= sign;
  // |f| >= 65536 (or inf/nan): inf, or a quiet NaN
  uint32_t big = u > 0x7f800000u ? 0x7e00u : 0x7c00u;
  // |f| < 2^-14: subnormal half via the magic-number add (rounds to nearest even)
  const uint32_t denorm_magic = ((127u - 15u) + (23u - 10u) + 1u) << 23;
  uint32_t small = float_to_bits(bits_to_float(u) + bits_to_float(denorm_magic)) - denorm_magic;
  // normal: rebias and round the mantissa to nearest even
  uint32_t mant_odd = (u >> 13) & 1u;
  uint32_t normal = (u + (uint32_t(15 - 127) << 23) + 0xfffu + mant_odd) >> 13;
  uint32_t o = u >= 0x47800000u ? big : (u < (113u << 23) ? small : normal);
  return uint16_t(o | (sign >> 16));
}

// ---- vector loads: 4 consecutive elements as 4 doubles (exact)
template <class D>
inline void load4(v4d& v, const typename D::Elem* p) {
  v4f f;
  if constexpr (D::dtype == DType::kFloat32) {
    __builtin_memcpy(&f, p, sizeof f);
  } else if constexpr (D::dtype == DType::kBFloat16) {
#if BUCKETMOO_ISA_AVX2
    const __m128i h = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
    v = v4d(_mm256_cvtps_pd(_mm_castsi128_ps(_mm_unpacklo_epi16(_mm_setzero_si128(), h))));
    return;
#else
    v4u16 h;
    __builtin_memcpy(&h, p, sizeof h);
    const v4u32 u = __builtin_convertvector(h, v4u32) << 16;
    __builtin_memcpy(&f, &u, sizeof f);
#endif
  } else {
#if BUCKETMOO_ISA_AVX2
    // VCVTPH2PS: exact, half subnormals converted regardless of MXCSR.DAZ.
    v = v4d(_mm256_cvtps_pd(_mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)))));
    return;
#else
    for (int j = 0; j < 4; ++j) f[j] = to_float(FP16{}, p[j]);
#endif
  }
#if BUCKETMOO_ISA_AVX2
  v = v4d(_mm256_cvtps_pd(__m128(f)));  // GCC 12 splits __builtin_convertvector in two here
#else
  v = __builtin_convertvector(f, v4d);
#endif
}

// 8 consecutive elements as two 4-double halves (exact)
template <class D>
inline void load8(const typename D::Elem* p, v4d& lo, v4d& hi) {
#if BUCKETMOO_ISA_AVX2
  if constexpr (D::dtype == DType::kFloat16) {
    const __m256 f = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    lo = v4d(_mm256_cvtps_pd(_mm256_castps256_ps128(f)));
    hi = v4d(_mm256_cvtps_pd(_mm256_extractf128_ps(f, 1)));
    return;
  }
#endif
  load4<D>(lo, p);
  load4<D>(hi, p + 4);
}

#if BUCKETMOO_ISA_AVX512
// 8 consecutive elements as 8 doubles in one zmm (exact)
template <class D>
inline __m512d load8z(const typename D::Elem* p) {
  __m256 f;
  if constexpr (D::dtype == DType::kFloat32) {
    f = _mm256_loadu_ps(p);
  } else if constexpr (D::dtype == DType::kBFloat16) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    f = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  } else {
    f = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  return _mm512_cvtps_pd(f);
}
#endif

// xs[t][k] = double(g[t][b0 + k]) for k < n, then zeros up to `padded`. The T rows are read
// side by side (T streams advancing together), not one after the other.
template <int T, class D>
inline void widen_rows(const typename D::Elem* const* g, int64_t b0, double* xs, int n, int padded) {
  int k = 0;
  for (; k + 8 <= n; k += 8) {
#pragma GCC unroll 8
    for (int t = 0; t < T; ++t) {
      v4d lo, hi;
      load8<D>(g[t] + b0 + k, lo, hi);
      store4(xs + t * kGramBlock + k, lo);
      store4(xs + t * kGramBlock + k + 4, hi);
    }
  }
  for (int t = 0; t < T; ++t) {
    int j = k;
    for (; j < n; ++j) xs[t * kGramBlock + j] = double(to_float(D{}, g[t][b0 + j]));
    for (; j < padded; ++j) xs[t * kGramBlock + j] = 0.0;
  }
}

// dst[k] = double(src[k]) for k < n, then zeros up to `padded`.
template <class D>
inline void widen_row(const typename D::Elem* src, double* dst, int n, int padded) {
  int k = 0;
  for (; k + 8 <= n; k += 8) {
    v4d lo, hi;
    load8<D>(src + k, lo, hi);
    store4(dst + k, lo);
    store4(dst + k + 4, hi);
  }
  for (; k < n; ++k) dst[k] = double(to_float(D{}, src[k]));
  for (; k < padded; ++k) dst[k] = 0.0;
}

// The rows of a block kPrefetchBlocks ahead, fetched one cache line per step of the tile
// loops: spread over the computation, not in bursts that stall on memory while no FMA runs.
// One line per step is enough: a block has at least as many tile steps as cache lines, for
// every T <= 8 and element size <= 4 bytes.
constexpr int kPrefetchBlocks = 4;
template <int T>
struct LinePrefetcher {
  const char* rows[T];  // the rows' first bytes to fetch
  int64_t bytes;        // bytes to fetch per row
  int64_t off = 0;
  int row = 0;
  inline void step() {
    if (row < T) {
      __builtin_prefetch(rows[row] + off, 0, 3);
      off += 64;
      if (off >= bytes) { off = 0; ++row; }
    }
  }
};

// ---- gram, T <= 8: blocks of kGramBlock elements (L1-resident), swept by register tiles
// The rows of a block as the tiles read them: in place (converted on the fly; after the first
// tile the block is in L1) ...
template <class D>
struct DirectRows {
  const typename D::Elem* const* g;
  int64_t b0;
  inline void get(v4d& v, int t, int k) const { load4<D>(v, g[t] + b0 + k); }
#if BUCKETMOO_ISA_AVX512
  inline __m512d get8(int t, int k) const { return load8z<D>(g[t] + b0 + k); }
#endif
};
// ... or widened to double (zero-padded to a multiple of the lanes) in a scratch block.
struct ScratchRows {
  const double* xs;  // [T][kGramBlock]
  inline void get(v4d& v, int t, int k) const { load4(v, xs + t * kGramBlock + k); }
#if BUCKETMOO_ISA_AVX512
  inline __m512d get8(int t, int k) const { return _mm512_loadu_pd(xs + t * kGramBlock + k); }
#endif
};

// Pair (a, b), a <= b: index in the row-major upper triangle.
template <int T>
constexpr int pair_index(int a, int b) { return a * T - a * (a - 1) / 2 + (b - a); }

// One register tile: the pairs (a, b) with a in [A0, A0+NA), b in [B0, B0+NB) and a <= b,
// lanes 4H .. 4(H+V)-1 of each, over the n elements (a multiple of L) of the block. acc
// [P][L]: lane l of a pair holds the products of the elements at l (mod L) from the chunk's
// start, summed in element order. Tiles touch disjoint (pair, lane) sets, so their order
// never changes a result.
template <int T, int L, int H, int V, int A0, int NA, int B0, int NB, class Rows>
inline void gram_tile(const Rows& rows, int n, double* acc, LinePrefetcher<T>& pf) {
  static_assert(4 * (H + V) <= L, "lane groups");
  v4d c[NA][NB][V];
#pragma GCC unroll 8
  for (int ia = 0; ia < NA; ++ia)
#pragma GCC unroll 8
    for (int ib = 0; ib < NB; ++ib)
#pragma GCC unroll 2
      for (int j = 0; j < V; ++j)
        if (A0 + ia <= B0 + ib) load4(c[ia][ib][j], acc + pair_index<T>(A0 + ia, B0 + ib) * L + 4 * (H + j));
        else c[ia][ib][j] = v4d{0.0, 0.0, 0.0, 0.0};
  for (int k = 0; k < n; k += L) {
    pf.step();
    v4d xb[NB][V];
#pragma GCC unroll 8
    for (int ib = 0; ib < NB; ++ib)
#pragma GCC unroll 2
      for (int j = 0; j < V; ++j) rows.get(xb[ib][j], B0 + ib, k + 4 * (H + j));
#pragma GCC unroll 8
    for (int ia = 0; ia < NA; ++ia) {
      v4d xa[V];
#pragma GCC unroll 2
      for (int j = 0; j < V; ++j) rows.get(xa[j], A0 + ia, k + 4 * (H + j));
#pragma GCC unroll 8
      for (int ib = 0; ib < NB; ++ib)
#pragma GCC unroll 2
        for (int j = 0; j < V; ++j)
          if (A0 + ia <= B0 + ib) c[ia][ib][j] += xa[j] * xb[ib][j];
    }
  }
#pragma GCC unroll 8
  for (int ia = 0; ia < NA; ++ia)
#pragma GCC unroll 8
    for (int ib = 0; ib < NB; ++ib)
#pragma GCC unroll 2
      for (int j = 0; j < V; ++j)
        if (A0 + ia <= B0 + ib) store4(acc + pair_index<T>(A0 + ia, B0 + ib) * L + 4 * (H + j), c[ia][ib][j]);
}

// A tile's pairs over all L = 8 lanes: for T <= 2 both 4-lane groups in one sweep (enough
// FMA chains, few registers), else one sweep per group, each with at most 12 accumulators.
template <int T, int L, int A0, int NA, int B0, int NB, class Rows>
inline void gram_tile_lanes(const Rows& rows, int n, double* acc, LinePrefetcher<T>& pf) {
  if constexpr (T <= 2) {
    gram_tile<T, L, 0, 2, A0, NA, B0, NB>(rows, n, acc, pf);
  } else {
    gram_tile<T, L, 0, 1, A0, NA, B0, NB>(rows, n, acc, pf);
    gram_tile<T, L, 1, 1, A0, NA, B0, NB>(rows, n, acc, pf);
  }
}

// The tiles of each T: at most 12 pair accumulators (one ymm each) plus the rows they read,
// so that nothing spills on AVX2's 16 registers. (A tile one column wide, e.g. rows 0..4 x
// row 4, made GCC 12 keep its diagonal accumulator in memory: 1.6x slower at T = 5.)
template <int T, int L, class Rows>
inline void gram_tiles(const Rows& rows, int n, double* acc, LinePrefetcher<T>& pf) {
  if constexpr (T <= 4) {
    gram_tile_lanes<T, L, 0, T, 0, T>(rows, n, acc, pf);
  } else if constexpr (T == 5) {
    gram_tile_lanes<T, L, 0, 3, 0, 3>(rows, n, acc, pf);
    gram_tile_lanes<T, L, 0, 5, 3, 2>(rows, n, acc, pf);
  } else if constexpr (T == 6) {
    gram_tile_lanes<T, L, 0, 4, 0, 4>(rows, n, acc, pf);
    gram_tile_lanes<T, L, 0, 6, 4, 2>(rows, n, acc, pf);
  } else if constexpr (T == 7) {
    // 10 + 9 + 9 pairs, 14 row loads per step as with 10 + 12 + 6, but no tile with fewer
    // than 8 FMA chains and no 12-accumulator tile filling all 16 registers: AVX2 fp32 in
    // cache 1.20 -> 0.99 ns/element (1 thread), bf16/fp16 ~7% faster.
    gram_tile_lanes<T, L, 0, 4, 0, 4>(rows, n, acc, pf);
    gram_tile_lanes<T, L, 0, 3, 4, 3>(rows, n, acc, pf);
    gram_tile_lanes<T, L, 3, 4, 4, 3>(rows, n, acc, pf);
  } else {
    static_assert(T == 8, "the tiled gram covers T <= 8");
    gram_tile_lanes<T, L, 0, 4, 0, 4>(rows, n, acc, pf);
    gram_tile_lanes<T, L, 0, 4, 4, 2>(rows, n, acc, pf);
    gram_tile_lanes<T, L, 0, 4, 6, 2>(rows, n, acc, pf);
    gram_tile_lanes<T, L, 4, 4, 4, 4>(rows, n, acc, pf);
  }
}

#if BUCKETMOO_ISA_AVX512
// ---- the tiled gram on AVX-512: one zmm per pair accumulator (its 8 lanes), a tile of at
// most 22 of them plus the rows it reads in the 32 registers. Same lanes, same order.
template <int T, int A0, int NA, int B0, int NB, int PF, class Rows>
inline void gram_tile_zmm(const Rows& rows, int n, double* acc, LinePrefetcher<T>& pf) {
  __m512d c[NA][NB];
#pragma GCC unroll 8
  for (int ia = 0; ia < NA; ++ia)
#pragma GCC unroll 8
    for (int ib = 0; ib < NB; ++ib)
      if (A0 + ia <= B0 + ib) c[ia][ib] = _mm512_loadu_pd(acc + pair_index<T>(A0 + ia, B0 + ib) * 8);
      else c[ia][ib] = _mm512_setzero_pd();
  for (int k = 0; k < n; k += 8) {
#pragma GCC unroll 4
    for (int q = 0; q < PF; ++q) pf.step();
    __m512d xb[NB];
#pragma GCC unroll 8
    for (int ib = 0; ib < NB; ++ib) xb[ib] = rows.get8(B0 + ib, k);
#pragma GCC unroll 8
    for (int ia = 0; ia < NA; ++ia) {
      const __m512d xa = A0 + ia >= B0 && A0 + ia < B0 + NB ? xb[A0 + ia - B0] : rows.get8(A0 + ia, k);
#pragma GCC unroll 8
      for (int ib = 0; ib < NB; ++ib)
        if (A0 + ia <= B0 + ib) c[ia][ib] = _mm512_fmadd_pd(xa, xb[ib], c[ia][ib]);
    }
  }
#pragma GCC unroll 8
  for (int ia = 0; ia < NA; ++ia)
#pragma GCC unroll 8
    for (int ib = 0; ib < NB; ++ib)
      if (A0 + ia <= B0 + ib) _mm512_storeu_pd(acc + pair_index<T>(A0 + ia, B0 + ib) * 8, c[ia][ib]);
}

// Prefetch steps per 8 elements of a tile so that `tiles` tiles fetch T rows of 4-byte
// elements of a block.
template <int T>
constexpr int zmm_prefetch_steps(int tiles) {
  return (T * kGramBlock * 4 / 64 + tiles * (kGramBlock / 8) - 1) / (tiles * (kGramBlock / 8));
}

template <int T, class Rows>
inline void gram_tiles_zmm(const Rows& rows, int n, double* acc, LinePrefetcher<T>& pf) {
  if constexpr (T <= 6) {
    gram_tile_zmm<T, 0, T, 0, T, zmm_prefetch_steps<T>(1)>(rows, n, acc, pf);
  } else if constexpr (T == 7) {
    constexpr int PF = zmm_prefetch_steps<T>(2);
    gram_tile_zmm<T, 0, 3, 0, 7, PF>(rows, n, acc, pf);  // 18 pairs
    gram_tile_zmm<T, 3, 4, 3, 4, PF>(rows, n, acc, pf);  // 10 pairs
  } else {
    static_assert(T == 8, "the tiled gram covers T <= 8");
    constexpr int PF = zmm_prefetch_steps<T>(2);
    gram_tile_zmm<T, 0, 3, 0, 8, PF>(rows, n, acc, pf);  // 21 pairs
    gram_tile_zmm<T, 3, 5, 3, 5, PF>(rows, n, acc, pf);  // 15 pairs
  }
}
#endif
template <int T, class D>
inline void gram_chunk_fixed(const typename D::Elem* const* g, int64_t begin, int64_t end,
                             double* partial) {
  constexpr int P = T * (T + 1) / 2;
  constexpr int L = kLanes;
  constexpr int64_t kElem = int64_t(sizeof(typename D::Elem));
  // Full blocks are read in place, converted as each tile loads them; only the software
  // IEEE-half conversion (no F16C) is too slow to repeat per tile: widen those blocks once.
  constexpr bool kInPlace = BUCKETMOO_ISA_AVX2 || D::dtype != DType::kFloat16;
  alignas(32) double acc[P * L];
  for (int q = 0; q < P * L; ++q) acc[q] = 0.0;
  for (int64_t b0 = begin; b0 < end; b0 += kGramBlock) {
    const int n = int(end - b0 < kGramBlock ? end - b0 : kGramBlock);
    const int64_t ahead = b0 + int64_t(kPrefetchBlocks) * kGramBlock;
    LinePrefetcher<T> pf;
    pf.bytes = (end - ahead < kGramBlock ? end - ahead : kGramBlock) * kElem;
    if (pf.bytes <= 0) pf.row = T;
    for (int t = 0; t < T; ++t) pf.rows[t] = reinterpret_cast<const char*>(g[t] + (pf.bytes > 0 ? ahead : b0));
    if (kInPlace && n == kGramBlock) {
#if BUCKETMOO_ISA_AVX512
      gram_tiles_zmm<T>(DirectRows<D>{g, b0}, n, acc, pf);
#else
      gram_tiles<T, L>(DirectRows<D>{g, b0}, n, acc, pf);
#endif
    } else {
      // Zero padding up to a multiple of L adds +0.0 to lanes that start at +0.0 and can
      // never become -0.0, so the sums are those of the unpadded tail.
      const int padded = (n + L - 1) / L * L;
      alignas(32) double xs[T * kGramBlock];
      widen_rows<T, D>(g, b0, xs, n, padded);
#if BUCKETMOO_ISA_AVX512
      gram_tiles_zmm<T>(ScratchRows{xs}, padded, acc, pf);
#else
      gram_tiles<T, L>(ScratchRows{xs}, padded, acc, pf);
#endif
    }
  }
  for (int p = 0; p < P; ++p) {
    double s = 0.0;
    for (int l = 0; l < L; ++l) s += acc[p * L + l];
    partial[p] = s;
  }
}

// ---- gram: any T, blocks of kBlock elements converted to double, then one dot per pair
template <class D>
inline void gram_chunk_generic(const typename D::Elem* const* g, int T, int64_t begin, int64_t end,
                               double* partial, double* scratch /* [T * kBlock] */) {
  const int P = T * (T + 1) / 2;
  for (int p = 0; p < P; ++p) partial[p] = 0.0;
  for (int64_t b0 = begin; b0 < end; b0 += kBlock) {
    const int n = int(end - b0 < kBlock ? end - b0 : kBlock);
    for (int t = 0; t < T; ++t) widen_row<D>(g[t] + b0, scratch + t * kBlock, n, kBlock);
    int p = 0;
    for (int a = 0; a < T; ++a)
      for (int b = a; b < T; ++b, ++p) {
        const double* ra = scratch + a * kBlock;
        const double* rb = scratch + b * kBlock;
        double acc[kLanes] = {0, 0, 0, 0, 0, 0, 0, 0};
        for (int k = 0; k < kBlock; k += kLanes)
          for (int l = 0; l < kLanes; ++l) acc[l] += ra[k + l] * rb[k + l];
        double s = 0.0;
        for (int l = 0; l < kLanes; ++l) s += acc[l];
        partial[p] += s;
      }
  }
}

// partial: P = T(T+1)/2 doubles (upper triangle, row-major). scratch: T * kBlock doubles.
template <class D>
inline void gram_chunk_typed(const void* const* grads, int T, int64_t begin, int64_t end,
                             double* partial, double* scratch) {
  const auto* g = reinterpret_cast<const typename D::Elem* const*>(grads);
  switch (T) {
    case 1: return gram_chunk_fixed<1, D>(g, begin, end, partial);
    case 2: return gram_chunk_fixed<2, D>(g, begin, end, partial);
    case 3: return gram_chunk_fixed<3, D>(g, begin, end, partial);
    case 4: return gram_chunk_fixed<4, D>(g, begin, end, partial);
    case 5: return gram_chunk_fixed<5, D>(g, begin, end, partial);
    case 6: return gram_chunk_fixed<6, D>(g, begin, end, partial);
    case 7: return gram_chunk_fixed<7, D>(g, begin, end, partial);
    case 8: return gram_chunk_fixed<8, D>(g, begin, end, partial);
    default: return gram_chunk_generic<D>(g, T, begin, end, partial, scratch);
  }
}

inline void gram_chunk(const void* const* grads, int T, DType dt, int64_t begin, int64_t end,
                       double* partial, double* scratch) {
  switch (dt) {
    case DType::kFloat32: return gram_chunk_typed<F32>(grads, T, begin, end, partial, scratch);
    case DType::kBFloat16: return gram_chunk_typed<BF16>(grads, T, begin, end, partial, scratch);
    case DType::kFloat16: return gram_chunk_typed<FP16>(grads, T, begin, end, partial, scratch);
  }
}

// ---- combine: out[i] = sum_t w[t] * g[t][i] in double, task order, one rounding.
// All T reads of a block happen before its writes, so `out` may alias any g[t].

// acc[k] for k < n: T compile-time (1..8) keeps 8 sums in registers across all tasks (one
// pass over memory, no accumulator round trips); TT = 0: any T, task by task.
template <int TT, class D>
inline void combine_sums(double* acc, const typename D::Elem* const* g, int T, const double* w,
                         int64_t b0, int n) {
  if constexpr (TT > 0) {
    int k = 0;
#if BUCKETMOO_ISA_AVX512
    __m512d wz[TT];
    for (int t = 0; t < TT; ++t) wz[t] = _mm512_set1_pd(w[t]);
    for (; k + 8 <= n; k += 8) {
      __m512d a = _mm512_mul_pd(wz[0], load8z<D>(g[0] + b0 + k));
#pragma GCC unroll 8
      for (int t = 1; t < TT; ++t) a = _mm512_fmadd_pd(wz[t], load8z<D>(g[t] + b0 + k), a);
      _mm512_storeu_pd(acc + k, a);
    }
#else
    v4d wv[TT];
    for (int t = 0; t < TT; ++t) wv[t] = v4d{w[t], w[t], w[t], w[t]};
    for (; k + 8 <= n; k += 8) {
      v4d lo, hi;
      load8<D>(g[0] + b0 + k, lo, hi);
      v4d a0 = wv[0] * lo, a1 = wv[0] * hi;
#pragma GCC unroll 8
      for (int t = 1; t < TT; ++t) {
        load8<D>(g[t] + b0 + k, lo, hi);
        a0 += wv[t] * lo;
        a1 += wv[t] * hi;
      }
      store4(acc + k, a0);
      store4(acc + k + 4, a1);
    }
#endif
    for (; k < n; ++k) {
      double a = w[0] * double(to_float(D{}, g[0][b0 + k]));
      for (int t = 1; t < TT; ++t) a += w[t] * double(to_float(D{}, g[t][b0 + k]));
      acc[k] = a;
    }
  } else {
    for (int t = 0; t < T; ++t) {
      const v4d wt = {w[t], w[t], w[t], w[t]};
      const typename D::Elem* src = g[t] + b0;
      int k = 0;
#if BUCKETMOO_ISA_AVX512
      const __m512d wz = _mm512_set1_pd(w[t]);
      for (; k + 8 <= n; k += 8) {
        const __m512d x = load8z<D>(src + k);
        _mm512_storeu_pd(acc + k, t == 0 ? _mm512_mul_pd(wz, x) : _mm512_fmadd_pd(wz, x, _mm512_loadu_pd(acc + k)));
      }
#endif
      for (; k + 8 <= n; k += 8) {
        v4d lo, hi;
        load8<D>(src + k, lo, hi);
        v4d a0 = wt * lo, a1 = wt * hi;
        if (t > 0) {
          v4d s0, s1;
          load4(s0, acc + k);
          load4(s1, acc + k + 4);
          a0 = s0 + a0;
          a1 = s1 + a1;
        }
        store4(acc + k, a0);
        store4(acc + k + 4, a1);
      }
      for (; k < n; ++k) {
        const double x = w[t] * double(to_float(D{}, src[k]));
        acc[k] = t == 0 ? x : acc[k] + x;
      }
    }
  }
}

// out[b0 + k] = acc[k] rounded to D (through float, as c10 does), k < n.
template <class D>
inline void store_block(void* out, const double* acc, int64_t b0, int n, bool stream) {
  if constexpr (D::dtype == DType::kFloat32) {
    float* o = static_cast<float*>(out) + b0;
#if BUCKETMOO_HAVE_STREAM_STORES
    if (stream) {  // non-temporal stores: no read-for-ownership of the output lines
      float rounded[kBlock];
      for (int k = 0; k < n; ++k) rounded[k] = float(acc[k]);
      int k = 0;
      for (; k < n && (reinterpret_cast<uintptr_t>(o + k) & 15u) != 0; ++k) o[k] = rounded[k];
      for (; k + 4 <= n; k += 4) _mm_stream_ps(o + k, _mm_loadu_ps(rounded + k));
      for (; k < n; ++k) o[k] = rounded[k];
      return;
    }
#endif
    (void)stream;
    int k = 0;
#if BUCKETMOO_ISA_AVX512
    for (; k + 8 <= n; k += 8) _mm256_storeu_ps(o + k, _mm512_cvtpd_ps(_mm512_loadu_pd(acc + k)));
#endif
    for (; k < n; ++k) o[k] = float(acc[k]);
  } else if constexpr (D::dtype == DType::kBFloat16) {
    (void)stream;
    uint16_t* o = static_cast<uint16_t*>(out) + b0;
    for (int k = 0; k < n; ++k) o[k] = to_bf16(float(acc[k]));
  } else {
    (void)stream;
    uint16_t* o = static_cast<uint16_t*>(out) + b0;
    int k = 0;
#if BUCKETMOO_ISA_AVX2
    // VCVTPS2PH with an explicit round-to-nearest-even (not MXCSR.RC; it ignores FTZ), then
    // every NaN made the quiet NaN of its sign (0x7e00 | sign) as to_fp16 does.
    const __m128i abs_mask = _mm_set1_epi16(0x7fff), inf = _mm_set1_epi16(0x7c00);
    const __m128i payload = _mm_set1_epi16(0x01ff);
    for (; k + 8 <= n; k += 8) {
      const __m128 lo = _mm256_cvtpd_ps(_mm256_loadu_pd(acc + k));
      const __m128 hi = _mm256_cvtpd_ps(_mm256_loadu_pd(acc + k + 4));
      __m128i h = _mm256_cvtps_ph(_mm256_set_m128(hi, lo), _MM_FROUND_TO_NEAREST_INT);
      const __m128i nan = _mm_cmpgt_epi16(_mm_and_si128(h, abs_mask), inf);
      h = _mm_andnot_si128(_mm_and_si128(nan, payload), h);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(o + k), h);
    }
#endif
    for (; k < n; ++k) o[k] = to_fp16(float(acc[k]));
  }
}

template <class D>
inline void combine_block(void* out, const typename D::Elem* const* g, int T, const double* w,
                          int64_t b0, int n, bool stream) {
  alignas(32) double acc[kBlock];
  switch (T) {
    case 1: combine_sums<1, D>(acc, g, T, w, b0, n); break;
    case 2: combine_sums<2, D>(acc, g, T, w, b0, n); break;
    case 3: combine_sums<3, D>(acc, g, T, w, b0, n); break;
    case 4: combine_sums<4, D>(acc, g, T, w, b0, n); break;
    case 5: combine_sums<5, D>(acc, g, T, w, b0, n); break;
    case 6: combine_sums<6, D>(acc, g, T, w, b0, n); break;
    case 7: combine_sums<7, D>(acc, g, T, w, b0, n); break;
    case 8: combine_sums<8, D>(acc, g, T, w, b0, n); break;
    default: combine_sums<0, D>(acc, g, T, w, b0, n); break;
  }
  store_block<D>(out, acc, b0, n, stream);
}

template <class D>
inline void combine_range_typed(void* out, const void* const* grads, int T, const double* w,
                                int64_t begin, int64_t end, bool stream) {
  const auto* g = reinterpret_cast<const typename D::Elem* const*>(grads);
  for (int64_t b0 = begin; b0 < end; b0 += kBlock) {
    const int n = int(end - b0 < kBlock ? end - b0 : kBlock);
    combine_block<D>(out, g, T, w, b0, n, stream);
  }
}

// w: the segment's T weights as double (exact copies of the float32 weights). stream: use
// non-temporal stores for a float32 output (only when it aliases no input and is far larger
// than the caches; the caller decides). Ends with a store fence when it streamed.
inline void combine_range(void* out, const void* const* grads, int T, DType dt, const double* w,
                          int64_t begin, int64_t end, bool stream) {
  switch (dt) {
    case DType::kFloat32: combine_range_typed<F32>(out, grads, T, w, begin, end, stream); break;
    case DType::kBFloat16: combine_range_typed<BF16>(out, grads, T, w, begin, end, false); break;
    case DType::kFloat16: combine_range_typed<FP16>(out, grads, T, w, begin, end, false); break;
  }
#if BUCKETMOO_HAVE_STREAM_STORES
  if (stream) _mm_sfence();
#endif
}

}  // namespace BUCKETMOO_ISA_NS
}  // namespace cpu
}  // namespace bucketmoo
