"""Data-parallel execution of streaming kernels: one private state per device.

Statistics such as counts, histograms, quantile sketches and top-k lists are
accumulated independently on every device from its own share of each batch
and merged once at the end, so the per-batch step needs no communication:

    mesh = parallel.make_mesh()
    state = parallel.stack_init(mesh, kernel_init(...))   # leaves [D, ...]
    step = parallel.per_device(kernel_update, mesh)       # jitted, donates state
    for batch in batches:
        state = step(state, *batch)
    result = kernel_merge(parallel.to_host(state))        # caller merges over axis 0

Batches whose size does not divide by the number of devices D: either pass
``pad=True`` to :func:`per_device` (the batch is zero-padded to a multiple of D
inside the jitted function and the kernel receives a boolean ``valid`` mask as
its last argument), or pad on the host with :func:`pad_batch` and pass the
mask yourself (the kernel gets it as an ordinary batch array). Without either
a clear error names the sizes.

Multi-host recipe (e.g. a TPU pod slice, or several GPU hosts):

1. call :func:`initialize_distributed` at the start of every process (the
   coordinator address, process count and id come from the cluster
   environment or are passed explicitly);
2. ``mesh = make_mesh()`` spans all devices of all hosts;
3. every process reads ITS OWN slice of each global batch (e.g. process p of
   P reads items ``[p*b, (p+1)*b)`` of a global batch of ``P*b`` items), pads
   it with ``pad_batch(slice, local_device_count, size=b)`` (the same ``b``
   on every process) and places it, mask included, with
   :func:`shard_batch`, which assembles the global arrays;
4. step as above; :func:`to_host` gathers the per-device states on every
   process, and the merged result is identical to a single-host run over
   the same items, because each item lands in exactly one per-device state
   and the merges are exact (integer counts) or order-independent.
   :func:`jaxdissect.streaming.run_stream` checkpoints such global states
   (all processes write their shards to one shared directory) and resumes
   them the same way.

On CPU the same recipe runs as several local processes (tests do this) with
``jax.config.update("jax_cpu_collectives_implementation", "gloo")``.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXIS = "data"


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> None:
    """Join a multi-process JAX job; a no-op for a single process.

    With no arguments JAX detects the cluster (SLURM, Cloud TPU, Open MPI,
    Kubernetes); otherwise pass all three, e.g. ``("10.0.0.1:1234", 4, rank)``.
    Must run before any other JAX call in the process; called later without
    arguments it logs a warning and leaves JAX as it is (single process).
    """
    if num_processes == 1:
        return
    explicit = (coordinator_address, num_processes, process_id)
    if all(v is None for v in explicit):
        try:
            jax.distributed.initialize()
        except ValueError:
            # No cluster environment detected: this is a single-process run.
            return
        except RuntimeError as e:
            # Called once already, or after JAX started: keep whatever JAX has.
            if jax.process_count() == 1:
                logging.warning("initialize_distributed: %s; continuing as a single process", e)
        return
    if any(v is None for v in explicit):
        raise ValueError(
            "initialize_distributed needs coordinator_address, num_processes and process_id "
            f"together (got {coordinator_address!r}, {num_processes!r}, {process_id!r}); pass all "
            "three, or none to let JAX read them from the cluster environment"
        )
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id)


def make_mesh(devices=None) -> Mesh:
    """A 1-D mesh with axis ``'data'`` over ``devices`` (default: every device of every process)."""
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("make_mesh got an empty device list")
    return jax.make_mesh((len(devices),), (AXIS,), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """How :func:`shard_batch` places a batch: axis 0 split over ``'data'`` (for abstract shapes too)."""
    return NamedSharding(mesh, P(AXIS))


def stack_init(mesh: Mesh, state) -> Any:
    """Copy a single-device initial ``state`` to every device: leaves gain a leading axis D, sharded.

    Every process must pass the same ``state`` (it usually comes from a
    deterministic ``init`` function).
    """
    d = mesh.size
    sharding = batch_sharding(mesh)

    def stack(x):
        x = np.asarray(x)
        shape = (d,) + x.shape
        return jax.make_array_from_callback(shape, sharding, lambda idx: np.broadcast_to(x, shape)[idx])

    return jax.tree.map(stack, state)


def pad_batch(tree, multiple: int, size: int | None = None):
    """Zero-pad every array of ``tree`` along axis 0 to a multiple of ``multiple`` (or to ``size``).

    Returns ``(padded_tree, valid)`` with ``valid`` a boolean ``[B_padded]``
    NumPy array, True for the real items. In a multi-process job every
    process must contribute the same number of rows: pass the same ``size``
    (e.g. the per-process batch size) everywhere. Host-side (NumPy) helper.
    """
    leaves = jax.tree.leaves(tree)
    if not leaves:
        raise ValueError("pad_batch got an empty batch")
    n = _batch_size(leaves)
    padded_n = -(-n // multiple) * multiple if size is None else int(size)
    if padded_n < n or padded_n % multiple:
        raise ValueError(f"cannot pad a batch of {n} items to {padded_n}: the size must be at least the batch "
                         f"size and a multiple of {multiple}")
    valid = np.arange(padded_n) < n

    def pad(x):
        x = np.asarray(x)
        return np.concatenate([x, np.zeros((padded_n - n,) + x.shape[1:], x.dtype)]) if padded_n > n else x

    return jax.tree.map(pad, tree), valid


def _batch_size(leaves) -> int:
    sizes = {int(np.shape(x)[0]) if np.ndim(x) else None for x in leaves}
    if None in sizes or len(sizes) != 1:
        shapes = [tuple(np.shape(x)) for x in leaves]
        raise ValueError(f"batch arrays must share their leading (batch) axis; got shapes {shapes}")
    return sizes.pop()


def shard_batch(mesh: Mesh, tree):
    """Place a batch on the mesh, split along axis 0 over ``'data'``.

    Single process: ``tree`` is the whole batch. Multi-process: every process
    passes its own slice (its local devices receive it), and the result is
    the global batch of all slices in process order. The (local) batch size
    must divide by the (local) number of devices; pad with :func:`pad_batch`.
    """
    sharding = batch_sharding(mesh)
    local = len(mesh.local_devices)
    leaves = jax.tree.leaves(tree)
    if leaves:
        n = _batch_size(leaves)
        if n % local:
            raise ValueError(
                f"batch of {n} items cannot be split evenly over {local} local devices; pad it with "
                f"parallel.pad_batch(batch, {local}) and pass the returned valid mask to the kernel"
            )
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree)


def per_device(fn: Callable, mesh: Mesh, *, pad: bool = False, donate: bool = True,
               params: bool = False) -> Callable:
    """Run ``fn(state_slice, *batch_shard) -> new_state_slice`` on every device, no communication.

    Returns jitted ``f(state, *batch) -> state``: every leaf of ``state`` has
    a leading device axis of size ``mesh.size`` (see :func:`stack_init`);
    every batch array is split along axis 0 over the devices; ``fn`` sees
    one device's state slice (device axis removed) and its share of the
    batch. The state buffers are donated (do not reuse the old ``state``).

    With ``pad=True`` any batch size is accepted: the batch is zero-padded
    to a multiple of ``mesh.size`` inside the jitted function and ``fn`` is
    called as ``fn(state_slice, *batch_shard, valid)`` with ``valid`` a
    boolean ``[B_shard]`` mask of real items. Each distinct batch size
    compiles once (usually two: full batches and the last one).

    With ``params=True`` the step is ``f(state, params, *batch)`` and ``fn``
    is called as ``fn(state_slice, params, *batch_shard)``: ``params`` (any
    tree: weights, thresholds) is replicated on every device and passed to
    jit as an argument, never folded into the program as constants.
    """
    d = mesh.size
    spec = P(AXIS)

    def body(state, shared, batch):
        inner = jax.tree.map(lambda x: x[0], state)
        out = fn(inner, *shared, *batch)
        return jax.tree.map(lambda x: jnp.asarray(x)[None], out)

    mapped = jax.shard_map(body, mesh=mesh, in_specs=(spec, P(), spec), out_specs=spec)

    def run(state, *batch):
        shared = ()
        if params:
            shared, batch = (batch[0],), batch[1:]
        if pad:
            n = _batch_size(jax.tree.leaves(batch))
            padded_n = -(-n // d) * d
            batch = jax.tree.map(
                lambda x: jnp.pad(x, [(0, padded_n - n)] + [(0, 0)] * (x.ndim - 1)), batch)
            batch = tuple(batch) + (jnp.arange(padded_n) < n,)
        return mapped(state, shared, tuple(batch))

    jitted = jax.jit(run, donate_argnums=(0,) if donate else ())

    @functools.wraps(fn)
    def f(state, *batch):
        _check_state(state, d)
        leaves = jax.tree.leaves(batch[1:] if params else batch)
        if not leaves:
            raise ValueError("per_device step called without batch arrays")
        n = _batch_size(leaves)
        if not pad and n % d:
            raise ValueError(
                f"batch of {n} items cannot be split evenly over {d} devices; use a batch size that "
                f"is a multiple of {d}, or build the step with per_device(fn, mesh, pad=True) so the "
                "kernel receives a validity mask"
            )
        return jitted(state, *batch)

    return f


def _check_state(state, d: int) -> None:
    for path, x in jax.tree_util.tree_leaves_with_path(state):
        if not np.ndim(x) or np.shape(x)[0] != d:
            raise ValueError(
                f"state leaf {jax.tree_util.keystr(path)} has shape {tuple(np.shape(x))}; per-device "
                f"states need a leading device axis of size {d}: build them with parallel.stack_init"
            )


def to_host(tree):
    """The per-device states as NumPy arrays (leading axis D) on every process, for merging."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return multihost_utils.process_allgather(tree, tiled=True)
    return jax.tree.map(np.asarray, tree)
