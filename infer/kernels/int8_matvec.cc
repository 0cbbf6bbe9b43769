// y[M, N] = x[M, K] @ dequantize(w) for int8 (per-column scales) and packed int4 (group scales)
// weights, f32 activations, small M (decoding).
//
// XLA's CPU backend turns a dot with an int8 (or bf16) operand into "convert the whole weight
// to f32 in a temporary buffer, then an f32 dot": that reads 1 byte, writes 4 and reads 4 again
// per weight, so int8 weights decode slower than f32 ones. This kernel streams each int8 weight
// row once, widens 16 values per instruction in registers and accumulates in f32 (the compiler
// vectorises the inner loop with AVX-512 / AVX2 under -march=native). Columns are split over
// OpenMP threads; up to 8 activation rows share each weight load.
#include <omp.h>

#include <algorithm>
#include <cstdint>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kTileN = 128;  // output columns per tile: 8 AVX-512 accumulators per row
constexpr int64_t kMaxRows = 8;

template <int64_t Rows>
void tile(const float* x, const int8_t* w, const float* scale, float* y, int64_t K, int64_t N,
          int64_t n0, int64_t width) {
  float acc[Rows][kTileN] = {};
  float widened[kTileN];
  for (int64_t k = 0; k < K; ++k) {
    const int8_t* row = w + k * N + n0;
    // Widen once, use for every activation row.
    if (width == kTileN) {
#pragma omp simd
      for (int64_t n = 0; n < kTileN; ++n) widened[n] = static_cast<float>(row[n]);
    } else {
      for (int64_t n = 0; n < width; ++n) widened[n] = static_cast<float>(row[n]);
      for (int64_t n = width; n < kTileN; ++n) widened[n] = 0.0f;
    }
    for (int64_t r = 0; r < Rows; ++r) {
      const float xv = x[r * K + k];
      float* a = acc[r];
#pragma omp simd
      for (int64_t n = 0; n < kTileN; ++n) a[n] += xv * widened[n];
    }
  }
  for (int64_t r = 0; r < Rows; ++r)
    for (int64_t n = 0; n < width; ++n) y[r * N + n0 + n] = acc[r][n] * scale[n0 + n];
}

template <int64_t Rows>
void rows_block(const float* x, const int8_t* w, const float* scale, float* y, int64_t K,
                int64_t N) {
#pragma omp parallel
  {
    // An even split of the columns over the threads (in multiples of 16 = one AVX-512 vector),
    // so that 768-column matrices keep both cores busy; each thread walks its range in tiles.
    const int64_t threads = omp_get_num_threads(), me = omp_get_thread_num();
    const int64_t per = ((N + threads - 1) / threads + 15) / 16 * 16;
    const int64_t begin = std::min(N, me * per), end = std::min(N, begin + per);
    for (int64_t n0 = begin; n0 < end; n0 += kTileN)
      tile<Rows>(x, w, scale, y, K, N, n0, std::min(kTileN, end - n0));
  }
}

ffi::Error Int8MatvecImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> w,
                          ffi::Buffer<ffi::F32> scale, ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions();
  const auto wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[0] || scale.element_count() != wd[1])
    return ffi::Error::InvalidArgument("int8_matvec: expects x[M, K], w[K, N], scale[N]");
  const int64_t M = xd[0], K = xd[1], N = wd[1];
  const float* xp = x.typed_data();
  float* yp = y->typed_data();
  for (int64_t m = 0; m < M; m += kMaxRows) {
    const int64_t rows = std::min(kMaxRows, M - m);
    const float* xm = xp + m * K;
    float* ym = yp + m * N;
    switch (rows) {
      case 1: rows_block<1>(xm, w.typed_data(), scale.typed_data(), ym, K, N); break;
      case 2: rows_block<2>(xm, w.typed_data(), scale.typed_data(), ym, K, N); break;
      case 3: rows_block<3>(xm, w.typed_data(), scale.typed_data(), ym, K, N); break;
      case 4: rows_block<4>(xm, w.typed_data(), scale.typed_data(), ym, K, N); break;
      case 5: rows_block<5>(xm, w.typed_data(), scale.typed_data(), ym, K, N); break;
      case 6: rows_block<6>(xm, w.typed_data(), scale.typed_data(), ym, K, N); break;
      case 7: rows_block<7>(xm, w.typed_data(), scale.typed_data(), ym, K, N); break;
      default: rows_block<8>(xm, w.typed_data(), scale.typed_data(), ym, K, N); break;
    }
  }
  return ffi::Error::Success();
}

// int4, two values per byte along K (row 2p in the low nibble, 2p+1 in the high one), one scale
// per group of `group` rows and column: partial sums of a group are scaled once at its end.
template <int64_t Rows>
void int4_tile(const float* x, const uint8_t* packed, const float* scale, float* y, int64_t K,
               int64_t N, int64_t group, int64_t n0, int64_t width) {
  float acc[Rows][kTileN] = {};
  float part[Rows][kTileN];
  float low[kTileN], high[kTileN];
  for (int64_t g0 = 0; g0 < K; g0 += group) {
    for (int64_t r = 0; r < Rows; ++r)
      for (int64_t n = 0; n < kTileN; ++n) part[r][n] = 0.0f;
    for (int64_t k = g0; k < g0 + group; k += 2) {
      const uint8_t* row = packed + (k / 2) * N + n0;
      if (width == kTileN) {
#pragma omp simd
        for (int64_t n = 0; n < kTileN; ++n) {
          // Sign-extend each nibble with an arithmetic shift of a signed byte.
          low[n] = static_cast<float>(static_cast<int8_t>(row[n] << 4) >> 4);
          high[n] = static_cast<float>(static_cast<int8_t>(row[n]) >> 4);
        }
      } else {
        for (int64_t n = 0; n < kTileN; ++n) {
          const uint8_t b = n < width ? row[n] : 0;
          low[n] = static_cast<float>(static_cast<int8_t>(b << 4) >> 4);
          high[n] = static_cast<float>(static_cast<int8_t>(b) >> 4);
        }
      }
      for (int64_t r = 0; r < Rows; ++r) {
        const float x0 = x[r * K + k], x1 = x[r * K + k + 1];
        float* a = part[r];
#pragma omp simd
        for (int64_t n = 0; n < kTileN; ++n) a[n] += x0 * low[n] + x1 * high[n];
      }
    }
    const float* s = scale + (g0 / group) * N + n0;
    for (int64_t r = 0; r < Rows; ++r)
      for (int64_t n = 0; n < width; ++n) acc[r][n] += part[r][n] * s[n];
  }
  for (int64_t r = 0; r < Rows; ++r)
    for (int64_t n = 0; n < width; ++n) y[r * N + n0 + n] = acc[r][n];
}

template <int64_t Rows>
void int4_rows_block(const float* x, const uint8_t* packed, const float* scale, float* y,
                     int64_t K, int64_t N, int64_t group) {
#pragma omp parallel
  {
    const int64_t threads = omp_get_num_threads(), me = omp_get_thread_num();
    const int64_t per = ((N + threads - 1) / threads + 15) / 16 * 16;
    const int64_t begin = std::min(N, me * per), end = std::min(N, begin + per);
    for (int64_t n0 = begin; n0 < end; n0 += kTileN)
      int4_tile<Rows>(x, packed, scale, y, K, N, group, n0, std::min(kTileN, end - n0));
  }
}

ffi::Error Int4MatvecImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> packed,
                          ffi::Buffer<ffi::F32> scale, ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions();
  const auto pd = packed.dimensions();
  const auto sd = scale.dimensions();
  if (xd.size() != 2 || pd.size() != 2 || sd.size() != 2 || xd[1] != 2 * pd[0] ||
      sd[1] != pd[1] || sd[0] < 1 || xd[1] % sd[0] || (xd[1] / sd[0]) % 2)
    return ffi::Error::InvalidArgument(
        "int4_matvec: expects x[M, K], packed[K/2, N], scale[K/group, N], even group");
  const int64_t M = xd[0], K = xd[1], N = pd[1], group = K / sd[0];
  for (int64_t m = 0; m < M; m += kMaxRows) {
    const int64_t rows = std::min(kMaxRows, M - m);
    const float* xm = x.typed_data() + m * K;
    float* ym = y->typed_data() + m * N;
    const uint8_t* p = packed.typed_data();
    const float* s = scale.typed_data();
    switch (rows) {
      case 1: int4_rows_block<1>(xm, p, s, ym, K, N, group); break;
      case 2: int4_rows_block<2>(xm, p, s, ym, K, N, group); break;
      case 3: int4_rows_block<3>(xm, p, s, ym, K, N, group); break;
      case 4: int4_rows_block<4>(xm, p, s, ym, K, N, group); break;
      case 5: int4_rows_block<5>(xm, p, s, ym, K, N, group); break;
      case 6: int4_rows_block<6>(xm, p, s, ym, K, N, group); break;
      case 7: int4_rows_block<7>(xm, p, s, ym, K, N, group); break;
      default: int4_rows_block<8>(xm, p, s, ym, K, N, group); break;
    }
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(HpllmInt4Matvec, Int4MatvecImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(HpllmInt8Matvec, Int8MatvecImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
