"""CapPa B/16 with registers (seed 003 recipe at base size): 224px, patch 16, 12+6 layers."""

from capjax.config import base


def get_config():
  c = base()
  c.model.update(vocab_size=32_000, max_len=64, patch_size=16, width=768, enc_depth=12,
                 dec_depth=6, mlp_dim=2048, num_heads=12, num_registers=8, remat_policy="dots")
  c.data.update(name="shards", dir="", image_size=224, num_workers=8)
  c.tokenizer.update(model_type="unigram", vocab_size=32_000)
  c.objective.masked_pred_prob = 0.75
  c.train.update(num_steps=100_000, batch_size=8192, log_every=100)
  c.eval.update(every=5000, num_examples=8192, batch_size=1024)
  c.checkpoint.update(every=1000, keep=3)
  # Seed 003: distributed Shampoo with RMSProp-normalized grafting, no weight decay.
  c.optimizer = dict(name="adamw", b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0)
  c.schedule.update(name="warmup_rsqrt", peak_lr=1e-3, warmup_steps=10_000)
  c.mesh.update(data=1, fsdp=-1, tensor=1)
  return c
