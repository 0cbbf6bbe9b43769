"""Test set-up: several host CPU devices (for the sharding tests) and strict dtype promotion.

jaxtyping + beartype checks are switched on for the hpllm, train and infer packages by
`--jaxtyping-packages` in pyproject.toml's pytest options.
"""

import os

# Must be set before JAX initialises its CPU backend.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# One persistent XLA compilation cache for the whole session, shared by pytest-xdist workers and
# by the CLI subprocesses the tests start (they inherit the environment): most of the suite's
# time is compiling the same tiny programs again in each test.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    _cache = tempfile.mkdtemp(prefix="hpllm-test-xla-cache-")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture
def key() -> jax.Array:
    return jax.random.key(0)


@pytest.fixture
def small_filesystem(tmp_path):
    """`mount(size)`: a fresh tmpfs of `size` (e.g. "1m") mounted under tmp_path, for tests of a
    full or read-only disk; `remount_read_only(folder)` makes it read-only. Both unmounted at
    the end. Skips where mounting is not permitted (it needs root, or CAP_SYS_ADMIN)."""
    import shutil
    import subprocess

    mounted = []

    class Mounts:
        @staticmethod
        def mount(size: str):
            if shutil.which("mount") is None:
                pytest.skip("no mount command here")
            folder = tmp_path / f"fs{len(mounted)}"
            folder.mkdir()
            result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                                     str(folder)], capture_output=True, text=True)
            if result.returncode != 0:
                pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip()})")
            mounted.append(folder)
            return folder

        @staticmethod
        def remount_read_only(folder):
            subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)

    yield Mounts
    for folder in reversed(mounted):
        subprocess.run(["umount", "-l", str(folder)], check=False)
