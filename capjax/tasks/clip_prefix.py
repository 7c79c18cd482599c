"""ClipCap (seed 002; Mokady et al. 2021): a frozen CLIP image embedding, L2-normalised, mapped
by an MLP or a transformer mapper (`model.mapper.kind`) to a prefix of `model.mapper.prefix_len`
embeddings that GPT-2 (or a Llama-family LM) reads before the caption. Optional Gaussian noise
on the normalised embedding in training (`model.mapper.noise_std`; seed 002's regulariser).

Everything else (pretrained towers, the loss, decoding, FLOPs): `capjax/tasks/prefix_lm.py`.
"""

from capjax import tasks
from capjax.tasks import prefix_lm


@tasks.register("clip_prefix")
class ClipPrefix(prefix_lm.PrefixLMTask):
  FEATURES = "embedding"  # CLIPVision's (projected) pooled embedding
  VISION_FAMILIES = ("clip_vision",)
  MAPPERS = ("mlp", "transformer")
