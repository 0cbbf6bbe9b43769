// How long one AMX tile load (16 rows of 64 bytes, 1 KiB, rows contiguous) takes from each level
// of the memory hierarchy: one thread loads every 1 KiB operand of a buffer in turn, four tile
// registers in rotation, no TDPBSSD; buffers of 16 KiB (L1) to 64 MiB (memory), best of 5
// passes over 64 MiB in all.
//
//   g++ -O3 -march=native -std=c++17 -w \
//       -I"$(.venv/bin/python -c 'import jax; print(jax.ffi.include_dir())')" \
//       bench/amx_tile_loads.cc -o /tmp/amx_tile_loads
//   flock /tmp/hpllm-bench.lock taskset -c 1 /tmp/amx_tile_loads
#include "../infer/kernels/int8_matvec.cc"
#include <chrono>
#include <cstdio>
#if !defined(HPLLM_AMX)
int main() { std::puts("this build has no AMX route (needs -march=native on an AMX CPU)"); }
#else
namespace {
double wall() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}
}  // namespace

int main() {
  if (!amx_permitted()) return std::puts("the OS does not grant AMX to this process"), 1;
  const AmxConfig config;
  _tile_loadconfig(&config);
  for (int64_t kib : {16, 32, 256, 1024, 8192, 65536}) {
    const int64_t operands = kib;
    int8_t* buffer = static_cast<int8_t*>(std::aligned_alloc(64, kib * 1024));
    std::memset(buffer, 1, kib * 1024);
    const int64_t passes = std::max<int64_t>(1, 65536 / kib);
    double best = 1e9;
    for (int round = 0; round < 5; ++round) {
      const double t0 = wall();
      for (int64_t pass = 0; pass < passes; ++pass)
        for (int64_t i = 0; i < operands; i += 4) {
          _tile_loadd(0, buffer + i * 1024, 64);
          _tile_loadd(1, buffer + (i + 1) * 1024, 64);
          _tile_loadd(2, buffer + (i + 2) * 1024, 64);
          _tile_loadd(3, buffer + (i + 3) * 1024, 64);
        }
      best = std::min(best, (wall() - t0) / (passes * operands));
    }
    std::printf("buffer %6ld KiB: %.2f ns per 1 KiB tile load\n", kib, best * 1e9);
    std::free(buffer);
  }
  _tile_release();
}
#endif
