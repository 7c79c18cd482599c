"""Attribute accuracy of greedy captions on held-out `shapes` images.

The share of the images' attributes (shape, colour and size of every object, the
object count, and the relation in two-object scenes) that the caption states
correctly; see `capjax.data.synthetic.score_caption`. `distinct_captions`: the share of
distinct captions among the first `DISTINCT_OVER` images (a fixed count, so runs compare; mode
collapse, one caption for many images, shows as a low share).
"""


import numpy as np

from capjax import captioner as captioner_lib, evals
from capjax.data import pipeline, synthetic

DISTINCT_OVER = 64


def distinct_share(captions: list[str], over: int = DISTINCT_OVER) -> float:
  """Distinct captions / captions, among the first `over`."""
  first = captions[:over]
  return len(set(first)) / max(len(first), 1)


def generated_captions(trained, images_uint8) -> list[str]:
  """Greedy captions (`capjax.captioner.Captioner`)."""
  return [c[0] for c in captioner_lib.Captioner(trained).captions(images_uint8)]


@evals.register("attributes")
def attribute_accuracy(trained, split: str = "test", num_examples: int = 256, show: int = 8,
                       batch_size: int = 128) -> dict:
  if trained.config.data.name != "shapes":
    raise ValueError("--eval=attributes needs a model trained on data.name=shapes.")
  generated, attributes, truths = [], [], []
  for batch in pipeline.eval_batches(trained.config, trained.tokenizer, split, num_examples,
                                     batch_size):
    generated += generated_captions(trained, batch["image"])
    attributes += [r["attributes"] for r in batch["records"]]
    truths += [r["captions"][0] for r in batch["records"]]
  if show:
    evals.say(*(f"  generated: {g:<70} true: {t}" for g, t in list(zip(generated, truths))[:show]))
  exact = [synthetic.score_caption(g, a) for g, a in zip(generated, attributes)]
  return {"eval": "attributes", "split": split, "num_images": len(generated),
          "attribute_accuracy": synthetic.attribute_accuracy(generated, attributes),
          "fully_correct": float(np.mean([c == t for c, t in exact])),
          "distinct_captions": distinct_share(generated), "step": trained.step}
