"""Beam search with GNMT's length penalty, batched and jitted.

Each step extends every live beam by every token and keeps the 2K best candidates. A
candidate ending in EOS joins the finished hypotheses if it ranks among the K best of them
(as Hugging Face's beam search: so beam size 1 is greedy); the K best others stay live.
Finished hypotheses are ranked by log-likelihood / ((5 + length) / 6) ** length_penalty
(Wu et al. 2016, as flax's and big_vision's beam search), length counting the EOS. An image
is done when K hypotheses have finished and no live beam can beat the worst of them even at
max_new_tokens; the loop stops when every image is done. An image with fewer than N finished
hypotheses at max_new_tokens is completed with its best live (unfinished) beams.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from capjax.decode import steps as steps_lib


def length_penalty(length, alpha):
  """GNMT's length normalisation: ((5 + length) / 6) ** alpha."""
  return ((5.0 + length) / 6.0) ** alpha


class _Beams(NamedTuple):
  index: jax.Array
  last_BK: jax.Array  # the tokens fed this step, [B*K]
  state: dict
  live_tokens_BxKxL: jax.Array
  live_logprobs_BxKxL: jax.Array
  live_scores_BxK: jax.Array  # summed log-probability (-inf: no beam)
  done_tokens_BxKxL: jax.Array
  done_logprobs_BxKxL: jax.Array
  done_scores_BxK: jax.Array  # length-normalised (-inf: none yet)


def _take(x_BxCx, index_BxK):
  """x[b, index[b, k]] along axis 1."""
  return jnp.take_along_axis(x_BxCx, index_BxK.reshape(index_BxK.shape + (1,) * (x_BxCx.ndim - 2)),
                             axis=1)


def _top(scores_BxC, k: int, *arrays):
  """The k best of C candidates: (scores, *arrays taken alike), best first."""
  top_BxK, index_BxK = jax.lax.top_k(scores_BxC, k)
  return (top_BxK,) + tuple(_take(a, index_BxK) for a in arrays)


@functools.partial(jax.jit, static_argnames=(
    "model", "special", "max_new_tokens", "min_new_tokens", "beam_size", "num_return",
    "cached"))
def beam_search(model, params, images, *, special, max_new_tokens: int, beam_size: int = 4,
                num_return: int = 1, length_penalty_alpha=0.6, min_new_tokens: int = 0,
                cached: bool = True) -> steps_lib.Decoded:
  """The num_return best of beam_size beams an image: tokens [B, num_return, L]; scores are
  the length-normalised log-likelihoods they are ranked by."""
  if not 1 <= num_return <= beam_size:
    raise ValueError(f"num_return={num_return} must be in [1, beam_size={beam_size}].")
  decoder = steps_lib.as_decoder(model)
  enc_BxSxD = decoder.encode(params, images)
  b, k, length, eos = images.shape[0], beam_size, max_new_tokens, special.eos
  steps = decoder.steps(params, length, special, cached)
  state = steps.repeat(steps.init(enc_BxSxD), enc_BxSxD, k)
  vocab = jax.eval_shape(steps, state, jnp.zeros((b * k,), jnp.int32), 0)[0].shape[-1]
  if 2 * k > vocab:
    raise ValueError(f"beam_size={k} needs a vocabulary of at least {2 * k} tokens.")
  best_possible = lambda logprob: logprob / length_penalty(length, length_penalty_alpha)

  def body(beams: _Beams) -> _Beams:
    i = beams.index
    logits_BKxV, state = steps(beams.state, beams.last_BK, i)
    logp_BKxV = jax.nn.log_softmax(logits_BKxV.astype(jnp.float32))
    allowed_BKxV = steps_lib.suppress_eos(logp_BKxV, i < min_new_tokens, eos)
    total_BxKxV = beams.live_scores_BxK[..., None] + allowed_BKxV.reshape(b, k, vocab)
    top_Bx2K, flat_Bx2K = jax.lax.top_k(total_BxKxV.reshape(b, k * vocab), 2 * k)
    beam_Bx2K, token_Bx2K = flat_Bx2K // vocab, (flat_Bx2K % vocab).astype(jnp.int32)
    step_logp_Bx2K = jnp.take_along_axis(logp_BKxV.reshape(b, k * vocab), flat_Bx2K, axis=1)
    tokens_Bx2KxL = _take(beams.live_tokens_BxKxL, beam_Bx2K).at[:, :, i].set(token_Bx2K)
    logprobs_Bx2KxL = _take(beams.live_logprobs_BxKxL, beam_Bx2K).at[:, :, i].set(step_logp_Bx2K)
    ends_Bx2K = token_Bx2K == eos
    finishes_Bx2K = ends_Bx2K & (jnp.arange(2 * k) < k) & (top_Bx2K > -jnp.inf)

    live_scores, live_tokens, live_logprobs, live_beam, live_last = _top(
        jnp.where(ends_Bx2K, -jnp.inf, top_Bx2K), k, tokens_Bx2KxL, logprobs_Bx2KxL, beam_Bx2K,
        token_Bx2K)
    candidates_Bx2K = jnp.where(finishes_Bx2K, top_Bx2K / length_penalty(i + 1,
                                                                           length_penalty_alpha),
                                -jnp.inf)
    done_scores, done_tokens, done_logprobs = _top(
        jnp.concatenate([beams.done_scores_BxK, candidates_Bx2K], axis=1), k,
        jnp.concatenate([beams.done_tokens_BxKxL, tokens_Bx2KxL], axis=1),
        jnp.concatenate([beams.done_logprobs_BxKxL, logprobs_Bx2KxL], axis=1))
    rows_BK = (jnp.arange(b)[:, None] * k + live_beam).reshape(-1)
    return _Beams(i + 1, live_last.reshape(-1), steps.reorder(state, enc_BxSxD, rows_BK),
                  live_tokens, live_logprobs, live_scores, done_tokens, done_logprobs,
                  done_scores)

  def cond(beams: _Beams):
    # done_scores are sorted: the last is the worst of K (-inf until K have finished).
    worst_B = beams.done_scores_BxK[:, -1]
    done_B = (worst_B > -jnp.inf) & (worst_B >= best_possible(beams.live_scores_BxK[:, 0]))
    return (beams.index < length) & ~jnp.all(done_B)

  pad_BxKxL = jnp.full((b, k, length), special.pad, jnp.int32)
  none_BxK = jnp.full((b, k), -jnp.inf)
  first_BxK = none_BxK.at[:, 0].set(0.0)  # one live beam to start: no duplicates
  beams = jax.lax.while_loop(cond, body, _Beams(
      jnp.zeros((), jnp.int32), jnp.full((b * k,), special.bos, jnp.int32), state,
      pad_BxKxL, jnp.zeros((b, k, length)), first_BxK, pad_BxKxL, jnp.zeros((b, k, length)),
      none_BxK))

  # Finished hypotheses first, best first; unfinished ones only where too few finished.
  scores_Bx2K = jnp.concatenate([beams.done_scores_BxK,
                                 best_possible(beams.live_scores_BxK)], axis=1)
  finished_Bx2K = jnp.concatenate([beams.done_scores_BxK > -jnp.inf,
                                   jnp.zeros((b, k), bool)], axis=1)
  order_Bx2K = jnp.lexsort((-scores_Bx2K, ~finished_Bx2K), axis=-1)[:, :num_return]
  tokens = _take(jnp.concatenate([beams.done_tokens_BxKxL, beams.live_tokens_BxKxL], 1),
                 order_Bx2K)
  logprobs = _take(jnp.concatenate([beams.done_logprobs_BxKxL, beams.live_logprobs_BxKxL], 1),
                   order_Bx2K)
  return steps_lib.Decoded(tokens, _take(scores_Bx2K, order_Bx2K), logprobs)
