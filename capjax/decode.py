"""Caption decoding: greedy, for models with `encode(images)` and
`decode(tokens, encoded, self_mask)` methods (CapPa's).

Greedy re-runs the decoder on the fixed-length buffer each step (no KV cache):
simple and exact, and cheap for the short captions of the small presets.
"""

import functools

import jax
import jax.numpy as jnp

from capjax import objectives


@functools.partial(jax.jit, static_argnames=("model", "max_len", "special"))
def greedy(model, params, images, *, max_len: int, special):
  """images (normalized) -> int32[B, max_len] tokens after BOS, EOS-terminated, then PAD.

  `special`: the tokenizer's `SpecialIds` (pad, bos, eos)."""
  enc_BxSxD = model.apply({"params": params}, images, method="encode")
  b = images.shape[0]
  mask = objectives.causal_mask(max_len)[None, None]
  tokens_BxL = jnp.full((b, max_len), special.pad, jnp.int32)
  tokens_BxL = tokens_BxL.at[:, 0].set(special.bos)
  out_BxL = jnp.full((b, max_len), special.pad, jnp.int32)

  def step(i, carry):
    tokens_BxL, out_BxL, done_B = carry
    logits_BxLxV = model.apply({"params": params}, tokens_BxL, enc_BxSxD, mask, method="decode")
    next_B = jnp.argmax(logits_BxLxV[:, i], axis=-1).astype(jnp.int32)
    next_B = jnp.where(done_B, special.pad, next_B)
    out_BxL = out_BxL.at[:, i].set(next_B)
    tokens_BxL = jnp.where(i + 1 < max_len, tokens_BxL.at[:, (i + 1) % max_len].set(next_B),
                           tokens_BxL)
    return tokens_BxL, out_BxL, done_B | (next_B == special.eos)

  _, out_BxL, _ = jax.lax.fori_loop(
      0, max_len, step, (tokens_BxL, out_BxL, jnp.zeros((b,), bool)))
  return out_BxL
