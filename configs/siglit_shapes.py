"""SigLiT on the built-in shapes data, on top of a `shapes_tiny` CapPa: its frozen vision tower
and a small text tower trained with the sigmoid loss; a few minutes on 2 CPU cores.

  python -m capjax.train --config=siglit_shapes --workdir=runs/siglit \
      --config.init.image_tower=runs/demo

The image tower's sizes, data.image_size and the tokenizer come from `init.image_tower`'s run
(capjax/tasks/siglit.py); the shapes_tiny values below only size the random tower used without
it. Settings from big_vision's `configs/proj/image_text/siglip_lit_coco.py` unless noted.
"""

from capjax import config as config_lib


def get_config():
  c = config_lib.load_preset("shapes_tiny")  # data, tokenizer, and the random tower's sizes
  c.task = "siglit"
  c.model.update(image_pool="map", embed_dim=0,  # siglip_lit_coco: no image head either
                 temperature_init=10.0, bias_init=-2.71)
  # The text tower as big as shapes_tiny's decoder (siglip_lit_coco: BERT-base).
  c.model.text.update(width=128, depth=2, mlp_dim=256, num_heads=4)
  # siglip_lit_coco: batch 512, 5k steps. A batch of 128 is 128 negatives per image (the shapes
  # captions have few distinct meanings: a bigger batch holds more duplicate "negatives").
  c.train.update(num_steps=600, batch_size=128, log_every=50, grad_clip_norm=1.0)
  c.optimizer.update(name="adamw", b1=0.9, b2=0.999, eps=1e-8,
                     # big_vision's wd=0.01 is decoupled and not scaled by the learning rate;
                     # optax.adamw multiplies weight_decay by it: 0.01 / lr(1e-3) = 10 is the
                     # same decay per step (kernels only, as there).
                     weight_decay=10.0)
  c.schedule.update(name="warmup_cosine", peak_lr=1e-3, warmup_steps=100,  # max(3%, 100)
                    end_lr_fraction=0.0)
  c.eval.update(every=200, num_examples=256, batch_size=128)
  c.checkpoint.update(every=200, keep=2)
  return c
