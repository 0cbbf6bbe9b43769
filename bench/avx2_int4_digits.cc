// The AVX2 int4 "digits" route (maddubs_int4_half of infer/kernels/int8_matvec.cc, what an
// AVX2 build runs for int4 weights at 1 to kBatchRows - 1 rows since the fourteenth sitting)
// against the FMA route it replaced there (int4_tile<1>, still the route for group sizes the
// digits layout does not take), one thread, outside JAX, base's 768 x 2048 shape.
//
// The digits route: the f32 activations as three int8 digits (vnni_digit_rows), int4 weights
// in TiledVnniInt4Weight's layout (64-column halves of w4a8's offset-nibble octs), and
// vpmaddubsw + vpmaddwd by ones in place of AVX-512's vpdpbusd (one 256-bit vpdpbusd where the
// build has AVX-VNNI: add -mavxvnni). Each call makes its digits and the digit sums per group,
// as the kernel does.
//
// `[copies]` copies of the weight (1: 0.75 MB of int4, in L2, the arithmetic alone; 8: 6 MB,
// from L3; 64: 48 MB, from memory). Prints G weights/s of each route (minimum thread CPU time
// of 20 calls, three rounds) and the digits route's largest error against a float64 product
// of the same nibbles, as a fraction of the digits' bound 2^-24 x max|x| x sum|w| (plus the
// f32 rounding of the group sums, so values up to a few units are expected).
//
//   g++ -O3 -march=x86-64-v3 -fopenmp-simd -std=c++17 -w \
//       -I"$(.venv/bin/python -c 'import jax; print(jax.ffi.include_dir())')" \
//       bench/avx2_int4_digits.cc -o /tmp/avx2_int4_digits
//   flock /tmp/hpllm-bench.lock /tmp/avx2_int4_digits 8
#ifndef KERNEL
#define KERNEL "../infer/kernels/int8_matvec.cc"
#endif
#include KERNEL
#include <cstdio>
#include <ctime>
#include <vector>
#if !defined(HPLLM_MADDUBS_DIGITS)
#error "build this with -march=x86-64-v3 (no AVX-512): it times the AVX2 digits route"
#endif
static double now() { timespec t; clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t); return t.tv_sec + 1e-9 * t.tv_nsec; }

int main(int argc, char** argv) {
  const int64_t K = 768, N = 2048, group = 128, groups = K / group, tiles = N / kTile;
  const int copies = argc > 1 ? atoi(argv[1]) : 8;
  const int64_t bytes = K / 2 * N;  // one copy, either layout
  std::vector<uint8_t> octs(copies * bytes), packed(copies * bytes);
  for (size_t i = 0; i < octs.size(); ++i) octs[i] = (uint8_t)(i * 7 % 251);
  for (size_t i = 0; i < packed.size(); ++i) packed[i] = (uint8_t)(i * 7 % 251);
  std::vector<float> scale(groups * N), x(K), y(N);
  for (size_t i = 0; i < scale.size(); ++i) scale[i] = 0.01f + 0.001f * (i % 13);
  for (int64_t k = 0; k < K; ++k) x[k] = std::sin(0.37f * k) * (k == 3 ? 1000.0f : 1.0f);
  std::vector<int8_t> digits(kDigits * K);
  std::vector<int32_t> digit_sums(groups * kDigits);
  float row_scale;
  auto digits_route = [&](int c) {
    vnni_digit_rows(x.data(), 1, K, K, groups, 0, 1, digits.data(), &row_scale,
                    digit_sums.data());
    for (int64_t h = 0; h < N / kVnniHalf; ++h)
      maddubs_int4_half(h, digits.data(), &row_scale, digit_sums.data(), 1, K, groups, N,
                        octs.data() + c * bytes, scale.data(), N, y.data());
  };
  // The digits route against float64 on copy 0: nibble byte j of column c in oct o holds
  // k = 8o + j (low) and 8o + 4 + j (high); half h holds columns 64h .. 64h + 63.
  digits_route(0);
  double worst = 0, top = 0;
  for (int64_t k = 0; k < K; ++k) top = std::max(top, (double)std::fabs(x[k]));
  for (int64_t n = 0; n < N; ++n) {
    double exact = 0, bound = 0;
    for (int64_t k = 0; k < K; ++k) {
      const int64_t o = k / 8, j = k % 8 % 4, high = k % 8 / 4;
      const uint8_t b = octs[((n / kVnniHalf) * (K / 8) + o) * kVnniHalf * 4 + (n % kVnniHalf) * 4 + j];
      const double w = (double)(((high ? b >> 4 : b) & 15) - 8) * scale[(k / group) * N + n];
      exact += x[k] * w;
      bound += std::fabs(w);
    }
    worst = std::max(worst, std::fabs(y[n] - exact) / (std::ldexp(1.0, -24) * top * bound));
  }
  printf("digits route: largest error %.2f x the digits' bound (x with a 1000x outlier)\n", worst);
  for (int round = 0; round < 3; ++round) {
    double best_digits = 1e9, best_fma = 1e9;
    for (int rep = 0; rep < 20; ++rep) {
      double t0 = now();
      for (int c = 0; c < copies; ++c) digits_route(c);
      best_digits = std::min(best_digits, now() - t0);
      t0 = now();
      for (int c = 0; c < copies; ++c)
        for (int64_t t = 0; t < tiles; ++t) {
          float out[1][kTile];
          int4_tile<1>(x.data(), K, packed.data() + c * bytes + t * (K / 2) * kTile,
                       scale.data() + t * kTile, N, K, group, out);
          y[t] += out[0][5];
        }
      best_fma = std::min(best_fma, now() - t0);
    }
    const double weights = copies * (double)K * N;
    printf("avx2 batch 1, %d copies: digits route %.2f G weights/s, FMA route %.2f\n",
           copies, weights / best_digits / 1e9, weights / best_fma / 1e9);
  }
}
