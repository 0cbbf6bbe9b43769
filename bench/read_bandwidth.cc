// Read-only memory bandwidth on 1 and 2 threads: what one core alone can stream, against the
// copy bandwidth `python -m infer bench` measures (docs/performance.md, issue 15's fourth round).
//
//   g++ -O3 -march=native -pthread bench/read_bandwidth.cc -o /tmp/read_bandwidth && \
//     flock /tmp/hpllm-bench.lock /tmp/read_bandwidth
//
// Sums a 110 MiB buffer (the int8 weights of `base`, LM head included) with four independent
// 512-bit byte-add chains; 5 runs per thread count, each run's GB/s printed. Needs AVX-512BW.
#include <immintrin.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>

int main() {
  const size_t n = size_t{110} << 20;
  char* buf = static_cast<char*>(aligned_alloc(64, n));
  memset(buf, 1, n);
  for (int threads = 1; threads <= 2; ++threads) {
    for (int rep = 0; rep < 5; ++rep) {
      std::vector<std::thread> workers;
      volatile int sink = 0;
      const auto t0 = std::chrono::steady_clock::now();
      for (int t = 0; t < threads; ++t)
        workers.emplace_back([&, t] {
          const size_t lo = n / threads * t, hi = n / threads * (t + 1);
          __m512i b0 = _mm512_setzero_si512(), b1 = b0, b2 = b0, b3 = b0;
          for (size_t i = lo; i < hi; i += 256) {
            b0 = _mm512_add_epi8(b0, _mm512_load_si512(buf + i));
            b1 = _mm512_add_epi8(b1, _mm512_load_si512(buf + i + 64));
            b2 = _mm512_add_epi8(b2, _mm512_load_si512(buf + i + 128));
            b3 = _mm512_add_epi8(b3, _mm512_load_si512(buf + i + 192));
          }
          sink += _mm512_reduce_add_epi32(
              _mm512_add_epi32(_mm512_add_epi32(b0, b1), _mm512_add_epi32(b2, b3)));
        });
      for (auto& w : workers) w.join();
      const double s =
          std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      printf("threads %d: %.1f GB/s\n", threads, n / s / 1e9);
    }
  }
}
