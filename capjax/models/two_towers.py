"""Two towers for SigLiT: the CapPa ViT (the same module and param names as CapPa's `encoder`,
so a CapPa checkpoint's tower drops in), pooled to one vector, and a text tower; both
L2-normalised, plus the sigmoid loss's learned temperature (as log t) and bias.

Image pooling (`model.image_pool`):
  map        a learned attention-pooling head (big_vision's MAPHead: one learned query
             cross-attends over all the tower's tokens, then a GeGLU MLP); trainable while the
             tower stays frozen, as SigLIP's own towers pool;
  mean       the mean of the patch tokens (registers left out); nothing learned;
  registers  the mean of the registers.
`embed_dim` > 0 adds a trainable linear projection of the pooled image vector (LiT's optional
image head); 0 keeps the tower's width, which the text tower then projects to.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from capjax.models import layers, text_tower, vit

IMAGE_POOLS = ("map", "mean", "registers")


class MAPHead(nn.Module):
  """Multihead attention pooling: [B, T, D] -> [B, D]."""
  num_heads: int
  mlp_dim: int
  dtype: layers.Dtype = jnp.bfloat16
  matmul_policy: str = "f32_accum"

  @nn.compact
  def __call__(self, x_BxTxD):
    b, _, d = x_BxTxD.shape
    probe_1xD = layers.learned_embedding(self, "probe", (1, d), (None, "embed"))
    q_Bx1xD = jnp.broadcast_to(probe_1xD.astype(self.dtype), (b, 1, d))
    h_Bx1xD = layers.Attention(self.num_heads, self.dtype, self.matmul_policy,
                               name="attention")(q_Bx1xD, x_BxTxD)
    h_Bx1xD = h_Bx1xD + layers.GeGLU(self.mlp_dim, self.dtype, self.matmul_policy,
                                     name="mlp")(h_Bx1xD)
    return layers.RMSNorm(self.dtype, name="norm")(h_Bx1xD)[:, 0]


def l2_normalize(x_BxE):
  x_BxE = layers.constrain(x_BxE.astype(jnp.float32), ("act_batch", "act_embed"))
  return x_BxE * jax.lax.rsqrt(jnp.sum(x_BxE * x_BxE, axis=-1, keepdims=True) + 1e-12)


class TwoTowers(nn.Module):
  # image tower (CapPa's ViT)
  patch_size: int
  width: int
  depth: int
  mlp_dim: int
  num_heads: int
  num_registers: int
  # text tower
  vocab_size: int
  max_len: int
  text_width: int
  text_depth: int
  text_mlp_dim: int
  text_num_heads: int
  pad_id: int
  image_pool: str = "map"
  embed_dim: int = 0  # 0: the image tower's width, no image projection
  temperature_init: float = 10.0
  bias_init: float = -2.71
  remat_policy: str = "none"
  dtype: layers.Dtype = jnp.bfloat16
  scan_unroll: int = 1
  matmul_policy: str = "f32_accum"

  def setup(self):
    if self.image_pool not in IMAGE_POOLS:
      raise ValueError(f"Unknown model.image_pool={self.image_pool!r}; expected one of "
                       f"{IMAGE_POOLS}.")
    self.encoder = vit.ViT(
        self.patch_size, self.width, self.depth, self.mlp_dim, self.num_heads,
        self.num_registers, self.remat_policy, self.dtype, self.scan_unroll, self.matmul_policy)
    if self.image_pool == "map":
      self.image_pool_head = MAPHead(self.num_heads, self.mlp_dim, self.dtype,
                                     self.matmul_policy)
    if self.embed_dim:
      self.image_head = layers.Dense((self.embed_dim,), ("embed", None), dtype=self.dtype,
                                     matmul_policy=self.matmul_policy, out_dtype=jnp.float32)
    self.text = text_tower.TextTower(
        self.vocab_size, self.max_len, self.text_width, self.text_depth, self.text_mlp_dim,
        self.text_num_heads, self.embed_dim or self.width, self.pad_id, self.remat_policy,
        self.dtype, self.scan_unroll, self.matmul_policy)
    scalar = lambda value: nn.with_logical_partitioning(nn.initializers.constant(value), ())
    self.log_temperature = self.param("log_temperature", scalar(math.log(self.temperature_init)),
                                      (), jnp.float32)
    self.bias = self.param("bias", scalar(self.bias_init), (), jnp.float32)

  def pool(self, tokens_BxTxD):
    """The image tower's tokens (registers first, then patches) -> [B, D]."""
    if self.image_pool == "map":
      pooled_BxD = self.image_pool_head(tokens_BxTxD)
    else:
      r = self.num_registers
      part = tokens_BxTxD[:, :r] if self.image_pool == "registers" else tokens_BxTxD[:, r:]
      pooled_BxD = jnp.mean(part.astype(jnp.float32), axis=1)
    return layers.constrain(pooled_BxD, ("act_batch", "act_embed"))

  def embed_images(self, images_BxHxWxC):
    """float32[B, E], unit norm."""
    z_BxD = self.pool(self.encoder(images_BxHxWxC))
    return l2_normalize(self.image_head(z_BxD) if self.embed_dim else z_BxD)

  def embed_texts(self, tokens_BxL):
    """float32[B, E], unit norm; tokens without BOS."""
    return l2_normalize(self.text(tokens_BxL))

  def temperature_and_bias(self):
    return jnp.exp(self.log_temperature), self.bias

  def __call__(self, images_BxHxWxC, tokens_BxL):
    """(image embeddings, text embeddings, temperature, bias)."""
    return (self.embed_images(images_BxHxWxC), self.embed_texts(tokens_BxL),
            *self.temperature_and_bias())
