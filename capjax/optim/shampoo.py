"""Distributed Shampoo (Anil et al. 2020, arXiv:2002.09018) as an `optax.GradientTransformation`.

The update of precondition-opt's `distributed_shampoo` (pmap mode, no quantization,
`decoupled_learning_rate=True`), checked against it step by step in `tests/test_shampoo.py`.
Added: a param can stand for several independent ones along some of its axes (the layers of an
`nn.scan` stack; the q, k, v of a fused projection kernel): each slice along those axes is
preconditioned and grafted as the separate param it stands for. Each param's block matrices
live in one array whose leading axis can be sharded.

State: `ShampooState(count, stats)`, `stats` having the params' tree structure with one
`ShampooParamState` per param:
  diagonal_statistics, diagonal_momentum, momentum: float32, shaped like the param
    (`diagonal_statistics` is a float32 scalar placeholder with "sgd" grafting);
  statistics, preconditioners: float32 (blocks, B, B): one B x B matrix per (block, axis) pair,
    block-major as in the reference; a matrix for an axis of size b < B sits top-left, zeros
    around it. For a param with independent axes, blocks = slices * blocks per slice,
    slice-major (the slices in the order of those axes: layer-major for a scanned stack).
    A float32 scalar placeholder when the param is not preconditioned.
"""

import functools
import math
from typing import Any, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

GRAFT_TYPES = ("sgd", "adagrad", "rmsprop", "rmsprop_normalized")
_EPSILON = 1e-25  # the reference's guard against 0 / 0
_HIGHEST = lax.Precision.HIGHEST


class ShampooParamState(NamedTuple):
  diagonal_statistics: jax.Array  # grafting second moment
  diagonal_momentum: jax.Array  # momentum of the grafted update
  momentum: jax.Array  # momentum of the Shampoo update
  statistics: jax.Array  # (blocks, B, B)
  preconditioners: jax.Array  # (blocks, B, B): statistics^(-1/p)


class ShampooState(NamedTuple):
  count: jax.Array
  stats: Any


# ---------------------------------------------------------------- blocks


def merge_small_dims(shape, max_dim):
  """Merges consecutive dims while their product stays <= max_dim (as the reference)."""
  if shape and all(d == 1 for d in shape):
    return (1,)
  merged, product = [], 1
  for d in shape:
    if product * d <= max_dim:
      product *= d
    else:
      if product > 1:
        merged.append(product)
      product = d
  if product > 1:
    merged.append(product)
  return tuple(merged)


class _Layout(NamedTuple):
  """Static block layout of one param (one slice of a param with independent axes)."""
  shape: tuple  # the param's shape
  merged: tuple  # shape after merging small dims
  block: tuple  # block side along each merged axis
  grid: tuple  # number of blocks along each merged axis
  exponent: int  # p in statistics^(-1/p)

  @property
  def num_blocks(self):
    return math.prod(self.grid)

  @property
  def size(self):  # B, the side of the stored matrices
    return max(self.block)

  def stat_sizes(self):
    """Valid side of each stored matrix, block-major."""
    per_axis = [[b] * (n - 1) + [d - (n - 1) * b]
                for d, b, n in zip(self.merged, self.block, self.grid)]
    sizes = [[s[i] for s, i in zip(per_axis, idx)] for idx in np.ndindex(*self.grid)]
    return np.asarray(sizes, np.int32).reshape(-1)


def _make_layout(shape, block_size, merge_dims_to, exponent_override):
  merged = merge_small_dims(shape, merge_dims_to) if merge_dims_to else tuple(shape)
  block = tuple(block_size if 0 < block_size < d else d for d in merged)
  grid = tuple(-(-d // b) for d, b in zip(merged, block))
  return _Layout(tuple(shape), merged, block, grid, exponent_override or 2 * len(merged))


def _to_blocks(x, layout):
  """(shape) -> (num_blocks, *block), zero-padding the ragged edge blocks."""
  k = len(layout.merged)
  padding = [(0, n * b - d) for d, b, n in zip(layout.merged, layout.block, layout.grid)]
  x = jnp.pad(x.reshape(layout.merged), padding)
  x = x.reshape([v for n_b in zip(layout.grid, layout.block) for v in n_b])
  x = x.transpose(list(range(0, 2 * k, 2)) + list(range(1, 2 * k, 2)))
  return x.reshape((layout.num_blocks,) + layout.block)


def _from_blocks(blocks, layout):
  k = len(layout.merged)
  x = blocks.reshape(layout.grid + layout.block)
  x = x.transpose([i for a in range(k) for i in (a, k + a)])
  x = x.reshape([n * b for n, b in zip(layout.grid, layout.block)])
  return x[tuple(slice(0, d) for d in layout.merged)].reshape(layout.shape)


def _block_grams(grad, layout):
  """G G^T of each block along each axis (contracting the others): (blocks * axes, B, B)."""
  def grams(g):
    def gram(axis):
      others = [a for a in range(g.ndim) if a != axis]
      m = jnp.tensordot(g, g, axes=(others, others))
      return jnp.pad(m, [(0, layout.size - m.shape[0])] * 2)
    return jnp.stack([gram(axis) for axis in range(g.ndim)])
  return jax.vmap(grams)(_to_blocks(grad, layout)).reshape((-1, layout.size, layout.size))


def _precondition(grad, preconditioners, layout):
  def one_block(g, ps):
    for axis, b in enumerate(layout.block):
      # Contracting axis 0 and appending the new axis last cycles through all axes.
      g = jnp.tensordot(g, ps[axis, :b, :b], axes=[[0], [0]])
    return g
  ps = preconditioners.reshape((layout.num_blocks, -1) + preconditioners.shape[1:])
  return _from_blocks(jax.vmap(one_block)(_to_blocks(grad, layout), ps), layout)


# ---------------------------------------------------------------- inverse p-th roots


def _mask(n, size, dtype):
  return (jnp.arange(n) < size).astype(dtype)


def power_iteration(matrix, size, num_iters=100, error_tolerance=1e-6):
  """Largest eigenvalue of a PSD matrix whose top-left `size` x `size` part is used."""
  n = matrix.shape[-1]
  # The reference's fixed start vector; its prefix does not depend on n.
  v_0 = np.random.RandomState(1729).uniform(-1.0, 1.0, n).astype(matrix.dtype)
  v_0 = jnp.asarray(v_0) * _mask(n, size, matrix.dtype)

  def body(state):
    i, v, s, _ = state
    v = v / jnp.linalg.norm(v)
    s_v = jnp.einsum("ij,j->i", matrix, v, precision=_HIGHEST)
    s_new = jnp.einsum("i,i->", v, s_v, precision=_HIGHEST)
    return i + 1, s_v, s_new, jnp.abs(s_new - s) > error_tolerance

  cond = lambda state: jnp.logical_and(state[0] < num_iters, state[3])
  return lax.while_loop(cond, body, (0, v_0, jnp.zeros([], matrix.dtype), True))[2]


def _mat_power(m, p):
  """m^p for a static p, multiplying in the reference's order."""
  result = None
  while p > 0:
    if p % 2 == 1:
      result = m if result is None else jnp.matmul(m, result, precision=_HIGHEST)
    p //= 2
    if p:
      m = jnp.matmul(m, m, precision=_HIGHEST)
  return result


def _masked_and_ridge(matrix, size, ridge_epsilon, relative, floor):
  mask = _mask(matrix.shape[0], size, matrix.dtype)
  matrix = matrix * mask[None, :] * mask[:, None]
  if relative:
    ridge_epsilon = ridge_epsilon * jnp.maximum(power_iteration(matrix, size), floor)
  return matrix, jnp.diag(mask), ridge_epsilon


def matrix_inverse_pth_root(matrix, p, size, ridge_epsilon=1e-6, relative_matrix_epsilon=True,
                            num_iters=100, error_tolerance=1e-6):
  """(matrix + eps I)^(-1/p) by coupled Newton iteration (Higham, Functions of Matrices, 7.18).

  Uses the top-left `size` x `size` part of `matrix` (the rest of the root is zero);
  eps = ridge_epsilon, times the largest eigenvalue if `relative_matrix_epsilon`. Retries with
  10x the damping, up to 6 times, while the error exceeds 0.05. Returns (root, error), error
  being max|M - I| of the last iterate (the caller rejects roots with too large an error).
  """
  matrix, identity, ridge = _masked_and_ridge(matrix, size, ridge_epsilon,
                                              relative_matrix_epsilon, _EPSILON)
  alpha = jnp.asarray(-1.0 / p, matrix.dtype)
  max_error_ratio = 1.2  # the error may grow a little before it converges

  def inner_cond(state):
    i, _, _, _, error, ratio = state
    return (i < num_iters) & (error > error_tolerance) & (ratio < max_error_ratio)

  def inner_body(state):
    i, mat_m, mat_h, _, error, _ = state
    mat_m_i = (1 - alpha) * identity + alpha * mat_m
    new_mat_m = jnp.matmul(_mat_power(mat_m_i, p), mat_m, precision=_HIGHEST)
    new_mat_h = jnp.matmul(mat_h, mat_m_i, precision=_HIGHEST)
    new_error = jnp.max(jnp.abs(new_mat_m - identity))
    return i + 1, new_mat_m, new_mat_h, mat_h, new_error, new_error / error

  def outer_body(state):
    i = state[0]
    damped = matrix + ridge * (10**i) * identity
    z = (1 + p) / (2 * jnp.linalg.norm(damped))
    mat_m, mat_h = damped * z, identity * jnp.power(z, 1.0 / p)
    init = (0, mat_m, mat_h, mat_h, jnp.max(jnp.abs(mat_m - identity)), 1.0)
    _, mat_m, mat_h, old_mat_h, _, ratio = lax.while_loop(inner_cond, inner_body, init)
    error = jnp.max(jnp.abs(mat_m - identity)).astype(jnp.float32)
    root = jnp.where(ratio < max_error_ratio, mat_h, old_mat_h)
    return i + 1, root, error, error > 0.05

  outer_cond = lambda state: jnp.logical_and(state[3], state[0] < 6)
  init = (0, identity, jnp.float32(1000.0), True)
  _, root, error, _ = lax.while_loop(outer_cond, outer_body, init)
  return root, error


def matrix_inverse_pth_root_eigh(matrix, p, size, ridge_epsilon=1e-6,
                                 relative_matrix_epsilon=True, error_tolerance=1e-6):
  """As `matrix_inverse_pth_root`, by eigendecomposition (error: of the decomposition)."""
  matrix, identity, ridge = _masked_and_ridge(matrix, size, ridge_epsilon,
                                              relative_matrix_epsilon, error_tolerance)
  regularized = matrix + ridge * identity
  e, u = jnp.linalg.eigh(regularized)
  valid = jnp.flip(jnp.diag(identity))  # the padding's zero eigenvalues sort first
  e = e * valid
  inv_e = jnp.where(e == 0.0, 0.0, jnp.power(jnp.maximum(e, ridge), -1.0 / p))
  root = u * jnp.sqrt(inv_e)
  mm = functools.partial(jnp.matmul, precision=_HIGHEST)
  error = jnp.max(jnp.abs((mm(u.T, mm(regularized, u)) - jnp.diag(e)) * valid))
  return mm(root, root.T), error.astype(jnp.float32)


# ---------------------------------------------------------------- optimizer


def independent_axes_from_logical_axes(param_axes, split_fused: bool = True):
  """`independent_axes` from the params' logical axes (tuples of names, or PartitionSpecs).

  Axis 0 when it is "layers" (an `nn.scan` stack). With `split_fused`, also the fused axis of
  a projection kernel: an unnamed axis right after "embed", as in the q/k/v kernel
  ("embed", None, "heads", "kv"), the cross-attention k/v kernel and the GeGLU gate/up kernel
  ("embed", None, "mlp") of capjax/models/layers.py. Position and register tables name their
  leading axis None too, but it is their first, not one after "embed".
  """
  def axes_of(names):
    names = tuple(names or ())
    stacked = (0,) if names[:1] == ("layers",) else ()
    fused = tuple(i for i in range(1, len(names))
                  if split_fused and names[i] is None and names[i - 1] == "embed")
    return stacked + fused
  is_names = lambda x: x is None or isinstance(x, (tuple, jax.sharding.PartitionSpec))
  return jax.tree.map(axes_of, param_axes, is_leaf=is_names)


def _over_slices(fn, axes, in_kinds, out_kinds):
  """`fn` of one slice, mapped over every slice of a param along `axes` (sorted) by nested vmaps.

  `in_kinds` / `out_kinds` match fn's arguments / results (prefixes allowed); each leaf says
  how that leaf is laid out: "param" (shaped like the param), "blocks" (block matrices shaped
  (*slices, blocks, B, B)) or None (shared by all slices).
  """
  for level in reversed(range(len(axes))):
    spec = lambda kind, level=level: axes[level] - level if kind == "param" else 0
    fn = jax.vmap(fn, in_axes=jax.tree.map(spec, in_kinds),
                  out_axes=jax.tree.map(spec, out_kinds))
  return fn


def _state_kinds(state: ShampooParamState) -> ShampooParamState:
  """`_over_slices` kinds of a param's state (scalar placeholders are shared)."""
  kind = lambda x, name: name if x.ndim else None
  return ShampooParamState(kind(state.diagonal_statistics, "param"),
                           kind(state.diagonal_momentum, "param"),
                           kind(state.momentum, "param"), kind(state.statistics, "blocks"),
                           kind(state.preconditioners, "blocks"))


def _per_param(tree, treedef, leaves, default, is_leaf=None):
  """A value per param from `tree` (the params' structure or a prefix of it), or `default`."""
  if tree is None:
    return [default] * len(leaves)
  full = jax.tree.map(lambda value, subtree: jax.tree.map(lambda _: value, subtree),
                      tree, jax.tree.unflatten(treedef, leaves), is_leaf=is_leaf)
  return treedef.flatten_up_to(full)


def shampoo(
    learning_rate: Union[float, optax.Schedule],
    block_size: int = 128,
    beta1: float = 0.9,
    beta2: float = 0.999,
    diagonal_epsilon: float = 1e-10,
    matrix_epsilon: float = 1e-6,
    weight_decay: float = 0.0,
    start_preconditioning_step: int = 5,
    preconditioning_compute_steps: int = 1,
    graft_type: str = "rmsprop_normalized",
    nesterov: bool = True,
    exponent_override: int = 0,
    inverse_failure_threshold: float = 0.1,
    moving_average_for_momentum: bool = False,
    skip_preconditioning_dim_size_gt: int = 4096,
    skip_preconditioning_rank_lt: int = 2,
    best_effort_shape_interpretation: bool = True,
    merge_small_dims_block_size: int = 4096,
    relative_matrix_epsilon: bool = True,
    eigh: bool = False,
    independent_axes: Optional[Any] = None,
    weight_decay_mask: Optional[Any] = None,
) -> optax.GradientTransformation:
  """Distributed Shampoo; arguments mean what they mean in precondition-opt's.

  `graft_type` is one of GRAFT_TYPES. One default differs from the reference's: params of rank
  < 2 (biases, norm scales, scalars) are not preconditioned (`skip_preconditioning_rank_lt=2`;
  the reference's is 1). They, and params with a dim > `skip_preconditioning_dim_size_gt`,
  take the grafted (diagonal) update. Weight decay is added to the gradient-based update
  before momentum, and the learning rate scales the update after momentum, as the reference's
  defaults do. `eigh=True` computes inverse roots by eigendecomposition, not coupled Newton.

  `independent_axes`: tuples of axis indices with the params' tree structure (or a prefix of
  it; see `independent_axes_from_logical_axes`). Each slice of a param along its independent
  axes (a scanned layer; q, k or v of a fused kernel) is preconditioned, merged and grafted as
  a separate param. `weight_decay_mask`: bools likewise (or a function of the params returning
  them), False for params not decayed; None: all are.
  """
  if graft_type not in GRAFT_TYPES:
    raise ValueError(f"shampoo: graft_type={graft_type!r}, expected one of {GRAFT_TYPES}.")
  merge_to = merge_small_dims_block_size if best_effort_shape_interpretation else 0
  w1, w2 = beta2, (1.0 if beta2 == 1.0 else 1.0 - beta2)  # beta2 == 1: a plain sum
  momentum_weight = 1.0 - beta1 if moving_average_for_momentum else 1.0

  def layout_of(shape):
    """The block layout of a param (one slice's shape), None for graft-only params."""
    if (len(shape) < skip_preconditioning_rank_lt or
        any(d > skip_preconditioning_dim_size_gt for d in shape)):
      return None
    return _make_layout(shape, block_size, merge_to, exponent_override)

  def split_shape(shape, axes):
    """(number of slices along each independent axis, one slice's shape)."""
    return (tuple(shape[a] for a in axes),
            tuple(d for a, d in enumerate(shape) if a not in axes))

  def axes_per_param(treedef, leaves):
    axes = _per_param(independent_axes, treedef, leaves, (),
                      is_leaf=lambda x: isinstance(x, tuple))
    return [tuple(sorted(a)) for a in axes]

  def init_param(param, axes):
    slices, shape = split_shape(param.shape, axes)
    zeros, placeholder = jnp.zeros(param.shape, jnp.float32), jnp.zeros([], jnp.float32)
    diagonal = placeholder if graft_type == "sgd" else zeros
    layout = layout_of(shape)
    if layout is None:
      return ShampooParamState(diagonal, zeros, zeros, placeholder, placeholder)
    # Built from iota, not np.eye: a numpy constant would be materialized unsharded
    # (4 GB for L/16) inside the init program.
    sizes_N = jnp.asarray(np.tile(layout.stat_sizes(), math.prod(slices)))
    i = jnp.arange(layout.size)
    eye = ((i[:, None] == i[None, :])[None] & (i[None, None, :] < sizes_N[:, None, None])
           ).astype(jnp.float32)
    return ShampooParamState(diagonal, zeros, zeros, matrix_epsilon * eye, eye)

  def init_fn(params):
    leaves, treedef = jax.tree.flatten(params)
    states = map(init_param, leaves, axes_per_param(treedef, leaves))
    return ShampooState(jnp.zeros([], jnp.int32), jax.tree.unflatten(treedef, list(states)))

  def inverse_roots(stats, old, layout, num_slices):
    """New preconditioners where the root succeeded, else the old ones."""
    root_fn = functools.partial(matrix_inverse_pth_root_eigh if eigh else matrix_inverse_pth_root,
                                p=layout.exponent, ridge_epsilon=matrix_epsilon,
                                relative_matrix_epsilon=relative_matrix_epsilon)
    sizes = np.tile(layout.stat_sizes(), num_slices)
    roots, errors = jax.vmap(lambda m, size: root_fn(m, size=size))(stats, sizes)
    failed = jnp.isnan(errors) | (errors >= inverse_failure_threshold)
    return jnp.where(failed[:, None, None], old, roots)

  def graft(grad, diagonal):
    """The grafted (first-order) update and the new diagonal statistics."""
    if graft_type == "sgd":
      return grad, diagonal
    if graft_type == "rmsprop_normalized":
      grad = grad / (jnp.linalg.norm(grad) + _EPSILON)
    if graft_type == "adagrad":
      diagonal = diagonal + jnp.square(grad)
    else:
      diagonal = w1 * diagonal + w2 * jnp.square(grad)
    return grad / (jnp.sqrt(diagonal) + diagonal_epsilon), diagonal

  def transform(grad, param, state, layout, decay, step, lr):
    """One slice's update, given its new statistics and preconditioners."""
    graft_update, diagonal = graft(grad, state.diagonal_statistics)
    precond_grad = (graft_update if layout is None else
                    _precondition(grad, state.preconditioners, layout))
    # Shampoo's direction with the grafted update's norm.
    shampoo_update = precond_grad * (jnp.linalg.norm(graft_update) /
                                     (jnp.linalg.norm(precond_grad) + _EPSILON))
    if decay != 0:
      shampoo_update = shampoo_update + decay * param
      graft_update = graft_update + decay * param
    momentum = state.momentum * beta1 + momentum_weight * shampoo_update
    diagonal_momentum = state.diagonal_momentum * beta1 + momentum_weight * graft_update
    # The reference's 0/1 blend rather than jnp.where: XLA then rounds the same way.
    run_shampoo = (step >= start_preconditioning_step).astype(jnp.float32)
    blend = lambda a, b: run_shampoo * a + (1.0 - run_shampoo) * b
    update = blend(momentum, diagonal_momentum)
    if nesterov:
      update = momentum_weight * blend(shampoo_update, graft_update) + beta1 * update
    return -lr * update, state._replace(diagonal_statistics=diagonal,
                                        diagonal_momentum=diagonal_momentum, momentum=momentum)

  def update_param(grad, param, state, axes, decay, step, lr):
    slices, shape = split_shape(grad.shape, axes)
    layout = layout_of(shape)
    grad = grad.astype(jnp.float32)
    if layout is not None:
      grams = _over_slices(lambda g: _block_grams(g, layout), axes, "param", "blocks")(grad)
      stats = w1 * state.statistics + w2 * grams.reshape(state.statistics.shape)
      roots = lambda: inverse_roots(stats, state.preconditioners, layout, math.prod(slices))
      if preconditioning_compute_steps > 1:
        roots = functools.partial(lax.cond, step % preconditioning_compute_steps == 0, roots,
                                  lambda: state.preconditioners)
      state = state._replace(statistics=stats, preconditioners=roots())
    by_slice = lambda x: x.reshape(slices + (-1,) + x.shape[1:]) if x.ndim else x
    state = state._replace(statistics=by_slice(state.statistics),
                           preconditioners=by_slice(state.preconditioners))
    kinds = _state_kinds(state)
    update, state = _over_slices(
        functools.partial(transform, layout=layout, decay=decay, step=step, lr=lr), axes,
        ("param", None if param is None else "param", kinds), ("param", kinds))(
            grad, param, state)
    merged = lambda x: x.reshape((-1,) + x.shape[len(slices) + 1:]) if x.ndim else x
    return update, state._replace(statistics=merged(state.statistics),
                                  preconditioners=merged(state.preconditioners))

  def update_fn(grads, state, params=None):
    if weight_decay != 0 and params is None:
      raise ValueError("shampoo: weight_decay != 0 needs params passed to update.")
    grads_flat, treedef = jax.tree.flatten(grads)
    params_flat = ([None] * len(grads_flat) if params is None else
                   treedef.flatten_up_to(params))
    mask = weight_decay_mask(grads) if callable(weight_decay_mask) else weight_decay_mask
    decays = [weight_decay if decayed else 0.0
              for decayed in _per_param(mask, treedef, grads_flat, True)]
    lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
    updates, new_states = [], []
    for grad, param, param_state, axes, decay in zip(
        grads_flat, params_flat, treedef.flatten_up_to(state.stats),
        axes_per_param(treedef, grads_flat), decays):
      update, param_state = update_param(grad, param, param_state, axes, decay, state.count, lr)
      updates.append(update.astype(grad.dtype))
      new_states.append(param_state)
    return (jax.tree.unflatten(treedef, updates),
            ShampooState(state.count + 1, jax.tree.unflatten(treedef, new_states)))

  return optax.GradientTransformation(init_fn, update_fn)


# ---------------------------------------------------------------- sharding


def is_logical_axes_leaf(x) -> bool:
  """Leaf predicate for the trees `state_logical_axes` returns."""
  return x is None or type(x) is tuple


def state_logical_axes(opt_state: ShampooState, param_axes: Any = None) -> ShampooState:
  """Logical axis names of each leaf of a Shampoo state (or of `jax.eval_shape(opt.init, ...)`).

  Returns a `ShampooState` of the same structure whose leaves are
    ("opt_blocks", None, None) for `statistics` and `preconditioners`: shard the leading
      (blocks) axis, e.g. over the fsdp mesh axis when that divides it, else replicate;
    None for leaves shaped like their param (grafting statistics, momenta): shard them as
      that param is sharded;
    () for scalars (the step count, placeholders): replicate.
  Given `param_axes` (the params' logical axis names, tuples in the params' tree structure),
  the None markers become the param's names. Walk the result with
  `is_leaf=is_logical_axes_leaf`: its leaves then pair up with `jax.tree.leaves(opt_state)`.
  """
  def param_state_axes(s, names):
    blocks = lambda x: ("opt_blocks", None, None) if x.ndim == 3 else ()
    like_param = lambda x: names if x.ndim else ()
    return ShampooParamState(like_param(s.diagonal_statistics), like_param(s.diagonal_momentum),
                             like_param(s.momentum), blocks(s.statistics),
                             blocks(s.preconditioners))

  is_param_state = lambda x: isinstance(x, ShampooParamState)
  leaves, treedef = jax.tree.flatten(opt_state.stats, is_leaf=is_param_state)
  names = [None] * len(leaves) if param_axes is None else treedef.flatten_up_to(param_axes)
  return ShampooState((), jax.tree.unflatten(treedef, list(map(param_state_axes, leaves, names))))
