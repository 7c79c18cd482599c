"""Caption likelihoods given the image tokens: many captions an image, the image encoded once
(zero-shot classification scores one image against every class prompt)."""

import functools

import jax
import jax.numpy as jnp

from capjax import objectives


@functools.partial(jax.jit, static_argnames=("model", "special"))
def log_likelihood(model, params, enc_BxSxD, tokens_BxNxL1, *, special):
  """float32[B, N]: each caption's summed token log-likelihood after BOS, EOS included and
  padding not (teacher-forced, not length-normalised, as big_vision's CapPa scoring).

  enc: `encode`'s output for B images; tokens: N tokenized captions `[BOS .. EOS PAD ..]`
  of each image."""
  b, n, length = tokens_BxNxL1.shape
  tokens_BNxL1 = tokens_BxNxL1.reshape(b * n, length)
  inputs_BNxL, targets_BNxL = objectives.split_inputs_targets(tokens_BNxL1)
  mask_1x1xLxL = objectives.causal_mask(length - 1)[None, None]
  logits_BNxLxV = model.apply({"params": params}, inputs_BNxL,
                              jnp.repeat(enc_BxSxD, n, axis=0), mask_1x1xLxL, method="decode")
  logp_BNxL = jnp.take_along_axis(jax.nn.log_softmax(logits_BNxLxV.astype(jnp.float32)),
                                  targets_BNxL[..., None], axis=-1)[..., 0]
  return jnp.where(targets_BNxL != special.pad, logp_BNxL, 0.0).sum(-1).reshape(b, n)
