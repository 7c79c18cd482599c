"""Text tower for two-tower models (SigLiT): a bidirectional transformer over caption tokens,
pooled at the caption's last token, projected to the embedding.

Pooling: the last non-padding token, which is EOS in a capjax token row (`[.. EOS PAD ..]`,
BOS dropped by the caller). Attention is bidirectional with padding keys masked, so that token
sees the whole caption and no padding; CLIP pools at EOS the same way. big_vision's SigLIP text
tower pools the last position of the fixed-length row instead, which with short captions and
no mask is a padding token; a mean over tokens would weigh filler words like the class word.
Same blocks as the ViT (NormFormer RMSNorm, GeGLU, no biases).
"""

import flax.linen as nn
import jax.numpy as jnp

from capjax.models import layers


class TextBlock(nn.Module):
  num_heads: int
  mlp_dim: int
  dtype: layers.Dtype = jnp.bfloat16
  matmul_policy: str = "f32_accum"

  @nn.compact
  def __call__(self, x_BxLxD, keys_Bx1x1xL):
    x_BxLxD = layers.constrain(x_BxLxD, ("act_batch", "act_len", "act_embed"))
    h = layers.RMSNorm(self.dtype, name="attn_norm_pre")(x_BxLxD)
    h = layers.Attention(self.num_heads, self.dtype, self.matmul_policy, name="attention")(
        h, mask_Bx1xLxS=keys_Bx1x1xL)
    x_BxLxD = x_BxLxD + layers.RMSNorm(self.dtype, name="attn_norm_post")(h)
    x_BxLxD = x_BxLxD + layers.GeGLU(
        self.mlp_dim, self.dtype, self.matmul_policy, name="mlp")(x_BxLxD)
    return x_BxLxD, None


def last_token_index(tokens_BxL, pad_id: int):
  """int32[B]: the position of each row's last non-padding token (0 for an all-pad row)."""
  return jnp.maximum(jnp.sum(tokens_BxL != pad_id, axis=-1) - 1, 0).astype(jnp.int32)


class TextTower(nn.Module):
  """Tokens [B, L] (no BOS; `[w1 .. wn EOS PAD ..]`) -> float32[B, out_dim], not normalised."""
  vocab_size: int
  max_len: int
  width: int
  depth: int
  mlp_dim: int
  num_heads: int
  out_dim: int
  pad_id: int
  remat_policy: str = "none"
  dtype: layers.Dtype = jnp.bfloat16
  scan_unroll: int = 1
  matmul_policy: str = "f32_accum"

  @nn.compact
  def __call__(self, tokens_BxL):
    length = tokens_BxL.shape[1]
    if length > self.max_len:
      raise ValueError(f"Token length {length} exceeds model.max_len={self.max_len}.")
    x_BxLxD = nn.Embed(
        self.vocab_size, self.width, dtype=self.dtype,
        embedding_init=nn.with_logical_partitioning(
            nn.initializers.normal(0.02), ("vocab", "embed")), name="token_embedding")(tokens_BxL)
    pos_LxD = layers.learned_embedding(
        self, "pos_embedding", (self.max_len, self.width), (None, "embed"))
    x_BxLxD = x_BxLxD + pos_LxD[:length].astype(self.dtype)
    keys_Bx1x1xL = (tokens_BxL != self.pad_id)[:, None, None, :]
    blocks = layers.scan_blocks(TextBlock, self.depth, self.remat_policy, 1, self.scan_unroll)
    x_BxLxD, _ = blocks(self.num_heads, self.mlp_dim, self.dtype, self.matmul_policy,
                        name="layers")(x_BxLxD, keys_Bx1x1xL)
    x_BxLxD = layers.RMSNorm(self.dtype, name="final_norm")(x_BxLxD)
    # A masked sum, not a gather: its backward partitions along the batch like the rest.
    last_BxL = jnp.arange(length) == last_token_index(tokens_BxL, self.pad_id)[:, None]
    pooled_BxD = jnp.sum(jnp.where(last_BxL[..., None], x_BxLxD, 0), axis=1)
    pooled_BxD = layers.constrain(pooled_BxD, ("act_batch", "act_embed"))
    return layers.Dense((self.out_dim,), ("embed", None), dtype=self.dtype,
                        matmul_policy=self.matmul_policy, out_dtype=jnp.float32,
                        name="head")(pooled_BxD)
