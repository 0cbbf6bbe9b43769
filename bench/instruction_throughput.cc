// Per-core throughput of the multiply-add instructions the kernels could build on: f32 FMA
// (what the weight-only FMA routes run), and VNNI's vpdpbusd (u8 x s8, four products summed
// into each int32 lane), on one thread and on two at once. This is the measurement behind the
// choice not to give AVX-512 CPUs without AMX a "three int8 digits" route for weight-only
// products (docs/performance.md, seventh sitting): a product that must keep float32 accuracy
// needs three vpdpbusd per four k of a column where the FMA route needs four FMAs, so it wins
// only if vpdpbusd issues at least 3/4 as fast as an FMA.
//
//   g++ -O2 -march=native -pthread bench/instruction_throughput.cc -o /tmp/instruction_throughput
//   flock /tmp/hpllm-bench.lock /tmp/instruction_throughput
//
// Each loop runs 12 independent accumulator chains (more than latency x ports for either
// instruction) with distinct start values, so the compiler can neither merge nor drop them;
// the best of 5 runs is printed. Needs AVX-512F; the vpdpbusd line needs AVX512-VNNI.
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <thread>
#include <vector>

namespace {

constexpr long kIterations = 20'000'000;
constexpr int kChains = 12;

// Seconds for kIterations x kChains FMAs.
double fma_loop(int seed) {
  __m512 acc[kChains];
  for (int i = 0; i < kChains; ++i) acc[i] = _mm512_set1_ps(1e-9f * (seed + i + 1));
  const __m512 a = _mm512_set1_ps(1.0f + 1e-7f * seed), b = _mm512_set1_ps(0.9999f);
  const auto start = std::chrono::steady_clock::now();
  for (long n = 0; n < kIterations; ++n) {
#pragma GCC unroll 12
    for (int i = 0; i < kChains; ++i) acc[i] = _mm512_fmadd_ps(a, b, acc[i]);
  }
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  float sum = 0;
  for (int i = 0; i < kChains; ++i) sum += _mm512_reduce_add_ps(acc[i]);
  if (sum == 42.0f) std::puts("");  // keeps the chains live
  return seconds;
}

#if defined(__AVX512VNNI__)
// Seconds for kIterations x kChains vpdpbusd.
double vnni_loop(int seed) {
  __m512i acc[kChains];
  for (int i = 0; i < kChains; ++i) acc[i] = _mm512_set1_epi32(seed + i + 1);
  const __m512i u = _mm512_set1_epi8(static_cast<char>(3 + seed)), s = _mm512_set1_epi8(5);
  const auto start = std::chrono::steady_clock::now();
  for (long n = 0; n < kIterations; ++n) {
#pragma GCC unroll 12
    for (int i = 0; i < kChains; ++i) acc[i] = _mm512_dpbusd_epi32(acc[i], u, s);
  }
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  int sum = 0;
  for (int i = 0; i < kChains; ++i) sum += _mm512_reduce_add_epi32(acc[i]);
  if (sum == 42) std::puts("");
  return seconds;
}
#endif

// Nanoseconds per instruction on each of `threads` threads running `loop` at once (the
// slowest thread's time, best of 5).
double ns_per_instruction(double (*loop)(int), int threads) {
  double best = 1e9;
  for (int rep = 0; rep < 5; ++rep) {
    std::vector<double> seconds(threads);
    std::vector<std::thread> workers;
    for (int t = 0; t < threads; ++t)
      workers.emplace_back([&, t] { seconds[t] = loop(t); });
    for (auto& worker : workers) worker.join();
    best = std::min(best, *std::max_element(seconds.begin(), seconds.end()));
  }
  return best / (double(kIterations) * kChains) * 1e9;
}

}  // namespace

int main() {
  std::puts("| instruction | threads | ns per instruction per thread | multiply-adds per ns, "
            "all threads | f32-accurate multiply-adds per ns, all threads |");
  std::puts("|---|---|---|---|---|");
  for (int threads = 1; threads <= 2; ++threads) {
    const double fma = ns_per_instruction(fma_loop, threads);
    std::printf("| vfmadd231ps zmm (16 f32) | %d | %.3f | %.1f | %.1f |\n", threads, fma,
                16 * threads / fma, 16 * threads / fma);
#if defined(__AVX512VNNI__)
    // Three base-254 digits per activation keep float32 accuracy: 64 / 3 useful products.
    const double vnni = ns_per_instruction(vnni_loop, threads);
    std::printf("| vpdpbusd zmm (64 u8 x s8) | %d | %.3f | %.1f | %.1f |\n", threads, vnni,
                64 * threads / vnni, 64.0 / 3 * threads / vnni);
#endif
  }
}
