// The w4a8 kernel's integer blocks (infer/kernels/int8_matvec.cc, w4a8_block) on one thread,
// outside JAX: how close they run to vpdpbusd's own rate (bench/instruction_throughput.cc), and
// what the group flush to float adds. Also an alternative not kept: the block's nibbles unpacked
// once into low / high planes and a 6-row micro-kernel over them (no unpacking per row chunk).
//
//   g++ -O3 -march=x86-64-v4 -mavx512vnni -fopenmp-simd -std=c++17 -w -pthread \
//       -I"$(.venv/bin/python -c 'import jax; print(jax.ffi.include_dir())')" \
//       bench/w4a8_blocks.cc -o /tmp/w4a8_blocks
//   flock /tmp/hpllm-bench.lock /tmp/w4a8_blocks
//
// A 768 x 768 product (6 tiles, groups of 128 = 16 octs) whose weights stay in L2; figures are
// the minimum over 30 calls of the thread's CPU time, in int8 multiply-adds per ns (GMAC/s), and
// in the last two columns of wall-clock time: one thread, and two std::threads splitting the
// tiles (what a product on both cores could reach).
#include "../infer/kernels/int8_matvec.cc"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <ctime>
#include <thread>
#include <vector>

namespace {

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

double cpu_seconds() {
  timespec t;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
  return t.tv_sec + 1e-9 * t.tv_nsec;
}

// The alternative: a block pre-unpacked into planes [octs][low, high][128 x 4] (u8), 6 rows x 4
// vectors of accumulators.
template <int64_t Rows>
void w4a8_block_planes(const int8_t* qx, int64_t ldx, const uint8_t* planes, int64_t octs,
                       int32_t (*out)[kTile], bool first) {
  constexpr int64_t kVectors = 4;
  for (int64_t c0 = 0; c0 < kTile; c0 += kVectors * 16) {
    __m512i acc[Rows][kVectors];
    for (int64_t r = 0; r < Rows; ++r)
      for (int64_t v = 0; v < kVectors; ++v)
        acc[r][v] = first ? _mm512_setzero_si512() : _mm512_loadu_si512(out[r] + c0 + v * 16);
    for (int64_t o = 0; o < octs; ++o) {
      for (int64_t half = 0; half < 2; ++half) {
        const uint8_t* row = planes + ((o * 2 + half) * kTile + c0) * 4;
        __m512i wv[kVectors];
        for (int64_t v = 0; v < kVectors; ++v) wv[v] = _mm512_loadu_si512(row + v * 64);
        for (int64_t r = 0; r < Rows; ++r) {
          const __m512i xb = _mm512_set1_epi32(load_quad(qx + r * ldx + 8 * o + 4 * half));
          for (int64_t v = 0; v < kVectors; ++v) acc[r][v] = _mm512_dpbusd_epi32(acc[r][v], wv[v], xb);
        }
      }
    }
    for (int64_t r = 0; r < Rows; ++r)
      for (int64_t v = 0; v < kVectors; ++v) _mm512_storeu_si512(out[r] + c0 + v * 16, acc[r][v]);
  }
}
void unpack_planes(const uint8_t* w, int64_t octs, uint8_t* planes) {
  const __m512i low = _mm512_set1_epi8(15);
  for (int64_t o = 0; o < octs; ++o)
    for (int64_t c = 0; c < kTile * 4; c += 64) {
      const __m512i b = _mm512_loadu_si512(w + o * kTile * 4 + c);
      _mm512_storeu_si512(planes + (o * 2) * kTile * 4 + c, _mm512_and_si512(b, low));
      _mm512_storeu_si512(planes + (o * 2 + 1) * kTile * 4 + c, _mm512_and_si512(_mm512_srli_epi16(b, 4), low));
    }
}
}  // namespace

int main() {
#if !defined(HPLLM_W8A8_VNNI)
  std::puts("needs the VNNI path: -march=x86-64-v4 -mavx512vnni");
  return 0;
#else
  const int64_t K = 768, tiles = 6, octs = K / 8, group_octs = 16, groups = octs / group_octs;
  std::vector<uint8_t> w(tiles * octs * kTile * 4);
  for (size_t i = 0; i < w.size(); ++i) w[i] = static_cast<uint8_t>(i * 37 % 256);
  std::vector<float> scales(groups * tiles * kTile, 0.01f);
  alignas(64) static int32_t out[kSlabRows][kTile];
  alignas(64) static float acc[kSlabRows][kTile];
  alignas(64) static uint8_t planes[kW4A8BlockOcts * 2 * kTile * 4];
  alignas(64) static int32_t out_helper[kSlabRows][kTile];
  alignas(64) static float acc_helper[kSlabRows][kTile];
  std::puts("| rows | w4a8_block | w4a8_block + group flush | planes, 6 rows x 4 vectors | "
            "blocks + flush, wall, 1 thread | the same, 2 threads |");
  std::puts("|---|---|---|---|---|---|");
  for (const int64_t M : {16, 64, 128}) {
    std::vector<int8_t> x(M * K);
    for (size_t i = 0; i < x.size(); ++i) x[i] = static_cast<int8_t>(i * 13 % 255 - 127);
    // Tiles t0 .. t1 - 1, every slab and group as W4A8MatmulImpl runs them (`flush`: with the
    // float flush), into the caller's sums and accumulators.
    auto blocks = [&](bool flush, int64_t t0, int64_t t1, int32_t (*sums)[kTile],
                      float (*acc)[kTile]) {
      for (int64_t t = t0; t < t1; ++t)
        for (int64_t m0 = 0; m0 < M; m0 += kSlabRows) {
          const int64_t rows = std::min(kSlabRows, M - m0);
          for (int64_t g = 0; g < groups; ++g) {
            const int64_t o0 = g * group_octs;
            for (int64_t m = 0; m < rows; m += kW4A8Rows)
              with_rows_upto6(std::min(kW4A8Rows, rows - m), [&](auto r) {
                w4a8_block<decltype(r)::value>(x.data() + (m0 + m) * K + 8 * o0, K,
                                               w.data() + (t * octs + o0) * kTile * 4,
                                               group_octs, sums + m, true);
              });
            if (!flush) continue;
            const float* s = scales.data() + g * tiles * kTile + t * kTile;
            for (int64_t r = 0; r < rows; ++r) {
              const int32_t correction = 8 * static_cast<int32_t>(r + g);
              for (int64_t j = 0; j < kTile; ++j) {
                const float part = static_cast<float>(sums[r][j] - correction) * s[j];
                acc[r][j] = g == 0 ? part : acc[r][j] + part;
              }
            }
          }
        }
    };
    auto planes_route = [&] {
      for (int64_t t = 0; t < tiles; ++t)
        for (int64_t m0 = 0; m0 < M; m0 += kSlabRows) {
          const int64_t rows = std::min(kSlabRows, M - m0);
          for (int64_t o0 = 0; o0 < octs; o0 += group_octs) {
            unpack_planes(w.data() + (t * octs + o0) * kTile * 4, group_octs, planes);
            for (int64_t m = 0; m < rows; m += 6)
              with_rows_upto6(std::min<int64_t>(6, rows - m), [&](auto r) {
                w4a8_block_planes<decltype(r)::value>(x.data() + (m0 + m) * K + 8 * o0, K,
                                                      planes, group_octs, out + m, true);
              });
          }
        }
    };
    double best[3] = {1e9, 1e9, 1e9}, wall_one = 1e9, wall_two = 1e9;
    for (int rep = 0; rep < 30; ++rep) {  // the variants alternated
      double start = cpu_seconds();
      blocks(false, 0, tiles, out, acc);
      best[0] = std::min(best[0], cpu_seconds() - start);
      start = cpu_seconds();
      blocks(true, 0, tiles, out, acc);
      best[1] = std::min(best[1], cpu_seconds() - start);
      start = cpu_seconds();
      planes_route();
      best[2] = std::min(best[2], cpu_seconds() - start);
      // Wall clock, one thread against two std::threads that split the tiles (each with its
      // own sums; thread start included).
      auto wall = std::chrono::steady_clock::now();
      blocks(true, 0, tiles, out, acc);
      wall_one = std::min(wall_one, seconds_since(wall));
      wall = std::chrono::steady_clock::now();
      std::thread helper([&] { blocks(true, tiles / 2, tiles, out_helper, acc_helper); });
      blocks(true, 0, tiles / 2, out, acc);
      helper.join();
      wall_two = std::min(wall_two, seconds_since(wall));
    }
    const double macs = double(M) * K * tiles * kTile;
    std::printf("| %ld | %.0f | %.0f | %.0f | %.0f | %.0f |\n", M, macs / best[0] / 1e9,
                macs / best[1] / 1e9, macs / best[2] / 1e9, macs / wall_one / 1e9,
                macs / wall_two / 1e9);
  }
  std::printf("%d\n", acc[3][5] == 42.0f);  // keeps the flush live
  return 0;
#endif
}
