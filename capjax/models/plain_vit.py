"""The plain ViT of google/vit (Hugging Face `ViTModel`): class token, learned positions,
pre-LN blocks with biases and gelu, a final LayerNorm. The pooler (dense + tanh on the class
token) is not part of this tower.

Input: pixels B x H x W x 3, normalised as the model's image processor does
(`preprocessor_config.json`'s image_mean / image_std; 0.5 / 0.5 for google/vit), at
`image_size`.
"""

import flax.linen as nn
import jax.numpy as jnp

from capjax.models import blocks, layers


class PlainViT(nn.Module):
  image_size: int = 224
  patch_size: int = 16
  width: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  qkv_bias: bool = True
  activation: str = "gelu"
  norm_eps: float = 1e-12
  dtype: layers.Dtype = jnp.float32
  matmul_policy: str = "f32_accum"
  remat_policy: str = "none"
  scan_unroll: int = 1

  @nn.compact
  def __call__(self, pixels_BxHxWx3):
    """-> last hidden states B x (1 + patches) x D, class token first (after the final
    LayerNorm, as Hugging Face's `last_hidden_state`)."""
    x_BxTxD = blocks.class_and_patch_tokens(self, pixels_BxHxWx3, self.image_size,
                                            self.patch_size, self.width, patch_bias=True)
    spec = blocks.BlockSpec(num_heads=self.num_heads, head_dim=self.width // self.num_heads,
                            mlp_dim=self.mlp_dim, activation=self.activation,
                            norm_eps=self.norm_eps, qkv_bias=self.qkv_bias)
    x_BxTxD = blocks.stack(x_BxTxD, spec, self.depth, dtype=self.dtype,
                           matmul_policy=self.matmul_policy, remat_policy=self.remat_policy,
                           scan_unroll=self.scan_unroll)
    return blocks.Norm("layernorm", self.norm_eps, self.dtype, name="final_norm")(x_BxTxD)
