"""Cross-attention text decoder: causal for captioning, bidirectional for parallel prediction."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from capjax.models import layers


class DecoderBlock(nn.Module):
  num_heads: int
  mlp_dim: int
  dtype: layers.Dtype = jnp.bfloat16
  matmul_policy: str = "f32_accum"
  decode: bool = False  # KV caches (layers.Attention)

  @nn.compact
  def __call__(self, x_BxLxD, enc_BxSxD, self_mask_Bx1xLxL):
    x_BxLxD = layers.constrain(x_BxLxD, ("act_batch", "act_len", "act_embed"))
    h = layers.RMSNorm(self.dtype, name="self_norm_pre")(x_BxLxD)
    h = layers.Attention(self.num_heads, self.dtype, self.matmul_policy, self.decode,
                         name="self_attention")(h, mask_Bx1xLxS=self_mask_Bx1xLxL)
    x_BxLxD = x_BxLxD + layers.RMSNorm(self.dtype, name="self_norm_post")(h)
    h = layers.RMSNorm(self.dtype, name="cross_norm_pre")(x_BxLxD)
    h = layers.Attention(self.num_heads, self.dtype, self.matmul_policy, self.decode,
                         name="cross_attention")(h, enc_BxSxD)
    x_BxLxD = x_BxLxD + layers.RMSNorm(self.dtype, name="cross_norm_post")(h)
    x_BxLxD = x_BxLxD + layers.GeGLU(
        self.mlp_dim, self.dtype, self.matmul_policy, name="mlp")(x_BxLxD)
    return x_BxLxD, None


class Decoder(nn.Module):
  """Tokens + image tokens -> float32 logits. Bias only on the vocabulary projection.

  The vocabulary projection starts at zero (as big_vision's and clip-jax's CapPa), so a
  fresh model predicts the uniform distribution: its loss is ln(vocab_size).

  decode=True (with `mutable=["cache"]`): incremental decoding with KV caches. The first
  call, on a full-length dummy and the real image tokens, sizes the caches and computes the
  cross-attention keys and values; each later call takes the next tokens (B x 1), their
  positions counted in the cache, and reads the image from the cache (pass `enc[:, :0]`).
  """
  vocab_size: int
  max_len: int
  width: int
  depth: int
  mlp_dim: int
  num_heads: int
  remat_policy: str = "none"
  dtype: layers.Dtype = jnp.bfloat16
  scan_unroll: int = 1
  matmul_policy: str = "f32_accum"
  zero_head: bool = True  # the vocabulary projection starts at zero (model.head_init)

  @nn.compact
  def __call__(self, tokens_BxL, enc_BxSxD, self_mask_Bx1xLxL, decode: bool = False):
    embed = nn.Embed(
        self.vocab_size, self.width, dtype=self.dtype,
        embedding_init=nn.with_logical_partitioning(
            nn.initializers.normal(0.02), ("vocab", "embed")), name="token_embedding")
    x_BxLxD = embed(tokens_BxL)
    length = tokens_BxL.shape[1]
    if length > self.max_len:
      raise ValueError(f"Token length {length} exceeds model.max_len={self.max_len}.")
    pos_LxD = layers.learned_embedding(
        self, "pos_embedding", (self.max_len, self.width), (None, "embed"))
    x_BxLxD = x_BxLxD + self._positions(pos_LxD, length, decode).astype(self.dtype)
    # Remat only saves memory for a backward pass, which decoding never runs.
    blocks = layers.scan_blocks(
        DecoderBlock, self.depth, "none" if decode else self.remat_policy, 2, self.scan_unroll)
    x_BxLxD, _ = blocks(self.num_heads, self.mlp_dim, self.dtype, self.matmul_policy, decode,
                        name="layers")(
        x_BxLxD, enc_BxSxD.astype(self.dtype), self_mask_Bx1xLxL)
    x_BxLxD = layers.RMSNorm(self.dtype, name="final_norm")(x_BxLxD)
    # Loss and softmax in float32, and the logits are not rounded to bf16 on the way: the
    # scores of zero-shot and compositional evals compare them.
    logits_BxLxV = layers.Dense(
        (self.vocab_size,), ("embed", "vocab"), dtype=self.dtype,
        matmul_policy=self.matmul_policy, out_dtype=jnp.float32, zero_init=self.zero_head,
        name="logits")(x_BxLxD)
    bias_V = self.param("logits_bias", nn.with_logical_partitioning(
        nn.initializers.zeros, ("vocab",)), (self.vocab_size,), jnp.float32)
    return logits_BxLxV + bias_V

  def _positions(self, pos_LxD, length: int, decode: bool):
    """The position embeddings of this call's tokens: from 0, or in decode mode from the
    number of tokens decoded so far."""
    if not decode:
      return pos_LxD[:length]
    initialized = self.has_variable("cache", "position")
    position = self.variable("cache", "position", lambda: jnp.zeros((), jnp.int32))
    if not initialized:
      return pos_LxD[:length]
    i = position.value
    position.value = i + length
    return jax.lax.dynamic_slice_in_dim(pos_LxD, i, length)
