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
  # Seed 003: distributed Shampoo with RMSProp-normalized grafting ("Evaluation of Distributed
  # Shampoo"), Nesterov momentum 0.9, no weight decay; inverse roots every 10 steps from
  # step 101. block_size 512: the 1024-wide embed axis that fsdp splits is 2 blocks, whose
  # boundary falls between shards for any power-of-two fsdp, and the mlp axis is 6. The
  # 8.1 GiB of (blocks, 512, 512) statistics and preconditioners are split over fsdp along
  # the blocks when fsdp divides their number: >99% of them up to fsdp=32, 79% at 64 (with
  # 1024: 28% at 32, none at 64). At fsdp=256 none divides: see docs/optimizers.md.
  # Shampoo's momentum is not damped by (1 - b1), so its steps are ~10x AdamW's at the same
  # learning rate: peak 1e-4 here is AdamW's 1e-3 (bench/optimizers.py found the best
  # Shampoo learning rate 1/7 to 1/20 of AdamW's; see docs/optimizers.md).
  c.optimizer.update(name="shampoo", b1=0.9, b2=0.999, weight_decay=0.0, block_size=512,
                     start_preconditioning_step=101, preconditioning_compute_steps=10,
                     graft_type="rmsprop_normalized", nesterov=True, diagonal_eps=1e-10,
                     matrix_eps=1e-6, merge_small_dims_block_size=4096, eigh=False)
  c.schedule.update(name="warmup_rsqrt", peak_lr=1e-4, warmup_steps=10_000)
  c.mesh.update(data=1, fsdp=-1, tensor=1)
  return c
