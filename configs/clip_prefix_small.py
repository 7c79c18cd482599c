"""ClipCap (seed 002) on the built-in shapes data: a frozen CLIP-style ViT's embedding, an MLP
mapper, a small GPT-2; a few minutes on 2 CPU cores from random init.

  python -m capjax.train --config=clip_prefix_small --workdir=runs/clip_prefix

Without init.vision / init.lm the tower and the LM are random (the tower stays frozen: the
mapper and the LM learn to read a random CLIP's embedding) and the tokenizer is capjax's own
(a word model trained on the shapes captions, as shapes_tiny's).
"""

from capjax.config import base


def get_config():
  c = base()
  c.task = "clip_prefix"
  c.dtype = "bfloat16"
  c.data.update(name="shapes", image_size=64)
  c.tokenizer.update(model_type="word", vocab_size=64)
  c.model.update(vocab_size=64, max_len=24, head_init="fan_in")
  c.model.vision.update(family="clip_vision", patch_size=8, width=128, depth=3, num_heads=4,
                        mlp_dim=256, projection_dim=128, activation="quick_gelu")
  c.model.lm.update(family="gpt2", max_len=64, width=128, depth=3, num_heads=4, mlp_dim=512,
                    activation="gelu_new", frozen=False)
  c.model.mapper.update(kind="mlp", prefix_len=8, hidden_dim=0, normalize=True, noise_std=0.0)
  c.objective.masked_pred_prob = 0.0  # CapPa's parallel prediction: not a prefix LM's
  c.train.update(num_steps=600, batch_size=64, log_every=50)
  c.eval.update(every=300, num_examples=256, batch_size=128, num_captions=3)
  c.checkpoint.update(every=300, keep=2)
  c.schedule.update(peak_lr=2e-3, warmup_steps=50)
  return c
