"""Building blocks shared by the towers: RMSNorm, GeGLU MLP, attention, patch embedding.

Params are float32 and carry logical axis names; compute runs in `dtype`.
Norms, attention logits and softmax, and GeGLU's gelu and product run in float32.
Every matmul goes through `einsum`, under the model's `matmul_policy`.
"""

import functools
import string
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
NEG_INF = -1e9  # finite, so fully-masked rows stay NaN-free

# model.matmul_policy:
#   f32_accum: operands in the compute dtype, float32 accumulation, the result cast to the
#     compute dtype (or kept float32 where the caller asks); the backward pass casts the
#     cotangent to the compute dtype and accumulates both gradient matmuls in float32, and
#     returns each gradient in its operand's dtype (float32 params get float32 gradients).
#   legacy: capjax before issue 18: results in the compute dtype, plain autodiff,
#     attention through jax.nn.dot_product_attention.
# On XLA:CPU the output dtype picks the kernel: bf16 x bf16 -> bf16 is the slow one even on
# CPUs with AMX (docs/performance.md); accelerators want float32 accumulation anyway.
MATMUL_POLICIES = ("f32_accum", "legacy")


def check_matmul_policy(policy: str) -> str:
  if policy not in MATMUL_POLICIES:
    raise ValueError(
        f"Unknown model.matmul_policy={policy!r}; expected one of {list(MATMUL_POLICIES)}.")
  return policy


def einsum(spec: str, a, b, *, dtype: Dtype, policy: str, out_dtype: Dtype | None = None):
  """`jnp.einsum(spec, a, b)` with operands in `dtype`, result in `out_dtype` (default
  `dtype`), accumulated as `policy` says. `spec` names every axis ("ab,bc->ac"); an axis
  of one operand is in the other operand or in the output."""
  check_matmul_policy(policy)
  dtype = jnp.dtype(dtype)
  out_dtype = jnp.dtype(out_dtype or dtype)
  if policy == "legacy":
    return jnp.einsum(spec, a.astype(dtype), b.astype(dtype)).astype(out_dtype)
  return _f32_accum_einsum(spec, dtype, out_dtype, a.dtype, b.dtype)(a, b)


@functools.cache
def _f32_accum_einsum(spec: str, dtype, out_dtype, a_dtype, b_dtype):
  """The f32_accum matmul for one (spec, dtypes), with its custom backward pass."""
  operands, out_sub = spec.split("->")
  a_sub, b_sub = operands.split(",")

  def forward(a, b):
    a_c, b_c = a.astype(dtype), b.astype(dtype)
    return _accumulate(spec, a_c, b_c).astype(out_dtype), (a_c, b_c)

  @jax.custom_vjp
  def matmul(a, b):
    return forward(a, b)[0]

  def backward(residuals, g):
    a_c, b_c = residuals
    # autodiff would compute the gradients in the cotangent's dtype (bf16 result: the
    # slow kernel; float32 cotangent of float32 logits: float32 operands).
    g_c = g.astype(dtype)
    grad_a = _accumulate(f"{out_sub},{b_sub}->{a_sub}", g_c, b_c, lhs_contract_last=True)
    grad_b = _accumulate(f"{out_sub},{a_sub}->{b_sub}", g_c, a_c, lhs_contract_last=True)
    return grad_a.astype(a_dtype), grad_b.astype(b_dtype)

  matmul.defvjp(forward, backward)
  return matmul


def _accumulate(spec: str, x, y, lhs_contract_last: bool = False):
  """einsum with float32 accumulation and result.

  lhs_contract_last: a batched einsum takes as lhs the operand whose free axes come first
  in the output, with its contracted axes moved last. XLA:CPU (jaxlib 0.10) runs other
  batched bf16 x bf16 -> f32 dots in float32, or fails ("Unsupported element type for
  DotThunk") where the lhs is contracted on another axis; attention's dk and dv are such.
  """
  operands, out_sub = spec.split("->")
  x_sub, y_sub = operands.split(",")
  batch = [c for c in x_sub if c in y_sub and c in out_sub]
  if lhs_contract_last and batch:
    first_free = next((c for c in out_sub if c not in batch), None)
    if first_free is not None and first_free in y_sub:
      x, y, x_sub, y_sub = y, x, y_sub, x_sub
    free = [c for c in x_sub if c not in y_sub]
    contract = [c for c in x_sub if c in y_sub and c not in out_sub]
    order = "".join(batch + free + contract)
    x = jnp.transpose(x, [x_sub.index(c) for c in order])
    x_sub = order
  return jnp.einsum(f"{x_sub},{y_sub}->{out_sub}", x, y, preferred_element_type=jnp.float32)


class Dense(nn.Module):
  """x[..., *in] @ W[*in, *features] without bias; W carries logical axis names `axes`.

  (nn.DenseGeneral initializes a flattened kernel, which breaks logical sharding
  constraints for multi-dimensional features inside a mesh.)
  """
  features: tuple[int, ...]
  axes: tuple[str | None, ...]
  contract: int = 1  # number of trailing input dims contracted
  dtype: Dtype = jnp.bfloat16
  matmul_policy: str = "f32_accum"
  out_dtype: Dtype | None = None  # None: dtype
  zero_init: bool = False

  @nn.compact
  def __call__(self, x):
    n_in, n_out = self.contract, len(self.features)
    init = nn.initializers.zeros if self.zero_init else nn.initializers.variance_scaling(
        1.0, "fan_in", "truncated_normal",
        in_axis=tuple(range(n_in)), out_axis=tuple(range(n_in, n_in + n_out)))
    kernel = self.param("kernel", nn.with_logical_partitioning(init, self.axes),
                        x.shape[x.ndim - n_in:] + tuple(self.features), jnp.float32)
    return einsum(dense_spec(x.ndim, n_in, n_out), x, kernel, dtype=self.dtype,
                  policy=self.matmul_policy, out_dtype=self.out_dtype)


def dense_spec(x_ndim: int, n_in: int, n_out: int) -> str:
  """einsum spec contracting x's last n_in axes with a kernel's first: "abc,cd->abd"."""
  letters = string.ascii_letters
  x_sub = letters[:x_ndim]
  out_sub = letters[x_ndim:x_ndim + n_out]
  kernel_sub = x_sub[x_ndim - n_in:] + out_sub
  return f"{x_sub},{kernel_sub}->{x_sub[:x_ndim - n_in]}{out_sub}"


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
  matmul_policy: str = "f32_accum"

  @nn.compact
  def __call__(self, x_BxLxD):
    d = x_BxLxD.shape[-1]
    h_BxLxD = RMSNorm(self.dtype, name="norm_pre")(x_BxLxD)
    wi_BxLx2xM = Dense((2, self.mlp_dim), ("embed", None, "mlp"), dtype=self.dtype,
                       matmul_policy=self.matmul_policy, name="wi")(h_BxLxD)
    gate_BxLxM, up_BxLxM = unstack(wi_BxLx2xM, axis=-2)
    h_BxLxM = nn.gelu(gate_BxLxM.astype(jnp.float32)) * up_BxLxM.astype(jnp.float32)
    h_BxLxM = constrain(h_BxLxM, ("act_batch", "act_len", "act_mlp"))
    h_BxLxM = RMSNorm(self.dtype, name="norm_mid")(h_BxLxM)
    return Dense((d,), ("mlp", "embed"), dtype=self.dtype, matmul_policy=self.matmul_policy,
                 name="down")(h_BxLxM)


def attention_weights(q_BxLxHxK, k_BxSxHxK, mask_Bx1xLxS, matmul_policy: str = "f32_accum"):
  """Softmax attention weights in float32. mask: True where attention is allowed."""
  # Logits in float32: bf16 logits lose the small differences softmax depends on
  # (legacy asked for them too, without the custom backward pass).
  spec = "blhk,bshk->bhls"
  if check_matmul_policy(matmul_policy) == "legacy":
    logits_BxHxLxS = jnp.einsum(spec, q_BxLxHxK, k_BxSxHxK, preferred_element_type=jnp.float32)
  else:
    logits_BxHxLxS = einsum(spec, q_BxLxHxK, k_BxSxHxK, dtype=q_BxLxHxK.dtype,
                            policy=matmul_policy, out_dtype=jnp.float32)
  logits_BxHxLxS = logits_BxHxLxS / jnp.sqrt(q_BxLxHxK.shape[-1]).astype(jnp.float32)
  if mask_Bx1xLxS is not None:
    logits_BxHxLxS = jnp.where(mask_Bx1xLxS, logits_BxHxLxS, NEG_INF)
  return jax.nn.softmax(logits_BxHxLxS, axis=-1)


def attention_values(weights_BxHxLxS, v_BxSxHxK, matmul_policy: str = "f32_accum"):
  """The attention-weighted values, in v's dtype."""
  return einsum("bhls,bshk->blhk", weights_BxHxLxS, v_BxSxHxK, dtype=v_BxSxHxK.dtype,
                policy=matmul_policy)


class Attention(nn.Module):
  """Multi-head attention without biases; self-attention when `kv` is None.

  Self-attention projects q, k and v in one matmul (kernel D x 3 x H x K),
  cross-attention k and v in one (D x 2 x H x K). When "intermediates" is mutable
  (`mutable=["intermediates"]` or `capture_intermediates=True`) the attention weights
  are sown for attention maps. The legacy matmul policy otherwise runs
  `jax.nn.dot_product_attention` (its XLA path: the same math, autodiff backward).

  decode=True keeps a KV cache in the "cache" collection, as Flax's own attention does.
  The first call (with `mutable=["cache"]` and no cache yet) sizes it from its input:
  self-attention keeps `cached_key`/`cached_value` (B x L x H x K, zeros) and `cache_index`;
  cross-attention projects the image's keys and values once and keeps them. Later calls feed
  the next tokens (usually one): self-attention writes their keys and values at
  `cache_index` and attends to every cached position up to its own; cross-attention reads
  its cached keys and values and ignores `kv_BxSxD` (pass `kv[:, :0]`).
  """
  num_heads: int
  dtype: Dtype = jnp.bfloat16
  matmul_policy: str = "f32_accum"
  decode: bool = False

  @nn.compact
  def __call__(self, x_BxLxD, kv_BxSxD=None, mask_Bx1xLxS=None):
    d = x_BxLxD.shape[-1]
    head_dim = d // self.num_heads
    dense = functools.partial(Dense, dtype=self.dtype, matmul_policy=self.matmul_policy)
    proj = lambda n, name: dense(
        (n, self.num_heads, head_dim), ("embed", None, "heads", "kv"), name=name)
    if kv_BxSxD is None:
      qkv_BxLx3xHxK = proj(3, "qkv")(x_BxLxD)
      q_BxLxHxK, k_BxSxHxK, v_BxSxHxK = unstack(qkv_BxLx3xHxK, axis=2)
      if self.decode:
        k_BxSxHxK, v_BxSxHxK, mask_Bx1xLxS = self._extend_cache(
            k_BxSxHxK, v_BxSxHxK, mask_Bx1xLxS)
    else:
      q_BxLxHxK = dense((self.num_heads, head_dim), ("embed", "heads", "kv"),
                        name="query")(x_BxLxD)
      if self.decode and self.has_variable("cache", "cached_key"):
        k_BxSxHxK = self.get_variable("cache", "cached_key")
        v_BxSxHxK = self.get_variable("cache", "cached_value")
      else:
        kv_BxSx2xHxK = proj(2, "kv")(kv_BxSxD)
        k_BxSxHxK, v_BxSxHxK = unstack(kv_BxSx2xHxK, axis=2)
        if self.decode:  # the image's keys and values, once per image
          self.put_variable("cache", "cached_key", k_BxSxHxK)
          self.put_variable("cache", "cached_value", v_BxSxHxK)
    sow = self.is_mutable_collection("intermediates")
    if self.matmul_policy == "legacy" and not sow:
      out_BxLxHxK = jax.nn.dot_product_attention(
          q_BxLxHxK, k_BxSxHxK, v_BxSxHxK, mask=mask_Bx1xLxS)
    else:
      weights_BxHxLxS = attention_weights(
          q_BxLxHxK, k_BxSxHxK, mask_Bx1xLxS, self.matmul_policy)
      if sow:
        self.sow("intermediates", "attention_weights", weights_BxHxLxS)
      out_BxLxHxK = attention_values(weights_BxHxLxS, v_BxSxHxK, self.matmul_policy)
    return dense((d,), ("heads", "kv", "embed"), contract=2, name="out")(out_BxLxHxK)

  def _extend_cache(self, k_BxLxHxK, v_BxLxHxK, mask_Bx1xLxS):
    """Self-attention's keys, values and mask over the cache, with this call's written in."""
    initialized = self.has_variable("cache", "cached_key")
    cached_k = self.variable("cache", "cached_key", jnp.zeros, k_BxLxHxK.shape, k_BxLxHxK.dtype)
    cached_v = self.variable("cache", "cached_value", jnp.zeros, v_BxLxHxK.shape,
                             v_BxLxHxK.dtype)
    index = self.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32))
    if not initialized:  # the sizing call: a full-length dummy, attended as given
      return k_BxLxHxK, v_BxLxHxK, mask_Bx1xLxS
    i, length, size = index.value, k_BxLxHxK.shape[1], cached_k.value.shape[1]
    cached_k.value = jax.lax.dynamic_update_slice_in_dim(cached_k.value, k_BxLxHxK, i, axis=1)
    cached_v.value = jax.lax.dynamic_update_slice_in_dim(cached_v.value, v_BxLxHxK, i, axis=1)
    index.value = i + length
    query_L = i + jnp.arange(length)
    cache_mask_1x1xLxS = (jnp.arange(size)[None, :] <= query_L[:, None])[None, None]
    if mask_Bx1xLxS is not None:
      cache_mask_1x1xLxS = cache_mask_1x1xLxS & mask_Bx1xLxS
    return cached_k.value, cached_v.value, cache_mask_1x1xLxS


class PatchEmbed(nn.Module):
  """Non-overlapping patches -> linear projection (no bias)."""
  patch_size: int
  width: int
  dtype: Dtype = jnp.bfloat16
  matmul_policy: str = "f32_accum"

  @nn.compact
  def __call__(self, images_BxHxWxC):
    b, h, w, c = images_BxHxWxC.shape
    p = self.patch_size
    if h % p or w % p:
      raise ValueError(f"Image size {h}x{w} is not divisible by patch_size={p}.")
    x = images_BxHxWxC.reshape(b, h // p, p, w // p, p, c)
    patches_BxNxP = x.transpose(0, 1, 3, 2, 4, 5).reshape(b, (h // p) * (w // p), p * p * c)
    return Dense((self.width,), ("patch", "embed"), dtype=self.dtype,
                 matmul_policy=self.matmul_policy, name="proj")(patches_BxNxP)


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
      variable_axes={"params": 0, "intermediates": 0, "cache": 0},  # cache: KV caches
      split_rngs={"params": True},
      in_axes=(nn.broadcast,) * num_broadcast_args,
      length=depth,
      unroll=min(unroll, depth),
      metadata_params={nn.PARTITION_NAME: "layers"},
  )
