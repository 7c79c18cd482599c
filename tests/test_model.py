"""CapPa model and objective: masking, causality, registers, dtypes, parameter count."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from capjax import config as config_lib, objectives
from capjax.tasks import cappa as cappa_task
from tests import helpers
from tests.helpers import random_head, tiny_config

MASK_ID, PAD_ID = 4, 0


def _init(config):
  """The model and params with a random vocabulary head (it starts at zero, which would
  hide every input's effect on the logits)."""
  task = helpers.task(config)
  return task.model, random_head(nn.meta.unbox(task.init_params(jax.random.key(0))))


def _batch(config, b=4, seed=0):
  rng = np.random.default_rng(seed)
  s, length = config.data.image_size, config.model.max_len
  images = jnp.asarray(rng.uniform(-1, 1, (b, s, s, 3)), jnp.float32)
  tokens = jnp.asarray(rng.integers(5, config.model.vocab_size, (b, length + 1)), jnp.int32)
  return images, tokens


def test_parallel_rows_see_only_mask_and_full_attention():
  config = tiny_config()
  _, tokens = _batch(config, b=64)
  inputs, targets, mask, parallel = cappa_task.cappa_inputs(
      tokens, jax.random.key(1), 0.5, MASK_ID)
  parallel = np.asarray(parallel)
  assert 0 < parallel.sum() < 64  # both kinds of rows present
  np.testing.assert_array_equal(np.asarray(inputs)[parallel], MASK_ID)
  np.testing.assert_array_equal(np.asarray(inputs)[~parallel], np.asarray(tokens)[~parallel, :-1])
  np.testing.assert_array_equal(np.asarray(targets), np.asarray(tokens)[:, 1:])
  mask = np.asarray(mask)[:, 0]
  assert mask[parallel].all()
  causal = np.tril(np.ones(mask.shape[1:], bool))
  np.testing.assert_array_equal(mask[~parallel], np.broadcast_to(causal, mask[~parallel].shape))


@pytest.mark.parametrize("prob,expected", [(0.0, 0), (1.0, 64)])
def test_masked_pred_prob_ends(prob, expected):
  _, tokens = _batch(tiny_config(), b=64)
  *_, parallel = cappa_task.cappa_inputs(tokens, jax.random.key(1), prob, MASK_ID)
  assert int(np.sum(parallel)) == expected


def test_captioning_is_causal_and_parallel_is_not():
  config = tiny_config()
  model, params = _init(config)
  images, tokens = _batch(config)
  inputs = tokens[:, :-1]
  changed = inputs.at[:, 5].set((inputs[:, 5] + 1) % config.model.vocab_size)
  length = inputs.shape[1]
  causal = objectives.causal_mask(length)[None, None]
  full = jnp.ones((1, 1, length, length), bool)
  logits = jax.jit(lambda toks, mask: model.apply({"params": params}, images, toks, mask))
  a, b = logits(inputs, causal), logits(changed, causal)
  np.testing.assert_allclose(a[:, :5], b[:, :5], atol=1e-6)  # earlier positions unchanged
  assert np.abs(np.asarray(a[:, 5:] - b[:, 5:])).max() > 1e-4
  a, b = logits(inputs, full), logits(changed, full)
  assert np.abs(np.asarray(a[:, :5] - b[:, :5])).max() > 1e-4  # bidirectional


def test_registers_change_decoder_output():
  config = tiny_config()
  model, params = _init(config)
  images, tokens = _batch(config)
  mask = objectives.causal_mask(config.model.max_len)[None, None]
  enc = jax.jit(lambda p: model.apply({"params": p}, images, method="encode"))(params)
  n_patches = (config.data.image_size // config.model.patch_size) ** 2
  assert enc.shape[1] == n_patches + config.model.num_registers  # registers are kept
  apply = jax.jit(lambda p: model.apply({"params": p}, images, tokens[:, :-1], mask))
  bumped = jax.tree.map(lambda x: x, params)
  bumped["encoder"]["registers"] = params["encoder"]["registers"] + 1.0
  out, out2 = apply(params), apply(bumped)
  assert np.abs(np.asarray(out - out2)).max() > 1e-3


def test_bfloat16_activations_float32_logits_and_loss():
  config = tiny_config(dtype="bfloat16")
  model, params = _init(config)
  images, tokens = _batch(config)
  images = images.astype(jnp.bfloat16)
  mask = objectives.causal_mask(config.model.max_len)[None, None]
  logits, state = jax.jit(lambda p: model.apply(
      {"params": p}, images, tokens[:, :-1], mask, capture_intermediates=True))(params)
  inter = state["intermediates"]
  enc_out = inter["encoder"]["__call__"][0]
  mlp_out = inter["decoder"]["layers"]["mlp"]["__call__"][0]
  assert enc_out.dtype == jnp.bfloat16 and mlp_out.dtype == jnp.bfloat16
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  assert logits.dtype == jnp.float32
  weights = jax.tree.leaves(state["intermediates"]["decoder"]["layers"]["self_attention"])
  assert any(w.dtype == jnp.float32 and w.ndim == 5 for w in weights)  # attention probs
  loss = objectives.token_cross_entropy(logits, tokens[:, 1:], PAD_ID)
  assert loss.dtype == jnp.float32


def analytic_cappa_params(m, image_size):
  """Parameter count of our CapPa written out by hand."""
  d, mlp, v = m.width, m.mlp_dim, m.vocab_size
  n = (image_size // m.patch_size) ** 2
  block_norms = 3 * d + mlp  # pre/post attention, pre mlp over D; mid mlp over M
  encoder = (m.patch_size**2 * 3 * d + n * d + m.num_registers * d
             + m.enc_depth * (4 * d * d + 3 * d * mlp + block_norms) + d)
  decoder = (v * d + m.max_len * d
             + m.dec_depth * (8 * d * d + 3 * d * mlp + block_norms + 2 * d) + d
             + d * v + v)
  return encoder + decoder


def test_cappa_l16_parameter_count():
  config = config_lib.load("cappa_l16_datacomp")
  abstract = helpers.abstract_params(config)
  count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.meta.unbox(abstract)))
  expected = analytic_cappa_params(config.model, config.data.image_size)
  assert abs(count - expected) / expected < 0.02, (count, expected)
  vision = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.meta.unbox(abstract["encoder"])))
  assert 320e6 < vision < 335e6  # seed 003 reports 328M for the vision tower
  # Seed 003: 676M in all, 348M for the text tower (its 65,536-token vocabulary).
  assert abs(count - 676e6) / 676e6 < 0.02, count
  assert abs((count - vision) - 348e6) / 348e6 < 0.02, count - vision


def test_every_param_has_logical_axes():
  config = tiny_config()
  abstract = helpers.abstract_params(config)
  specs = jax.tree.leaves(nn.get_partition_spec(abstract), is_leaf=lambda x: x is None)
  leaves = jax.tree.leaves(abstract, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
  assert len(specs) == len(leaves)
