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
  # Seed 003: distributed Shampoo with RMSProp-normalized grafting ("Evaluation of Distributed
  # Shampoo"), Nesterov momentum 0.9, no weight decay. block_size 1024 keeps the 768-wide
  # embed axis, which fsdp splits, in one block (512 would cut blocks across the shards of
  # 768 / fsdp rows); the mlp axis is 2 blocks. Block matrices are stored (blocks, B, B),
  # split over fsdp along the blocks when fsdp divides their number (at fsdp=8: 84% of the
  # 3 GiB of statistics and preconditioners). Inverse roots every 10 steps from step 101.
  # Shampoo's momentum is not damped by (1 - b1), so its steps are ~10x AdamW's at the same
  # learning rate: peak 1e-4 here is AdamW's 1e-3 (bench/optimizers.py found the best
  # Shampoo learning rate 1/7 to 1/20 of AdamW's; see docs/optimizers.md).
  c.optimizer.update(name="shampoo", b1=0.9, b2=0.999, weight_decay=0.0, block_size=1024,
                     start_preconditioning_step=101, preconditioning_compute_steps=10,
                     graft_type="rmsprop_normalized", nesterov=True, diagonal_eps=1e-10,
                     matrix_eps=1e-6, merge_small_dims_block_size=4096, eigh=False)
  c.schedule.update(name="warmup_rsqrt", peak_lr=1e-4, warmup_steps=10_000)
  c.mesh.update(data=1, fsdp=-1, tensor=1)
  return c
