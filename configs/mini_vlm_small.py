"""Mini-VLM (seed 004) on the built-in shapes data: a frozen ViT's tokens through a 2-layer MLP
projector into a small Llama-family LM (RMSNorm, RoPE, SwiGLU, grouped-query attention); a few
minutes on 2 CPU cores from random init.

  python -m capjax.train --config=mini_vlm_small --workdir=runs/mini_vlm

Without init.vision / init.lm the tower and the LM are random (the tower stays frozen) and the
tokenizer is capjax's own (a word model trained on the shapes captions, as shapes_tiny's).
"""

from capjax.config import base


def get_config():
  c = base()
  c.task = "mini_vlm"
  c.dtype = "bfloat16"
  c.data.update(name="shapes", image_size=64)
  c.tokenizer.update(model_type="word", vocab_size=64)
  c.model.update(vocab_size=64, max_len=24)
  c.model.vision.update(family="vit", patch_size=8, width=128, depth=3, num_heads=4,
                        mlp_dim=256, qkv_bias=True, activation="gelu", norm_eps=1e-12)
  c.model.lm.update(family="llama", width=128, depth=3, num_heads=4, num_kv_heads=2,
                    head_dim=0, mlp_dim=384, rope_theta=10_000.0, norm_eps=1e-5,
                    tie_embeddings=True, activation="silu", frozen=False)
  # Seed 004 feeds the ViT's hidden states to the projector as they are.
  c.model.mapper.update(kind="projector", normalize=False, noise_std=0.0)
  c.objective.masked_pred_prob = 0.0  # CapPa's parallel prediction: not a prefix LM's
  # 89 positions a row (65 image tokens): each step costs ~2x clip_prefix_small's.
  c.train.update(num_steps=400, batch_size=64, log_every=50)
  c.eval.update(every=200, num_examples=256, batch_size=128, num_captions=3)
  c.checkpoint.update(every=200, keep=2)
  c.schedule.update(peak_lr=2e-3, warmup_steps=50)
  return c
