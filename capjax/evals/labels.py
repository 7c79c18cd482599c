"""Labelled images for the classification evals (zero-shot, linear probe, SigLiT).

`labelled_images` gives uint8 images and, per label set, an int label per image and the class
names. From `shapes`: `shape`, `colour` and `size` of the single-object scenes (a scene with two
objects has no one shape) and `count` of every scene. Sources whose records carry a `label` and
their `classes` (an image folder) give one label set, `class`.
"""

import dataclasses

import ml_collections
import numpy as np

from capjax.data import pipeline, synthetic

SHAPES_LABELS = {"shape": synthetic.SHAPES, "colour": tuple(synthetic.COLOURS),
                 "size": tuple(synthetic.SIZES)}
COUNT_CLASSES = tuple(synthetic.COUNT_WORDS.values())


@dataclasses.dataclass
class LabelSet:
  classes: tuple[str, ...]
  images_uint8: np.ndarray  # NxHxWx3
  labels: np.ndarray  # int32[N], indices into classes


def _shapes_labels(attributes: dict) -> dict[str, int]:
  labels = {"count": attributes["count"] - 1}
  if attributes["count"] == 1:
    obj = attributes["objects"][0]
    labels.update({name: classes.index(obj[name]) for name, classes in SHAPES_LABELS.items()})
  return labels


def label_classes(config: ml_collections.ConfigDict, records) -> dict[str, tuple[str, ...]]:
  if config.data.name == "shapes":
    return {**SHAPES_LABELS, "count": COUNT_CLASSES}
  if records and "label" in records[0]:
    return {"class": tuple(records[0]["classes"])}
  raise ValueError(f"data.name={config.data.name!r} has no class labels; use data.name=shapes "
                   "or data.name=imagefolder.")


def labelled_images(config: ml_collections.ConfigDict, tokenizer, split: str, num_examples: int,
                    batch_size: int = 256) -> dict[str, LabelSet]:
  """The first `num_examples` images of a split, grouped by label set (unreadable ones skipped)."""
  images, labels, records = [], [], []
  for batch in pipeline.eval_batches(config, tokenizer, split, num_examples, batch_size):
    images.append(batch["image"])
    records += batch["records"]
    labels += [_shapes_labels(r["attributes"]) if config.data.name == "shapes"
               else {"class": r["label"]} for r in batch["records"]]
  if not records:
    raise ValueError(f"No readable images in the {split} split of data.name={config.data.name}.")
  images_Nx = np.concatenate(images)
  sets = {}
  for name, classes in label_classes(config, records).items():
    rows = [i for i, row in enumerate(labels) if name in row]
    sets[name] = LabelSet(classes, images_Nx[rows],
                          np.asarray([labels[i][name] for i in rows], np.int32))
  return sets
