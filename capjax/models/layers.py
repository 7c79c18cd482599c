"""Building blocks shared by the towers: RMSNorm, GeGLU MLP, attention, patch embedding.

Params are float32 and carry logical axis names; compute runs in `dtype`.
Norms, attention logits and softmax, and GeGLU's gelu and product run in float32.
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


def unstack(x: jax.Array, axis: int) -> tuple[jax.Array, ...]:
  """Splits a fused projection's outputs, e.g. [B, L, 3, H, K] -> 3 x [B, L, H, K].

  Via jnp.split: its gradient is one concatenate, where indexing's is a zero-padded
  add per output (measured ~10% of a CPU train step with fused q/k/v and gate/up).
  """
  return tuple(jnp.squeeze(part, axis) for part in jnp.split(x, x.shape[axis], axis))


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
  """NormFormer feed-forward: norm -> (gelu(gate) * up) -> norm -> down, no biases.

  Gate and up are one matmul (kernel D x 2 x M). The gelu and the product run in
  float32: they feed a float32 norm, and bfloat16 elementwise math would round after
  every op (each rounding is a pass over B x L x M on a CPU).
  """
  mlp_dim: int
  dtype: Dtype = jnp.bfloat16

  @nn.compact
  def __call__(self, x_BxLxD):
    d = x_BxLxD.shape[-1]
    h_BxLxD = RMSNorm(self.dtype, name="norm_pre")(x_BxLxD)
    wi_BxLx2xM = Dense((2, self.mlp_dim), ("embed", None, "mlp"), dtype=self.dtype,
                       name="wi")(h_BxLxD)
    gate_BxLxM, up_BxLxM = unstack(wi_BxLx2xM, axis=-2)
    h_BxLxM = nn.gelu(gate_BxLxM.astype(jnp.float32)) * up_BxLxM.astype(jnp.float32)
    h_BxLxM = constrain(h_BxLxM, ("act_batch", "act_len", "act_mlp"))
    h_BxLxM = RMSNorm(self.dtype, name="norm_mid")(h_BxLxM)
    return Dense((d,), ("mlp", "embed"), dtype=self.dtype, name="down")(h_BxLxM)


def attention_weights(q_BxLxHxK, k_BxSxHxK, mask_Bx1xLxS):
  """Softmax attention weights in float32. mask: True where attention is allowed."""
  # Logits in float32: bf16 logits lose the small differences softmax depends on.
  logits_BxHxLxS = jnp.einsum(
      "blhk,bshk->bhls", q_BxLxHxK, k_BxSxHxK, preferred_element_type=jnp.float32)
  logits_BxHxLxS = logits_BxHxLxS / jnp.sqrt(q_BxLxHxK.shape[-1]).astype(jnp.float32)
  if mask_Bx1xLxS is not None:
    logits_BxHxLxS = jnp.where(mask_Bx1xLxS, logits_BxHxLxS, NEG_INF)
  return jax.nn.softmax(logits_BxHxLxS, axis=-1)


def dot_product_attention(q_BxLxHxK, k_BxSxHxK, v_BxSxHxK, mask_Bx1xLxS):
  """softmax(q k^T / sqrt(K)) v with float32 logits and softmax (jax.nn's kernel)."""
  return jax.nn.dot_product_attention(q_BxLxHxK, k_BxSxHxK, v_BxSxHxK, mask=mask_Bx1xLxS)


class Attention(nn.Module):
  """Multi-head attention without biases; self-attention when `kv` is None.

  Self-attention projects q, k and v in one matmul (kernel D x 3 x H x K),
  cross-attention k and v in one (D x 2 x H x K). When "intermediates" is mutable
  (`mutable=["intermediates"]` or `capture_intermediates=True`) the attention weights
  are computed explicitly and sown for attention maps; otherwise
  `jax.nn.dot_product_attention` runs (its XLA path; logits and softmax in float32).
  """
  num_heads: int
  dtype: Dtype = jnp.bfloat16

  @nn.compact
  def __call__(self, x_BxLxD, kv_BxSxD=None, mask_Bx1xLxS=None):
    d = x_BxLxD.shape[-1]
    head_dim = d // self.num_heads
    proj = lambda n, name: Dense(
        (n, self.num_heads, head_dim), ("embed", None, "heads", "kv"), dtype=self.dtype,
        name=name)
    if kv_BxSxD is None:
      qkv_BxLx3xHxK = proj(3, "qkv")(x_BxLxD)
      q_BxLxHxK, k_BxSxHxK, v_BxSxHxK = unstack(qkv_BxLx3xHxK, axis=2)
    else:
      q_BxLxHxK = Dense((self.num_heads, head_dim), ("embed", "heads", "kv"),
                        dtype=self.dtype, name="query")(x_BxLxD)
      kv_BxSx2xHxK = proj(2, "kv")(kv_BxSxD)
      k_BxSxHxK, v_BxSxHxK = unstack(kv_BxSx2xHxK, axis=2)
    if self.is_mutable_collection("intermediates"):
      weights_BxHxLxS = attention_weights(q_BxLxHxK, k_BxSxHxK, mask_Bx1xLxS)
      self.sow("intermediates", "attention_weights", weights_BxHxLxS)
      out_BxLxHxK = jnp.einsum(
          "bhls,bshk->blhk", weights_BxHxLxS.astype(self.dtype), v_BxSxHxK)
    else:
      out_BxLxHxK = dot_product_attention(q_BxLxHxK, k_BxSxHxK, v_BxSxHxK, mask_Bx1xLxS)
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


def scan_blocks(block_cls, depth: int, remat_policy: str, num_broadcast_args: int,
                unroll: int = 1):
  """Stack `depth` copies of a block with nn.scan: compile time grows with `unroll`
  (blocks per loop iteration), not with depth.

  unroll > 1 trades compile time for speed: XLA then sees several blocks at once and
  drops the per-iteration copies of scanned activations (-20% of a 4+4-layer CPU step).
  """
  if remat_policy not in REMAT_POLICIES:
    raise ValueError(
        f"Unknown remat_policy={remat_policy!r}; expected one of {sorted(REMAT_POLICIES)}.")
  if unroll < 1:
    raise ValueError(f"scan_unroll must be >= 1, got {unroll}.")
  if remat_policy != "none":
    block_cls = nn.remat(block_cls, prevent_cse=False, policy=REMAT_POLICIES[remat_policy])
  return nn.scan(
      block_cls,
      variable_axes={"params": 0, "intermediates": 0},
      split_rngs={"params": True},
      in_axes=(nn.broadcast,) * num_broadcast_args,
      length=depth,
      unroll=min(unroll, depth),
      metadata_params={nn.PARTITION_NAME: "layers"},
  )
