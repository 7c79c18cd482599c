"""Building blocks shared by the towers: RMSNorm, GeGLU MLP, attention, patch embedding.

Params are float32 and carry logical axis names; compute runs in `dtype`.
Norms, attention logits and softmax run in float32.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
NEG_INF = -1e9  # finite, so fully-masked rows stay NaN-free


class Dense(nn.Module):
  """x[..., *in] @ W[*in, *features] without bias; W carries logical axis names `axes`.

  (nn.DenseGeneral initializes a flattened kernel, which breaks logical sharding
  constraints for multi-dimensional features inside a mesh.)
  """
  features: tuple[int, ...]
  axes: tuple[str | None, ...]
  contract: int = 1  # number of trailing input dims contracted
  dtype: Dtype = jnp.bfloat16

  @nn.compact
  def __call__(self, x):
    n_in, n_out = self.contract, len(self.features)
    init = nn.initializers.variance_scaling(
        1.0, "fan_in", "truncated_normal",
        in_axis=tuple(range(n_in)), out_axis=tuple(range(n_in, n_in + n_out)))
    kernel = self.param("kernel", nn.with_logical_partitioning(init, self.axes),
                        x.shape[x.ndim - n_in:] + tuple(self.features), jnp.float32)
    dims = ((tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in))), ((), ()))
    return jax.lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype), dims)


def constrain(x: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
  """Shard an activation by logical names (no-op outside a mesh with rules)."""
  return nn.with_logical_constraint(x, axes)


class RMSNorm(nn.Module):
  """RMSNorm computed in float32, returned in the compute dtype."""
  dtype: Dtype = jnp.bfloat16

  @nn.compact
  def __call__(self, x):
    y = nn.RMSNorm(
        dtype=jnp.float32,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
    )(x.astype(jnp.float32))
    return y.astype(self.dtype)


class GeGLU(nn.Module):
  """NormFormer feed-forward: norm -> (gelu(gate) * up) -> norm -> down, no biases."""
  mlp_dim: int
  dtype: Dtype = jnp.bfloat16

  @nn.compact
  def __call__(self, x_BxLxD):
    d = x_BxLxD.shape[-1]
    h_BxLxD = RMSNorm(self.dtype, name="norm_pre")(x_BxLxD)
    dense = lambda n, axes, name: Dense((n,), axes, dtype=self.dtype, name=name)
    gate_BxLxM = dense(self.mlp_dim, ("embed", "mlp"), "gate")(h_BxLxD)
    up_BxLxM = dense(self.mlp_dim, ("embed", "mlp"), "up")(h_BxLxD)
    h_BxLxM = nn.gelu(gate_BxLxM) * up_BxLxM
    h_BxLxM = constrain(h_BxLxM, ("act_batch", "act_len", "act_mlp"))
    h_BxLxM = RMSNorm(self.dtype, name="norm_mid")(h_BxLxM)
    return dense(d, ("mlp", "embed"), "down")(h_BxLxM)


def attention_weights(q_BxLxHxK, k_BxSxHxK, mask_Bx1xLxS):
  """Softmax attention weights in float32. mask: True where attention is allowed."""
  # Logits in float32: bf16 logits lose the small differences softmax depends on.
  logits_BxHxLxS = jnp.einsum(
      "blhk,bshk->bhls", q_BxLxHxK, k_BxSxHxK, preferred_element_type=jnp.float32)
  logits_BxHxLxS = logits_BxHxLxS / jnp.sqrt(q_BxLxHxK.shape[-1]).astype(jnp.float32)
  if mask_Bx1xLxS is not None:
    logits_BxHxLxS = jnp.where(mask_Bx1xLxS, logits_BxHxLxS, NEG_INF)
  return jax.nn.softmax(logits_BxHxLxS, axis=-1)


class Attention(nn.Module):
  """Multi-head attention without biases; self-attention when `kv` is None.

  Sows the attention weights under "intermediates" (read them with
  `mutable=["intermediates"]`) for attention maps.
  """
  num_heads: int
  dtype: Dtype = jnp.bfloat16

  @nn.compact
  def __call__(self, x_BxLxD, kv_BxSxD=None, mask_Bx1xLxS=None):
    d = x_BxLxD.shape[-1]
    head_dim = d // self.num_heads
    kv_BxSxD = x_BxLxD if kv_BxSxD is None else kv_BxSxD
    proj = lambda name: Dense(
        (self.num_heads, head_dim), ("embed", "heads", "kv"), dtype=self.dtype, name=name)
    q_BxLxHxK = proj("query")(x_BxLxD)
    k_BxSxHxK = proj("key")(kv_BxSxD)
    v_BxSxHxK = proj("value")(kv_BxSxD)
    weights_BxHxLxS = attention_weights(q_BxLxHxK, k_BxSxHxK, mask_Bx1xLxS)
    self.sow("intermediates", "attention_weights", weights_BxHxLxS)
    out_BxLxHxK = jnp.einsum(
        "bhls,bshk->blhk", weights_BxHxLxS.astype(self.dtype), v_BxSxHxK)
    return Dense((d,), ("heads", "kv", "embed"), contract=2, dtype=self.dtype, name="out")(
        out_BxLxHxK)


class PatchEmbed(nn.Module):
  """Non-overlapping patches -> linear projection (no bias)."""
  patch_size: int
  width: int
  dtype: Dtype = jnp.bfloat16

  @nn.compact
  def __call__(self, images_BxHxWxC):
    b, h, w, c = images_BxHxWxC.shape
    p = self.patch_size
    if h % p or w % p:
      raise ValueError(f"Image size {h}x{w} is not divisible by patch_size={p}.")
    x = images_BxHxWxC.reshape(b, h // p, p, w // p, p, c)
    patches_BxNxP = x.transpose(0, 1, 3, 2, 4, 5).reshape(b, (h // p) * (w // p), p * p * c)
    return Dense((self.width,), ("patch", "embed"), dtype=self.dtype, name="proj")(patches_BxNxP)


def learned_embedding(module: nn.Module, name: str, shape: tuple[int, ...],
                      axes: tuple[str | None, ...], stddev: float = 0.02):
  init = nn.with_logical_partitioning(nn.initializers.normal(stddev), axes)
  return module.param(name, init, shape, jnp.float32)


REMAT_POLICIES = {
    "none": None,  # no remat
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def scan_blocks(block_cls, depth: int, remat_policy: str, num_broadcast_args: int):
  """Stack `depth` copies of a block with nn.scan (compile time flat in depth)."""
  if remat_policy not in REMAT_POLICIES:
    raise ValueError(
        f"Unknown remat_policy={remat_policy!r}; expected one of {sorted(REMAT_POLICIES)}.")
  if remat_policy != "none":
    block_cls = nn.remat(block_cls, prevent_cse=False, policy=REMAT_POLICIES[remat_policy])
  return nn.scan(
      block_cls,
      variable_axes={"params": 0, "intermediates": 0},
      split_rngs={"params": True},
      in_axes=(nn.broadcast,) * num_broadcast_args,
      length=depth,
      metadata_params={nn.PARTITION_NAME: "layers"},
  )
