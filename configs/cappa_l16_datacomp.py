"""Seed 003's CapPa L/16 on DataComp-1B: 256px, patch 16, 24 layers of width 1024 (MLP 3072),
8 registers, 12-layer decoder, max length 64, batch 8192, FSDP over a v5e-256."""

from capjax.config import base


def get_config():
  c = base()
  # Remat "dots_no_batch" keeps the weight matmuls' outputs and recomputes attention:
  # "dots" also keeps every layer's f32 attention logits (32 x 16 x 264 x 264 per device),
  # 3.4 GiB over 24 layers, and did not fit 16 GiB (tools/plan_pod.py, docs/pod_plan.md).
  c.model.update(vocab_size=32_000, max_len=64, patch_size=16, width=1024, enc_depth=24,
                 dec_depth=12, mlp_dim=3072, num_heads=16, num_registers=8,
                 remat_policy="dots_no_batch")
  c.data.update(name="shards", dir="", image_size=256, num_workers=8)
  c.tokenizer.update(model_type="unigram", vocab_size=32_000)
  c.objective.masked_pred_prob = 0.75
  c.train.update(num_steps=200_000, batch_size=8192, log_every=100)
  c.eval.update(every=5000, num_examples=8192, batch_size=1024)
  c.checkpoint.update(every=1000, keep=3)
  c.optimizer = dict(name="adamw", b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0)
  c.schedule.update(name="warmup_rsqrt", peak_lr=1e-3, warmup_steps=10_000)
  c.mesh.update(data=1, fsdp=-1, tensor=1)
  return c
