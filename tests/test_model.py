import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxtyping import TypeCheckError

from hpllm.config import preset
from hpllm.kvcache import KVCache
from hpllm.model import RMSNorm, Transformer, apply_rope, rope_angles

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


@pytest.mark.parametrize("n_kv_heads", [1, 2, 4])
@pytest.mark.parametrize("batch", [1, 3])
def test_incremental_decode_equals_full_forward(key, n_kv_heads, batch):
    cfg = TINY.replace(n_kv_heads=n_kv_heads)
    model = Transformer(cfg, key=key)
    seq, prefill = 10, 4
    tokens = _tokens(key, batch, seq)
    full = model(tokens)

    cache = KVCache.allocate(cfg, batch, max_len=16)
    logits, cache = model.decode(tokens[:, :prefill], _positions(batch, 0, prefill), cache)
    steps = [logits]
    for t in range(prefill, seq):
        logits, cache = model.decode(tokens[:, t:t + 1], _positions(batch, t, 1), cache)
        steps.append(logits)
    incremental = jnp.concatenate(steps, axis=1)
    np.testing.assert_allclose(incremental, full, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(cache.lengths, jnp.full((batch,), seq))


def test_rows_at_different_positions_decode_independently(key):
    """Right-padded prompts of different lengths: each row continues from its own length."""
    model = Transformer(TINY, key=key)
    a, b = _tokens(key, 1, 6), _tokens(jax.random.key(3), 1, 6)
    cache = KVCache.allocate(TINY, 2, max_len=16)
    _, cache = model.decode(jnp.concatenate([a, b]), _positions(2, 0, 6), cache)
    # Row 0 continues at position 6, row 1 (whose prompt was only 3 tokens) at position 3.
    step_tokens = jnp.array([[5], [9]], jnp.int32)
    logits, _ = model.decode(step_tokens, jnp.array([[6], [3]], jnp.int32), cache)
    row0 = model(jnp.concatenate([a, step_tokens[:1]], axis=1))[:, -1]
    row1 = model(jnp.concatenate([b[:, :3], step_tokens[1:]], axis=1))[:, -1]
    np.testing.assert_allclose(logits[:, 0], jnp.concatenate([row0, row1]), atol=1e-5)


def test_int8_kv_cache_stays_close_to_float(key):
    model = Transformer(TINY, key=key)
    tokens = _tokens(key, 2, 8)
    results = {}
    for dtype in ("float32", "int8"):
        cache = KVCache.allocate(TINY, 2, max_len=8, dtype=dtype)
        results[dtype], _ = model.decode(tokens, _positions(2, 0, 8), cache)
    # Per-token-per-head int8 keeps each k/v element within amax/254; through softmax and two
    # layers that moves logits (std ~1) by well under 0.05.
    np.testing.assert_allclose(results["int8"], results["float32"], atol=0.05)


def test_bfloat16_compute_policy(key):
    cfg = TINY.replace(compute_dtype="bfloat16")
    model = Transformer(cfg, key=key)
    tokens = _tokens(key, 2, 8)
    logits = model(tokens)
    assert logits.dtype == jnp.float32
    assert model.embed.dtype == jnp.float32  # parameters stay float32
    reference = Transformer(TINY, key=key)(tokens)
    np.testing.assert_allclose(logits, reference, atol=0.1)


def test_decode_step_compiles_once(key):
    model = Transformer(TINY, key=key)
    cache = KVCache.allocate(TINY, 2, max_len=32)

    @eqx.filter_jit(donate="all-except-first")
    @eqx.debug.assert_max_traces(max_traces=1)
    def step(model, tokens, positions, cache):
        logits, cache = model.decode(tokens, positions, cache)
        return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), cache

    tokens = jnp.zeros((2,), jnp.int32)
    for t in range(20):
        tokens, cache = step(model, tokens[:, None], _positions(2, t, 1), cache)
    np.testing.assert_array_equal(cache.lengths, jnp.array([20, 20]))
