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
// figures in docs/performance.md). Tiles are shared out over XLA's CPU threads, and every row
// chunk of the activations reuses a tile while it is in cache, so prefill reads each weight
// from memory once.
//
// Instruction paths, chosen at compile time from the target's feature macros:
// - AVX-512 (__AVX512F__): 16 f32 lanes, 32 vector registers;
// - AVX2 + FMA (__AVX2__, __FMA__): 8 lanes, 16 registers;
// - portable loops that the compiler vectorises as it can (other architectures, or forced with
//   -DHPLLM_PORTABLE, which infer.kernels does for HPLLM_KERNEL_ISA=portable).
// The two x86 paths are one template over a small "vector traits" struct: the loop structure
// (fused widening, FMA accumulation, how many accumulators per pass) is the same, only the
// register width and count differ. `HpllmKernelPath()` reports which path was compiled.
#if !defined(HPLLM_PORTABLE) && defined(__AVX512F__)
#define HPLLM_PATH_AVX512 1
#elif !defined(HPLLM_PORTABLE) && defined(__AVX2__) && defined(__FMA__)
#define HPLLM_PATH_AVX2 1
#endif

#if defined(HPLLM_PATH_AVX512) || defined(HPLLM_PATH_AVX2)
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
// Activation rows that share one pass over a tile. In the SIMD paths the tile is walked in
// k-blocks that stay in L1 while every column pass and every row chunk uses them.
constexpr int64_t kRowChunk = 4;
// Rows of one k-block of an int8 tile: 64 x 128 bytes = 8 KiB, a sixth of L1.
constexpr int64_t kBlockK = 64;

// The portable int8 tile: out[r][j] = scale[j] * sum_k x[r, k] * w[k, j]. The sums build up
// in a local array, which the compiler keeps in registers where it can.
template <int64_t Rows>
void int8_tile_portable(const float* x, int64_t ldx, const int8_t* w, const float* scale,
                        int64_t K, float (*out)[kTile]) {
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

// The portable int4 tile (see int4_tile_simd for the format). GCC does not vectorise the fused
// loop (u8 -> u32 -> f32 with two uses of the byte), so each k-pair is widened into two staging
// arrays first and read back for every row.
template <int64_t Rows>
void int4_tile_portable(const float* x, int64_t ldx, const uint8_t* packed, const float* scale,
                        int64_t ld_scale, int64_t K, int64_t group, float (*out)[kTile]) {
  for (int64_t r = 0; r < Rows; ++r)
    for (int64_t j = 0; j < kTile; ++j) out[r][j] = 0.0f;
  for (int64_t g0 = 0; g0 < K; g0 += group) {
    float part[Rows][kTile] = {}, x_sum[Rows] = {};
    for (int64_t k = g0; k < g0 + group; k += 2) {
      const uint8_t* row = packed + (k / 2) * kTile;
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

#if defined(HPLLM_PATH_AVX512) || defined(HPLLM_PATH_AVX2)
#if defined(HPLLM_PATH_AVX512)
struct Simd {
  using F = __m512;
  static constexpr int64_t kLanes = 16;
  // Accumulators per pass: half the 32 registers, the rest hold broadcasts and widened weights.
  static constexpr int64_t kAccumulators = 16;
  static F zero() { return _mm512_setzero_ps(); }
  static F set1(float v) { return _mm512_set1_ps(v); }
  static F load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, F v) { _mm512_storeu_ps(p, v); }
  static F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F sub(F a, F b) { return _mm512_sub_ps(a, b); }
  static F add(F a, F b) { return _mm512_add_ps(a, b); }
  // 16 int8 -> 16 f32: sign-extending load, convert.
  static F widen_int8(const int8_t* p) {
    return _mm512_cvtepi32_ps(
        _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
  // 16 bytes -> their low and high nibbles as f32 (0..15): one zero-extending load, one AND,
  // one shift, two converts.
  static void widen_nibbles(const uint8_t* p, F& low, F& high) {
    const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    low = _mm512_cvtepi32_ps(_mm512_and_si512(b, _mm512_set1_epi32(15)));
    high = _mm512_cvtepi32_ps(_mm512_srli_epi32(b, 4));
  }
};
#else
struct Simd {
  using F = __m256;
  static constexpr int64_t kLanes = 8;
  // Half the 16 registers: 8 accumulators, the rest hold broadcasts and widened weights
  // (16 accumulators, a whole 128-column tile row, would spill).
  static constexpr int64_t kAccumulators = 8;
  static F zero() { return _mm256_setzero_ps(); }
  static F set1(float v) { return _mm256_set1_ps(v); }
  static F load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, F v) { _mm256_storeu_ps(p, v); }
  static F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F sub(F a, F b) { return _mm256_sub_ps(a, b); }
  static F add(F a, F b) { return _mm256_add_ps(a, b); }
  static F widen_int8(const int8_t* p) {
    return _mm256_cvtepi32_ps(
        _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
  static void widen_nibbles(const uint8_t* p, F& low, F& high) {
    const __m256i b =
        _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
    low = _mm256_cvtepi32_ps(_mm256_and_si256(b, _mm256_set1_epi32(15)));
    high = _mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4));
  }
};
#endif

// Vectors per column pass for `rows` activation rows: as many of a tile row's kTile / kLanes
// vectors as keep rows x vectors accumulators within the budget (AVX-512: 8, 8, 4, 4 for 1-4
// rows; AVX2: 8, 4, 2, 2), so the FMAs of one k have that many independent chains.
constexpr int64_t vectors_per_pass(int64_t rows) {
  int64_t v = kTile / Simd::kLanes;
  while (v > 1 && rows * v > Simd::kAccumulators) v /= 2;
  return v;
}

// int8 tile in intrinsics: each weight vector is widened once (load + sign extend + convert)
// and feeds one FMA per row. The tile is walked in k-blocks of kBlockK rows (8 KiB); within a
// block each column pass keeps its accumulators in registers and leaves them in `out` for the
// next block, so the block is read from memory once and from L1 by the later passes.
template <int64_t Rows>
void int8_tile_simd(const float* x, int64_t ldx, const int8_t* w, const float* scale, int64_t K,
                    float (*out)[kTile]) {
  using F = Simd::F;
  constexpr int64_t kVectors = vectors_per_pass(Rows), kWidth = kVectors * Simd::kLanes;
  for (int64_t k0 = 0; k0 < K; k0 += kBlockK) {
    const int64_t k1 = std::min(K, k0 + kBlockK);
    for (int64_t c0 = 0; c0 < kTile; c0 += kWidth) {
      F acc[Rows][kVectors];
      for (int64_t r = 0; r < Rows; ++r)
        for (int64_t v = 0; v < kVectors; ++v)
          acc[r][v] = k0 == 0 ? Simd::zero() : Simd::load(out[r] + c0 + v * Simd::kLanes);
      for (int64_t k = k0; k < k1; ++k) {
        const int8_t* row = w + k * kTile + c0;
        F xv[Rows];
        for (int64_t r = 0; r < Rows; ++r) xv[r] = Simd::set1(x[r * ldx + k]);
        for (int64_t v = 0; v < kVectors; ++v) {
          const F wv = Simd::widen_int8(row + v * Simd::kLanes);
          for (int64_t r = 0; r < Rows; ++r) acc[r][v] = Simd::fma(xv[r], wv, acc[r][v]);
        }
      }
      const bool last = k1 == K;
      for (int64_t r = 0; r < Rows; ++r)
        for (int64_t v = 0; v < kVectors; ++v) {
          const int64_t j = c0 + v * Simd::kLanes;
          Simd::store(out[r] + j, last ? Simd::mul(acc[r][v], Simd::load(scale + j)) : acc[r][v]);
        }
    }
  }
}

// int4 tile in intrinsics: the nibbles go from one load to FMAs in registers (AND / shift and
// convert, no staging arrays). Per group (the natural k-block: 64 rows x 128 bytes = 8 KiB at
// group 128), each column pass sums x * (q + 8) in registers, then subtracts 8 x the group's
// activation sum (computed once per group and row) and adds the scaled result into `out`.
template <int64_t Rows>
void int4_tile_simd(const float* x, int64_t ldx, const uint8_t* packed, const float* scale,
                    int64_t ld_scale, int64_t K, int64_t group, float (*out)[kTile]) {
  using F = Simd::F;
  constexpr int64_t kVectors = vectors_per_pass(Rows), kWidth = kVectors * Simd::kLanes;
  for (int64_t g0 = 0; g0 < K; g0 += group) {
    float offset[Rows];
    for (int64_t r = 0; r < Rows; ++r) {
      float sum = 0.0f;
      const float* xr = x + r * ldx + g0;
#pragma omp simd reduction(+ : sum)
      for (int64_t k = 0; k < group; ++k) sum += xr[k];
      offset[r] = 8.0f * sum;
    }
    const float* s = scale + (g0 / group) * ld_scale;
    for (int64_t c0 = 0; c0 < kTile; c0 += kWidth) {
      F part[Rows][kVectors];
      for (int64_t r = 0; r < Rows; ++r)
        for (int64_t v = 0; v < kVectors; ++v) part[r][v] = Simd::zero();
      for (int64_t k = g0; k < g0 + group; k += 2) {
        const uint8_t* row = packed + (k / 2) * kTile + c0;
        F x0[Rows], x1[Rows];
        for (int64_t r = 0; r < Rows; ++r) {
          x0[r] = Simd::set1(x[r * ldx + k]);
          x1[r] = Simd::set1(x[r * ldx + k + 1]);
        }
        for (int64_t v = 0; v < kVectors; ++v) {
          F low, high;
          Simd::widen_nibbles(row + v * Simd::kLanes, low, high);
          for (int64_t r = 0; r < Rows; ++r)
            part[r][v] = Simd::fma(x1[r], high, Simd::fma(x0[r], low, part[r][v]));
        }
      }
      for (int64_t r = 0; r < Rows; ++r) {
        const F off = Simd::set1(offset[r]);
        for (int64_t v = 0; v < kVectors; ++v) {
          const int64_t j = c0 + v * Simd::kLanes;
          const F scaled = Simd::mul(Simd::sub(part[r][v], off), Simd::load(s + j));
          Simd::store(out[r] + j, g0 == 0 ? scaled : Simd::add(scaled, Simd::load(out[r] + j)));
        }
      }
    }
  }
}
#endif

template <int64_t Rows>
void int8_tile(const float* x, int64_t ldx, const int8_t* w, const float* scale, int64_t K,
               float (*out)[kTile]) {
#if defined(HPLLM_PATH_AVX512) || defined(HPLLM_PATH_AVX2)
  int8_tile_simd<Rows>(x, ldx, w, scale, K, out);
#else
  int8_tile_portable<Rows>(x, ldx, w, scale, K, out);
#endif
}

// int4 tile: values packed two per byte along K (row 2p in the low nibble, 2p+1 in the high
// one) in offset binary (q + 8, 0..15: `TiledInt4Weight` flips the sign bits of the two's
// complement checkpoint format), one scale per `group` rows and column.
// sum_k x_k * q_k = sum_k x_k * (q_k + 8) - 8 * sum_k x_k, so a nibble widens with one AND or
// shift and one convert; the correction and the group's scale are applied once per group.
template <int64_t Rows>
void int4_tile(const float* x, int64_t ldx, const uint8_t* packed, const float* scale,
               int64_t ld_scale, int64_t K, int64_t group, float (*out)[kTile]) {
#if defined(HPLLM_PATH_AVX512) || defined(HPLLM_PATH_AVX2)
  int4_tile_simd<Rows>(x, ldx, packed, scale, ld_scale, K, group, out);
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
      static_cast<int64_t>(scale.element_count()) != wd[0] * kTile)
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

// Which instruction path this library was compiled with ("avx512", "avx2" or "portable"):
// infer.kernels records it, and the tests check that each forced build runs the path it asked for.
extern "C" const char* HpllmKernelPath() {
#if defined(HPLLM_PATH_AVX512)
  return "avx512";
#elif defined(HPLLM_PATH_AVX2)
  return "avx2";
#else
  return "portable";
#endif
}
