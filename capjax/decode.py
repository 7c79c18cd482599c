"""Caption decoding. Greedy autoregressive and one-pass parallel decoding.

Greedy re-runs the decoder on the fixed-length buffer each step (no KV cache):
simple and exact, and cheap for the short captions of the small presets.
"""

import functools

import jax
import jax.numpy as jnp

from capjax import objectives
from capjax.data import tokenizer as tokenizer_lib


@functools.partial(jax.jit, static_argnames=("model", "max_len"))
def greedy(model, params, images, *, max_len: int):
  """images (normalized) -> int32[B, max_len] tokens after BOS, EOS-terminated."""
  enc_BxSxD = model.apply({"params": params}, images, method="encode")
  b = images.shape[0]
  mask = objectives.causal_mask(max_len)[None, None]
  tokens_BxL = jnp.full((b, max_len), tokenizer_lib.PAD_ID, jnp.int32)
  tokens_BxL = tokens_BxL.at[:, 0].set(tokenizer_lib.BOS_ID)
  out_BxL = jnp.full((b, max_len), tokenizer_lib.PAD_ID, jnp.int32)

  def step(i, carry):
    tokens_BxL, out_BxL, done_B = carry
    logits_BxLxV = model.apply({"params": params}, tokens_BxL, enc_BxSxD, mask, method="decode")
    next_B = jnp.argmax(logits_BxLxV[:, i], axis=-1).astype(jnp.int32)
    next_B = jnp.where(done_B, tokenizer_lib.PAD_ID, next_B)
    out_BxL = out_BxL.at[:, i].set(next_B)
    tokens_BxL = jnp.where(i + 1 < max_len, tokens_BxL.at[:, (i + 1) % max_len].set(next_B),
                           tokens_BxL)
    return tokens_BxL, out_BxL, done_B | (next_B == tokenizer_lib.EOS_ID)

  _, out_BxL, _ = jax.lax.fori_loop(
      0, max_len, step, (tokens_BxL, out_BxL, jnp.zeros((b,), bool)))
  return out_BxL


@functools.partial(jax.jit, static_argnames=("model", "max_len", "mask_id"))
def parallel(model, params, images, *, max_len: int, mask_id: int):
  """One pass with all-MASK inputs and full attention (parallel prediction)."""
  b = images.shape[0]
  tokens_BxL = jnp.full((b, max_len), mask_id, jnp.int32)
  mask = jnp.ones((1, 1, max_len, max_len), bool)
  logits_BxLxV = model.apply({"params": params}, images, tokens_BxL, mask)
  return jnp.argmax(logits_BxLxV, axis=-1).astype(jnp.int32)
