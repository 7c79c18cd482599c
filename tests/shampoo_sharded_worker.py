"""A few Shampoo train steps of a tiny CapPa on a (data, fsdp) mesh of this process's devices.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
      python -m tests.shampoo_sharded_worker OUT.npz TOKENIZER FSDP

Writes the params after STEPS steps ("params/<path>") and, for every Shampoo block array
(statistics, preconditioners), its leading (blocks) dim and the fraction of it one device
holds ("blocks/<path>", "fraction/<path>"). `tests/test_shampoo_sharded.py` runs it on 8
simulated devices and calls `run` in-process on 1 device.
"""

import os
import sys

import jax
import ml_collections
import numpy as np

from capjax import setup, sharding
from capjax.data import pipeline
from capjax.data import tokenizer as tokenizer_lib
from capjax.optim.shampoo import ShampooParamState
from tests.helpers import tiny_config

STEPS = 3
# The step is tiny and runs 3 times: compiling dominates (same options in both runs).
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
# Small blocks so that the tiny model's matrices are split: e.g. a (32, 64) kernel is 2 x 4
# blocks of 16 x 16, 16 block matrices with their two axes.
SHAMPOO = {"name": "shampoo", "block_size": 16, "merge_small_dims_block_size": 32,
           "start_preconditioning_step": 1, "preconditioning_compute_steps": 1,
           "weight_decay": 0.0}


def shampoo_config(**overrides):
  """tests.helpers.tiny_config (float32) training with Shampoo."""
  config = tiny_config(**overrides)
  with config.unlocked():
    config.optimizer.update(SHAMPOO)
  return config


def small_tokenizer(config, directory) -> tokenizer_lib.Tokenizer:
  """A tokenizer of the first 500 training images' captions (all the shapes words; faster
  to make than train.ensure_tokenizer's 5000)."""
  path = os.path.join(directory, "tokenizer.model")
  tokenizer_lib.train(pipeline.training_captions(config, max_images=500), path,
                      config.tokenizer.vocab_size, config.tokenizer.model_type)
  return tokenizer_lib.Tokenizer(path)


def block_arrays(opt_state) -> dict:
  """{"<param path>/statistics": array, ...} for every preconditioned param."""
  found = {}
  is_param_state = lambda x: isinstance(x, ShampooParamState)
  for path, leaf in jax.tree_util.tree_flatten_with_path(opt_state, is_leaf=is_param_state)[0]:
    if is_param_state(leaf) and leaf.statistics.ndim == 3:
      name = jax.tree_util.keystr(path)
      found[f"{name}/statistics"] = leaf.statistics
      found[f"{name}/preconditioners"] = leaf.preconditioners
  return found


def run(tokenizer_path: str, fsdp: int, steps: int = STEPS) -> dict:
  """Trains `steps` steps on a (data=devices/fsdp, fsdp) mesh; returns numpy results."""
  config = shampoo_config()
  tok = tokenizer_lib.Tokenizer(tokenizer_path)
  mesh = sharding.make_mesh(ml_collections.ConfigDict({"data": -1, "fsdp": fsdp, "tensor": 1}))
  run_setup = setup.assemble(config, tok.special, mesh)
  data = iter(pipeline.train_dataset(config, tokenizer_path))
  with run_setup.context():
    # Setup.init_state, compiled with FAST_COMPILE.
    init = run_setup.init_fn()
    rng = jax.random.key(config.seed)
    state = init.lower(rng).compile(FAST_COMPILE)(rng)
    batches = [run_setup.global_batch(next(data)) for _ in range(steps)]
    train_step = run_setup.train_step.lower(state, batches[0]).compile(FAST_COMPILE)
    for batch in batches:
      state, _ = train_step(state, batch)
  out = {f"params/{jax.tree_util.keystr(path)}": np.asarray(leaf)
         for path, leaf in jax.tree_util.tree_flatten_with_path(state.params)[0]}
  for name, array in block_arrays(state.opt_state).items():
    out[f"blocks/{name}"] = np.asarray(array.shape[0])
    out[f"fraction/{name}"] = np.asarray(sharding.addressable_fraction(array))
  return out


def main(argv):
  out_path, tokenizer_path, fsdp = argv[1], argv[2], int(argv[3])
  np.savez(out_path, **run(tokenizer_path, fsdp))


if __name__ == "__main__":
  main(sys.argv)
