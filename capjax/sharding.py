"""Mesh from config, logical-axis rules, and shardings for params, optimizer state and batches.

Models name logical axes only ("embed", "mlp", "act_batch", ...); the rules in
`config.sharding.rules` map them to the mesh axes ("data", "fsdp", "tensor").
"""

import math

import flax.linen as nn
import jax
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
# Optimizer-state leaves that do not mirror a param (e.g. Shampoo statistics) are
# split over fsdp along their first divisible axis once they are at least this big.
MIN_SHARDED_STATE_SIZE = 2**12


def mesh_shape(mesh_config, num_devices: int) -> tuple[int, int, int]:
  """(data, fsdp, tensor); one entry may be -1, meaning 'the rest of the devices'."""
  sizes = [mesh_config.data, mesh_config.fsdp, mesh_config.tensor]
  if sizes.count(-1) > 1:
    raise ValueError(f"At most one of mesh.data/fsdp/tensor may be -1, got {sizes}.")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(f"Mesh {sizes} does not divide {num_devices} devices.")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(f"Mesh data*fsdp*tensor={sizes} needs {math.prod(sizes)} devices, "
                     f"found {num_devices}.")
  return tuple(sizes)


def make_mesh(mesh_config, devices=None) -> jax.sharding.Mesh:
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(mesh_config, len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3,
                       devices=devices)


def rules_from_config(config) -> tuple:
  return tuple((name, tuple(axes) if isinstance(axes, (list, tuple)) else axes)
               for name, axes in config.sharding.rules)


def logical_param_specs(abstract_boxed_params):
  """Logical PartitionSpecs of boxed (nn.with_logical_partitioning) params."""
  return nn.get_partition_spec(abstract_boxed_params)


def param_shardings(abstract_boxed_params, mesh, rules):
  return nn.logical_to_mesh_sharding(logical_param_specs(abstract_boxed_params), mesh, rules)


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def non_param_state_sharding(leaf, mesh) -> NamedSharding:
  """Split a large optimizer-state leaf over fsdp along its first divisible axis."""
  fsdp = mesh.shape["fsdp"]
  shape = getattr(leaf, "shape", ())
  if fsdp == 1 or int(np.prod(shape)) < MIN_SHARDED_STATE_SIZE:
    return replicated(mesh)
  for axis, dim in enumerate(shape):
    if dim % fsdp == 0:
      return NamedSharding(mesh, P(*([None] * axis), "fsdp"))
  return replicated(mesh)


def opt_state_shardings(optimizer: optax.GradientTransformation, abstract_opt_state,
                        params_shardings, mesh):
  """State that mirrors params (moments) takes the params' shardings; the rest is
  split by `non_param_state_sharding`."""
  return optax.tree_map_params(
      optimizer, lambda _, sharding: sharding, abstract_opt_state, params_shardings,
      transform_non_params=lambda leaf: non_param_state_sharding(leaf, mesh),
      is_leaf=lambda x: isinstance(x, NamedSharding))


def global_batch(local_batch: dict, mesh) -> dict:
  """Per-process numpy batch -> global jax.Arrays sharded over the batch axes."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}


def addressable_fraction(array: jax.Array) -> float:
  """Size of one addressable shard over the whole array (1/8 when split 8 ways)."""
  shard = array.addressable_shards[0].data
  return shard.size / array.size
