"""Seed 003's CapPa L/16 on DataComp-1B: 256px, patch 16, 24 layers of width 1024 (MLP 3072),
8 registers, 12-layer decoder, max length 64, vocabulary 65,536, batch 8192, FSDP over a
v5e-256. Sources of every value: docs/optimizers.md ("The cappa_l16_datacomp preset")."""

from capjax.config import base


def get_config():
  c = base()
  # Vocabulary 65,536: clip-jax's configs/large-patch16-cappa.json, which seed 003's 348M text
  # tower (67M of it embeddings: 65,536 x 1024) and 676M in all follow from.
  # Remat "dots_no_batch" keeps the weight matmuls' outputs and recomputes attention:
  # "dots" also keeps every layer's f32 attention logits (32 x 16 x 264 x 264 per device),
  # 3.4 GiB over 24 layers, and did not fit 16 GiB (tools/plan_pod.py, docs/pod_plan.md).
  c.model.update(vocab_size=65_536, max_len=64, patch_size=16, width=1024, enc_depth=24,
                 dec_depth=12, mlp_dim=3072, num_heads=16, num_registers=8,
                 remat_policy="dots_no_batch")
  c.data.update(name="shards", dir="", image_size=256, num_workers=8)
  c.tokenizer.update(model_type="unigram", vocab_size=65_536)
  c.objective.update(masked_pred_prob=0.75, loss_normalization="per_example")
  # No global-norm clip: clip-jax clips nothing before Shampoo (clip_by_scaled_gradient_norm
  # unset in its README example).
  c.train.update(num_steps=200_000, batch_size=8192, log_every=100, grad_clip_norm=0.0)
  c.eval.update(every=5000, num_examples=8192, batch_size=1024)
  c.checkpoint.update(every=1000, keep=3)
  # Seed 003: distributed Shampoo with RMSProp-normalized grafting, no weight decay. The rest
  # is clip-jax's README example: b1 0.9, b2 0.99, block 512, Nesterov, inverse roots every
  # 20 steps; and its training/train.py: momentum as a moving average, preconditioning from
  # step max(20 + 1, 101) = 101, eps 1e-10 / 1e-6. block_size 512 also suits FSDP: the
  # 1024-wide embed axis is 2 blocks whose boundary falls between shards for any power-of-two
  # fsdp, and the blocks split over fsdp up to 32 (docs/optimizers.md).
  # Peak learning rate 1e-3: big_vision's CapPa (configs/proj/cappa/pretrain.py); with the
  # momentum a moving average Shampoo's steps are AdamW's size at the same rate. Cosine to
  # zero after 10k warmup steps, as big_vision.
  c.optimizer.update(name="shampoo", b1=0.9, b2=0.99, weight_decay=0.0, block_size=512,
                     start_preconditioning_step=101, preconditioning_compute_steps=20,
                     graft_type="rmsprop_normalized", nesterov=True, diagonal_eps=1e-10,
                     matrix_eps=1e-6, merge_small_dims_block_size=4096, eigh=False,
                     moving_average_for_momentum=True, split_fused=True)
  c.schedule.update(name="warmup_cosine", peak_lr=1e-3, warmup_steps=10_000,
                    end_lr_fraction=0.0)
  c.mesh.update(data=1, fsdp=-1, tensor=1)
  return c
