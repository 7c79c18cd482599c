"""A Llama-family decoder (Hugging Face `LlamaForCausalLM`; SmolLM's architecture): RMSNorm,
RoPE in the rotate-half layout with `rope_theta`, SwiGLU, grouped-query attention, no biases,
a vocabulary head tied to the token embedding or its own.

`__call__(tokens_BxL=None, embeds_BxPxD=None, decode=False)` -> float32 logits B x (P+L) x V:
the input is [embeds ++ embedding(tokens)] (a prefix of embeddings, e.g. projected image
features, before the tokens; Hugging Face's `inputs_embeds`), positions count from the first.
KV cache: see `capjax.models.blocks` (RoPE positions come from each attention's cache_index).
"""

import flax.linen as nn
import jax.numpy as jnp

from capjax.models import blocks, layers


class Llama(nn.Module):
  vocab_size: int = 32000
  width: int = 4096
  depth: int = 32
  num_heads: int = 32
  num_kv_heads: int = 0  # 0: num_heads
  head_dim: int = 0  # 0: width // num_heads
  mlp_dim: int = 11008
  rope_theta: float = 10000.0
  norm_eps: float = 1e-6
  tie_embeddings: bool = False
  activation: str = "silu"
  dtype: layers.Dtype = jnp.float32
  matmul_policy: str = "f32_accum"
  remat_policy: str = "none"
  scan_unroll: int = 1

  @nn.compact
  def __call__(self, tokens_BxL=None, embeds_BxPxD=None, decode: bool = False):
    embedding_VxD = layers.learned_embedding(self, "token_embedding",
                                             (self.vocab_size, self.width), ("vocab", "embed"))
    x_BxLxD = blocks.embed_inputs(embedding_VxD, tokens_BxL, embeds_BxPxD, self.dtype)
    spec = blocks.BlockSpec(
        num_heads=self.num_heads, head_dim=self.head_dim or self.width // self.num_heads,
        mlp_dim=self.mlp_dim, num_kv_heads=self.num_kv_heads, activation=self.activation,
        gated_mlp=True, norm="rmsnorm", norm_eps=self.norm_eps, qkv_bias=False,
        out_bias=False, mlp_bias=False, rope_theta=self.rope_theta, causal=True)
    x_BxLxD = blocks.stack(x_BxLxD, spec, self.depth, decode=decode, dtype=self.dtype,
                           matmul_policy=self.matmul_policy, remat_policy=self.remat_policy,
                           scan_unroll=self.scan_unroll)
    x_BxLxD = blocks.Norm("rmsnorm", self.norm_eps, self.dtype, name="final_norm")(x_BxLxD)
    if self.tie_embeddings:
      return blocks.vocab_logits(x_BxLxD, embedding_VxD, self.matmul_policy)
    return blocks.Linear((self.vocab_size,), ("embed", "vocab"), use_bias=False,
                         dtype=self.dtype, matmul_policy=self.matmul_policy,
                         out_dtype=jnp.float32, name="head")(x_BxLxD)
