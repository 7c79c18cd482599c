"""Mini-VLM (seed 004): every output token of a frozen ViT (class token and patches) through a
2-layer MLP projector (`model.mapper.kind=projector`) into the embedding space of a small
Llama-family LM (SmolLM's architecture; GPT-2 works too), which reads the projected image tokens
before the caption; the image positions are masked out of the loss.

Seed 004 feeds the tower's tokens unnormalised (`model.mapper.normalize=False` in its presets).
Everything else (pretrained towers, the loss, decoding, FLOPs): `capjax/tasks/prefix_lm.py`.
"""

from capjax import tasks
from capjax.tasks import prefix_lm


@tasks.register("mini_vlm")
class MiniVLM(prefix_lm.PrefixLMTask):
  FEATURES = "tokens"  # the tower's last hidden states, class token first
  VISION_FAMILIES = ("vit", "clip_vision")
  MAPPERS = ("projector",)
