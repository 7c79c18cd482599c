"""Optimizers by name (`config.optimizer.name`), each reading its own `optimizer.*` keys.

`config.optimizer` is flat: `name` plus the keys below. An optimizer reads the keys it
registers (a missing key takes the default shown there) and ignores the keys of the others,
so one preset can switch optimizers with `--config.optimizer.name=...`; a key that no
optimizer reads is an error (a typo). Shared keys mean the same thing everywhere:
`b1` (momentum), `b2` (second-moment decay), `weight_decay`.

Weight decay applies to kernels only (params named `kernel`: the matmul weights), not to norm
scales, biases, the token embedding, position tables or registers: big_vision's default
(`big_vision/optax.py`, `wd_mults=[(".*/kernel$", 1.0)]`).

The learning rate is `config.schedule` (schedules.py) for every optimizer; gradients are
clipped to `train.grad_clip_norm` (0: off) before the optimizer sees them.
"""

from typing import Any, Callable, NamedTuple, Optional

import jax
from jax.sharding import PartitionSpec
import optax

from capjax.optim import schedules
from capjax.optim import shampoo as shampoo_lib


class _Entry(NamedTuple):
  build: Callable[..., optax.GradientTransformation]
  defaults: dict
  needs_param_axes: bool


_OPTIMIZERS: dict[str, _Entry] = {}


def register(name: str, needs_param_axes: bool = False, **defaults):
  """Registers `build(opt, learning_rate, param_axes)`; `opt` holds exactly `defaults`' keys."""
  def wrap(build):
    _OPTIMIZERS[name] = _Entry(build, defaults, needs_param_axes)
    return build
  return wrap


def known_keys() -> set[str]:
  return {"name"}.union(*(entry.defaults for entry in _OPTIMIZERS.values()))


def key_default(key: str) -> Any:
  """The default of `optimizer.<key>` for the first optimizer that reads it, else None."""
  return next((entry.defaults[key] for entry in _OPTIMIZERS.values() if key in entry.defaults),
              None)


def defaults(name: str) -> dict:
  """The `optimizer.*` keys `name` reads, with their defaults."""
  return dict(_lookup(name).defaults)


def kernels_mask(params) -> Any:
  """True for the params weight decay applies to: those named `kernel`."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: getattr(path[-1], "key", None) == "kernel", params)


@register("adamw", b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0)
def adamw(opt, learning_rate, param_axes):
  del param_axes
  return optax.adamw(learning_rate, b1=opt["b1"], b2=opt["b2"], eps=opt["eps"],
                     weight_decay=opt["weight_decay"], mask=kernels_mask)


# weight_decay here is optax's: added after the learning rate (not scaled by it).
@register("adafactor", decay_rate=0.8, factored=True, min_dim_size_to_factor=128,
          clipping_threshold=1.0, multiply_by_parameter_scale=True, weight_decay=0.0)
def adafactor(opt, learning_rate, param_axes):
  del param_axes
  return optax.adafactor(
      learning_rate, decay_rate=opt["decay_rate"], factored=opt["factored"],
      min_dim_size_to_factor=opt["min_dim_size_to_factor"],
      clipping_threshold=opt["clipping_threshold"] or None,
      multiply_by_parameter_scale=opt["multiply_by_parameter_scale"],
      weight_decay_rate=opt["weight_decay"] or None, weight_decay_mask=kernels_mask)


# Distributed Shampoo (shampoo.py) with the settings of "Evaluation of Distributed Shampoo"
# that seed 003 trains CapPa with; presets choose block_size for their mesh (see cappa_*.py).
# Params of rank < 2 and dims > 4096 (e.g. a 32k vocabulary) take the grafted update only.
# merge_small_dims_block_size: consecutive dims are merged while their product stays <= it,
# so that (embed, heads, head_dim) kernels become (embed, heads * head_dim) matrices. That
# needs embed * heads > it (4096: true of the cappa_* presets); set it to the model width
# otherwise, or e.g. a (128, 4, 32) kernel becomes a (512, 32) matrix.
# split_fused: each of q, k, v in a fused (embed, 3, heads, kv) kernel, and gate and up in a
# fused (embed, 2, mlp) one, is preconditioned and grafted as the separate param it stands
# for, as in the references (False: the fused kernel is one matrix, as precondition-opt would
# see it). moving_average_for_momentum: momentum b1 * m + (1 - b1) * update (clip-jax's
# setting) instead of b1 * m + update (precondition-opt's default).
@register("shampoo", needs_param_axes=True, b1=0.9, b2=0.999, weight_decay=0.0, block_size=128,
          start_preconditioning_step=101, preconditioning_compute_steps=10,
          graft_type="rmsprop_normalized", nesterov=True, diagonal_eps=1e-10, matrix_eps=1e-6,
          merge_small_dims_block_size=4096, eigh=False, exponent_override=0, split_fused=True,
          moving_average_for_momentum=False)
def shampoo(opt, learning_rate, param_axes):
  return shampoo_lib.shampoo(
      learning_rate, block_size=opt["block_size"], beta1=opt["b1"], beta2=opt["b2"],
      diagonal_epsilon=opt["diagonal_eps"], matrix_epsilon=opt["matrix_eps"],
      weight_decay=opt["weight_decay"], weight_decay_mask=kernels_mask,
      start_preconditioning_step=opt["start_preconditioning_step"],
      preconditioning_compute_steps=opt["preconditioning_compute_steps"],
      graft_type=opt["graft_type"], nesterov=opt["nesterov"], eigh=opt["eigh"],
      exponent_override=opt["exponent_override"],
      moving_average_for_momentum=opt["moving_average_for_momentum"],
      merge_small_dims_block_size=opt["merge_small_dims_block_size"],
      independent_axes=shampoo_lib.independent_axes_from_logical_axes(
          param_axes, split_fused=opt["split_fused"]))


def _lookup(name: str) -> _Entry:
  if name not in _OPTIMIZERS:
    raise ValueError(f"Unknown optimizer.name={name!r}; expected one of {sorted(_OPTIMIZERS)}.")
  return _OPTIMIZERS[name]


def optimizer_args(opt_config) -> dict:
  """The keys `opt_config.name` reads: its defaults, overridden by `opt_config`."""
  entry = _lookup(opt_config["name"])
  unknown = sorted(set(opt_config.keys()) - known_keys())
  if unknown:
    raise ValueError(f"Unknown key(s) optimizer.{', optimizer.'.join(unknown)}; optimizers "
                     f"read {sorted(known_keys())} (see capjax/optim/factory.py).")
  return {k: opt_config.get(k, default) for k, default in entry.defaults.items()}


def make_optimizer(config, param_axes: Optional[Any] = None,
                   trainable: Optional[Any] = None) -> optax.GradientTransformation:
  """The optimizer `config.optimizer` names, with `config.schedule` and gradient clipping.

  `param_axes`: the params' logical axis names (`nn.get_partition_spec` of the boxed params);
  Shampoo needs them to precondition `nn.scan`-stacked params layer by layer and fused kernels
  slice by slice.
  `trainable`: bools with the params' structure, False for frozen params: those get
  `optax.set_to_zero` and no optimizer state at all, and are left out of the clipping norm.
  """
  entry, args = _lookup(config.optimizer.name), optimizer_args(config.optimizer)
  if entry.needs_param_axes and param_axes is None:
    raise ValueError(f"optimizer.name={config.optimizer.name!r} needs the params' logical axes.")
  if trainable is not None and param_axes is not None:
    param_axes = jax.tree.map(lambda axes, t: axes if t else optax.MaskedNode(), param_axes,
                              trainable, is_leaf=lambda x: isinstance(x, PartitionSpec))
  tx = entry.build(args, schedules.get_schedule(config), param_axes)
  clip = config.train.grad_clip_norm
  tx = optax.chain(optax.clip_by_global_norm(clip), tx) if clip else tx
  if trainable is None:
    return tx
  labels = jax.tree.map(lambda t: "train" if t else "frozen", trainable)
  return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
