"""The one assembly of a run: mesh, task, optimizer, state shardings, jitted steps.

`train.py`, the benchmarks and `tools/plan_pod.py` all build their run here, so what
they measure is what trains. Nothing here names a model family.
"""

import contextlib
import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from capjax import config as config_lib, sharding, tasks, trainer
from capjax.optim import factory


@dataclasses.dataclass
class Setup:
  config: Any
  mesh: jax.sharding.Mesh
  rules: tuple
  task: tasks.Task
  optimizer: Any
  trainable: Any  # the task's mask (None: all params train)
  abstract_boxed_params: Any  # params' shapes with their logical axes
  state_shardings: trainer.TrainState
  batch_sharding: jax.sharding.NamedSharding
  batch_keys: tuple[str, ...]  # what the task reads of a pipeline batch
  train_step: Callable  # jitted (state, batch) -> (state, metrics); donates the state
  eval_step: Callable  # jitted (params, numpy batch) -> validation loss

  @contextlib.contextmanager
  def context(self):
    """The mesh and the logical-axis rules, as every traced call needs them."""
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      yield

  def abstract_state(self) -> trainer.TrainState:
    """The train state's shapes and dtypes carrying their shardings; nothing allocated."""
    params = sharding.unbox_shapes(self.abstract_boxed_params)
    state = trainer.TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
                               opt_state=jax.eval_shape(self.optimizer.init, params))
    return sharding.with_shardings(state, self.state_shardings)

  def abstract_batch(self) -> dict:
    spec = self.task.batch_spec(self.config.train.batch_size)
    return {k: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=self.batch_sharding)
            for k, x in spec.items()}

  def init_fn(self):
    """rng -> TrainState, jitted to create the state directly in its sharded layout."""
    return jax.jit(trainer.make_init_fn(self.task, self.optimizer),
                   out_shardings=self.state_shardings)

  def init_state(self) -> trainer.TrainState:
    """A fresh state: params (from `config.seed`, with the task's pretrained parts loaded:
    `Task.pretrained_params`) and optimizer state, created already sharded."""
    with self.context():
      state = self.init_fn()(jax.random.key(self.config.seed))
      params = self.task.pretrained_params(state.params)
      if params is state.params:
        return state
      params = jax.device_put(params, self.state_shardings.params)
      opt_state = jax.jit(self.optimizer.init,
                          out_shardings=self.state_shardings.opt_state)(params)
      return state.replace(params=params, opt_state=opt_state)

  def global_batch(self, local_batch: dict) -> dict:
    """This process's numpy batch -> global arrays; only the task's batch keys."""
    return sharding.global_batch({k: local_batch[k] for k in self.batch_keys},
                                 self.batch_sharding)


def assemble(config, special_ids, mesh=None, wrap_optimizer=None) -> Setup:
  """Everything a run needs, from `config` and the tokenizer's special ids.

  `mesh`: defaults to `config.mesh` over all devices. `wrap_optimizer`: tx -> tx, for
  benchmarks that, e.g., scale the updates by a learning rate held in the state.
  """
  mesh = sharding.make_mesh(config.mesh) if mesh is None else mesh
  rules = sharding.rules_from_config(config)
  task = tasks.get(config, special_ids)
  if config.data.get("features") and "features" not in task.batch_spec(1):
    raise config_lib.ConfigError(f"data.features={config.data.features}: task={config.task} "
                                 "trains on images, not on stored features.")
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    boxed = jax.eval_shape(task.init_params, jax.random.key(0))
    trainable = task.trainable(sharding.unbox_shapes(boxed))
    optimizer = factory.make_optimizer(config, nn.get_partition_spec(boxed), trainable)
    optimizer = wrap_optimizer(optimizer) if wrap_optimizer else optimizer
    state_sh = trainer.state_shardings(boxed, optimizer, mesh, rules)
    batch_sh = sharding.batch_sharding(mesh, rules)
    train_step = jax.jit(trainer.make_train_step(task, optimizer, config, trainable),
                         in_shardings=(state_sh, batch_sh),
                         out_shardings=(state_sh, sharding.replicated(mesh)), donate_argnums=0)
    eval_step = jax.jit(task.eval_loss)  # eval batches are host numpy
  return Setup(config, mesh, rules, task, optimizer, trainable, boxed, state_sh, batch_sh,
               tuple(task.batch_spec(1)), train_step, eval_step)
