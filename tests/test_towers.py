"""The towers that mirror Hugging Face models: KV-cache decoding equals the full forward, a
prefix of embeddings, logical axis names on every param, bfloat16 compute."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from capjax import config as config_lib, sharding
from capjax.models import clip, gpt2, hf, llama, plain_vit

LMS = {
    "gpt2": lambda **kw: gpt2.GPT2(vocab_size=101, max_len=24, width=72, depth=2, num_heads=3,
                                   mlp_dim=100, **kw),
    "llama_gqa": lambda **kw: llama.Llama(vocab_size=101, width=72, depth=2, num_heads=6,
                                          num_kv_heads=2, mlp_dim=100, rope_theta=500.0, **kw),
    "llama_tied": lambda **kw: llama.Llama(vocab_size=101, width=72, depth=2, num_heads=3,
                                           mlp_dim=100, tie_embeddings=True, **kw),
}
TOWERS = {
    "clip": lambda: clip.CLIPVision(image_size=24, patch_size=8, width=72, depth=2,
                                    num_heads=3, mlp_dim=100, projection_dim=40),
    "vit": lambda: plain_vit.PlainViT(image_size=24, patch_size=8, width=72, depth=2,
                                      num_heads=3, mlp_dim=100),
}


FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _params(module, seed=0):
  """Random params of the module's shapes (norm scales near 1), without compiling its init."""
  shapes = sharding.unbox_shapes(jax.eval_shape(
      lambda: module.init(jax.random.key(0), hf.example_input(module))))
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map_with_path(
      lambda path, s: jnp.asarray(float(path[-1].key == "scale") + 0.15 * rng.standard_normal(
          s.shape), jnp.float32), shapes)


def _apply(module):
  return jax.jit(module.apply, static_argnames=("return_embedding",),
                 compiler_options=FAST_COMPILE)


def _tokens(b=2, length=7, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, 101, (b, length)), jnp.int32)


def _empty_cache(module, params, b, max_len):
  """The cache the convention's first call makes (zeros), from shapes alone."""
  shapes = jax.eval_shape(lambda: module.apply(
      params, jnp.zeros((b, max_len), jnp.int32), decode=True, mutable=["cache"])[1]["cache"])
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def _run_cached(module, params, cache, chunks):
  """Feeds (tokens, embeds) chunks through the cache; returns the concatenated logits."""
  step = jax.jit(lambda params, cache, tokens, embeds: module.apply(
      {**params, "cache": cache}, tokens, embeds, decode=True, mutable=["cache"]),
      compiler_options=FAST_COMPILE)
  logits = []
  for tokens, embeds in chunks:
    out, variables = step(params, cache, tokens, embeds)
    cache = variables["cache"]
    logits.append(out)
  return jnp.concatenate(logits, axis=1)


@pytest.mark.parametrize("name", sorted(LMS))
def test_cached_decoding_one_token_at_a_time_equals_the_full_forward(name):
  module = LMS[name]()
  params = _params(module)
  tokens_BxL = _tokens()
  full_BxLxV = _apply(module)(params, tokens_BxL)
  # The convention's initialisation: a full-length dummy with decode=True.
  init_cache = jax.jit(lambda params, dummy: module.apply(
      params, dummy, decode=True, mutable=["cache"])[1]["cache"], compiler_options=FAST_COMPILE)
  cache = init_cache(params, jnp.zeros((2, 12), jnp.int32))
  same = jax.tree.map(np.array_equal, cache, _empty_cache(module, params, 2, 12))
  assert all(jax.tree.leaves(same))  # the init call writes nothing
  steps = [(tokens_BxL[:, i:i + 1], None) for i in range(tokens_BxL.shape[1])]
  cached_BxLxV = _run_cached(module, params, cache, steps)
  np.testing.assert_allclose(cached_BxLxV, full_BxLxV, atol=1e-5, rtol=0)
  assert float(jnp.abs(full_BxLxV).max()) > 0.1  # not trivially zero


@pytest.mark.parametrize("name", ["gpt2", "llama_gqa"])
def test_embedding_prefix_then_tokens_prefilled_and_decoded(name):
  module = LMS[name]()
  params = _params(module)
  embeds_BxPxD = jax.random.normal(jax.random.key(3), (2, 4, 72))
  tokens_BxL = _tokens(length=5)
  apply = _apply(module)
  full = apply(params, tokens_BxL, embeds_BxPxD)
  assert full.shape == (2, 9, 101)
  # The prefix changes what the tokens see, and only a causal future: the prefix' own logits
  # do not depend on the tokens.
  alone = apply(params, tokens_BxL)
  assert float(jnp.abs(full[:, 4:] - alone).max()) > 1e-3
  np.testing.assert_allclose(apply(params, None, embeds_BxPxD), full[:, :4], atol=1e-5)
  # Prefill the prefix and the first token in one call, then one token at a time.
  cache = _empty_cache(module, params, 2, 16)
  chunks = [(tokens_BxL[:, :1], embeds_BxPxD)] + [
      (tokens_BxL[:, i:i + 1], None) for i in range(1, 5)]
  np.testing.assert_allclose(_run_cached(module, params, cache, chunks), full, atol=1e-5, rtol=0)


def test_inputs_are_checked():
  module = LMS["gpt2"]()
  params = _params(module)
  with pytest.raises(ValueError, match="tokens_BxL, embeds_BxPxD"):
    module.apply(params)
  with pytest.raises(ValueError, match="width 8"):
    module.apply(params, None, jnp.zeros((1, 2, 8)))
  with pytest.raises(ValueError, match="max_len=24"):
    module.apply(params, _tokens(length=25))
  tower = TOWERS["clip"]()
  with pytest.raises(ValueError, match="for 24x24"):
    tower.apply(_params(tower), jnp.zeros((1, 32, 32, 3)))


@pytest.mark.parametrize("name", sorted(LMS) + sorted(TOWERS))
def test_every_param_has_logical_axis_names_the_rules_know(name):
  module = {**LMS, **TOWERS}[name]()
  boxed = jax.eval_shape(lambda: module.init(jax.random.key(0), hf.example_input(module)))
  leaves = jax.tree.leaves(boxed["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))
  known = {name for name, _ in config_lib.DEFAULT_SHARDING_RULES}
  for leaf in leaves:
    assert isinstance(leaf, nn.Partitioned)
    assert len(leaf.names) == leaf.value.ndim
    assert all(n is None or n in known for n in leaf.names), leaf.names
    assert leaf.value.dtype == jnp.float32


def test_vision_towers_give_hidden_states_and_the_clip_embedding():
  pixels = jax.random.normal(jax.random.key(1), (2, 24, 24, 3))
  for name, width in (("clip", 72), ("vit", 72)):
    tower = TOWERS[name]()
    assert _apply(tower)(_params(tower), pixels).shape == (2, 10, width)
  tower = TOWERS["clip"]()
  hidden, embedding = _apply(tower)(_params(tower), pixels, return_embedding=True)
  assert hidden.shape == (2, 10, 72) and embedding.shape == (2, 40)


@pytest.mark.parametrize("name", ["gpt2", "llama_gqa"])
def test_bfloat16_compute_keeps_float32_params_and_logits(name):
  params = _params(LMS[name]())
  tokens_BxL = _tokens()
  full = _apply(LMS[name]())(params, tokens_BxL)
  half = _apply(LMS[name](dtype=jnp.bfloat16))(params, tokens_BxL)
  assert half.dtype == jnp.float32
  np.testing.assert_allclose(half, full, atol=0.05 * float(jnp.abs(full).max()))


def test_f32_accum_gradients_equal_plain_autodiff_through_grouped_attention():
  module = LMS["llama_gqa"]()
  params, tokens_BxL = _params(module), _tokens()

  def grads(policy):
    loss = lambda p: jnp.mean(jax.nn.log_softmax(
        LMS["llama_gqa"](matmul_policy=policy).apply(p, tokens_BxL))[..., 0])
    return jax.jit(jax.grad(loss), compiler_options=FAST_COMPILE)(params)

  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=0),
               grads("f32_accum"), grads("legacy"))
