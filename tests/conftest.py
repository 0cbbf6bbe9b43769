"""Test set-up: several host CPU devices (for the sharding tests) and strict dtype promotion.

jaxtyping + beartype checks are switched on for the hpllm, train and infer packages by
`--jaxtyping-packages` in pyproject.toml's pytest options.
"""

import os

# Must be set before JAX initialises its CPU backend.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture
def key() -> jax.Array:
    return jax.random.key(0)
