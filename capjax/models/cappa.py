"""CapPa: ViT encoder with registers + cross-attention text decoder."""

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from capjax.models import decoder, layers, vit


class CapPa(nn.Module):
  vocab_size: int
  max_len: int
  patch_size: int
  width: int
  enc_depth: int
  dec_depth: int
  mlp_dim: int
  num_heads: int
  num_registers: int
  dec_width: int | None = None
  dec_mlp_dim: int | None = None
  remat_policy: str = "none"
  dtype: layers.Dtype = jnp.bfloat16
  scan_unroll: int = 1  # blocks per scan iteration (model.scan_unroll, default 1)
  matmul_policy: str = "f32_accum"  # layers.MATMUL_POLICIES (model.matmul_policy)
  zero_head: bool = True  # model.head_init == "zeros"

  def setup(self):
    self.encoder = vit.ViT(
        self.patch_size, self.width, self.enc_depth, self.mlp_dim, self.num_heads,
        self.num_registers, self.remat_policy, self.dtype, self.scan_unroll,
        self.matmul_policy)
    self.decoder = decoder.Decoder(
        self.vocab_size, self.max_len, self.dec_width or self.width, self.dec_depth,
        self.dec_mlp_dim or self.mlp_dim, self.num_heads, self.remat_policy, self.dtype,
        self.scan_unroll, self.matmul_policy, self.zero_head)

  def encode(self, images_BxHxWxC):
    return self.encoder(images_BxHxWxC)

  def decode(self, tokens_BxL, enc_BxSxD, self_mask_Bx1xLxL, decode: bool = False):
    """Logits; decode=True: incremental, with KV caches (`decoder.Decoder`)."""
    return self.decoder(tokens_BxL, enc_BxSxD, self_mask_Bx1xLxL, decode)

  def __call__(self, images_BxHxWxC, tokens_BxL, self_mask_Bx1xLxL):
    return self.decode(tokens_BxL, self.encode(images_BxHxWxC), self_mask_Bx1xLxL)


def from_config(config: ml_collections.ConfigDict) -> CapPa:
  m = config.model
  return CapPa(
      vocab_size=m.vocab_size, max_len=m.max_len, patch_size=m.patch_size, width=m.width,
      enc_depth=m.enc_depth, dec_depth=m.dec_depth, mlp_dim=m.mlp_dim, num_heads=m.num_heads,
      num_registers=m.num_registers, dec_width=m.dec_width or None,
      dec_mlp_dim=m.dec_mlp_dim or None, remat_policy=m.remat_policy,
      dtype=jnp.dtype(config.dtype), scan_unroll=m.scan_unroll,
      matmul_policy=layers.check_matmul_policy(m.matmul_policy),
      zero_head=m.head_init == "zeros")
