"""Distributed Shampoo as an `optax.GradientTransformation`.

Same update as precondition-opt's `distributed_shampoo` (pmap mode, no
quantization, `decoupled_learning_rate=True`), checked against it step by step
in `tests/test_shampoo.py`. Differences: params stacked by `nn.scan` can be
marked so each layer is preconditioned on its own, and every param's block
statistics live in one array whose leading axis can be sharded.

State layout (`ShampooState.stats` has the params' tree structure, with one
`ShampooParamState` per param):
  diagonal_statistics, diagonal_momentum, momentum: shaped like the param
    (`diagonal_statistics` is a float32 scalar placeholder for "sgd" grafting).
  statistics, preconditioners: (blocks, B, B) float32, one B x B matrix for
    each (block, axis) pair of the param, block-major as in the reference;
    a matrix for an axis of size b < B sits top-left with zeros around it.
    For a param stacked by scan the leading axis is layers * blocks (layer-major).
    A float32 scalar placeholder when the param is not preconditioned.
"""

import math
from typing import Any, Callable, NamedTuple, Optional, Union

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


# ---------------------------------------------------------------- layout


def merge_small_dims(shape, max_dim):
  """Merges consecutive dims while their product stays <= max_dim."""
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
  """Static block layout of one (unstacked) param."""
  shape: tuple  # the param's shape (one layer's if stacked)
  merged: tuple  # shape after merging small dims
  block: tuple  # block size along each merged axis
  grid: tuple  # number of blocks along each merged axis
  exponent: int  # p in statistics^(-1/p)

  @property
  def num_blocks(self):
    return math.prod(self.grid)

  @property
  def size(self):  # B, the side of the stored matrices
    return max(self.block)

  def stat_sizes(self):
    """Valid side of each stored matrix, block-major like the reference."""
    per_axis = [[b] * (n - 1) + [d - (n - 1) * b]
                for d, b, n in zip(self.merged, self.block, self.grid)]
    sizes = [[s[i] for s, i in zip(per_axis, idx)]
             for idx in np.ndindex(*self.grid)]
    return np.asarray(sizes, np.int32).reshape(-1)


def _make_layout(shape, block_size, merge_dims_to, exponent_override):
  merged = merge_small_dims(shape, merge_dims_to) if merge_dims_to else shape
  block = tuple(block_size if 0 < block_size < d else d for d in merged)
  grid = tuple(-(-d // b) for d, b in zip(merged, block))
  exponent = exponent_override or 2 * len(merged)
  return _Layout(tuple(shape), tuple(merged), block, grid, exponent)


def _to_blocks(x, layout):
  """(shape) -> (num_blocks, *block), zero-padding ragged edge blocks."""
  x = jnp.pad(x.reshape(layout.merged),
              [(0, n * b - d) for d, b, n in zip(layout.merged, layout.block,
                                                 layout.grid)])
  k = len(layout.merged)
  x = x.reshape([v for nb in zip(layout.grid, layout.block) for v in nb])
  x = x.transpose(list(range(0, 2 * k, 2)) + list(range(1, 2 * k, 2)))
  return x.reshape((layout.num_blocks,) + layout.block)


def _from_blocks(blocks, layout):
  k = len(layout.merged)
  x = blocks.reshape(layout.grid + layout.block)
  x = x.transpose([i for a in range(k) for i in (a, k + a)])
  x = x.reshape([n * b for n, b in zip(layout.grid, layout.block)])
  return x[tuple(slice(0, d) for d in layout.merged)].reshape(layout.shape)


def _pad_square(m, size):
  return jnp.pad(m, [(0, size - m.shape[0]), (0, size - m.shape[1])])


def _block_grams(grad, layout):
  """Per block and axis, G G^T over all other axes: (blocks * axes, B, B)."""
  def grams(g):
    axes = range(g.ndim)
    return jnp.stack([
        _pad_square(jnp.tensordot(g, g, axes=([a for a in axes if a != i],) *
                                  2), layout.size) for i in axes])
  per_block = jax.vmap(grams)(_to_blocks(grad, layout))
  return per_block.reshape((-1, layout.size, layout.size))


def _precondition(grad, preconditioners, layout):
  """Applies each axis' preconditioner to each block, as the reference."""
  k = len(layout.merged)

  def one_block(g, ps):
    for i, b in enumerate(layout.block):
      # Contracting axis 0 and appending the result keeps the axes cycling.
      g = jnp.tensordot(g, ps[i, :b, :b], axes=[[0], [0]])
    return g
  ps = preconditioners.reshape((layout.num_blocks, k) + preconditioners.shape[1:])
  return _from_blocks(jax.vmap(one_block)(_to_blocks(grad, layout), ps), layout)


# ---------------------------------------------------------------- roots


def _masked_identity(n, size, dtype):
  return jnp.eye(n, dtype=dtype) * (jnp.arange(n) < size).astype(dtype)


def power_iteration(matrix, size, num_iters=100, error_tolerance=1e-6):
  """Largest eigenvalue of a PSD matrix whose first `size` rows are valid."""
  n = matrix.shape[-1]
  # The reference's fixed start; a prefix of it is the same for any n.
  v_0 = np.random.RandomState(1729).uniform(-1.0, 1.0, n).astype(matrix.dtype)
  v_0 = jnp.asarray(v_0) * (jnp.arange(n) < size)

  def cond(state):
    i, _, _, run = state
    return jnp.logical_and(i < num_iters, run)

  def body(state):
    i, v, s, _ = state
    v = v / jnp.linalg.norm(v)
    s_v = jnp.einsum("ij,j->i", matrix, v, precision=_HIGHEST)
    s_new = jnp.einsum("i,i->", v, s_v, precision=_HIGHEST)
    return i + 1, s_v, s_new, jnp.abs(s_new - s) > error_tolerance

  init = (0, v_0, jnp.zeros([], matrix.dtype), True)
  return lax.while_loop(cond, body, init)[2]


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


def _ridge(matrix, size, ridge_epsilon, relative, floor):
  if not relative:
    return ridge_epsilon
  return ridge_epsilon * jnp.maximum(power_iteration(matrix, size), floor)


def matrix_inverse_pth_root(matrix, p, size, ridge_epsilon=1e-6,
                            relative_matrix_epsilon=True, num_iters=100,
                            error_tolerance=1e-6):
  """(matrix + eps I)^(-1/p) by coupled Newton iteration (Higham, eq. 7.18).

  Only the top-left `size` x `size` part of `matrix` is used; the rest of the
  result is zero. Retries with 10x more damping (up to 6 times) when the
  iteration ends with error > 0.05. Returns (root, error), error being
  max|M_k - I| of the final iterate.
  """
  n = matrix.shape[0]
  mask = (jnp.arange(n) < size).astype(matrix.dtype)
  matrix = matrix * mask[None, :] * mask[:, None]
  identity = _masked_identity(n, size, matrix.dtype)
  alpha = jnp.asarray(-1.0 / p, matrix.dtype)
  ridge = _ridge(matrix, size, ridge_epsilon, relative_matrix_epsilon, _EPSILON)
  # The error may grow for a step before converging; bound that growth.
  max_error_ratio = 1.2

  def inner_cond(state):
    i, _, _, _, error, ratio = state
    return jnp.logical_and(
        i < num_iters,
        jnp.logical_and(error > error_tolerance, ratio < max_error_ratio))

  def inner_body(state):
    i, mat_m, mat_h, _, error, _ = state
    mat_m_i = (1 - alpha) * identity + alpha * mat_m
    new_mat_m = jnp.matmul(_mat_power(mat_m_i, p), mat_m, precision=_HIGHEST)
    new_mat_h = jnp.matmul(mat_h, mat_m_i, precision=_HIGHEST)
    new_error = jnp.max(jnp.abs(new_mat_m - identity))
    return i + 1, new_mat_m, new_mat_h, mat_h, new_error, new_error / error

  def outer_cond(state):
    i, _, _, failed = state
    return jnp.logical_and(failed, i < 6)

  def outer_body(state):
    i = state[0]
    damped = matrix + ridge * (10**i) * identity
    z = (1 + p) / (2 * jnp.linalg.norm(damped))
    mat_m_0 = damped * z
    mat_h_0 = identity * jnp.power(z, 1.0 / p)
    init = (0, mat_m_0, mat_h_0, mat_h_0,
            jnp.max(jnp.abs(mat_m_0 - identity)), 1.0)
    _, mat_m, mat_h, old_mat_h, _, ratio = lax.while_loop(inner_cond, inner_body,
                                                          init)
    error = jnp.max(jnp.abs(mat_m - identity)).astype(jnp.float32)
    root = jnp.where(ratio < max_error_ratio, mat_h, old_mat_h)
    return i + 1, root, error, error > 0.05

  init = (0, identity, jnp.float32(1000.0), True)
  _, root, error, _ = lax.while_loop(outer_cond, outer_body, init)
  return root, error


def matrix_inverse_pth_root_eigh(matrix, p, size, ridge_epsilon=1e-6,
                                 relative_matrix_epsilon=True,
                                 error_tolerance=1e-6):
  """As `matrix_inverse_pth_root`, by eigendecomposition (the reference's eigh)."""
  n = matrix.shape[0]
  mask = (jnp.arange(n) < size).astype(matrix.dtype)
  matrix = matrix * mask[None, :] * mask[:, None]
  ridge = _ridge(matrix, size, ridge_epsilon, relative_matrix_epsilon,
                 error_tolerance)
  regularized = matrix + ridge * _masked_identity(n, size, matrix.dtype)
  e, u = jnp.linalg.eigh(regularized)
  # Padding adds n - size zero eigenvalues, which sort first.
  e = e * jnp.flip(mask)
  inv_e = jnp.where(e == 0.0, 0.0, jnp.power(jnp.maximum(e, ridge), -1.0 / p))
  root = u * jnp.sqrt(inv_e)
  recovered = jnp.matmul(u.T, jnp.matmul(regularized, u, precision=_HIGHEST),
                         precision=_HIGHEST)
  error = jnp.max(jnp.abs((recovered - jnp.diag(e)) * jnp.flip(mask)))
  return jnp.matmul(root, root.T, precision=_HIGHEST), error.astype(jnp.float32)


# ---------------------------------------------------------------- optimizer


def _split_layers(state, layers):
  """(layers * blocks, B, B) -> (layers, blocks, B, B) for a stacked param."""
  split = lambda x: x.reshape((layers, -1) + x.shape[1:]) if x.ndim else x
  return state._replace(statistics=split(state.statistics),
                        preconditioners=split(state.preconditioners))


def _merge_layers(state):
  merge = lambda x: x.reshape((-1,) + x.shape[2:]) if x.ndim else x
  return state._replace(statistics=merge(state.statistics),
                        preconditioners=merge(state.preconditioners))


def stacked_from_logical_axes(param_axes):
  """Stacked flags for `shampoo` from params' logical axes: leading "layers"."""
  return jax.tree.map(lambda names: bool(names) and names[0] == "layers",
                      param_axes, is_leaf=lambda x: type(x) is tuple)


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
    stacked_leading_axis: Optional[Any] = None,
) -> optax.GradientTransformation:
  """Distributed Shampoo (Anil et al. 2020, arXiv:2002.09018).

  Arguments mean what they mean in precondition-opt's `distributed_shampoo`;
  `graft_type` is one of GRAFT_TYPES. One default differs: params of rank < 2
  (biases, norm scales, scalars) are not preconditioned
  (`skip_preconditioning_rank_lt=2`; the reference's is 1). Such params, and
  params with a dim > `skip_preconditioning_dim_size_gt`, follow the grafted
  update only. The learning rate multiplies the update after momentum.

  `stacked_leading_axis`: bools with the params' tree structure (or a prefix
  of it), True for params stacked by `nn.scan` (see
  `stacked_from_logical_axes`); each slice along their leading axis is
  treated as an independent param (own blocks, norms and grafting).
  `eigh=True` computes inverse roots by eigendecomposition instead of
  coupled Newton.
  """
  if graft_type not in GRAFT_TYPES:
    raise ValueError(f"graft_type={graft_type!r}; expected one of {GRAFT_TYPES}")
  merge_to = merge_small_dims_block_size if best_effort_shape_interpretation else 0
  # The reference's weights: beta2 == 1 accumulates a plain sum.
  w1, w2 = beta2, (1.0 if beta2 == 1.0 else 1.0 - beta2)
  momentum_weight = 1.0 - beta1 if moving_average_for_momentum else 1.0

  def preconditioned(shape):
    return (len(shape) >= skip_preconditioning_rank_lt and
            all(d <= skip_preconditioning_dim_size_gt for d in shape))

  def layout_of(shape):
    return _make_layout(shape, block_size, merge_to, exponent_override)

  def flat_flags(treedef, tree):
    if stacked_leading_axis is None:
      return [False] * treedef.num_leaves
    flags = jax.tree.map(lambda flag, sub: jax.tree.map(lambda _: flag, sub),
                         stacked_leading_axis, jax.tree.unflatten(treedef, tree))
    return treedef.flatten_up_to(flags)

  def init_param(param, stacked):
    shape = param.shape[1:] if stacked else param.shape
    layers = param.shape[0] if stacked else 1
    zeros = jnp.zeros(param.shape, jnp.float32)
    diagonal = zeros if graft_type != "sgd" else jnp.zeros([], jnp.float32)
    if not preconditioned(shape):
      placeholder = jnp.zeros([], jnp.float32)
      return ShampooParamState(diagonal, zeros, zeros, placeholder, placeholder)
    layout = layout_of(shape)
    sizes = np.tile(layout.stat_sizes(), layers)
    eye = jax.vmap(lambda s: _masked_identity(layout.size, s, jnp.float32))(sizes)
    return ShampooParamState(diagonal, zeros, zeros, matrix_epsilon * eye, eye)

  def init_fn(params):
    leaves, treedef = jax.tree.flatten(params)
    states = map(init_param, leaves, flat_flags(treedef, leaves))
    return ShampooState(jnp.zeros([], jnp.int32),
                        jax.tree.unflatten(treedef, list(states)))

  def inverse_roots(stats, old, layout, layers):
    """New preconditioners where the root succeeded, else the old ones."""
    sizes = np.tile(layout.stat_sizes(), layers)
    if eigh:
      root_fn = lambda m, s: matrix_inverse_pth_root_eigh(
          m, layout.exponent, s, matrix_epsilon, relative_matrix_epsilon)
    else:
      root_fn = lambda m, s: matrix_inverse_pth_root(
          m, layout.exponent, s, matrix_epsilon, relative_matrix_epsilon)
    roots, errors = jax.vmap(root_fn)(stats, sizes)
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

  def transform(grad, param, state, layout, step, lr):
    """One (unstacked) param's update, with its already updated matrices."""
    graft_update, diagonal = graft(grad, state.diagonal_statistics)
    if layout is None:
      precond_grad = graft_update
    else:
      precond_grad = _precondition(grad, state.preconditioners, layout)
    # Grafting: Shampoo's direction with the first-order update's norm.
    shampoo_update = precond_grad * (jnp.linalg.norm(graft_update) /
                                     (jnp.linalg.norm(precond_grad) + _EPSILON))
    if weight_decay != 0:
      shampoo_update = shampoo_update + weight_decay * param
      graft_update = graft_update + weight_decay * param
    momentum = state.momentum * beta1 + momentum_weight * shampoo_update
    diagonal_momentum = (state.diagonal_momentum * beta1 +
                         momentum_weight * graft_update)
    run_shampoo = step >= start_preconditioning_step
    update = jnp.where(run_shampoo, momentum, diagonal_momentum)
    if nesterov:
      update = (momentum_weight *
                jnp.where(run_shampoo, shampoo_update, graft_update) +
                beta1 * update)
    new_state = state._replace(diagonal_statistics=diagonal,
                               diagonal_momentum=diagonal_momentum,
                               momentum=momentum)
    return -lr * update, new_state

  def update_fn(grads, state, params=None):
    if weight_decay != 0 and params is None:
      raise ValueError("shampoo with weight_decay != 0 needs params in update")
    grads_flat, treedef = jax.tree.flatten(grads)
    states = treedef.flatten_up_to(state.stats)
    params_flat = (treedef.flatten_up_to(params) if params is not None else
                   [None] * len(grads_flat))
    stacked = flat_flags(treedef, grads_flat)
    step = state.count
    lr = learning_rate(step) if callable(learning_rate) else learning_rate

    layouts, layers = [], []
    for g, is_stacked in zip(grads_flat, stacked):
      shape = g.shape[1:] if is_stacked else g.shape
      layouts.append(layout_of(shape) if preconditioned(shape) else None)
      layers.append(g.shape[0] if is_stacked else 1)

    def per_layer(fn, is_stacked):
      return jax.vmap(fn) if is_stacked else fn

    new_stats = []
    for g, s, layout, is_stacked in zip(grads_flat, states, layouts, stacked):
      if layout is None:
        new_stats.append(s.statistics)
        continue
      grams = per_layer(lambda x: _block_grams(x, layout), is_stacked)(
          g.astype(jnp.float32))
      new_stats.append(w1 * s.statistics + w2 * grams.reshape(s.statistics.shape))

    def compute_roots():
      return [s.preconditioners if layout is None else
              inverse_roots(stats, s.preconditioners, layout, n)
              for stats, s, layout, n in zip(new_stats, states, layouts, layers)]

    old = [s.preconditioners for s in states]
    new_preconditioners = lax.cond(step % preconditioning_compute_steps == 0,
                                   compute_roots, lambda: old)

    updates, new_states = [], []
    for g, p, s, layout, is_stacked, n, stats, precond in zip(
        grads_flat, params_flat, states, layouts, stacked, layers, new_stats,
        new_preconditioners):
      s = s._replace(statistics=stats, preconditioners=precond)
      fn = lambda g_, p_, s_: transform(g_.astype(jnp.float32), p_, s_, layout,
                                         step, lr)
      if is_stacked:
        s = _split_layers(s, n)
        state_axes = jax.tree.map(lambda x: 0 if x.ndim else None, s)
        fn = jax.vmap(fn, in_axes=(0, None if p is None else 0, state_axes),
                      out_axes=(0, state_axes))
      update, s = fn(g, p, s)
      new_states.append(_merge_layers(s) if is_stacked else s)
      updates.append(update.astype(g.dtype))

    return (jax.tree.unflatten(treedef, updates),
            ShampooState(step + 1, jax.tree.unflatten(treedef, new_states)))

  return optax.GradientTransformation(init_fn, update_fn)


# ---------------------------------------------------------------- sharding


def is_logical_axes_leaf(x) -> bool:
  """Leaf predicate for trees returned by `state_logical_axes`."""
  return x is None or type(x) is tuple


def state_logical_axes(opt_state: ShampooState, param_axes: Any = None):
  """Logical axis names for each leaf of a Shampoo state.

  Takes the state or its abstract version (`jax.eval_shape(opt.init, params)`)
  and returns a `ShampooState` of the same structure whose leaves are:
    ("opt_blocks", None, None) for `statistics` and `preconditioners` arrays:
      shard the leading (blocks) axis, e.g. over the FSDP mesh axis when it
      divides that axis; else replicate;
    None for leaves shaped like their param (grafting statistics and momenta):
      shard them like the param;
    () for scalars (the step count, placeholders): replicate.
  With `param_axes` (the params' logical axes, tuples of names with the
  params' structure) the None markers are replaced by the param's axes.
  Walk the result with `is_leaf=is_logical_axes_leaf`; its leaves then line
  up one to one with `jax.tree.leaves(opt_state)`.
  """
  def param_state_axes(s, axes=None):
    blocks = lambda x: ("opt_blocks", None, None) if x.ndim == 3 else ()
    like_param = lambda x: (axes if axes is not None else None) if x.ndim else ()
    return ShampooParamState(like_param(s.diagonal_statistics),
                             like_param(s.diagonal_momentum),
                             like_param(s.momentum), blocks(s.statistics),
                             blocks(s.preconditioners))

  is_param_state = lambda x: isinstance(x, ShampooParamState)
  leaves, treedef = jax.tree.flatten(opt_state.stats, is_leaf=is_param_state)
  axes = (treedef.flatten_up_to(param_axes) if param_axes is not None else
          [None] * len(leaves))
  return ShampooState((), jax.tree.unflatten(
      treedef, [param_state_axes(s, a) for s, a in zip(leaves, axes)]))
