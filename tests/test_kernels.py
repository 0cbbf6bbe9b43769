"""The native int8 / int4 / bf16 / w8a8 kernels (infer.kernels): every instruction path against
the XLA ops, the CPU-keyed build cache, and the prefill threshold.

Each path is a separate build of int8_matvec.cc (HPLLM_KERNEL_ISA): AVX-512 (with VNNI for
w8a8 and w4a8), AVX2 + FMA (with AVX-VNNI for them), and the portable loops. On the SIMD paths
row counts 1-4 take the row-chunk route, 5-63 the few-rows route (whole-tile blocks
dequantized once and shared by all rows), 64 and up the blocked GEMM (weight panels
dequantized once per k-block and row block); int8 and bf16 from 5 rows may take the
registers route instead (chunks of 6 rows of the tile kernel), and their tests run both.
A path this CPU cannot execute is skipped with the reason; the portable path runs everywhere a
C++ compiler does.
"""

import functools
import platform
import shutil

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hpllm.config import preset
from hpllm.kvcache import KVCache
from hpllm.linear import FloatDot
from hpllm.model import Transformer
from hpllm.quant import WITH_HEAD, QuantConfig, W4A8Dot, W8A8Dot, quantize_for_training
from hpllm.quant.weight_only import Int4Weight, Int4WeightOnlyDot, Int8Weight, Int8WeightOnlyDot
from infer import kernels
from infer.kernels import (
    NativeAmxInt8Dot,
    NativeBf16Dot,
    NativeDecodeAttention,
    NativeInt4Dot,
    NativeInt8Dot,
    NativeVnniInt4Dot,
    NativeVnniInt8Dot,
    NativeW4A8Dot,
    NativeW8A8Dot,
    TiledAmxInt8Weight,
    TiledBf16Weight,
    TiledInt4Weight,
    TiledInt8Weight,
    TiledVnniInt4Weight,
    TiledVnniInt8Weight,
    TiledW4A8Weight,
    TiledW8A8Weight,
    use_native_kernels,
)
from infer.loading import quantize

PATHS = ("portable", "avx2", "avx512")
# 200 rows: the GEMM route in several row blocks (4 of 54 rows on these shapes' 2-3 tiles; 192
# at most), the last partial and ending in a 2-row micro-kernel; 4 slabs of the w8a8 kernel.
ROWS = (1, 2, 3, 4, 7, 8, 16, 33, 200)
NEVER = 10**9  # a prefill threshold no test reaches: the kernel runs for every row count
BATCH_ROWS = 5  # kBatchRows: where the batched routes begin
# (rows, widen_in_registers) for the int8 and bf16 kernels: both batched routes, the registers
# one only where it differs (from BATCH_ROWS rows).
ROUTE_CASES = tuple((rows, widen) for widen in (False, True) for rows in ROWS
                    if not widen or rows >= BATCH_ROWS)
X86 = platform.machine() in ("x86_64", "AMD64")
# What each forced build runs where its name is not the path: the f32 kernels of the VNNI builds
# are the AVX-512 and AVX2 ones, and w8a8 without VNNI runs the AVX2 integer path.
FLOAT_PATH = {"avx512vnni": "avx512", "avx512amx": "avx512", "avx2vnni": "avx2"}
W8A8_PATH = {"avx512": "avx2", "avx512vnni": "avx512_vnni", "avx512amx": "avx2",
             "avx2vnni": "avx2_vnni"}


def _kernels_or_skip(isa: str) -> kernels.Kernels:
    if shutil.which("g++") is None:
        pytest.skip("no C++ compiler: the XLA ops are used instead")
    if isa != "portable" and not X86:
        pytest.skip(f"{isa} is an x86 path; this is {platform.machine()}")
    if (lacks := kernels.cpu_lacks(isa)) is not None:
        pytest.skip(f"{isa} path cannot run here: {lacks}")
    built = kernels.load(isa)
    assert built is not None, kernels.unavailable_reason(isa)
    if isa != "native":  # the build runs the path it was asked for, not a fallback
        assert built.path == FLOAT_PATH.get(isa, isa)
        assert built.w8a8_path == W8A8_PATH.get(isa, isa)
    return built


# (d_in, d_out, group): 300 output columns are two whole 128-column tiles and a padded one;
# d_in 300 spans several k-blocks, the last one partial, on every route (the int8 tile kernel's
# 64 rows, the few-rows route's 32, the GEMM's 128 (AVX-512) or 256 (AVX2)). int4 groups:
# 3 (odd), 3 with d_in zero-padded from 90 to 96, and 5 (odd) groups of 64.
INT8_SHAPES = ((96, 300), (300, 130))
INT4_SHAPES = ((96, 300, 32), (90, 300, 32), (320, 130, 64))


def _activations(d_in: int) -> jax.Array:
    """max(ROWS) rows of activations; a test takes the first `rows` (each output row depends
    on its own activation row only, so one reference product serves every row count)."""
    rng = np.random.default_rng(d_in)
    return jnp.asarray(rng.standard_normal((max(ROWS), d_in), np.float32))


# The int8 weight-only routes: weight layout and op of each.
INT8_ROUTES = {"fma": (TiledInt8Weight, NativeInt8Dot),
               "amx": (TiledAmxInt8Weight, NativeAmxInt8Dot),
               "vnni": (TiledVnniInt8Weight, NativeVnniInt8Dot)}


def _check_int8_kernel_against_the_xla_op(isa: str, route: str = "fma") -> None:
    """The FMA kernels' layout and op, or the three-digit routes' (`route` "amx": the tile
    unit's; "vnni": AVX-512 VNNI's)."""
    tiled_weight, op = INT8_ROUTES[route]
    for d_in, d_out in INT8_SHAPES:
        w = jax.random.normal(jax.random.key(d_in), (d_in, d_out), jnp.float32)
        weight = Int8Weight(w)
        tiled = tiled_weight(weight)
        plain_values, plain_scales = tiled.plain()  # the layout round-trips (the XLA route)
        np.testing.assert_array_equal(plain_values, weight.values)
        np.testing.assert_array_equal(plain_scales, weight.scales)
        x = _activations(d_in)
        reference = jax.jit(Int8WeightOnlyDot())(x, weight)
        # The FMA kernels: both batched routes, whichever this CPU defaults to.
        cases = [(rows, op(isa, NEVER, widen)) for rows, widen in ROUTE_CASES] if (
            route == "fma") else [(rows, op(isa, NEVER)) for rows in ROWS]
        for rows, dot in cases:
            got = jax.jit(dot)(x[:rows], tiled)
            # Same products of exactly representable values in float32, summed in another
            # order: on outputs up to ~72 the largest difference measured was 4.6e-5 on every
            # FMA path (1.7e-5 at d_in 96), 1.9e-5 on the AMX route (8.1e-6 at d_in 96; 1.2e-5
            # at 1-5 rows) and on the VNNI route (8.1e-6 at d_in 96), so this only admits
            # reordering.
            np.testing.assert_allclose(got, reference[:rows], rtol=1e-5, atol=1e-4,
                                       err_msg=f"{isa}, {rows} rows, {d_in}x{d_out}, {dot}")


@pytest.mark.parametrize("isa", PATHS)
def test_int8_kernel_matches_the_xla_op(isa):
    _kernels_or_skip(isa)
    _check_int8_kernel_against_the_xla_op(isa)


# The int4 AMX route's shapes (group a multiple of 64, or per channel): 3 groups of 128 (odd)
# and 5 of 64 (odd), both with a padded last tile; per channel with d_in 200 zero-padded to
# 256 (whole k-steps of the unit) inside the kernel. Group 32 keeps the FMA routes.
INT4_AMX_SHAPES = ((384, 300, 128), (320, 130, 64), (200, 130, 0), (96, 300, 32))
AMX_ROWS = (5, 7, 8, 16, 33, 200)  # 5: the route's first row count (kBatchRows)


def _check_digits_error_bound(cases: list) -> None:
    """Each case (d_in, op, weight, dequantized weight, row counts for the bound, row counts
    for the non-finite rows) against a float64 reference on rows with a 1000x outlier channel,
    where the three digits' bound bites hardest, and with NaN and infinite activations."""
    for d_in, dot, tiled, dequantized, bound_rows, broken_rows in cases:
        x = _activations(d_in)
        outlier = np.array(x[:16], np.float64)
        outlier[::2, 3] *= 1000.0
        exact = outlier @ dequantized
        # Three base-254 digits keep each activation to within 2^-24 of its row's largest
        # magnitude, so |error| <= 2^-24 x max|x_row| x sum|w_column| (plus f32 rounding of the
        # digit sums and, for int4, of the per-group flushes, far smaller). Measured: int8 at
        # most 0.32 of it at 3 rows and 0.44 at 16 on AMX and on VNNI (0.26 at 1 row on VNNI;
        # the int8 FMA routes, avx512 build, 0.87);
        # int4 0.17 (group 128), 0.22 (group 64), 0.25 (per channel) on AMX and 0.16, 0.23,
        # 0.25 on VNNI and 0.17, 0.14, 0.19 on AVX2's digits route (1 and 3 rows), its FMA
        # routes 0.53-0.81 (f32 accumulation carries the outlier's rounding too).
        bound = 2.0**-24 * np.abs(outlier).max(1, keepdims=True) * np.abs(dequantized).sum(0)
        for rows in bound_rows:
            got = np.asarray(jax.jit(dot)(jnp.asarray(outlier[:rows], jnp.float32), tiled),
                             np.float64)
            error = np.abs(got - exact[:rows])
            assert np.all(error <= bound[:rows]), (type(dot).__name__, d_in, rows,
                                                   np.max(error / bound[:rows]))
        # A non-finite activation makes its row's outputs non-finite, never finite numbers.
        broken = np.array(x[:8])
        broken[2, 5], broken[5, 1] = np.nan, np.inf
        for rows in broken_rows:
            bad = [r for r in (2, 5) if r < rows]
            got = np.asarray(jax.jit(dot)(jnp.asarray(broken[:rows]), tiled))
            assert np.all(np.isnan(got[bad]))
            assert np.all(np.isfinite(np.delete(got, bad, axis=0)))


def test_amx_routes_match_the_xla_ops_and_the_digits_error_bound():
    """The AMX routes where this CPU and OS run them: int8 weights in the tile unit's layout,
    every row count (up to 5 rows all (row, digit) pairs in one digits operand, more 16 at a
    time), and int4 weights from 5 rows up (activations as three int8 digits of a per-row
    scale) against the XLA ops on the usual shapes and a float64 reference on rows with a 1000x
    outlier channel, where the digits' bound bites hardest; w8a8 (5 rows and up) equal to the
    XLA op bit for bit."""
    built = _kernels_or_skip("native")
    if not built.amx:
        pytest.skip("no AMX-INT8 here (CPU or OS): the native build runs the FMA routes")
    _check_int8_kernel_against_the_xla_op("native", "amx")
    _check_int4_kernel_against_the_xla_op("native", INT4_AMX_SHAPES, AMX_ROWS)
    _check_w8a8_kernel_against_the_xla_op("native")
    # (d_in, op, weight, dequantized weight, row counts for the bound, for the non-finite rows)
    cases = []
    for d_in, d_out in INT8_SHAPES:
        weight = Int8Weight(jax.random.normal(jax.random.key(d_in), (d_in, d_out), jnp.float32))
        dequantized = np.asarray(weight.values, np.float64) * np.asarray(weight.scales)[None, :]
        tiled = TiledAmxInt8Weight(weight)
        cases.append((d_in, NativeAmxInt8Dot("native", NEVER), tiled, dequantized, (3, 16),
                      (3, 8)))
        # bf16 activations take the XLA op on the untiled weight: exactly the reference.
        x16 = _activations(d_in)[:4].astype(jnp.bfloat16)
        np.testing.assert_array_equal(NativeAmxInt8Dot("native", NEVER)(x16, tiled),
                                      Int8WeightOnlyDot()(x16, weight))
    for d_in, d_out, group in INT4_AMX_SHAPES[:3]:
        weight = Int4Weight(jax.random.normal(jax.random.key(d_in), (d_in, d_out), jnp.float32),
                            group)
        cases.append((d_in, NativeInt4Dot("native", NEVER), TiledInt4Weight(weight),
                      np.asarray(weight.dequantize(), np.float64), (16,), (8,)))
    _check_digits_error_bound(cases)


def test_amx_int8_model_logits_match_the_xla_model():
    """A tiny int8 model (head quantized too) on the AMX route against the same model on the
    XLA ops: a 3-token prompt (one digits operand) and two 24-token ones (48 rows)."""
    built = _kernels_or_skip("native")
    if not built.amx:
        pytest.skip("no AMX-INT8 here (CPU or OS): the native build runs the FMA routes")
    model = quantize(Transformer(preset("tiny"), key=jax.random.key(0)).unstacked(), "int8",
                     targets=WITH_HEAD)
    native = use_native_kernels(model, built.isa)
    for linear in (native.blocks[0].mlp.w_up, native.lm_head):
        assert isinstance(linear.op, NativeAmxInt8Dot)
        assert isinstance(linear.weight, TiledAmxInt8Weight)
    forward = eqx.filter_jit(lambda model, tokens: model(tokens))
    for shape in ((1, 3), (2, 24)):
        tokens = jax.random.randint(jax.random.key(1), shape, 0, 512)
        # The digits' error and another summation order through two layers and the head:
        # largest difference measured 1.5e-7 on logits up to ~0.4 (the FMA kernels: the same).
        np.testing.assert_allclose(forward(native, tokens), forward(model, tokens), rtol=0,
                                   atol=1e-6, err_msg=str(shape))


def test_vnni_routes_match_the_xla_ops_and_the_digits_error_bound():
    """int8 and int4 weights on the AVX-512 VNNI routes (activations as three int8 digits of a
    per-row scale, `vpdpbusd`), every row count, against the XLA ops on the usual shapes (int4:
    groups of 32, 64 and 128 and per channel, odd group counts, a padded d_in) and a float64
    reference under the digits' error bound; bf16 activations, rows from the prefill threshold
    up, and a build without VNNI take the XLA op: exactly the reference."""
    _kernels_or_skip("avx512vnni")
    _check_int8_kernel_against_the_xla_op("avx512vnni", "vnni")
    _check_int4_kernel_against_the_xla_op("avx512vnni", INT4_AMX_SHAPES + INT4_SHAPES[1:2],
                                          route="vnni")
    cases = []
    for d_in, d_out in INT8_SHAPES:
        weight = Int8Weight(jax.random.normal(jax.random.key(d_in), (d_in, d_out), jnp.float32))
        dequantized = np.asarray(weight.values, np.float64) * np.asarray(weight.scales)[None, :]
        tiled = TiledVnniInt8Weight(weight)
        cases.append((d_in, NativeVnniInt8Dot("avx512vnni", NEVER), tiled, dequantized,
                      (1, 2, 3, 16), (1, 3, 8)))
        x = _activations(d_in)[:4]
        reference = jax.jit(Int8WeightOnlyDot())
        for x_in, dot in ((x.astype(jnp.bfloat16), NativeVnniInt8Dot("avx512vnni", NEVER)),
                          (x, NativeVnniInt8Dot("avx512vnni", prefill_rows=4)),
                          (x, NativeVnniInt8Dot("avx512", NEVER))):
            np.testing.assert_array_equal(jax.jit(dot)(x_in, tiled), reference(x_in, weight),
                                          err_msg=str(dot))
    for d_in, d_out, group in INT4_AMX_SHAPES[:3]:
        weight = Int4Weight(jax.random.normal(jax.random.key(d_in), (d_in, d_out), jnp.float32),
                            group)
        tiled = TiledVnniInt4Weight(weight)
        cases.append((d_in, NativeVnniInt4Dot("avx512vnni", NEVER), tiled,
                      np.asarray(weight.dequantize(), np.float64), (1, 16), (1, 8)))
        x16 = _activations(d_in)[:4].astype(jnp.bfloat16)
        np.testing.assert_array_equal(NativeVnniInt4Dot("avx512vnni", NEVER)(x16, tiled),
                                      Int4WeightOnlyDot()(x16, weight))
    _check_digits_error_bound(cases)
    # Past VNNI_MAX_K inputs the int32 digit sums could overflow: the XLA op runs instead.
    d_in = kernels.VNNI_MAX_K + 8
    w = jax.random.normal(jax.random.key(2), (d_in, 16), jnp.float32)
    x = jax.random.normal(jax.random.key(3), (1, d_in), jnp.float32)
    for weight, tiled, dot, reference in (
            (Int8Weight(w), TiledVnniInt8Weight, NativeVnniInt8Dot, Int8WeightOnlyDot()),
            (Int4Weight(w, 0), TiledVnniInt4Weight, NativeVnniInt4Dot, Int4WeightOnlyDot())):
        np.testing.assert_array_equal(jax.jit(dot("avx512vnni", NEVER))(x, tiled(weight)),
                                      jax.jit(reference)(x, weight))


@pytest.mark.parametrize("isa", ("avx2", "avx2vnni"))
def test_avx2_int4_digits_route_matches_the_xla_op_and_the_digits_error_bound(isa):
    """int4 weights on an AVX2 build's digits route (`vpmaddubsw`, or AVX-VNNI's 256-bit
    `vpdpbusd`; 1 to 4 rows, the FMA routes on the dequantized layout from 5) against the XLA
    op at every row count and a float64 reference under the digits' error bound; bf16
    activations and a build without the route take the XLA op: exactly the reference."""
    _kernels_or_skip(isa)
    _check_int4_kernel_against_the_xla_op(isa, INT4_AMX_SHAPES + INT4_SHAPES[1:2], route="vnni")
    cases = []
    for d_in, d_out, group in INT4_AMX_SHAPES[:3]:
        weight = Int4Weight(jax.random.normal(jax.random.key(d_in), (d_in, d_out), jnp.float32),
                            group)
        tiled = TiledVnniInt4Weight(weight)
        cases.append((d_in, NativeVnniInt4Dot(isa, NEVER), tiled,
                      np.asarray(weight.dequantize(), np.float64), (1, 3), (1, 3)))
        # (From 5 rows the FMA routes run: an infinite activation there gives infinite
        # outputs, as the XLA op does, not the digits routes' NaN.)
        x = _activations(d_in)[:4]
        reference = jax.jit(Int4WeightOnlyDot())
        for x_in, dot in ((x.astype(jnp.bfloat16), NativeVnniInt4Dot(isa, NEVER)),
                          (x, NativeVnniInt4Dot("portable", NEVER))):
            np.testing.assert_array_equal(jax.jit(dot)(x_in, tiled), reference(x_in, weight),
                                          err_msg=str(dot))
    _check_digits_error_bound(cases)


@pytest.mark.parametrize(("isa", "scheme", "layout"), [
    ("avx512vnni", "int8", "unrolled"), ("avx512vnni", "int8", "scanned"),
    ("avx512vnni", "int4", "unrolled"), ("avx2", "int4", "scanned")])
def test_vnni_model_logits_match_the_xla_model(monkeypatch, isa, scheme, layout):
    """A tiny int8 or int4 model (head quantized too) on the digits routes (AVX-512 VNNI, or
    an AVX2 build's int4 route) against the same model on the XLA ops, in either layer layout:
    a 3-token prompt and two 24-token ones (48 rows)."""
    _kernels_or_skip(isa)
    # use_native_kernels takes these routes on AMD CPUs; the test runs them on any that can.
    monkeypatch.setattr(kernels, "DIGITS_ON_VNNI", True)
    model = Transformer(preset("tiny"), key=jax.random.key(0))
    model = quantize(model.unstacked() if layout == "unrolled" else model, scheme, 32,
                     WITH_HEAD)
    native = use_native_kernels(model, isa)
    blocks = native.blocks[0] if layout == "unrolled" else native.blocks
    tiled, op = {"int8": (TiledVnniInt8Weight, NativeVnniInt8Dot),
                 "int4": (TiledVnniInt4Weight, NativeVnniInt4Dot)}[scheme]
    for linear in (blocks.mlp.w_up, native.lm_head):
        assert isinstance(linear.op, op)
        assert isinstance(linear.weight, tiled)
    forward = eqx.filter_jit(lambda model, tokens: model(tokens))
    for shape in ((1, 3), (2, 24)):
        tokens = jax.random.randint(jax.random.key(1), shape, 0, 512)
        # The digits' error and another summation order through two layers and the head:
        # largest difference measured 1.8e-7 on logits up to ~0.4, int8 and int4 (the FMA kernels:
        # 2.4e-7).
        np.testing.assert_allclose(forward(native, tokens), forward(model, tokens), rtol=0,
                                   atol=1e-6, err_msg=str(shape))


# The int4 weight-only routes: weight layout and op of each.
INT4_ROUTES = {"fma": (TiledInt4Weight, NativeInt4Dot),
               "vnni": (TiledVnniInt4Weight, NativeVnniInt4Dot)}


def _check_int4_kernel_against_the_xla_op(
        isa: str, shapes: tuple[tuple[int, int, int], ...] = INT4_SHAPES,
        row_counts: tuple[int, ...] = ROWS, route: str = "fma") -> None:
    tiled_weight, op = INT4_ROUTES[route]
    for d_in, d_out, group in shapes:
        w = jax.random.normal(jax.random.key(d_in), (d_in, d_out), jnp.float32)
        weight = Int4Weight(w, group)
        tiled = tiled_weight(weight)
        plain_packed, plain_scales = tiled.plain()  # the layout round-trips (the XLA route)
        np.testing.assert_array_equal(plain_packed, weight.packed)
        np.testing.assert_array_equal(plain_scales, weight.scales)
        x = _activations(d_in)
        reference = jax.jit(Int4WeightOnlyDot())(x, weight)
        for rows in row_counts:
            got = jax.jit(op(isa, NEVER))(x[:rows], tiled)
            # Per-group scaling and the offset-binary correction (8 x the group's activation
            # sum) reorder the float32 arithmetic: largest difference measured 5.7e-5 on
            # outputs up to ~76 (any path; the AMX route: 2.7e-5 on outputs up to ~81; the VNNI
            # route 2.3e-5), against a bound of 2e-4 + 1e-5 x |output|.
            np.testing.assert_allclose(got, reference[:rows], rtol=1e-5,
                                       atol=2e-4, err_msg=f"{isa}, {rows} rows, {d_in}x{d_out}")


@pytest.mark.parametrize("isa", PATHS)
def test_int4_kernel_matches_the_xla_op(isa):
    _kernels_or_skip(isa)
    _check_int4_kernel_against_the_xla_op(isa)


@pytest.mark.parametrize("isa", PATHS)
def test_bf16_kernel_matches_the_xla_op(isa):
    _kernels_or_skip(isa)
    for d_in, d_out in INT8_SHAPES:
        w = jax.random.normal(jax.random.key(d_in), (d_in, d_out), jnp.float32)
        weight = w.astype(jnp.bfloat16)
        tiled = TiledBf16Weight(weight)
        np.testing.assert_array_equal(tiled.plain(), weight)  # the layout round-trips
        x = _activations(d_in)
        reference = jax.jit(FloatDot())(x, weight)  # x @ weight.astype(f32)
        for rows, widen in ROUTE_CASES:
            got = jax.jit(NativeBf16Dot(isa, NEVER, widen))(x[:rows], tiled)
            # bf16 -> f32 is exact, so these are the reference's products, possibly summed in
            # another order: the largest difference measured was 5.0e-5 on every path (outputs
            # up to ~72; 1.5e-5 at d_in 96), about what float32 rounding over 300 terms gives;
            # the bound leaves several times it.
            np.testing.assert_allclose(
                got, reference[:rows], rtol=1e-5, atol=1e-4,
                err_msg=f"{isa}, {rows} rows, {d_in}x{d_out}, widen_in_registers={widen}")


def test_kernel_keeps_leading_axes_and_runs_under_jit():
    built = _kernels_or_skip("portable")
    w = jax.random.normal(jax.random.key(0), (96, 300), jnp.float32)
    tiled, weight = TiledInt8Weight(Int8Weight(w)), Int8Weight(w)
    x = jax.random.normal(jax.random.key(1), (3, 2, 96), jnp.float32)
    got = jax.jit(lambda x: NativeInt8Dot(built.isa, NEVER)(x, tiled))(x)
    np.testing.assert_allclose(got, Int8WeightOnlyDot()(x, weight), rtol=1e-5, atol=1e-4)


def test_kernel_isa_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("HPLLM_KERNEL_ISA", "portable")
    assert kernels.default_isa() == "portable"
    monkeypatch.setenv("HPLLM_KERNEL_ISA", "avx3000")
    with pytest.raises(ValueError, match="HPLLM_KERNEL_ISA"):
        kernels.default_isa()


def test_cache_key_changes_with_the_target_features():
    source, flags = b"int main() {}", ("-O3",)
    base = kernels.cache_key(source, flags, ("__AVX2__", "__FMA__"))
    assert kernels.cache_key(source, flags, ("__AVX2__", "__FMA__")) == base
    assert kernels.cache_key(source, flags, ("__AVX2__", "__AVX512F__", "__FMA__")) != base
    assert kernels.cache_key(source + b" ", flags, ("__AVX2__", "__FMA__")) != base
    assert kernels.cache_key(source, ("-O2",), ("__AVX2__", "__FMA__")) != base


def test_compiler_resolves_different_features_for_avx2_and_avx512_targets():
    if shutil.which("g++") is None or not X86:
        pytest.skip("needs g++ targeting x86-64")
    avx2 = kernels.target_features("g++", kernels.ISA_FLAGS["avx2"])
    avx512 = kernels.target_features("g++", kernels.ISA_FLAGS["avx512"])
    assert "__AVX2__" in avx2 and "__FMA__" in avx2 and "__AVX512F__" not in avx2
    assert "__AVX512F__" in avx512
    # Same source and common flags: the features alone must give different libraries (as
    # -march=native does on an AVX2 and on an AVX-512 machine sharing one home folder).
    source, flags = kernels.SOURCE.read_bytes(), kernels.COMMON_FLAGS + ("-march=native",)
    assert kernels.cache_key(source, flags, avx2) != kernels.cache_key(source, flags, avx512)


def test_prefill_threshold_gives_the_same_logits_on_both_sides():
    _kernels_or_skip("portable")
    float_model = Transformer(preset("tiny"), key=jax.random.key(0)).unstacked()
    tokens = jax.random.randint(jax.random.key(1), (2, 24), 0, 512)  # 48 activation rows
    forward = eqx.filter_jit(lambda model, tokens: model(tokens))
    for scheme in ("int8", "int4", "bf16"):
        model = quantize(float_model, scheme, 32, WITH_HEAD)
        through_kernel = use_native_kernels(model, "portable", prefill_rows=49)
        through_xla_dot = use_native_kernels(model, "portable", prefill_rows=48)
        for linear in (through_kernel.blocks[0].mlp.w_up, through_kernel.lm_head):
            assert isinstance(linear.op, (NativeInt8Dot, NativeInt4Dot, NativeBf16Dot)), scheme
        reference = forward(model, tokens)
        # Above the threshold the op is the reference's XLA op (measured difference 0); below
        # it the kernel sums in another order through two layers and the head: largest
        # difference measured 2.4e-7 on logits up to ~0.4 (bf16: 0, portable and native).
        np.testing.assert_allclose(forward(through_kernel, tokens), reference, rtol=0,
                                   atol=1e-6, err_msg=scheme)
        np.testing.assert_allclose(forward(through_xla_dot, tokens), reference, rtol=0,
                                   atol=1e-6, err_msg=scheme)


def test_bf16_weights_of_a_bfloat16_compute_model_keep_the_xla_op():
    _kernels_or_skip("portable")
    cfg = preset("tiny").replace(compute_dtype="bfloat16")
    model = quantize(Transformer(cfg, key=jax.random.key(0)).unstacked(), "bf16")
    # The kernel takes f32 activations only; swapping would untile the weight on every call.
    linear = use_native_kernels(model, "portable").blocks[0].mlp.w_up
    assert isinstance(linear.op, FloatDot) and linear.weight.dtype == jnp.bfloat16


# d_in 90 is zero-padded to 92 (whole quads of k) and spans 3 blocks of the VNNI kernel; 300
# output columns end in a padded tile.
W8A8_SHAPES = ((90, 300), (200, 130))


@pytest.mark.parametrize("isa", PATHS + ("avx512vnni", "avx2vnni"))
def test_w8a8_kernel_equals_the_xla_op(isa):
    _kernels_or_skip(isa)
    _check_w8a8_kernel_against_the_xla_op(isa)


def _check_w8a8_kernel_against_the_xla_op(isa: str) -> None:
    for d_in, d_out in W8A8_SHAPES:
        w = jax.random.normal(jax.random.key(d_in), (d_in, d_out), jnp.float32)
        weight = Int8Weight(w)
        tiled = TiledW8A8Weight(weight)
        np.testing.assert_array_equal(tiled.plain()[0], weight.values)  # the layout round-trips
        x = _activations(d_in)
        reference = jax.jit(W8A8Dot())(x, weight)
        for rows in ROWS:
            got = jax.jit(NativeW8A8Dot(isa))(x[:rows], tiled)
            # Exact int32 sums, then the op's two float multiplies in its order: equal bits.
            np.testing.assert_array_equal(got, reference[:rows],
                                          err_msg=f"{isa}, {rows} rows, {d_in}x{d_out}")


@eqx.filter_jit
def _decode_step_logits(model: Transformer, tokens: jax.Array) -> jax.Array:
    """Prefill all but the last token of each row of `tokens`, then one decode step of every
    row: that step's logits."""
    cache = model.allocate_cache(tokens.shape[0], 16)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    _, cache = model.decode(tokens[:, :-1], positions[:, :-1], cache)
    logits, _ = model.decode(tokens[:, -1:], positions[:, -1:], cache)
    return logits


def test_w8a8_batched_decode_matches_the_fake_quant_model():
    built = _kernels_or_skip("native")
    float_model = Transformer(preset("tiny"), key=jax.random.key(0))
    fake_quant = quantize_for_training(float_model, QuantConfig.named("int8")).unstacked()
    xla_op = quantize(float_model.unstacked(), "w8a8")  # the QAT targets: head stays float
    native = use_native_kernels(xla_op, built.isa)
    assert isinstance(native.blocks[0].attn.wq.op, NativeW8A8Dot)
    # 8 rows: a 5-token prefill, then one decode step (the batched path).
    tokens = jax.random.randint(jax.random.key(1), (8, 6), 0, 512)
    decode_step_logits = functools.partial(_decode_step_logits, tokens=tokens)
    got = decode_step_logits(native)
    # The kernel's int32 sums are exact, as the XLA op's; what differs is how XLA fuses the
    # float ops around a custom call: largest difference measured 6e-8 on logits up to ~0.36.
    np.testing.assert_allclose(got, decode_step_logits(xla_op), rtol=0, atol=3e-7)
    # Fake quantization sums the same products in float32 (exact at these sizes) and rounds
    # activations the same way: largest difference measured 1.5e-7; the bound is a few times it.
    np.testing.assert_allclose(got, decode_step_logits(fake_quant), rtol=0, atol=1e-6)


# (d_in, d_out, group): 3 groups of 32 (odd), one group per channel with d_in 90 (zero-padded to
# 96, whole octs, inside the layout), 5 groups of 64 (odd), 3 of 128; 300 / 130 columns end in
# a padded tile.
W4A8_SHAPES = ((96, 300, 32), (90, 300, 0), (320, 130, 64), (384, 300, 128))


@pytest.mark.parametrize("isa", PATHS + ("avx512vnni", "avx2vnni", "native"))
def test_w4a8_kernel_equals_the_xla_op(isa):
    """int4 x int8 products on each integer path (VNNI vpdpbusd, AVX2 vpmaddubsw or AVX-VNNI's
    256-bit vpdpbusd, portable loops; `native` on a CPU with AMX: the tile unit from 5 rows
    where groups are whole 64-k steps, here all but group 32) against `W4A8Dot`, over every
    row route and slab boundary."""
    _kernels_or_skip(isa)
    for d_in, d_out, group in W4A8_SHAPES:
        weight = Int4Weight(jax.random.normal(jax.random.key(d_in), (d_in, d_out), jnp.float32),
                            group)
        tiled = TiledW4A8Weight(weight)
        packed, scales = tiled.plain()  # the layout round-trips (the XLA route)
        np.testing.assert_array_equal(packed, weight.packed)
        np.testing.assert_array_equal(scales, weight.scales)
        x = _activations(d_in)
        reference = jax.jit(W4A8Dot())(x, weight)
        for rows in ROWS:
            got = jax.jit(NativeW4A8Dot(isa))(x[:rows], tiled)
            # Exact int32 sums per group, then the op's float ops in its order (XLA:CPU adds
            # the groups' terms in group order, as the kernel does): equal bits.
            np.testing.assert_array_equal(got, reference[:rows],
                                          err_msg=f"{isa}, {rows} rows, {d_in}x{d_out} g{group}")


def test_w4a8_batched_decode_matches_the_xla_and_fake_quant_models():
    """A tiny w4a8 model (head too) on the native kernel: its prefill and batched decode step
    against the XLA op's model and against the QAT model's fake quantization. A group size
    that is not whole octs keeps the XLA op."""
    built = _kernels_or_skip("native")
    float_model = Transformer(preset("tiny"), key=jax.random.key(0))
    fake_quant = quantize_for_training(
        float_model, QuantConfig.named("w4a8", group_size=32, targets=WITH_HEAD)).unstacked()
    xla_op = quantize(float_model.unstacked(), "w4a8", 32, WITH_HEAD)
    native = use_native_kernels(xla_op, built.isa, attention=False)
    for linear in (native.blocks[0].mlp.w_down, native.lm_head):
        assert isinstance(linear.op, NativeW4A8Dot)
        assert isinstance(linear.weight, TiledW4A8Weight)
    odd_groups = use_native_kernels(quantize(float_model.unstacked(), "w4a8", 6), built.isa)
    assert isinstance(odd_groups.blocks[0].mlp.w_up.op, W4A8Dot)
    # 8 rows: a 5-token prefill, then one decode step (the batched path).
    tokens = jax.random.randint(jax.random.key(1), (8, 6), 0, 512)
    decode_step_logits = functools.partial(_decode_step_logits, tokens=tokens)
    got = decode_step_logits(native)
    # Each product equals the XLA op's bits (test above); what differs is how XLA fuses the
    # float ops around a custom call (as for w8a8): largest difference measured 3.0e-8 on
    # logits up to ~0.37.
    np.testing.assert_allclose(got, decode_step_logits(xla_op), rtol=0, atol=3e-7)
    # Fake quantization multiplies the same dequantized values in float32 instead of summing
    # integers: largest difference measured 1.0e-7; the bound is a few times it.
    np.testing.assert_allclose(got, decode_step_logits(fake_quant), rtol=0, atol=1e-6)


# (batch, heads, kv_heads, head_dim, slots): head_dim 16 (tiny's) with two query heads per key
# head; one row over 300 slots (split into runs of slots whose partial softmaxes are merged);
# head_dim 20, which no SIMD width divides (the portable loops inside a SIMD build), three rows
# (on 2+ threads also split into runs, the one-slot row's first run empty); head_dim 64 over
# three key heads. Row masks: a prefix, nothing (equal weights over every slot), one slot, then
# random holes.
# (batch, queries per row, heads, kv_heads, head_dim, slots): one query per row as in a decode
# step, several as in a prefill.
ATTENTION_SHAPES = ((4, 1, 4, 2, 16, 40), (1, 1, 4, 4, 64, 300), (3, 1, 6, 3, 20, 70),
                    (5, 1, 6, 3, 64, 70), (3, 5, 4, 2, 16, 40), (4, 7, 6, 3, 64, 70))


CACHE_DTYPES = ("float32", "bfloat16", "int8")


def _cache(k: np.ndarray, v: np.ndarray, dtype: str) -> KVCache:
    """A one-layer cache holding k and v in every slot, stored as `dtype` (int8: quantized per
    slot and head by `KVCache.write`)."""
    batch, slots = k.shape[:2]
    return KVCache.empty(k.shape, dtype).write(
        jnp.asarray(k), jnp.asarray(v),
        jnp.broadcast_to(jnp.arange(slots, dtype=jnp.int32), (batch, slots)))


def _stored_values(cache: KVCache) -> tuple[np.ndarray, np.ndarray]:
    """What the cache holds, in float64: bf16 entries widened (exact), int8 entries times their
    scales (exact in float64)."""
    if not cache.quantized:
        return tuple(np.asarray(a, np.float64) for a in cache.read(jnp.dtype(jnp.float32)))
    return (np.asarray(cache.k, np.float64) * np.asarray(cache.k_scale, np.float64)[..., None],
            np.asarray(cache.v, np.float64) * np.asarray(cache.v_scale, np.float64)[..., None])


def _attention_reference(q, k, v, mask):
    """Each query token's attention in float64 numpy (q[b, s] over row b's cache):
    q.k / sqrt(head_dim) over the visible slots, softmax, weighted sum of values; a query that
    sees no slot weighs every slot equally (as `Attention._attend`, whose masked scores are all
    the same float32 minimum)."""
    batch, seq = q.shape[:2]
    q, mask = q.reshape(batch * seq, *q.shape[2:]), mask.reshape(batch * seq, -1)
    k, v = (np.repeat(np.asarray(a, np.float64), seq, axis=0) for a in (k, v))
    q = np.asarray(q, np.float64)
    groups = q.shape[1] // k.shape[2]
    k, v = np.repeat(k, groups, axis=2), np.repeat(v, groups, axis=2)
    scores = np.einsum("bhd,bthd->bht", q, k) / np.sqrt(q.shape[2])
    sees = mask.any(axis=1)
    scores = np.where(sees[:, None, None], scores, 0.0)
    scores = np.where(mask[:, None, :] | ~sees[:, None, None], scores, -np.inf)
    weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
    weights /= weights.sum(axis=-1, keepdims=True)
    return np.einsum("bht,bthd->bhd", weights, v).reshape(batch, seq, *q.shape[1:])


# Largest difference from the float64 reference on these shapes (outputs up to ~3) per cache
# dtype, measured on the AVX-512 / AVX2 / portable paths: float32 1.6e-6 / 8.7e-7 / 1.4e-6 (the
# kernel before the vector exp and the runs: 1.9e-6); bfloat16 1.3e-6 / 1.6e-6 / 1.7e-6; int8
# 2.8e-6 / 2.8e-6 / 4.0e-6 (an int8 slot's scale is one more rounding on its score and its value
# weight). The bounds are about 3x the largest.
ATTENTION_TOLERANCE = {"float32": 5e-6, "bfloat16": 5e-6, "int8": 1.2e-5}


@pytest.mark.parametrize("cache_dtype", CACHE_DTYPES)
@pytest.mark.parametrize("isa", PATHS)
def test_decode_attention_kernel_matches_a_float64_reference(isa, cache_dtype):
    """The kernel reads the cache as stored (bf16 widened, int8 scaled per slot and head);
    the reference attends over the same stored values in float64."""
    _kernels_or_skip(isa)
    attend = jax.jit(NativeDecodeAttention(isa))
    for shape in ATTENTION_SHAPES:
        batch, seq, heads, kv_heads, head_dim, slots = shape
        rng = np.random.default_rng(slots + seq)
        # Queries 4x a unit normal: scores spread over ~+-30, so exp sees a wide range.
        q = 4 * rng.standard_normal((batch, seq, heads, head_dim), np.float32)
        k, v = rng.standard_normal((2, batch, slots, kv_heads, head_dim), np.float32)
        mask = rng.random((batch, seq, slots)) < 0.7
        # Row 0 sees a long run (a lone row's slots are split into runs over the threads); with
        # several queries, as a prefill's after slots - 10 - seq cached tokens: each sees up to
        # its own position.
        mask[0] = np.arange(slots)[None, :] < slots - 10 - seq + np.arange(1, seq + 1)[:, None]
        mask[1:2] = False
        mask[2:3] = np.arange(slots) == 5
        cache = _cache(k, v, cache_dtype)
        got = attend(q, cache, mask)
        np.testing.assert_allclose(
            got, _attention_reference(q, *_stored_values(cache), mask), rtol=0,
            atol=ATTENTION_TOLERANCE[cache_dtype], err_msg=f"{isa}, {cache_dtype}, {shape}")


@pytest.mark.parametrize("cache_dtype", CACHE_DTYPES)
def test_native_decode_attention_matches_the_xla_attention(cache_dtype):
    """Decode on the native attention, which reads a bf16 or int8 cache in place, against the
    XLA path (the same model without it) on a cache of the same dtype."""
    built = _kernels_or_skip("native")
    float_model = Transformer(preset("tiny"), key=jax.random.key(0)).unstacked()
    native = use_native_kernels(float_model, built.isa)
    assert native.blocks[0].attn.decode_attention is not None
    batch, prompt = 3, 5
    tokens = jax.random.randint(jax.random.key(2), (batch, prompt + 2), 0, 512)
    # Rows at different positions (the mask hides a different part of the cache for each), and
    # one inactive row.
    starts = jnp.array([0, 3, 9], jnp.int32)

    @eqx.filter_jit
    def decode_logits(model):
        cache = model.allocate_cache(batch, 24, cache_dtype)
        positions = starts[:, None] + jnp.arange(prompt + 2, dtype=jnp.int32)[None, :]
        _, cache = model.decode(tokens[:, :prompt], positions[:, :prompt], cache)
        first, cache = model.decode(tokens[:, prompt:prompt + 1], positions[:, prompt:prompt + 1],
                                    cache)
        second, _ = model.decode(tokens[:, prompt + 1:], positions[:, prompt + 1:], cache,
                                 active=jnp.array([True, False, True]))
        return jnp.concatenate([first, second], axis=1)

    # The decode steps call the kernel of this cache dtype on the stored arrays.
    target = {"float32": built.attention_target, "bfloat16": built.attention_bf16_target,
              "int8": built.attention_int8_target}[cache_dtype]
    assert f"custom_call @{target}(" in decode_logits.lower(native).as_text()
    # The same arithmetic summed in another order through two layers: largest difference
    # measured 9e-8 (float32 and int8 caches) and 1.2e-7 (bfloat16) on logits up to ~0.39; the
    # bound is a few times that.
    np.testing.assert_allclose(decode_logits(native), decode_logits(float_model), rtol=0,
                               atol=5e-7)
