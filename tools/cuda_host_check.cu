// Host-side checks of the CUDA backend, built and run by tools/check_cuda_compile.sh on any
// machine with nvcc (no GPU needed):
//
//  1. links every launcher declared in csrc/cuda/bucketmoo_cuda.h against the compiled .cu
//     objects (a missing definition or a signature mismatch fails the link);
//  2. tests the index math the kernels share (common.cuh, __host__ __device__): segment
//     lookup, the (segment, tile) -> partial-slot map of the Gram kernel, the "big
//     intersection" slots, the combine kernel's per-chunk segment walk, the upper-triangle
//     index; by simulating the kernels' partition of random layouts with empty segments and
//     checking that every element is counted exactly once, in its own segment;
//  3. checks that the launchers reject bad arguments with cudaErrorInvalidValue before
//     touching a device.
//
// Exit status 0 when every check passes; the first failure is printed.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "../csrc/cuda/bucketmoo_cuda.h"
#include "../csrc/cuda/common.cuh"

namespace bc = bucketmoo::cuda;
namespace bd = bucketmoo::cuda::detail;

static int g_failures = 0;

#define CHECK(cond, ...)                                             \
  do {                                                               \
    if (!(cond)) {                                                   \
      std::fprintf(stderr, "FAILED %s:%d: %s: ", __FILE__, __LINE__, #cond); \
      std::fprintf(stderr, __VA_ARGS__);                             \
      std::fprintf(stderr, "\n");                                    \
      ++g_failures;                                                  \
      return;                                                        \
    }                                                                \
  } while (0)

// Random offsets with empty segments, length-1 segments and long ones.
static std::vector<int64_t> random_offsets(std::mt19937_64& rng, int64_t num_segments, int64_t max_len) {
  std::vector<int64_t> offsets(1, 0);
  std::uniform_int_distribution<int> kind(0, 9);
  std::uniform_int_distribution<int64_t> len(2, max_len);
  for (int64_t s = 0; s < num_segments; ++s) {
    const int k = kind(rng);
    const int64_t n = k == 0 ? 0 : (k == 1 ? 1 : len(rng));
    offsets.push_back(offsets.back() + n);
  }
  return offsets;
}

static void check_segment_of(const std::vector<int64_t>& off) {
  const int64_t num_segments = static_cast<int64_t>(off.size()) - 1;
  const int64_t numel = off.back();
  int64_t expect = 0;
  for (int64_t n = 0; n < numel; ++n) {
    while (off[expect + 1] <= n) ++expect;
    const int64_t got = bd::segment_of(off.data(), 0, num_segments - 1, n);
    CHECK(got == expect, "segment_of(%lld) = %lld, expected %lld", (long long)n, (long long)got, (long long)expect);
  }
}

// Simulate gram_partial_kernel's partition + gram_finalize_kernel's reads with integer
// "values" (element n has value n + 1) and compare per-segment sums with the direct ones:
// single-tile segments must be written straight into the output by exactly one tile, every
// piece of a multi-tile segment must get a slot no other piece uses, inside the workspace,
// and the finalize walk must read exactly the segment's own slots in increasing order.
static void check_gram_partition(const std::vector<int64_t>& off, int64_t tile) {
  constexpr int kMaxBig = 8;  // gram.cu
  const int64_t num_segments = static_cast<int64_t>(off.size()) - 1;
  const int64_t numel = off.back();
  const int64_t num_tiles = bd::ceil_div(numel, tile);
  const int64_t num_slots = bd::num_partial_slots(numel, tile);
  CHECK(num_slots == 2 * num_tiles, "workspace slots %lld for %lld tiles", (long long)num_slots,
        (long long)num_tiles);
  const int64_t big = tile / kMaxBig;
  std::vector<int64_t> owner(num_slots, -1);
  std::vector<int64_t> value(num_slots, 0);
  std::vector<int64_t> direct(num_segments, 0);
  std::vector<int> direct_writes(num_segments, 0);
  std::vector<int64_t> visits(numel, 0);
  for (int64_t b = 0; b < num_tiles; ++b) {
    const int64_t t0 = b * tile;
    const int64_t t1 = std::min(numel, t0 + tile);
    const int64_t s0 = bd::segment_of(off.data(), 0, num_segments - 1, t0);
    const int64_t s1 = bd::segment_of(off.data(), s0, num_segments - 1, t1 - 1);
    CHECK(off[s0] <= t0 && t0 < off[s0 + 1], "tile %lld: s0 wrong", (long long)b);
    CHECK(off[s1] <= t1 - 1 && t1 - 1 < off[s1 + 1], "tile %lld: s1 wrong", (long long)b);
    std::vector<int64_t> big_slot(kMaxBig, -1);
    for (int64_t s = s0; s <= s1; ++s) {
      const int64_t lo = std::max(off[s], t0);
      const int64_t hi = std::min(off[s + 1], t1);
      if (hi <= lo) continue;
      if (hi - lo >= big) {
        const int64_t k = (lo - t0) / big;
        CHECK(k < kMaxBig && big_slot[k] == -1, "tile %lld: big slot %lld reused", (long long)b, (long long)k);
        big_slot[k] = s;
      }
      int64_t sum = 0;
      for (int64_t n = lo; n < hi; ++n) {
        sum += n + 1;
        ++visits[n];
      }
      if (bd::single_tile(off[s], off[s + 1], tile)) {
        CHECK(lo == off[s] && hi == off[s + 1], "single-tile segment %lld cut by tile %lld", (long long)s,
              (long long)b);
        direct[s] = sum;
        ++direct_writes[s];
      } else {
        const int64_t slot = bd::partial_slot(lo, b, tile);
        CHECK(slot >= 2 * b && slot < 2 * b + 2, "slot %lld outside tile %lld's pair", (long long)slot, (long long)b);
        CHECK(owner[slot] == -1, "slot %lld written twice", (long long)slot);
        owner[slot] = s;
        value[slot] = sum;
      }
    }
  }
  for (int64_t n = 0; n < numel; ++n) CHECK(visits[n] == 1, "element %lld visited %lld times", (long long)n, (long long)visits[n]);
  for (int64_t s = 0; s < num_segments; ++s) {
    int64_t expect = 0;
    for (int64_t n = off[s]; n < off[s + 1]; ++n) expect += n + 1;
    int64_t got = 0;
    const int64_t begin = off[s], end = off[s + 1];
    if (end > begin && bd::single_tile(begin, end, tile)) {
      CHECK(direct_writes[s] == 1, "single-tile segment %lld written %d times", (long long)s, direct_writes[s]);
      got = direct[s];
    } else if (end > begin) {
      CHECK(direct_writes[s] == 0, "multi-tile segment %lld written directly", (long long)s);
      const int64_t count = bd::last_tile(end, tile) - bd::first_tile(begin, tile) + 1;
      int64_t previous = -1;
      for (int64_t k = 0; k < count; ++k) {
        const int64_t slot = bd::segment_slot(begin, tile, k);
        CHECK(slot > previous && slot < num_slots, "segment %lld: slot %lld out of order or range", (long long)s,
              (long long)slot);
        previous = slot;
        CHECK(owner[slot] == s, "segment %lld reads slot %lld owned by %lld", (long long)s, (long long)slot,
              (long long)owner[slot]);
        got += value[slot];
      }
    }
    CHECK(got == expect, "segment %lld: sum %lld, expected %lld", (long long)s, (long long)got, (long long)expect);
  }
}

// Simulate combine_kernel's walk: every element gets exactly the weights of its segment.
static void check_combine_walk(const std::vector<int64_t>& off, int64_t tile, int vec, int threads) {
  const int64_t num_segments = static_cast<int64_t>(off.size()) - 1;
  const int64_t numel = off.back();
  std::vector<int64_t> seg_of(numel, -1);
  for (int64_t b = 0; b * tile < numel; ++b) {
    const int64_t t0 = b * tile;
    const int64_t t1 = std::min(numel, t0 + tile);
    const int64_t s0 = bd::segment_of(off.data(), 0, num_segments - 1, t0);
    const int64_t s1 = bd::segment_of(off.data(), s0, num_segments - 1, t1 - 1);
    for (int tid = 0; tid < threads; ++tid) {
      for (int64_t n0 = t0 + int64_t(tid) * vec; n0 < t1; n0 += int64_t(threads) * vec) {
        int64_t s = (s0 == s1) ? s0 : bd::segment_of(off.data(), s0, s1, n0);
        if (n0 + vec <= t1 && (s0 == s1 || n0 + vec <= off[s + 1])) {
          for (int64_t n = n0; n < n0 + vec; ++n) {
            CHECK(seg_of[n] == -1, "element %lld written twice", (long long)n);
            seg_of[n] = s;
          }
        } else {
          for (int64_t n = n0; n < std::min(n0 + vec, t1); ++n) {
            while (off[s + 1] <= n) ++s;
            CHECK(seg_of[n] == -1, "element %lld written twice", (long long)n);
            seg_of[n] = s;
          }
        }
      }
    }
  }
  int64_t expect = 0;
  for (int64_t n = 0; n < numel; ++n) {
    while (off[expect + 1] <= n) ++expect;
    CHECK(seg_of[n] == expect, "element %lld combined with segment %lld, expected %lld", (long long)n,
          (long long)seg_of[n], (long long)expect);
  }
}

static void check_triangle() {
  for (int num_tasks = 1; num_tasks <= bc::kMaxTasks; ++num_tasks) {
    int e = 0;
    for (int i = 0; i < num_tasks; ++i) {
      for (int j = i; j < num_tasks; ++j, ++e) {
        CHECK(bd::tri_index(i, j, num_tasks) == e, "tri_index(%d, %d, %d)", i, j, num_tasks);
        int pi, pj;
        bd::tri_pair(e, num_tasks, &pi, &pj);
        CHECK(pi == i && pj == j, "tri_pair(%d, %d)", e, num_tasks);
      }
    }
  }
}

static void check_bad_arguments() {
  const void* grads[bc::kMaxTasks + 1] = {};
  int64_t offsets[2] = {0, 0};
  float dummy_f = 0.f;
  double dummy_d = 0.0;
  CHECK(bc::gram_workspace_bytes(bc::kMaxTasks + 1, bc::DType::kFloat32, 10, 1) == 0, "workspace for T > max");
  CHECK(bc::gram_workspace_bytes(2, bc::DType::kFloat32, 10, 1) > 0, "workspace for T = 2");
  CHECK(bc::gram_cuda(grads, bc::kMaxTasks + 1, bc::DType::kFloat32, 10, offsets, 1, &dummy_f, &dummy_f, 4,
                      nullptr) == cudaErrorInvalidValue, "gram_cuda T > max");
  CHECK(bc::gram_cuda(grads, 2, bc::DType::kFloat32, 10, offsets, 1, &dummy_f, &dummy_f, 1, nullptr) ==
            cudaErrorInvalidValue, "gram_cuda workspace too small");
  CHECK(bc::gram_cuda(grads, 2, bc::DType::kFloat32, 0, offsets, 0, nullptr, nullptr, 0, nullptr) == cudaSuccess,
        "gram_cuda with S = 0 is a no-op");
  CHECK(bc::combine_cuda(&dummy_f, grads, 0, bc::DType::kFloat32, 10, &dummy_f, offsets, 1, nullptr) ==
            cudaErrorInvalidValue, "combine_cuda T = 0");
  CHECK(bc::combine_cuda(&dummy_f, grads, 2, bc::DType::kFloat32, 0, &dummy_f, offsets, 1, nullptr) == cudaSuccess,
        "combine_cuda with N = 0 is a no-op");
  CHECK(bc::combine_cuda(&dummy_f, grads, 2, bc::DType::kFloat32, 10, &dummy_f, offsets, 1, nullptr) ==
            cudaErrorInvalidValue, "combine_cuda null grads");
  CHECK(bc::solve_mgda_cuda(&dummy_d, 1, 3, 7, 10, 0.0, &dummy_d, nullptr) == cudaErrorInvalidValue, "mgda solver 7");
  CHECK(bc::solve_mgda_cuda(&dummy_d, 1, 9, 2, 10, 0.0, &dummy_d, nullptr) == cudaErrorInvalidValue,
        "mgda exact T = 9");
  CHECK(bc::solve_mgda_cuda(&dummy_d, 1, 3, 1, 10, 0.0, &dummy_d, nullptr) == cudaErrorInvalidValue,
        "mgda closed form T = 3");
  CHECK(bc::solve_pcgrad_cuda(&dummy_d, 1, 33, nullptr, &dummy_d, nullptr) == cudaErrorInvalidValue, "pcgrad T = 33");
  CHECK(bc::solve_cagrad_cuda(&dummy_d, 1, 9, 0.4, 1, &dummy_d, nullptr) == cudaErrorInvalidValue, "cagrad T = 9");
  CHECK(bc::solve_cagrad_cuda(&dummy_d, 1, 3, 0.4, 3, &dummy_d, nullptr) == cudaErrorInvalidValue, "cagrad rescale 3");
  CHECK(bc::solve_cagrad_cuda(&dummy_d, 0, 3, 0.4, 1, &dummy_d, nullptr) == cudaSuccess, "cagrad S = 0 is a no-op");
  namespace sv = bucketmoo::solver;
  sv::WeightStep spec;  // mgda, auto
  CHECK(bc::weights_cuda(&dummy_f, 0, 3, spec, nullptr, &dummy_f, nullptr) == cudaSuccess, "weights S = 0 is a no-op");
  CHECK(bc::weights_cuda(&dummy_f, 1, 33, spec, nullptr, &dummy_f, nullptr) == cudaErrorInvalidValue, "weights T = 33");
  CHECK(bc::weights_cuda(nullptr, 1, 3, spec, nullptr, &dummy_f, nullptr) == cudaErrorInvalidValue, "weights null gram");
  spec.normalization = sv::kNormLoss;
  CHECK(bc::weights_cuda(&dummy_f, 1, 3, spec, nullptr, &dummy_f, nullptr) == cudaErrorInvalidValue,
        "weights loss normalisation without losses");
  spec.normalization = 4;
  CHECK(bc::weights_cuda(&dummy_f, 1, 3, spec, nullptr, &dummy_f, nullptr) == cudaErrorInvalidValue,
        "weights normalization 4");
  spec = sv::WeightStep{};
  spec.method = sv::kMethodPcgrad;
  CHECK(bc::weights_cuda(&dummy_f, 1, 3, spec, nullptr, &dummy_f, nullptr) == cudaErrorInvalidValue,
        "weights pcgrad without orders");
  spec.method = sv::kMethodCagrad;
  CHECK(bc::weights_cuda(&dummy_f, 1, 9, spec, nullptr, &dummy_f, nullptr) == cudaErrorInvalidValue, "weights cagrad T = 9");
  spec.method = 6;
  CHECK(bc::weights_cuda(&dummy_f, 1, 3, spec, nullptr, &dummy_f, nullptr) == cudaErrorInvalidValue, "weights method 6");
  spec.method = sv::kMethodUpgrad;
  CHECK(bc::weights_cuda(&dummy_f, 1, 17, spec, nullptr, &dummy_f, nullptr) == cudaErrorInvalidValue, "weights upgrad T = 17");
  spec.reg_eps = 0.0;
  CHECK(bc::weights_cuda(&dummy_f, 1, 3, spec, nullptr, &dummy_f, nullptr) == cudaErrorInvalidValue,
        "weights upgrad reg_eps = 0");
  spec = sv::WeightStep{};
  spec.method = sv::kMethodDualproj;
  CHECK(bc::solve_dual_cone_cuda(&dummy_d, 0, 3, spec, &dummy_d, nullptr) == cudaSuccess, "dual cone S = 0 is a no-op");
  CHECK(bc::solve_dual_cone_cuda(&dummy_d, 1, 17, spec, &dummy_d, nullptr) == cudaErrorInvalidValue, "dual cone T = 17");
  spec.method = sv::kMethodMgda;
  CHECK(bc::solve_dual_cone_cuda(&dummy_d, 1, 3, spec, &dummy_d, nullptr) == cudaErrorInvalidValue, "dual cone method mgda");
}

int main() {
  std::mt19937_64 rng(1234);
  check_triangle();
  check_bad_arguments();
  const int64_t tiles[] = {8, 16, 64, 8192};
  const int64_t max_lens[] = {3, 20, 200, 20000};
  for (int trial = 0; trial < 60 && g_failures == 0; ++trial) {
    const int64_t num_segments = 1 + static_cast<int64_t>(rng() % 40);
    const int64_t max_len = max_lens[trial % 4];
    std::vector<int64_t> off = random_offsets(rng, num_segments, max_len);
    check_segment_of(off);
    for (int64_t tile : tiles) check_gram_partition(off, tile);
    check_combine_walk(off, 32, 4, 2);
    check_combine_walk(off, 8192, 8, 256);
    check_combine_walk(off, 64, 1, 8);
  }
  // Layouts the tests use: one segment, chunks of 7, all empty but one element.
  for (int64_t numel : {1LL, 7LL, 1000LL, 65537LL}) {
    std::vector<int64_t> one = {0, numel};
    check_gram_partition(one, 8192);
    check_combine_walk(one, 8192, 8, 256);
    std::vector<int64_t> chunks;
    for (int64_t n = 0; n < numel; n += 7) chunks.push_back(n);
    chunks.push_back(numel);
    check_gram_partition(chunks, 8192);
    check_combine_walk(chunks, 4096, 4, 256);
  }
  std::vector<int64_t> empties = {0, 0, 0, 1, 1, 1};
  check_gram_partition(empties, 8);
  check_combine_walk(empties, 8, 4, 2);
  if (g_failures == 0) std::printf("cuda_host_check: all checks passed\n");
  return g_failures == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
