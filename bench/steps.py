"""Shared by the benchmarks: capjax's jitted train step as train.py builds it, and a batch.

Run the benchmarks as scripts (`python bench/train_step.py ...`); this directory is
then on sys.path.
"""

import time

import jax
import numpy as np

from capjax import setup as setup_lib
from capjax.data import tokenizer as tokenizer_lib

IDS = tokenizer_lib.SENTENCEPIECE_IDS  # what a sentencepiece tokenizer made by capjax assigns


def timed(run) -> tuple[float, float]:
  """(wall seconds, process CPU seconds) of one call, waited on."""
  wall, cpu = time.perf_counter(), time.process_time()
  jax.block_until_ready(run())
  return time.perf_counter() - wall, time.process_time() - cpu


def random_batch(config, seed: int = 0) -> dict:
  """A fixed batch of uint8 images and caption tokens (BOS .. EOS PAD ..), as numpy."""
  rng = np.random.default_rng(seed)
  b, s, length = config.train.batch_size, config.data.image_size, config.model.max_len
  tokens = rng.integers(IDS.mask + 1, config.model.vocab_size, (b, length + 1)).astype(np.int32)
  tokens[:, 0] = IDS.bos
  ends = rng.integers(length // 2, length + 1, b)  # caption lengths vary, the rest is padding
  for row, end in zip(tokens, ends):
    row[end] = IDS.eos
    row[end + 1:] = IDS.pad
  return {"image": rng.integers(0, 256, (b, s, s, 3), dtype=np.uint8), "tokens": tokens}


class CapjaxStep:
  """capjax's train step, assembled exactly as train.py assembles it (capjax/setup.py)."""

  def __init__(self, config):
    self.config = config
    self.run_setup = setup_lib.assemble(config, IDS)

  def lower(self):
    """Ahead-of-time lowering on abstract inputs (nothing allocated)."""
    with self.run_setup.context():
      return self.run_setup.train_step.lower(self.run_setup.abstract_state(),
                                             self.run_setup.abstract_batch())

  def init(self, batch: dict):
    """Allocates the state and puts `batch` on the devices; returns a `run()` callable."""
    self.state = self.run_setup.init_state()
    self.batch = self.run_setup.global_batch(batch)

  def run(self):
    """One step; returns the metrics (not waited on)."""
    with self.run_setup.context():
      self.state, metrics = self.run_setup.train_step(self.state, self.batch)
    return metrics

  def num_params(self) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.state.params))
