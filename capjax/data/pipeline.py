"""grain input pipeline: source -> shuffle -> (random caption, resize, tokenize) -> batch.

Each process reads only its own slice of the source (`process_index::process_count`)
and produces its share of the global batch. The iterator's state (`get_state()` /
`set_state()`) is small and is saved with the checkpoint for an exact resume.
Images stay uint8 on the host; the train step normalizes them on device.
"""

import dataclasses
import logging

import grain
import ml_collections
import numpy as np
from PIL import Image

from capjax.data import registry, tokenizer as tokenizer_lib


def resize_image(image_HxWx3: np.ndarray, size: int) -> np.ndarray:
  """Shorter side to `size`, then center crop to size x size."""
  h, w = image_HxWx3.shape[:2]
  if (h, w) == (size, size):
    return image_HxWx3
  scale = size / min(h, w)
  nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
  resized = np.asarray(Image.fromarray(image_HxWx3).resize((nw, nh), Image.BICUBIC))
  top, left = (nh - size) // 2, (nw - size) // 2
  return resized[top:top + size, left:left + size]


@dataclasses.dataclass
class ToTrainExample(grain.transforms.RandomMap):
  """Random 1-of-N caption, resized uint8 image, caption token ids."""
  tokenizer_path: str
  image_size: int
  max_len: int
  _tokenizer: tokenizer_lib.Tokenizer | None = None

  def random_map(self, record, rng: np.random.Generator):
    if record is None:
      return None
    if self._tokenizer is None:  # loaded lazily so the transform pickles for workers
      self._tokenizer = tokenizer_lib.Tokenizer(self.tokenizer_path)
    caption = record["captions"][rng.integers(len(record["captions"]))]
    return {"image": resize_image(record["image"], self.image_size),
            "tokens": self._tokenizer.encode(caption, self.max_len)}


def per_process_batch_size(global_batch_size: int, process_count: int) -> int:
  if global_batch_size % process_count:
    raise ValueError(
        f"train.batch_size={global_batch_size} is not divisible by {process_count} processes.")
  return global_batch_size // process_count


def train_dataset(config: ml_collections.ConfigDict, tokenizer_path: str,
                  process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
  source = registry.get_source(config.data, "train")
  ds = grain.MapDataset.source(source)[process_index::process_count]
  ds = ds.seed(config.seed).shuffle().repeat()
  ds = ds.random_map(ToTrainExample(tokenizer_path, config.data.image_size, config.model.max_len))
  ds = ds.to_iter_dataset(grain.ReadOptions(
      num_threads=config.data.get("num_threads", 2),
      prefetch_buffer_size=config.data.get("prefetch", 8)))
  ds = ds.batch(per_process_batch_size(config.train.batch_size, process_count),
                drop_remainder=True)
  num_workers = config.data.get("num_workers", 0)
  if num_workers:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  return ds


def eval_batches(config: ml_collections.ConfigDict, tokenizer: tokenizer_lib.Tokenizer,
                 split: str, num_examples: int, batch_size: int):
  """Deterministic batches of the first `num_examples` of a split, first caption each.

  Yields dicts with "image", "tokens", and "records" (the raw records, for scoring).
  """
  source = registry.get_source(config.data, split)
  records = [r for r in (source[i] for i in range(min(num_examples, len(source))))
             if r is not None]
  for start in range(0, len(records), batch_size):
    chunk = records[start:start + batch_size]
    yield {
        "image": np.stack([resize_image(r["image"], config.data.image_size) for r in chunk]),
        "tokens": np.stack([tokenizer.encode(r["captions"][0], config.model.max_len)
                            for r in chunk]),
        "records": chunk,
    }


def training_captions(config: ml_collections.ConfigDict, max_images: int = 5_000):
  """Captions of (up to) the first `max_images` training images, for tokenizer training."""
  source = registry.get_source(config.data, "train")
  n = min(max_images, len(source))
  logging.info("collecting captions of %d training images for the tokenizer", n)
  for i in range(n):
    record = source[i]
    if record is not None:
      yield from record["captions"]
