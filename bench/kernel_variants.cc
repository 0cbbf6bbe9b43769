// Micro-benchmark of the native matvec kernels' design choices (infer/kernels/int8_matvec.cc),
// outside JAX, on base's matrix shapes:
//
//   g++ -O3 -march=native -fopenmp -std=c++17 -w \
//       -I"$(.venv/bin/python -c 'import jax; print(jax.ffi.include_dir())')" \
//       bench/kernel_variants.cc -o /tmp/kernel_variants
//   flock /tmp/hpllm-bench.lock /tmp/kernel_variants
//
// The same with -march=x86-64-v3 (the AVX2 path) and with -DHPLLM_PORTABLE (portable loops);
// bench/kernel_paths.sh builds and runs all three.
//
// 1. Weight layout, int8, one activation row, tiles split over 2 OpenMP threads: the shipped
//    tile kernel on the tiled layout [N/128][K][128] against the same arithmetic walking the
//    checkpoint's plain [K][N] layout tile by tile (the first version of the kernel).
// 2. Rows per pass over a tile, int8, one thread: 8 activation rows as two passes of 4
//    (kRowChunk) against one pass of 8 (the weight GB/s counts the bytes each reads).
// 3. The instruction path this build compiled (AVX-512, AVX2 or portable: build it three
//    times, see below), int8 and int4 (group 128), 1 and 4 rows, one thread.
//
// Each call multiplies by a different copy of the weights (~300 MB in all), so they come from
// memory, as in decoding, not from cache. Figures: median over 7 rounds of the time per call,
// and the weight bytes read per second.
#include "../infer/kernels/int8_matvec.cc"

#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <functional>
#include <vector>

namespace {

constexpr int64_t kWorkingSet = 300'000'000;

// The first kernel's access pattern: tile n0 of the plain [K][N] layout, rows N bytes apart.
void int8_tile_plain_layout(const float* x, const int8_t* w, const float* scale, int64_t K,
                            int64_t N, int64_t n0, float* y) {
  float acc[kTile] = {};
  for (int64_t k = 0; k < K; ++k) {
    const int8_t* row = w + k * N + n0;
    const float xv = x[k];
#pragma omp simd
    for (int64_t j = 0; j < kTile; ++j) acc[j] += xv * static_cast<float>(row[j]);
  }
  for (int64_t j = 0; j < kTile; ++j) y[n0 + j] = acc[j] * scale[n0 + j];
}

// Median seconds per call of `call(copy)` over `copies` weight copies, 7 rounds.
double seconds_per_call(int64_t copies, const std::function<void(int64_t)>& call) {
  std::vector<double> rounds;
  for (int round = 0; round < 7; ++round) {
    const auto start = std::chrono::steady_clock::now();
    for (int64_t c = 0; c < copies; ++c) call(c);
    rounds.push_back(
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() / copies);
  }
  std::sort(rounds.begin(), rounds.end());
  return rounds[rounds.size() / 2];
}

void report(const char* what, int64_t K, int64_t N, double seconds, double weight_bytes) {
  std::printf("| %s | %ld x %ld | %.1f | %.1f |\n", what, K, N, seconds * 1e6,
              weight_bytes / seconds / 1e9);
}

}  // namespace

int main() {
  struct Shape {
    int64_t K, N;
  };
  const std::vector<Shape> shapes = {{768, 768}, {768, 2048}, {2048, 768}, {768, 32000}};
  std::printf("| variant | K x N | us per call | weight GB/s |\n|---|---|---|---|\n");

  for (const Shape s : shapes) {  // 1. layout
    const int64_t tiles = s.N / kTile, size = s.K * s.N;
    const int64_t copies = std::max<int64_t>(1, kWorkingSet / size);
    std::vector<int8_t> w(copies * size);
    for (size_t i = 0; i < w.size(); ++i) w[i] = static_cast<int8_t>(i * 2654435761u >> 25);
    std::vector<float> x(s.K, 0.5f), scale(s.N, 0.01f), y(s.N);
    const double plain = seconds_per_call(copies, [&](int64_t c) {
#pragma omp parallel for num_threads(2) schedule(static)
      for (int64_t t = 0; t < tiles; ++t)
        int8_tile_plain_layout(x.data(), w.data() + c * size, scale.data(), s.K, s.N, t * kTile,
                               y.data());
    });
    // Same bytes read as tiles: only the layout differs.
    const double tiled = seconds_per_call(copies, [&](int64_t c) {
#pragma omp parallel for num_threads(2) schedule(static)
      for (int64_t t = 0; t < tiles; ++t)
        int8_tile<1>(x.data(), s.K, w.data() + c * size + t * s.K * kTile,
                     scale.data() + t * kTile, s.K,
                     reinterpret_cast<float (*)[kTile]>(y.data() + t * kTile));
    });
    report("int8, 1 row, 2 threads, plain [K][N] layout", s.K, s.N, plain, size);
    report("int8, 1 row, 2 threads, tiled layout", s.K, s.N, tiled, size);
  }

  {  // 2. rows per pass, and 3. int4 unpacking, on 768 x 768
    const int64_t K = 768, N = 768, tiles = N / kTile, group = 128, size = K * N;
    const int64_t copies = kWorkingSet / size;
    std::vector<int8_t> w(copies * size, 3);
    std::vector<uint8_t> packed(copies * size / 2, 0x3a);
    std::vector<float> x(8 * K, 0.5f), scale(K / group * N, 0.01f);
    float out[8][kTile];
    auto int8_rows = [&](auto rows) {
      return seconds_per_call(copies, [&](int64_t c) {
        for (int64_t t = 0; t < tiles; ++t)
          int8_tile<decltype(rows)::value>(x.data(), K, w.data() + c * size + t * K * kTile,
                                           scale.data() + t * kTile, K, out);
      });
    };
    const double four = int8_rows(std::integral_constant<int64_t, 4>{});
    const double eight = int8_rows(std::integral_constant<int64_t, 8>{});
    report("int8, 8 rows as two passes of 4, 1 thread", K, N, 2 * four, 2.0 * size);
    report("int8, 8 rows in one pass, 1 thread", K, N, eight, size);

    // 3. This build's instruction path (HpllmKernelPath), int8 and int4, 1 and 4 rows.
    auto int8 = [&](auto rows) {
      constexpr int64_t R = decltype(rows)::value;
      return seconds_per_call(copies, [&](int64_t c) {
        for (int64_t t = 0; t < tiles; ++t)
          int8_tile<R>(x.data(), K, w.data() + c * size + t * K * kTile,
                       scale.data() + t * kTile, K, out);
      });
    };
    auto int4 = [&](auto rows) {
      constexpr int64_t R = decltype(rows)::value;
      return seconds_per_call(copies, [&](int64_t c) {
        for (int64_t t = 0; t < tiles; ++t)
          int4_tile<R>(x.data(), K, packed.data() + c * size / 2 + t * (K / 2) * kTile,
                       scale.data() + t * kTile, N, K, group, out);
      });
    };
    const auto one = std::integral_constant<int64_t, 1>{};
    const auto four_rows = std::integral_constant<int64_t, 4>{};
    char name[96];
    const char* path = HpllmKernelPath();
    std::snprintf(name, sizeof name, "int8, 1 row, 1 thread, %s", path);
    report(name, K, N, int8(one), size);
    std::snprintf(name, sizeof name, "int8, 4 rows, 1 thread, %s", path);
    report(name, K, N, int8(four_rows), size);
    std::snprintf(name, sizeof name, "int4, 1 row, 1 thread, %s", path);
    report(name, K, N, int4(one), size / 2.0);
    std::snprintf(name, sizeof name, "int4, 4 rows, 1 thread, %s", path);
    report(name, K, N, int4(four_rows), size / 2.0);
  }
  return 0;
}
