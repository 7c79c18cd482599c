"""CLIP's ViT image tower (Hugging Face `CLIPVisionModel`): class token, learned positions,
pre-LN blocks with biases and quick_gelu, a LayerNorm before the blocks and one on the pooled
class token, and an optional projection to the joint embedding (`CLIPModel`'s
`visual_projection`, `CLIPVisionModelWithProjection`).

Input: pixels B x H x W x 3, normalised as the model's image processor does
(`preprocessor_config.json`'s image_mean / image_std), at `image_size`.
"""

import flax.linen as nn
import jax.numpy as jnp

from capjax.models import blocks, layers

# The widths of OpenAI's ViT-B towers; `CLIPVision(**VARIANTS["B/16"])`.
VARIANTS = {
    "B/32": dict(image_size=224, patch_size=32, width=768, depth=12, num_heads=12, mlp_dim=3072,
                 projection_dim=512),
    "B/16": dict(image_size=224, patch_size=16, width=768, depth=12, num_heads=12, mlp_dim=3072,
                 projection_dim=512),
}


class CLIPVision(nn.Module):
  image_size: int = 224
  patch_size: int = 32
  width: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  projection_dim: int = 0  # 0: no projection; the embedding is the pooled class token
  activation: str = "quick_gelu"
  norm_eps: float = 1e-5
  dtype: layers.Dtype = jnp.float32
  matmul_policy: str = "f32_accum"
  remat_policy: str = "none"
  scan_unroll: int = 1

  @nn.compact
  def __call__(self, pixels_BxHxWx3, return_embedding: bool = False):
    """-> last hidden states B x (1 + patches) x D, class token first (Hugging Face's
    `last_hidden_state`: before the post-LayerNorm); with `return_embedding` also the image
    embedding B x E (post-LayerNorm class token, projected when `projection_dim`)."""
    x_BxTxD = blocks.class_and_patch_tokens(self, pixels_BxHxWx3, self.image_size,
                                            self.patch_size, self.width, patch_bias=False)
    x_BxTxD = blocks.Norm("layernorm", self.norm_eps, self.dtype, name="pre_norm")(x_BxTxD)
    spec = blocks.BlockSpec(num_heads=self.num_heads, head_dim=self.width // self.num_heads,
                            mlp_dim=self.mlp_dim, activation=self.activation,
                            norm_eps=self.norm_eps)
    x_BxTxD = blocks.stack(x_BxTxD, spec, self.depth, dtype=self.dtype,
                           matmul_policy=self.matmul_policy, remat_policy=self.remat_policy,
                           scan_unroll=self.scan_unroll)
    # Always built (so init creates every param); unused outputs cost nothing under jit.
    pooled_BxD = blocks.Norm("layernorm", self.norm_eps, self.dtype,
                             name="post_norm")(x_BxTxD[:, 0])
    embedding_BxE = pooled_BxD
    if self.projection_dim:
      embedding_BxE = blocks.Linear((self.projection_dim,), ("embed", None), use_bias=False,
                                    dtype=self.dtype, matmul_policy=self.matmul_policy,
                                    name="projection")(pooled_BxD)
    return (x_BxTxD, embedding_BxE) if return_embedding else x_BxTxD

