// The two batched routes of the native int8 / int4 kernels (infer/kernels/int8_matvec.cc) at
// the same row counts, one thread, outside JAX: tile_few_rows (whole-tile blocks of 32 k-rows,
// the route below kGemmRows) against tile_batched_rows (the blocked GEMM on column panels, the
// route from kGemmRows), on base's MLP shapes. This is where kGemmRows comes from. For int8,
// also the registers route (chunks of kMicroRows rows of the tile kernel, each weight widened
// in registers per chunk: what AMD CPUs run from kBatchRows rows, WIDEN_IN_REGISTERS), and,
// on a build with AVX-512 VNNI, the digits route for both (the activations as three int8
// digits, vpdpbusd: what AMD CPUs with AVX-512 VNNI run at every row count, DIGITS_ON_VNNI),
// the digits made in each call as the kernel makes them. GFLOP/s count the f32 products each
// route stands for (the digits route runs three int8 products for each).
//
//   g++ -O3 -march=native -fopenmp-simd -std=c++17 -w \
//       -I"$(.venv/bin/python -c 'import jax; print(jax.ffi.include_dir())')" \
//       bench/batched_routes.cc -o /tmp/batched_routes
//   flock /tmp/hpllm-bench.lock /tmp/batched_routes [rows,rows,...]
//
// (-march=x86-64-v3 for the AVX2 path.) The weights (1.5 MB) stay in L2 across calls, as a
// prompt's do across its row blocks. Figures: the minimum over 30 calls of the thread's CPU
// time per product (robust to other processes taking the core between calls), in GFLOP/s.
#include "../infer/kernels/int8_matvec.cc"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <string>
#include <vector>

namespace {

double cpu_seconds() {
  timespec t;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
  return t.tv_sec + 1e-9 * t.tv_nsec;
}

// GFLOP/s of `product` (one call computes M x K x N).
template <typename Product>
double gflops(int64_t M, int64_t K, int64_t N, const Product& product) {
  double best = 1e9;
  for (int rep = 0; rep < 30; ++rep) {
    const double start = cpu_seconds();
    product();
    best = std::min(best, cpu_seconds() - start);
  }
  return 2.0 * M * K * N / best / 1e9;
}

}  // namespace

int main(int argc, char** argv) {
#if !defined(HPLLM_PATH_AVX512) && !defined(HPLLM_PATH_AVX2)
  std::puts("the batched routes exist on the AVX-512 and AVX2 paths only");
  return 0;
#else
  std::vector<int64_t> rows_list = {8, 16, 32, 48, 64, 96, 128};
  if (argc > 1) {
    rows_list.clear();
    for (std::string rest = argv[1]; !rest.empty();) {
      const size_t comma = rest.find(',');
      rows_list.push_back(std::stol(rest.substr(0, comma)));
      rest = comma == std::string::npos ? "" : rest.substr(comma + 1);
    }
  }
  double load = 0;
  if (FILE* f = std::fopen("/proc/loadavg", "r")) {
    if (std::fscanf(f, "%lf", &load) != 1) load = 0;
    std::fclose(f);
  }
  std::printf("path %s, one thread, load %.1f before\n", HpllmKernelPath(), load);
  std::puts("| weights | K x N | rows | few-rows route GFLOP/s | GEMM route GFLOP/s "
            "| GEMM / few | registers route GFLOP/s | digits route GFLOP/s |");
  std::puts("|---|---|---|---|---|---|---|---|");
  const int64_t shapes[2][2] = {{768, 2048}, {2048, 768}}, group = 128;
  for (const char* scheme : {"int8", "int4"}) {
    const bool int8 = scheme[3] == '8';
    for (const auto& shape : shapes) {
      const int64_t K = shape[0], N = shape[1], tiles = N / kTile;
      std::vector<int8_t> w(tiles * K * kTile);
      std::vector<uint8_t> packed(tiles * K / 2 * kTile);
      std::vector<float> scale(tiles * kTile, 0.01f), group_scale(K / group * tiles * kTile, 0.01f);
      for (size_t i = 0; i < w.size(); ++i) w[i] = static_cast<int8_t>(i % 255 - 127);
      for (size_t i = 0; i < packed.size(); ++i) packed[i] = static_cast<uint8_t>(i % 251);
      for (const int64_t M : rows_list) {
        std::vector<float> x(M * K), y(M * N);
        for (size_t i = 0; i < x.size(); ++i) x[i] = (i % 7) * 0.1f;
        auto few = [&] {
          for (int64_t t = 0; t < tiles; ++t)
            for (int64_t m0 = 0; m0 < M; m0 += kGemmRows - 1) {  // it holds < kGemmRows rows
              const int64_t rows = std::min(kGemmRows - 1, M - m0);
              const float* xm = x.data() + m0 * K;
              float* ym = y.data() + m0 * N;
              if (int8) {
                const int8_t* wt = w.data() + t * K * kTile;
                tile_few_rows(t, rows, K, N, xm, ym,
                              [&](int64_t k0, int64_t kn, float (*wf)[kTile]) {
                                dequantize_int8(wt, k0, kn, wf);
                              }, scale.data() + t * kTile);
              } else {
                const uint8_t* pt = packed.data() + t * (K / 2) * kTile;
                tile_few_rows(t, rows, K, N, xm, ym,
                              [&](int64_t k0, int64_t kn, float (*wf)[kTile]) {
                                dequantize_int4(pt, group_scale.data() + t * kTile,
                                                tiles * kTile, group, k0, kn, wf);
                              }, nullptr);
              }
            }
        };
        auto gemm = [&] {
          for (int64_t m0 = 0; m0 < M; m0 += kRowBlock)
            for (int64_t t = 0; t < tiles; ++t) {
              const int64_t rows = std::min(kRowBlock, M - m0);
              if (int8) {
                const int8_t* wt = w.data() + t * K * kTile;
                tile_batched_rows(t, m0, rows, K, N, x.data(), y.data(),
                                  [&](int64_t k0, int64_t kn, int64_t c0, float* panel) {
                                    dequantize_int8(wt, k0, kn, c0, panel);
                                  }, scale.data() + t * kTile);
              } else {
                const uint8_t* pt = packed.data() + t * (K / 2) * kTile;
                tile_batched_rows(t, m0, rows, K, N, x.data(), y.data(),
                                  [&](int64_t k0, int64_t kn, int64_t c0, float* panel) {
                                    dequantize_int4(pt, group_scale.data() + t * kTile,
                                                    tiles * kTile, group, k0, kn, c0, panel);
                                  }, nullptr);
              }
            }
        };
        auto registers = [&] {
          for (int64_t t = 0; t < tiles; ++t)
            tile_all_rows<Simd::kMicroRows>(t, M, N, y.data(), [&](int64_t m, int64_t chunk,
                                                                   float (*out)[kTile]) {
              with_micro_rows(chunk, [&](auto r) {
                constexpr int64_t kRows = decltype(r)::value;
                int8_tile_simd<kRows, registers_route_vectors(kRows)>(
                    x.data() + m * K, K, w.data() + t * K * kTile, scale.data() + t * kTile, K,
                    out);
              });
            });
        };
        const double few_rate = gflops(M, K, N, few), gemm_rate = gflops(M, K, N, gemm);
        char registers_rate[16] = "-", digits_rate[16] = "-";
        if (int8) std::snprintf(registers_rate, sizeof registers_rate, "%.1f",
                                gflops(M, K, N, registers));
#if defined(HPLLM_VNNI_DIGITS)
        // The weights in the digits routes' layouts (any bytes: the timing does not depend on
        // them), the groups of int4's scales.
        const int64_t stride = K, groups = int8 ? 1 : K / group;
        std::vector<uint8_t> w_digits(int8 ? tiles * K * kTile : tiles * K / 2 * kTile);
        for (size_t i = 0; i < w_digits.size(); ++i) w_digits[i] = static_cast<uint8_t>(i % 253);
        std::vector<int8_t> digits(kDigits * M * stride);
        std::vector<float> row_scale(M);
        std::vector<int32_t> digit_sums(M * groups * kDigits);
        auto digits_route = [&] {
          vnni_digit_rows(x.data(), M, K, stride, groups, 0, M, digits.data(), row_scale.data(),
                          digit_sums.data());
          for (int64_t half = 0; half < 2 * tiles; ++half)
            if (int8)
              vnni_int8_half(half, digits.data(), row_scale.data(), digit_sums.data(), M, stride,
                             N, w_digits.data(), scale.data(), y.data());
            else
              vnni_int4_half(half, digits.data(), row_scale.data(), digit_sums.data(), M, stride,
                             groups, N, w_digits.data(), group_scale.data(), tiles * kTile,
                             y.data());
        };
        std::snprintf(digits_rate, sizeof digits_rate, "%.1f", gflops(M, K, N, digits_route));
#endif
        std::printf("| %s | %ld x %ld | %ld | %.1f | %.1f | %.2f | %s | %s |\n", scheme, K, N, M,
                    few_rate, gemm_rate, gemm_rate / few_rate, registers_rate, digits_rate);
      }
    }
  }
  return 0;
#endif
}
