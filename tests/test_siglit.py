"""SigLiT: the sigmoid loss, the text tower's pooling, a frozen CapPa tower loaded from a
workdir (bitwise unchanged by training, no optimizer state, resumable without its source), the
config taken from the tower's run, and the siglit evaluator's math and command."""

import json
import logging
import math
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from capjax import config as config_lib, evaluate, tasks, train, trained as trained_lib
from capjax import workdir as workdir_lib
from capjax.data import tokenizer as tokenizer_lib
from capjax.evals import siglit as siglit_eval
from capjax.models import text_tower
from capjax.tasks import siglit
from tests import helpers

TINY_SIGLIT = {"model.width": 32, "model.mlp_dim": 64, "model.num_heads": 2,  # random tower
               "model.enc_depth": 1, "model.num_registers": 2, "data.image_size": 32,
               "model.text.width": 32, "model.text.mlp_dim": 64, "model.text.num_heads": 2,
               "model.text.depth": 1, "train.batch_size": 16, "train.num_steps": 6,
               "train.log_every": 3, "eval.every": 0, "checkpoint.every": 0, "dtype": "float32",
               "wandb.mode": "disabled", "data.num_threads": 1, "schedule.warmup_steps": 2}


def siglit_config(**overrides):
  args = {**TINY_SIGLIT, **overrides}
  return config_lib.load("siglit_shapes", [f"--config.{k}={v}" for k, v in args.items()])


def host(tree):
  return jax.tree.map(np.asarray, tree)


def bitwise_equal(a, b) -> bool:
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  return len(leaves_a) == len(leaves_b) and all(
      x.dtype == y.dtype and x.tobytes() == y.tobytes() for x, y in zip(leaves_a, leaves_b))


# ------------------------------------------------------------------------------- the loss


def test_sigmoid_loss_equals_a_hand_computed_value():
  zimg = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
  ztxt = np.array([[0.8, 0.6], [0.0, 1.0], [1.0, 0.0]])
  t, b = 10.0, -2.71
  # logits[i][j] = t * zimg_i . ztxt_j + b; the pairs are on the diagonal.
  dots = [[0.8, 0.0, 1.0], [0.6, 1.0, 0.0], [0.96, 0.8, 0.6]]
  softplus = lambda x: math.log1p(math.exp(x))  # -log_sigmoid(-x)
  rows = [sum(softplus(-(t * d + b)) if i == j else softplus(t * d + b)
              for j, d in enumerate(row)) for i, row in enumerate(dots)]
  expected = sum(rows) / 3
  assert expected == pytest.approx(7.65814, abs=1e-5)  # row 0: 0.00503 + 0.06440 + 7.29068
  loss = siglit.sigmoid_loss(jnp.asarray(zimg), jnp.asarray(ztxt), t, b)
  assert float(loss) == pytest.approx(expected, rel=1e-6)


def test_text_tower_pools_the_eos_token_and_ignores_padding():
  tower = text_tower.TextTower(vocab_size=20, max_len=8, width=16, depth=2, mlp_dim=32,
                               num_heads=2, out_dim=4, pad_id=0, dtype=jnp.float32)
  tokens = jnp.array([[5, 6, 7, 2, 0, 0, 0, 0], [9, 2, 0, 0, 0, 0, 0, 0]])
  params = jax.jit(tower.init)(jax.random.key(0), tokens)
  apply = jax.jit(tower.apply)
  out = apply(params, tokens)
  assert out.shape == (2, 4) and out.dtype == jnp.float32
  np.testing.assert_array_equal(text_tower.last_token_index(tokens, 0), [3, 1])
  # Fewer pad columns, or other ids under the padding mask's keys: the same embedding.
  np.testing.assert_allclose(apply(params, tokens[:1, :4]), out[:1], atol=1e-5)
  np.testing.assert_allclose(apply(params, tokens[1:, :2]), out[1:], atol=1e-5)
  # A different word before EOS changes it.
  assert not np.allclose(apply(params, tokens.at[0, 1].set(11))[0], out[0], atol=1e-3)


def test_only_the_image_tower_is_frozen():
  config = siglit_config()
  task = helpers.task(config)
  params = jax.eval_shape(task.init_params, jax.random.key(0))
  trainable = task.trainable(params)
  assert set(trainable) == {"encoder", "image_pool_head", "text", "log_temperature", "bias"}
  assert not any(jax.tree.leaves(trainable["encoder"]))
  assert all(jax.tree.leaves({k: v for k, v in trainable.items() if k != "encoder"}))


def test_temperature_and_bias_start_at_the_configured_values():
  config = siglit_config(**{"model.bias_init": -10.0})
  params = nn.meta.unbox(jax.jit(helpers.task(config).init_params)(jax.random.key(0)))
  assert float(jnp.exp(params["log_temperature"])) == pytest.approx(10.0)
  assert float(params["bias"]) == -10.0


# ------------------------------------------------- config and tokenizer from the tower's run


@pytest.fixture
def fake_export(tmp_path):
  """An export-layout directory (config, tokenizer; its params are never read here)."""
  out = tmp_path / "tower"
  out.mkdir()
  config = helpers.tiny_config(**{"model.width": 48, "model.enc_depth": 2,
                                  "model.num_registers": 3, "data.image_size": 48,
                                  "data.lowercase": True})
  tokenizer_lib.train(["a small red circle", "a large blue square left of a cross"] * 4,
                      str(out / "tokenizer.model"), 64, "word")
  (out / "config.json").write_text(config.to_json())
  (out / "export.json").write_text(json.dumps({"format": trained_lib.EXPORT_FORMAT, "step": 1}))
  return out


def test_a_fresh_run_takes_the_towers_sizes_and_tokenizer_from_its_run(fake_export, tmp_path):
  config = siglit_config(**{"init.image_tower": str(fake_export)})
  assert config.model.width == 32  # the random tower's
  run = tasks.prepare_run(config, str(tmp_path / "run"))
  assert (run.model.width, run.model.enc_depth, run.model.num_registers, run.model.patch_size,
          run.data.image_size, run.data.lowercase) == (48, 2, 3, 8, 48, True)
  assert run.model.text.width == 32 and run.model.image_pool == "map"  # its own keys stay
  assert run.is_locked
  assert ((tmp_path / "run" / "tokenizer.model").read_bytes()
          == (fake_export / "tokenizer.model").read_bytes())


def test_a_different_tokenizer_in_the_workdir_is_refused_in_one_line(fake_export, tmp_path):
  workdir = tmp_path / "run"
  tokenizer_lib.train(["one two three four"] * 3, str(workdir / "tokenizer.model"), 16, "word")
  config = siglit_config(**{"init.image_tower": str(fake_export)})
  with pytest.raises(config_lib.ConfigError, match=r"is not the tokenizer of init.image_tower"
                     ) as e:
    tasks.prepare_run(config, str(workdir))
  assert "\n" not in str(e.value)


def test_a_missing_tower_is_a_one_line_config_error(tmp_path):
  config = siglit_config(**{"init.image_tower": str(tmp_path / "nowhere")})
  with pytest.raises(config_lib.ConfigError, match=r"init.image_tower=.*nowhere.*neither a "
                     "capjax workdir"):
    tasks.prepare_run(config, str(tmp_path / "run"))


def test_without_a_tower_a_warning_and_the_preset_unchanged(tmp_path, caplog):
  config = siglit_config()
  with caplog.at_level(logging.WARNING):
    assert tasks.prepare_run(config, str(tmp_path / "run")) is config
  assert "init.image_tower is not set" in caplog.text


def test_pooling_needs_registers_to_pool_registers():
  with pytest.raises(config_lib.ConfigError, match="model.image_pool='registers' needs"):
    siglit_config(**{"model.image_pool": "registers", "model.num_registers": 0})


# ----------------------------------------------------------------- the evaluator's math


def test_class_embeddings_average_prompts_then_renormalise():
  z = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
  out = siglit_eval.class_embeddings(z, np.array([0, 0, 1]), 2)
  np.testing.assert_allclose(out, [[2**-0.5, 2**-0.5], [0.6, 0.8]], atol=1e-6)


def test_recall_counts_any_correct_candidate_and_ties_for_the_query():
  scores = np.array([[0.9, 0.1, 0.5, 0.3],
                     [0.2, 0.8, 0.8, 0.1],
                     [0.7, 0.6, 0.5, 0.4]])
  correct = np.array([[False, False, True, True],  # best correct 0.5: one above it
                      [False, False, True, False],  # tied with the top one: rank 0
                      [False, False, False, True]])  # 0.4 is last: three above it
  ranks = siglit_eval.rank_of_best(scores, correct)
  np.testing.assert_array_equal(ranks, [1, 0, 3])
  assert siglit_eval.recalls(ranks, (1, 2, 4)) == {1: pytest.approx(1 / 3),
                                                   2: pytest.approx(2 / 3), 4: 1.0}


def test_shapes_prompts_speak_the_captions_language():
  prompts = siglit_eval.shapes_prompts("colour", ("red", "blue"))
  assert len(prompts[0]) == 2 * 4 * 4  # sizes x shapes x single-object paraphrases
  assert "a small red circle" in prompts[0] and all("red" in p for p in prompts[0])
  count = siglit_eval.shapes_prompts("count", ("one", "two", "three"))
  assert any(p.startswith("two shapes a ") for p in count[1])
  assert any(p.startswith("three shapes a ") for p in count[2])
  assert siglit_eval.template_prompts(("golden_retriever",), "a photo of a {}") == [
      ["a photo of a golden retriever"]]


# ----------------------------------------------------- training on a trained CapPa tower


@pytest.fixture(scope="module")
def cappa_workdir(tmp_path_factory):
  """A tiny CapPa trained a few steps: its tower is what SigLiT must leave untouched."""
  workdir = tmp_path_factory.mktemp("cappa")
  config = helpers.tiny_config(**{"train.num_steps": 4, "checkpoint.every": 4,
                                  "eval.every": 0, "schedule.warmup_steps": 1})
  train.train(config, str(workdir))
  return str(workdir)


@pytest.fixture(scope="module")
def siglit_run(cappa_workdir, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("siglit")
  config = siglit_config(**{"init.image_tower": cappa_workdir, "checkpoint.every": 3})
  state, _ = train.train(config, str(workdir))
  return str(workdir), host(state), config


@pytest.mark.slow
def test_siglit_trains_on_a_bitwise_frozen_tower(cappa_workdir, siglit_run):
  workdir, state, config = siglit_run
  tower = host(trained_lib.load(cappa_workdir).params["encoder"])
  assert int(state.step) == 6
  assert bitwise_equal(state.params["encoder"], tower)
  paths = [jax.tree_util.keystr(p)
           for p, _ in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]]
  assert any("'text'" in p for p in paths)
  assert not any("'encoder'" in p for p in paths), paths
  prepared = tasks.prepare_run(config, workdir)  # the run's own config, from its checkpoint
  fresh = nn.meta.unbox(jax.jit(helpers.task(prepared).init_params)(
      jax.random.key(prepared.seed)))
  assert not bitwise_equal(state.params["text"], fresh["text"])
  rows = [json.loads(line) for line in (workdir_lib.metrics(workdir)).read_text().splitlines()]
  losses = [r["train/loss"] for r in rows if "train/loss" in r]
  assert losses and all(np.isfinite(losses))
  assert all(r["train/temperature"] > 0 for r in rows if "train/temperature" in r)
  # The saved config names the tower's sizes: the run loads without its source.
  saved = trained_lib.load(workdir)
  assert saved.config.model.width == 32 and saved.config.task == "siglit"


@pytest.mark.slow
def test_a_resumed_run_does_not_read_its_tower_again(cappa_workdir, siglit_run, tmp_path):
  workdir, state, _ = siglit_run
  copy = tmp_path / "siglit"
  shutil.copytree(workdir, copy)
  shutil.rmtree(copy / "checkpoints" / "6")  # as if stopped after step 3
  config = siglit_config(**{"init.image_tower": str(tmp_path / "gone"), "checkpoint.every": 3})
  resumed, _ = train.train(config, str(copy))
  resumed = host(resumed)
  assert int(resumed.step) == 6
  assert bitwise_equal(resumed.params, state.params)


@pytest.mark.slow
def test_siglit_eval_prints_zero_shot_and_retrieval(siglit_run, capsys):
  workdir, _, _ = siglit_run
  evaluate.main([f"--workdir={workdir}", "--eval=siglit", "--num_examples=64",
                 "--retrieval_examples=32", "--batch_size=32"])
  out = capsys.readouterr()
  metrics = json.loads(out.out.strip().splitlines()[-1])
  assert metrics["eval"] == "siglit" and metrics["step"] == 6
  for name, classes in (("shape", 4), ("colour", 6), ("size", 2), ("count", 3)):
    assert 0 <= metrics[f"zeroshot_{name}"] <= 1
    assert metrics[f"zeroshot_{name}_chance"] == pytest.approx(1 / classes)
  assert metrics["retrieval_images"] == 32 and metrics["retrieval_texts"] == 32 * 4
  for direction in ("image_to_text", "text_to_image"):
    r = [metrics[f"{direction}_R@{k}"] for k in (1, 5, 10)]
    assert 0 <= r[0] <= r[1] <= r[2] <= 1
  assert "zero-shot shape" in out.err and "retrieval over 32 images" in out.err
