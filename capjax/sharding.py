"""Mesh from config, logical-axis rules, and shardings for params, optimizer state and batches.

Models name logical axes only ("embed", "mlp", "act_batch", ...); the rules in
`config.sharding.rules` map them to the mesh axes ("data", "fsdp", "tensor").
The rules are the only road from a logical name to a mesh axis: input batches are split
like activations' batch dim (`BATCH`), and optimizer-state leaves that mirror no param
(Shampoo's block statistics) by `OPT_STATS`. The same code runs on 1 device (every axis of
size 1) and on a pod slice.
"""

import math

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from capjax.config import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH = "act_batch"  # logical name of the batch dim, of activations and input batches alike
OPT_STATS = "opt_stats"  # logical name for optimizer-state leaves that mirror no param
# Those leaves are split along their first divisible axis once they are at least this big.
MIN_SHARDED_STATE_SIZE = 2**12


def mesh_shape(mesh_config, num_devices: int) -> tuple[int, int, int]:
  """(data, fsdp, tensor); one entry may be -1, meaning 'the rest of the devices'."""
  sizes = [mesh_config.data, mesh_config.fsdp, mesh_config.tensor]
  if sizes.count(-1) > 1:
    raise ConfigError(f"At most one of mesh.data/fsdp/tensor may be -1, got {sizes}.")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ConfigError(f"Mesh {sizes} (mesh.data/fsdp/tensor) does not divide the "
                        f"{num_devices} devices.")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ConfigError(f"Mesh data*fsdp*tensor={sizes} needs {math.prod(sizes)} devices, "
                      f"found {num_devices}.")
  return tuple(sizes)


def check_devices(config, num_devices: int):
  """The mesh fits `num_devices` and the global batch splits evenly over the batch axes."""
  shape = dict(zip(MESH_AXES, mesh_shape(config.mesh, num_devices)))
  axes = mesh_axes(rules_from_config(config), BATCH)
  names = (axes,) if isinstance(axes, str) else tuple(axes or ())
  ways = math.prod(shape[name] for name in names)
  if config.train.batch_size % ways:
    raise ConfigError(f"train.batch_size={config.train.batch_size} does not split over the "
                      f"{ways} devices of the batch axes {names} (mesh {shape}).")


def make_mesh(mesh_config, devices=None) -> jax.sharding.Mesh:
  """A (data, fsdp, tensor) mesh over `devices` (default: all devices of all processes)."""
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(mesh_config, len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3,
                       devices=devices)


def rules_from_config(config) -> tuple:
  return tuple((name, tuple(axes) if isinstance(axes, (list, tuple)) else axes)
               for name, axes in config.sharding.rules)


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def mesh_axes(rules, logical_name: str):
  """The mesh axis (or tuple of axes, or None) the rules map `logical_name` to."""
  for name, axes in rules:
    if name == logical_name:
      return axes
  return None


def batch_sharding(mesh, rules) -> NamedSharding:
  """Input batches: leading dim split like activations' batch dim."""
  return NamedSharding(mesh, P(mesh_axes(rules, BATCH)))


def _axes_size(mesh, entry) -> int:
  names = (entry,) if isinstance(entry, str) else tuple(entry or ())
  return math.prod(mesh.shape[name] for name in names)


def fit_to_shape(sharding: NamedSharding, shape) -> NamedSharding:
  """Drops the mesh axes of any dim they do not divide (that dim is then replicated)."""
  spec = tuple(sharding.spec) + (None,) * (len(shape) - len(sharding.spec))
  fitted = tuple(entry if dim % _axes_size(sharding.mesh, entry) == 0 else None
                 for entry, dim in zip(spec, shape))
  return sharding if fitted == spec else NamedSharding(sharding.mesh, P(*fitted))


def unbox_shapes(abstract_boxed_params):
  """Strips the logical-axis boxes without applying them as sharding constraints
  (`nn.meta.unbox` would, and fails on ShapeDtypeStructs under a mesh)."""
  return jax.tree.map(lambda x: x.unbox(apply_constraint=False), abstract_boxed_params,
                      is_leaf=lambda x: isinstance(x, nn.Partitioned))


def param_shardings(abstract_boxed_params, mesh, rules):
  """NamedShardings of boxed (nn.with_logical_partitioning) params, by the logical rules."""
  logical = nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract_boxed_params), mesh, rules)
  return jax.tree.map(lambda sh, x: fit_to_shape(sh, x.shape), logical,
                      unbox_shapes(abstract_boxed_params))


def non_param_state_sharding(leaf, mesh, axes) -> NamedSharding:
  """Split a large optimizer-state leaf over the mesh `axes` (the `OPT_STATS` rule) along its
  first divisible axis. E.g. Shampoo's stacked (num_blocks, b, b) statistics along num_blocks.
  """
  size = _axes_size(mesh, axes)
  shape = getattr(leaf, "shape", ())
  if size == 1 or int(np.prod(shape)) < MIN_SHARDED_STATE_SIZE:
    return replicated(mesh)
  for axis, dim in enumerate(shape):
    if dim % size == 0:
      return NamedSharding(mesh, P(*([None] * axis), axes))
  return replicated(mesh)


def _param_at(path, params_by_path):
  """The (shape, sharding) of the param whose key path occurs inside `path`, if any."""
  for start in range(len(path)):
    for stop in range(len(path), start, -1):
      found = params_by_path.get(tuple(path[start:stop]))
      if found is not None:
        return found
  return None


def opt_state_shardings(abstract_opt_state, abstract_params, params_shardings, mesh, rules):
  """Shardings for every leaf of an optimizer state, whatever the optimizer.

  A leaf found under a param's key path (AdamW's mu/nu, Shampoo's momenta and
  grafting statistics) and shaped like that param takes the param's sharding;
  everything else (counts, Shampoo's block statistics, Adafactor's factored
  moments) goes through `non_param_state_sharding`.
  """
  flat_params = jax.tree_util.tree_flatten_with_path(abstract_params)[0]
  flat_shardings = jax.tree.leaves(params_shardings,
                                   is_leaf=lambda x: isinstance(x, NamedSharding))
  params_by_path = {tuple(path): (tuple(x.shape), sh)
                    for (path, x), sh in zip(flat_params, flat_shardings)}

  def leaf_sharding(path, leaf):
    found = _param_at(path, params_by_path)
    if found is not None and found[0] == tuple(getattr(leaf, "shape", ())):
      return found[1]
    return non_param_state_sharding(leaf, mesh, stats_axes)

  stats_axes = mesh_axes(rules, OPT_STATS)
  return jax.tree_util.tree_map_with_path(leaf_sharding, abstract_opt_state)


def with_shardings(abstract_tree, shardings):
  """ShapeDtypeStructs carrying shardings: abstract inputs for ahead-of-time lowering."""
  return jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                      abstract_tree, shardings)


def bytes_per_device(abstract_tree, shardings) -> int:
  """Bytes one device holds of a tree laid out by `shardings` (largest shard per leaf)."""
  sizes = jax.tree.map(
      lambda x, sh: math.prod(sh.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize,
      abstract_tree, shardings)
  return int(sum(jax.tree.leaves(sizes)))


def global_batch(local_batch: dict, sharding: NamedSharding) -> dict:
  """Per-process numpy batch -> global jax.Arrays laid out by `sharding` (`batch_sharding`).

  Each process passes only the examples it read; the global batch is their
  concatenation in the order of the processes' devices in the mesh.
  """
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}


def addressable_fraction(array: jax.Array) -> float:
  """Size of one addressable shard over the whole array (1/8 when split 8 ways)."""
  shard = array.addressable_shards[0].data
  return shard.size / array.size
