// The 16-row AMX int8 loop of infer/kernels/int8_matvec.cc (amx_half_group) outside JAX: every
// half of 64 MiB of weights in the unit's layout, on `threads` threads (default 2), 16 rows of
// activation digits. Variants, the best of 7 passes each, GB/s of weights read:
// - `stride k_pad`: digit rows k_pad bytes apart (before digits_stride);
// - `stride digits_stride`: rows one k-step further apart (the kernel now);
// - `whole-step prefetch`: column group 0 prefetches every group's operands of the step 8 steps
//   ahead into L2 (tried, slower; the kernel keeps each group's own 2-step prefetch).
//
//   g++ -O3 -march=native -fopenmp-simd -std=c++17 -w \
//       -I"$(.venv/bin/python -c 'import jax; print(jax.ffi.include_dir())')" \
//       bench/amx_group_loop.cc -o /tmp/amx_group_loop -lpthread
//   for K in 768 2048; do flock /tmp/hpllm-bench.lock /tmp/amx_group_loop $K; done
#include "../infer/kernels/int8_matvec.cc"
#include <chrono>
#include <cstdio>
#include <thread>
#include <vector>
#if !defined(HPLLM_AMX)
int main() { std::puts("this build has no AMX route (needs -march=native on an AMX CPU)"); }
#else
namespace {
double wall() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}
// amx_half_group with the whole step prefetched from group 0's pass, 8 steps ahead, into L2.
void whole_step_prefetch(const int8_t* a, int64_t stride, int64_t digit_bytes, const int8_t* w,
                         int64_t steps, int64_t g, int32_t (*sums)[kAmxHalf]) {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  for (int64_t step = 0; step < steps; ++step) {
    const int8_t* b = w + step * kAmxStepBytes + g * kAmxOperandBytes;
    if (g == 0)
      for (int64_t j = 0; j < kAmxStepBytes; j += 64)
        _mm_prefetch(reinterpret_cast<const char*>(w + (step + 8) * kAmxStepBytes) + j,
                     _MM_HINT_T1);
    _tile_loadd(6, b, 64);
    _tile_loadd(3, a + step * kAmxK, stride);
    _tile_dpbssd(0, 3, 6);
    _tile_loadd(4, a + digit_bytes + step * kAmxK, stride);
    _tile_dpbssd(1, 4, 6);
    _tile_loadd(5, a + 2 * digit_bytes + step * kAmxK, stride);
    _tile_dpbssd(2, 5, 6);
  }
  _tile_stored(0, sums[0] + g * kAmxCols, kAmxHalf * 4);
  _tile_stored(1, sums[kAmxRows] + g * kAmxCols, kAmxHalf * 4);
  _tile_stored(2, sums[2 * kAmxRows] + g * kAmxCols, kAmxHalf * 4);
}
}  // namespace

int main(int argc, char** argv) {
  if (!amx_permitted()) return std::puts("the OS does not grant AMX to this process"), 1;
  const int64_t K = argc > 1 ? atoi(argv[1]) : 768, threads = argc > 2 ? atoi(argv[2]) : 2;
  const int64_t steps = (K + kAmxK - 1) / kAmxK, k_pad = steps * kAmxK;
  const int64_t half_bytes = steps * kAmxStepBytes, halves = (int64_t{64} << 20) / half_bytes;
  std::vector<int8_t> w(halves * half_bytes);
  for (size_t i = 0; i < w.size(); ++i) w[i] = static_cast<int8_t>(i * 7 % 255 - 127);
  const char* names[] = {"stride k_pad", "stride digits_stride", "whole-step prefetch"};
  for (int variant = 0; variant < 3; ++variant) {
    const int64_t stride = variant == 0 ? k_pad : digits_stride(k_pad);
    double best = 1e9;
    for (int pass = 0; pass < 7; ++pass) {
      const double t0 = wall();
      std::vector<std::thread> workers;
      for (int64_t th = 0; th < threads; ++th)
        workers.emplace_back([&, th] {
          const AmxConfig config;
          _tile_loadconfig(&config);
          std::vector<int8_t> digits(kDigits * kAmxRows * stride, 1);
          alignas(64) int32_t sums[kDigits * kAmxRows][kAmxHalf];
          for (int64_t h = th; h < halves; h += threads)
            for (int64_t g = 0; g < kAmxGroups; ++g) {
              const int8_t* wh = w.data() + h * half_bytes;
              if (variant == 2)
                whole_step_prefetch(digits.data(), stride, kAmxRows * stride, wh, steps, g, sums);
              else
                amx_half_group(digits.data(), stride, kAmxRows * stride, wh, steps, g, true,
                               sums);
            }
          _tile_release();
        });
      for (auto& worker : workers) worker.join();
      best = std::min(best, wall() - t0);
    }
    std::printf("d_in %ld, %ld threads, %-21s %6.2f GB/s of weights\n", K, threads,
                names[variant], w.size() / best / 1e9);
  }
}
#endif
