"""Parallel decoding for models trained with CapPa's parallel prediction.

CapPa trains a share of its rows with every decoder input MASK and no causal mask
(`tasks/cappa.py: cappa_inputs`); such a model captions an image in one decoder pass: the
most likely token at every position, cut after the first EOS.

Optional iterative refinement (mask-predict, Ghazvininejad et al. 2019): the first pass
fixes the length (its first EOS); each of `refine_steps` rounds re-masks the least confident
words (confidence: a token's log-probability when it was predicted), n * (R + 1 - r) / (R + 1)
of the n words in round r of R, and predicts them again from the image and the other words,
EOS excluded. The words are fed as autoregressive training feeds them (BOS first, word j at
input j + 1), a MASK in place of each re-masked one, with bidirectional attention: inputs
that CapPa's training never shows together, so whether refinement helps is an empirical
question (bench/decode.py and the README report what it did on shapes_tiny).
"""

import functools

import jax
import jax.numpy as jnp

from capjax.decode import steps as steps_lib


def _predict(model, params, enc_BxSxD, inputs_BxL, no_eos: bool, eos: int):
  """(argmax tokens, their log-probabilities) of one bidirectional decoder pass."""
  logits_BxLxV = model.apply({"params": params}, inputs_BxL, enc_BxSxD, None, method="decode")
  logp_BxLxV = jax.nn.log_softmax(logits_BxLxV.astype(jnp.float32))
  choice_BxLxV = logp_BxLxV.at[..., eos].set(-jnp.inf) if no_eos else logp_BxLxV
  tokens_BxL = steps_lib.argmax(choice_BxLxV)
  return tokens_BxL, jnp.take_along_axis(logp_BxLxV, tokens_BxL[..., None], axis=-1)[..., 0]


def words(tokens_BxL, eos: int):
  """bool[B, L]: the positions before each row's first EOS."""
  return ~steps_lib.ended_after_eos(tokens_BxL, eos) & (tokens_BxL != eos)


def remask(tokens_BxL, confidence_BxL, fraction, eos: int):
  """bool[B, L]: the floor(fraction * n) least confident of each row's n words."""
  words_BxL = words(tokens_BxL, eos)
  count_B = jnp.floor(words_BxL.sum(1) * fraction).astype(jnp.int32)
  rank_BxL = jnp.argsort(jnp.argsort(jnp.where(words_BxL, confidence_BxL, jnp.inf), axis=1),
                         axis=1)
  return words_BxL & (rank_BxL < count_B[:, None])


def refinement_inputs(tokens_BxL, masked_BxL, special):
  """Decoder inputs: BOS, then the tokens shifted by one, MASK where a token is re-masked."""
  b = tokens_BxL.shape[0]
  previous_BxL = jnp.concatenate([jnp.full((b, 1), special.bos, jnp.int32), tokens_BxL[:, :-1]],
                                 axis=1)
  hidden_BxL = jnp.concatenate([jnp.zeros((b, 1), bool), masked_BxL[:, :-1]], axis=1)
  return jnp.where(hidden_BxL, special.mask, previous_BxL)


@functools.partial(jax.jit, static_argnames=(
    "model", "special", "length", "refine_steps", "max_new_tokens"))
def parallel(model, params, images, *, special, length: int, refine_steps: int = 0,
             max_new_tokens: int | None = None) -> steps_lib.Decoded:
  """One all-MASK pass over `length` positions (the model's max_len, as trained), then
  `refine_steps` rounds of refinement; tokens [B, 1, max_new_tokens or length]."""
  enc_BxSxD = steps_lib.encode(model, params, images)
  b = images.shape[0]
  tokens_BxL, logp_BxL = _predict(model, params, enc_BxSxD,
                                  jnp.full((b, length), special.mask, jnp.int32), False,
                                  special.eos)
  ended_BxL = steps_lib.ended_after_eos(tokens_BxL, special.eos)
  tokens_BxL = jnp.where(ended_BxL, special.pad, tokens_BxL)
  logp_BxL = jnp.where(ended_BxL, 0.0, logp_BxL)
  for r in range(1, refine_steps + 1):
    masked_BxL = remask(tokens_BxL, logp_BxL, (refine_steps + 1 - r) / (refine_steps + 1),
                        special.eos)
    new_BxL, new_logp_BxL = _predict(model, params, enc_BxSxD,
                                     refinement_inputs(tokens_BxL, masked_BxL, special), True,
                                     special.eos)
    tokens_BxL = jnp.where(masked_BxL, new_BxL, tokens_BxL)
    logp_BxL = jnp.where(masked_BxL, new_logp_BxL, logp_BxL)
  tokens_BxL, logp_BxL = tokens_BxL[:, :max_new_tokens], logp_BxL[:, :max_new_tokens]
  return steps_lib.Decoded(tokens_BxL[:, None], logp_BxL.sum(1)[:, None], logp_BxL[:, None])
