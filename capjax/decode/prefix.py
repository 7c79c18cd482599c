"""Decoding a language model that reads a prefix of embeddings before the caption
(`capjax.models.prefix.PrefixCaptioner`: ClipCap, the mini-VLM): the `steps.Decoder` its tasks
give greedy, sampling, beam search and the captioner (`Task.decoder()`).

  encode         pixels -> the frozen tower's features -> the mapper's prefix B x P x D
  PrefixSteps    `init` makes the LM's KV cache for P + length positions (Flax's convention: a
                 full-length dummy) and prefills it with the prefix; each step feeds one token
                 (BOS first) and gives the next one's logits
  RecomputeSteps the LM over [prefix ++ all tokens so far] every step (the reference)
  log_likelihood teacher-forced scores of N captions an image (the prefix computed once)
"""

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from capjax import objectives
from capjax.decode import steps as steps_lib


@dataclasses.dataclass(frozen=True)
class PrefixSteps(steps_lib.Steps):
  """One LM call a token on its KV cache, after the prefix was prefilled. Nothing in the state
  is shared between the rows of one image: the prefix lives in every row's cache."""
  model: Any
  params: Any
  length: int  # tokens fed at most after the prefix

  def _lm(self, variables, tokens=None, embeds=None):
    out, new = self.model.apply(variables, tokens, embeds, method="decode_lm", mutable=["cache"])
    return out, new["cache"]

  def init(self, prefix_BxPxD):
    b, p, d = prefix_BxPxD.shape
    _, cache = self._lm({"params": self.params},
                        embeds=jnp.zeros((b, p + self.length, d), prefix_BxPxD.dtype))
    _, cache = self._lm({"params": self.params, "cache": cache}, embeds=prefix_BxPxD)
    return {"cache": cache}

  def shared(self, path) -> bool:
    del path
    return False

  def __call__(self, state, last_B, index):
    del index  # the cache counts positions
    logits_Bx1xV, cache = self._lm({"params": self.params, "cache": state["cache"]},
                                   tokens=last_B[:, None])
    return logits_Bx1xV[:, 0], {"cache": cache}


@dataclasses.dataclass(frozen=True)
class RecomputeSteps(steps_lib.Steps):
  """The LM over [prefix ++ every token so far] each step (causal: later slots are unread)."""
  model: Any
  params: Any
  length: int
  pad: int

  def init(self, prefix_BxPxD):
    return {"tokens": jnp.full((prefix_BxPxD.shape[0], self.length), self.pad, jnp.int32),
            "prefix": prefix_BxPxD}

  def shared(self, path) -> bool:
    return getattr(path[0], "key", None) == "prefix"

  def __call__(self, state, last_B, index):
    tokens_BxL = state["tokens"].at[:, index].set(last_B)
    logits = self.model.apply({"params": self.params}, tokens_BxL, state["prefix"],
                              method="read")
    p = state["prefix"].shape[1]
    logits_BxV = jax.lax.dynamic_index_in_dim(logits, p + index, axis=1, keepdims=False)
    return logits_BxV, {"tokens": tokens_BxL, "prefix": state["prefix"]}


@functools.partial(jax.jit, static_argnames=("model", "special"))
def log_likelihood(model, params, prefix_BxPxD, tokens_BxNxL1, *, special):
  """float32[B, N]: each caption's summed token log-likelihood after BOS through its first EOS
  (PAD excluded where PAD is not EOS), teacher-forced, not length-normalised."""
  b, n, length = tokens_BxNxL1.shape
  inputs_BNxL, targets_BNxL = objectives.split_inputs_targets(
      tokens_BxNxL1.reshape(b * n, length))
  p = prefix_BxPxD.shape[1]
  logits = model.apply({"params": params}, inputs_BNxL, jnp.repeat(prefix_BxPxD, n, axis=0),
                       method="read")[:, p:]
  logp_BNxL = jnp.take_along_axis(jax.nn.log_softmax(logits.astype(jnp.float32)),
                                  targets_BNxL[..., None], axis=-1)[..., 0]
  weights = objectives.caption_weights(targets_BNxL, special.eos, special.pad)
  return (weights * logp_BNxL).sum(-1).reshape(b, n)


@dataclasses.dataclass(frozen=True)
class PrefixDecoder(steps_lib.Decoder):
  """The `steps.Decoder` of a `PrefixCaptioner`: images in, the mapper's prefix out."""
  model: Any

  def encode(self, params, images):
    features = self.model.apply({"params": params}, images, method="features")
    return self.model.apply({"params": params}, features, method="prefix")

  def steps(self, params, length: int, special, cached: bool) -> steps_lib.Steps:
    if cached:
      return PrefixSteps(self.model, params, length)
    return RecomputeSteps(self.model, params, length, special.pad)

  def log_likelihood(self, params, enc, tokens_BxNxL1, special):
    return log_likelihood(self.model, params, enc, tokens_BxNxL1, special=special)
