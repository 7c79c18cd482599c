"""CapPa sized for benchmarking on a CPU: 64x64 shapes, patch 8, width 256, 4+4 layers.

The model of `bench/train_step.py --config=cappa_bench_cpu --compare=clipjax`; it also
trains (`python -m capjax.train --config=cappa_bench_cpu`) on the built-in shapes data.
The tokenizer is smaller than model.vocab_size (the shapes captions have few words);
the vocabulary projection is still 8192 wide, as benchmarked.
"""

from capjax.config import base


def get_config():
  c = base()
  c.dtype = "bfloat16"
  c.model.update(vocab_size=8192, max_len=32, patch_size=8, width=256, enc_depth=4, dec_depth=4,
                 mlp_dim=1024, num_heads=4, num_registers=4, remat_policy="none")
  # 4 blocks per scan iteration: the 4-layer towers run unrolled (what XLA:CPU runs
  # fastest); deeper variants (bench/compile.py) still compile a 4-block loop body.
  c.model.scan_unroll = 4
  c.data.update(name="shapes", image_size=64)
  c.tokenizer.update(model_type="word", vocab_size=64)
  c.objective.masked_pred_prob = 0.75
  c.train.update(num_steps=1000, batch_size=32, log_every=20)
  c.eval.update(every=0, num_examples=256, batch_size=64, num_captions=2)
  c.checkpoint.update(every=0, keep=1)
  c.optimizer.update(name="adamw", b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-4)
  c.schedule.update(peak_lr=1e-3, warmup_steps=100)
  return c
