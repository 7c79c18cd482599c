"""capjax.optim.factory: optimizers by name and their keys, Shampoo wired to the model's
scanned layers, the cappa presets, and Shampoo's state through a checkpoint."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from capjax import checkpoint, config as config_lib, setup as setup_lib, sharding
from capjax.data import pipeline
from capjax.optim import factory, schedules
from capjax.optim.shampoo import ShampooParamState, ShampooState
from tests import helpers
from tests.helpers import tiny_config
from tests.shampoo_sharded_worker import FAST_COMPILE, shampoo_config, small_tokenizer


def _toy_params():
  return {"w": jnp.ones((8, 4)), "b": jnp.zeros((4,))}


def _find(tree, kind):
  return [x for x in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, kind))
          if isinstance(x, kind)]


@pytest.mark.parametrize("name", ["adamw", "adafactor", "shampoo"])
def test_each_optimizer_by_name_updates(name):
  config = tiny_config(**{"optimizer.name": name})
  params = _toy_params()
  optimizer = factory.make_optimizer(config, param_axes={"w": ("a", "b"), "b": ("b",)})
  state = optimizer.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  for _ in range(2):
    updates, state = optimizer.update(grads, state, params)
  assert all(bool(jnp.isfinite(u).all()) for u in jax.tree.leaves(updates))
  assert float(jnp.abs(updates["w"]).sum()) > 0


def test_unknown_name_or_key_is_a_clear_error():
  config = tiny_config(**{"optimizer.name": "sgd"})
  with pytest.raises(ValueError, match=r"optimizer.name='sgd'.*adafactor.*adamw.*shampoo"):
    factory.make_optimizer(config)
  config = tiny_config()
  with config.unlocked():
    config.optimizer.block_sise = 64
  with pytest.raises(ValueError, match=r"optimizer.block_sise"):
    factory.make_optimizer(config)


def test_keys_of_other_optimizers_are_ignored_and_missing_keys_default():
  opt = ml_collections.ConfigDict({"name": "shampoo", "eps": 1e-8, "b2": 0.99})
  args = factory.optimizer_args(opt)
  assert "eps" not in args  # AdamW's key
  assert args["b2"] == 0.99
  assert args["block_size"] == factory.defaults("shampoo")["block_size"]
  assert set(args) == set(factory.defaults("shampoo"))


def test_any_preset_takes_overrides_of_any_optimizers_keys():
  config = config_lib.load("shapes_tiny", ["--config.optimizer.name=shampoo",
                                           "--config.optimizer.block_size=64",
                                           "--config.optimizer.graft_type=rmsprop"])
  args = factory.optimizer_args(config.optimizer)
  assert (args["block_size"], args["graft_type"]) == (64, "rmsprop")
  for bad, fragment in [("block_sise=64", "optimizer.block_sise"),
                        ("block_size=big", "Expected int")]:
    with pytest.raises(config_lib.ConfigError, match=fragment):
      config_lib.load("shapes_tiny", [f"--config.optimizer.{bad}"])


def _down_kernel_state(opt_state):
  stats = _find(opt_state, ShampooState)[0].stats
  return stats["encoder"]["layers"]["mlp"]["down"]["kernel"]


def test_shampoo_preconditions_scanned_layers_one_by_one():
  config = shampoo_config(**{"model.enc_depth": 2})
  params = sharding.unbox_shapes(helpers.abstract_params(config))
  kernel = params["encoder"]["layers"]["mlp"]["down"]["kernel"]
  assert kernel.shape == (2, 64, 32)
  state = jax.eval_shape(helpers.optimizer(config).init, params)
  # Each layer's (64, 32) kernel: 4 x 2 blocks of 16 x 16, a matrix per block and axis.
  assert _down_kernel_state(state).statistics.shape == (2 * 8 * 2, 16, 16)
  with pytest.raises(ValueError, match="needs the params' logical axes"):
    factory.make_optimizer(config)


@pytest.mark.parametrize("preset,block_size,b2", [("cappa_b16", 1024, 0.999),
                                                  ("cappa_l16_datacomp", 512, 0.99)])
def test_cappa_presets_train_with_seed_003_shampoo(preset, block_size, b2):
  config = config_lib.load(preset)
  opt = config.optimizer
  assert (opt.name, opt.graft_type, opt.nesterov, opt.weight_decay) == (
      "shampoo", "rmsprop_normalized", True, 0.0)
  assert opt.block_size == block_size and opt.b1 == 0.9 and opt.b2 == b2
  assert 10 <= opt.preconditioning_compute_steps <= 20
  assert opt.start_preconditioning_step == 101
  assert factory.optimizer_args(opt)  # every key is one an optimizer reads
  if preset == "cappa_l16_datacomp":  # clip-jax's README example and train.py
    assert opt.preconditioning_compute_steps == 20 and opt.moving_average_for_momentum
    assert config.train.grad_clip_norm == 0.0 and config.model.vocab_size == 65_536
    schedule = schedules.get_schedule(config)
    assert float(schedule(config.schedule.warmup_steps)) == pytest.approx(1e-3)
    assert float(schedule(config.train.num_steps)) == 0.0  # anneals to zero
  if preset == "cappa_l16_datacomp":  # as its comment says: split over fsdp=32
    params = sharding.unbox_shapes(helpers.abstract_params(config))
    state = jax.eval_shape(helpers.optimizer(config).init, params)
    blocks = [s.statistics.shape[0] for s in _find(state, ShampooParamState)
              if s.statistics.ndim == 3]
    split = sum(n for n in blocks if n % 32 == 0)
    assert split / sum(blocks) > 0.99, blocks


# ---------------------------------------------------------------- checkpoint


class _Trainer:
  """A tiny CapPa training with Shampoo on one device, as train.py runs it."""

  def __init__(self, tokenizer):
    # Roots at steps 0, 4, 8; preconditioned from step 3: both straddle a save at step 5.
    self.config = shampoo_config(**{"train.num_steps": 10})
    with self.config.unlocked():
      self.config.optimizer.update(start_preconditioning_step=3, preconditioning_compute_steps=4)
    self.mesh = sharding.make_mesh(
        ml_collections.ConfigDict({"data": 1, "fsdp": 1, "tensor": 1}), jax.devices()[:1])
    self.run = setup_lib.assemble(self.config, tokenizer.special, self.mesh)
    self.context = self.run.context
    data = iter(pipeline.train_dataset(self.config, tokenizer.path))
    self.batches = [next(data) for _ in range(10)]
    self.init_state = self.run.init_state()
    with self.context():
      self.step = self.run.train_step.lower(self.init_state, self.batches[0]).compile(FAST_COMPILE)

  def fresh(self):
    return jax.tree.map(jnp.copy, self.init_state)  # the step donates its input

  def train(self, state, steps):
    with self.context():
      for i in steps:
        state, _ = self.step(state, self.batches[i])
    return state

  def abstract(self):
    with self.context():
      return self.run.abstract_state()


@pytest.mark.slow
def test_shampoo_state_checkpoint_continues_the_same_trajectory(tmp_path):
  tok = small_tokenizer(shampoo_config(), str(tmp_path))
  run = _Trainer(tok)
  straight = run.train(run.fresh(), range(10))

  first = run.train(run.fresh(), range(5))
  ckpt = checkpoint.Checkpointer(tmp_path / "ckpt")
  ckpt.save(5, first)
  ckpt.close()
  del first
  restored, step, _ = checkpoint.Checkpointer(tmp_path / "ckpt").restore(run.abstract())
  assert step == 5 and int(restored.step) == 5
  assert int(_find(restored.opt_state, ShampooState)[0].count) == 5
  resumed = run.train(restored, range(5, 10))

  leaves_a, leaves_b = jax.tree.leaves(straight), jax.tree.leaves(resumed)
  assert len(leaves_a) == len(leaves_b)
  for a, b in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Shampoo did precondition: its inverse roots are no longer the identity they start as.
  precond = _down_kernel_state(resumed.opt_state).preconditioners
  assert not np.allclose(np.asarray(precond[0]), np.eye(precond.shape[-1]))


# ---------------------------------------------------------------- weight decay


@pytest.mark.slow
@pytest.mark.parametrize("name", ["adamw", "adafactor", "shampoo"])
def test_weight_decay_only_on_kernels(name):
  config = tiny_config(**{"optimizer.name": name, "optimizer.weight_decay": 0.1,
                          "schedule.name": "constant", "schedule.peak_lr": 0.1})
  params = nn.meta.unbox(helpers.task(config).init_params(jax.random.key(0)))
  optimizer = helpers.optimizer(config)
  state = optimizer.init(params)
  grads = jax.tree.map(jnp.zeros_like, params)  # only weight decay moves a param
  new = params
  for _ in range(2):
    updates, state = optimizer.update(grads, state, new)
    new = jax.tree.map(lambda p, u: p + u, new, updates)
  moved = jax.tree_util.tree_map_with_path(
      lambda path, a, b: (jax.tree_util.keystr(path), float(jnp.max(jnp.abs(a - b)))),
      params, new)
  moved = dict(jax.tree.leaves(moved, is_leaf=lambda x: isinstance(x, tuple)))
  kernels = [k for k in moved if k.endswith("['kernel']")]
  others = [k for k in moved if k not in kernels]
  assert len(kernels) >= 10 and any("['scale']" in k for k in others)
  assert {"['decoder']['token_embedding']['embedding']", "['encoder']['registers']",
          "['encoder']['pos_embedding']"} <= set(others)
  assert all(moved[k] > 1e-4 for k in kernels), moved
  assert all(moved[k] == 0.0 for k in others), moved
