"""Greedy decoding and sampling (temperature, top-k, top-p): one token a step for every row,
in a `lax.while_loop` that stops when every row has ended (EOS) or at max_new_tokens."""

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from capjax.decode import steps as steps_lib


class _Loop(NamedTuple):
  index: jax.Array  # int32: the position being generated
  last_B: jax.Array  # the token fed this step (BOS first)
  state: dict
  tokens_BxL: jax.Array
  logprobs_BxL: jax.Array
  done_B: jax.Array
  rng: jax.Array
  logits_BxLxV: jax.Array | None


def generate(steps, state, b: int, choose: Callable, rng, *, special, max_new_tokens: int,
             min_new_tokens: int = 0, keep_logits: bool = False):
  """Generates max_new_tokens at most for the b rows of `state` (from `steps.init`) with
  `choose(logits_BxV, rng)`.

  Returns (tokens int32[B, L], token log-probabilities float32[B, L], logits or None). A
  token's log-probability is the model's, before temperature, top-k or top-p. After a row's
  EOS its tokens are PAD, its log-probabilities 0.
  """
  length = max_new_tokens
  bos_B = jnp.full((b,), special.bos, jnp.int32)
  vocab = jax.eval_shape(steps, state, bos_B, 0)[0].shape[-1]

  def body(loop: _Loop) -> _Loop:
    logits_BxV, state = steps(loop.state, loop.last_B, loop.index)
    logits_BxV = logits_BxV.astype(jnp.float32)
    logp_BxV = jax.nn.log_softmax(logits_BxV)
    rng, key = jax.random.split(loop.rng)
    allowed_BxV = steps_lib.suppress_eos(logits_BxV, loop.index < min_new_tokens, special.eos)
    next_B = jnp.where(loop.done_B, special.pad, choose(allowed_BxV, key).astype(jnp.int32))
    logp_B = jnp.take_along_axis(logp_BxV, next_B[:, None], axis=1)[:, 0]
    i = loop.index
    logits_BxLxV = (None if loop.logits_BxLxV is None else
                    loop.logits_BxLxV.at[:, i].set(logits_BxV))
    return _Loop(i + 1, next_B, state, loop.tokens_BxL.at[:, i].set(next_B),
                 loop.logprobs_BxL.at[:, i].set(jnp.where(loop.done_B, 0.0, logp_B)),
                 loop.done_B | (next_B == special.eos), rng, logits_BxLxV)

  def cond(loop: _Loop):
    return (loop.index < length) & ~jnp.all(loop.done_B)

  init = _Loop(jnp.zeros((), jnp.int32), bos_B, state,
               jnp.full((b, length), special.pad, jnp.int32), jnp.zeros((b, length)),
               jnp.zeros((b,), bool), rng,
               jnp.zeros((b, length, vocab)) if keep_logits else None)
  out = jax.lax.while_loop(cond, body, init)
  return out.tokens_BxL, out.logprobs_BxL, out.logits_BxLxV


def _argmax(logits_BxV, key):
  del key
  return steps_lib.argmax(logits_BxV)


def filter_logits(logits_BxV, temperature, top_k: int, top_p):
  """Logits to sample from: divided by `temperature`, then -inf outside the `top_k` most
  likely tokens (0: no limit) and outside the nucleus (Holtzman et al. 2020): the most likely
  tokens whose probabilities first add up to `top_p` (1: no limit). The most likely token
  always stays."""
  logits_BxV = logits_BxV / temperature
  if top_k:
    kth_Bx1 = jax.lax.top_k(logits_BxV, top_k)[0][:, -1:]
    logits_BxV = jnp.where(logits_BxV < kth_Bx1, -jnp.inf, logits_BxV)
  probs_BxV = jax.nn.softmax(logits_BxV, axis=-1)
  return jnp.where(probs_BxV < nucleus_threshold(probs_BxV, top_p), -jnp.inf, logits_BxV)


def nucleus_threshold(probs_BxV, top_p, iterations: int = 32):
  """float32[B, 1]: the largest t with sum(probs[probs >= t]) >= top_p, the probability of the
  nucleus' least likely token, found by bisection to float precision: a sort of the vocabulary
  every step costs more than the whole decoder step on a CPU."""
  mass = lambda t_Bx1: jnp.sum(jnp.where(probs_BxV >= t_Bx1, probs_BxV, 0.0), -1, keepdims=True)

  def halve(_, bounds):
    low_Bx1, high_Bx1 = bounds
    mid_Bx1 = (low_Bx1 + high_Bx1) / 2
    ok_Bx1 = mass(mid_Bx1) >= top_p
    return jnp.where(ok_Bx1, mid_Bx1, low_Bx1), jnp.where(ok_Bx1, high_Bx1, mid_Bx1)

  high_Bx1 = jnp.max(probs_BxV, -1, keepdims=True)
  low_Bx1, _ = jax.lax.fori_loop(0, iterations, halve, (jnp.zeros_like(high_Bx1), high_Bx1))
  # The top token (probability high) is kept even where rounding left mass(high) < top_p.
  return jnp.where(mass(high_Bx1) >= top_p, high_Bx1, jnp.minimum(low_Bx1, high_Bx1))


def categorical(key, logits_BxV):
  """int32[B]: a token a row drawn from softmax(logits) by inverting its CDF: one uniform
  number a row, where `jax.random.categorical`'s Gumbel noise draws one a token (its random
  bits cost more than the decoder step on a CPU). Tokens at -inf are never drawn."""
  cdf_BxV = jnp.cumsum(jax.nn.softmax(logits_BxV.astype(jnp.float32), axis=-1), axis=-1)
  u_Bx1 = (1.0 - jax.random.uniform(key, (logits_BxV.shape[0], 1))) * cdf_BxV[:, -1:]  # (0, 1]
  index_B = jnp.sum(cdf_BxV < u_Bx1, axis=-1)
  return jnp.minimum(index_B, logits_BxV.shape[-1] - 1).astype(jnp.int32)


def _stack(tokens_BxL, logprobs_BxL, n: int, logits=None) -> steps_lib.Decoded:
  """[B*n, ...] rows -> Decoded [B, n, ...], each image's rows best (most likely) first."""
  b = tokens_BxL.shape[0] // n
  scores_BxN = logprobs_BxL.sum(-1).reshape(b, n)
  order_BxN = jnp.argsort(-scores_BxN, axis=1, stable=True)
  take = lambda x: jnp.take_along_axis(
      x.reshape((b, n) + x.shape[1:]), order_BxN.reshape((b, n) + (1,) * (x.ndim - 1)), axis=1)
  logprobs_BxNxL = take(logprobs_BxL)
  return steps_lib.Decoded(take(tokens_BxL), logprobs_BxNxL.sum(-1), logprobs_BxNxL,
                           None if logits is None else take(logits))


@functools.partial(jax.jit, static_argnames=(
    "model", "special", "max_new_tokens", "min_new_tokens", "return_logits", "cached"))
def greedy(model, params, images, *, special, max_new_tokens: int, min_new_tokens: int = 0,
           return_logits: bool = False, cached: bool = True) -> steps_lib.Decoded:
  """The most likely token at every step. images: normalized, [B, H, W, 3]; tokens [B, 1, L].

  cached=False recomputes the prefix every step (the reference; same tokens and logits)."""
  decoder = steps_lib.as_decoder(model)
  enc_BxSxD = decoder.encode(params, images)
  steps = decoder.steps(params, max_new_tokens, special, cached)
  tokens, logprobs, logits = generate(
      steps, steps.init(enc_BxSxD), images.shape[0], _argmax, jax.random.key(0), special=special,
      max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, keep_logits=return_logits)
  return _stack(tokens, logprobs, 1, logits)


@functools.partial(jax.jit, static_argnames=(
    "model", "special", "max_new_tokens", "min_new_tokens", "num_samples", "top_k",
    "return_logits", "cached"))
def sample(model, params, images, rng, *, special, max_new_tokens: int, num_samples: int = 1,
           temperature=1.0, top_k: int = 0, top_p=1.0, min_new_tokens: int = 0,
           return_logits: bool = False, cached: bool = True) -> steps_lib.Decoded:
  """num_samples captions an image, each token drawn from the model's distribution after
  `filter_logits`; `rng` (a jax key) fixes the draws. Tokens [B, num_samples, L], the most
  likely sample first; top_k=1 is greedy."""
  decoder = steps_lib.as_decoder(model)
  enc_BxSxD = decoder.encode(params, images)
  steps = decoder.steps(params, max_new_tokens, special, cached)
  state = steps.repeat(steps.init(enc_BxSxD), enc_BxSxD, num_samples)
  choose = lambda logits_BxV, key: categorical(
      key, filter_logits(logits_BxV, temperature, top_k, top_p))
  tokens, logprobs, logits = generate(
      steps, state, images.shape[0] * num_samples, choose, rng, special=special,
      max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, keep_logits=return_logits)
  return _stack(tokens, logprobs, num_samples, logits)
