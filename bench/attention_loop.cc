// The decode attention of a batch-16 `base` step outside JAX, on one thread: `attend_run` of
// infer/kernels/int8_matvec.cc (the work of one task) for 16 rows x 12 layers of a bf16 cache
// (12 heads of 64, 256 slots), each row seeing its first `slots` slots (default 81). With
// `flush`, 32 MiB of other memory is touched before each layer, as a step's weights pass through
// the caches between two layers' attention (its time is not counted). Prints ms per step (the
// mean of 10 steps) for 5 rounds, and the GB/s of keys and values read.
//
//   g++ -O3 -march=native -std=c++17 -w \
//       -I"$(.venv/bin/python -c 'import jax; print(jax.ffi.include_dir())')" \
//       bench/attention_loop.cc -o /tmp/attention_loop
//   flock /tmp/hpllm-bench.lock taskset -c 1 /tmp/attention_loop 81 [flush]
//
// Another copy of the kernel source (e.g. one with a change to try) builds with
// -DKERNEL_SOURCE='"/path/to/int8_matvec.cc"'.
#ifndef KERNEL_SOURCE
#define KERNEL_SOURCE "../infer/kernels/int8_matvec.cc"
#endif
#include KERNEL_SOURCE
#include <chrono>
#include <cstdio>
#include <vector>
#if !defined(HPLLM_PATH_AVX512) && !defined(HPLLM_PATH_AVX2)
int main() { std::puts("build with -march=native (an AVX2 or AVX-512 CPU)"); }
#else
namespace {
double wall() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}
}  // namespace

int main(int argc, char** argv) {
  constexpr int64_t kRows = 16, kSlots = 256, kHeads = 12, kHeadDim = 64, kLayers = 12;
  const int64_t seen = argc > 1 ? atoi(argv[1]) : 81;
  const bool flush = argc > 2;
  const int64_t row_elements = kSlots * kHeads * kHeadDim;
  const AttentionShape shape{kHeads, kHeadDim, kSlots, kHeads};
  std::vector<std::vector<uint16_t>> k(kLayers), v(kLayers);
  for (int64_t l = 0; l < kLayers; ++l) {
    k[l].resize(kRows * row_elements);
    v[l].resize(kRows * row_elements);
    for (int64_t i = 0; i < kRows * row_elements; ++i) {  // bf16 values in [-1, 1)
      const uint32_t hash = static_cast<uint32_t>(i * 2654435761u + l * 97);
      const float value = (hash >> 8) % 2000 / 1000.0f - 1.0f;
      uint32_t bits;
      std::memcpy(&bits, &value, 4);
      k[l][i] = static_cast<uint16_t>(bits >> 16);
      v[l][i] = static_cast<uint16_t>((bits >> 16) ^ 1u);
    }
  }
  std::vector<float> q(kRows * kHeads * kHeadDim, 0.5f), scores(seen * kHeads);
  std::vector<float> top(kHeads), total(kHeads), acc(kHeads * kHeadDim);
  std::vector<int32_t> slots(kSlots);
  for (int64_t t = 0; t < kSlots; ++t) slots[t] = static_cast<int32_t>(t);
  std::vector<float> other(int64_t{8} << 20);  // 32 MiB
  for (int round = 0; round < 5; ++round) {
    double flushing = 0;
    const double t0 = wall();
    for (int step = 0; step < 10; ++step)
      for (int64_t l = 0; l < kLayers; ++l) {
        if (flush) {
          const double f0 = wall();
          for (size_t i = 0; i < other.size(); i += 16) other[i] += 1.0f;
          flushing += wall() - f0;
        }
        for (int64_t b = 0; b < kRows; ++b)
          attend_run<uint16_t>(shape, q.data() + b * kHeads * kHeadDim,
                               k[l].data() + b * row_elements, v[l].data() + b * row_elements,
                               nullptr, nullptr, slots.data(), seen, true, scores.data(),
                               top.data(), total.data(), acc.data());
      }
    const double per_step = (wall() - t0 - flushing) / 10;
    std::printf("%.2f ms per step (16 rows x 12 layers x %ld slots), %.1f GB/s\n",
                per_step * 1e3, seen, kRows * kLayers * seen * 4.0 * row_elements / kSlots /
                                          per_step / 1e9);
  }
}
#endif
