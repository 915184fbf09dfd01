"""Device mesh and shardings: data parallelism over a 'data' axis, parameters replicated.

Every process passes its local rows of the global batch; `global_batch` assembles them into one global array
sharded over the mesh, so the same code runs on one CPU, a GPU cluster or a TPU pod.
"""
from __future__ import annotations

from collections.abc import Mapping

import jax
import ml_collections
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(cfg: ml_collections.ConfigDict) -> Mesh:
  """A 1-D mesh over `cfg.data` devices (-1: all of them)."""
  n = jax.device_count() if cfg.data == -1 else cfg.data
  if n < 1 or n > jax.device_count():
    raise ValueError(f"config.mesh.data={cfg.data}: expected -1 or 1..{jax.device_count()} (devices available)")
  devices = jax.devices()[:n]
  if len({d.process_index for d in devices}) != jax.process_count():
    raise ValueError(f"config.mesh.data={cfg.data}: the first {n} devices leave out some of the "
                     f"{jax.process_count()} processes, which would then hold no rows of the batch; expected -1 "
                     f"or a multiple of the {jax.local_device_count()} devices per process")
  # Auto axes: XLA propagates shardings from the explicit in/out shardings of the jitted steps.
  return jax.make_mesh((n,), (DATA_AXIS,), devices=devices, axis_types=(AxisType.Auto,))


def data_sharding(mesh: Mesh, batch_axis: int = 0) -> NamedSharding:
  """Arrays split over the data axis along `batch_axis` (1 for training batches [microbatches, rows, ...])."""
  return NamedSharding(mesh, P(*(None,) * batch_axis, DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def global_batch(mesh: Mesh, local_batch: Mapping[str, np.ndarray], batch_axis: int = 0) -> dict[str, jax.Array]:
  """This process's rows of every array -> global arrays sharded along `batch_axis`."""
  sharding = data_sharding(mesh, batch_axis)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items() if np.asarray(v).dtype.kind in "biuf"}


def local_rows(x: jax.Array) -> np.ndarray:
  """This process's rows of a global array split along axis 0, in order (what `global_batch` was given)."""
  shards = {s.index[0].start or 0: s for s in x.addressable_shards}
  return np.concatenate([np.asarray(shards[k].data) for k in sorted(shards)])
