"""The tasks seam: a family defined in this file alone trains, checkpoints and resumes through
`capjax.train.train`; frozen params stay put and carry no optimizer state; CapPa's predict
functions (greedy generation, caption scores) and the attribute evaluator on a trained model."""

import json
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from capjax import evaluate, objectives, setup as setup_lib, tasks, train, trained as trained_lib
from capjax import trainer
from capjax.data import synthetic
from capjax.evals import attributes
from capjax.tasks import base
from tests import helpers


class OneLayerCaptioner(nn.Module):
  """Next token from the current token plus the image's mean colour: one hidden layer."""
  vocab_size: int
  width: int

  @nn.compact
  def __call__(self, images_BxSxSx3, tokens_BxL):
    dense = lambda n, axes, name: nn.Dense(n, use_bias=False, name=name, kernel_init=(
        nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes)))
    image_BxD = dense(self.width, (None, "embed"), "image")(images_BxSxSx3.mean(axis=(1, 2)))
    embed = nn.Embed(self.vocab_size, self.width, name="embed", embedding_init=(
        nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed"))))
    x_BxLxD = nn.tanh(embed(tokens_BxL) + image_BxD[:, None])
    return dense(self.vocab_size, ("embed", "vocab"), "head")(x_BxLxD)


@tasks.register("one_layer_test")
class OneLayerTask(base.Task):
  """Everything the framework needs of a family, and nothing else."""

  def build_model(self):
    return OneLayerCaptioner(self.config.model.vocab_size, self.config.model.width)

  def batch_spec(self, batch_size):
    return base.caption_batch_spec(self.config, batch_size)

  def init_inputs(self):
    s, length = self.config.data.image_size, self.config.model.max_len
    return jnp.zeros((1, s, s, 3), self.dtype), jnp.zeros((1, length), jnp.int32)

  def eval_loss(self, params, batch):
    inputs_BxL, targets_BxL = objectives.split_inputs_targets(batch["tokens"])
    images = base.normalize_images(batch["image"], self.dtype)
    logits_BxLxV = self.model.apply({"params": params}, images, inputs_BxL)
    return objectives.token_cross_entropy(logits_BxLxV, targets_BxL, self.special.pad)

  def train_loss(self, params, batch, rng):
    del rng
    return self.eval_loss(params, batch), {"tokens": jnp.sum(batch["tokens"] != self.special.pad)}

  def flops_per_example(self):
    m = self.config.model
    return 6.0 * m.max_len * m.width * m.vocab_size


@tasks.register("one_layer_frozen_image_test")
class FrozenImageTask(OneLayerTask):
  """The image projection is a frozen tower."""

  def trainable(self, params):
    return {name: jax.tree.map(lambda _, n=name: n != "image", sub) for name, sub in params.items()}


def config_for(task: str, **overrides):
  return helpers.tiny_config(**{"task": task, "model.width": 16, "train.batch_size": 8,
                                "train.log_every": 2, "eval.every": 0, "schedule.warmup_steps": 1,
                                **overrides})


def host(tree):
  return jax.tree.map(np.asarray, tree)


def bitwise_equal(a, b) -> bool:
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  return len(leaves_a) == len(leaves_b) and all(
      x.dtype == y.dtype and x.tobytes() == y.tobytes() for x, y in zip(leaves_a, leaves_b))


@pytest.mark.slow
def test_a_family_defined_in_a_test_trains_checkpoints_and_resumes_exactly(tmp_path):
  config = config_for("one_layer_test", **{"train.num_steps": 6, "checkpoint.every": 3,
                                           "checkpoint.keep": 0})
  workdir = tmp_path / "run"
  state, _ = train.train(config, str(workdir))
  straight = host(state)
  assert int(straight.step) == 6
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  losses = [r["train/loss"] for r in rows if "train/loss" in r]
  assert len(losses) == 3 and losses[-1] < losses[0], losses
  assert all(r["train/tokens"] > 8 for r in rows if "train/tokens" in r)  # the task's aux

  shutil.rmtree(workdir / "checkpoints" / "6")  # as if killed between steps 3 and 6
  state, _ = train.train(config, str(workdir))
  assert int(state.step) == 6
  assert bitwise_equal(host(state), straight)


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["adamw", "shampoo"])
def test_frozen_params_stay_bitwise_and_hold_no_optimizer_state(tmp_path, optimizer):
  config = config_for("one_layer_frozen_image_test", **{
      "train.num_steps": 4, "checkpoint.every": 2, "optimizer.name": optimizer,
      "optimizer.block_size": 16, "optimizer.start_preconditioning_step": 1})
  initial = host(setup_lib.assemble(config, helpers.task(config).special).init_state())
  state, _ = train.train(config, str(tmp_path / "run"))
  final = host(state)
  assert bitwise_equal(final.params["image"], initial.params["image"])
  for name in ("embed", "head"):
    assert not bitwise_equal(final.params[name], initial.params[name]), name
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(
      final.opt_state)[0]]
  assert any("'head'" in p for p in paths)  # the trained params have moments
  assert not any("'image'" in p for p in paths), paths  # the frozen ones have none
  # The saved checkpoint restores with the same (masked) optimizer state.
  restored = trained_lib.load(str(tmp_path / "run"))
  assert bitwise_equal(host(restored.params), final.params)


def test_frozen_params_get_no_gradient():
  config = config_for("one_layer_frozen_image_test")
  run = setup_lib.assemble(config, helpers.task(config).special)
  batch = {k: jnp.ones(x.shape, x.dtype) for k, x in run.abstract_batch().items()}
  loss = lambda p: run.task.train_loss(trainer.freeze(p, run.trainable), batch, None)[0]
  grads = jax.grad(loss)(run.init_state().params)
  assert not np.any(np.asarray(grads["image"]["kernel"]))
  assert np.any(np.asarray(grads["head"]["kernel"]))


# ---------------------------------------------------------------- CapPa predict functions


@pytest.fixture(scope="module")
def trained_cappa(tmp_path_factory):
  """A tiny CapPa trained 60 steps on shapes, all autoregressive."""
  workdir = tmp_path_factory.mktemp("cappa")
  config = helpers.tiny_config(**{"train.num_steps": 60, "checkpoint.every": 60,
                                  "objective.masked_pred_prob": 0.0, "eval.every": 0,
                                  "schedule.warmup_steps": 10})
  train.train(config, str(workdir))
  return str(workdir)


@pytest.mark.slow
def test_greedy_tokens_are_the_argmax_of_their_own_teacher_forced_logits(trained_cappa):
  trained = trained_lib.load(trained_cappa)
  task, special = trained.task, trained.tokenizer.special
  images = synthetic.make_source(trained.config.data, "test")
  images_Bx = np.stack([images[i]["image"] for i in range(8)])
  out_BxL = np.asarray(task.predict_fns()["generate"](trained.params, images_Bx))
  assert out_BxL.shape == (8, trained.config.model.max_len)
  tokens_BxL1 = np.concatenate([np.full((8, 1), special.bos), out_BxL], axis=1)
  normalized = base.normalize_images(jnp.asarray(images_Bx), task.dtype)
  logits = np.asarray(task.model.apply(
      {"params": trained.params}, normalized, jnp.asarray(tokens_BxL1[:, :-1]),
      objectives.causal_mask(out_BxL.shape[1])[None, None]))
  ended = False
  for row, row_logits in zip(out_BxL, logits):
    for i, token in enumerate(row):
      if token == special.eos:
        ended = True
        assert np.all(row[i + 1:] == special.pad)  # after EOS: padding only
        break
      assert token == np.argmax(row_logits[i]), (row, i)
  assert ended  # 60 steps teach the captions' end

  # Scores: the greedy caption is more likely than the same caption with a token changed.
  scores = task.predict_fns()["score_captions"]
  swapped = tokens_BxL1.copy()
  swapped[:, 2] = (swapped[:, 2] + 7) % trained.tokenizer.vocab_size
  assert np.all(np.asarray(scores(trained.params, images_Bx, tokens_BxL1))
                > np.asarray(scores(trained.params, images_Bx, swapped)))


@pytest.mark.slow
def test_attribute_eval_command_on_a_trained_model(trained_cappa, capsys):
  evaluate.main([f"--workdir={trained_cappa}", "--eval=attributes", "--num_examples=32",
                 "--show=2"])
  out = capsys.readouterr()
  metrics = json.loads(out.out.strip().splitlines()[-1])
  assert metrics["eval"] == "attributes" and metrics["num_images"] == 32 and metrics["step"] == 60
  assert out.err.count("generated:") == 2
  trained = trained_lib.load(trained_cappa)
  untrained = trained_lib.Trained(trained.config, trained.task, jax.tree.map(
      jnp.zeros_like, trained.params), trained.tokenizer, 0)
  baseline = attributes.attribute_accuracy(untrained, num_examples=32, show=0)
  assert metrics["attribute_accuracy"] > baseline["attribute_accuracy"] + 0.1, (metrics, baseline)


def test_images_are_scaled_to_minus_one_one_on_device():
  normed = base.normalize_images(jnp.asarray([[[0, 255, 51]]], jnp.uint8), jnp.float32)
  np.testing.assert_allclose(np.asarray(normed), [[[-1.0, 1.0, -0.6]]], atol=1e-6)


def test_unknown_task_is_a_one_line_config_error():
  with pytest.raises(Exception, match=r"Unknown task='nope'; expected one of .*'cappa'"):
    helpers.task(helpers.tiny_config(task="nope"))
