"""The generation engine against independent references: greedy decoding by recomputing the full
forward pass each step, each prompt generated alone, NumPy top-k/top-p."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import infer.generate as generate_module
from hpllm.config import preset
from hpllm.errors import UserError
from hpllm.model import Transformer
from infer.detokenizer import Detokenizer
from infer.generate import Generator, PromptTooLongError, bucket_length
from infer.loading import quantize
from infer.sampling import (
    CANDIDATES,
    RowSampling,
    SamplingConfig,
    argmax_rows,
    draw_rows,
    filter_logits,
    filter_rows,
    sample,
    sample_rows,
)

TINY = preset("tiny")


@pytest.fixture(scope="module")
def model() -> Transformer:
    return Transformer(TINY, key=jax.random.key(0))


def greedy_by_recomputation(model: Transformer, prompt: list[int], n: int,
                            stop_ids: tuple[int, ...] = ()) -> list[int]:
    """The reference: run the training forward over the whole sequence for every new token.

    The sequence is zero-padded to a fixed length so that one compiled forward serves every
    step; the forward is causal, so the padding after the last real token changes nothing.
    """
    forward = eqx.filter_jit(model)
    width = len(prompt) + n
    sequence = list(prompt)
    for _ in range(n):
        padded = jnp.asarray([sequence + [0] * (width - len(sequence))], jnp.int32)
        token = int(jnp.argmax(forward(padded)[0, len(sequence) - 1]))
        if token in stop_ids:
            break
        sequence.append(token)
    return sequence[len(prompt):]


def _prompt(seed: int, length: int) -> list[int]:
    return np.random.default_rng(seed).integers(3, TINY.vocab_size, length).tolist()


@pytest.mark.parametrize("layout", ["unrolled", "scanned"])
def test_greedy_with_cache_equals_recomputation(model, layout):
    prompt = _prompt(0, 11)
    # The float32 cache (the library's default, pinned): bit-exact against the full forward.
    generator = Generator(model, chunk_size=5, layout=layout, kv_cache_dtype="float32")
    got = generator.generate([prompt], max_new_tokens=17)[0]
    assert got == greedy_by_recomputation(model, prompt, 17)


@pytest.mark.parametrize(("scheme", "layout"), [("int8", "unrolled"), ("int4", "unrolled"),
                                               ("w4a8", "unrolled"), ("w4a8", "scanned")])
def test_greedy_with_cache_equals_recomputation_for_quantized_weights(model, scheme, layout):
    from infer.kernels import (
        NativeAmxInt8Dot,
        NativeInt4Dot,
        NativeInt8Dot,
        NativeVnniInt4Dot,
        NativeVnniInt8Dot,
        NativeW4A8Dot,
        available,
    )

    quantized = quantize(model, scheme, group_size=32)
    prompt = _prompt(1, 9)
    generator = Generator(quantized, chunk_size=4, layout=layout, kv_cache_dtype="float32")
    if available():  # the blocks run the native kernels, unrolled or scanned
        # int8: the tile unit's op where the build has AMX, VNNI's on AMD CPUs with AVX-512
        # VNNI, else the FMA kernels' op
        native = {"int8": (NativeInt8Dot, NativeAmxInt8Dot, NativeVnniInt8Dot),
                  "int4": (NativeInt4Dot, NativeVnniInt4Dot),
                  "w4a8": NativeW4A8Dot}[scheme]
        blocks = generator.model.blocks
        ops = [block.mlp.w_up.op for block in blocks] if isinstance(blocks, tuple) else [
            blocks.mlp.w_up.op]
        assert all(isinstance(op, native) for op in ops)
    got = generator.generate([prompt], max_new_tokens=12)[0]
    assert got == greedy_by_recomputation(quantized, prompt, 12)


def _cache_row(cache, row: int) -> list[np.ndarray]:
    """Copies of row `row` of every cache array (batch is axis 1 when layers are stacked)."""
    axis = 0 if isinstance(cache, tuple) else 1
    return [np.take(np.asarray(leaf), row, axis=axis) for leaf in jax.tree.leaves(cache)]


@pytest.mark.parametrize("layout", ["unrolled", "scanned"])
def test_finished_rows_never_write_into_the_cache_again(model, layout):
    # Row 0 fills the cache to its last slot, row 1 is stopped from the host (as a stop string
    # does), row 2 runs on for several more chunks.
    prompts = [_prompt(9, TINY.max_seq_len - 8), _prompt(10, 5), _prompt(11, 5)]
    generation = Generator(model, chunk_size=2, layout=layout).start(prompts,
                                                                      max_new_tokens=30)
    finished_at: dict[int, list[np.ndarray]] = {}
    chunks_after = 0
    for chunk, _ in enumerate(generation):
        if chunk == 1:
            generation.stop_row(1)
        done = jax.device_get(generation.state.done).tolist()
        for row in (0, 1):
            if done[row] and row not in finished_at:
                finished_at[row] = _cache_row(generation.state.cache, row)
        chunks_after += len(finished_at) == 2
    assert chunks_after > 3 and len(generation.tokens[2]) == 30
    assert int(generation.state.positions[0]) == TINY.max_seq_len  # at the end of the cache
    for row, snapshot in finished_at.items():
        for now, then in zip(_cache_row(generation.state.cache, row), snapshot, strict=True):
            np.testing.assert_array_equal(now, then)


def test_batch_of_different_lengths_equals_each_alone(model):
    prompts = [_prompt(2, 3), _prompt(3, 20), _prompt(4, 9)]
    generator = Generator(model, chunk_size=6)
    batched = generator.generate(prompts, max_new_tokens=14)
    alone = [generator.generate([p], max_new_tokens=14)[0] for p in prompts]
    assert batched == alone
    assert all(len(tokens) == 14 for tokens in batched)


def test_rows_stop_at_their_own_end_token(model):
    prompts = [_prompt(5, 6), _prompt(6, 6)]
    reference = greedy_by_recomputation(model, prompts[0], 10)
    stop = reference[4]  # row 0 stops before its 5th token; row 1 likely runs on
    generator = Generator(model, stop_ids=[stop], chunk_size=3, kv_cache_dtype="float32")
    got = generator.generate(prompts, max_new_tokens=10)
    assert got[0] == reference[:reference.index(stop)]
    assert got[1] == greedy_by_recomputation(model, prompts[1], 10, stop_ids=(stop,))


def test_decode_and_prefill_trace_once_across_chunks_and_lengths_in_a_bucket(
        model, monkeypatch):
    counted_decode = eqx.filter_jit(
        eqx.debug.assert_max_traces(generate_module.decode_chunk.__wrapped__, max_traces=1),
        donate="all-except-first")
    counted_prefill = eqx.filter_jit(
        eqx.debug.assert_max_traces(generate_module.prefill.__wrapped__, max_traces=1),
        donate="all-except-first")
    monkeypatch.setattr(generate_module, "decode_chunk", counted_decode)
    monkeypatch.setattr(generate_module, "prefill", counted_prefill)
    generator = Generator(model, chunk_size=4)
    for length in (17, 20, 31, 32):  # one bucket (32), several chunks each
        assert bucket_length(length, TINY.max_seq_len) == 32
        tokens = generator.generate([_prompt(length, length)], max_new_tokens=13)[0]
        assert len(tokens) == 13


def test_prompt_longer_than_the_context_is_an_error(model):
    with pytest.raises(PromptTooLongError, match="does not fit"):
        Generator(model).start([[1] * (TINY.max_seq_len + 1)], max_new_tokens=1)


def test_generation_stops_at_the_end_of_the_context(model):
    prompt = _prompt(7, TINY.max_seq_len - 3)
    got = Generator(model, kv_cache_dtype="float32").generate([prompt], max_new_tokens=50)[0]
    # 3 free slots hold 3 tokens fed back; the token sampled after the last one is emitted too.
    assert got == greedy_by_recomputation(model, prompt, 4)


def test_sampling_is_reproducible_with_a_seed(model):
    generator = Generator(model, chunk_size=4)
    config = SamplingConfig(temperature=1.0, top_k=50, top_p=0.9)
    runs = [generator.generate([_prompt(8, 5)], max_new_tokens=12, sampling=config, seed=s)
            for s in (1, 1, 2)]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_top_k_and_top_p_match_numpy_reference():
    logits = jax.random.normal(jax.random.key(1), (3, 40), jnp.float32) * 3
    config = SamplingConfig(temperature=0.7, top_k=10, top_p=0.8)
    kept = np.isfinite(np.asarray(filter_logits(logits, config)))
    for row, kept_row in zip(np.asarray(logits, np.float64) / 0.7, kept, strict=True):
        order = np.argsort(-row)[:10]
        probs = np.exp(row[order] - row[order].max())
        probs /= probs.sum()
        n_keep = int(np.searchsorted(np.cumsum(probs), 0.8) + 1)  # smallest set reaching 0.8
        np.testing.assert_array_equal(np.flatnonzero(kept_row), np.sort(order[:n_keep]))


def _kept_by_the_rule(logits, temperature, top_k, top_p):
    """NumPy, float64: which tokens `filter_rows` keeps in one row, by the documented rule."""
    row = np.asarray(logits, np.float32) / np.float32(temperature if temperature > 0 else 1.0)
    row = row.astype(np.float64)
    vocab = row.size
    ordered = np.sort(row)[::-1]
    in_k = np.arange(vocab) < (top_k if 0 < top_k < vocab else vocab)
    threshold = ordered[top_k - 1] if 0 < top_k < vocab else -np.inf
    if top_p < 1:
        probs = np.where(in_k, np.exp(ordered - ordered[0]), 0.0)
        probs /= probs.sum()
        before = np.cumsum(probs) - probs  # probability of the tokens ranked before
        last = max(int(np.sum(before < top_p)) - 1, 0)
        # The float32 code and this reference must not straddle top_p (float32 sums of <= 1000
        # terms are off by ~1e-6 relative): a check of the test data, not of the code.
        near = before[last:last + 2]
        assert np.all(np.abs(near - top_p) > 1e-5 * np.maximum(near, top_p))
        threshold = max(threshold, ordered[last])
    return row >= threshold


def test_filter_rows_matches_the_rule_inside_and_past_the_candidates():
    vocab = 1000
    assert vocab > CANDIDATES
    rng = np.random.default_rng(5)
    peaked = rng.standard_normal((8, vocab)) * 2
    peaked[:, rng.choice(vocab, 40, replace=False)] += 9  # the nucleus in the candidates
    peaked[3] = np.round(peaked[3])  # many ties, at the top-k and nucleus boundaries too
    # (temperature, top_k, top_p); temperature 0 is greedy, filtered at temperature 1.
    inside = [(1.0, 0, 0.9), (0.7, 50, 1.0), (2.0, 0, 0.5), (1.0, 7, 0.8), (0.0, 3, 0.3),
              (1.3, CANDIDATES, 0.95), (1.0, 0, 1e-6), (0.5, vocab, 0.99)]
    # Past the candidates (searched): a flat row whose 0.9-nucleus spans hundreds of tokens,
    # a top_k; then (sorted) a top_k with a top_p.
    flat = rng.standard_normal((5, vocab))
    flat[2:4] = np.round(flat[2:4] * 4)  # ties at the searched k-th and nucleus boundary
    past = [(1.0, 0, 0.9), (1.0, CANDIDATES + 70, 1.0), (1.0, CANDIDATES + 70, 1.0),
            (1.0, 0, 0.9), (0.9, CANDIDATES + 9, 0.95)]
    logits = np.concatenate([peaked, flat]).astype(np.float32)
    settings = inside + past
    for chosen in (range(len(inside)), range(len(settings)), [0, 3, 8, 10, 11], [9, 1, 12]):
        chosen = list(chosen)
        rows = RowSampling(
            temperature=jnp.asarray([settings[i][0] for i in chosen], jnp.float32),
            top_k=jnp.asarray([settings[i][1] for i in chosen], jnp.int32),
            top_p=jnp.asarray([settings[i][2] for i in chosen], jnp.float32))
        got = np.isfinite(np.asarray(jax.jit(filter_rows)(jnp.asarray(logits[chosen]), rows)))
        for row, i in zip(got, chosen, strict=True):
            np.testing.assert_array_equal(row, _kept_by_the_rule(logits[i], *settings[i]),
                                          err_msg=f"row {i} {settings[i]}")


def test_draws_follow_the_kept_tokens_probabilities():
    vocab, draws = 300, 20000
    logits = np.full(vocab, -np.inf, np.float32)
    # Kept tokens in several draw blocks, the last block padded; token 250 is cut by top_k 5.
    tokens = np.asarray([0, 5, 127, 128, 299, 250])
    logits[tokens] = [1.0, 0.0, 2.0, -1.0, 0.5, -3.0]
    want = np.exp(logits[tokens[:5]].astype(np.float64))
    want /= want.sum()
    rows = RowSampling(temperature=jnp.ones(draws, jnp.float32),
                       top_k=jnp.full(draws, 5, jnp.int32), top_p=jnp.ones(draws, jnp.float32))
    keys = jax.random.split(jax.random.key(7), draws)
    got = np.asarray(jax.jit(sample_rows)(jnp.broadcast_to(logits, (draws, vocab)), keys, rows))
    counts = np.bincount(got, minlength=vocab)
    assert counts.sum() == counts[tokens[:5]].sum()  # masked and cut tokens never drawn
    # Each count is Binomial(draws, p): beyond 6 standard deviations with probability ~2e-9
    # (normal approximation, n p >= 1000 here), so the test fails by chance ~1e-8 of the time.
    sigma = np.sqrt(draws * want * (1 - want))
    assert np.all(np.abs(counts[tokens[:5]] - draws * want) < 6 * sigma), (counts[tokens], want)
    one_hot = np.full((3, vocab), -np.inf, np.float32)
    one_hot[[0, 1, 2], [299, 0, 140]] = 3.0
    one_hot[2, :140] = -1e4  # finite, but exp underflows to a weight of 0
    rows3 = RowSampling(jnp.ones(3, jnp.float32), jnp.zeros(3, jnp.int32),
                        jnp.ones(3, jnp.float32))
    for seed in range(3):
        keys3 = jax.random.split(jax.random.key(8 + seed), 3)
        np.testing.assert_array_equal(sample_rows(jnp.asarray(one_hot), keys3, rows3),
                                      [299, 0, 140])


def test_the_draw_never_lands_on_a_weightless_token_at_the_ends():
    weights = np.zeros((4, 300), np.float32)
    weights[:, [3, 200]] = [1.0, 1e-3]
    weights[2:, 200] = 0.0  # the only weight in the first block, nothing after it
    below_one = np.nextafter(np.float32(1), np.float32(0))
    got = draw_rows(jnp.asarray(weights), jnp.asarray([0.0, below_one, 0.0, below_one]))
    np.testing.assert_array_equal(got, [3, 200, 3, 3])


def test_a_rows_draw_does_not_depend_on_the_other_rows():
    rng = np.random.default_rng(3)
    logits = (rng.standard_normal((4, 1000)) * 2).astype(np.float32)
    logits[:3, :20] += 8  # the last row is flat: its nucleus makes the whole batch sort
    rows = RowSampling(temperature=jnp.asarray([1.0, 0.8, 0.0, 1.0], jnp.float32),
                       top_k=jnp.asarray([0, 50, 0, 0], jnp.int32),
                       top_p=jnp.asarray([0.9, 1.0, 1.0, 0.9], jnp.float32))
    keys = jax.random.split(jax.random.key(4), 4)
    sample_jit = jax.jit(sample_rows)
    together = np.asarray(sample_jit(jnp.asarray(logits), keys, rows))
    for i in range(4):
        alone = sample_jit(jnp.asarray(logits[i:i + 1]), keys[i:i + 1],
                           jax.tree.map(lambda a, i=i: a[i:i + 1], rows))
        assert int(alone[0]) == together[i], i
    assert together[2] == np.argmax(logits[2])


@pytest.mark.parametrize("vocab", [5, 128, 300, 32000])
def test_argmax_rows_is_numpys_argmax(vocab):
    # Ties take the first index and a NaN counts as the largest, as in NumPy and jnp.argmax.
    rng = np.random.default_rng(vocab)
    logits = rng.standard_normal((8, vocab)).astype(np.float32)
    logits[1] = 1.0  # all equal
    logits[2, [vocab // 3, vocab - 1]] = 9.0  # a tie, maybe across blocks
    logits[3, [vocab // 2, vocab - 1]] = np.nan
    logits[4] = -np.inf
    logits[5, -1] = 50.0  # the largest in the last, padded block
    logits[6] = np.nan
    # Without the NaN rows the two-level search answers; with them, jnp.argmax.
    for rows in ([0, 1, 2, 4, 5, 7], slice(None)):
        got = jax.jit(argmax_rows)(jnp.asarray(logits[rows]))
        assert got.dtype == jnp.int32
        np.testing.assert_array_equal(np.asarray(got), np.argmax(logits[rows], axis=-1))


def test_top_k_one_and_temperature_zero_are_greedy():
    logits = jax.random.normal(jax.random.key(2), (4, 30), jnp.float32)
    want = np.argmax(np.asarray(logits), axis=-1)
    for config in (SamplingConfig(top_k=1), SamplingConfig(temperature=0.0),
                   SamplingConfig(top_p=1e-6)):
        np.testing.assert_array_equal(sample(logits, jax.random.key(3), config), want)


@pytest.mark.parametrize("bad", [dict(top_p=0.0), dict(top_p=1.5), dict(temperature=-1.0),
                                 dict(top_k=-2)])
def test_invalid_sampling_settings_are_rejected(bad):
    with pytest.raises(UserError):
        SamplingConfig(**bad)


def test_detokenizer_holds_back_partial_characters_and_cuts_at_stop_strings():
    pieces = ["Hel", "lo", " wo", "rld", "STOP", " more"]
    stream = Detokenizer(lambda ids: "".join(pieces[i] for i in ids), stop_strings=["STOP"])
    out = "".join(stream.push([i]) for i in range(len(pieces))) + stream.finish()
    assert out == "Hello world" and stream.stopped

    utf8 = "é".encode()
    stream = Detokenizer(lambda ids: bytes(utf8[i] for i in ids).decode("utf-8", "replace"))
    assert stream.push([0]) == ""  # half a character waits for the rest
    assert stream.push([1]) == "é"


@pytest.mark.parametrize("scheme", ["int8", "int4", "bf16"])
@pytest.mark.parametrize("shape", [(1, 96), (3, 1, 96), (13, 96), (40, 96)])
def test_native_kernels_match_the_xla_ops(shape, scheme):
    from hpllm.linear import FloatDot
    from hpllm.quant.weight_only import (
        Int4Weight,
        Int4WeightOnlyDot,
        Int8Weight,
        Int8WeightOnlyDot,
    )
    from infer.kernels import (
        NativeBf16Dot,
        NativeInt4Dot,
        NativeInt8Dot,
        TiledBf16Weight,
        TiledInt4Weight,
        TiledInt8Weight,
        available,
    )

    if not available():
        pytest.skip("no C++ compiler: the XLA ops are used instead")
    # 300 output columns: two whole 128-column tiles and a padded one.
    w = jax.random.normal(jax.random.key(0), (96, 300), jnp.float32)
    weight, tiled, native, reference = {
        "int8": lambda: (Int8Weight(w), TiledInt8Weight(Int8Weight(w)), NativeInt8Dot(),
                         Int8WeightOnlyDot()),
        "int4": lambda: (Int4Weight(w, 32), TiledInt4Weight(Int4Weight(w, 32)), NativeInt4Dot(),
                         Int4WeightOnlyDot()),
        "bf16": lambda: (w.astype(jnp.bfloat16), TiledBf16Weight(w.astype(jnp.bfloat16)),
                         NativeBf16Dot(), FloatDot()),
    }[scheme]()
    x = jax.random.normal(jax.random.key(1), shape, jnp.float32)
    got = jax.jit(lambda x: native(x, tiled))(x)
    # Same products of exactly representable values in float32, summed in another order (and
    # for int4 scaled per group instead of per weight): outputs are ~10, float32 rounding over
    # 96 terms moves them by ~1e-6 relative, so 1e-4 absolute leaves a wide margin.
    np.testing.assert_allclose(got, reference(x, weight), rtol=1e-5, atol=1e-4)
    # bf16 activations take the XLA op on the untiled weight: exactly the reference.
    x16 = x.astype(jnp.bfloat16)
    np.testing.assert_array_equal(native(x16, tiled), reference(x16, weight))


def test_tiled_layout_round_trips_with_layer_axes():
    from infer.kernels import TILE, tile_columns, untile_columns

    values = jnp.arange(2 * 5 * 300, dtype=jnp.int32).reshape(2, 5, 300)
    tiled = tile_columns(values)
    assert tiled.shape == (2, 3, 5, TILE)
    # Tile t holds columns t*TILE..(t+1)*TILE of every row, contiguously.
    np.testing.assert_array_equal(tiled[1, 1, 4], values[1, 4, TILE:2 * TILE])
    np.testing.assert_array_equal(untile_columns(tiled, 300), values)
