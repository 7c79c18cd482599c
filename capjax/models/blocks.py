"""Pre-LN transformer blocks of the towers that mirror Hugging Face models (CLIP, google/vit,
GPT-2, Llama): LayerNorm or RMSNorm, biases where the original has them, grouped-query
attention with optional RoPE (Hugging Face's rotate-half layout) and a KV cache, plain or
gated MLPs.

Params are float32 with logical axis names (the CapPa towers' names); compute runs in `dtype`;
norms, attention logits and softmax, RoPE and activations run in float32. Every matmul goes
through `layers.einsum`, under the model's matmul policy.

KV cache (Flax linen's convention, as `nn.MultiHeadDotProductAttention`): with `decode=True`
the first call (on a full-length dummy, `mutable=["cache"]`) creates "cached_key" and
"cached_value" (B x max_len x kv_heads x K) and "cache_index" (int32 scalar) and returns the
ordinary causal forward; each later call writes its L >= 1 positions at "cache_index" and
attends to every position written so far. The caller keeps "cache_index" + L <= max_len.
"""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from capjax.models import layers

ACTIVATIONS = {
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "silu": jax.nn.silu,
    "relu": jax.nn.relu,
}
NORMS = ("layernorm", "rmsnorm")


@dataclasses.dataclass(frozen=True)
class BlockSpec:
  """The shape and flavour of one transformer block."""
  num_heads: int
  head_dim: int
  mlp_dim: int
  num_kv_heads: int = 0  # 0: num_heads (no grouping)
  activation: str = "gelu"  # a key of ACTIVATIONS
  gated_mlp: bool = False  # SwiGLU-style act(gate) * up
  norm: str = "layernorm"  # layernorm | rmsnorm
  norm_eps: float = 1e-5
  qkv_bias: bool = True
  out_bias: bool = True  # the attention's output projection
  mlp_bias: bool = True
  rope_theta: float = 0.0  # 0: no rotary embedding
  causal: bool = False

  def __post_init__(self):
    if self.activation not in ACTIVATIONS:
      raise ValueError(f"Unsupported activation {self.activation!r}; expected one of "
                       f"{sorted(ACTIVATIONS)}.")
    if self.norm not in NORMS:
      raise ValueError(f"Unsupported norm {self.norm!r}; expected one of {list(NORMS)}.")
    if self.num_heads % self.kv_heads:
      raise ValueError(f"num_heads={self.num_heads} is not a multiple of "
                       f"num_kv_heads={self.kv_heads}.")

  @property
  def kv_heads(self) -> int:
    return self.num_kv_heads or self.num_heads


def _fan_in_init(n_in: int, n_out: int):
  return nn.initializers.variance_scaling(
      1.0, "fan_in", "truncated_normal",
      in_axis=tuple(range(n_in)), out_axis=tuple(range(n_in, n_in + n_out)))


class Linear(nn.Module):
  """x[..., *in] @ W[*in, *features] (+ b[*features]); params "kernel" and "bias".

  axes: the kernel's logical names, contracted dims first; the bias takes the feature dims'.
  """
  features: tuple[int, ...]
  axes: tuple[str | None, ...]
  contract: int = 1
  use_bias: bool = True
  dtype: layers.Dtype = jnp.float32
  matmul_policy: str = "f32_accum"
  out_dtype: layers.Dtype | None = None  # None: dtype

  @nn.compact
  def __call__(self, x):
    n_in, n_out = self.contract, len(self.features)
    kernel = self.param("kernel", nn.with_logical_partitioning(_fan_in_init(n_in, n_out),
                                                               self.axes),
                        x.shape[x.ndim - n_in:] + tuple(self.features), jnp.float32)
    y = layers.einsum(layers.dense_spec(x.ndim, n_in, n_out), x, kernel, dtype=self.dtype,
                      policy=self.matmul_policy, out_dtype=self.out_dtype)
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros,
                                                             self.axes[n_in:]),
                        tuple(self.features), jnp.float32)
      y = y + bias.astype(y.dtype)
    return y


class Norm(nn.Module):
  """LayerNorm (scale and bias) or RMSNorm (scale) over the last dim, in float32."""
  kind: str = "layernorm"
  eps: float = 1e-5
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    x32 = x.astype(jnp.float32)
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                       (d,), jnp.float32)
    if self.kind == "rmsnorm":
      y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
      return (y * scale).astype(self.dtype)
    centred = x32 - jnp.mean(x32, axis=-1, keepdims=True)
    y = centred * jax.lax.rsqrt(jnp.mean(jnp.square(centred), axis=-1, keepdims=True) + self.eps)
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
                      (d,), jnp.float32)
    return (y * scale + bias).astype(self.dtype)


def rope(x_BxLxHxK, positions_L, theta: float):
  """Rotary embedding in Hugging Face's rotate-half layout (the two halves of each head are
  the pairs), computed in float32."""
  k = x_BxLxHxK.shape[-1]
  inv_freq_H = 1.0 / theta ** (jnp.arange(0, k, 2, dtype=jnp.float32) / k)
  angles_LxH = positions_L.astype(jnp.float32)[:, None] * inv_freq_H[None, :]
  angles_LxK = jnp.concatenate([angles_LxH, angles_LxH], axis=-1)
  cos_1xLx1xK = jnp.cos(angles_LxK)[None, :, None, :]
  sin_1xLx1xK = jnp.sin(angles_LxK)[None, :, None, :]
  x = x_BxLxHxK.astype(jnp.float32)
  x1, x2 = jnp.split(x, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return (x * cos_1xLx1xK + rotated * sin_1xLx1xK).astype(x_BxLxHxK.dtype)


def grouped_attention(q_BxLxHxK, k_BxSxGxK, v_BxSxGxK, mask_LxS, matmul_policy: str):
  """Softmax attention where each of the G key/value heads serves H/G consecutive query heads
  (Hugging Face's `repeat_kv` order), without copying k and v H/G times."""
  b, length, h, kd = q_BxLxHxK.shape
  g = k_BxSxGxK.shape[2]
  q_BxLxGxRxK = q_BxLxHxK.reshape(b, length, g, h // g, kd)
  # Logits and softmax in float32: bf16 logits lose the small differences softmax needs.
  logits_BxGxRxLxS = layers.einsum("blgrk,bsgk->bgrls", q_BxLxGxRxK, k_BxSxGxK,
                                   dtype=q_BxLxHxK.dtype, policy=matmul_policy,
                                   out_dtype=jnp.float32)
  logits_BxGxRxLxS = logits_BxGxRxLxS / jnp.sqrt(jnp.float32(kd))
  if mask_LxS is not None:
    logits_BxGxRxLxS = jnp.where(mask_LxS, logits_BxGxRxLxS, layers.NEG_INF)
  weights_BxGxRxLxS = jax.nn.softmax(logits_BxGxRxLxS, axis=-1)
  out_BxLxGxRxK = layers.einsum("bgrls,bsgk->blgrk", weights_BxGxRxLxS, v_BxSxGxK,
                                dtype=v_BxSxGxK.dtype, policy=matmul_policy)
  return out_BxLxGxRxK.reshape(b, length, h, kd)


class Attention(nn.Module):
  """Self-attention: "query" (D x H x K) and "kv" (D x 2 x G x K) projections, "out"."""
  spec: BlockSpec
  decode: bool = False
  dtype: layers.Dtype = jnp.float32
  matmul_policy: str = "f32_accum"

  @nn.compact
  def __call__(self, x_BxLxD):
    s, d, length = self.spec, x_BxLxD.shape[-1], x_BxLxD.shape[1]
    linear = functools.partial(Linear, use_bias=s.qkv_bias, dtype=self.dtype,
                               matmul_policy=self.matmul_policy)
    q_BxLxHxK = linear((s.num_heads, s.head_dim), ("embed", "heads", "kv"),
                       name="query")(x_BxLxD)
    kv_BxLx2xGxK = linear((2, s.kv_heads, s.head_dim), ("embed", None, "heads", "kv"),
                          name="kv")(x_BxLxD)
    k_BxLxGxK, v_BxLxGxK = layers.unstack(kv_BxLx2xGxK, axis=2)
    start, cached = 0, False
    if self.decode:
      cached = self.has_variable("cache", "cached_key")
      cached_key = self.variable("cache", "cached_key", jnp.zeros, k_BxLxGxK.shape,
                                 k_BxLxGxK.dtype)
      cached_value = self.variable("cache", "cached_value", jnp.zeros, v_BxLxGxK.shape,
                                   v_BxLxGxK.dtype)
      cache_index = self.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32))
      if cached:
        start = cache_index.value
    positions_L = start + jnp.arange(length, dtype=jnp.int32)
    if s.rope_theta:
      q_BxLxHxK = rope(q_BxLxHxK, positions_L, s.rope_theta)
      k_BxLxGxK = rope(k_BxLxGxK, positions_L, s.rope_theta)
    k_BxSxGxK, v_BxSxGxK = k_BxLxGxK, v_BxLxGxK
    if cached:
      update = lambda cache, new: jax.lax.dynamic_update_slice(
          cache, new.astype(cache.dtype), (0, start, 0, 0))
      cached_key.value = update(cached_key.value, k_BxLxGxK)
      cached_value.value = update(cached_value.value, v_BxLxGxK)
      cache_index.value = start + length
      k_BxSxGxK, v_BxSxGxK = cached_key.value, cached_value.value
    mask_LxS = None
    if s.causal or cached:  # the cache's unwritten slots lie after every query position
      mask_LxS = jnp.arange(k_BxSxGxK.shape[1])[None, :] <= positions_L[:, None]
    out_BxLxHxK = grouped_attention(q_BxLxHxK, k_BxSxGxK, v_BxSxGxK, mask_LxS,
                                    self.matmul_policy)
    return Linear((d,), ("heads", "kv", "embed"), contract=2, use_bias=s.out_bias,
                  dtype=self.dtype, matmul_policy=self.matmul_policy, name="out")(out_BxLxHxK)


class MLP(nn.Module):
  """wi -> act (gated: act(gate) * up) -> down; the activation in float32."""
  spec: BlockSpec
  dtype: layers.Dtype = jnp.float32
  matmul_policy: str = "f32_accum"

  @nn.compact
  def __call__(self, x_BxLxD):
    s, d = self.spec, x_BxLxD.shape[-1]
    linear = functools.partial(Linear, use_bias=s.mlp_bias, dtype=self.dtype,
                               matmul_policy=self.matmul_policy)
    act = ACTIVATIONS[s.activation]
    if s.gated_mlp:
      wi_BxLx2xM = linear((2, s.mlp_dim), ("embed", None, "mlp"), name="wi")(x_BxLxD)
      gate_BxLxM, up_BxLxM = layers.unstack(wi_BxLx2xM, axis=-2)
      h_BxLxM = act(gate_BxLxM.astype(jnp.float32)) * up_BxLxM.astype(jnp.float32)
    else:
      h_BxLxM = act(linear((s.mlp_dim,), ("embed", "mlp"), name="wi")(x_BxLxD)
                    .astype(jnp.float32))
    h_BxLxM = layers.constrain(h_BxLxM.astype(self.dtype), ("act_batch", "act_len", "act_mlp"))
    return linear((d,), ("mlp", "embed"), name="down")(h_BxLxM)


class Block(nn.Module):
  """Pre-LN block: x + attention(norm(x)), then x + mlp(norm(x))."""
  spec: BlockSpec
  decode: bool = False
  dtype: layers.Dtype = jnp.float32
  matmul_policy: str = "f32_accum"

  @nn.compact
  def __call__(self, x_BxLxD):
    s = self.spec
    x_BxLxD = layers.constrain(x_BxLxD, ("act_batch", "act_len", "act_embed"))
    h_BxLxD = Norm(s.norm, s.norm_eps, self.dtype, name="attn_norm")(x_BxLxD)
    x_BxLxD = x_BxLxD + Attention(s, self.decode, self.dtype, self.matmul_policy,
                                  name="attention")(h_BxLxD)
    h_BxLxD = Norm(s.norm, s.norm_eps, self.dtype, name="mlp_norm")(x_BxLxD)
    x_BxLxD = x_BxLxD + MLP(s, self.dtype, self.matmul_policy, name="mlp")(h_BxLxD)
    return x_BxLxD, None


def stack(x_BxLxD, spec: BlockSpec, depth: int, *, decode: bool = False,
          dtype: layers.Dtype = jnp.float32, matmul_policy: str = "f32_accum",
          remat_policy: str = "none", scan_unroll: int = 1, name: str = "layers"):
  """`depth` scanned blocks (params and cache stacked on a leading "layers" axis); call from
  a compact method."""
  blocks = layers.scan_blocks(Block, depth, remat_policy, 0, scan_unroll)
  x_BxLxD, _ = blocks(spec, decode, dtype, matmul_policy, name=name)(x_BxLxD)
  return x_BxLxD


def embed_inputs(embedding_VxD, tokens_BxL, embeds_BxPxD, dtype):
  """[embeds_BxPxD ++ embedding of tokens_BxL] (either may be None): a language model's input
  with a prefix of embeddings (e.g. projected image features) before the tokens."""
  parts = []
  if embeds_BxPxD is not None:
    if embeds_BxPxD.shape[-1] != embedding_VxD.shape[-1]:
      raise ValueError(f"embeds_BxPxD has width {embeds_BxPxD.shape[-1]}; the model's is "
                       f"{embedding_VxD.shape[-1]}.")
    parts.append(embeds_BxPxD.astype(dtype))
  if tokens_BxL is not None:
    parts.append(jnp.take(embedding_VxD, jnp.asarray(tokens_BxL), axis=0).astype(dtype))
  if not parts:
    raise ValueError("Pass tokens_BxL, embeds_BxPxD or both.")
  return jnp.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]


def vocab_logits(x_BxLxD, embedding_VxD, matmul_policy: str):
  """Logits of a tied head (x @ embeddingᵀ), in float32: the loss and scores compare them."""
  return layers.einsum("bld,vd->blv", x_BxLxD, embedding_VxD, dtype=x_BxLxD.dtype,
                       policy=matmul_policy, out_dtype=jnp.float32)


def class_and_patch_tokens(module: nn.Module, pixels_BxHxWxC, image_size: int, patch_size: int,
                           width: int, patch_bias: bool):
  """A ViT's input: [class token ++ patch embeddings] + learned positions, B x (1 + N) x D.

  Call from `module`'s compact method (which has `dtype` and `matmul_policy`); makes its params
  "embedding" (the patch projection), "embedding_bias" (with `patch_bias`), "cls" and
  "pos_embedding".
  """
  if pixels_BxHxWxC.shape[1:3] != (image_size, image_size):
    raise ValueError(f"Images are {pixels_BxHxWxC.shape[1]}x{pixels_BxHxWxC.shape[2]}; the "
                     f"tower's learned positions are for {image_size}x{image_size}.")
  dtype = module.dtype
  x_BxNxD = layers.PatchEmbed(patch_size, width, dtype, module.matmul_policy,
                              name="embedding")(pixels_BxHxWxC)
  b, n, d = x_BxNxD.shape
  if patch_bias:
    bias_D = module.param("embedding_bias", nn.with_logical_partitioning(
        nn.initializers.zeros, ("embed",)), (d,), jnp.float32)
    x_BxNxD = x_BxNxD + bias_D.astype(dtype)
  cls_D = layers.learned_embedding(module, "cls", (d,), ("embed",))
  cls_Bx1xD = jnp.broadcast_to(cls_D.astype(dtype), (b, 1, d))
  x_BxTxD = jnp.concatenate([cls_Bx1xD, x_BxNxD], axis=1)
  pos_TxD = layers.learned_embedding(module, "pos_embedding", (n + 1, d), (None, "embed"))
  return x_BxTxD + pos_TxD.astype(dtype)
