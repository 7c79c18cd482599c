"""Image features as a prefix of a language model's input: the mappers, and the module that joins
a frozen vision tower, a mapper and a language model.

ClipCap (Mokady et al. 2021, `github.com/rmokady/CLIP_prefix_caption`; seed 002) maps one image
embedding (CLIP's, L2-normalised) to `prefix_len` embeddings of the language model's width D:
  MLPMapper          Linear(E -> P*D/2), tanh, Linear(-> P*D)
  TransformerMapper  Linear(E -> C*D) read as C tokens, P learned constant tokens after them, a
                     transformer over the C+P tokens (8 heads, MLP ratio 2, ReLU); the constant
                     tokens' outputs are the prefix
Seed 004's mini-VLM projects every patch token of a frozen ViT:
  PatchProjector     Linear(Dv -> D), GELU, LayerNorm, Linear(D -> D)

`PrefixCaptioner`: pixels -> vision tower -> features (its embedding or its tokens, float32)
-> [L2-normalised] -> [+ noise the caller draws: training only] -> mapper -> prefix B x P x D;
the language model reads [prefix ++ embedding(tokens)] and gives logits B x (P+L) x V. The
normalisation sits in `prefix`, which training, scoring and generation all call, so it is the
same at training and inference.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from capjax.models import blocks, clip, gpt2, layers, llama, plain_vit

MAPPERS = ("mlp", "transformer", "projector")
FEATURES = ("embedding", "tokens")


def l2_normalize(x_BxF, eps: float = 1e-6):
  """x / |x| over the last axis, in float32."""
  x = x_BxF.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(x), axis=-1, keepdims=True), eps**2))


class MLPMapper(nn.Module):
  """ClipCap's MLP: embedding B x E -> prefix B x P x D."""
  prefix_len: int
  width: int
  hidden_dim: int = 0  # 0: prefix_len * width // 2, as ClipCap
  dtype: layers.Dtype = jnp.float32
  matmul_policy: str = "f32_accum"

  @nn.compact
  def __call__(self, x_BxE):
    hidden = self.hidden_dim or self.prefix_len * self.width // 2
    h_BxH = blocks.Linear((hidden,), ("embed", "mlp"), dtype=self.dtype,
                          matmul_policy=self.matmul_policy, name="hidden")(x_BxE)
    h_BxH = jnp.tanh(h_BxH.astype(jnp.float32)).astype(self.dtype)
    # One flat output dim: XLA's CPU runtime has no bf16 x bf16 -> f32 kernel for the gradient
    # of a [H] x [P, D] kernel (its batch-only contraction).
    out_BxPD = blocks.Linear((self.prefix_len * self.width,), ("mlp", "embed"), dtype=self.dtype,
                             matmul_policy=self.matmul_policy, name="out")(h_BxH)
    return out_BxPD.reshape(x_BxE.shape[0], self.prefix_len, self.width)


class TransformerMapper(nn.Module):
  """ClipCap's transformer mapper: embedding B x E -> prefix B x P x D."""
  prefix_len: int
  width: int
  clip_len: int = 10  # tokens the embedding is read as
  depth: int = 8
  num_heads: int = 8
  mlp_ratio: float = 2.0
  dtype: layers.Dtype = jnp.float32
  matmul_policy: str = "f32_accum"
  remat_policy: str = "none"
  scan_unroll: int = 1

  @nn.compact
  def __call__(self, x_BxE):
    x_BxCD = blocks.Linear((self.clip_len * self.width,), (None, "embed"), dtype=self.dtype,
                           matmul_policy=self.matmul_policy, name="input")(x_BxE)  # see MLPMapper
    x_BxCxD = x_BxCD.reshape(x_BxE.shape[0], self.clip_len, self.width)
    # ClipCap draws its constant tokens from N(0, 1).
    const_PxD = layers.learned_embedding(self, "prefix_const", (self.prefix_len, self.width),
                                         (None, "embed"), stddev=1.0)
    const_BxPxD = jnp.broadcast_to(const_PxD.astype(self.dtype),
                                   (x_BxE.shape[0],) + const_PxD.shape)
    x_BxTxD = jnp.concatenate([x_BxCxD, const_BxPxD], axis=1)
    spec = blocks.BlockSpec(num_heads=self.num_heads, head_dim=self.width // self.num_heads,
                            mlp_dim=int(self.width * self.mlp_ratio), activation="relu")
    x_BxTxD = blocks.stack(x_BxTxD, spec, self.depth, dtype=self.dtype,
                           matmul_policy=self.matmul_policy, remat_policy=self.remat_policy,
                           scan_unroll=self.scan_unroll)
    return x_BxTxD[:, self.clip_len:]


class PatchProjector(nn.Module):
  """Seed 004's 2-layer projector, per token: B x T x Dv -> B x T x D."""
  width: int
  dtype: layers.Dtype = jnp.float32
  matmul_policy: str = "f32_accum"

  @nn.compact
  def __call__(self, x_BxTxF):
    linear = lambda axes, name: blocks.Linear((self.width,), axes, dtype=self.dtype,
                                              matmul_policy=self.matmul_policy, name=name)
    h_BxTxD = linear(("embed", "mlp"), "hidden")(x_BxTxF)
    h_BxTxD = jax.nn.gelu(h_BxTxD.astype(jnp.float32), approximate=False)
    h_BxTxD = blocks.Norm("layernorm", 1e-5, self.dtype, name="norm")(h_BxTxD)
    return linear(("mlp", "embed"), "out")(h_BxTxD)


class PrefixCaptioner(nn.Module):
  """A frozen vision tower, a mapper and a language model (params "vision", "mapper", "lm")."""
  vision: nn.Module  # clip.CLIPVision | plain_vit.PlainViT
  mapper: nn.Module
  lm: nn.Module  # gpt2.GPT2 | llama.Llama: apply(tokens, embeds, decode) -> logits
  features_kind: str = "embedding"  # the tower's "embedding" (B x E) or "tokens" (B x T x Dv)
  normalize: bool = True  # L2-normalise the features (ClipCap) before the mapper

  def features(self, pixels_BxHxWx3):
    """The tower's output the mapper reads (what `tools/precompute_features.py` stores)."""
    if self.features_kind == "embedding":
      return self.vision(pixels_BxHxWx3, return_embedding=True)[1].astype(jnp.float32)
    return self.vision(pixels_BxHxWx3).astype(jnp.float32)

  def prefix(self, features, noise=None):
    """Features -> prefix B x P x D; `noise` (features' shape) is added after normalising."""
    x = l2_normalize(features) if self.normalize else features.astype(jnp.float32)
    if noise is not None:
      x = x + noise
    return self.mapper(x)

  def __call__(self, tokens_BxL, pixels=None, features=None, noise=None):
    """Logits float32 B x (P+L) x V of [prefix ++ tokens]; from pixels or precomputed
    features."""
    if features is None:
      features = self.features(pixels)
    return self.read(tokens_BxL, self.prefix(features, noise))

  def read(self, tokens_BxL, prefix_BxPxD):
    """The language model on [prefix ++ tokens] (no cache): logits B x (P+L) x V."""
    return self.lm(tokens_BxL, prefix_BxPxD)

  def decode_lm(self, tokens_BxL=None, embeds_BxPxD=None):
    """The language model on its KV cache (`capjax.models.blocks`' convention)."""
    return self.lm(tokens_BxL, embeds_BxPxD, decode=True)


# ----------------------------------------------------------------------- from a config
# Keys: data.image_size, dtype, model.{vocab_size, matmul_policy, remat_policy, scan_unroll},
# model.vision.*, model.lm.*, model.mapper.* (capjax/config.py's base() documents them).


def runtime(config) -> dict:
  m = config.model
  return dict(dtype=jnp.dtype(config.dtype), matmul_policy=m.matmul_policy,
              remat_policy=m.remat_policy, scan_unroll=m.scan_unroll)


def vision_tower(config):
  v = config.model.vision
  common = dict(image_size=config.data.image_size, patch_size=v.patch_size, width=v.width,
                depth=v.depth, num_heads=v.num_heads, mlp_dim=v.mlp_dim,
                activation=v.activation, norm_eps=v.norm_eps, **runtime(config))
  if v.family == "clip_vision":
    return clip.CLIPVision(projection_dim=v.projection_dim, **common)
  return plain_vit.PlainViT(qkv_bias=v.qkv_bias, **common)


def language_model(config):
  m, lm = config.model, config.model.lm
  common = dict(vocab_size=m.vocab_size, width=lm.width, depth=lm.depth,
                num_heads=lm.num_heads, mlp_dim=lm.mlp_dim, activation=lm.activation,
                norm_eps=lm.norm_eps, **runtime(config))
  if lm.family == "gpt2":
    return gpt2.GPT2(max_len=lm.max_len, **common)
  return llama.Llama(num_kv_heads=lm.num_kv_heads, head_dim=lm.head_dim,
                     rope_theta=lm.rope_theta, tie_embeddings=lm.tie_embeddings, **common)


def mapper(config):
  mp, width = config.model.mapper, config.model.lm.width
  rt = runtime(config)
  if mp.kind == "mlp":
    return MLPMapper(mp.prefix_len, width, mp.hidden_dim, rt["dtype"],
                                rt["matmul_policy"])
  if mp.kind == "transformer":
    return TransformerMapper(mp.prefix_len, width, mp.clip_len, mp.depth,
                                        mp.num_heads, mp.mlp_ratio, **rt)
  return PatchProjector(width, rt["dtype"], rt["matmul_policy"])


def vision_tokens(config) -> int:
  """The tower's output tokens: the class token and the patches."""
  return (config.data.image_size // config.model.vision.patch_size) ** 2 + 1


def from_config(config, features_kind: str) -> PrefixCaptioner:
  return PrefixCaptioner(vision_tower(config), mapper(config), language_model(config),
                         features_kind=features_kind, normalize=config.model.mapper.normalize)
