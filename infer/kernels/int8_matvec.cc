// y[M, N] = x[M, K] @ dequantize(w) for int8 (per-column scales), packed int4 (group scales)
// and bf16 weights, f32 activations, any M (decoding and prefill).
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
// From kBatchRows rows up the SIMD paths dequantize each weight block once into L1 and run
// every row over it: whole-tile blocks for a few rows (batched decode, tile_few_rows), and from
// kGemmRows rows (prompts) a blocked GEMM on column panels (tile_batched_rows). Where the
// tile unit (AMX) or AVX-512 VNNI runs int8 products fast, int8 and int4 weights take integer
// routes instead, the f32 activations as three int8 digits (AmxInt8MatmulImpl,
// VnniInt8MatmulImpl, VnniInt4MatmulImpl; infer.kernels picks them); AVX2 builds run int4
// weights at 1 to kBatchRows - 1 rows the same way, on vpmaddubsw. The file also holds the
// integer kernels of int8 activations with int8 (W8A8MatmulImpl) and int4 (W4A8MatmulImpl)
// weights, and the attention over the KV cache (DecodeAttentionImpl).
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
#include <cmath>
#include <cstdint>
#include <limits>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <type_traits>
#include <utility>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kTile = 128;  // must equal infer.kernels.TILE
// Activation rows that share one pass over a tile. In the SIMD paths the tile is walked in
// k-blocks that stay in L1 while every column pass and every row chunk uses them.
constexpr int64_t kRowChunk = 4;

// Per-thread scratch arrays, one per use, grown to the largest size asked for and kept (64-byte
// aligned): the kernels run ~85 times per decode step, and a heap block per call would be
// allocated and freed as often. A pointer stays valid until the same thread asks again for the
// same use.
enum class Scratch { kInt4Factors, kAmxDigits, kAmxRowScale, kAmxOperands, kAmxActivations,
                   kW4A8GroupSums, kDigitSums };

template <typename T, Scratch Use>
T* thread_scratch(int64_t count) {
  thread_local std::unique_ptr<T[], decltype(&std::free)> buffer{nullptr, std::free};
  thread_local int64_t capacity = 0;
  if (count > capacity) {
    const size_t bytes = (count * sizeof(T) + 63) / 64 * 64;  // aligned_alloc wants a multiple
    buffer.reset(static_cast<T*>(std::aligned_alloc(64, bytes)));
    capacity = count;
  }
  return buffer.get();
}
// Activation rows per slab of the w8a8 kernel (its int32 output tile: 64 x 128 x 4 bytes =
// 32 KiB on the stack); a larger M runs slab by slab.
constexpr int64_t kSlabRows = 64;

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
  // Batched micro-kernel (see gemm_micro): 6 rows x 4 vectors = 24 accumulators, 4 weight
  // vectors, one broadcast. Its panel of one k-block: 128 x 64 x 4 bytes = 32 KiB of L1.
  static constexpr int64_t kMicroRows = 6, kMicroVectors = 4, kPanelK = 128;
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
  // 16 bytes -> the bytes themselves and their low nibbles as f32: no shift (see int4_tile_simd).
  // The low nibble is a table lookup: vpermps reads only the low 4 bits of each index, so one
  // instruction replaces an AND and a convert. The batch-1 int4 loop is bound by the number of
  // 512-bit instructions (a Zen 4 issues about two per cycle whichever units they use:
  // bench/instruction_mix.cc), and this takes one of six per 16 bytes: one thread,
  // `bench/tile_kernels.cc dec 8`, Zen 4, 27.7 / 28.4 -> 31.0 / 31.0 G weights/s.
  static void widen_byte_low(const uint8_t* p, F& byte, F& low) {
    const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    byte = _mm512_cvtepi32_ps(b);
    low = _mm512_permutexvar_ps(
        b, _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
  }
};
#else
struct Simd {
  using F = __m256;
  static constexpr int64_t kLanes = 8;
  // Half the 16 registers: 8 accumulators, the rest hold broadcasts and widened weights
  // (16 accumulators, a whole 128-column tile row, would spill).
  static constexpr int64_t kAccumulators = 8;
  // Batched micro-kernel: 6 rows x 2 vectors = 12 accumulators, 2 weight vectors, one
  // broadcast: 15 of the 16 registers. Its panel of one k-block: 256 x 16 x 4 bytes = 16 KiB.
  static constexpr int64_t kMicroRows = 6, kMicroVectors = 2, kPanelK = 256;
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
  static void widen_byte_low(const uint8_t* p, F& byte, F& low) {
    const __m256i b =
        _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
    byte = _mm256_cvtepi32_ps(b);
    low = _mm256_cvtepi32_ps(_mm256_and_si256(b, _mm256_set1_epi32(15)));
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

// Vectors per column pass of the registers route (below, at kBatchRows): up to 4 rows as the
// tile kernels, 5-6 rows the micro-kernel's kMicroVectors (AVX-512: 6 x 4 = 24 accumulators,
// AVX2: 6 x 2 = 12), enough independent FMAs per widened weight vector to hide its widening.
constexpr int64_t registers_route_vectors(int64_t rows) {
  return rows > 4 ? Simd::kMicroVectors : vectors_per_pass(rows);
}

// How far ahead (in tile rows) the tile kernels (int8, int4, bf16) prefetch their weight
// stream. One core alone keeps too few cache-line reads in flight to stream a tile at the
// memory's pace: in a scratch run of the bf16 kernel (one thread, 768 x 2048, 300 MB of copies,
// rounds interleaved) this read 11.2 GB/s against 8.5 without (AVX-512) and 10.0 against 7.6
// (AVX2); 16 and 64 rows did the same within noise, 8 a little less.
constexpr int64_t kPrefetchRows = 32;

// Prefetches `bytes` bytes from `ahead` into L1. Past the tile's end this touches the next tile
// or unmapped memory: a prefetch never faults.
inline void prefetch_ahead(const void* ahead, int64_t bytes) {
  for (int64_t j = 0; j < bytes; j += 64)
    _mm_prefetch(static_cast<const char*>(ahead) + j, _MM_HINT_T0);
}

// Fetches `bytes` bytes from `ahead` into L2 (a prefetch never faults).
inline void prefetch_to_l2(const void* ahead, int64_t bytes) {
  for (int64_t j = 0; j < bytes; j += 64)
    _mm_prefetch(static_cast<const char*>(ahead) + j, _MM_HINT_T1);
}

// Tile kernel for weights that widen to f32 one vector at a time (int8, bf16): each weight
// vector is widened once (`widen(p)`: load + extend + convert) and feeds one FMA per row. The
// tile is walked in k-blocks of kBlockBytes (8 KiB: 64 int8 or 32 bf16 rows); within a block
// each column pass keeps its accumulators in registers and leaves them in `out` for the next
// block, so the block is read from memory once and from L1 by the later passes. The sums are
// multiplied by `scale` (one per column) at the end, or left as they are if it is null.
constexpr int64_t kBlockBytes = 8192;

template <int64_t Rows, int64_t kVectors = vectors_per_pass(Rows), typename Weight,
          typename Widen>
void widening_tile_simd(const float* x, int64_t ldx, const Weight* w, const float* scale,
                        int64_t K, float (*out)[kTile], const Widen& widen) {
  using F = Simd::F;
  constexpr int64_t kWidth = kVectors * Simd::kLanes;
  constexpr int64_t kRowsPerBlock = kBlockBytes / (kTile * sizeof(Weight));
  for (int64_t k0 = 0; k0 < K; k0 += kRowsPerBlock) {
    const int64_t k1 = std::min(K, k0 + kRowsPerBlock);
    for (int64_t c0 = 0; c0 < kTile; c0 += kWidth) {
      F acc[Rows][kVectors];
      for (int64_t r = 0; r < Rows; ++r)
        for (int64_t v = 0; v < kVectors; ++v)
          acc[r][v] = k0 == 0 ? Simd::zero() : Simd::load(out[r] + c0 + v * Simd::kLanes);
      for (int64_t k = k0; k < k1; ++k) {
        const Weight* row = w + k * kTile + c0;
        prefetch_ahead(row + kPrefetchRows * kTile, kWidth * sizeof(Weight));
        if constexpr (Rows <= kRowChunk) {
          F xv[Rows];
          for (int64_t r = 0; r < Rows; ++r) xv[r] = Simd::set1(x[r * ldx + k]);
          for (int64_t v = 0; v < kVectors; ++v) {
            const F wv = widen(row + v * Simd::kLanes);
            for (int64_t r = 0; r < Rows; ++r) acc[r][v] = Simd::fma(xv[r], wv, acc[r][v]);
          }
        } else {
          // The registers route's 5-6 rows: the widened vectors first and one broadcast at a
          // time, so the AVX2 path's 12 accumulators, 2 vectors and a broadcast fit its 16
          // registers (six broadcasts held at once spilled: 60 against 105 GFLOP/s at 16
          // rows in bench/batched_routes.cc).
          F wv[kVectors];
          for (int64_t v = 0; v < kVectors; ++v) wv[v] = widen(row + v * Simd::kLanes);
          for (int64_t r = 0; r < Rows; ++r) {
            const F xv = Simd::set1(x[r * ldx + k]);
            for (int64_t v = 0; v < kVectors; ++v) acc[r][v] = Simd::fma(xv, wv[v], acc[r][v]);
          }
        }
      }
      const bool scaled = scale != nullptr && k1 == K;
      for (int64_t r = 0; r < Rows; ++r)
        for (int64_t v = 0; v < kVectors; ++v) {
          const int64_t j = c0 + v * Simd::kLanes;
          const F sum = acc[r][v];
          Simd::store(out[r] + j, scaled ? Simd::mul(sum, Simd::load(scale + j)) : sum);
        }
    }
  }
}

// int8 tile in intrinsics: sign-extending load + convert, the column scale at the end.
template <int64_t Rows, int64_t kVectors = vectors_per_pass(Rows)>
void int8_tile_simd(const float* x, int64_t ldx, const int8_t* w, const float* scale, int64_t K,
                    float (*out)[kTile]) {
  widening_tile_simd<Rows, kVectors>(x, ldx, w, scale, K, out,
                                     [](const int8_t* p) { return Simd::widen_int8(p); });
}

// int4 tile in intrinsics: the nibbles go from one load to FMAs in registers (no staging
// arrays). Per group (the natural k-block: 64 rows x 128 bytes = 8 KiB at group 128), each
// column pass sums x * (q + 8) in registers, then subtracts 8 x the group's activation sum
// (computed once per group and row) and adds the scaled result into `out`.
// A byte b holds lo (row k) and hi (row k + 1) as b = lo + 16 hi, so
// x0 lo + x1 hi = (x0 - x1 / 16) lo + (x1 / 16) b: the FMAs take the byte itself and its low
// nibble, and the shift that extracted hi is gone (x1 / 16 is exact; x0 - x1 / 16 rounds once
// per k-pair). At one row the loop is bound by the converts and FMAs, which share two ports,
// and the shift was a fifth op on them: one thread, weights in L2 (scratch run, load ~3):
// AVX2 17.5 -> 19.2 G weights/s, AVX-512 20.2 -> 24.5; broadcasting the factors from a
// per-tile array instead of computing them per column pass: 18.7 -> 20.2 and 25.2 -> 26.6.
template <int64_t Rows>
void int4_tile_simd(const float* x, int64_t ldx, const uint8_t* packed, const float* scale,
                    int64_t ld_scale, int64_t K, int64_t group, float (*out)[kTile]) {
  using F = Simd::F;
  constexpr int64_t kVectors = vectors_per_pass(Rows), kWidth = kVectors * Simd::kLanes;
  // The two factors of every k-pair, once per tile (not per column pass), so the loop below
  // broadcasts them straight from memory: (x0 - x1 / 16, x1 / 16) at [k], [k + 1].
  float* factors = thread_scratch<float, Scratch::kInt4Factors>(Rows * K);
  for (int64_t r = 0; r < Rows; ++r) {
    const float* xr = x + r * ldx;
    float* fr = factors + r * K;
#pragma omp simd
    for (int64_t p = 0; p < K / 2; ++p) {
      const float x1 = xr[2 * p + 1] * 0.0625f;
      fr[2 * p] = xr[2 * p] - x1;
      fr[2 * p + 1] = x1;
    }
  }
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
        prefetch_ahead(row + kPrefetchRows * kTile, kWidth);
        F x_low[Rows], x_byte[Rows];
        for (int64_t r = 0; r < Rows; ++r) {
          x_low[r] = Simd::set1(factors[r * K + k]);
          x_byte[r] = Simd::set1(factors[r * K + k + 1]);
        }
        for (int64_t v = 0; v < kVectors; ++v) {
          F byte, low;
          Simd::widen_byte_low(row + v * Simd::kLanes, byte, low);
          for (int64_t r = 0; r < Rows; ++r)
            part[r][v] = Simd::fma(x_byte[r], byte, Simd::fma(x_low[r], low, part[r][v]));
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

// ---- Many rows (prefill): a blocked GEMM on dequantized weight panels ----
//
// The tile kernels above widen every weight once per chunk of up to 4 rows: at 16 rows that is
// 4 widenings per weight (each as costly as an FMA) and 4 passes over the tile, which has left
// L1. From kGemmRows rows up (below it, tile_few_rows) a tile is the weight operand of a
// blocked GEMM in the GotoBLAS / BLIS loop order:
// - rows in blocks of kRowBlock, so one row block's activations of one k-block stay in L2;
// - k in blocks of Simd::kPanelK, and the tile's 128 columns in panels of kPanel: each k-block
//   of a panel is dequantized once into a contiguous f32 buffer that stays in L1 while every
//   row of the block runs over it (contiguous, so it spreads over all cache sets: a stride of
//   one 128-column f32 row maps a 64-column panel onto half of them);
// - the micro-kernel keeps kMicroRows x kMicroVectors accumulators in registers for the whole
//   k-block (the broadcast activation feeds kMicroVectors FMAs, each weight vector
//   kMicroRows FMAs) and meets the output once per k-block: the FMA units, not the widening
//   or the loads and stores, set the pace.

constexpr int64_t kPanel = Simd::kMicroVectors * Simd::kLanes;  // columns of a panel
static_assert(kTile % kPanel == 0, "a tile is whole panels");
// Rows of a row block: at kPanelK = 128 its activations of one k-block are 96 KiB (L2).
constexpr int64_t kRowBlock = 32 * Simd::kMicroRows;

// out[r * ldo + c] (+)= sum_k x[r * ldx + k] * panel[k * kPanel + c] for Rows rows, kn k and
// the panel's kPanel columns (First: = instead of +=); Scaled (the last k-block of an int8
// tile): the sums are multiplied by scale[c] on the way out. First and Scaled are template
// parameters because with run-time branches GCC keeps the accumulators in a stack array around
// the k loop (a load and a store per accumulator per call).
template <int64_t Rows, bool First, bool Scaled>
void gemm_micro(const float* x, int64_t ldx, const float* panel, int64_t kn, float* out,
                int64_t ldo, const float* scale) {
  using F = Simd::F;
  constexpr int64_t kVectors = Simd::kMicroVectors;
  F acc[Rows][kVectors];
  for (int64_t r = 0; r < Rows; ++r)
    for (int64_t v = 0; v < kVectors; ++v)
      acc[r][v] = First ? Simd::zero() : Simd::load(out + r * ldo + v * Simd::kLanes);
  for (int64_t k = 0; k < kn; ++k) {
    F wv[kVectors];
    for (int64_t v = 0; v < kVectors; ++v)
      wv[v] = Simd::load(panel + k * kPanel + v * Simd::kLanes);
    for (int64_t r = 0; r < Rows; ++r) {
      const F xb = Simd::set1(x[r * ldx + k]);
      for (int64_t v = 0; v < kVectors; ++v) acc[r][v] = Simd::fma(xb, wv[v], acc[r][v]);
    }
  }
  for (int64_t r = 0; r < Rows; ++r)
    for (int64_t v = 0; v < kVectors; ++v) {
      const int64_t j = v * Simd::kLanes;
      Simd::store(out + r * ldo + j, Scaled ? Simd::mul(acc[r][v], Simd::load(scale + j))
                                            : acc[r][v]);
    }
}

template <int64_t Rows>
void gemm_micro(const float* x, int64_t ldx, const float* panel, int64_t kn, float* out,
                int64_t ldo, bool first, const float* scale) {
  if (first && scale) gemm_micro<Rows, true, true>(x, ldx, panel, kn, out, ldo, scale);
  else if (first) gemm_micro<Rows, true, false>(x, ldx, panel, kn, out, ldo, scale);
  else if (scale) gemm_micro<Rows, false, true>(x, ldx, panel, kn, out, ldo, scale);
  else gemm_micro<Rows, false, false>(x, ldx, panel, kn, out, ldo, scale);
}

// Calls f(std::integral_constant<int64_t, R>{}) with R = rows (1..kMicroRows).
template <typename Fn>
void with_micro_rows(int64_t rows, const Fn& f) {
  static_assert(Simd::kMicroRows == 6, "update the cases");
  switch (rows) {
    case 1: f(std::integral_constant<int64_t, 1>{}); break;
    case 2: f(std::integral_constant<int64_t, 2>{}); break;
    case 3: f(std::integral_constant<int64_t, 3>{}); break;
    case 4: f(std::integral_constant<int64_t, 4>{}); break;
    case 5: f(std::integral_constant<int64_t, 5>{}); break;
    default: f(std::integral_constant<int64_t, 6>{}); break;
  }
}

// Rows m0 .. m0 + rows (rows <= kRowBlock) of tile t of y = x[M, K] @ (the tile, dequantized
// panel by panel by `dequantize(k0, kn, c0, panel)`). `scale` (int8: the tile's column scales;
// int4: null, its scales are in the dequantized values) multiplies the finished sums. A partial
// last tile is computed into a whole-tile buffer and its valid columns copied out.
template <typename Dequantize>
void tile_batched_rows(int64_t t, int64_t m0, int64_t rows, int64_t K, int64_t N, const float* x,
                       float* y, const Dequantize& dequantize, const float* scale) {
  const int64_t n0 = t * kTile, width = std::min(kTile, N - n0);
  std::unique_ptr<float[]> partial;
  if (width < kTile) partial.reset(new float[rows * kTile]);
  const int64_t ldo = partial ? kTile : N;
  float* out = partial ? partial.get() : y + m0 * N + n0;
  alignas(64) float panel[Simd::kPanelK * kPanel];
  for (int64_t k0 = 0; k0 < K; k0 += Simd::kPanelK) {
    const int64_t kn = std::min(Simd::kPanelK, K - k0);
    const bool first = k0 == 0, last = k0 + kn == K;
    for (int64_t c0 = 0; c0 < kTile; c0 += kPanel) {
      dequantize(k0, kn, c0, panel);
      const float* panel_scale = last && scale ? scale + c0 : nullptr;
      for (int64_t m = 0; m < rows; m += Simd::kMicroRows)
        with_micro_rows(std::min(Simd::kMicroRows, rows - m), [&](auto r) {
          gemm_micro<decltype(r)::value>(x + (m0 + m) * K + k0, K, panel, kn,
                                         out + m * ldo + c0, ldo, first, panel_scale);
        });
    }
  }
  if (partial)
    for (int64_t r = 0; r < rows; ++r)
      std::memcpy(y + (m0 + r) * N + n0, partial.get() + r * kTile, width * sizeof(float));
}

// ---- Few rows (batched decode, kBatchRows to kGemmRows - 1): whole-tile blocks ----
//
// Below kGemmRows rows each dequantized weight is reused too few times to pay for the GEMM's
// panels and row blocks: bench/batched_routes.cc (one thread, base's MLP shapes) measured the
// GEMM route at 0.76-0.87x this one's speed for int8 at 8-16 rows (AVX2 build: 0.82-0.94x
// for int8 and int4), 0.89-0.97x at 32-48 (int8; AVX2 both), and level or ahead from 64.
// Here a block of kDqK rows of the whole tile is dequantized (one contiguous read) into an L1
// buffer and the same micro-kernel shape runs every row over it, leaving its sums in a stack
// tile between blocks.
constexpr int64_t kGemmRows = 64;
// Rows of a dequantized block: 32 x 128 x 4 bytes = 16 KiB, a third of L1.
constexpr int64_t kDqK = 32;

// out[r][c] (+)= sum_k x[r * ldx + k] * wf[k][c] for Rows rows, kn block rows, all 128 columns.
template <int64_t Rows>
void few_rows_block(const float* x, int64_t ldx, const float (*wf)[kTile], int64_t kn,
                    float (*out)[kTile], bool first) {
  using F = Simd::F;
  constexpr int64_t kVectors = Simd::kMicroVectors;
  for (int64_t c0 = 0; c0 < kTile; c0 += kPanel) {
    F acc[Rows][kVectors];
    for (int64_t r = 0; r < Rows; ++r)
      for (int64_t v = 0; v < kVectors; ++v)
        acc[r][v] = first ? Simd::zero() : Simd::load(out[r] + c0 + v * Simd::kLanes);
    for (int64_t k = 0; k < kn; ++k) {
      F wv[kVectors];
      for (int64_t v = 0; v < kVectors; ++v) wv[v] = Simd::load(wf[k] + c0 + v * Simd::kLanes);
      for (int64_t r = 0; r < Rows; ++r) {
        const F xb = Simd::set1(x[r * ldx + k]);
        for (int64_t v = 0; v < kVectors; ++v) acc[r][v] = Simd::fma(xb, wv[v], acc[r][v]);
      }
    }
    for (int64_t r = 0; r < Rows; ++r)
      for (int64_t v = 0; v < kVectors; ++v)
        Simd::store(out[r] + c0 + v * Simd::kLanes, acc[r][v]);
  }
}

// Tile t of y for M < kGemmRows rows: x[M, K] @ (the tile, dequantized block by block by
// `dequantize(k0, kn, wf)`); `scale` as in tile_batched_rows. Stack: 16 + 32 KiB.
template <typename Dequantize>
void tile_few_rows(int64_t t, int64_t M, int64_t K, int64_t N, const float* x, float* y,
                   const Dequantize& dequantize, const float* scale) {
  alignas(64) float wf[kDqK][kTile];
  alignas(64) float out[kGemmRows][kTile];
  for (int64_t k0 = 0; k0 < K; k0 += kDqK) {
    const int64_t kn = std::min(kDqK, K - k0);
    dequantize(k0, kn, wf);
    for (int64_t m = 0; m < M; m += Simd::kMicroRows)
      with_micro_rows(std::min(Simd::kMicroRows, M - m), [&](auto r) {
        few_rows_block<decltype(r)::value>(x + m * K + k0, K, wf, kn, out + m, k0 == 0);
      });
  }
  const int64_t n0 = t * kTile, width = std::min(kTile, N - n0);
  for (int64_t r = 0; r < M; ++r)
    for (int64_t j = 0; j < width; ++j)
      y[r * N + n0 + j] = scale ? out[r][j] * scale[j] : out[r][j];
}

// int8 panel: the values as f32 (the per-column scale is applied to the sums, as the XLA op
// does).
void dequantize_int8(const int8_t* w, int64_t k0, int64_t kn, int64_t c0, float* panel) {
  for (int64_t k = 0; k < kn; ++k)
    for (int64_t j = 0; j < kPanel; j += Simd::kLanes)
      Simd::store(panel + k * kPanel + j, Simd::widen_int8(w + (k0 + k) * kTile + c0 + j));
}

// int4 panel: (nibble - 8) * scale, the XLA op's dequantized weight exactly (k0, kn even): one
// FMA, nibble * scale + (-8 * scale), rounds the exact (nibble - 8) * scale once, as the op's
// multiply does (-8 * scale is exact), for one instruction where sub + mul took two.
void dequantize_int4(const uint8_t* packed, const float* scale, int64_t ld_scale, int64_t group,
                     int64_t k0, int64_t kn, int64_t c0, float* panel) {
  const Simd::F minus_eight = Simd::set1(-8.0f);
  for (int64_t k = 0; k < kn; k += 2) {
    const uint8_t* row = packed + ((k0 + k) / 2) * kTile + c0;
    const float* s = scale + ((k0 + k) / group) * ld_scale + c0;
    for (int64_t j = 0; j < kPanel; j += Simd::kLanes) {
      Simd::F low, high;
      Simd::widen_nibbles(row + j, low, high);
      const Simd::F sj = Simd::load(s + j), offset = Simd::mul(minus_eight, sj);
      Simd::store(panel + k * kPanel + j, Simd::fma(low, sj, offset));
      Simd::store(panel + (k + 1) * kPanel + j, Simd::fma(high, sj, offset));
    }
  }
}

// The same for a whole-tile block of the few-rows route: 128 columns are kTile / kPanel panels.
// Both prefetch kPrefetchRows rows ahead, into the next block: at 16 rows a block's
// arithmetic takes about a microsecond, too little for the hardware prefetcher to bring the
// next 4 KiB in time (bench/decode_matmuls.py --rows 16, forced avx512 build, two pairs
// alternated: int8 27.0-29.2 -> 21.2-22.2 ms per step's products, int4 25.9-26.7 ->
// 23.1-23.2; AVX2 build: int8 40.5-44.7 -> 34.3-38.6, int4 39.8-41.2 -> 38.0-40.6).
void dequantize_int8(const int8_t* w, int64_t k0, int64_t kn, float (*wf)[kTile]) {
  for (int64_t k = 0; k < kn; ++k) {
    prefetch_ahead(w + (k0 + k + kPrefetchRows) * kTile, kTile);
    for (int64_t j = 0; j < kTile; j += Simd::kLanes)
      Simd::store(wf[k] + j, Simd::widen_int8(w + (k0 + k) * kTile + j));
  }
}

void dequantize_int4(const uint8_t* packed, const float* scale, int64_t ld_scale, int64_t group,
                     int64_t k0, int64_t kn, float (*wf)[kTile]) {
  const Simd::F minus_eight = Simd::set1(-8.0f);
  for (int64_t k = 0; k < kn; k += 2) {
    const uint8_t* row = packed + ((k0 + k) / 2) * kTile;
    prefetch_ahead(row + kPrefetchRows * kTile, kTile);
    const float* s = scale + ((k0 + k) / group) * ld_scale;
    for (int64_t j = 0; j < kTile; j += Simd::kLanes) {
      Simd::F low, high;
      Simd::widen_nibbles(row + j, low, high);
      const Simd::F sj = Simd::load(s + j), offset = Simd::mul(minus_eight, sj);
      Simd::store(wf[k] + j, Simd::fma(low, sj, offset));
      Simd::store(wf[k + 1] + j, Simd::fma(high, sj, offset));
    }
  }
}
#endif


// Rows from which the SIMD paths take a batched route (tile_few_rows, from kGemmRows
// tile_batched_rows) instead of row chunks of the tile kernels (which stay the batch-1 path:
// there the weight stream, not arithmetic, sets the pace, and widening in registers reads it
// once without an L1 round trip).
//
// The int8 and bf16 products' caller picks one of two batched routes (`widen_in_registers`,
// chosen per CPU in infer.kernels):
// - dequantized (the routes above): each weight is widened once into an L1 block or panel that
//   every row reads. Where a widening instruction takes an FMA's issue slot (Intel cores: the
//   convert and the sign extension share the two 512-bit FMA ports), widening once per weight
//   is what keeps the FMAs busy.
// - registers: chunks of kMicroRows rows run the tile kernel (int8_tile_simd, bf16_tile_simd;
//   6 rows x kMicroVectors), so each weight is widened once per chunk, in registers, and
//   nothing is stored but the sums. A Zen 4 issues a widening beside its FMAs for free while
//   a 512-bit store costs FMA time (bench/instruction_mix.cc: 12 FMAs alone, with 6 converts
//   or with 6 sign-extending loads take 12 cycles, with 2 stores 14.6), and the dequantized
//   routes store every widened weight once.
//   One thread, base's MLP shapes (`bench/batched_routes.cc`, Zen 4), GFLOP/s of the registers
//   route against the few-rows route: 8 rows 108-109 / 86-87, 16 rows 112 / 95, 32 rows 112-113
//   / 104, and against the GEMM at 128 rows 112-113 / 101-106 (AVX2 build: 99-100 / 79-80,
//   105-106 / 97-98, 105-107 / 100, and 106 / 102-107 at 128).
constexpr int64_t kBatchRows = 5;

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

#if defined(HPLLM_PATH_AVX512) || defined(HPLLM_PATH_AVX2)
// Runs `tile_fn(t, m0, rows)` for every row block x tile of the batched path, row block major:
// each core keeps the row block's activations in its L2 for all the tiles it takes, where tile
// major order would stream all M rows of activations through it again for every tile (at 2048
// rows, 6 MiB for base's d_model). A product with few tiles (768 columns: 6) is cut into row
// blocks down to kMinBlockRows rows until there are kMinTasks tasks, so a core that starts
// late or is shared with another process leaves a small task to the other, not a sixth of the
// product; smaller blocks would dequantize each panel too often.
constexpr int64_t kMinTasks = 16, kMinBlockRows = 48;

template <typename TileFn>
void batched_tasks(ffi::ThreadPool& pool, int64_t M, int64_t tiles, const TileFn& tile_fn) {
  int64_t blocks = (M + kRowBlock - 1) / kRowBlock;
  const int64_t wanted = (kMinTasks + tiles - 1) / tiles;
  if (blocks < wanted) blocks = std::max(blocks, std::min(wanted, M / kMinBlockRows));
  // Whole micro-kernel row groups per block; at most kRowBlock since blocks >= M / kRowBlock.
  const int64_t per_block = (M + blocks - 1) / blocks;
  const int64_t block_rows = (per_block + Simd::kMicroRows - 1) / Simd::kMicroRows *
                             Simd::kMicroRows;
  blocks = (M + block_rows - 1) / block_rows;
  parallel_tiles(pool, blocks * tiles, [&](int64_t task) {
    const int64_t m0 = (task / tiles) * block_rows;
    tile_fn(task % tiles, m0, std::min(block_rows, M - m0));
  });
}
#endif

// Computes tile t of y for activation rows m0 .. m0 + M, Chunk rows per pass over the tile (so
// the tile is read from memory once and from cache for the later rows); writes the valid
// columns.
template <int64_t Chunk = kRowChunk, typename RowsFn>
void tile_all_rows(int64_t t, int64_t M, int64_t N, float* y, const RowsFn& rows_fn,
                   int64_t m0 = 0) {
  const int64_t n0 = t * kTile, width = std::min(kTile, N - n0);
  for (int64_t m = m0; m < m0 + M; m += Chunk) {
    float out[Chunk][kTile];
    const int64_t rows = std::min(Chunk, m0 + M - m);
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

// ---- f32 activations as three int8 digits (the AMX and VNNI int8-weight routes) ----
//
// Integer dot products take int8 activations; the int8 weight-only routes on AMX and on VNNI
// (below) give them f32 activations as three int8 digits: per row, s = max|x| / 127 and
// x / s = d0 + d1 / 254 + d2 / 254^2 with every digit in [-127, 127] (each digit rounds the
// remainder of the last, scaled by 254). Each digit's product with the weights is an exact
// int32 sum; y = s * w_scale * (C0 + C1 / 254 + C2 / 254^2) in f32. What is lost is the rest
// after the third digit: at most s / 2 / 254^2 per activation, 2^-24 of the row's largest
// magnitude (f32 keeps 2^-24 of each value's own): |error| <= 2^-24 * max|x_row| *
// sum|w_col|, and the products agree with the f32 route to float32 rounding on rows without
// extreme outliers (tests/test_kernels.py measures it). A non-finite row gives NaN outputs.
#if defined(HPLLM_PATH_AVX512) || defined(HPLLM_PATH_AVX2)
constexpr int64_t kDigits = 3;
constexpr float kDigitBase = 254.0f;
#endif

#if defined(HPLLM_PATH_AVX512)
// Rows first .. last - 1 of the activations x[M, K] as int8 digits, [kDigits][rows][stride]
// (M padded to rows and K to the stride with zeros; stride >= K), and each row's scale s (0 for
// an all-zero row). Calls on disjoint row ranges may run at once.
void activation_digits(const float* x, int64_t M, int64_t K, int64_t rows, int64_t stride,
                       int64_t first, int64_t last, int8_t* digits, float* row_scale) {
  for (int64_t d = 0; d < kDigits; ++d)
    std::memset(digits + (d * rows + first) * stride, 0, (last - first) * stride);
  std::fill(row_scale + first, row_scale + last, 0.0f);
  const __m512 base = _mm512_set1_ps(kDigitBase);
  for (int64_t r = first; r < std::min(last, M); ++r) {
    const float* xr = x + r * K;
    // x * 0 is NaN exactly for an infinite or NaN x (max alone may drop a NaN).
    __m512 top = _mm512_setzero_ps(), non_finite = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 16) {
      const __mmask16 valid = K - k >= 16 ? 0xffff : (1u << (K - k)) - 1;
      const __m512 v = _mm512_maskz_loadu_ps(valid, xr + k);
      top = _mm512_max_ps(top, _mm512_abs_ps(v));
      non_finite = _mm512_add_ps(non_finite, _mm512_mul_ps(v, _mm512_setzero_ps()));
    }
    if (std::isnan(_mm512_reduce_add_ps(non_finite))) {
      // A non-finite activation: the row's outputs are NaN (digits zero, scale NaN), as the
      // f32 routes give NaN or infinities there, never finite numbers.
      row_scale[r] = std::numeric_limits<float>::quiet_NaN();
      continue;
    }
    const float largest = _mm512_reduce_max_ps(top);
    if (largest == 0.0f) continue;  // an all-zero row: zero outputs
    row_scale[r] = largest / 127.0f;
    const __m512 inverse = _mm512_set1_ps(127.0f / largest);
    for (int64_t k = 0; k < K; k += 16) {
      const __mmask16 valid = K - k >= 16 ? 0xffff : (1u << (K - k)) - 1;
      __m512 rest = _mm512_mul_ps(_mm512_maskz_loadu_ps(valid, xr + k), inverse);
      for (int64_t d = 0; d < kDigits; ++d) {
        const __m512 digit = _mm512_roundscale_ps(rest, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        _mm_mask_storeu_epi8(digits + (d * rows + r) * stride + k, valid,
                             _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(digit)));
        rest = _mm512_mul_ps(_mm512_sub_ps(rest, digit), base);
      }
    }
  }
}

// Sixteen columns' digit sums as f32, C0 + C1 / 254 + C2 / 254^2: C0 at `sums` (64-byte
// aligned), C1 and C2 `digit_stride` and twice that many int32 after it.
inline __m512 combine_digits(const int32_t* sums, int64_t digit_stride) {
  const __m512 c0 = _mm512_cvtepi32_ps(_mm512_load_si512(sums));
  const __m512 c1 = _mm512_cvtepi32_ps(_mm512_load_si512(sums + digit_stride));
  const __m512 c2 = _mm512_cvtepi32_ps(_mm512_load_si512(sums + 2 * digit_stride));
  const __m512 inverse_base = _mm512_set1_ps(1.0f / kDigitBase);
  return _mm512_fmadd_ps(_mm512_fmadd_ps(c2, inverse_base, c1), inverse_base, c0);
}

#elif defined(HPLLM_PATH_AVX2)
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

// activation_digits on eight lanes: the same operations in the same order, so the same digits.
void activation_digits(const float* x, int64_t M, int64_t K, int64_t rows, int64_t stride,
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
    float any_nan = 0.0f;
    for (float lane : lanes) any_nan += lane;
    if (std::isnan(any_nan)) {
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
#endif

// ---- AMX (Intel Advanced Matrix Extensions): int8 products on the tile unit ----
//
// CPUs with AMX-INT8 (Xeon from Sapphire Rapids) multiply 16 x 64 int8 by 64 x 16 int8 into
// 16 x 16 int32 in one instruction (TDPBSSD), 16x the multiply-adds per cycle of the AVX-512
// FMA units: from kBatchRows rows up the FMA routes above are compute-bound (at 16 rows a base
// decode step's int8 products ran at ~165 GFLOP/s on two cores, docs/performance.md), and one
// TDPBSSD per 1 KiB weight operand outpaces the memory even at one row.
// The activations are f32, so they enter as three int8 digits (above, with the error bound).
// int8 weight-only products (AmxInt8MatmulImpl, every row count) read their weights in the
// unit's layout, made once at load (TiledAmxInt8Weight), so each operand is one tile load
// straight from the weight array; the (row, digit) pairs of up to five rows are the rows of
// one digits operand, so batch 1 runs one TDPBSSD per weight operand and is memory-bound; more
// rows go 16 at a time, each weight operand loaded once for the three digits' operands.
// w8a8 products (amx_w8a8_product, from kBatchRows rows) load their weights as w8a8 stores
// them, already four k of a column adjacent.
// Compiled where the target has AMX-INT8 (HPLLM_KERNEL_ISA=native on such a CPU, or avx512amx);
// used only if the kernel lets this process use the tile registers (Linux >= 5.16 grants them
// on request).
#if defined(HPLLM_PATH_AVX512) && defined(__AMX_TILE__) && defined(__AMX_INT8__)
#define HPLLM_AMX 1
}  // namespace
#include <sys/syscall.h>
#include <unistd.h>
namespace {

// Whether this process may use the AMX tile registers (asked once: Linux only grants them on
// request, arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)).
bool amx_permitted() {
  static const bool permitted = [] {
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return permitted;
}

constexpr int64_t kAmxRows = 16, kAmxK = 64, kAmxCols = 16;  // one TDPBSSD

// Tile register shapes: all eight registers of 64-byte rows; registers 0 .. short_tiles - 1
// of `short_rows` rows (the int8 route's sums and digits when a few rows make fewer than 16
// (row, digit) pairs), the rest of 16 (by default all of them).
struct alignas(64) AmxConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t bytes_per_row[16] = {};
  uint8_t rows[16] = {};
  explicit AmxConfig(int64_t short_rows = kAmxRows, int short_tiles = 0) {
    for (int i = 0; i < 8; ++i)
      bytes_per_row[i] = 64, rows[i] = static_cast<uint8_t>(i < short_tiles ? short_rows : 16);
  }
};

// Bytes from one activation row's digits to the next: k_pad plus one k-step. With rows k_pad
// bytes apart, a k_pad of 2048 put the 16 rows of a digits operand, and the three digits'
// operands (32 KiB apart), in the same two L1 sets: a TDPBSSD loop at 16 rows and k_pad 2048
// (base's down projection) ran at 39-42 ns per k-step against 21-26 at k_pad 768, and at 23 with
// 2112-byte rows (scratch loop in L1, one thread, quiet; not kept).
constexpr int64_t digits_stride(int64_t k_pad) { return k_pad + kAmxK; }

// For the int4 route (amx_int4_product), whose operands are unpacked per call in a layout of
// [k_pad / 64][8 column groups][16][64]:
// k-steps per block: every column group runs a block of steps (its three digit sums loaded
// from and stored to `sums` around it) before the next block, so the block's activation digits
// (12 KiB at 16 rows) stay in L1 across the eight groups, where a whole-k pass per group
// streams them from L2 eight times. Chosen in a scratch harness on a loaded machine, not kept:
// no figure is quoted for it.
constexpr int64_t kAmxBlockSteps = 4;

// sums[kDigits][16][16] (+)= the three digit sums of one 16-row group and one column group over
// k-steps step0 .. step0 + steps (the sums start at zero when step0 is 0).
void amx_column_group(const int8_t* digits, int64_t rows, int64_t stride, int64_t step0,
                      int64_t steps, const int8_t* weights, int64_t group, int32_t* sums) {
  const int64_t digit = rows * stride;
  if (step0 == 0) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
  } else {
    _tile_loadd(0, sums, 64);
    _tile_loadd(1, sums + 256, 64);
    _tile_loadd(2, sums + 512, 64);
  }
  for (int64_t step = step0; step < step0 + steps; ++step) {
    const int8_t* a = digits + step * kAmxK;
    _tile_loadd(3, a, stride);
    _tile_loadd(4, a + digit, stride);
    _tile_loadd(5, a + 2 * digit, stride);
    _tile_loadd(6, weights + (step * 8 + group) * kAmxRows * 64, 64);
    _tile_dpbssd(0, 3, 6);
    _tile_dpbssd(1, 4, 6);
    _tile_dpbssd(2, 5, 6);
  }
  _tile_stored(0, sums, 64);
  _tile_stored(1, sums + 256, 64);
  _tile_stored(2, sums + 512, 64);
}

// The int8 weights in the unit's layout, made once at load (infer.kernels.TiledAmxInt8Weight):
// per 128-column tile two 64-column halves, each [k_pad / 64 steps][4 column groups][16][64]
// bytes: one TDPBSSD weight operand (1 KiB) per step and group, its row i holding k = 4i ..
// 4i + 3 of the group's 16 columns (column c at bytes 4c .. 4c + 3), K zero-padded to whole
// steps. A half is one task and its operands one contiguous stream.
constexpr int64_t kAmxGroups = 4;                    // column groups per half
constexpr int64_t kAmxHalf = kAmxGroups * kAmxCols;  // columns per half
constexpr int64_t kAmxOperandBytes = kAmxRows * 64;
constexpr int64_t kAmxStepBytes = kAmxGroups * kAmxOperandBytes;
// Up to this many activation rows all (row, digit) pairs are the rows of one digits operand
// (3 x 5 = 15 <= 16), so each weight operand takes one TDPBSSD (amx_half_pairs); above it, 16
// rows at a time, one digits operand per digit (amx_half_group).
constexpr int64_t kAmxFewRows = 5;
// 16-row chunks per block of a product with more rows (prefill): 4 x 16 rows x 3 digits x
// (K + 64) bytes, 166 KiB at K 768 and 406 KiB at 2048, well inside a 2 MiB L2.
constexpr int64_t kAmxBlockChunks = 4;
// How many k-steps (4 KiB each) ahead the weight stream is prefetched; see kPrefetchRows for
// why a core needs it.
constexpr int64_t kAmxPrefetchSteps = 2;

// sums[pair][64] = the (row, digit) pairs of up to kAmxFewRows rows (`a`: the first pair's
// digits, pairs `stride` bytes apart, as many as the tile registers were configured with) times
// the half's weight operands `w` over every k-step. Tile registers: 0-3 the four column
// groups' sums, 4 the digits, 5-7 the weight operands in turn.
void amx_half_pairs(const int8_t* a, int64_t stride, const int8_t* w, int64_t steps,
                    int32_t (*sums)[kAmxHalf]) {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int64_t step = 0; step < steps; ++step) {
    const int8_t* b = w + step * kAmxStepBytes;
    prefetch_ahead(b + kAmxPrefetchSteps * kAmxStepBytes, kAmxStepBytes);
    _tile_loadd(4, a + step * kAmxK, stride);
    _tile_loadd(5, b, 64);
    _tile_dpbssd(0, 4, 5);
    _tile_loadd(6, b + kAmxOperandBytes, 64);
    _tile_dpbssd(1, 4, 6);
    _tile_loadd(7, b + 2 * kAmxOperandBytes, 64);
    _tile_dpbssd(2, 4, 7);
    _tile_loadd(5, b + 3 * kAmxOperandBytes, 64);
    _tile_dpbssd(3, 4, 5);
  }
  _tile_stored(0, sums[0], kAmxHalf * 4);
  _tile_stored(1, sums[0] + kAmxCols, kAmxHalf * 4);
  _tile_stored(2, sums[0] + 2 * kAmxCols, kAmxHalf * 4);
  _tile_stored(3, sums[0] + 3 * kAmxCols, kAmxHalf * 4);
}

// sums[d x 16 + r][16 g ..] = digit d of 16 rows (`a`: digit 0's first row; rows `stride` bytes
// apart, digits `digit_bytes` apart) times column group g of the half, over every k-step: the
// three digits' sums stay in tile registers 0-2 and each weight operand, loaded once (register
// 6), serves all three (digits in 3-5). Per three TDPBSSD: three digits loads (from cache) and
// one weight load. Only the first chunk of rows prefetches; later ones find the half in cache.
// (Prefetching all four groups' operands of a step from group 0's pass instead, 2-16 steps
// ahead, into L1 or L2, read the weights 15-45% slower at 16 rows in a scratch harness.)
// Chosen over running amx_half_pairs' loop once per digit (fewer tile loads, 15 against 16 per
// twelve TDPBSSD, but each weight operand read three times) by a side-by-side timing of the
// two on base's matrices at 16 rows, not kept: no figure is quoted for it.
void amx_half_group(const int8_t* a, int64_t stride, int64_t digit_bytes, const int8_t* w,
                    int64_t steps, int64_t g, bool prefetch, int32_t (*sums)[kAmxHalf]) {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  for (int64_t step = 0; step < steps; ++step) {
    const int8_t* b = w + step * kAmxStepBytes + g * kAmxOperandBytes;
    if (prefetch) prefetch_ahead(b + kAmxPrefetchSteps * kAmxStepBytes, kAmxOperandBytes);
    _tile_loadd(6, b, 64);
    _tile_loadd(3, a + step * kAmxK, stride);
    _tile_dpbssd(0, 3, 6);
    _tile_loadd(4, a + digit_bytes + step * kAmxK, stride);
    _tile_dpbssd(1, 4, 6);
    _tile_loadd(5, a + 2 * digit_bytes + step * kAmxK, stride);
    _tile_dpbssd(2, 5, 6);
  }
  _tile_stored(0, sums[0] + g * kAmxCols, kAmxHalf * 4);
  _tile_stored(1, sums[kAmxRows] + g * kAmxCols, kAmxHalf * 4);
  _tile_stored(2, sums[2 * kAmxRows] + g * kAmxCols, kAmxHalf * 4);
}

// y[M, N] = x[M, K] @ (int8 operands w[N / 128][2][k_pad / 64][4][16][64]) * scale[N], every
// row count on the tile unit. The rows go in chunks (all of them up to kAmxFewRows, else 16),
// a chunk's digits stored [kDigits][rows][stride]: pair (row r, digit d) is digits row
// d x rows + r, so a few rows' pairs are one strided operand, and a 16-row chunk's digit d
// another (a shorter last chunk's operands run on into the next digit's rows and the zeros
// after the last: sums rows no output reads).
void amx_int8_product(ffi::ThreadPool& pool, const float* x, int64_t M, int64_t K, int64_t N,
                      const int8_t* w, const float* scale, float* y) {
  const int64_t steps = (K + kAmxK - 1) / kAmxK, stride = digits_stride(steps * kAmxK);
  const bool few = M <= kAmxFewRows;
  const int64_t chunk_rows = few ? M : kAmxRows;
  const int64_t operand_rows = few ? kDigits * M : kAmxRows, chunk_pairs = kDigits * chunk_rows;
  const int64_t chunks = (M + chunk_rows - 1) / chunk_rows;
  // The caller's scratch: the helpers read it only while the caller waits for their tasks.
  int8_t* digits = thread_scratch<int8_t, Scratch::kAmxDigits>(chunks * chunk_pairs * stride);
  float* row_scale = thread_scratch<float, Scratch::kAmxRowScale>(M);
  // Chunk by chunk over the threads: at 1024 rows and K 2048 one thread took ~1 ms of a ~9 ms
  // product making the digits while the other waited.
  parallel_tiles(pool, chunks, [&](int64_t chunk) {
    const int64_t m0 = chunk * chunk_rows, rows = std::min(chunk_rows, M - m0);
    int8_t* a = digits + chunk * chunk_pairs * stride;
    activation_digits(x + m0 * K, rows, K, rows, stride, 0, rows, a, row_scale + m0);
    std::memset(a + kDigits * rows * stride, 0, (chunk_pairs - kDigits * rows) * stride);
  });
  const int64_t tiles = (N + kTile - 1) / kTile, halves = 2 * tiles;
  // The chunks go in blocks of kAmxBlockChunks, each block over every half before the next
  // (one work item per block and half): a block's digits stay in L2 while the halves stream
  // through, where a whole-M pass per half read every chunk's digits (M = 1024, K = 768:
  // 2.4 MiB, more than L2) back from L3 or memory once per half.
  const int64_t blocks = (chunks + kAmxBlockChunks - 1) / kAmxBlockChunks;
  const auto run_item = [&](int64_t item) {
    const int64_t half = item % halves, block = item / halves;
    const int64_t c0 = half * kAmxHalf, width = std::min(kAmxHalf, N - c0);
    if (width <= 0) return;  // the padding half of the last tile
    const int8_t* wh = w + half * steps * kAmxStepBytes;
    alignas(64) int32_t sums[kDigits * kAmxRows][kAmxHalf];
    const int64_t first_chunk = block * kAmxBlockChunks;
    for (int64_t chunk = first_chunk;
         chunk < std::min(chunks, first_chunk + kAmxBlockChunks); ++chunk) {
      const int64_t m0 = chunk * chunk_rows, rows = std::min(chunk_rows, M - m0);
      const int8_t* a = digits + chunk * chunk_pairs * stride;
      // The sums row of pair (r, d): d x digit_rows + r.
      const int64_t digit_rows = few ? rows : kAmxRows;
      if (few)
        amx_half_pairs(a, stride, wh, steps, sums);
      else
        for (int64_t g = 0; g < kAmxGroups; ++g)
          amx_half_group(a, stride, rows * stride, wh, steps, g, chunk == first_chunk, sums);
      for (int64_t r = 0; r < rows; ++r) {
        const __m512 s = _mm512_set1_ps(row_scale[m0 + r]);
        for (int64_t L = 0; L < kAmxGroups && kAmxCols * L < width; ++L) {
          const int64_t c = kAmxCols * L;
          // The digits combined, then the row's and the columns' scales.
          const __m512 v = combine_digits(sums[r] + c, digit_rows * kAmxHalf);
          const __mmask16 valid = width - c >= 16 ? 0xffff : (1u << (width - c)) - 1;
          const __m512 column_scale = _mm512_maskz_loadu_ps(valid, scale + c0 + c);
          _mm512_mask_storeu_ps(y + (m0 + r) * N + c0 + c, valid,
                                _mm512_mul_ps(_mm512_mul_ps(v, s), column_scale));
        }
      }
    }
  };
  // One task per thread, each taking halves until none are left, so a thread configures the
  // tile registers once per call: a configuration and a release per half timed slower at one
  // row side by side (not kept; no figure quoted).
  const int64_t items = blocks * halves;
  std::atomic<int64_t> next{0};
  parallel_tiles(pool, std::min<int64_t>(pool.num_threads(), items), [&](int64_t) {
    const AmxConfig config(operand_rows, 5);
    _tile_loadconfig(&config);
    for (int64_t item; (item = next.fetch_add(1)) < items;) run_item(item);
    _tile_release();
  });
}
#endif

#if defined(HPLLM_PATH_AVX512) || defined(HPLLM_PATH_AVX2)
// The registers route (see kBatchRows) over M rows: row blocks x tiles handed out as the GEMM's,
// each block in chunks of up to kMicroRows rows, `chunk_fn(t, m, rows, out)` computing rows m ..
// m + rows of tile t into out (rows: a std::integral_constant).
template <typename ChunkFn>
void registers_route(ffi::ThreadPool& pool, int64_t M, int64_t N, int64_t tiles, float* y,
                     const ChunkFn& chunk_fn) {
  batched_tasks(pool, M, tiles, [&](int64_t t, int64_t m0, int64_t rows) {
    tile_all_rows<Simd::kMicroRows>(t, rows, N, y, [&](int64_t m, int64_t chunk,
                                                       float (*out)[kTile]) {
      with_micro_rows(chunk, [&](auto r) { chunk_fn(t, m, r, out); });
    }, m0);
  });
}
#endif

ffi::Error Int8MatvecImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> w,
                          ffi::Buffer<ffi::F32> scale, ffi::ResultBuffer<ffi::F32> y,
                          bool widen_in_registers) {
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
  const int64_t tiles = (N + kTile - 1) / kTile;
#if defined(HPLLM_PATH_AVX512) || defined(HPLLM_PATH_AVX2)
  if (M >= kBatchRows && widen_in_registers) {
    registers_route(pool, M, N, tiles, yp, [&](int64_t t, int64_t m, auto rows,
                                               float (*out)[kTile]) {
      constexpr int64_t kRows = decltype(rows)::value;
      int8_tile_simd<kRows, registers_route_vectors(kRows)>(xp + m * K, K, wp + t * K * kTile,
                                                            sp + t * kTile, K, out);
    });
    return ffi::Error::Success();
  }
  if (M >= kBatchRows && M < kGemmRows) {
    parallel_tiles(pool, tiles, [&](int64_t t) {
      const int8_t* wt = wp + t * K * kTile;
      tile_few_rows(t, M, K, N, xp, yp, [&](int64_t k0, int64_t kn, float (*wf)[kTile]) {
        dequantize_int8(wt, k0, kn, wf);
      }, sp + t * kTile);
    });
    return ffi::Error::Success();
  }
  if (M >= kGemmRows) {
    batched_tasks(pool, M, tiles, [&](int64_t t, int64_t m0, int64_t rows) {
      const int8_t* wt = wp + t * K * kTile;
      tile_batched_rows(t, m0, rows, K, N, xp, yp,
                        [&](int64_t k0, int64_t kn, int64_t c0, float* panel) {
                          dequantize_int8(wt, k0, kn, c0, panel);
                        }, sp + t * kTile);
    });
    return ffi::Error::Success();
  }
#endif
  parallel_tiles(pool, tiles, [&](int64_t t) {
    const int8_t* wt = wp + t * K * kTile;
    tile_all_rows(t, M, N, yp, [&](int64_t m, int64_t rows, float (*out)[kTile]) {
      with_rows(rows, [&](auto r) {
        int8_tile<decltype(r)::value>(xp + m * K, K, wt, sp + t * kTile, K, out);
      });
    });
  });
  return ffi::Error::Success();
}

// y[M, N] = x[M, K] @ int8 weights in the tile unit's layout (TiledAmxInt8Weight) * scale[N]:
// made only where Kernels.amx is true (compiled with AMX-INT8 and granted the tile registers).
ffi::Error AmxInt8MatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                             ffi::Buffer<ffi::S8> w, ffi::Buffer<ffi::F32> scale,
                             ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || wd.size() != 6 || yd.size() != 2 || wd[1] != 2 || wd[3] != 4 ||
      wd[4] != 16 || wd[5] != 64 || (xd[1] + 63) / 64 != wd[2] || yd[0] != xd[0] ||
      (yd[1] + kTile - 1) / kTile != wd[0] ||
      static_cast<int64_t>(scale.element_count()) != wd[0] * kTile)
    return ffi::Error::InvalidArgument(
        "amx_int8_matmul: expects x[M, K], w[tiles, 2, ceil(K / 64), 4, 16, 64], "
        "scale[tiles * 128] -> y[M, N]");
#if defined(HPLLM_AMX)
  if (amx_permitted()) {
    if (xd[0] > 0)
      amx_int8_product(pool, x.typed_data(), xd[0], xd[1], yd[1], w.typed_data(),
                       scale.typed_data(), y->typed_data());
    return ffi::Error::Success();
  }
#endif
  return ffi::Error(ffi::ErrorCode::kUnimplemented,
                    "amx_int8_matmul: this build or this process has no AMX-INT8");
}

#if defined(HPLLM_AMX)
// ---- AMX for int4 weights: the nibbles unpacked into the unit's layout, scaled per group ----
//
// The same three activation digits and TDPBSSD sums as amx_int8_product, with q = nibble - 8
// (in [-8, 7], an int8) as the weight operand. The scales change every `group` rows of k, so
// each quantization group's digit sums are flushed on their own: to f32 (C0 + C1 / 254 +
// C2 / 254^2), times the group's column scales, added to an f32 accumulator; the row's scale s
// multiplies the total. Taken where a group is whole k-steps of the unit (a multiple of 64) or
// the weight has one group (per channel, k zero-padded to whole steps); other group sizes keep
// the FMA routes. The digits' bound is int8's: |error| <= 2^-24 max|x_row| sum_k |w[k, n]|,
// plus the f32 rounding of the per-group flushes (tests/test_kernels.py measures it). Each
// weight tile is unpacked once per call into per-thread scratch (k_pad x 128 bytes) and
// reused by every 16-row group. Against the FMA routes on the same CPU
// (bench/decode_matmuls.py, "int4 native" against "int4 native avx512"; docs/performance.md)
// it was ahead at every row count from 5, so it takes over from kBatchRows like int8's route.

// Packed int4 tile rows [K / 2][128] (offset binary) as the unit's weight operands,
// [k_pad / 64][8 column groups][16][64] int8 as amx_column_group reads them: row i of column
// group g's operand holds q at k = 4i .. 4i + 3 of columns 16g .. 16g + 15, in order. Packed
// rows 2i (k 4i, 4i + 1) and 2i + 1 (k 4i + 2, 4i + 3) give four rows of nibbles (AND, shift),
// which byte unpacks interleave
// (the int8 route's per-call shuffle did the same before its weights took the unit's layout). Those unpacks work within 128-bit lanes
// (output group o, lane L holds source columns 16L + 4o .. + 3); permuting the dwords of each
// 64-column source row first (dword 4L + o <- dword 4o + L, columns 16o + 4L .. + 3) makes
// that the natural order, so the scales and the output need no permutation.
// Rows past K are zero (q = 0).
void amx_int4_operands(const uint8_t* packed, int64_t K, int64_t k_pad, int8_t* out) {
  const __m512i low = _mm512_set1_epi8(15), eight = _mm512_set1_epi8(8);
  const __m512i zero_q = _mm512_set1_epi8(static_cast<char>(0x88));  // two q = 0 nibbles
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  const int64_t half = K / 2;
  for (int64_t p = 0; p < k_pad / 2; p += 2) {
    prefetch_ahead(packed + (p + kPrefetchRows) * kTile, 2 * kTile);
    const int64_t k = 2 * p, step = k / kAmxK, quad = (k % kAmxK) / 4;
    for (int64_t h = 0; h < 2; ++h) {
      __m512i b[2];
      for (int64_t i = 0; i < 2; ++i)
        b[i] = _mm512_permutexvar_epi32(
            order, p + i < half ? _mm512_loadu_si512(packed + (p + i) * kTile + 64 * h) : zero_q);
      const __m512i r[4] = {_mm512_sub_epi8(_mm512_and_si512(b[0], low), eight),
                            _mm512_sub_epi8(_mm512_and_si512(_mm512_srli_epi16(b[0], 4), low), eight),
                            _mm512_sub_epi8(_mm512_and_si512(b[1], low), eight),
                            _mm512_sub_epi8(_mm512_and_si512(_mm512_srli_epi16(b[1], 4), low), eight)};
      const __m512i lo01 = _mm512_unpacklo_epi8(r[0], r[1]), hi01 = _mm512_unpackhi_epi8(r[0], r[1]);
      const __m512i lo23 = _mm512_unpacklo_epi8(r[2], r[3]), hi23 = _mm512_unpackhi_epi8(r[2], r[3]);
      const __m512i quads[4] = {_mm512_unpacklo_epi16(lo01, lo23), _mm512_unpackhi_epi16(lo01, lo23),
                                _mm512_unpacklo_epi16(hi01, hi23), _mm512_unpackhi_epi16(hi01, hi23)};
      for (int64_t o = 0; o < 4; ++o)
        _mm512_store_si512(out + ((step * 8 + 4 * h + o) * kAmxRows + quad) * 64, quads[o]);
    }
  }
}

// y[M, N] = x[M, K] @ dequantize(packed int4 tiles [N / 128][K / 2][128], scale[K / group,
// ld_scale]) on the tile unit; group % 64 == 0 or group == K.
void amx_int4_product(ffi::ThreadPool& pool, const float* x, int64_t M, int64_t K, int64_t N,
                      const uint8_t* packed, const float* scale, int64_t ld_scale,
                      int64_t group, float* y) {
  const int64_t rows = (M + kAmxRows - 1) / kAmxRows * kAmxRows;
  const int64_t k_pad = (K + kAmxK - 1) / kAmxK * kAmxK, stride = digits_stride(k_pad);
  int8_t* digits = thread_scratch<int8_t, Scratch::kAmxDigits>(kDigits * rows * stride);
  float* row_scale = thread_scratch<float, Scratch::kAmxRowScale>(rows);
  // 16 rows at a time over the threads (see amx_int8_product).
  parallel_tiles(pool, rows / kAmxRows, [&](int64_t chunk) {
    activation_digits(x, M, K, rows, stride, chunk * kAmxRows, (chunk + 1) * kAmxRows, digits,
                      row_scale);
  });
  const int64_t tiles = (N + kTile - 1) / kTile, steps = k_pad / kAmxK;
  // k-steps per quantization group (per channel: all of them).
  const int64_t group_steps = group == K ? steps : group / kAmxK;
  parallel_tiles(pool, tiles, [&](int64_t t) {
    int8_t* operands = thread_scratch<int8_t, Scratch::kAmxOperands>(k_pad * kTile);
    amx_int4_operands(packed + t * (K / 2) * kTile, K, k_pad, operands);
    static const AmxConfig config;
    _tile_loadconfig(&config);
    const int64_t n0 = t * kTile, width = std::min(kTile, N - n0);
    alignas(64) int32_t group_sums[kTile / kAmxCols][kDigits * 256];
    alignas(64) float acc[kAmxRows][kTile];
    for (int64_t m0 = 0; m0 < M; m0 += kAmxRows) {
      const int64_t valid_rows = std::min(kAmxRows, M - m0);
      for (int64_t s0 = 0; s0 < steps; s0 += group_steps) {
        // The group's steps in blocks (see kAmxBlockSteps), each block over all column
        // groups; amx_column_group starts the sums at zero on the group's first step.
        for (int64_t b0 = 0; b0 < group_steps; b0 += kAmxBlockSteps)
          for (int64_t g = 0; g < kTile / kAmxCols; ++g)
            amx_column_group(digits + m0 * stride + s0 * kAmxK, rows, stride, b0,
                             std::min(kAmxBlockSteps, group_steps - b0),
                             operands + s0 * 8 * kAmxRows * 64, g, group_sums[g]);
        const float* s = scale + (s0 / group_steps) * ld_scale + n0;
        for (int64_t g = 0; g < kTile / kAmxCols; ++g) {
          const __m512 column_scale = _mm512_loadu_ps(s + 16 * g);
          for (int64_t r = 0; r < valid_rows; ++r) {
            float* a = acc[r] + 16 * g;
            const __m512 part = _mm512_mul_ps(combine_digits(group_sums[g] + r * kAmxCols, kAmxRows * kAmxCols), column_scale);
            _mm512_store_ps(a, s0 == 0 ? part : _mm512_add_ps(part, _mm512_load_ps(a)));
          }
        }
      }
      for (int64_t r = 0; r < valid_rows; ++r) {
        const __m512 row = _mm512_set1_ps(row_scale[m0 + r]);
        for (int64_t c = 0; c < width; c += 16) {
          const __mmask16 valid = width - c >= 16 ? 0xffff : (1u << (width - c)) - 1;
          _mm512_mask_storeu_ps(y + (m0 + r) * N + n0 + c, valid,
                                _mm512_mul_ps(_mm512_load_ps(acc[r] + c), row));
        }
      }
    }
    _tile_release();
  });
}
#endif

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
  const int64_t tiles = (N + kTile - 1) / kTile;
#if defined(HPLLM_AMX)
  if (M >= kBatchRows && (group % kAmxK == 0 || group == K) && amx_permitted()) {
    amx_int4_product(pool, xp, M, K, N, pp, sp, ld_scale, group, yp);
    return ffi::Error::Success();
  }
#endif
#if defined(HPLLM_PATH_AVX512) || defined(HPLLM_PATH_AVX2)
  if (M >= kBatchRows && M < kGemmRows) {
    parallel_tiles(pool, tiles, [&](int64_t t) {
      const uint8_t* pt = pp + t * (K / 2) * kTile;
      tile_few_rows(t, M, K, N, xp, yp, [&](int64_t k0, int64_t kn, float (*wf)[kTile]) {
        dequantize_int4(pt, sp + t * kTile, ld_scale, group, k0, kn, wf);
      }, nullptr);
    });
    return ffi::Error::Success();
  }
  if (M >= kGemmRows) {
    batched_tasks(pool, M, tiles, [&](int64_t t, int64_t m0, int64_t rows) {
      const uint8_t* pt = pp + t * (K / 2) * kTile;
      tile_batched_rows(t, m0, rows, K, N, xp, yp,
                        [&](int64_t k0, int64_t kn, int64_t c0, float* panel) {
                          dequantize_int4(pt, sp + t * kTile, ld_scale, group, k0, kn, c0, panel);
                        }, nullptr);
    });
    return ffi::Error::Success();
  }
#endif
  parallel_tiles(pool, tiles, [&](int64_t t) {
    const uint8_t* pt = pp + t * (K / 2) * kTile;
    tile_all_rows(t, M, N, yp, [&](int64_t m, int64_t rows, float (*out)[kTile]) {
      with_rows(rows, [&](auto r) {
        int4_tile<decltype(r)::value>(xp + m * K, K, pt, sp + t * kTile, ld_scale, K, group,
                                      out);
      });
    });
  });
  return ffi::Error::Success();
}

// ---- bf16 weights: widened to f32 in registers, no scale ----
//
// `convert --to bf16` leaves `FloatDot` on a bf16 weight, which XLA:CPU runs as "convert the
// whole weight to f32, then an f32 dot": 2 bytes read, 4 written and 4 read again per weight,
// slower than f32 weights. These kernels read each bf16 weight once. bf16 is the top half of an
// f32 (same sign, exponent and top 7 mantissa bits), so widening is exact: zero-extend 16 -> 32
// bits and shift left by 16. The products and the sums are those of x @ w.astype(f32), summed
// in another order. Same tiled layout [N / 128][K][128] and the same routes as int8: row chunks
// of the tile kernel for 1-4 rows, the batched route (tile_batched) from kBatchRows rows.

inline float bf16_to_f32(uint16_t bits) {
  const uint32_t wide = static_cast<uint32_t>(bits) << 16;
  float value;
  std::memcpy(&value, &wide, sizeof value);
  return value;
}

// The portable bf16 tile: each tile row is widened into a staging array once and read back for
// every activation row.
template <int64_t Rows>
void bf16_tile_portable(const float* x, int64_t ldx, const uint16_t* w, int64_t K,
                        float (*out)[kTile]) {
  float acc[Rows][kTile] = {};
  for (int64_t k = 0; k < K; ++k) {
    const uint16_t* row = w + k * kTile;
    float wide[kTile];
#pragma omp simd
    for (int64_t j = 0; j < kTile; ++j) wide[j] = bf16_to_f32(row[j]);
    for (int64_t r = 0; r < Rows; ++r) {
      const float xv = x[r * ldx + k];
#pragma omp simd
      for (int64_t j = 0; j < kTile; ++j) acc[r][j] += xv * wide[j];
    }
  }
  for (int64_t r = 0; r < Rows; ++r)
    for (int64_t j = 0; j < kTile; ++j) out[r][j] = acc[r][j];
}

#if defined(HPLLM_PATH_AVX512) || defined(HPLLM_PATH_AVX2)
// kLanes bf16 -> kLanes f32: a zero-extending load (16 -> 32 bits per lane), a shift by 16
// into the top half, and a reinterpretation as f32.
#if defined(HPLLM_PATH_AVX512)
inline Simd::F widen_bf16(const uint16_t* p) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
#else
inline Simd::F widen_bf16(const uint16_t* p) {
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}
#endif

// bf16 tile in intrinsics: int8's loop (widening_tile_simd) without a column scale.
template <int64_t Rows, int64_t kVectors = vectors_per_pass(Rows)>
void bf16_tile_simd(const float* x, int64_t ldx, const uint16_t* w, int64_t K,
                    float (*out)[kTile]) {
  widening_tile_simd<Rows, kVectors>(x, ldx, w, nullptr, K, out, widen_bf16);
}

// bf16 block for the few-rows route: the weights as f32, exactly.
void dequantize_bf16(const uint16_t* w, int64_t k0, int64_t kn, float (*wf)[kTile]) {
  for (int64_t k = 0; k < kn; ++k)
    for (int64_t j = 0; j < kTile; j += Simd::kLanes)
      Simd::store(wf[k] + j, widen_bf16(w + (k0 + k) * kTile + j));
}

// bf16 panel for the GEMM route.
void dequantize_bf16(const uint16_t* w, int64_t k0, int64_t kn, int64_t c0, float* panel) {
  for (int64_t k = 0; k < kn; ++k)
    for (int64_t j = 0; j < kPanel; j += Simd::kLanes)
      Simd::store(panel + k * kPanel + j, widen_bf16(w + (k0 + k) * kTile + c0 + j));
}
#endif

template <int64_t Rows>
void bf16_tile(const float* x, int64_t ldx, const uint16_t* w, int64_t K, float (*out)[kTile]) {
#if defined(HPLLM_PATH_AVX512) || defined(HPLLM_PATH_AVX2)
  bf16_tile_simd<Rows>(x, ldx, w, K, out);
#else
  bf16_tile_portable<Rows>(x, ldx, w, K, out);
#endif
}

ffi::Error Bf16MatvecImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                          ffi::Buffer<ffi::BF16> w, ffi::ResultBuffer<ffi::F32> y,
                          bool widen_in_registers) {
  const auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || wd.size() != 3 || yd.size() != 2 || wd[2] != kTile || xd[1] != wd[1] ||
      yd[0] != xd[0] || (yd[1] + kTile - 1) / kTile != wd[0])
    return ffi::Error::InvalidArgument(
        "bf16_matvec: expects x[M, K], w[tiles, K, 128] (bf16) -> y[M, N]");
  const int64_t M = xd[0], K = xd[1], N = yd[1];
  const float* xp = x.typed_data();
  const uint16_t* wp = w.typed_data();
  float* yp = y->typed_data();
  const int64_t tiles = (N + kTile - 1) / kTile;
#if defined(HPLLM_PATH_AVX512) || defined(HPLLM_PATH_AVX2)
  if (M >= kBatchRows && widen_in_registers) {
    registers_route(pool, M, N, tiles, yp, [&](int64_t t, int64_t m, auto rows,
                                               float (*out)[kTile]) {
      constexpr int64_t kRows = decltype(rows)::value;
      bf16_tile_simd<kRows, registers_route_vectors(kRows)>(xp + m * K, K, wp + t * K * kTile,
                                                            K, out);
    });
    return ffi::Error::Success();
  }
  if (M >= kBatchRows && M < kGemmRows) {
    parallel_tiles(pool, tiles, [&](int64_t t) {
      const uint16_t* wt = wp + t * K * kTile;
      tile_few_rows(t, M, K, N, xp, yp, [&](int64_t k0, int64_t kn, float (*wf)[kTile]) {
        dequantize_bf16(wt, k0, kn, wf);
      }, nullptr);
    });
    return ffi::Error::Success();
  }
  if (M >= kGemmRows) {
    batched_tasks(pool, M, tiles, [&](int64_t t, int64_t m0, int64_t rows) {
      const uint16_t* wt = wp + t * K * kTile;
      tile_batched_rows(t, m0, rows, K, N, xp, yp,
                        [&](int64_t k0, int64_t kn, int64_t c0, float* panel) {
                          dequantize_bf16(wt, k0, kn, c0, panel);
                        }, nullptr);
    });
    return ffi::Error::Success();
  }
#endif
  parallel_tiles(pool, tiles, [&](int64_t t) {
    const uint16_t* wt = wp + t * K * kTile;
    tile_all_rows(t, M, N, yp, [&](int64_t m, int64_t rows, float (*out)[kTile]) {
      with_rows(rows, [&](auto r) { bf16_tile<decltype(r)::value>(xp + m * K, K, wt, K, out); });
    });
  });
  return ffi::Error::Success();
}

// ---- w8a8: int8 weights x int8 activations (per row), exact int32 sums ----
//
// `W8A8Dot` quantizes each activation row to int8 (one scale per row) and multiplies in
// integers: y = float(sum_k qx[r, k] * qw[k, j]) * x_scale[r] * w_scale[j]. The int32 sum is
// exact in any order, so these kernels give the XLA op's result bit for bit. Layout: the
// weight tile is [K / 4][128][4], the four k of one column adjacent, which is what the integer
// dot instructions consume (4 products per 32-bit lane):
// - AVX-512 VNNI (`vpdpbusd`: u8 x s8, 4 products summed into an int32 lane): the activations
//   are offset to unsigned (qx + 128) and 128 x the column's weight sum is subtracted at the end;
// - AVX2 (and AVX-512 without VNNI): `vpmaddubsw` (u8 x s8 -> pairs summed in int16) then
//   `vpmaddwd` by ones (-> int32), llama.cpp's Q8_0 trick: |qx| times the weight with qx's sign,
//   so a pair is at most 2 x 127 x 127 and never saturates (weights are in [-127, 127]); on a
//   CPU with AVX-VNNI (256-bit `vpdpbusd`, Alder Lake and later client cores) one `vpdpbusd`
//   of the same operands replaces the pair of instructions and the add;
// - portable: an int32 loop.
#if defined(HPLLM_PATH_AVX512) && defined(__AVX512VNNI__)
#define HPLLM_W8A8_VNNI 1
#elif defined(HPLLM_PATH_AVX512) || defined(HPLLM_PATH_AVX2)
#define HPLLM_W8A8_MADDUBS 1
#endif
#if defined(HPLLM_W8A8_MADDUBS) && defined(__AVXVNNI__)
#define HPLLM_W8A8_AVX_VNNI 1
#endif

// Quads (4 k) of one block of a w8a8 tile: 32 x 128 x 4 bytes = 16 KiB, read from memory once
// and from L1 by every row chunk.
constexpr int64_t kW8A8BlockQuads = 32;
#if defined(HPLLM_PATH_AVX512) || defined(HPLLM_PATH_AVX2)
// How many quads (or w4a8 octs: 512 bytes of a tile each) ahead the first rows of a block
// prefetch the weight stream: 4 KiB, as kPrefetchRows.
constexpr int64_t kPrefetchQuads = kPrefetchRows / 4;
#endif

int32_t load_quad(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// Calls f(std::integral_constant<int64_t, R>{}) with R = min(rows, Max) (rows >= 1): a block
// kernel is compiled for each row count up to its own maximum and no further.
template <int64_t Max, typename Fn>
void with_rows_upto(int64_t rows, const Fn& f) {
  if constexpr (Max > 1)
    if (rows < Max) return with_rows_upto<Max - 1>(rows, f);
  f(std::integral_constant<int64_t, Max>{});
}

#if defined(HPLLM_W8A8_VNNI)
// A block's int32 sums over whole tile rows: zero for a tile's first block, else out's.
template <int64_t Rows>
inline void begin_row_sums(__m512i (&acc)[Rows][kTile / 16], int32_t (*out)[kTile], bool first) {
  for (int64_t r = 0; r < Rows; ++r)
    for (int64_t v = 0; v < kTile / 16; ++v)
      acc[r][v] = first ? _mm512_setzero_si512() : _mm512_loadu_si512(out[r] + v * 16);
}
template <int64_t Rows>
inline void end_row_sums(const __m512i (&acc)[Rows][kTile / 16], int32_t (*out)[kTile]) {
  for (int64_t r = 0; r < Rows; ++r)
    for (int64_t v = 0; v < kTile / 16; ++v) _mm512_storeu_si512(out[r] + v * 16, acc[r][v]);
}

// Rows of one pass: 2 rows x a whole 512-byte quad row of the tile (8 vectors) = 16
// accumulators. A pass reads the block in memory order, once, with every row it serves; before,
// 6 rows x 4 vectors ran two strided passes of 64 columns, which the hardware prefetcher did not
// follow (Zen 4 figures in docs/performance.md, ninth sitting: batch 1 150-164 -> 216-246
// tokens/s, batch 16 630-681 -> 1095-1131).
constexpr int64_t kW8A8Rows = 2;
// out[r][c] (+)= sum over the block's quads of xu[r] . w (u8 x s8 dot products of 4). Prefetch
// (the first rows of a block): fetch the weight stream kPrefetchQuads quads ahead, a template
// parameter so that the loop has no branch. noinline: inlined into the product's lambda, GCC 12
// copied every accumulator to another register after each vpdpbusd and spilled some to the
// stack inside the loop; compiled alone, the loop is the 16 vpdpbusd and two broadcasts.
template <int64_t Rows, bool Prefetch>
__attribute__((noinline)) void w8a8_block(const int8_t* xu, int64_t ldx, const int8_t* w,
                                          int64_t quads, int32_t (*out)[kTile], bool first) {
  __m512i acc[Rows][kTile / 16];
  begin_row_sums(acc, out, first);
  for (int64_t q = 0; q < quads; ++q) {
    const int8_t* row = w + q * kTile * 4;
    if constexpr (Prefetch) prefetch_ahead(row + kPrefetchQuads * kTile * 4, kTile * 4);
    for (int64_t r = 0; r < Rows; ++r) {
      const __m512i xb = _mm512_set1_epi32(load_quad(xu + r * ldx + 4 * q));
      for (int64_t v = 0; v < kTile / 16; ++v)
        acc[r][v] = _mm512_dpbusd_epi32(acc[r][v], xb, _mm512_loadu_si512(row + v * 64));
    }
  }
  end_row_sums(acc, out);
}
#elif defined(HPLLM_W8A8_MADDUBS)
// 4 rows x 2 vectors = 8 accumulators (16 registers), in 8 passes of 16 columns over a block.
// A lone row (batch-1 decode) takes the whole 512-byte quad row in one pass instead, its 16
// accumulators partly on the stack: the weights stream in memory order, where 8 passes each
// reading one cache line per quad row left the memory idle. Zen 4, avx2 build (`python -m infer
// bench --to int8,w8a8,w4a8 --batch-sizes 1`, two builds alternated): w8a8 135-136 -> 218-258
// tokens/s, w4a8 (the same change) 243-251 -> 261-373.
constexpr int64_t kW8A8Rows = 4;
template <int64_t Rows, bool Prefetch>
void w8a8_block(const int8_t* qx, int64_t ldx, const int8_t* w, int64_t quads,
                int32_t (*out)[kTile], bool first) {
  constexpr int64_t kVectors = Rows == 1 ? 16 : 2;
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t c0 = 0; c0 < kTile; c0 += kVectors * 8) {
    __m256i acc[Rows][kVectors];
    for (int64_t r = 0; r < Rows; ++r)
      for (int64_t v = 0; v < kVectors; ++v)
        acc[r][v] = first ? _mm256_setzero_si256()
                          : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(out[r] + c0 + v * 8));
    for (int64_t q = 0; q < quads; ++q) {
      const int8_t* row = w + (q * kTile + c0) * 4;
      // A pass prefetches the part of a quad row it reads, further on.
      if constexpr (Prefetch) prefetch_ahead(row + kPrefetchQuads * kTile * 4, kVectors * 32);
      __m256i wv[kVectors];
      for (int64_t v = 0; v < kVectors; ++v)
        wv[v] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + v * 32));
      for (int64_t r = 0; r < Rows; ++r) {
        const __m256i xb = _mm256_set1_epi32(load_quad(qx + r * ldx + 4 * q));
        const __m256i magnitude = _mm256_abs_epi8(xb);
        for (int64_t v = 0; v < kVectors; ++v) {
#if defined(HPLLM_W8A8_AVX_VNNI)
          acc[r][v] = _mm256_dpbusd_avx_epi32(acc[r][v], magnitude, _mm256_sign_epi8(wv[v], xb));
#else
          const __m256i pairs = _mm256_maddubs_epi16(magnitude, _mm256_sign_epi8(wv[v], xb));
          acc[r][v] = _mm256_add_epi32(acc[r][v], _mm256_madd_epi16(pairs, ones));
#endif
        }
      }
    }
    for (int64_t r = 0; r < Rows; ++r)
      for (int64_t v = 0; v < kVectors; ++v)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out[r] + c0 + v * 8), acc[r][v]);
  }
}
#else
constexpr int64_t kW8A8Rows = 6;
template <int64_t Rows, bool Prefetch>
void w8a8_block(const int8_t* qx, int64_t ldx, const int8_t* w, int64_t quads,
                int32_t (*out)[kTile], bool first) {
  for (int64_t r = 0; r < Rows; ++r) {
    int32_t acc[kTile];
    for (int64_t j = 0; j < kTile; ++j) acc[j] = first ? 0 : out[r][j];
    for (int64_t q = 0; q < quads; ++q)
      for (int64_t b = 0; b < 4; ++b) {
        const int32_t xv = qx[r * ldx + 4 * q + b];
        const int8_t* row = w + q * kTile * 4 + b;
        for (int64_t j = 0; j < kTile; ++j) acc[j] += xv * static_cast<int32_t>(row[4 * j]);
      }
    for (int64_t j = 0; j < kTile; ++j) out[r][j] = acc[j];
  }
}
#endif

#if defined(HPLLM_AMX)
// The int8 activations qx[M, K] in a scratch copy of whole 16-row chunks and k-steps (zeros
// around them), rows k_pad bytes apart, as the tile unit loads them.
const int8_t* amx_padded_activations(const int8_t* qx, int64_t M, int64_t K, int64_t k_pad) {
  const int64_t rows = (M + kAmxRows - 1) / kAmxRows * kAmxRows;
  int8_t* activations = thread_scratch<int8_t, Scratch::kAmxActivations>(rows * k_pad);
  std::memset(activations, 0, rows * k_pad);
  for (int64_t r = 0; r < M; ++r) std::memcpy(activations + r * k_pad, qx + r * K, K);
  return activations;
}

// sums[16][64 h .. 64 h + 63] (rows kTile apart) = 16 activation rows (`a`, rows `lda` bytes
// apart) times column groups 4h .. 4h + 3 over k-steps first .. end - 1, where operand(step, g)
// is column group g's weight operand of that step as {pointer, row stride}. Tile registers: 0-3
// the sums, 4 the activations, 5-7 the weight operands in turn.
template <typename Operand>
void amx_half_sums(const int8_t* a, int64_t lda, int64_t first, int64_t end, int64_t h,
                   const Operand& operand, int32_t (*sums)[kTile]) {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int64_t step = first; step < end; ++step) {
    _tile_loadd(4, a + step * kAmxK, lda);
    const auto [b0, stride0] = operand(step, 4 * h);
    _tile_loadd(5, b0, stride0);
    _tile_dpbssd(0, 4, 5);
    const auto [b1, stride1] = operand(step, 4 * h + 1);
    _tile_loadd(6, b1, stride1);
    _tile_dpbssd(1, 4, 6);
    const auto [b2, stride2] = operand(step, 4 * h + 2);
    _tile_loadd(7, b2, stride2);
    _tile_dpbssd(2, 4, 7);
    const auto [b3, stride3] = operand(step, 4 * h + 3);
    _tile_loadd(5, b3, stride3);
    _tile_dpbssd(3, 4, 5);
  }
  _tile_stored(0, &sums[0][64 * h], kTile * 4);
  _tile_stored(1, &sums[0][64 * h + 16], kTile * 4);
  _tile_stored(2, &sums[0][64 * h + 32], kTile * 4);
  _tile_stored(3, &sums[0][64 * h + 48], kTile * 4);
}

// w8a8 on the tile unit: the activations are int8 already (one digit), the weight tiles are in
// the unit's layout already ([K / 4][128][4]: four k of a column adjacent), so each operand is
// one strided tile load from the weights. Exact int32 sums, then the XLA op's two float
// multiplies: the same bits as the other paths. K is zero-padded to whole k-steps in a copy of
// the activations and, for the last partial step, of its weight operands.
void amx_w8a8_product(ffi::ThreadPool& pool, const int8_t* qx, int64_t M, int64_t K, int64_t N,
                      const int8_t* w, const float* x_scale, const float* w_scale, float* y) {
  const int64_t k_pad = (K + kAmxK - 1) / kAmxK * kAmxK, quads = K / 4;
  const int64_t full_steps = K / kAmxK, steps = k_pad / kAmxK;
  const int8_t* activations = amx_padded_activations(qx, M, K, k_pad);
  const int64_t tiles = (N + kTile - 1) / kTile;
  parallel_tiles(pool, tiles, [&](int64_t t) {
    const int8_t* wt = w + t * quads * kTile * 4;
    // The last, partial k-step's operands of the 8 column groups, zero-padded.
    alignas(64) int8_t tail[kTile / kAmxCols][kAmxRows * 64] = {};
    for (int64_t q = full_steps * kAmxK / 4; q < quads; ++q)
      for (int64_t g = 0; g < kTile / kAmxCols; ++g)
        std::memcpy(tail[g] + (q % (kAmxK / 4)) * 64, wt + (q * kTile + g * kAmxCols) * 4, 64);
    static const AmxConfig config;
    _tile_loadconfig(&config);
    const int64_t n0 = t * kTile, width = std::min(kTile, N - n0);
    // Column group g's operand of a step: four k of each column adjacent in the weights, or
    // the zero-padded copy of the last, partial step.
    const auto operand = [&](int64_t step, int64_t g) -> std::pair<const int8_t*, int64_t> {
      if (step < full_steps)
        return {wt + (step * (kAmxK / 4) * kTile + g * kAmxCols) * 4, kTile * 4};
      return {tail[g], 64};
    };
    alignas(64) int32_t sums[kAmxRows][kTile];
    for (int64_t m0 = 0; m0 < M; m0 += kAmxRows) {
      for (int64_t h = 0; h < 2; ++h)
        amx_half_sums(activations + m0 * k_pad, k_pad, 0, steps, h, operand, sums);
      for (int64_t r = 0; r < std::min(kAmxRows, M - m0); ++r)
        for (int64_t j = 0; j < width; ++j)
          // The XLA op's order: (float(sum) * x_scale) * w_scale.
          y[(m0 + r) * N + n0 + j] =
              static_cast<float>(sums[r][j]) * x_scale[m0 + r] * w_scale[n0 + j];
    }
    _tile_release();
  });
}
#endif

ffi::Error W8A8MatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::S8> qx,
                          ffi::Buffer<ffi::F32> x_scale, ffi::Buffer<ffi::S8> w,
                          ffi::Buffer<ffi::F32> w_scale, ffi::Buffer<ffi::S32> col_sums,
                          ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = qx.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || wd.size() != 4 || yd.size() != 2 || wd[2] != kTile || wd[3] != 4 ||
      xd[1] != 4 * wd[1] || yd[0] != xd[0] || (yd[1] + kTile - 1) / kTile != wd[0] ||
      static_cast<int64_t>(x_scale.element_count()) != xd[0] ||
      static_cast<int64_t>(w_scale.element_count()) != wd[0] * kTile ||
      static_cast<int64_t>(col_sums.element_count()) != wd[0] * kTile)
    return ffi::Error::InvalidArgument(
        "w8a8_matmul: expects qx[M, K], x_scale[M], w[tiles, K/4, 128, 4], w_scale and "
        "col_sums[tiles * 128] -> y[M, N]");
  const int64_t M = xd[0], K = xd[1], N = yd[1], quads = K / 4;
  const int8_t* xp = qx.typed_data();
#if defined(HPLLM_AMX)
  if (M >= kBatchRows && amx_permitted()) {
    amx_w8a8_product(pool, xp, M, K, N, w.typed_data(), x_scale.typed_data(),
                     w_scale.typed_data(), y->typed_data());
    return ffi::Error::Success();
  }
#endif
#if defined(HPLLM_W8A8_VNNI)
  // vpdpbusd wants unsigned activations: qx + 128 (the sign bit flipped), corrected below.
  std::unique_ptr<int8_t[]> offset(new int8_t[M * K]);
  for (int64_t i = 0; i < M * K; ++i) offset[i] = static_cast<int8_t>(xp[i] ^ 0x80);
  xp = offset.get();
  constexpr int32_t kOffset = 128;
#else
  constexpr int32_t kOffset = 0;
#endif
  const float* xs = x_scale.typed_data();
  const int8_t* wp = w.typed_data();
  const float* ws = w_scale.typed_data();
  const int32_t* cs = col_sums.typed_data();
  float* yp = y->typed_data();
  parallel_tiles(pool, wd[0], [&](int64_t t) {
    const int8_t* wt = wp + t * quads * kTile * 4;
    const int64_t n0 = t * kTile, width = std::min(kTile, N - n0);
    for (int64_t m0 = 0; m0 < M; m0 += kSlabRows) {
      const int64_t rows = std::min(kSlabRows, M - m0);
      alignas(64) int32_t out[kSlabRows][kTile];
      for (int64_t q0 = 0; q0 < quads; q0 += kW8A8BlockQuads) {
        const int64_t qn = std::min(kW8A8BlockQuads, quads - q0);
        for (int64_t m = 0; m < rows; m += kW8A8Rows)
          with_rows_upto<kW8A8Rows>(rows - m, [&](auto r) {
            constexpr int64_t R = decltype(r)::value;
            const int8_t* x_rows = xp + (m0 + m) * K + 4 * q0;
            const int8_t* block = wt + q0 * kTile * 4;
            if (m0 + m == 0)  // the block's first rows fetch the next one
              w8a8_block<R, true>(x_rows, K, block, qn, out + m, q0 == 0);
            else
              w8a8_block<R, false>(x_rows, K, block, qn, out + m, q0 == 0);
          });
      }
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t j = 0; j < width; ++j) {
          const int32_t sum = out[r][j] - kOffset * cs[n0 + j];
          // The XLA op's order: (float(sum) * x_scale) * w_scale.
          yp[(m0 + r) * N + n0 + j] = static_cast<float>(sum) * xs[m0 + r] * ws[n0 + j];
        }
    }
  });
  return ffi::Error::Success();
}

// ---- int8 weights x f32 activations on VNNI: three digits, integer dot products ----
//
// On a CPU whose vpdpbusd (64 int8 multiply-adds) issues as often as its f32 FMA (16), the
// three digits of each activation (above) do 64 / 3 multiply-adds of f32 accuracy per
// instruction where the FMA does 16, and need no widening of the weights: a Zen 4 issues both
// at one 512-bit instruction per cycle per core (bench/instruction_throughput.cc, ninth
// sitting), which puts a batch-16 step's products at 4/3 of the FMA ceiling, and batch 1 runs
// 3 vpdpbusd and 0.33 weight loads per 64 weights where the f32 route runs 4 widenings and 4
// FMAs. (Intel's server cores without AMX issue vpdpbusd on one port and FMAs on two: there it
// would lose, so infer.kernels takes this route on AMD CPUs only.)
//
// vpdpbusd multiplies unsigned by signed bytes. The weights are the unsigned operand, stored
// offset (w + 128, made once at load: infer.kernels.TiledVnniInt8Weight) and loaded once per
// quad into registers; the digits are the signed one, broadcast from memory as the
// instruction's own operand. Each digit's sum is then off by 128 x that digit's sum over the
// row, subtracted exactly in int32 (|sum| <= 255 x 127 x K: K up to 66 000).
// Layout: per 128-column tile two 64-column halves, each [K / 4 quads][64 columns][4 k], one
// contiguous stream per half (a task), 256 bytes per quad: 4 vectors.
#if defined(HPLLM_W8A8_VNNI)
#define HPLLM_VNNI_DIGITS 1
#elif defined(HPLLM_PATH_AVX2)
// AVX2 builds run int4 weight-only products on the same digits (vpmaddubsw in place of
// vpdpbusd, below VnniInt4MatmulImpl); their int8 ones keep the FMA routes.
#define HPLLM_MADDUBS_DIGITS 1
#endif
#if defined(HPLLM_VNNI_DIGITS) || defined(HPLLM_MADDUBS_DIGITS)
constexpr int64_t kVnniHalf = 64;     // columns per half
constexpr int64_t kVnniMaxK = 66000;  // int32 sums stay exact (255 x 127 x K < 2^31)

// The activations as the routes below take them: rows first .. last - 1 of x[M, K] as digits
// ([kDigits][M][stride], stride >= K, zeros after K), each row's scale, and each row's digit
// sums over `groups` equal groups of the stride ([M][groups][kDigits]: the offset correction of
// the unsigned weights). Calls on disjoint row ranges may run at once.
void vnni_digit_rows(const float* x, int64_t M, int64_t K, int64_t stride, int64_t groups,
                     int64_t first, int64_t last, int8_t* digits, float* row_scale,
                     int32_t* digit_sums) {
  activation_digits(x, M, K, M, stride, first, last, digits, row_scale);
  const int64_t group_k = stride / groups;
  for (int64_t r = first; r < last; ++r)
    for (int64_t g = 0; g < groups; ++g)
      for (int64_t d = 0; d < kDigits; ++d) {
        const int8_t* dr = digits + (d * M + r) * stride + g * group_k;
        int32_t sum = 0;
#pragma omp simd reduction(+ : sum)
        for (int64_t k = 0; k < group_k; ++k) sum += dr[k];
        digit_sums[(r * groups + g) * kDigits + d] = sum;
      }
}

// Rows per task making digits: at 16 rows, one task had one thread make every row's digits
// while the other waited.
constexpr int64_t kDigitRows = 4;

// y[M, N] = x[M, K] @ (the digits routes' weights) over the threads: the digits of every row
// (vnni_digit_rows, `groups` groups), then `half_fn(half, digits, row_scale, digit_sums,
// stride)` for each 64-column half.
template <typename HalfFn>
void vnni_product(ffi::ThreadPool& pool, const float* x, int64_t M, int64_t K, int64_t N,
                  int64_t stride, int64_t groups, const HalfFn& half_fn) {
  // The caller's scratch: the helpers read it only while the caller waits for their tasks.
  int8_t* digits = thread_scratch<int8_t, Scratch::kAmxDigits>(kDigits * M * stride);
  float* row_scale = thread_scratch<float, Scratch::kAmxRowScale>(M);
  int32_t* digit_sums = thread_scratch<int32_t, Scratch::kDigitSums>(M * groups * kDigits);
  parallel_tiles(pool, (M + kDigitRows - 1) / kDigitRows, [&](int64_t chunk) {
    const int64_t first = chunk * kDigitRows, last = std::min(M, first + kDigitRows);
    vnni_digit_rows(x, M, K, stride, groups, first, last, digits, row_scale, digit_sums);
  });
  parallel_tiles(pool, 2 * ((N + kTile - 1) / kTile), [&](int64_t half) {
    half_fn(half, digits, row_scale, digit_sums);
  });
}
#endif

#if defined(HPLLM_VNNI_DIGITS)
constexpr int64_t kVnniVectors = kVnniHalf / 16;  // vectors per quad of a half
// Rows per pass: 2 rows x 3 digits x 4 vectors = 24 accumulators and 4 weight vectors, so
// each weight vector loaded feeds 6 vpdpbusd.
constexpr int64_t kVnniRows = 2;

// The micro-kernels' steps, shared by the int8 and int4 routes. acc[r][d][v] += wv[v] . (the
// quad of digit d of row r at `quad`, broadcast) for every row, digit and vector; rows `stride`
// bytes apart, digits `digit_bytes` apart.
template <int64_t Rows>
inline void vnni_digit_dots(__m512i (&acc)[Rows][kDigits][kVnniVectors],
                            const __m512i (&wv)[kVnniVectors], const int8_t* quad,
                            int64_t stride, int64_t digit_bytes) {
  for (int64_t r = 0; r < Rows; ++r)
    for (int64_t d = 0; d < kDigits; ++d) {
      const __m512i xb = _mm512_set1_epi32(load_quad(quad + d * digit_bytes + r * stride));
      for (int64_t v = 0; v < kVnniVectors; ++v)
        acc[r][d][v] = _mm512_dpbusd_epi32(acc[r][d][v], wv[v], xb);
    }
}

template <int64_t Rows>
inline void zero_digit_sums(__m512i (&acc)[Rows][kDigits][kVnniVectors]) {
  for (int64_t r = 0; r < Rows; ++r)
    for (int64_t d = 0; d < kDigits; ++d)
      for (int64_t v = 0; v < kVnniVectors; ++v) acc[r][d][v] = _mm512_setzero_si512();
}

template <int64_t Rows>
inline void store_digit_sums(const __m512i (&acc)[Rows][kDigits][kVnniVectors],
                             int32_t (*sums)[kVnniHalf]) {
  for (int64_t r = 0; r < Rows; ++r)
    for (int64_t d = 0; d < kDigits; ++d)
      for (int64_t v = 0; v < kVnniVectors; ++v)
        _mm512_store_si512(sums[r * kDigits + d] + v * 16, acc[r][d][v]);
}

// Sixteen columns (from c) of one row's three digit sums (`sums`: its digit 0's), each less
// `offset` x that digit's sum over the row or group (`digit_sums`: the weights' unsigned offset),
// combined (combine_digits).
inline __m512 exact_digits(const int32_t (*sums)[kVnniHalf], int64_t c, const int32_t* digit_sums,
                           int32_t offset) {
  alignas(64) int32_t exact[kDigits][16];
  for (int64_t d = 0; d < kDigits; ++d)
    _mm512_store_si512(exact[d], _mm512_sub_epi32(_mm512_load_si512(sums[d] + c),
                                                  _mm512_set1_epi32(offset * digit_sums[d])));
  return combine_digits(exact[0], 16);
}

// sums[r x 3 + d][64] = digit d of rows 0 .. Rows - 1 (`digits`: digit 0 of row 0; rows
// `stride` bytes apart, digits `digit_bytes` apart) times a half's offset weights (`w`, `quads`
// quads of 256 bytes). Prefetch (the first rows): fetch the weight stream 16 quads (4 KiB)
// ahead, a template parameter so that the loop has no branch. noinline for the reason of
// w8a8_block. One pass per row pair over the whole half (48-128 KiB at base's shapes, from L2
// after the first): k-blocks that stay in L1, with the sums loaded and stored around each,
// were slower (one thread, scratch harness; not kept, no figure quoted).
template <int64_t Rows, bool Prefetch>
__attribute__((noinline)) void vnni_digits_half(const int8_t* digits, int64_t stride,
                                                int64_t digit_bytes, const uint8_t* w,
                                                int64_t quads, int32_t (*sums)[kVnniHalf]) {
  __m512i acc[Rows][kDigits][kVnniVectors];
  zero_digit_sums(acc);
  for (int64_t q = 0; q < quads; ++q) {
    const uint8_t* row = w + q * kVnniHalf * 4;
    if constexpr (Prefetch) prefetch_ahead(row + 16 * kVnniHalf * 4, kVnniHalf * 4);
    __m512i wv[kVnniVectors];
    for (int64_t v = 0; v < kVnniVectors; ++v) wv[v] = _mm512_loadu_si512(row + v * 64);
    vnni_digit_dots(acc, wv, digits + 4 * q, stride, digit_bytes);
  }
  store_digit_sums(acc, sums);
}

// Columns 64 half .. 64 half + 63 of y[M, N] (one task) from vnni_digit_rows' digits, scales
// and sums (one group) and the half's offset weights (`w`: the whole array, quads per half).
void vnni_int8_half(int64_t half, const int8_t* digits, const float* row_scale,
                    const int32_t* digit_sums, int64_t M, int64_t stride, int64_t N,
                    const uint8_t* w, const float* scale, float* y) {
  const int64_t quads = stride / 4;
  const uint8_t* wh = w + half * quads * kVnniHalf * 4;
  const int64_t c0 = half * kVnniHalf, width = std::min(kVnniHalf, N - c0);
  if (width <= 0) return;  // the padding half of the last tile
  alignas(64) int32_t sums[kVnniRows * kDigits][kVnniHalf];
  for (int64_t m = 0; m < M; m += kVnniRows) {
    const int64_t rows = std::min(kVnniRows, M - m);
    with_rows_upto<kVnniRows>(rows, [&](auto r) {
      constexpr int64_t R = decltype(r)::value;
      const int8_t* a = digits + m * stride;
      if (m == 0)  // the first rows stream the half from memory
        vnni_digits_half<R, true>(a, stride, M * stride, wh, quads, sums);
      else
        vnni_digits_half<R, false>(a, stride, M * stride, wh, quads, sums);
    });
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t row = m + r;
      const __m512 s = _mm512_set1_ps(row_scale[row]);
      for (int64_t c = 0; c < width; c += 16) {
        // The digits less their offset (128 x the digit's row sum) and combined, then as on
        // AMX: the row's scale, the columns' scales.
        const __m512 v = exact_digits(sums + r * kDigits, c, digit_sums + row * kDigits, 128);
        const __mmask16 valid = width - c >= 16 ? 0xffff : (1u << (width - c)) - 1;
        const __m512 column_scale = _mm512_maskz_loadu_ps(valid, scale + c0 + c);
        _mm512_mask_storeu_ps(y + row * N + c0 + c, valid,
                              _mm512_mul_ps(_mm512_mul_ps(v, s), column_scale));
      }
    }
  }
}

#endif

ffi::Error VnniInt8MatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                              ffi::Buffer<ffi::U8> w, ffi::Buffer<ffi::F32> scale,
                              ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || wd.size() != 5 || yd.size() != 2 || wd[1] != 2 || wd[3] != 64 ||
      wd[4] != 4 || (xd[1] + 3) / 4 != wd[2] || yd[0] != xd[0] ||
      (yd[1] + kTile - 1) / kTile != wd[0] ||
      static_cast<int64_t>(scale.element_count()) != wd[0] * kTile)
    return ffi::Error::InvalidArgument(
        "vnni_int8_matmul: expects x[M, K], w[tiles, 2, ceil(K / 4), 64, 4], "
        "scale[tiles * 128] -> y[M, N]");
#if defined(HPLLM_VNNI_DIGITS)
  if (xd[1] > kVnniMaxK)
    return ffi::Error::InvalidArgument("vnni_int8_matmul: K above 66000 would overflow int32");
  const int64_t M = xd[0], K = xd[1], N = yd[1], stride = 4 * wd[2];
  if (M > 0)
    vnni_product(pool, x.typed_data(), M, K, N, stride, 1,
                 [&](int64_t half, const int8_t* digits, const float* row_scale,
                     const int32_t* digit_sums) {
                   vnni_int8_half(half, digits, row_scale, digit_sums, M, stride, N,
                                  w.typed_data(), scale.typed_data(), y->typed_data());
                 });
  return ffi::Error::Success();
#else
  return ffi::Error(ffi::ErrorCode::kUnimplemented,
                    "vnni_int8_matmul: this build has no AVX-512 VNNI");
#endif
}

// ---- w4a8: int4 weights (group scales) x int8 activations (per row), exact int32 per group ----
//
// `W4A8Dot` quantizes each activation row to int8 as `W8A8Dot` does and multiplies it with the
// int4 weights in integers, one exact int32 sum per quantization group, then
// y = (sum over groups of float(sum_g) * w_scale[g]) * x_scale. This is the arithmetic of
// llama.cpp's Q4_0 dot (int4 weights, 8-bit activations), where the weight-only int4 kernels
// above keep f32 activations: a vpdpbusd does 64 multiply-adds where an FMA does 16, at about
// the same issue rate on the CPUs measured (bench/instruction_throughput.cc).
// Layout (TiledW4A8Weight, made once at load): [tiles][K / 8 octs][128][4] bytes; byte j of
// column c in oct o holds q[8o + j] + 8 in its low nibble and q[8o + 4 + j] + 8 in its high
// one. So a column's four low nibbles are one quad of k (8o .. 8o + 3) and its four high
// nibbles the next (8o + 4 .. 8o + 7): one AND, or a shift and an AND, gives the operand of an
// integer dot with the activations' own consecutive quads, and no activation is reordered.
// The nibbles are unsigned (q + 8, 0..15), the unsigned operand of vpdpbusd / vpmaddubsw, the
// activations the signed one: sum_k (q + 8) x = sum_k q x + 8 sum_k x, so 8 x the row's
// activation sum over the group is subtracted, exactly, in int32. On the AVX2 path a
// vpmaddubsw pair is at most 2 x 15 x 127 and two of them 7620 in absolute value: no int16
// saturation.
// Paths: the w8a8 kernel's (VNNI vpdpbusd; AVX2 vpmaddubsw + vpmaddwd, or AVX-VNNI's 256-bit
// vpdpbusd; portable loops). The
// group sums are exact in any order; the float sum over groups runs in group order, which
// XLA's reduction may not: the result agrees with the XLA op to float32 rounding of that sum
// (tests/test_kernels.py), and bit for bit where the weight has one group.

// Octs (8 k) of one block of a tile: 32 x 128 x 4 bytes = 16 KiB, from L1 for every row chunk.
constexpr int64_t kW4A8BlockOcts = 32;

#if defined(HPLLM_W8A8_VNNI)
// Rows of one pass: 2 rows x a whole 512-byte oct row of the tile (8 vectors) = 16
// accumulators; each weight vector's nibbles are unpacked once and serve both rows, and the
// block is read in memory order (as w8a8_block; figures in docs/performance.md).
constexpr int64_t kW4A8Rows = 2;
// out[r][c] (+)= sum over the block's octs of the two quads' dot products (u8 nibbles x s8).
// Prefetch and noinline as in w8a8_block.
template <int64_t Rows, bool Prefetch>
__attribute__((noinline)) void w4a8_block(const int8_t* qx, int64_t ldx, const uint8_t* w,
                                          int64_t octs, int32_t (*out)[kTile], bool first) {
  const __m512i low = _mm512_set1_epi8(15);
  __m512i acc[Rows][kTile / 16];
  begin_row_sums(acc, out, first);
  for (int64_t o = 0; o < octs; ++o) {
    const uint8_t* row = w + o * kTile * 4;
    if constexpr (Prefetch) prefetch_ahead(row + kPrefetchQuads * kTile * 4, kTile * 4);
    __m512i x_lo[Rows], x_hi[Rows];
    for (int64_t r = 0; r < Rows; ++r) {
      x_lo[r] = _mm512_set1_epi32(load_quad(qx + r * ldx + 8 * o));
      x_hi[r] = _mm512_set1_epi32(load_quad(qx + r * ldx + 8 * o + 4));
    }
    for (int64_t v = 0; v < kTile / 16; ++v) {
      const __m512i bytes = _mm512_loadu_si512(row + v * 64);
      const __m512i lo = _mm512_and_si512(bytes, low);
      const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(bytes, 4), low);
      for (int64_t r = 0; r < Rows; ++r)
        acc[r][v] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(acc[r][v], lo, x_lo[r]), hi, x_hi[r]);
    }
  }
  end_row_sums(acc, out);
}
#elif defined(HPLLM_W8A8_MADDUBS)
// 4 rows x 2 vectors = 8 accumulators (16 registers); a lone row one pass, as w8a8_block.
constexpr int64_t kW4A8Rows = 4;
template <int64_t Rows, bool Prefetch>
void w4a8_block(const int8_t* qx, int64_t ldx, const uint8_t* w, int64_t octs,
                int32_t (*out)[kTile], bool first) {
  constexpr int64_t kVectors = Rows == 1 ? 16 : 2;
  const __m256i ones = _mm256_set1_epi16(1), low = _mm256_set1_epi8(15);
  for (int64_t c0 = 0; c0 < kTile; c0 += kVectors * 8) {
    __m256i acc[Rows][kVectors];
    for (int64_t r = 0; r < Rows; ++r)
      for (int64_t v = 0; v < kVectors; ++v)
        acc[r][v] = first ? _mm256_setzero_si256()
                          : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(out[r] + c0 + v * 8));
    for (int64_t o = 0; o < octs; ++o) {
      const uint8_t* row = w + (o * kTile + c0) * 4;
      if constexpr (Prefetch) prefetch_ahead(row + kPrefetchQuads * kTile * 4, kVectors * 32);
      __m256i lo[kVectors], hi[kVectors];
      for (int64_t v = 0; v < kVectors; ++v) {
        const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + v * 32));
        lo[v] = _mm256_and_si256(bytes, low);
        hi[v] = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low);
      }
      for (int64_t r = 0; r < Rows; ++r) {
        const __m256i x_lo = _mm256_set1_epi32(load_quad(qx + r * ldx + 8 * o));
        const __m256i x_hi = _mm256_set1_epi32(load_quad(qx + r * ldx + 8 * o + 4));
        for (int64_t v = 0; v < kVectors; ++v) {
#if defined(HPLLM_W8A8_AVX_VNNI)
          acc[r][v] = _mm256_dpbusd_avx_epi32(_mm256_dpbusd_avx_epi32(acc[r][v], lo[v], x_lo),
                                              hi[v], x_hi);
#else
          const __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(lo[v], x_lo),
                                                 _mm256_maddubs_epi16(hi[v], x_hi));
          acc[r][v] = _mm256_add_epi32(acc[r][v], _mm256_madd_epi16(pairs, ones));
#endif
        }
      }
    }
    for (int64_t r = 0; r < Rows; ++r)
      for (int64_t v = 0; v < kVectors; ++v)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out[r] + c0 + v * 8), acc[r][v]);
  }
}
#else
constexpr int64_t kW4A8Rows = 6;
template <int64_t Rows, bool Prefetch>
void w4a8_block(const int8_t* qx, int64_t ldx, const uint8_t* w, int64_t octs,
                int32_t (*out)[kTile], bool first) {
  for (int64_t r = 0; r < Rows; ++r) {
    int32_t acc[kTile];
    for (int64_t j = 0; j < kTile; ++j) acc[j] = first ? 0 : out[r][j];
    for (int64_t o = 0; o < octs; ++o)
      for (int64_t b = 0; b < 4; ++b) {
        const int32_t x_lo = qx[r * ldx + 8 * o + b], x_hi = qx[r * ldx + 8 * o + 4 + b];
        const uint8_t* row = w + o * kTile * 4 + b;
        for (int64_t j = 0; j < kTile; ++j)
          acc[j] += x_lo * (row[4 * j] & 15) + x_hi * (row[4 * j] >> 4);
      }
    for (int64_t j = 0; j < kTile; ++j) out[r][j] = acc[j];
  }
}
#endif

#if defined(HPLLM_AMX)
// w4a8 on the tile unit, where each quantization group is whole k-steps of it (a multiple of 64
// k, or one group per channel): the activations are int8 already, so each weight operand takes
// one TDPBSSD where int4's f32 activations take three digits. Each weight tile's nibbles are
// unpacked per call into the unit's layout as signed q (amx_w4a8_operands), and each group's
// int32 sums are flushed to float in group order as on the other paths: the same bits.

// A w4a8 tile ([octs][128][4], TiledW4A8Weight) as the unit's weight operands, [k_pad / 64
// steps][8 column groups][16][64] int8: oct o = 8 x step + i gives operand rows 2i (its low
// nibbles: k 8o .. 8o + 3 of the group's 16 columns, four bytes per column, as TDPBSSD reads
// them) and 2i + 1 (its high nibbles: k 8o + 4 .. 8o + 7), minus 8. Octs past K are q = 0.
void amx_w4a8_operands(const uint8_t* tile, int64_t octs, int64_t k_pad, int8_t* out) {
  const __m512i low = _mm512_set1_epi8(15), eight = _mm512_set1_epi8(8);
  for (int64_t o = 0; o < k_pad / 8; ++o) {
    prefetch_ahead(tile + (o + kPrefetchRows) * kTile * 4, kTile * 4);
    const int64_t step = o / 8, i = o % 8;
    for (int64_t g = 0; g < kTile / kAmxCols; ++g) {
      int8_t* operand = out + ((step * 8 + g) * kAmxRows + 2 * i) * 64;
      __m512i q_low = _mm512_setzero_si512(), q_high = q_low;
      if (o < octs) {
        const __m512i bytes = _mm512_loadu_si512(tile + (o * kTile + g * kAmxCols) * 4);
        q_low = _mm512_sub_epi8(_mm512_and_si512(bytes, low), eight);
        q_high = _mm512_sub_epi8(_mm512_and_si512(_mm512_srli_epi16(bytes, 4), low), eight);
      }
      _mm512_store_si512(operand, q_low);
      _mm512_store_si512(operand + 64, q_high);
    }
  }
}

// y[M, N] = the w4a8 product on the tile unit; K a multiple of 8, groups as above.
void amx_w4a8_product(ffi::ThreadPool& pool, const int8_t* qx, int64_t M, int64_t K, int64_t N,
                      const uint8_t* w, const float* x_scale, const float* w_scale,
                      int64_t ld_scale, int64_t groups, float* y) {
  const int64_t k_pad = (K + kAmxK - 1) / kAmxK * kAmxK, steps = k_pad / kAmxK, octs = K / 8;
  const int64_t group_steps = groups == 1 ? steps : K / groups / kAmxK;
  const int8_t* activations = amx_padded_activations(qx, M, K, k_pad);
  parallel_tiles(pool, (N + kTile - 1) / kTile, [&](int64_t t) {
    int8_t* operands = thread_scratch<int8_t, Scratch::kAmxOperands>(k_pad * kTile);
    amx_w4a8_operands(w + t * octs * kTile * 4, octs, k_pad, operands);
    static const AmxConfig config;
    _tile_loadconfig(&config);
    const int64_t n0 = t * kTile, width = std::min(kTile, N - n0);
    const auto operand = [&](int64_t step, int64_t g) -> std::pair<const int8_t*, int64_t> {
      return {operands + (step * 8 + g) * kAmxRows * 64, 64};
    };
    alignas(64) int32_t sums[kAmxRows][kTile];
    alignas(64) float acc[kAmxRows][kTile];
    for (int64_t m0 = 0; m0 < M; m0 += kAmxRows) {
      const int64_t valid_rows = std::min(kAmxRows, M - m0);
      for (int64_t g = 0; g < groups; ++g) {
        for (int64_t h = 0; h < 2; ++h)
          amx_half_sums(activations + m0 * k_pad, k_pad, g * group_steps, (g + 1) * group_steps,
                        h, operand, sums);
        // The XLA op's order: float(sum) * w_scale, added group by group.
        const float* s = w_scale + g * ld_scale + n0;
        for (int64_t r = 0; r < valid_rows; ++r)
          for (int64_t j = 0; j < kTile; ++j) {
            const float part = static_cast<float>(sums[r][j]) * s[j];
            acc[r][j] = g == 0 ? part : acc[r][j] + part;
          }
      }
      for (int64_t r = 0; r < valid_rows; ++r)
        for (int64_t j = 0; j < width; ++j) y[(m0 + r) * N + n0 + j] = acc[r][j] * x_scale[m0 + r];
    }
    _tile_release();
  });
}
#endif

ffi::Error W4A8MatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::S8> qx,
                          ffi::Buffer<ffi::F32> x_scale, ffi::Buffer<ffi::U8> w,
                          ffi::Buffer<ffi::F32> w_scale, ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = qx.dimensions(), wd = w.dimensions(), sd = w_scale.dimensions();
  const auto yd = y->dimensions();
  if (xd.size() != 2 || wd.size() != 4 || sd.size() != 2 || yd.size() != 2 || wd[2] != kTile ||
      wd[3] != 4 || xd[1] != 8 * wd[1] || yd[0] != xd[0] || (yd[1] + kTile - 1) / kTile != wd[0] ||
      static_cast<int64_t>(x_scale.element_count()) != xd[0] || sd[1] != wd[0] * kTile ||
      sd[0] < 1 || xd[1] % sd[0] || (sd[0] > 1 && (xd[1] / sd[0]) % 8))
    return ffi::Error::InvalidArgument(
        "w4a8_matmul: expects qx[M, K], x_scale[M], w[tiles, K/8, 128, 4], w_scale[groups, "
        "tiles * 128] with K / groups a multiple of 8 (or one group) -> y[M, N]");
  const int64_t M = xd[0], K = xd[1], N = yd[1], groups = sd[0], ld_scale = sd[1];
  const int64_t octs = K / 8, group_octs = octs / groups;
  const int8_t* xp = qx.typed_data();
  const float* xs = x_scale.typed_data();
  const uint8_t* wp = w.typed_data();
  const float* ws = w_scale.typed_data();
  float* yp = y->typed_data();
#if defined(HPLLM_AMX)
  if (M >= kBatchRows && (groups == 1 || (K / groups) % kAmxK == 0) && amx_permitted()) {
    amx_w4a8_product(pool, xp, M, K, N, wp, xs, ws, ld_scale, groups, yp);
    return ffi::Error::Success();
  }
#endif
  // Each row's activation sum per group, for the nibbles' + 8 (once per call, not per tile).
  int32_t* group_sums = thread_scratch<int32_t, Scratch::kW4A8GroupSums>(M * groups);
  for (int64_t r = 0; r < M; ++r)
    for (int64_t g = 0; g < groups; ++g) {
      int32_t sum = 0;
      for (int64_t k = g * group_octs * 8; k < (g + 1) * group_octs * 8; ++k) sum += xp[r * K + k];
      group_sums[r * groups + g] = sum;
    }
  parallel_tiles(pool, wd[0], [&](int64_t t) {
    const uint8_t* wt = wp + t * octs * kTile * 4;
    const int64_t n0 = t * kTile, width = std::min(kTile, N - n0);
    for (int64_t m0 = 0; m0 < M; m0 += kSlabRows) {
      const int64_t rows = std::min(kSlabRows, M - m0);
      alignas(64) int32_t out[kSlabRows][kTile];
      alignas(64) float acc[kSlabRows][kTile];
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t first = g * group_octs, end = first + group_octs;
        for (int64_t o0 = first; o0 < end; o0 += kW4A8BlockOcts) {
          const int64_t on = std::min(kW4A8BlockOcts, end - o0);
          for (int64_t m = 0; m < rows; m += kW4A8Rows)
            with_rows_upto<kW4A8Rows>(rows - m, [&](auto r) {
              constexpr int64_t R = decltype(r)::value;
              const int8_t* x_rows = xp + (m0 + m) * K + 8 * o0;
              const uint8_t* block = wt + o0 * kTile * 4;
              if (m0 + m == 0)  // the block's first rows fetch the next one
                w4a8_block<R, true>(x_rows, K, block, on, out + m, o0 == first);
              else
                w4a8_block<R, false>(x_rows, K, block, on, out + m, o0 == first);
            });
        }
        // The XLA op's order: float(sum) * w_scale, added group by group.
        const float* s = ws + g * ld_scale + n0;
        for (int64_t r = 0; r < rows; ++r) {
          const int32_t correction = 8 * group_sums[(m0 + r) * groups + g];
          for (int64_t j = 0; j < kTile; ++j) {
            const float part = static_cast<float>(out[r][j] - correction) * s[j];
            acc[r][j] = g == 0 ? part : acc[r][j] + part;
          }
        }
      }
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t j = 0; j < width; ++j) yp[(m0 + r) * N + n0 + j] = acc[r][j] * xs[m0 + r];
    }
  });
  return ffi::Error::Success();
}

// int4 weights (group scales) on the same route: the nibbles in w4a8's oct layout (a column's
// four low nibbles one quad of k, its four high ones the next; offset binary, q + 8), split into
// two 64-column halves (infer.kernels.TiledVnniInt4Weight), are the unsigned operand after one
// AND (low) or a shift and an AND (high); each group's three digit sums, less 8 x the digit's
// sum over the group, are combined and scaled by the group's scales into f32.
#if defined(HPLLM_VNNI_DIGITS)
// sums[r x 3 + d][64] = digit d of rows 0 .. Rows - 1 (as vnni_digits_half) times `octs` octs
// of a half's nibbles (`w`, 256 bytes per oct): one group. noinline for the reason of
// w8a8_block; the high nibbles are loaded again rather than kept (the loop then fits in the
// registers: 24 accumulators, 4 weight vectors, the mask, a broadcast). Prefetch (the first
// rows): 32 octs (8 KiB) ahead into L2, where int8's 16 quads into L1 left int4's batch 1
// slower: bench/decode_matmuls.py --rows 1, four alternated rounds, 2.87 / 3.16 / 3.07 / 2.88
// -> 2.27 / 2.53 / 2.97 / 2.74 ms (int8's route the same way: 4.12 / 4.38 / 4.20 / 4.10 ->
// 4.01 / 4.21 / 4.48 / 4.36, so it keeps its prefetch).
template <int64_t Rows, bool Prefetch>
__attribute__((noinline)) void vnni_int4_group(const int8_t* digits, int64_t stride,
                                               int64_t digit_bytes, const uint8_t* w,
                                               int64_t octs, int32_t (*sums)[kVnniHalf]) {
  const __m512i low4 = _mm512_set1_epi8(0x0f);
  __m512i acc[Rows][kDigits][kVnniVectors];
  zero_digit_sums(acc);
  for (int64_t o = 0; o < octs; ++o) {
    const uint8_t* row = w + o * kVnniHalf * 4;
    if constexpr (Prefetch) prefetch_to_l2(row + 32 * kVnniHalf * 4, kVnniHalf * 4);
    for (int64_t high = 0; high < 2; ++high) {  // k 8o .. 8o + 3, then 8o + 4 .. 8o + 7
      __m512i wv[kVnniVectors];
      for (int64_t v = 0; v < kVnniVectors; ++v) {
        const __m512i bytes = _mm512_loadu_si512(row + v * 64);
        wv[v] = _mm512_and_si512(high ? _mm512_srli_epi16(bytes, 4) : bytes, low4);
      }
      vnni_digit_dots(acc, wv, digits + 8 * o + 4 * high, stride, digit_bytes);
    }
  }
  store_digit_sums(acc, sums);
}

// Columns 64 half .. 64 half + 63 of y[M, N] (one task) from vnni_digit_rows' digits, scales
// and sums (`groups` groups of K = stride) and the half's nibbles (`w`: the whole array, K / 8
// octs per half); scale[g][ld_scale] the groups' column scales.
void vnni_int4_half(int64_t half, const int8_t* digits, const float* row_scale,
                    const int32_t* digit_sums, int64_t M, int64_t stride, int64_t groups,
                    int64_t N, const uint8_t* w, const float* scale, int64_t ld_scale,
                    float* y) {
  const int64_t octs = stride / 8, group_octs = octs / groups;
  const uint8_t* wh = w + half * octs * kVnniHalf * 4;
  const int64_t c0 = half * kVnniHalf, width = std::min(kVnniHalf, N - c0);
  if (width <= 0) return;  // the padding half of the last tile
  alignas(64) int32_t sums[kVnniRows * kDigits][kVnniHalf];
  for (int64_t m = 0; m < M; m += kVnniRows) {
    const int64_t rows = std::min(kVnniRows, M - m);
    __m512 total[kVnniRows][kVnniVectors];
    for (int64_t g = 0; g < groups; ++g) {
      with_rows_upto<kVnniRows>(rows, [&](auto r) {
        constexpr int64_t R = decltype(r)::value;
        const int8_t* a = digits + m * stride + g * group_octs * 8;
        const uint8_t* group = wh + g * group_octs * kVnniHalf * 4;
        if (m == 0)  // the first rows stream the half from memory
          vnni_int4_group<R, true>(a, stride, M * stride, group, group_octs, sums);
        else
          vnni_int4_group<R, false>(a, stride, M * stride, group, group_octs, sums);
      });
      for (int64_t r = 0; r < rows; ++r) {
        const int32_t* offsets = digit_sums + ((m + r) * groups + g) * kDigits;
        for (int64_t v = 0; v < kVnniVectors; ++v) {
          // The digits less their offset (8 x the digit's group sum) and combined, times the
          // group's scales, added up group by group.
          const __m512 part = _mm512_mul_ps(exact_digits(sums + r * kDigits, v * 16, offsets, 8),
                                            _mm512_loadu_ps(scale + g * ld_scale + c0 + v * 16));
          total[r][v] = g == 0 ? part : _mm512_add_ps(total[r][v], part);
        }
      }
    }
    for (int64_t r = 0; r < rows; ++r) {
      const __m512 s = _mm512_set1_ps(row_scale[m + r]);
      for (int64_t v = 0; v < kVnniVectors && 16 * v < width; ++v) {
        const int64_t c = 16 * v;
        const __mmask16 valid = width - c >= 16 ? 0xffff : (1u << (width - c)) - 1;
        _mm512_mask_storeu_ps(y + (m + r) * N + c0 + c, valid, _mm512_mul_ps(total[r][v], s));
      }
    }
  }
}
#elif defined(HPLLM_MADDUBS_DIGITS)
// The same digits and layout on AVX2 (a build without AVX-512), for 1 to kBatchRows - 1 rows:
// vpmaddubsw (nibble x digit, pairs summed in int16: at most 2 x 15 x 127, and the low and
// high nibbles' pairs added, 7620: no saturation) and vpmaddwd by ones into int32 in place of
// vpdpbusd (one 256-bit vpdpbusd where the build has AVX-VNNI). The FMA route widens each
// nibble to f32 (five instructions per eight weights, each feeding one row's FMA); here six
// vpmaddubsw, three vpmaddwd and nine adds serve 64 weights of a row's three digits.
// bench/avx2_int4_digits.cc, one thread, 768 x 2048: 37.7-38.2 against 25.1 G weights/s from
// L2, 27.3-27.4 against 20.9-21.3 from memory (Zen 4). From kBatchRows rows the FMA routes'
// few-rows and GEMM blocks, which widen each weight once for many rows, run on the same octs
// (dequantize_int4_octs); bench/decode_matmuls.py measured the digits route there at 1.3x
// (16 rows) and 1.45x (128) their time (docs/performance.md, twelfth sitting). In the model at
// one row the gain is smaller (the second core adds little to products this fast): on a Zen 5
// about 1.3x with AVX-VNNI and within the host's swing without (fourteenth sitting).
// Rows per pass: 1 row x 4 vectors or 2 rows x 2 vectors, 12 accumulators of the 16 registers.
constexpr int64_t kMaddubsRows = 2;

// sums[r x 3 + d][c0 .. c0 + 8 Vectors - 1] = digit d of rows 0 .. Rows - 1 times `octs` octs
// of a half's nibbles (`w`: the group's first oct, 256 bytes per oct), columns c0 on. Prefetch
// (the first pass of the first rows): 32 octs ahead into L2, as vnni_int4_group.
template <int64_t Rows, int64_t Vectors, bool Prefetch>
__attribute__((noinline)) void maddubs_int4_group(const int8_t* digits, int64_t stride,
                                                  int64_t digit_bytes, const uint8_t* w,
                                                  int64_t octs, int64_t c0,
                                                  int32_t (*sums)[kVnniHalf]) {
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
    const uint8_t* row = w + o * kVnniHalf * 4;
    if constexpr (Prefetch) prefetch_to_l2(row + 32 * kVnniHalf * 4, kVnniHalf * 4);
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
// in the same order.
void maddubs_int4_half(int64_t half, const int8_t* digits, const float* row_scale,
                       const int32_t* digit_sums, int64_t M, int64_t stride, int64_t groups,
                       int64_t N, const uint8_t* w, const float* scale, int64_t ld_scale,
                       float* y) {
  const int64_t octs = stride / 8, group_octs = octs / groups;
  const uint8_t* wh = w + half * octs * kVnniHalf * 4;
  const int64_t c0 = half * kVnniHalf, width = std::min(kVnniHalf, N - c0);
  if (width <= 0) return;  // the padding half of the last tile
  alignas(32) int32_t sums[kMaddubsRows * kDigits][kVnniHalf];
  const __m256 inverse_base = _mm256_set1_ps(1.0f / kDigitBase);
  for (int64_t m = 0; m < M; m += kMaddubsRows) {
    const int64_t rows = std::min(kMaddubsRows, M - m);
    alignas(32) float total[kMaddubsRows][kVnniHalf];
    for (int64_t g = 0; g < groups; ++g) {
      with_rows_upto<kMaddubsRows>(rows, [&](auto r) {
        constexpr int64_t R = decltype(r)::value, V = R == 1 ? 4 : 2;
        const int8_t* a = digits + m * stride + g * group_octs * 8;
        const uint8_t* group = wh + g * group_octs * kVnniHalf * 4;
        for (int64_t c = 0; c < kVnniHalf; c += 8 * V)
          if (m == 0 && c == 0)  // the first pass of the first rows streams the group
            maddubs_int4_group<R, V, true>(a, stride, M * stride, group, group_octs, c, sums);
          else
            maddubs_int4_group<R, V, false>(a, stride, M * stride, group, group_octs, c, sums);
      });
      for (int64_t r = 0; r < rows; ++r) {
        const int32_t* offsets = digit_sums + ((m + r) * groups + g) * kDigits;
        for (int64_t c = 0; c < kVnniHalf; c += 8) {
          // exact_digits and combine_digits on eight lanes, then the group's scales, added up
          // group by group.
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
    for (int64_t r = 0; r < rows; ++r) {
      const __m256 s = _mm256_set1_ps(row_scale[m + r]);
      for (int64_t c = 0; c < width; c += 8) {
        const __m256 v = _mm256_mul_ps(_mm256_load_ps(total[r] + c), s);
        if (width - c >= 8) {
          _mm256_storeu_ps(y + (m + r) * N + c0 + c, v);
        } else {
          alignas(32) float lanes[8];
          _mm256_store_ps(lanes, v);
          std::memcpy(y + (m + r) * N + c0 + c, lanes, (width - c) * sizeof(float));
        }
      }
    }
  }
}

// out[k - k0][c - c0] = the dequantized weight (nibble * scale + (-8 * scale): dequantize_int4's
// values, bit for bit) for k0 .. k0 + kn - 1 (whole octs) and `width` columns from c0 (whole
// vectors inside one half) of one tile of the octs layout (`tile`, `octs` octs per half), rows
// `ldo` floats apart: the FMA routes' blocks and panels. Byte j of a column's oct o holds
// k = 8o + j in its low nibble and 8o + 4 + j in its high one, so a 32-bit lane shifted by 8j
// (+4) and masked is one k of eight columns. `prefetch`: fetch each half's stream 8 octs
// (64 k, 2 KiB) ahead into L1, as dequantize_int4's kPrefetchRows.
void dequantize_int4_octs(const uint8_t* tile, int64_t octs, const float* scale,
                          int64_t ld_scale, int64_t group, int64_t k0, int64_t kn, int64_t c0,
                          int64_t width, float* out, int64_t ldo, bool prefetch) {
  const __m256i low4 = _mm256_set1_epi32(15);
  const __m256 minus_eight = _mm256_set1_ps(-8.0f);
  for (int64_t o = k0 / 8; o < (k0 + kn) / 8; ++o) {
    const float* s = scale + (8 * o / group) * ld_scale;
    float* block = out + (8 * o - k0) * ldo - c0;
    if (prefetch)
      for (int64_t h = 0; h < 2; ++h)
        prefetch_ahead(tile + (h * octs + o + 8) * kVnniHalf * 4, kVnniHalf * 4);
    for (int64_t c = c0; c < c0 + width; c += 8) {
      const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(
          tile + ((c / kVnniHalf) * octs + o) * kVnniHalf * 4 + (c % kVnniHalf) * 4));
      const __m256 sc = _mm256_loadu_ps(s + c), offset = _mm256_mul_ps(minus_eight, sc);
      for (int64_t j = 0; j < 4; ++j) {
        const __m256 low = _mm256_cvtepi32_ps(
            _mm256_and_si256(_mm256_srli_epi32(bytes, 8 * j), low4));
        const __m256 high = _mm256_cvtepi32_ps(
            _mm256_and_si256(_mm256_srli_epi32(bytes, 8 * j + 4), low4));
        _mm256_storeu_ps(block + j * ldo + c, _mm256_fmadd_ps(low, sc, offset));
        _mm256_storeu_ps(block + (4 + j) * ldo + c, _mm256_fmadd_ps(high, sc, offset));
      }
    }
  }
}
#endif

ffi::Error VnniInt4MatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                              ffi::Buffer<ffi::U8> w, ffi::Buffer<ffi::F32> scale,
                              ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), wd = w.dimensions(), sd = scale.dimensions();
  const auto yd = y->dimensions();
  if (xd.size() != 2 || wd.size() != 5 || sd.size() != 2 || yd.size() != 2 || wd[1] != 2 ||
      wd[3] != 64 || wd[4] != 4 || xd[1] != 8 * wd[2] || yd[0] != xd[0] ||
      (yd[1] + kTile - 1) / kTile != wd[0] || sd[1] != wd[0] * kTile || sd[0] < 1 ||
      xd[1] % sd[0] || (xd[1] / sd[0]) % 8)
    return ffi::Error::InvalidArgument(
        "vnni_int4_matmul: expects x[M, K], w[tiles, 2, K / 8, 64, 4], scale[groups, "
        "tiles * 128] with K / groups a multiple of 8 -> y[M, N]");
#if defined(HPLLM_VNNI_DIGITS) || defined(HPLLM_MADDUBS_DIGITS)
  if (xd[1] > kVnniMaxK)
    return ffi::Error::InvalidArgument("vnni_int4_matmul: K above 66000 would overflow int32");
  const int64_t M = xd[0], K = xd[1], N = yd[1], groups = sd[0], ld_scale = sd[1];
  const uint8_t* wp = w.typed_data();
  const float* sp = scale.typed_data();
  float* yp = y->typed_data();
#if defined(HPLLM_MADDUBS_DIGITS)
  if (M >= kBatchRows) {
    const int64_t tiles = wd[0], octs = wd[2], group = K / groups;
    auto tile_of = [&](int64_t t) { return wp + t * 2 * octs * kVnniHalf * 4; };
    if (M < kGemmRows) {
      parallel_tiles(pool, tiles, [&](int64_t t) {
        tile_few_rows(t, M, K, N, x.typed_data(), yp,
                      [&](int64_t k0, int64_t kn, float (*wf)[kTile]) {
                        dequantize_int4_octs(tile_of(t), octs, sp + t * kTile, ld_scale, group,
                                             k0, kn, 0, kTile, wf[0], kTile, true);
                      }, nullptr);
      });
    } else {
      batched_tasks(pool, M, tiles, [&](int64_t t, int64_t m0, int64_t rows) {
        tile_batched_rows(t, m0, rows, K, N, x.typed_data(), yp,
                          [&](int64_t k0, int64_t kn, int64_t c0, float* panel) {
                            dequantize_int4_octs(tile_of(t), octs, sp + t * kTile, ld_scale,
                                                 group, k0, kn, c0, kPanel, panel, kPanel,
                                                 false);
                          }, nullptr);
      });
    }
    return ffi::Error::Success();
  }
#endif
  if (M > 0)
    vnni_product(pool, x.typed_data(), M, K, N, K, groups,
                 [&](int64_t half, const int8_t* digits, const float* row_scale,
                     const int32_t* digit_sums) {
#if defined(HPLLM_VNNI_DIGITS)
                   vnni_int4_half(half, digits, row_scale, digit_sums, M, K, groups, N, wp, sp,
                                  ld_scale, yp);
#else
                   maddubs_int4_half(half, digits, row_scale, digit_sums, M, K, groups, N, wp,
                                     sp, ld_scale, yp);
#endif
                 });
  return ffi::Error::Success();
#else
  return ffi::Error(ffi::ErrorCode::kUnimplemented,
                    "vnni_int4_matmul: this build has no AVX-512 VNNI or AVX2 digits route");
#endif
}

// ---- Attention over the KV cache (decode steps and prefills), masked slots skipped ----
//
// XLA:CPU runs the attention einsums of a decode step as small batched dots that want the
// cache transposed: every step copies each layer's whole K and V cache into a new layout before
// reading it again, and reads every slot, filled or not. A prefill pays the same for each of its
// tokens: 64-token prompts into a 256-slot cache spent 40% of the prefill in those einsums, 3/4
// of it on empty slots (docs/performance.md). This kernel reads the cache in place and only the
// slots the mask lets a query see (the filled part), with the reference's arithmetic:
// scores q.k / sqrt(head_dim), softmax (max subtracted, exp, divided by the sum), then the
// weighted sum of values. A row whose mask hides every slot gets the reference's result for
// that case: equal weights over all slots.
//
// What makes it fast (bench/decode_attention.py, figures in docs/performance.md):
// - A task is one row with all its heads, or, when there are too few rows to keep every thread
//   busy, a run of one row's visible slots; it walks its slots in memory order, so the row's K,
//   then V, are read as contiguous streams. The runs of a row are merged afterwards as in
//   flash-decoding: each keeps its own maximum, sum of exponentials and unnormalised output.
// - Scores are computed in memory order (slot-major, head-minor), kLanes dot products at a
//   time, each into its own vector accumulator; one transpose-and-add tree then turns the
//   kLanes accumulators into one vector of kLanes scores. At head_dim 64 a horizontal
//   reduction per dot product costs more than the dot product itself.
// - exp is a vector polynomial (attention_exp) instead of one libm call per score.
// Any head_dim works; the SIMD paths take head_dims that are a multiple of kLanes, others run
// the portable loops.
//
// The cache is read as it is stored: float32, bfloat16 or int8 with one f32 scale per (row,
// slot, kv-head) (hpllm.kvcache). Each element is widened to f32 in registers where it is used
// (bf16: a shift into the top half, exact; int8: a convert), as llama.cpp does with its F16 and
// Q8_0 caches; XLA would first write an f32 copy of the whole cache and read that. An int8
// slot's key scale multiplies its scores and its value scale the value weights (after the
// softmax's sum), so the dot products and the value pass never touch a scale.

// Runs of a row's visible slots shorter than this are not worth a task of their own.
constexpr int64_t kMinRunSlots = 32;

struct AttentionShape {
  int64_t H, D, T, KV;
};

// Scratch of one task, kept per thread: no allocation per task once a thread has seen the
// largest shapes.
struct AttentionScratch {
  std::unique_ptr<int32_t[]> slots;
  std::unique_ptr<float[]> scores;
  int64_t slot_capacity = 0, score_capacity = 0;
  void reserve(int64_t n_slots, int64_t n_scores) {
    if (n_slots > slot_capacity) slots.reset(new int32_t[slot_capacity = n_slots]);
    if (n_scores > score_capacity) scores.reset(new float[score_capacity = n_scores]);
  }
};

// One cache element as f32 (an int8 one before its scale).
inline float cache_to_f32(float x) { return x; }
inline float cache_to_f32(uint16_t bf16) { return bf16_to_f32(bf16); }
inline float cache_to_f32(int8_t x) { return static_cast<float>(x); }

#if defined(HPLLM_PATH_AVX512) || defined(HPLLM_PATH_AVX2)
// kLanes cache elements as f32.
inline Simd::F widen_cache(const float* p) { return Simd::load(p); }
inline Simd::F widen_cache(const uint16_t* p) { return widen_bf16(p); }
inline Simd::F widen_cache(const int8_t* p) { return Simd::widen_int8(p); }

#if defined(HPLLM_PATH_AVX512)
// Lane l of the result: the sum of the lanes of a[l]. Pairs of vectors are interleaved and
// added, so each level halves the vectors and doubles the sums each lane holds.
inline __m512 sum_lanes_each(const __m512 (&a)[16]) {
  __m512 pairs[8], quads[4];
  for (int i = 0; i < 8; ++i)  // lanes per 128-bit block: a0 b0 a1 b1 summed with a2 b2 a3 b3
    pairs[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]),
                             _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {  // per 128-bit block: the block sums of a[4i] .. a[4i + 3]
    const __m512d x = _mm512_castps_pd(pairs[2 * i]), y = _mm512_castps_pd(pairs[2 * i + 1]);
    quads[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)),
                             _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  // The four 128-bit blocks of each quad summed: two rounds of block shuffles.
  const __m512 h01 = _mm512_add_ps(_mm512_shuffle_f32x4(quads[0], quads[1], 0x88),
                                   _mm512_shuffle_f32x4(quads[0], quads[1], 0xdd));
  const __m512 h23 = _mm512_add_ps(_mm512_shuffle_f32x4(quads[2], quads[3], 0x88),
                                   _mm512_shuffle_f32x4(quads[2], quads[3], 0xdd));
  return _mm512_add_ps(_mm512_shuffle_f32x4(h01, h23, 0x88),
                       _mm512_shuffle_f32x4(h01, h23, 0xdd));
}

inline __m512 round_nearest(__m512 x) {
  return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
inline __m512 pow2(__m512 n) {  // 2^n for integral n in [-126, 127]
  return _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23));
}
inline __m512 zero_below(__m512 y, __m512 x, float limit) {  // NaN stays NaN
  return _mm512_maskz_mov_ps(~_mm512_cmp_ps_mask(x, _mm512_set1_ps(limit), _CMP_LT_OQ), y);
}
inline __m512 fnma(__m512 a, __m512 b, __m512 c) { return _mm512_fnmadd_ps(a, b, c); }
inline __m512 divide(__m512 a, __m512 b) { return _mm512_div_ps(a, b); }
#else
inline __m256 sum_lanes_each(const __m256 (&a)[8]) {
  __m256 pairs[4], quads[2];
  for (int i = 0; i < 4; ++i)
    pairs[i] = _mm256_add_ps(_mm256_unpacklo_ps(a[2 * i], a[2 * i + 1]),
                             _mm256_unpackhi_ps(a[2 * i], a[2 * i + 1]));
  for (int i = 0; i < 2; ++i) {
    const __m256d x = _mm256_castps_pd(pairs[2 * i]), y = _mm256_castps_pd(pairs[2 * i + 1]);
    quads[i] = _mm256_add_ps(_mm256_castpd_ps(_mm256_unpacklo_pd(x, y)),
                             _mm256_castpd_ps(_mm256_unpackhi_pd(x, y)));
  }
  return _mm256_add_ps(_mm256_permute2f128_ps(quads[0], quads[1], 0x20),
                       _mm256_permute2f128_ps(quads[0], quads[1], 0x31));
}

inline __m256 round_nearest(__m256 x) {
  return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
inline __m256 pow2(__m256 n) {
  return _mm256_castsi256_ps(
      _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
}
inline __m256 zero_below(__m256 y, __m256 x, float limit) {
  return _mm256_andnot_ps(_mm256_cmp_ps(x, _mm256_set1_ps(limit), _CMP_LT_OQ), y);
}
inline __m256 fnma(__m256 a, __m256 b, __m256 c) { return _mm256_fnmadd_ps(a, b, c); }
inline __m256 divide(__m256 a, __m256 b) { return _mm256_div_ps(a, b); }
#endif

// Slots whose values one pass over the accumulators adds: one load and store of each
// accumulator vector per kValueSlots FMAs (with one slot per pass, the loads and stores of the
// accumulators, not the FMAs, set the pace). 8 was the fastest of 1, 4 and 8 in a scratch
// harness on this Xeon.
constexpr int64_t kValueSlots = 8;

// How many slots ahead the score and value passes fetch the cache into L2. A row's K (then V)
// is one contiguous stream, but the hardware prefetchers stop at every 4 KiB page, and one core
// alone keeps too few reads in flight. Zen 4, bf16 cache, 208 slots seen per row:
// bench/attention_loop.cc (one thread, 16 rows x 12 layers) 10.0-11.7 -> 9.6-10.6 ms per step
// with its flush, 9.5-10.2 -> 8.4-9.0 without. In a scratch harness (not kept, no figure
// quoted) L1 instead (2-32 slots ahead) gained less, its few miss buffers filling, and 2, 3, 6
// or 8 slots into L2 less than 4.
constexpr int64_t kAheadSlots = 4;


// exp(x) for x <= 0, as Cephes' expf: x = n ln2 + r with |r| <= ln2 / 2 (ln 2 in two parts, so
// r is exact), exp(r) by a degree-6 polynomial, times 2^n from the exponent bits. Within 1 ulp
// of std::exp on every float in [-87.5, 0] (bench/attention_exp.cc); below -87.5 (where 2^n
// would leave the normal range) it returns 0 where std::exp returns a value under 1.1e-38.
inline Simd::F attention_exp(Simd::F x) {
  const Simd::F n = round_nearest(Simd::mul(x, Simd::set1(1.44269504088896341f)));
  Simd::F r = fnma(n, Simd::set1(0.693359375f), x);
  r = fnma(n, Simd::set1(-2.12194440e-4f), r);
  Simd::F p = Simd::set1(1.9875691500e-4f);
  p = Simd::fma(p, r, Simd::set1(1.3981999507e-3f));
  p = Simd::fma(p, r, Simd::set1(8.3334519073e-3f));
  p = Simd::fma(p, r, Simd::set1(4.1665795894e-2f));
  p = Simd::fma(p, r, Simd::set1(1.6666665459e-1f));
  p = Simd::fma(p, r, Simd::set1(5.0000001201e-1f));
  const Simd::F y = Simd::fma(p, Simd::mul(r, r), Simd::add(r, Simd::set1(1.0f)));
  return zero_below(Simd::mul(y, pow2(n)), x, -87.5f);
}

void exp_in_place(float* x, int64_t n) {
  constexpr int64_t L = Simd::kLanes;
  int64_t i = 0;
  for (; i + L <= n; i += L) Simd::store(x + i, attention_exp(Simd::load(x + i)));
  if (i < n) {  // the tail through a zero-padded vector, so every score takes the same path
    float tail[L] = {};
    std::copy(x + i, x + n, tail);
    Simd::store(tail, attention_exp(Simd::load(tail)));
    std::copy(tail, tail + (n - i), x + i);
  }
}

// scores[j * H + h] = q_h . k_{slots[j], h / groups} / root for the n slots, kLanes at a time
// in that (memory) order. D is a multiple of kLanes: Vectors = D / kLanes, or 0 for a loop
// over any such D (the common head_dims get their dot product unrolled). Cache is the cache's
// element type (float, uint16_t for bf16, int8_t).
template <int64_t Vectors, typename Cache>
void attention_scores(const AttentionShape& s, const float* q, const Cache* k,
                      const int32_t* slots, int64_t n, float root, float* scores) {
  constexpr int64_t L = Simd::kLanes;
  const int64_t H = s.H, D = Vectors ? Vectors * L : s.D, groups = H / s.KV, count = n * H,
                slot_stride = s.KV * D;
  int64_t j = 0, h = 0, in_group = 0;
  const Cache* kh = k + slots[0] * slot_stride;
  const auto next_dot = [&] {
    const float* qh = q + h * D;
    Simd::F acc = Simd::mul(Simd::load(qh), widen_cache(kh));
    if (Vectors) {
      for (int64_t i = L; i < Vectors * L; i += L)
        acc = Simd::fma(Simd::load(qh + i), widen_cache(kh + i), acc);
    } else {
      for (int64_t i = L; i < D; i += L)
        acc = Simd::fma(Simd::load(qh + i), widen_cache(kh + i), acc);
    }
    if (++h == H) {  // next slot
      h = in_group = 0;
      if (++j < n) kh = k + slots[j] * slot_stride;
      if (j + kAheadSlots < n)
        prefetch_to_l2(k + slots[j + kAheadSlots] * slot_stride, slot_stride * sizeof(Cache));
    } else if (++in_group == groups) {  // next key head of the same slot
      in_group = 0;
      kh += D;
    }
    return acc;
  };
  const Simd::F divisor = Simd::set1(root);
  int64_t p = 0;
  for (; p + L <= count; p += L) {
    Simd::F dots[L];
#pragma GCC unroll 16
    for (int64_t l = 0; l < L; ++l) dots[l] = next_dot();
    Simd::store(scores + p, divide(sum_lanes_each(dots), divisor));
  }
  if (p < count) {
    Simd::F dots[L];
    for (int64_t l = 0; l < L; ++l) dots[l] = p + l < count ? next_dot() : Simd::zero();
    float tail[L];
    Simd::store(tail, divide(sum_lanes_each(dots), divisor));
    std::copy(tail, tail + (count - p), scores + p);
  }
}

template <int64_t Slots, typename Cache>
inline void add_values(int64_t H, int64_t D, int64_t groups, const float* weights,
                       const Cache* const* vt, float* acc) {
  for (int64_t h = 0, kv_offset = 0, in_group = 0; h < H; ++h) {
    Simd::F w[Slots];
    for (int64_t j = 0; j < Slots; ++j) w[j] = Simd::set1(weights[j * H + h]);
    float* ah = acc + h * D;
    for (int64_t i = 0; i < D; i += Simd::kLanes) {
      Simd::F a = Simd::load(ah + i);
      for (int64_t j = 0; j < Slots; ++j)
        a = Simd::fma(w[j], widen_cache(vt[j] + kv_offset + i), a);
      Simd::store(ah + i, a);
    }
    if (++in_group == groups) {
      in_group = 0;
      kv_offset += D;
    }
  }
}

// acc[h] += weights[j * H + h] * v_{slots[j], h / groups} over the n slots. D is a multiple of
// kLanes.
template <typename Cache>
void attention_values(const AttentionShape& s, const float* weights, const Cache* v,
                      const int32_t* slots, int64_t n, float* acc) {
  const int64_t H = s.H, D = s.D, groups = H / s.KV, slot_stride = s.KV * D;
  int64_t j0 = 0;
  for (; j0 + kValueSlots <= n; j0 += kValueSlots) {
    for (int64_t j = j0 + kAheadSlots; j < std::min(n, j0 + kAheadSlots + kValueSlots); ++j)
      prefetch_to_l2(v + slots[j] * slot_stride, slot_stride * sizeof(Cache));
    const Cache* vt[kValueSlots];
    for (int64_t j = 0; j < kValueSlots; ++j) vt[j] = v + slots[j0 + j] * slot_stride;
    add_values<kValueSlots>(H, D, groups, weights + j0 * H, vt, acc);
  }
  for (; j0 < n; ++j0) {
    const Cache* vt = v + slots[j0] * slot_stride;
    add_values<1>(H, D, groups, weights + j0 * H, &vt, acc);
  }
}
#endif

// The portable loops: one reduction per dot product, std::exp.
template <typename Cache>
void attention_scores_portable(const AttentionShape& s, const float* q, const Cache* k,
                               const int32_t* slots, int64_t n, float root, float* scores) {
  const int64_t groups = s.H / s.KV, slot_stride = s.KV * s.D;
  for (int64_t j = 0; j < n; ++j) {
    const Cache* kt = k + slots[j] * slot_stride;
    for (int64_t h = 0; h < s.H; ++h) {
      const float* __restrict__ qh = q + h * s.D;
      const Cache* __restrict__ kh = kt + (h / groups) * s.D;
      float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
      for (int64_t i = 0; i < s.D; ++i) dot += qh[i] * cache_to_f32(kh[i]);
      scores[j * s.H + h] = dot / root;
    }
  }
}

template <typename Cache>
void attention_values_portable(const AttentionShape& s, const float* weights, const Cache* v,
                               const int32_t* slots, int64_t n, float* acc) {
  const int64_t groups = s.H / s.KV, slot_stride = s.KV * s.D;
  for (int64_t j = 0; j < n; ++j) {
    const Cache* vt = v + slots[j] * slot_stride;
    for (int64_t h = 0; h < s.H; ++h) {
      const float weight = weights[j * s.H + h];
      const Cache* __restrict__ vh = vt + (h / groups) * s.D;
      float* __restrict__ ah = acc + h * s.D;
#pragma omp simd
      for (int64_t i = 0; i < s.D; ++i) ah[i] += weight * cache_to_f32(vh[i]);
    }
  }
}

// The partial attention of one row's query heads q[H][D] over n of its slots (`slots`; k and v
// point at the row's cache [T][KV][D]): for each head h, top[h] = the largest score,
// total[h] = the sum of exp(score - top[h]) and acc[h][D] = the sum of exp(score - top[h]) * v.
// `scored` false: every score is 0 (the row whose mask hides everything). n may be 0.
// k_scale and v_scale (the row's [T][KV], int8 caches only, else null) multiply each slot and
// key head's scores and value weights.
template <typename Cache>
void attend_run(const AttentionShape& s, const float* q, const Cache* k, const Cache* v,
                const float* k_scale, const float* v_scale, const int32_t* slots, int64_t n,
                bool scored, float* scores, float* top, float* total, float* acc) {
  const int64_t H = s.H, D = s.D;
  std::fill(acc, acc + H * D, 0.0f);
  std::fill(total, total + H, 0.0f);
  std::fill(top, top + H, -std::numeric_limits<float>::infinity());
  if (n == 0) return;
  const float root = std::sqrt(static_cast<float>(D));
#if defined(HPLLM_PATH_AVX512) || defined(HPLLM_PATH_AVX2)
  const bool simd = D > 0 && D % Simd::kLanes == 0;
  if (scored && simd)
    switch (D / Simd::kLanes) {
      case 1: attention_scores<1>(s, q, k, slots, n, root, scores); break;
      case 2: attention_scores<2>(s, q, k, slots, n, root, scores); break;
      case 4: attention_scores<4>(s, q, k, slots, n, root, scores); break;
      case 8: attention_scores<8>(s, q, k, slots, n, root, scores); break;
      default: attention_scores<0>(s, q, k, slots, n, root, scores);
    }
  else
#endif
  if (scored)
    attention_scores_portable(s, q, k, slots, n, root, scores);
  else
    std::fill(scores, scores + n * H, 0.0f);
  const int64_t groups = H / s.KV;
  const auto scale_by = [&](const float* scale) {  // scores[j * H + h] *= scale[slot, h / groups]
    for (int64_t j = 0; j < n; ++j) {
      const float* slot_scale = scale + slots[j] * s.KV;
      float* slot_scores = scores + j * H;
      for (int64_t kv = 0; kv < s.KV; ++kv)
        for (int64_t g = 0; g < groups; ++g) slot_scores[kv * groups + g] *= slot_scale[kv];
    }
  };
  if (scored && k_scale != nullptr) scale_by(k_scale);
  for (int64_t j = 0; j < n; ++j)
    for (int64_t h = 0; h < H; ++h) top[h] = std::max(top[h], scores[j * H + h]);
  for (int64_t j = 0; j < n; ++j)
    for (int64_t h = 0; h < H; ++h) scores[j * H + h] -= top[h];
#if defined(HPLLM_PATH_AVX512) || defined(HPLLM_PATH_AVX2)
  exp_in_place(scores, n * H);
#else
  for (int64_t p = 0; p < n * H; ++p) scores[p] = std::exp(scores[p]);
#endif
  for (int64_t j = 0; j < n; ++j)
    for (int64_t h = 0; h < H; ++h) total[h] += scores[j * H + h];
  if (v_scale != nullptr) scale_by(v_scale);
#if defined(HPLLM_PATH_AVX512) || defined(HPLLM_PATH_AVX2)
  if (simd) {
    attention_values(s, scores, v, slots, n, acc);
    return;
  }
#endif
  attention_values_portable(s, scores, v, slots, n, acc);
}

// Whether the queries q, k and v[B, T, KV, D] (H a multiple of KV) and the mask fit together,
// and how many query tokens each cache row has (S): q[B, H, D] with mask[B, T] (one decode
// token per row, S = 1), or q[B, S, H, D] with mask[B, S, T] (a prefill's S tokens per row).
// 0 when they do not fit.
int64_t queries_per_row(ffi::Span<const int64_t> qd, ffi::Span<const int64_t> kd,
                        ffi::Span<const int64_t> vd, ffi::Span<const int64_t> md) {
  if (kd.size() != 4 || vd.size() != 4 || vd[0] != kd[0] || vd[1] != kd[1] || vd[2] != kd[2] ||
      vd[3] != kd[3] || kd[2] < 1)
    return 0;
  const bool one = qd.size() == 3 && md.size() == 2;
  const bool several = qd.size() == 4 && md.size() == 3 && md[1] == qd[1];
  if (!one && !several) return 0;
  const int64_t heads = qd[qd.size() - 2], head_dim = qd[qd.size() - 1];
  if (qd[0] != kd[0] || md[0] != qd[0] || md[md.size() - 1] != kd[1] || head_dim != kd[3] ||
      heads % kd[2] != 0)
    return 0;
  return one ? 1 : qd[1];
}

// The attention of every query over a cache of element type Cache; k_scale / v_scale [B, T, KV]
// for an int8 cache, null otherwise. The B query rows (q[B][H][D], mask[B][T]) come S to a
// cache row: query row b reads cache row b / S (S = 1 for decode steps; a prefill's tokens are
// its row's S queries, each seeing the slots up to its own position).
template <typename Cache>
void decode_attention(ffi::ThreadPool& pool, const AttentionShape& s, int64_t B, int64_t S,
                      const float* qp, const Cache* kp, const Cache* vp, const float* k_scale,
                      const float* v_scale, const bool* mp, float* op) {
  const int64_t H = s.H, D = s.D, T = s.T, row_size = T * s.KV * D, scale_row = T * s.KV;
  // Runs per row: enough tasks for two per thread (a late or busy thread then costs little),
  // none shorter than kMinRunSlots visible slots.
  int64_t most_seen = 0;
  for (int64_t b = 0; b < B; ++b) {
    int64_t seen = 0;
    for (int64_t t = 0; t < T; ++t) seen += mp[b * T + t];
    most_seen = std::max(most_seen, seen ? seen : T);
  }
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t runs = std::clamp<int64_t>((2 * threads + B - 1) / B, 1,
                                           std::max<int64_t>(1, most_seen / kMinRunSlots));
  // Per run and head: top, total, then D sums (only used when a row has several runs).
  const int64_t part_size = H * (D + 2);
  std::unique_ptr<float[]> parts(runs > 1 ? new float[B * runs * part_size] : nullptr);
  parallel_tiles(pool, B * runs, [&](int64_t task) {
    const int64_t b = task / runs, run = task % runs;
    thread_local AttentionScratch scratch;
    scratch.reserve(T, 0);
    const bool* row_mask = mp + b * T;
    int32_t* slots = scratch.slots.get();
    int64_t seen = 0;
    for (int64_t t = 0; t < T; ++t)
      if (row_mask[t]) slots[seen++] = static_cast<int32_t>(t);
    const int64_t n = seen ? seen : T;
    if (!seen)
      for (int64_t t = 0; t < T; ++t) slots[t] = static_cast<int32_t>(t);
    const int64_t first = n * run / runs, last = n * (run + 1) / runs;
    scratch.reserve(T, std::max<int64_t>(1, (last - first) * H) + H * (D + 2));
    float* scores = scratch.scores.get();
    float* part = runs > 1 ? parts.get() + task * part_size : scores + (last - first) * H;
    float *top = part, *total = part + H, *acc = part + 2 * H;
    const int64_t row = b / S;
    attend_run(s, qp + b * H * D, kp + row * row_size, vp + row * row_size,
               k_scale ? k_scale + row * scale_row : nullptr,
               v_scale ? v_scale + row * scale_row : nullptr, slots + first, last - first,
               seen != 0, scores, top, total, acc);
    if (runs == 1)
      for (int64_t h = 0; h < H; ++h)
        for (int64_t i = 0; i < D; ++i) op[(b * H + h) * D + i] = acc[h * D + i] / total[h];
  });
  if (runs > 1) {  // merge each row's runs: rescale each to the row's largest score
    for (int64_t b = 0; b < B; ++b) {
      const float* row_parts = parts.get() + b * runs * part_size;
      for (int64_t h = 0; h < H; ++h) {
        float top = -std::numeric_limits<float>::infinity(), total = 0.0f;
        for (int64_t r = 0; r < runs; ++r) top = std::max(top, row_parts[r * part_size + h]);
        float* o = op + (b * H + h) * D;
        std::fill(o, o + D, 0.0f);
        for (int64_t r = 0; r < runs; ++r) {
          const float* part = row_parts + r * part_size;
          const float run_total = part[H + h];
          if (run_total == 0.0f) continue;  // an empty run
          const float scale = std::exp(part[h] - top);
          total += run_total * scale;
          const float* acc = part + 2 * H + h * D;
          for (int64_t i = 0; i < D; ++i) o[i] += acc[i] * scale;
        }
        for (int64_t i = 0; i < D; ++i) o[i] /= total;
      }
    }
  }
}

constexpr const char* kAttentionShapes =
    "decode_attention: expects q[B, H, D] with mask[B, T], or q[B, S, H, D] with "
    "mask[B, S, T]; k and v[B, T, KV, D] (H a multiple of KV) (and for an int8 cache k_scale "
    "and v_scale[B, T, KV]) -> out shaped as q";

// A float32 cache (Stored ffi::F32), or a bfloat16 one (ffi::U16: its bits, as hpllm.kvcache
// holds it), widened exactly in registers.
template <ffi::DataType Stored>
ffi::Error DecodeAttentionUnscaledImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                                       ffi::Buffer<Stored> k, ffi::Buffer<Stored> v,
                                       ffi::Buffer<ffi::PRED> mask,
                                       ffi::ResultBuffer<ffi::F32> out) {
  const auto qd = q.dimensions(), kd = k.dimensions();
  const int64_t S = queries_per_row(qd, kd, v.dimensions(), mask.dimensions());
  if (S == 0) return ffi::Error::InvalidArgument(kAttentionShapes);
  decode_attention(pool, AttentionShape{qd[qd.size() - 2], kd[3], kd[1], kd[2]}, qd[0] * S, S,
                   q.typed_data(), k.typed_data(), v.typed_data(), nullptr, nullptr,
                   mask.typed_data(), out->typed_data());
  return ffi::Error::Success();
}
constexpr auto DecodeAttentionImpl = DecodeAttentionUnscaledImpl<ffi::F32>;
constexpr auto DecodeAttentionBf16Impl = DecodeAttentionUnscaledImpl<ffi::U16>;

// An int8 cache with one f32 scale per (row, slot, kv-head) for its keys and its values.
ffi::Error DecodeAttentionInt8Impl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                                   ffi::Buffer<ffi::S8> k, ffi::Buffer<ffi::F32> k_scale,
                                   ffi::Buffer<ffi::S8> v, ffi::Buffer<ffi::F32> v_scale,
                                   ffi::Buffer<ffi::PRED> mask, ffi::ResultBuffer<ffi::F32> out) {
  const auto qd = q.dimensions(), kd = k.dimensions(), ksd = k_scale.dimensions(),
             vsd = v_scale.dimensions();
  const auto scales_fit = [&](ffi::Span<const int64_t> sd) {
    return sd.size() == 3 && sd[0] == kd[0] && sd[1] == kd[1] && sd[2] == kd[2];
  };
  const int64_t S = queries_per_row(qd, kd, v.dimensions(), mask.dimensions());
  if (S == 0 || !scales_fit(ksd) || !scales_fit(vsd))
    return ffi::Error::InvalidArgument(kAttentionShapes);
  decode_attention<int8_t>(pool, AttentionShape{qd[qd.size() - 2], kd[3], kd[1], kd[2]},
                           qd[0] * S, S, q.typed_data(), k.typed_data(), v.typed_data(),
                           k_scale.typed_data(), v_scale.typed_data(), mask.typed_data(),
                           out->typed_data());
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

XLA_FFI_DEFINE_HANDLER_SYMBOL(HpllmW8A8Matmul, W8A8MatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(HpllmW4A8Matmul, W4A8MatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(HpllmDecodeAttention, DecodeAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(HpllmDecodeAttentionBf16, DecodeAttentionBf16Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U16>>()
                                  .Arg<ffi::Buffer<ffi::U16>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(HpllmDecodeAttentionInt8, DecodeAttentionInt8Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(HpllmInt8Matvec, Int8MatvecImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("widen_in_registers"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(HpllmAmxInt8Matmul, AmxInt8MatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(HpllmVnniInt8Matmul, VnniInt8MatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(HpllmVnniInt4Matmul, VnniInt4MatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(HpllmBf16Matvec, Bf16MatvecImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("widen_in_registers"));

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


// Whether the AMX tile unit runs int8-weight products (HpllmAmxInt8Matmul, every row count)
// and, from kBatchRows rows, w8a8, int4-weight and w4a8 ones (the last two where each group is
// whole k-steps): compiled with AMX-INT8 and granted the tile registers by the OS.
extern "C" int HpllmAmx() {
#if defined(HPLLM_AMX)
  return amx_permitted() ? 1 : 0;
#else
  return 0;
#endif
}

// Which w8a8 (and w4a8) path this library was compiled with ("avx512_vnni", "avx2_vnni",
// "avx2" or "portable"; the AVX-512 build without VNNI runs the AVX2 integer path).
extern "C" const char* HpllmW8A8Path() {
#if defined(HPLLM_W8A8_VNNI)
  return "avx512_vnni";
#elif defined(HPLLM_W8A8_AVX_VNNI)
  return "avx2_vnni";
#elif defined(HPLLM_W8A8_MADDUBS)
  return "avx2";
#else
  return "portable";
#endif
}
