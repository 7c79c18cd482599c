"""ClipCap as seed 002 trains it, on Flickr8k: CLIP ViT-B/32's image embedding (frozen,
L2-normalised, with a little noise in training), a transformer mapper to a 40-embedding prefix,
GPT-2 fine-tuned with it.

  huggingface-cli download openai/clip-vit-base-patch32 --local-dir hf/clip-b32 \
      --include '*.json' '*.safetensors' '*.txt'            # on a machine with network
  huggingface-cli download openai-community/gpt2 --local-dir hf/gpt2 \
      --include '*.json' '*.safetensors' '*.txt'
  python tools/convert_hf.py --src=hf/clip-b32 --dst=runs/clip-b32
  python tools/convert_hf.py --src=hf/gpt2 --dst=runs/gpt2
  python -m capjax.train --config=clip_prefix_flickr --workdir=runs/clip_prefix_flickr \
      --config.data.dir=/data/flickr8k \
      --config.init.vision=runs/clip-b32 --config.init.lm=runs/gpt2

The tower's and GPT-2's sizes, the pixel mean/std, the image size and GPT-2's BPE tokenizer
come from init.vision / init.lm (capjax/tasks/prefix_lm.py); the values below (ViT-B/32 and
GPT-2 small) only size the random parts used without them. Seed 002: prefix length 40, 8
transformer layers, Adam at 5e-5, 12 epochs of captions, "10%" noise on the embedding. ClipCap's
prefix-only variant: --config.model.lm.frozen=True.
"""

from capjax.config import base

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def get_config():
  c = base()
  c.task = "clip_prefix"
  c.data.update(name="flickr8k", dir="", image_size=224, resize="center_crop")
  c.tokenizer.update(model_type="unigram", vocab_size=4096)  # only without init.lm
  c.model.update(vocab_size=50257, max_len=40)
  c.model.vision.update(family="clip_vision", patch_size=32, width=768, depth=12, num_heads=12,
                        mlp_dim=3072, projection_dim=512, activation="quick_gelu",
                        norm_eps=1e-5, image_mean=CLIP_MEAN, image_std=CLIP_STD)
  c.model.lm.update(family="gpt2", max_len=1024, width=768, depth=12, num_heads=12,
                    mlp_dim=3072, activation="gelu_new", norm_eps=1e-5, frozen=False)
  # Seed 002's noise "rate 10%": noise whose norm is ~10% of the unit embedding's, i.e.
  # 0.1 / sqrt(512) per dimension of CLIP B/32's 512-d embedding.
  c.model.mapper.update(kind="transformer", prefix_len=40, clip_len=40, depth=8, num_heads=8,
                        mlp_ratio=2.0, normalize=True, noise_std=0.0044)
  # 12 epochs of Flickr8k's 30k training captions at batch 64 (one caption per image a step).
  c.objective.masked_pred_prob = 0.0  # CapPa's parallel prediction: not a prefix LM's
  c.train.update(num_steps=6000, batch_size=64, log_every=50)
  c.optimizer.update(name="adamw", weight_decay=0.0)
  c.schedule.update(name="warmup_cosine", peak_lr=5e-5, warmup_steps=300)
  c.eval.update(every=1000, num_examples=512, batch_size=64, num_captions=3)
  c.checkpoint.update(every=1000, keep=2)
  return c
