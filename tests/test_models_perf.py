"""The speed-motivated model code paths compute what the plain ones do."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from capjax import objectives
from capjax.tasks import cappa as cappa_task
from capjax.models import cappa as cappa_model, layers
from tests import helpers
from tests.helpers import random_head, tiny_config


def _init(config):
  task = helpers.task(config)
  # the head starts at zero: logits would not compare
  return task.model, random_head(nn.meta.unbox(task.init_params(jax.random.key(0))))


def _inputs(config, b=3):
  rng = np.random.default_rng(0)
  s, length = config.data.image_size, config.model.max_len
  images = jnp.asarray(rng.uniform(-1, 1, (b, s, s, 3)), jnp.float32)
  tokens = jnp.asarray(rng.integers(5, config.model.vocab_size, (b, length)), jnp.int32)
  return images, tokens


def test_fused_projections_keep_logical_axes():
  config = tiny_config()
  abstract = helpers.abstract_params(config)
  layer = abstract["decoder"]["layers"]
  assert layer["self_attention"]["qkv"]["kernel"].names == ("layers", "embed", None, "heads", "kv")
  assert layer["cross_attention"]["kv"]["kernel"].names == ("layers", "embed", None, "heads", "kv")
  assert layer["cross_attention"]["query"]["kernel"].names == ("layers", "embed", "heads", "kv")
  assert layer["mlp"]["wi"]["kernel"].names == ("layers", "embed", None, "mlp")
  m = config.model
  assert layer["mlp"]["wi"]["kernel"].value.shape == (m.dec_depth, m.width, 2, m.mlp_dim)


@pytest.mark.parametrize("policy", layers.MATMUL_POLICIES)
def test_fused_attention_matches_explicit_weights(policy):
  """The training path (legacy: jax.nn.dot_product_attention) == the path that sows weights."""
  config = tiny_config(**{"model.matmul_policy": policy})
  model, params = _init(config)
  images, tokens = _inputs(config)
  length = tokens.shape[1]
  parallel = jnp.array([True, False, False])
  mask = cappa_task.self_attention_mask(parallel, length)
  fast = model.apply({"params": params}, images, tokens, mask)
  explicit, state = model.apply({"params": params}, images, tokens, mask,
                                mutable=["intermediates"])
  np.testing.assert_allclose(fast, explicit, atol=2e-5, rtol=2e-5)
  weights = state["intermediates"]["decoder"]["layers"]["self_attention"]["attention_weights"][0]
  np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-5)
  # Causal rows put no weight on later positions.
  assert float(jnp.abs(jnp.triu(weights[:, 1], k=1)).max()) == 0.0


def test_broadcast_mask_matches_per_example_mask():
  config = tiny_config()
  model, params = _init(config)
  images, tokens = _inputs(config)
  causal = objectives.causal_mask(tokens.shape[1])
  one = model.apply({"params": params}, images, tokens, causal[None, None])
  each = model.apply({"params": params}, images, tokens,
                     jnp.broadcast_to(causal, (3, 1) + causal.shape))
  np.testing.assert_allclose(one, each, atol=1e-6)


@pytest.mark.slow
def test_scan_unroll_does_not_change_the_model():
  config = tiny_config(**{"model.enc_depth": 2, "model.dec_depth": 2})
  model, params = _init(config)
  images, tokens = _inputs(config)
  mask = objectives.causal_mask(tokens.shape[1])[None, None]
  unrolled = cappa_model.CapPa(**{**{f: getattr(model, f) for f in (
      "vocab_size", "max_len", "patch_size", "width", "enc_depth", "dec_depth", "mlp_dim",
      "num_heads", "num_registers", "remat_policy", "dtype")}, "scan_unroll": 2})
  a = model.apply({"params": params}, images, tokens, mask)
  b = unrolled.apply({"params": params}, images, tokens, mask)
  np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_unstack_splits_and_routes_gradients():
  x = jnp.arange(24.0).reshape(2, 3, 4)
  parts = layers.unstack(x, axis=1)
  assert len(parts) == 3 and parts[1].shape == (2, 4)
  np.testing.assert_array_equal(parts[2], x[:, 2])
  grad = jax.grad(lambda x: sum(jnp.sum(p * (i + 1)) for i, p in enumerate(layers.unstack(x, 1))))
  np.testing.assert_array_equal(grad(x)[0, :, 0], [1.0, 2.0, 3.0])
