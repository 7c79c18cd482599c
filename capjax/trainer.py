"""Train state, its sharded creation, and the jitted train / eval steps (pure functions)."""

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from capjax import objectives, sharding


class TrainState(flax.struct.PyTreeNode):
  step: jax.Array
  params: Any
  opt_state: Any


def normalize_images(images_uint8, dtype):
  """uint8 [0, 255] -> dtype [-1, 1], on device."""
  return (images_uint8.astype(jnp.float32) / 127.5 - 1.0).astype(dtype)


def dummy_inputs(config):
  s = config.data.image_size
  images = jnp.zeros((1, s, s, 3), jnp.dtype(config.dtype))
  tokens = jnp.zeros((1, config.model.max_len), jnp.int32)
  return images, tokens, objectives.causal_mask(config.model.max_len)[None, None]


def abstract_params(model, config):
  """Boxed (logically annotated) param shapes, no allocation."""
  return jax.eval_shape(lambda: model.init(jax.random.key(0), *dummy_inputs(config)))["params"]


def state_shardings(model, optimizer, config, mesh):
  rules = sharding.rules_from_config(config)
  boxed = abstract_params(model, config)
  params_sh = sharding.param_shardings(boxed, mesh, rules)
  params = sharding.unbox_shapes(boxed)
  opt_sh = sharding.opt_state_shardings(
      jax.eval_shape(optimizer.init, params), params, params_sh, mesh)
  return TrainState(step=sharding.replicated(mesh), params=params_sh, opt_state=opt_sh)


def make_init_fn(model, optimizer, config):
  """rng -> TrainState (unsharded on its own; jit it with out_shardings)."""
  def init(rng):
    params = nn.meta.unbox(model.init(rng, *dummy_inputs(config))["params"])
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=optimizer.init(params))
  return init


def create_state(model, optimizer, config, mesh) -> TrainState:
  """Initializes params and optimizer state directly in their sharded layout."""
  shardings = state_shardings(model, optimizer, config, mesh)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.rules_from_config(config)):
    return jax.jit(make_init_fn(model, optimizer, config), out_shardings=shardings)(
        jax.random.key(config.seed))


def make_train_step(model, optimizer, config, mask_id: int, pad_id: int):
  """(state, batch) -> (state, metrics). The step's RNG is derived from seed and step."""
  dtype = jnp.dtype(config.dtype)
  base_rng = jax.random.key(config.seed + 1)
  inject_nan_at = config.train.get("inject_nan_at_step", -1)
  inject_nan_steps = config.train.get("inject_nan_steps", 1)
  normalization = config.objective.get("loss_normalization", "per_example")

  def apply_fn(params, images, tokens, mask):
    return model.apply({"params": params}, images, tokens, mask)

  def train_step(state: TrainState, batch):
    rng = jax.random.fold_in(base_rng, state.step)
    images = normalize_images(batch["image"], dtype)
    if inject_nan_at >= 0:  # test-only fault injection; steps count from 1, as in the logs
      step = state.step + 1
      bad = (step >= inject_nan_at) & (step < inject_nan_at + inject_nan_steps)
      images = jnp.where(bad, jnp.nan, images).astype(dtype)

    def loss_fn(params):
      return objectives.cappa_loss(
          apply_fn, params, images, batch["tokens"], rng,
          masked_pred_prob=config.objective.masked_pred_prob, mask_id=mask_id, pad_id=pad_id,
          normalization=normalization)

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # A non-finite loss or gradient leaves params and optimizer state as they were; the
    # step still advances (the batch is consumed). train.py skips or stops on the flag.
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    only_if_finite = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    params = only_if_finite(params, state.params)
    opt_state = only_if_finite(opt_state, state.opt_state)
    metrics = {"train/loss": loss, "train/grad_norm": grad_norm,
               "train/nonfinite": 1.0 - finite.astype(jnp.float32),
               **{f"train/{k}": v for k, v in aux.items()}}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return train_step


def make_eval_step(model, config, pad_id: int):
  """(params, batch) -> captioning-only loss (seed 003's validation loss)."""
  dtype = jnp.dtype(config.dtype)
  normalization = config.objective.get("loss_normalization", "per_example")

  def eval_step(params, batch):
    apply_fn = lambda p, *a: model.apply({"params": p}, *a)
    return objectives.captioning_loss(
        apply_fn, params, normalize_images(batch["image"], dtype), batch["tokens"], pad_id=pad_id,
        normalization=normalization)

  return eval_step


def jit_train_step(train_step, state_sh, mesh):
  batch_sh = sharding.batch_sharding(mesh)
  return jax.jit(train_step, in_shardings=(state_sh, batch_sh),
                 out_shardings=(state_sh, sharding.replicated(mesh)), donate_argnums=0)
