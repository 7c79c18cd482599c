"""GPT-2 (Hugging Face `GPT2LMHeadModel`): learned positions, pre-LN blocks with biases and
gelu_new, a final LayerNorm, the vocabulary head tied to the token embedding.

`__call__(tokens_BxL=None, embeds_BxPxD=None, decode=False)` -> float32 logits B x (P+L) x V:
the input is [embeds ++ embedding(tokens)] (a prefix of embeddings, e.g. projected image
features, before the tokens; Hugging Face's `inputs_embeds`), positions count from the first.
KV cache: see `capjax.models.blocks`; this module also keeps its own "cache_index" (the next
position) in the "cache" collection for the learned positions.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from capjax.models import blocks, layers


class GPT2(nn.Module):
  vocab_size: int = 50257
  max_len: int = 1024  # learned positions (n_positions)
  width: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  activation: str = "gelu_new"
  norm_eps: float = 1e-5
  dtype: layers.Dtype = jnp.float32
  matmul_policy: str = "f32_accum"
  remat_policy: str = "none"
  scan_unroll: int = 1

  @nn.compact
  def __call__(self, tokens_BxL=None, embeds_BxPxD=None, decode: bool = False):
    embedding_VxD = layers.learned_embedding(self, "token_embedding",
                                             (self.vocab_size, self.width), ("vocab", "embed"))
    x_BxLxD = blocks.embed_inputs(embedding_VxD, tokens_BxL, embeds_BxPxD, self.dtype)
    length = x_BxLxD.shape[1]
    if length > self.max_len:
      raise ValueError(f"Input length {length} exceeds the model's max_len={self.max_len}.")
    start = 0
    if decode:
      cached = self.has_variable("cache", "cache_index")
      cache_index = self.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32))
      if cached:
        start = cache_index.value
        cache_index.value = start + length
    pos_TxD = layers.learned_embedding(self, "pos_embedding", (self.max_len, self.width),
                                       (None, "embed"))
    x_BxLxD = x_BxLxD + jax.lax.dynamic_slice_in_dim(pos_TxD, start, length).astype(self.dtype)
    spec = blocks.BlockSpec(num_heads=self.num_heads, head_dim=self.width // self.num_heads,
                            mlp_dim=self.mlp_dim, activation=self.activation,
                            norm_eps=self.norm_eps, causal=True)
    x_BxLxD = blocks.stack(x_BxLxD, spec, self.depth, decode=decode, dtype=self.dtype,
                           matmul_policy=self.matmul_policy, remat_policy=self.remat_policy,
                           scan_unroll=self.scan_unroll)
    x_BxLxD = blocks.Norm("layernorm", self.norm_eps, self.dtype, name="final_norm")(x_BxLxD)
    return blocks.vocab_logits(x_BxLxD, embedding_VxD, self.matmul_policy)
