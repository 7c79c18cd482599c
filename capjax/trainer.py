"""Train state, its sharded creation, and the train step (a pure function of a task).

Nothing here names a model family: the loss, inputs and trainable params come from the task
(`capjax/tasks/`); `capjax/setup.py` assembles and jits these.
"""

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from capjax import sharding


class TrainState(flax.struct.PyTreeNode):
  step: jax.Array
  params: Any
  opt_state: Any


def make_init_fn(task, optimizer):
  """rng -> TrainState (unsharded on its own; jit it with out_shardings)."""
  def init(rng):
    params = nn.meta.unbox(task.init_params(rng))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=optimizer.init(params))
  return init


def state_shardings(abstract_boxed_params, optimizer, mesh, rules) -> TrainState:
  """Where every leaf of the train state lives, by the logical rules."""
  params_sh = sharding.param_shardings(abstract_boxed_params, mesh, rules)
  params = sharding.unbox_shapes(abstract_boxed_params)
  opt_sh = sharding.opt_state_shardings(
      jax.eval_shape(optimizer.init, params), params, params_sh, mesh, rules)
  return TrainState(step=sharding.replicated(mesh), params=params_sh, opt_state=opt_sh)


def freeze(params, trainable):
  """`params` with the frozen ones behind stop_gradient: no backward pass is spent on them."""
  if trainable is None:
    return params
  return jax.tree.map(lambda p, t: p if t else jax.lax.stop_gradient(p), params, trainable)


def all_finite(tree) -> jax.Array:
  """True when every element of every leaf is finite (one fused pass, no host sync)."""
  return jax.tree.reduce(lambda ok, x: ok & jnp.all(jnp.isfinite(x)), tree, jnp.bool_(True))


def make_train_step(task, optimizer, config, trainable=None):
  """(state, batch) -> (state, metrics). The step's RNG is derived from seed and step.

  `trainable`: bools with the params' structure (the task's mask), or None for all."""
  base_rng = jax.random.key(config.seed + 1)
  inject_nan_at = config.train.inject_nan_at_step
  inject_nan_steps = config.train.inject_nan_steps

  def train_step(state: TrainState, batch):
    rng = jax.random.fold_in(base_rng, state.step)

    def loss_fn(params):
      loss, aux = task.train_loss(freeze(params, trainable), batch, rng)
      if inject_nan_at >= 0:  # test-only fault injection; steps count from 1, as in the logs
        step = state.step + 1
        bad = (step >= inject_nan_at) & (step < inject_nan_at + inject_nan_steps)
        loss = loss * jnp.where(bad, jnp.nan, 1.0)  # non-finite loss and gradient
      return loss, aux

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # A non-finite loss, gradient or update (e.g. an overflowing learning rate) leaves params
    # and optimizer state as they were: nothing non-finite is ever committed or saved. The
    # step still advances (the batch is consumed). train.py skips or stops on the flag.
    finite = (jnp.isfinite(loss) & jnp.isfinite(grad_norm) & all_finite(params)
              & all_finite(opt_state))
    only_if_finite = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    params = only_if_finite(params, state.params)
    opt_state = only_if_finite(opt_state, state.opt_state)
    metrics = {"train/loss": loss, "train/grad_norm": grad_norm,
               "train/nonfinite": 1.0 - finite.astype(jnp.float32),
               **{f"train/{k}": v for k, v in aux.items()}}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return train_step
