// y[M, N] = x[M, K] @ dequantize(w) for int8 (per-column scales) and packed int4 (group scales)
// weights, f32 activations, any M (decoding and prefill).
//
// XLA's CPU backend turns a dot with an int8 (or bf16) operand into "convert the whole weight
// to f32 in a temporary buffer, then an f32 dot": that reads 1 byte, writes 4 and reads 4 again
// per weight, so int8 weights decode slower than f32 ones. These kernels read each quantized
// weight once, widen it to f32 in registers and accumulate in f32: the same products and the
// same per-column (int8) or per-group (int4) scaling as the XLA ops, summed in another order.
//
// Layout is what makes them fast. The weights arrive *tiled*: w[N / kTile][K][kTile], so the K
// rows of one 128-column tile are one contiguous stream. Walking the plain [K, N] layout tile by
// tile instead reads 128 bytes, jumps N bytes, reads 128 bytes...: on base's matrices at one
// activation row that is 1.4-2x slower with the same arithmetic (bench/kernel_variants.cc,
// figures in docs/performance.md). A tile's 128 f32 accumulators per activation row stay
// in registers (8 AVX-512 or 16 AVX2 vectors); the compiler vectorises the plain loops below
// under -march=native. Tiles are shared out over XLA's CPU threads, and every row chunk of the
// activations reuses a tile while it is in cache, so prefill reads each weight from memory once.
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>
#include <type_traits>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kTile = 128;  // must equal infer.kernels.TILE
// Activation rows that share one pass over a tile: 4 x 128 accumulators still fit the 32 vector
// registers of AVX-512; one pass of 8 rows spills and takes 1.8x as long as two passes of 4
// (bench/kernel_variants.cc).
constexpr int64_t kRowChunk = 4;

// One tile, `Rows` activation rows: out[r][j] = scale[j] * sum_k x[r, k] * w[k, j]. The sums
// build up in a local array, which the compiler keeps in registers.
template <int64_t Rows>
void int8_tile(const float* x, int64_t ldx, const int8_t* w, const float* scale, int64_t K,
               float (*out)[kTile]) {
  float acc[Rows][kTile] = {};
  for (int64_t k = 0; k < K; ++k) {
    const int8_t* row = w + k * kTile;
    for (int64_t r = 0; r < Rows; ++r) {
      const float xv = x[r * ldx + k];
#pragma omp simd
      for (int64_t j = 0; j < kTile; ++j) acc[r][j] += xv * static_cast<float>(row[j]);
    }
  }
  for (int64_t r = 0; r < Rows; ++r)
#pragma omp simd
    for (int64_t j = 0; j < kTile; ++j) out[r][j] = acc[r][j] * scale[j];
}

#if defined(__AVX512F__)
// The int4 tile in AVX-512 intrinsics. The portable loop below widens each k-pair into two
// staging arrays and reads them back, because GCC does not vectorise the fused loop (u8 -> u32
// -> f32 with two uses of the byte); here the nibbles go from one load to FMAs in registers:
// 1.4x faster for one row, 1.6x for four (bench/kernel_variants.cc). The
// partial sums of `Rows` rows x `kVectors` vectors stay in registers (16 of the 32), so with
// more than two rows the tile is done in two column halves.
template <int64_t Rows>
void int4_tile_avx512(const float* x, int64_t ldx, const uint8_t* packed, const float* scale,
                      int64_t ld_scale, int64_t K, int64_t group, float (*out)[kTile]) {
  constexpr int kVectors = Rows <= 2 ? 8 : 4;
  const __m512i low_nibble = _mm512_set1_epi32(15);
  for (int64_t r = 0; r < Rows; ++r)
    for (int64_t j = 0; j < kTile; ++j) out[r][j] = 0.0f;
  for (int64_t c0 = 0; c0 < kTile; c0 += 16 * kVectors) {
    for (int64_t g0 = 0; g0 < K; g0 += group) {
      __m512 part[Rows][kVectors];
      float x_sum[Rows] = {};
      for (int64_t r = 0; r < Rows; ++r)
        for (int v = 0; v < kVectors; ++v) part[r][v] = _mm512_setzero_ps();
      for (int64_t k = g0; k < g0 + group; k += 2) {
        const uint8_t* row = packed + (k / 2) * kTile + c0;
        for (int v = 0; v < kVectors; ++v) {
          const __m512i bytes = _mm512_cvtepu8_epi32(
              _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 16 * v)));
          const __m512 low = _mm512_cvtepi32_ps(_mm512_and_si512(bytes, low_nibble));
          const __m512 high = _mm512_cvtepi32_ps(_mm512_srli_epi32(bytes, 4));
          for (int64_t r = 0; r < Rows; ++r) {
            part[r][v] = _mm512_fmadd_ps(_mm512_set1_ps(x[r * ldx + k]), low, part[r][v]);
            part[r][v] = _mm512_fmadd_ps(_mm512_set1_ps(x[r * ldx + k + 1]), high, part[r][v]);
          }
        }
        for (int64_t r = 0; r < Rows; ++r) x_sum[r] += x[r * ldx + k] + x[r * ldx + k + 1];
      }
      const float* s = scale + (g0 / group) * ld_scale + c0;
      for (int64_t r = 0; r < Rows; ++r) {
        const __m512 offset = _mm512_set1_ps(8.0f * x_sum[r]);
        for (int v = 0; v < kVectors; ++v) {
          float* total = out[r] + c0 + 16 * v;
          _mm512_storeu_ps(total, _mm512_fmadd_ps(_mm512_sub_ps(part[r][v], offset),
                                                  _mm512_loadu_ps(s + 16 * v),
                                                  _mm512_loadu_ps(total)));
        }
      }
    }
  }
}
#endif

// The int4 tile in plain loops that the compiler vectorises (any x86 or other CPU).
template <int64_t Rows>
void int4_tile_portable(const float* x, int64_t ldx, const uint8_t* packed, const float* scale,
                        int64_t ld_scale, int64_t K, int64_t group, float (*out)[kTile]) {
  for (int64_t r = 0; r < Rows; ++r)
    for (int64_t j = 0; j < kTile; ++j) out[r][j] = 0.0f;
  for (int64_t g0 = 0; g0 < K; g0 += group) {
    float part[Rows][kTile] = {}, x_sum[Rows] = {};
    for (int64_t k = g0; k < g0 + group; k += 2) {
      const uint8_t* row = packed + (k / 2) * kTile;
      // Unpack once, use for every activation row.
      float low[kTile], high[kTile];
#pragma omp simd
      for (int64_t j = 0; j < kTile; ++j) {
        const uint32_t b = row[j];
        low[j] = static_cast<float>(b & 15u);
        high[j] = static_cast<float>(b >> 4);
      }
      for (int64_t r = 0; r < Rows; ++r) {
        const float x0 = x[r * ldx + k], x1 = x[r * ldx + k + 1];
        x_sum[r] += x0 + x1;
#pragma omp simd
        for (int64_t j = 0; j < kTile; ++j) part[r][j] += x0 * low[j] + x1 * high[j];
      }
    }
    const float* s = scale + (g0 / group) * ld_scale;
    for (int64_t r = 0; r < Rows; ++r) {
      const float offset = 8.0f * x_sum[r];
#pragma omp simd
      for (int64_t j = 0; j < kTile; ++j) out[r][j] += (part[r][j] - offset) * s[j];
    }
  }
}

// int4 tile: values packed two per byte along K (row 2p in the low nibble, 2p+1 in the high
// one) in offset binary (q + 8, 0..15: `TiledInt4Weight` flips the sign bits of the two's
// complement checkpoint format), one scale per `group` rows and column.
// sum_k x_k * q_k = sum_k x_k * (q_k + 8) - 8 * sum_k x_k, so a nibble widens with one AND or
// shift and one convert; the correction and the group's scale are applied once per group.
template <int64_t Rows>
void int4_tile(const float* x, int64_t ldx, const uint8_t* packed, const float* scale,
               int64_t ld_scale, int64_t K, int64_t group, float (*out)[kTile]) {
#if defined(__AVX512F__)
  int4_tile_avx512<Rows>(x, ldx, packed, scale, ld_scale, K, group, out);
#else
  int4_tile_portable<Rows>(x, ldx, packed, scale, ld_scale, K, group, out);
#endif
}

// Runs `run_tile(t, out)` for every tile t on the calling thread and on XLA's CPU thread pool.
//
// Why not OpenMP: called ~85 times per decode step from inside an XLA program, an OpenMP
// parallel region paid more to wake its sleeping team (libgomp's default wait policy) than a
// 768x768 matvec costs: in a scratch run, 2 threads were slower than one. Here the tiles are handed out by an atomic counter: the caller takes
// tiles until none are left, helpers scheduled on XLA's pool take tiles when (and if) they
// start. The caller never waits for a helper that has not started, only for tiles a helper is
// already computing, so a busy or late core costs at most one tile.
template <typename RunTile>
void parallel_tiles(ffi::ThreadPool& pool, int64_t tiles, const RunTile& run_tile) {
  struct Progress {
    std::atomic<int64_t> next{0}, done{0};
  };
  // Shared ownership: a helper that starts after the call returned still finds its counter.
  auto progress = std::make_shared<Progress>();
  auto work = [progress, tiles, &run_tile] {
    // run_tile is only used while some tile is unfinished, i.e. while the caller still waits.
    for (int64_t t; (t = progress->next.fetch_add(1)) < tiles;) {
      run_tile(t);
      progress->done.fetch_add(1, std::memory_order_release);
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads() - 1, tiles - 1);
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule(decltype(work)(work));
  work();
  while (progress->done.load(std::memory_order_acquire) < tiles) std::this_thread::yield();
}

// Computes tile t of y for all activation rows, kRowChunk rows per pass over the tile (so the
// tile is read from memory once and from cache for the later rows); writes the valid columns.
template <typename RowsFn>
void tile_all_rows(int64_t t, int64_t M, int64_t N, float* y, const RowsFn& rows_fn) {
  const int64_t n0 = t * kTile, width = std::min(kTile, N - n0);
  for (int64_t m = 0; m < M; m += kRowChunk) {
    float out[kRowChunk][kTile];
    const int64_t rows = std::min(kRowChunk, M - m);
    rows_fn(m, rows, out);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t j = 0; j < width; ++j) y[(m + r) * N + n0 + j] = out[r][j];
  }
}

// Calls f(std::integral_constant<int64_t, R>{}) with R = rows (1..kRowChunk): the tile
// kernels are compiled once per row count, so their row loops have fixed trip counts.
template <typename F>
void with_rows(int64_t rows, const F& f) {
  switch (rows) {
    case 1: f(std::integral_constant<int64_t, 1>{}); break;
    case 2: f(std::integral_constant<int64_t, 2>{}); break;
    case 3: f(std::integral_constant<int64_t, 3>{}); break;
    default: f(std::integral_constant<int64_t, 4>{}); break;
  }
}

ffi::Error Int8MatvecImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> w,
                          ffi::Buffer<ffi::F32> scale, ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || wd.size() != 3 || yd.size() != 2 || wd[2] != kTile || xd[1] != wd[1] ||
      yd[0] != xd[0] || (yd[1] + kTile - 1) / kTile != wd[0] ||
      scale.element_count() != wd[0] * kTile)
    return ffi::Error::InvalidArgument(
        "int8_matvec: expects x[M, K], w[tiles, K, 128], scale[tiles * 128] -> y[M, N]");
  const int64_t M = xd[0], K = xd[1], N = yd[1];
  const float* xp = x.typed_data();
  const int8_t* wp = w.typed_data();
  const float* sp = scale.typed_data();
  float* yp = y->typed_data();
  parallel_tiles(pool, (N + kTile - 1) / kTile, [&](int64_t t) {
    tile_all_rows(t, M, N, yp, [&](int64_t m, int64_t rows, float (*out)[kTile]) {
      with_rows(rows, [&](auto r) {
        int8_tile<decltype(r)::value>(xp + m * K, K, wp + t * K * kTile, sp + t * kTile, K, out);
      });
    });
  });
  return ffi::Error::Success();
}

ffi::Error Int4MatvecImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                          ffi::Buffer<ffi::U8> packed, ffi::Buffer<ffi::F32> scale,
                          ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), pd = packed.dimensions(), sd = scale.dimensions();
  const auto yd = y->dimensions();
  if (xd.size() != 2 || pd.size() != 3 || sd.size() != 2 || yd.size() != 2 || pd[2] != kTile ||
      xd[1] != 2 * pd[1] || sd[1] != pd[0] * kTile || yd[0] != xd[0] ||
      (yd[1] + kTile - 1) / kTile != pd[0] || sd[0] < 1 || xd[1] % sd[0] ||
      (xd[1] / sd[0]) % 2)
    return ffi::Error::InvalidArgument(
        "int4_matvec: expects x[M, K], packed[tiles, K/2, 128], scale[K/group, tiles * 128] "
        "with an even group -> y[M, N]");
  const int64_t M = xd[0], K = xd[1], N = yd[1], group = K / sd[0], ld_scale = sd[1];
  const float* xp = x.typed_data();
  const uint8_t* pp = packed.typed_data();
  const float* sp = scale.typed_data();
  float* yp = y->typed_data();
  parallel_tiles(pool, (N + kTile - 1) / kTile, [&](int64_t t) {
    tile_all_rows(t, M, N, yp, [&](int64_t m, int64_t rows, float (*out)[kTile]) {
      with_rows(rows, [&](auto r) {
        int4_tile<decltype(r)::value>(xp + m * K, K, pp + t * (K / 2) * kTile, sp + t * kTile,
                                      ld_scale, K, group, out);
      });
    });
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(HpllmInt4Matvec, Int4MatvecImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(HpllmInt8Matvec, Int8MatvecImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
