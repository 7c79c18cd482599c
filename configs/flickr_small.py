"""Seed 000's tiny from-scratch captioner on Flickr8k: 128x128, patch 8, width 128, 2+2 blocks."""

from capjax.config import base


def get_config():
  c = base()
  c.model.update(vocab_size=4096, max_len=32, patch_size=8, width=128, enc_depth=2, dec_depth=2,
                 mlp_dim=512, num_heads=4, num_registers=4)
  # Captions lower-cased (as in seed 000's outputs); punctuation kept.
  c.data.update(name="flickr8k", dir="", image_size=128, resize="center_crop", lowercase=True,
                strip_punctuation=False)
  c.tokenizer.update(model_type="unigram", vocab_size=4096)
  c.objective.masked_pred_prob = 0.75
  c.train.update(num_steps=6000, batch_size=64, log_every=50)
  c.eval.update(every=1000, num_examples=512, batch_size=128)
  c.checkpoint.update(every=1000, keep=2)
  c.schedule.update(peak_lr=1e-3, warmup_steps=300)
  return c
