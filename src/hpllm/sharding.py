"""Data parallelism with FSDP-style parameter sharding over one mesh axis.

Every device holds a slice of the batch (data parallel) AND a slice of each large parameter and
of its optimizer moments (fully sharded data parallel, "FSDP"). Inside the jitted train step XLA
inserts the all-gathers (parameters before use) and reduce-scatters (gradients) that this
layout implies; the step's code is the single-device code.

- `make_mesh()` is a 1-D `jax.sharding.Mesh` named `"data"` over all devices.
- `tree_shardings(tree, mesh)` shards each array leaf along its largest axis that the mesh size
  divides, and replicates small leaves (norm scales, counters) whose gathers would cost more
  than the memory they save.
- `shard_batch(array, mesh)` splits the batch axis over the mesh.

Several processes (hosts): `hpllm.distributed.join` starts JAX's distributed runtime before any
other JAX call; `jax.devices()` then lists the devices of every process, so `make_mesh()` spans
the whole job. Every process reads the same (seeded) batch stream and `shard_batch` hands each
device only its rows of the global batch (`jax.make_array_from_callback`), so no process needs
another's data; checkpoints are gathered and written by process 0. The code path is identical;
only the number of devices changes.
"""

from typing import Any

import equinox as eqx
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"

# Leaves smaller than this stay replicated: sharding a 256-float norm scale saves nothing and
# adds a collective per use.
MIN_SHARDED_SIZE = 2**12


def make_mesh(devices: list[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh with axis `"data"` over `devices` (default: every device of the job)."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def leaf_sharding(shape: tuple[int, ...], mesh: Mesh) -> NamedSharding:
    """Shard the largest axis that the mesh size divides; replicate small or indivisible leaves."""
    n = mesh.shape[DATA_AXIS]
    if n == 1 or int(np.prod(shape, dtype=np.int64)) < MIN_SHARDED_SIZE:
        return NamedSharding(mesh, PartitionSpec())
    divisible = [axis for axis, size in enumerate(shape) if size % n == 0]
    if not divisible:
        return NamedSharding(mesh, PartitionSpec())
    axis = max(divisible, key=lambda a: shape[a])
    spec = [None] * len(shape)
    spec[axis] = DATA_AXIS
    return NamedSharding(mesh, PartitionSpec(*spec))


def tree_shardings(tree: Any, mesh: Mesh) -> Any:
    """A pytree of `NamedSharding`s for the array leaves of `tree` (None elsewhere).

    The rule depends only on shapes, so parameters and their Adam moments get the same layout.
    """
    return jax.tree.map(
        lambda x: leaf_sharding(x.shape, mesh) if eqx.is_array(x) else None, tree)


def shard_tree(tree: Any, mesh: Mesh) -> Any:
    """Place every array leaf of `tree` on the mesh with `tree_shardings`' layout."""
    dynamic, static = eqx.partition(tree, eqx.is_array)
    if jax.process_count() > 1:
        # Arrays on this process's default device can't move to another process's devices;
        # as host values (the same in every process: same seed or same checkpoint) each
        # process places its own shards.
        dynamic = jax.device_get(dynamic)
    placed = jax.device_put(dynamic, tree_shardings(dynamic, mesh))
    return eqx.combine(placed, static)


def batch_sharding(mesh: Mesh, ndim: int, batch_axis: int = 0) -> NamedSharding:
    """Split axis `batch_axis` of an `ndim`-dimensional batch array over the mesh."""
    spec = [None] * ndim
    spec[batch_axis] = DATA_AXIS
    return NamedSharding(mesh, PartitionSpec(*spec))


def shard_batch(batch: np.ndarray, mesh: Mesh, batch_axis: int = 0) -> jax.Array:
    """The global batch `batch` (on the host) as an array split over the mesh along
    `batch_axis`. Each device receives only its rows; with several processes, every process
    passes the same global batch and transfers only the rows of its own devices.
    """
    sharding = batch_sharding(mesh, batch.ndim, batch_axis)
    return jax.make_array_from_callback(batch.shape, sharding, lambda index: batch[index])


def check_batch_divisible(batch_size: int, mesh: Mesh) -> None:
    """Raise a ValueError unless the global batch splits evenly over the mesh."""
    n = mesh.shape[DATA_AXIS]
    if batch_size % n:
        raise ValueError(
            f"--batch-size {batch_size} must be a multiple of the number of devices ({n})")
