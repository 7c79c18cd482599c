"""ViT encoder with registers (seed 003): learned positions, GeGLU, NormFormer RMSNorm, no biases."""

import flax.linen as nn
import jax.numpy as jnp

from capjax.models import layers


class EncoderBlock(nn.Module):
  num_heads: int
  mlp_dim: int
  dtype: layers.Dtype = jnp.bfloat16
  matmul_policy: str = "f32_accum"

  @nn.compact
  def __call__(self, x_BxTxD):
    x_BxTxD = layers.constrain(x_BxTxD, ("act_batch", "act_len", "act_embed"))
    h = layers.RMSNorm(self.dtype, name="attn_norm_pre")(x_BxTxD)
    h = layers.Attention(self.num_heads, self.dtype, self.matmul_policy, name="attention")(h)
    x_BxTxD = x_BxTxD + layers.RMSNorm(self.dtype, name="attn_norm_post")(h)
    x_BxTxD = x_BxTxD + layers.GeGLU(
        self.mlp_dim, self.dtype, self.matmul_policy, name="mlp")(x_BxTxD)
    return x_BxTxD, None


class ViT(nn.Module):
  """Images -> (registers ++ patch tokens), all kept for the decoder's cross-attention."""
  patch_size: int
  width: int
  depth: int
  mlp_dim: int
  num_heads: int
  num_registers: int
  remat_policy: str = "none"
  dtype: layers.Dtype = jnp.bfloat16
  scan_unroll: int = 1
  matmul_policy: str = "f32_accum"

  @nn.compact
  def __call__(self, images_BxHxWxC):
    x_BxNxD = layers.PatchEmbed(self.patch_size, self.width, self.dtype, self.matmul_policy,
                                name="embedding")(images_BxHxWxC)
    b, n, d = x_BxNxD.shape
    pos_NxD = layers.learned_embedding(self, "pos_embedding", (n, d), (None, "embed"))
    x_BxNxD = x_BxNxD + pos_NxD.astype(self.dtype)
    if self.num_registers:
      reg_RxD = layers.learned_embedding(
          self, "registers", (self.num_registers, d), (None, "embed"))
      reg_BxRxD = jnp.broadcast_to(reg_RxD.astype(self.dtype), (b, self.num_registers, d))
      x_BxNxD = jnp.concatenate([reg_BxRxD, x_BxNxD], axis=1)
    blocks = layers.scan_blocks(EncoderBlock, self.depth, self.remat_policy, 0, self.scan_unroll)
    x_BxTxD, _ = blocks(self.num_heads, self.mlp_dim, self.dtype, self.matmul_policy,
                        name="layers")(x_BxNxD)
    return layers.RMSNorm(self.dtype, name="final_norm")(x_BxTxD)
