"""Shared by the benchmarks: capjax's jitted train step as train.py builds it, and a batch.

Run the benchmarks as scripts (`python bench/train_step.py ...`); this directory is
then on sys.path.
"""

import contextlib
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from capjax import models, sharding, trainer
from capjax.optim import factory

MASK_ID, PAD_ID, BOS_ID, EOS_ID = 4, 0, 1, 2  # what the sentencepiece tokenizer assigns


def timed(run) -> tuple[float, float]:
  """(wall seconds, process CPU seconds) of one call, waited on."""
  wall, cpu = time.perf_counter(), time.process_time()
  jax.block_until_ready(run())
  return time.perf_counter() - wall, time.process_time() - cpu


def random_batch(config, seed: int = 0) -> dict:
  """A fixed batch of uint8 images and caption tokens (BOS .. EOS PAD ..), as numpy."""
  rng = np.random.default_rng(seed)
  b, s, length = config.train.batch_size, config.data.image_size, config.model.max_len
  tokens = rng.integers(MASK_ID + 1, config.model.vocab_size, (b, length + 1)).astype(np.int32)
  tokens[:, 0] = BOS_ID
  ends = rng.integers(length // 2, length + 1, b)  # caption lengths vary, the rest is padding
  for row, end in zip(tokens, ends):
    row[end] = EOS_ID
    row[end + 1:] = PAD_ID
  return {"image": rng.integers(0, 256, (b, s, s, 3), dtype=np.uint8), "tokens": tokens}


def abstract_batch(config, mesh) -> dict:
  b, s, length = config.train.batch_size, config.data.image_size, config.model.max_len
  sh = sharding.batch_sharding(mesh)
  return {"image": jax.ShapeDtypeStruct((b, s, s, 3), jnp.uint8, sharding=sh),
          "tokens": jax.ShapeDtypeStruct((b, length + 1), jnp.int32, sharding=sh)}


class CapjaxStep:
  """capjax's train step, jitted exactly as train.py jits it (shardings, donation)."""

  def __init__(self, config):
    self.config = config
    self.mesh = sharding.make_mesh(config.mesh)
    self.rules = sharding.rules_from_config(config)
    self.model = models.from_config(config)
    self.optimizer = factory.make_optimizer(config)
    with self._context():
      self.state_sh = trainer.state_shardings(self.model, self.optimizer, config, self.mesh)
      self.step_fn = trainer.jit_train_step(
          trainer.make_train_step(self.model, self.optimizer, config, MASK_ID, PAD_ID),
          self.state_sh, self.mesh)

  @contextlib.contextmanager
  def _context(self):
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      yield

  def abstract_state(self):
    params = sharding.unbox_shapes(trainer.abstract_params(self.model, self.config))
    state = trainer.TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
                               opt_state=jax.eval_shape(self.optimizer.init, params))
    return sharding.with_shardings(state, self.state_sh)

  def lower(self):
    """Ahead-of-time lowering on abstract inputs (nothing allocated)."""
    with self._context():
      return self.step_fn.lower(self.abstract_state(), abstract_batch(self.config, self.mesh))

  def init(self, batch: dict):
    """Allocates the state and puts `batch` on the devices; returns a `run()` callable."""
    with self._context():
      self.state = trainer.create_state(self.model, self.optimizer, self.config, self.mesh)
      self.batch = sharding.global_batch(batch, self.mesh)

  def run(self):
    """One step; returns the metrics (not waited on)."""
    with self._context():
      self.state, metrics = self.step_fn(self.state, self.batch)
    return metrics

  def num_params(self) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.state.params))
