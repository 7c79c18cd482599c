"""Next-token logits for the autoregressive decoders, and what every decoder returns.

A `Steps` turns the image tokens into a decoding state (`init`) and gives the logits of the
next token from the last one (`__call__`). `CachedSteps` keeps the decoder's KV caches (one
decoder call on one token a step; the image's cross-attention keys and values computed once);
`RecomputeSteps` re-runs the decoder over the whole prefix every step: the reference the
cache is tested and benchmarked against. Both work on any model with
`encode(images)` and `decode(tokens, enc, self_mask, decode=False)` methods (CapPa's).

A `Decoder` is what a model family gives the decoders (`Task.decoder()`): how to encode images
and make its `Steps`, and how to score captions. `EncoderDecoder` wraps a model with those
methods; a family whose model is built otherwise (a language model reading a prefix:
`capjax/decode/prefix.py`) brings its own, and greedy, sampling, beam search and the
captioner run it unchanged. The decoders take either a model or a `Decoder` (`as_decoder`).
"""

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from capjax import objectives


class Decoded(NamedTuple):
  """Captions of a batch of images, N per image, best first."""
  tokens: jax.Array  # int32[B, N, L]: the generated tokens after BOS, EOS-terminated, then PAD
  scores: jax.Array  # float32[B, N]: what the decoder ranks by (beam: length-normalised)
  token_logprobs: jax.Array  # float32[B, N, L]: each token's log-probability (0 after EOS)
  logits: jax.Array | None = None  # float32[B, N, L, V] where asked for (greedy, sample)


def encode(model, params, images):
  """The image tokens (registers and patches) the decoder cross-attends to."""
  return model.apply({"params": params}, images, method="encode")


def argmax(x, axis: int = -1):
  """int32 `jnp.argmax` (the first maximum) as a max and a min: XLA:CPU's two-operand argmax
  reduction took 8x as long over a vocabulary (measured on [8, 8192], once a token)."""
  top = jnp.max(x, axis=axis, keepdims=True)
  size = x.shape[axis]
  iota = jax.lax.broadcasted_iota(jnp.int32, x.shape, axis % x.ndim)
  return jnp.minimum(jnp.min(jnp.where(x == top, iota, size), axis=axis), size - 1)


def suppress_eos(logits_BxV, suppress, eos: int):
  """logits with EOS impossible where `suppress` (min_new_tokens not reached yet)."""
  return logits_BxV.at[:, eos].set(jnp.where(suppress, -jnp.inf, logits_BxV[:, eos]))


def ended_after_eos(tokens_BxL, eos: int):
  """bool[B, L]: True at the positions after each row's first EOS."""
  is_eos_BxL = tokens_BxL == eos
  return (jnp.cumsum(is_eos_BxL, axis=1) - is_eos_BxL) > 0


def _batch_axes(init, enc_BxSxD):
  """Per leaf of `init(enc)`'s state: the axis that grows with the batch (-1: none)."""
  shapes = [jax.eval_shape(init, jax.ShapeDtypeStruct((b,) + enc_BxSxD.shape[1:],
                                                      enc_BxSxD.dtype)) for b in (1, 2)]
  def axis(one, two):
    return next((i for i, (a, b) in enumerate(zip(one.shape, two.shape)) if a != b), -1)
  return jax.tree.map(axis, *shapes)


class Steps:
  """What every kind of steps shares: batch bookkeeping for samples and beams. A subclass
  gives `init(enc)`, `__call__(state, last_B, index) -> (logits_BxV, state)` and `shared`."""

  def init(self, enc_BxSxD):
    raise NotImplementedError

  def shared(self, path) -> bool:
    """Whether a state leaf is the same for every row of one image (never reordered)."""
    raise NotImplementedError

  def repeat(self, state, enc_BxSxD, n: int):
    """Each image's state repeated n times (rows b*n .. b*n + n-1), for samples or beams."""
    axes = _batch_axes(self.init, enc_BxSxD)
    return jax.tree.map(lambda x, a: x if a < 0 else jnp.repeat(x, n, axis=a), state, axes)

  def reorder(self, state, enc_BxSxD, rows):
    """state rows taken from `rows` (beam search keeping its best continuations)."""
    axes = _batch_axes(self.init, enc_BxSxD)
    def take(path, x, a):
      return x if a < 0 or self.shared(path) else jnp.take(x, rows, axis=a)
    return jax.tree_util.tree_map_with_path(take, state, axes)


@dataclasses.dataclass(frozen=True)
class CachedSteps(Steps):
  """One decoder call a token, on its KV caches (`layers.Attention`'s decode path).

  `init` is the Flax convention's sizing call: a full-length dummy with decode=True, which
  also projects the image's cross-attention keys and values once. Later calls pass the
  image as `enc[:, :0]`: the decoder reads it from the cache.
  """
  model: Any
  params: Any
  length: int  # tokens fed at most (the cache's length)

  def init(self, enc_BxSxD):
    dummy_BxL = jnp.zeros((enc_BxSxD.shape[0], self.length), jnp.int32)
    _, variables = self.model.apply({"params": self.params}, dummy_BxL, enc_BxSxD, None,
                                    decode=True, method="decode", mutable=["cache"])
    return {"cache": variables["cache"], "enc": enc_BxSxD[:, :0]}

  def shared(self, path) -> bool:
    keys = [getattr(k, "key", None) for k in path]
    return "cross_attention" in keys or keys[:1] == ["enc"]

  def __call__(self, state, last_B, index):
    del index  # the caches count positions
    logits_Bx1xV, variables = self.model.apply(
        {"params": self.params, "cache": state["cache"]}, last_B[:, None], state["enc"], None,
        decode=True, method="decode", mutable=["cache"])
    return logits_Bx1xV[:, 0], {"cache": variables["cache"], "enc": state["enc"]}


@dataclasses.dataclass(frozen=True)
class RecomputeSteps(Steps):
  """The whole prefix through the decoder every step, causally masked (no cache)."""
  model: Any
  params: Any
  length: int
  pad: int

  def init(self, enc_BxSxD):
    return {"tokens": jnp.full((enc_BxSxD.shape[0], self.length), self.pad, jnp.int32),
            "enc": enc_BxSxD}

  def shared(self, path) -> bool:
    return getattr(path[0], "key", None) == "enc"

  def __call__(self, state, last_B, index):
    tokens_BxL = state["tokens"].at[:, index].set(last_B)
    mask_1x1xLxL = objectives.causal_mask(self.length)[None, None]
    logits_BxLxV = self.model.apply({"params": self.params}, tokens_BxL, state["enc"],
                                    mask_1x1xLxL, method="decode")
    logits_BxV = jax.lax.dynamic_index_in_dim(logits_BxLxV, index, axis=1, keepdims=False)
    return logits_BxV, {"tokens": tokens_BxL, "enc": state["enc"]}


def make_steps(model, params, length: int, special, cached: bool) -> Steps:
  if cached:
    return CachedSteps(model, params, length)
  return RecomputeSteps(model, params, length, special.pad)


class Decoder:
  """What the decoders need of a model family (`Task.decoder()`):
    encode(params, images) -> the image's representation `steps(...).init` and
      `log_likelihood` take (images as the task's `pixels` makes them);
    steps(params, length, special, cached) -> a `Steps` feeding up to `length` tokens;
    log_likelihood(params, enc, tokens_BxNxL1, special) -> float32[B, N] caption scores;
    parallel: whether the model decodes in one bidirectional pass (CapPa's)."""
  parallel = False

  def encode(self, params, images):
    raise NotImplementedError

  def steps(self, params, length: int, special, cached: bool) -> Steps:
    raise NotImplementedError

  def log_likelihood(self, params, enc, tokens_BxNxL1, special):
    raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class EncoderDecoder(Decoder):
  """A model with `encode(images)` and `decode(tokens, enc, self_mask, decode=False)`."""
  model: Any
  parallel = True

  def encode(self, params, images):
    return encode(self.model, params, images)

  def steps(self, params, length: int, special, cached: bool) -> Steps:
    return make_steps(self.model, params, length, special, cached)

  def log_likelihood(self, params, enc, tokens_BxNxL1, special):
    from capjax.decode import scoring  # pylint: disable=g-import-not-at-top
    return scoring.log_likelihood(self.model, params, enc, tokens_BxNxL1, special=special)


def as_decoder(model) -> Decoder:
  """`model` itself when it is a `Decoder`, else the `EncoderDecoder` of its methods."""
  return model if isinstance(model, Decoder) else EncoderDecoder(model)
