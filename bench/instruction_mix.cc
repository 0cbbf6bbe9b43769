// What bounds the batch-1 int4 tile loop (infer/kernels/int8_matvec.cc, int4_tile_simd) on an
// AVX-512 CPU: the 512-bit instructions it issues per 16 weight bytes (a zero-extending load,
// two converts or a convert and a table lookup, an AND, two FMAs), each kind alone and mixed
// with 12 independent FMAs. If a mix costs no more than its FMAs, its other instructions run
// on other units; if it costs about (instructions / 2) cycles, the core is bound by how many
// 512-bit operations it issues, whichever units they use. On a Zen 4 (tenth sitting)
// every kind alone issues one per cycle, any one kind hides under the FMAs, and the
// mixes cost 0.50-0.55 cycles per instruction (36 in 17.9 FMA-cycles, 30 in 16.3):
// fewer instructions, not cheaper ones, is what speeds the loop. Broadcasts from memory are
// free beside the FMAs; two 512-bit stores are not (the batched routes' choice, see
// kBatchRows in the kernel source).
//
//   g++ -O2 -march=native bench/instruction_mix.cc -o /tmp/instruction_mix
//   flock /tmp/hpllm-bench.lock /tmp/instruction_mix
//
// One thread, best of 5 runs of 20 M iterations; needs AVX-512F. Cycles assume the clock
// that 12 FMAs (one per cycle on a Zen 4, two on an Intel core with two FMA units) give.
#include <algorithm>
#include <chrono>
#include <cstdio>

namespace {

alignas(64) unsigned char weight_bytes[4096];  // also the stores' target

#define FMA12                                                                                 \
  "vfmadd231ps %%zmm30,%%zmm31,%%zmm0\n vfmadd231ps %%zmm30,%%zmm31,%%zmm1\n"                 \
  "vfmadd231ps %%zmm30,%%zmm31,%%zmm2\n vfmadd231ps %%zmm30,%%zmm31,%%zmm3\n"                 \
  "vfmadd231ps %%zmm30,%%zmm31,%%zmm4\n vfmadd231ps %%zmm30,%%zmm31,%%zmm5\n"                 \
  "vfmadd231ps %%zmm30,%%zmm31,%%zmm6\n vfmadd231ps %%zmm30,%%zmm31,%%zmm7\n"                 \
  "vfmadd231ps %%zmm30,%%zmm31,%%zmm8\n vfmadd231ps %%zmm30,%%zmm31,%%zmm9\n"                 \
  "vfmadd231ps %%zmm30,%%zmm31,%%zmm10\n vfmadd231ps %%zmm30,%%zmm31,%%zmm11\n"
#define CVT6                                                                                  \
  "vcvtdq2ps %%zmm20,%%zmm12\n vcvtdq2ps %%zmm21,%%zmm13\n vcvtdq2ps %%zmm22,%%zmm14\n"      \
  "vcvtdq2ps %%zmm23,%%zmm15\n vcvtdq2ps %%zmm24,%%zmm16\n vcvtdq2ps %%zmm25,%%zmm17\n"
#define PERM6                                                                                 \
  "vpermps %%zmm29,%%zmm20,%%zmm12\n vpermps %%zmm29,%%zmm21,%%zmm13\n"                       \
  "vpermps %%zmm29,%%zmm22,%%zmm14\n vpermps %%zmm29,%%zmm23,%%zmm15\n"                       \
  "vpermps %%zmm29,%%zmm24,%%zmm16\n vpermps %%zmm29,%%zmm25,%%zmm17\n"
#define MOVZX6                                                                                \
  "vpmovzxbd (%1),%%zmm12\n vpmovzxbd 16(%1),%%zmm13\n vpmovzxbd 32(%1),%%zmm14\n"           \
  "vpmovzxbd 48(%1),%%zmm15\n vpmovzxbd 64(%1),%%zmm16\n vpmovzxbd 80(%1),%%zmm17\n"
#define STORE2 "vmovups %%zmm20,512(%1)\n vmovups %%zmm21,576(%1)\n"
#define BROADCAST6                                                                            \
  "vbroadcastss (%1),%%zmm12\n vbroadcastss 4(%1),%%zmm13\n vbroadcastss 8(%1),%%zmm14\n"  \
  "vbroadcastss 12(%1),%%zmm15\n vbroadcastss 16(%1),%%zmm16\n vbroadcastss 20(%1),%%zmm17\n"
#define AND6                                                                                  \
  "vpandd %%zmm20,%%zmm28,%%zmm12\n vpandd %%zmm21,%%zmm28,%%zmm13\n"                         \
  "vpandd %%zmm22,%%zmm28,%%zmm14\n vpandd %%zmm23,%%zmm28,%%zmm15\n"                         \
  "vpandd %%zmm24,%%zmm28,%%zmm16\n vpandd %%zmm25,%%zmm28,%%zmm17\n"

// Nanoseconds per iteration of `body` (best of 5).
#define TIME(label, instructions, body)                                                      \
  {                                                                                          \
    double best = 1e9;                                                                       \
    for (int run = 0; run < 5; ++run) {                                                      \
      long n = kIterations;                                                                  \
      const auto start = std::chrono::steady_clock::now();                                   \
      __asm__ volatile("1:\n" body "dec %0\n jnz 1b\n"                                       \
                       : "+r"(n)                                                             \
                       : "r"(weight_bytes)                                                   \
                       : "memory", "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6",   \
                         "xmm7", "xmm8", "xmm9", "xmm10", "xmm11", "xmm12", "xmm13",         \
                         "xmm14", "xmm15", "xmm16", "xmm17");                                \
      best = std::min(best, std::chrono::duration<double>(                                   \
                                std::chrono::steady_clock::now() - start).count());          \
    }                                                                                        \
    const double ns = best / kIterations * 1e9;                                              \
    if (fma_ns == 0) fma_ns = ns;                                                            \
    std::printf("| %s | %d | %.3f | %.1f |\n", label, instructions, ns, 12 * ns / fma_ns);   \
  }

constexpr long kIterations = 20'000'000;

}  // namespace

int main() {
  double fma_ns = 0;
  std::puts("| per iteration | 512-bit instructions | ns | FMA-cycles |");
  std::puts("|---|---|---|---|");
  TIME("12 FMA", 12, FMA12)
  TIME("6 vcvtdq2ps", 6, CVT6)
  TIME("6 vpermps", 6, PERM6)
  TIME("6 vpmovzxbd (load)", 6, MOVZX6)
  TIME("12 FMA + 6 vcvtdq2ps", 18, FMA12 CVT6)
  TIME("12 FMA + 6 vpermps", 18, FMA12 PERM6)
  TIME("12 FMA + 6 vpmovzxbd", 18, FMA12 MOVZX6)
  TIME("12 FMA + 6 vpandd", 18, FMA12 AND6)
  TIME("12 FMA + 6 vbroadcastss (load)", 18, FMA12 BROADCAST6)
  TIME("12 FMA + 2 zmm stores", 14, FMA12 STORE2)
  TIME("int4 loop before: 12 FMA + 12 vcvtdq2ps + 6 vpmovzxbd + 6 vpandd", 36,
       FMA12 CVT6 CVT6 MOVZX6 AND6)
  TIME("int4 loop now: 12 FMA + 6 vcvtdq2ps + 6 vpermps + 6 vpmovzxbd", 30,
       FMA12 CVT6 PERM6 MOVZX6)
}
