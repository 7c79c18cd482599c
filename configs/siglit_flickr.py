"""SigLiT on Flickr8k, on top of a `flickr_small` CapPa: its frozen vision tower and a text
tower trained with the sigmoid loss.

  python -m capjax.train --config=siglit_flickr --workdir=runs/siglit_flickr \
      --config.init.image_tower=runs/flickr_small

The image tower's sizes, data.image_size, the tokenizer and (when data.dir is empty) the
Flickr8k folder come from `init.image_tower`'s run (capjax/tasks/siglit.py); the flickr_small
values below only size the random tower used without it. Settings from big_vision's
`configs/proj/image_text/siglip_lit_coco.py` unless noted.
"""

from capjax import config as config_lib


def get_config():
  c = config_lib.load_preset("flickr_small")  # data, tokenizer, and the random tower's sizes
  c.task = "siglit"
  c.model.update(image_pool="map", embed_dim=0,  # siglip_lit_coco: no image head either
                 temperature_init=10.0, bias_init=-2.71)
  # siglip_lit_coco trains a BERT-base text tower; 6k training images (30k captions) call for a
  # small one.
  c.model.text.update(width=256, depth=3, mlp_dim=1024, num_heads=4)
  # siglip_lit_coco: batch 512, 5k steps on COCO's 83k images; Flickr8k has 6k: batch 128,
  # 3k steps is 64 epochs of images (each time with one of its 5 captions).
  c.train.update(num_steps=3000, batch_size=128, log_every=50, grad_clip_norm=1.0)
  c.optimizer.update(name="adamw", b1=0.9, b2=0.999, eps=1e-8,
                     # big_vision's wd=0.01 is decoupled and not scaled by the learning rate;
                     # optax.adamw multiplies weight_decay by it: 0.01 / lr(1e-3) = 10 is the
                     # same decay per step (kernels only, as there).
                     weight_decay=10.0)
  c.schedule.update(name="warmup_cosine", peak_lr=1e-3, warmup_steps=100,  # max(3%, 100)
                    end_lr_fraction=0.0)
  c.eval.update(every=500, num_examples=512, batch_size=128)
  c.checkpoint.update(every=500, keep=2)
  return c
