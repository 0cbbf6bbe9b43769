// An int4 "digits" route for AVX2 builds, tried in the twelfth sitting and not shipped, against
// the shipped AVX2 batch-1 int4 route (int4_tile<1>, the FMA route of
// infer/kernels/int8_matvec.cc), one thread, outside JAX, base's 768 x 2048 shape.
//
// The route: the f32 activations as the AVX-512 VNNI routes' three int8 digits (made here on
// eight lanes, the same operations in the same order), int4 weights in TiledVnniInt4Weight's
// layout (64-column halves of w4a8's offset-nibble octs), and vpmaddubsw + vpmaddwd by ones in
// place of vpdpbusd (a nibble times a digit, two summed, is at most 2 x 15 x 127: no int16
// saturation; the low and high nibbles' pairs are added in int16, at most 7620). One row takes
// 32 columns per pass (3 digits x 4 vectors = 12 accumulators); a group's second pass reads it
// from L1. Each call makes its digits and the digit sums per group, as the shipped routes do.
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
#include <numeric>
#include <vector>
#if !defined(HPLLM_PATH_AVX2)
#error "build this with -march=x86-64-v3: it times the AVX2 path"
#endif
static double now() { timespec t; clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t); return t.tv_sec + 1e-9 * t.tv_nsec; }
namespace {
constexpr int64_t kDigits = 3;
constexpr float kDigitBase = 254.0f;
constexpr int64_t kHalf = 64;  // kVnniHalf

// The activations' digits, as infer/kernels/int8_matvec.cc's activation_digits makes them on
// sixteen lanes.
inline float reduce_max(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}

inline __m256 load_first(const float* p, int64_t n) {  // p[0 .. min(n, 8) - 1], zeros after
  if (n >= 8) return _mm256_loadu_ps(p);
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_maskload_ps(p, _mm256_cmpgt_epi32(_mm256_set1_epi32(n), lanes));
}

void avx2_activation_digits(const float* x, int64_t M, int64_t K, int64_t rows, int64_t stride,
                       int64_t first, int64_t last, int8_t* digits, float* row_scale) {
  for (int64_t d = 0; d < kDigits; ++d)
    std::memset(digits + (d * rows + first) * stride, 0, (last - first) * stride);
  std::fill(row_scale + first, row_scale + last, 0.0f);
  const __m256 base = _mm256_set1_ps(kDigitBase);
  const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  for (int64_t r = first; r < std::min(last, M); ++r) {
    const float* xr = x + r * K;
    __m256 top = _mm256_setzero_ps(), non_finite = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k += 8) {
      const __m256 v = load_first(xr + k, K - k);
      top = _mm256_max_ps(top, _mm256_and_ps(v, magnitude));
      non_finite = _mm256_add_ps(non_finite, _mm256_mul_ps(v, _mm256_setzero_ps()));
    }
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, non_finite);
    if (std::isnan(std::accumulate(lanes, lanes + 8, 0.0f))) {
      row_scale[r] = std::numeric_limits<float>::quiet_NaN();
      continue;
    }
    const float largest = reduce_max(top);
    if (largest == 0.0f) continue;
    row_scale[r] = largest / 127.0f;
    const __m256 inverse = _mm256_set1_ps(127.0f / largest);
    for (int64_t k = 0; k < K; k += 8) {
      __m256 rest = _mm256_mul_ps(load_first(xr + k, K - k), inverse);
      for (int64_t d = 0; d < kDigits; ++d) {
        const __m256 digit = _mm256_round_ps(rest, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        const __m256i whole = _mm256_cvtps_epi32(digit);  // in [-127, 127]: packing is exact
        const __m128i words = _mm_packs_epi32(_mm256_castsi256_si128(whole),
                                              _mm256_extracti128_si256(whole, 1));
        alignas(16) int8_t bytes[16];
        _mm_store_si128(reinterpret_cast<__m128i*>(bytes), _mm_packs_epi16(words, words));
        std::memcpy(digits + (d * rows + r) * stride + k, bytes, std::min<int64_t>(8, K - k));
        rest = _mm256_mul_ps(_mm256_sub_ps(rest, digit), base);
      }
    }
  }
}


void digit_rows(const float* x, int64_t K, int64_t groups, int8_t* digits, float* row_scale,
                int32_t* digit_sums) {
  avx2_activation_digits(x, 1, K, 1, K, 0, 1, digits, row_scale);
  const int64_t group_k = K / groups;
  for (int64_t g = 0; g < groups; ++g)
    for (int64_t d = 0; d < kDigits; ++d)
      digit_sums[g * kDigits + d] =
          std::accumulate(digits + d * K + g * group_k, digits + d * K + (g + 1) * group_k, 0);
}

// Rows per pass: 1 row x 4 vectors or 2 rows x 2 vectors (3 digits each).
constexpr int64_t kRows = 2;

// sums[r x 3 + d][c0 .. c0 + 8 Vectors - 1] = digit d of rows 0 .. Rows - 1 times `octs` octs of
// a half's nibbles (`w`: the group's first oct; 256 bytes per oct), columns c0 on. Prefetch
// (the first pass): 32 octs ahead into L2, as vnni_int4_group.

template <int64_t Rows, int64_t Vectors, bool Prefetch>
__attribute__((noinline)) void maddubs_int4_group(const int8_t* digits, int64_t stride,
                                                  int64_t digit_bytes, const uint8_t* w,
                                                  int64_t octs, int64_t c0,
                                                  int32_t (*sums)[kHalf]) {
  static_assert(kDigits * Rows * Vectors <= 12, "the accumulators fit the 16 registers");
  const __m256i low4 = _mm256_set1_epi8(0x0f);
#if !defined(HPLLM_W8A8_AVX_VNNI)
  const __m256i ones = _mm256_set1_epi16(1);
#endif
  __m256i acc[Rows][kDigits][Vectors];
  for (int64_t r = 0; r < Rows; ++r)
    for (int64_t d = 0; d < kDigits; ++d)
      for (int64_t v = 0; v < Vectors; ++v) acc[r][d][v] = _mm256_setzero_si256();
  for (int64_t o = 0; o < octs; ++o) {
    const uint8_t* row = w + o * kHalf * 4;
    if constexpr (Prefetch) prefetch_to_l2(row + 32 * kHalf * 4, kHalf * 4);
    for (int64_t v = 0; v < Vectors; ++v) {
      const __m256i bytes =
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + 4 * c0 + 32 * v));
      const __m256i lo = _mm256_and_si256(bytes, low4);
      const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low4);
      for (int64_t r = 0; r < Rows; ++r)
        for (int64_t d = 0; d < kDigits; ++d) {
          const int8_t* quad = digits + d * digit_bytes + r * stride + 8 * o;
          const __m256i x_lo = _mm256_set1_epi32(load_quad(quad));
          const __m256i x_hi = _mm256_set1_epi32(load_quad(quad + 4));
#if defined(HPLLM_W8A8_AVX_VNNI)
          acc[r][d][v] = _mm256_dpbusd_avx_epi32(_mm256_dpbusd_avx_epi32(acc[r][d][v], lo, x_lo),
                                                 hi, x_hi);
#else
          const __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(lo, x_lo),
                                                 _mm256_maddubs_epi16(hi, x_hi));
          acc[r][d][v] = _mm256_add_epi32(acc[r][d][v], _mm256_madd_epi16(pairs, ones));
#endif
        }
    }
  }
  for (int64_t r = 0; r < Rows; ++r)
    for (int64_t d = 0; d < kDigits; ++d)
      for (int64_t v = 0; v < Vectors; ++v)
        _mm256_store_si256(reinterpret_cast<__m256i*>(sums[r * kDigits + d] + c0 + 8 * v),
                           acc[r][d][v]);
}

// vnni_int4_half on AVX2: columns 64 half .. 64 half + 63 of y[M, N], the same sums combined
// in the same order (M rows of digits, `stride` apart).
void maddubs_int4_half(int64_t half, const int8_t* digits, const float* row_scale,
                       const int32_t* digit_sums, int64_t M, int64_t stride, int64_t groups,
                       int64_t N, const uint8_t* w, const float* scale, int64_t ld_scale,
                       float* y) {
  const int64_t octs = stride / 8, group_octs = octs / groups;
  const uint8_t* wh = w + half * octs * kHalf * 4;
  const int64_t c0 = half * kHalf, width = std::min(kHalf, N - c0);
  if (width <= 0) return;  // the padding half of the last tile
  alignas(32) int32_t sums[kRows * kDigits][kHalf];
  const __m256 inverse_base = _mm256_set1_ps(1.0f / kDigitBase);
  for (int64_t m = 0; m < M; m += kRows) {
    const int64_t rows = std::min(kRows, M - m);
    alignas(32) float total[kRows][kHalf];
    for (int64_t g = 0; g < groups; ++g) {
      with_rows_upto<kRows>(rows, [&](auto r) {
        constexpr int64_t R = decltype(r)::value, V = R == 1 ? 4 : 2;
        const int8_t* a = digits + m * stride + g * group_octs * 8;
        const uint8_t* group = wh + g * group_octs * kHalf * 4;
        for (int64_t c = 0; c < kHalf; c += 8 * V)
          if (m == 0 && c == 0)  // the first pass of the first rows streams the group
            maddubs_int4_group<R, V, true>(a, stride, M * stride, group, group_octs, c, sums);
          else
            maddubs_int4_group<R, V, false>(a, stride, M * stride, group, group_octs, c, sums);
      });
      for (int64_t r = 0; r < rows; ++r) {
        const int32_t* offsets = digit_sums + ((m + r) * groups + g) * kDigits;
        for (int64_t c = 0; c < kHalf; c += 8) {
          // exact_digits on eight lanes, then the group's scales, added up group by group.
          __m256 digit_sum[kDigits];
          for (int64_t d = 0; d < kDigits; ++d)
            digit_sum[d] = _mm256_cvtepi32_ps(_mm256_sub_epi32(
                _mm256_load_si256(reinterpret_cast<const __m256i*>(sums[r * kDigits + d] + c)),
                _mm256_set1_epi32(8 * offsets[d])));
          const __m256 exact = _mm256_fmadd_ps(
              _mm256_fmadd_ps(digit_sum[2], inverse_base, digit_sum[1]), inverse_base,
              digit_sum[0]);
          const __m256 part =
              _mm256_mul_ps(exact, _mm256_loadu_ps(scale + g * ld_scale + c0 + c));
          _mm256_store_ps(total[r] + c,
                          g == 0 ? part : _mm256_add_ps(_mm256_load_ps(total[r] + c), part));
        }
      }
    }
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < width; ++c) y[(m + r) * N + c0 + c] = total[r][c] * row_scale[m + r];
  }
}
}  // namespace

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
    digit_rows(x.data(), K, groups, digits.data(), &row_scale, digit_sums.data());
    for (int64_t h = 0; h < N / kHalf; ++h)
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
      const uint8_t b = octs[((n / kHalf) * (K / 8) + o) * kHalf * 4 + (n % kHalf) * 4 + j];
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
    printf("avx2 batch 1, %d copies: digits route %.2f G weights/s, FMA route (shipped) %.2f\n",
           copies, weights / best_digits / 1e9, weights / best_fma / 1e9);
  }
}
