// The int4 and int8 kernels of infer/kernels/int8_matvec.cc on one thread, outside JAX, base's
// 768 x 2048 shape: `dec [copies]` times the batch-1 tile kernels (int4_tile / int8_tile at one
// row) over `copies` copies of the weight (1: 0.75 MB of int4, in L2, the arithmetic alone;
// 8 (default): 6 MB, read from L3 as a decode step's are); `gemm|gemm2 [rows]` times the
// prefill GEMM route (tile_batched_rows) at `rows` rows, gemm2 dequantizing every panel twice
// (the difference is the dequantization's cost). Figures: the minimum thread CPU time of 20 (10)
// calls, three rounds; G weights/s or GFLOP/s. `peak`: the core's FMA peak of the path (12
// independent chains of vfmadd231ps on 8 / 16 lanes), the ceiling of the GEMM route.
//
//   g++ -O3 -march=native -fopenmp-simd -std=c++17 -w \
//       -I"$(.venv/bin/python -c 'import jax; print(jax.ffi.include_dir())')" \
//       bench/tile_kernels.cc -o /tmp/tile_kernels
//   flock /tmp/hpllm-bench.lock /tmp/tile_kernels dec 1
//
// (-march=x86-64-v3 for the AVX2 path; -DKERNEL='"/tmp/old.cc"' times another version of the
// kernel file, e.g. `git show REV:infer/kernels/int8_matvec.cc > /tmp/old.cc`.)
#ifndef KERNEL
#define KERNEL "../infer/kernels/int8_matvec.cc"
#endif
#include KERNEL
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <vector>
#include <string>
static double now() { timespec t; clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t); return t.tv_sec + 1e-9 * t.tv_nsec; }
#if defined(HPLLM_PATH_AVX512)
#define PEAK_REG(n) "%%zmm" #n
#else
#define PEAK_REG(n) "%%ymm" #n
#endif
#define PEAK_FMA(n) "vfmadd231ps " PEAK_REG(12) "," PEAK_REG(13) "," PEAK_REG(n) "\n"
static void fma_peak() {
#if defined(HPLLM_PATH_AVX512) || defined(HPLLM_PATH_AVX2)
  const long n = 100000000;
  for (int round = 0; round < 3; ++round) {
    long i = n;
    const double t0 = now();
    __asm__ volatile(
        "vxorps %%xmm12, %%xmm12, %%xmm12\n vxorps %%xmm13, %%xmm13, %%xmm13\n"
        "1:\n" PEAK_FMA(0) PEAK_FMA(1) PEAK_FMA(2) PEAK_FMA(3) PEAK_FMA(4) PEAK_FMA(5)
        PEAK_FMA(6) PEAK_FMA(7) PEAK_FMA(8) PEAK_FMA(9) PEAK_FMA(10) PEAK_FMA(11)
        "dec %0\n jnz 1b\n"
        : "+r"(i)
        :
        : "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9",
          "xmm10", "xmm11", "xmm12", "xmm13");
    printf("%s FMA peak %.1f GFLOP/s\n", HpllmKernelPath(),
           n * 12.0 * 2 * Simd::kLanes / (now() - t0) / 1e9);
  }
#endif
}
int main(int argc, char** argv) {
  const int64_t K = 768, N = 2048, tiles = N / kTile, group = 128;
  const int copies = argc > 2 ? atoi(argv[2]) : 8;
  std::vector<int8_t> w(copies * tiles * K * kTile);
  std::vector<uint8_t> packed(copies * tiles * K / 2 * kTile);
  std::vector<float> scale(tiles * kTile, 0.01f), gs(K / group * tiles * kTile, 0.01f);
  for (size_t i = 0; i < w.size(); ++i) w[i] = (int8_t)(i % 255 - 127);
  for (size_t i = 0; i < packed.size(); ++i) packed[i] = (uint8_t)(i * 7 % 251);
  std::vector<float> x(256 * 2048), y(256 * 2048);
  for (size_t i = 0; i < x.size(); ++i) x[i] = (i % 7) * 0.1f - 0.3f;
  std::string what = argc > 1 ? argv[1] : "dec";
  if (what == "peak") {
    fma_peak();
    return 0;
  }
  if (what == "dec") {
    for (int round = 0; round < 3; ++round) {
      double best4 = 1e9, best8 = 1e9;
      for (int rep = 0; rep < 20; ++rep) {
        double t0 = now();
        for (int c = 0; c < copies; ++c)
          for (int64_t t = 0; t < tiles; ++t) {
            float out[1][kTile];
            int4_tile<1>(x.data(), K, packed.data() + (c * tiles + t) * (K / 2) * kTile, gs.data() + t * kTile, tiles * kTile, K, group, out);
            y[t] += out[0][5];
          }
        best4 = std::min(best4, now() - t0);
        t0 = now();
        for (int c = 0; c < copies; ++c)
          for (int64_t t = 0; t < tiles; ++t) {
            float out[1][kTile];
            int8_tile<1>(x.data(), K, w.data() + (c * tiles + t) * K * kTile, scale.data() + t * kTile, K, out);
            y[t] += out[0][5];
          }
        best8 = std::min(best8, now() - t0);
      }
      double wts = copies * (double)K * N;
      printf("%s batch1: int4 %.2f Gw/s (%.1f GB/s)  int8 %.2f Gw/s\n", HpllmKernelPath(), wts / best4 / 1e9, wts / 2 / best4 / 1e9, wts / best8 / 1e9);
    }
  } else {
    const int64_t M = argc > 2 ? atoi(argv[2]) : 128;
    const int dq = what == "gemm2" ? 2 : 1;
    for (int round = 0; round < 3; ++round) {
      double b4 = 1e9, b8 = 1e9;
      for (int rep = 0; rep < 10; ++rep) {
        double t0 = now();
        for (int64_t m0 = 0; m0 < M; m0 += kRowBlock)
          for (int64_t t = 0; t < tiles; ++t) {
            const uint8_t* pt = packed.data() + t * (K / 2) * kTile;
            tile_batched_rows(t, m0, std::min(kRowBlock, M - m0), K, N, x.data(), y.data(),
              [&](int64_t k0, int64_t kn, int64_t c0, float* panel) { for (int i = 0; i < dq; ++i) dequantize_int4(pt, gs.data() + t * kTile, tiles * kTile, group, k0, kn, c0, panel); }, nullptr);
          }
        b4 = std::min(b4, now() - t0);
        t0 = now();
        for (int64_t m0 = 0; m0 < M; m0 += kRowBlock)
          for (int64_t t = 0; t < tiles; ++t) {
            const int8_t* wt = w.data() + t * K * kTile;
            tile_batched_rows(t, m0, std::min(kRowBlock, M - m0), K, N, x.data(), y.data(),
              [&](int64_t k0, int64_t kn, int64_t c0, float* panel) { for (int i = 0; i < dq; ++i) dequantize_int8(wt, k0, kn, c0, panel); }, scale.data() + t * kTile);
          }
        b8 = std::min(b8, now() - t0);
      }
      double fl = 2.0 * M * K * N;
      printf("%s gemm M=%ld: int4 %.1f GFLOP/s  int8 %.1f GFLOP/s\n", HpllmKernelPath(), M, fl / b4 / 1e9, fl / b8 / 1e9);
    }
  }
}
