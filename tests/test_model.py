import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxtyping import TypeCheckError

from hpllm.config import preset
from hpllm.model import RMSNorm, Transformer, apply_rope, rope_angles
from hpllm.quant import quantize_weights

TINY = preset("tiny")


def _tokens(key, batch, seq, vocab=TINY.vocab_size):
    return jax.random.randint(key, (batch, seq), 0, vocab, dtype=jnp.int32)


def _positions(batch, start, length):
    return jnp.broadcast_to(jnp.arange(start, start + length, dtype=jnp.int32), (batch, length))


def test_wrong_shape_is_a_jaxtyping_error(key):
    norm = RMSNorm(8, 1e-5)
    with pytest.raises(TypeCheckError):
        norm(jnp.ones((3, 7), jnp.int32))  # activations must be floating point
    model = Transformer(TINY, key=key)
    with pytest.raises(TypeCheckError):
        model(jnp.ones((2, 5), jnp.float32))  # tokens must be integers
    with pytest.raises(TypeCheckError):
        model(jnp.ones((2, 5), jnp.int32), segment_ids=jnp.ones((2, 6), jnp.int32))


def test_rope_matches_numpy_complex_reference(key):
    head_dim, theta = 16, 10_000.0
    x = jax.random.normal(key, (2, 5, 3, head_dim), jnp.float32)
    positions = jnp.array([[0, 1, 2, 3, 4], [7, 8, 9, 10, 11]], jnp.int32)
    got = np.asarray(apply_rope(x, rope_angles(positions, head_dim, theta)))

    # Reference: each pair (x[i], x[i + d/2]) is one complex number rotated by p * theta^(-2i/d).
    xn = np.asarray(x, np.float64)
    half = head_dim // 2
    z = xn[..., :half] + 1j * xn[..., half:]
    freqs = theta ** (-np.arange(half) * 2.0 / head_dim)
    rotation = np.exp(1j * np.asarray(positions)[:, :, None, None] * freqs)
    rotated = z * rotation
    want = np.concatenate([rotated.real, rotated.imag], axis=-1)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_rope_scores_depend_only_on_relative_position(key):
    q, k = jax.random.normal(key, (2, 1, 1, 1, 16), jnp.float32)

    def score(pq, pk):
        rq = apply_rope(q, rope_angles(jnp.array([[pq]], jnp.int32), 16, 10_000.0))
        rk = apply_rope(k, rope_angles(jnp.array([[pk]], jnp.int32), 16, 10_000.0))
        return jnp.sum(rq * rk)

    np.testing.assert_allclose(score(3, 1), score(10, 8), rtol=1e-5)


def test_causality(key):
    model = Transformer(TINY, key=key)
    tokens = _tokens(key, 2, 12)
    changed = tokens.at[:, 7].set((tokens[:, 7] + 1) % TINY.vocab_size)
    before, after = model(tokens), model(changed)
    np.testing.assert_array_equal(before[:, :7], after[:, :7])
    assert not np.allclose(before[:, 7:], after[:, 7:])


def test_segment_ids_block_attention_across_documents(key):
    model = Transformer(TINY, key=key)
    first, second = _tokens(key, 1, 5), _tokens(jax.random.key(1), 1, 6)
    packed = jnp.concatenate([first, second], axis=1)
    segments = jnp.array([[0] * 5 + [1] * 6], jnp.int32)
    logits = model(packed, segment_ids=segments)
    # The second document alone; RoPE is relative, so its offset in the window does not matter.
    np.testing.assert_allclose(logits[:, 5:], model(second), atol=1e-5)
    np.testing.assert_allclose(logits[:, :5], model(first), atol=1e-5)


@eqx.filter_jit
def _decode(model: Transformer, tokens, positions, cache, **kwargs):
    """`model.decode`, compiled once per shape (eager calls would retrace every layer)."""
    return model.decode(tokens, positions, cache, **kwargs)


def _decode_one_token_at_a_time(model: Transformer, tokens, prefill: int, max_len: int,
                                cache_dtype: str = "float32"):
    """Prefill `tokens[:, :prefill]`, then decode the rest one token at a time: the logits of
    every position, as the decode path computes them."""
    batch, seq = tokens.shape
    cache = model.allocate_cache(batch, max_len, cache_dtype)
    logits, cache = _decode(model, tokens[:, :prefill], _positions(batch, 0, prefill), cache)
    steps = [logits]
    for t in range(prefill, seq):
        logits, cache = _decode(model, tokens[:, t:t + 1], _positions(batch, t, 1), cache)
        steps.append(logits)
    return jnp.concatenate(steps, axis=1)


def _in_layout(model: Transformer, layout: str) -> Transformer:
    return model.unstacked() if layout == "unstacked" else model


def _leaves(tree) -> list[np.ndarray]:
    return [np.asarray(leaf) for leaf in jax.tree.leaves(tree)]


def test_layout_conversion_round_trips_bit_identically(key):
    model = quantize_weights(Transformer(TINY, key=key), "int4", group_size=32)
    unstacked = model.unstacked()
    assert model.is_stacked and not unstacked.is_stacked
    assert len(unstacked.blocks) == TINY.n_layers
    for layer, block in enumerate(unstacked.blocks):  # layer i is slice i of every leaf
        for got, stacked_leaf in zip(_leaves(block), _leaves(model.blocks), strict=True):
            np.testing.assert_array_equal(got, stacked_leaf[layer])
    again = unstacked.stacked()
    assert jax.tree.structure(again) == jax.tree.structure(model)
    for got, want in zip(_leaves(again), _leaves(model), strict=True):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)
    assert unstacked.unstacked() is unstacked and model.stacked() is model


def test_training_forward_is_the_same_in_both_layouts(key):
    model = Transformer(TINY, key=key)
    tokens = _tokens(key, 2, 12)
    segments = jnp.array([[0] * 5 + [1] * 7, [0] * 12], jnp.int32)
    # Same operations, scanned or unrolled: measured max difference 0 to 1e-7 (logits ~0.1).
    np.testing.assert_allclose(model.unstacked()(tokens, segments), model(tokens, segments),
                               atol=1e-6, rtol=0)


# Every head grouping and batch in the layout that decoding uses; the stacked one once (the
# blocks' code is the same, only the layer loop differs).
@pytest.mark.parametrize("n_kv_heads, batch, layout", [
    *[(n_kv_heads, batch, "unstacked") for n_kv_heads in (1, 2, 4) for batch in (1, 3)],
    (2, 3, "stacked"),
])
def test_incremental_decode_equals_full_forward(key, n_kv_heads, batch, layout):
    cfg = TINY.replace(n_kv_heads=n_kv_heads)
    model = Transformer(cfg, key=key)
    tokens = _tokens(key, batch, 10)
    incremental = _decode_one_token_at_a_time(_in_layout(model, layout), tokens, 4, max_len=16)
    np.testing.assert_allclose(incremental, model(tokens), atol=1e-5, rtol=0)


# The production decode (unrolled layers, prefill then one token per call) against the training
# forward, per token. The LM head is scaled up 10x so the logits have unit spread (at init they
# have ~0.1) and the errors are measured at the scale of a trained model's. Tolerances are ~5x
# the largest error measured over init seeds 0-5 (batch 3, 24 tokens, 8 of them prefilled):
# - float32: 1.4e-6 to 1.9e-6 (summation order only);
# - int8 KV cache (absmax per token and head): 0.010 to 0.017 against the float32 forward;
# - bfloat16 compute, bfloat16 cache, against the bfloat16 forward: 0.023 to 0.031, one bf16
#   rounding step of the largest logits (|logit| in [2, 4) rounds in steps of 1/64 to 1/32).
@pytest.mark.parametrize("compute_dtype, cache_dtype, tolerance", [
    ("float32", "float32", 1e-5),
    ("float32", "int8", 0.08),
    ("bfloat16", "bfloat16", 0.15),
])
def test_production_decode_matches_training_forward_per_token(key, compute_dtype, cache_dtype,
                                                              tolerance):
    cfg = TINY.replace(compute_dtype=compute_dtype)
    model = Transformer(cfg, key=key)
    model = eqx.tree_at(lambda m: m.lm_head.weight, model, model.lm_head.weight * 10)
    tokens = _tokens(jax.random.key(100), 3, 24)
    reference = model(tokens)
    assert float(jnp.std(reference)) > 0.5  # the scale the tolerances were measured at
    decoded = _decode_one_token_at_a_time(model.unstacked(), tokens, 8, max_len=32,
                                          cache_dtype=cache_dtype)
    assert decoded.dtype == reference.dtype == jnp.float32
    np.testing.assert_allclose(decoded, reference, atol=tolerance, rtol=0)


def _layer_rows(cache) -> list[np.ndarray]:
    """Every array of every layer's cache, batch first, whichever the layout."""
    layers = cache if isinstance(cache, tuple) else [
        jax.tree.map(lambda x, i=i: x[i], cache) for i in range(cache.k.shape[0])]
    return [leaf for layer in layers for leaf in _leaves(layer)]


@pytest.mark.parametrize("layout", ["stacked", "unstacked"])
@pytest.mark.parametrize("cache_dtype", ["float32", "int8"])
def test_finished_rows_and_positions_past_the_cache_write_nothing(key, layout, cache_dtype):
    model = _in_layout(Transformer(TINY, key=key), layout)
    max_len = 8
    cache = model.allocate_cache(2, max_len, cache_dtype)
    _, cache = _decode(model, _tokens(key, 2, max_len), _positions(2, 0, max_len), cache)
    full = _layer_rows(cache)
    step = jnp.array([[7], [9]], jnp.int32)
    # Row 0 has finished: nothing of it changes. Row 1 rewrites its slot 5 and nothing else.
    _, after = _decode(model, step, jnp.array([[5], [5]], jnp.int32), cache,
                       active=jnp.array([False, True]))
    for before, now in zip(full, _layer_rows(after), strict=True):
        np.testing.assert_array_equal(now[0], before[0])
        np.testing.assert_array_equal(np.delete(now[1], 5, axis=0),
                                      np.delete(before[1], 5, axis=0))
        assert np.any(now[1, 5] != before[1, 5])
    # A position at the end of the cache writes nowhere (no clamping onto the last slot).
    _, after = _decode(model, step, jnp.full((2, 1), max_len, jnp.int32), cache)
    for before, now in zip(full, _layer_rows(after), strict=True):
        np.testing.assert_array_equal(now, before)


@pytest.mark.parametrize("layout", ["stacked", "unstacked"])
def test_rows_at_different_positions_decode_independently(key, layout):
    """Right-padded prompts of different lengths: each row continues from its own length."""
    model = Transformer(TINY, key=key)
    decoder = _in_layout(model, layout)
    a, b = _tokens(key, 1, 6), _tokens(jax.random.key(3), 1, 6)
    cache = decoder.allocate_cache(2, max_len=16)
    _, cache = _decode(decoder, jnp.concatenate([a, b]), _positions(2, 0, 6), cache)
    # Row 0 continues at position 6, row 1 (whose prompt was only 3 tokens) at position 3.
    step_tokens = jnp.array([[5], [9]], jnp.int32)
    logits, _ = _decode(decoder, step_tokens, jnp.array([[6], [3]], jnp.int32), cache)
    row0 = model(jnp.concatenate([a, step_tokens[:1]], axis=1))[:, -1]
    row1 = model(jnp.concatenate([b[:, :3], step_tokens[1:]], axis=1))[:, -1]
    np.testing.assert_allclose(logits[:, 0], jnp.concatenate([row0, row1]), atol=1e-5)


def test_logits_at_scores_one_token_per_row(key):
    model = Transformer(TINY, key=key).unstacked()
    tokens = _tokens(key, 2, 6)
    everything, _ = model.decode(tokens, _positions(2, 0, 6), model.allocate_cache(2, 8))
    picked, _ = model.decode(tokens, _positions(2, 0, 6), model.allocate_cache(2, 8),
                             logits_at=jnp.array([5, 2], jnp.int32))
    assert picked.shape == (2, 1, TINY.vocab_size)
    np.testing.assert_allclose(picked[:, 0], everything[jnp.arange(2), jnp.array([5, 2])],
                               atol=1e-6, rtol=0)


def test_bfloat16_compute_policy(key):
    cfg = TINY.replace(compute_dtype="bfloat16")
    model = Transformer(cfg, key=key)
    tokens = _tokens(key, 2, 8)
    logits = model(tokens)
    assert logits.dtype == jnp.float32
    assert model.embed.dtype == jnp.float32  # parameters stay float32
    reference = Transformer(TINY, key=key)(tokens)
    np.testing.assert_allclose(logits, reference, atol=0.1)


@pytest.mark.parametrize("layout", ["stacked", "unstacked"])
def test_decode_step_compiles_once(key, layout):
    model = _in_layout(Transformer(TINY, key=key), layout)
    cache = model.allocate_cache(2, max_len=32)

    @eqx.filter_jit(donate="all-except-first")
    @eqx.debug.assert_max_traces(max_traces=1)
    def step(model, tokens, positions, cache):
        logits, cache = model.decode(tokens, positions, cache)
        return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), cache

    tokens = jnp.zeros((2,), jnp.int32)
    for t in range(20):
        tokens, cache = step(model, tokens[:, None], _positions(2, t, 1), cache)
    keys = np.asarray(cache[0].k if layout == "unstacked" else cache.k[0])
    assert np.all(np.any(keys[:, :20] != 0, axis=(-2, -1)))  # every step wrote its own slot
    assert not np.any(keys[:, 20:])
