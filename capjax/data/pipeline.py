"""grain input pipeline: source -> shuffle -> (random caption, clean, resize, tokenize) -> batch.

Each process reads only its own slice of the source (`process_index::process_count`)
and produces its share of the global batch. The iterator's state (`get_state()` /
`set_state()`, or `grain.checkpoint.CheckpointSave/Restore`) is small and is saved
with the checkpoint for an exact resume; restore it into a pipeline built from the
same config, process count and `data.num_workers`. Images stay uint8 on the host;
the train step normalizes them on device.

Config keys read (`data.*`; defaults for keys a preset lacks in brackets):
  name, image_size; num_threads [2], prefetch [8]: grain's read threads and buffer;
  num_workers [0]: grain worker processes (`mp_prefetch`), for decode-heavy data;
  resize ["center_crop"]: "center_crop" | "letterbox" | "random_resized_crop"
    (training only; evaluation then center-crops);
  lowercase [False], strip_punctuation [False]: caption cleaning, applied before
    tokenization and to the tokenizer's training captions alike;
  features [""]: a folder of frozen-tower features (`data/features.py`) that training
    batches read instead of the images (evaluation reads the images).

Skipped items: a source returns None for an item it cannot read and counts the
reason in `source.skips` (`images.SkipCounter`); grain's `to_iter_dataset` drops
the Nones. Items the pipeline itself drops (no caption left after cleaning) go to
the same counter. `train_dataset(...).skips` is that counter, shared with grain
worker processes; `skip_metrics(dataset)` turns it into `data/skipped_<reason>`
metrics. Counts are per process, cumulative since the pipeline was built: index
time skips once, read-time skips at every read (every epoch, and items read
ahead into prefetch buffers).
"""

import dataclasses
import logging

from absl import flags
import grain
import ml_collections
import numpy as np

from capjax import config as config_lib
from capjax.data import features, images, registry, transforms, tokenizer as tokenizer_lib

DataNotFoundError = images.DataNotFoundError  # what train.py reports as a one-line error


@dataclasses.dataclass(frozen=True)
class Preprocess:
  """How a record becomes a training example (everything but the tokenizer)."""
  image_size: int
  max_len: int
  resize: str = "center_crop"
  lowercase: bool = False
  strip_punctuation: bool = False

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> "Preprocess":
    data = config.data
    resize = data.get("resize", "center_crop")
    if resize not in transforms.RESIZE_MODES:
      raise config_lib.ConfigError(
          f"data.resize={resize!r}; expected one of {transforms.RESIZE_MODES}.")
    return cls(data.image_size, config.model.max_len, resize,
               bool(data.get("lowercase", False)), bool(data.get("strip_punctuation", False)))

  def clean(self, captions) -> list[str]:
    """Cleaned captions; those left empty are dropped."""
    cleaned = (transforms.clean_caption(c, self.lowercase, self.strip_punctuation)
               for c in captions)
    return [c for c in cleaned if c]


def make_example(record: dict, tok: tokenizer_lib.Tokenizer, preprocess: Preprocess,
                 rng: np.random.Generator | None, skips: images.SkipCounter | None = None):
  """{"image": uint8[S, S, 3], "tokens": int32[max_len + 1]} or None (counted in `skips`);
  a record of stored features (`data/features.py`) gives "features" instead of "image".

  With `rng` (training): a random caption and, if configured, a random crop.
  Without (evaluation): the first caption and a deterministic resize.
  """
  captions = preprocess.clean(record["captions"])
  if not captions:
    if skips is not None:
      skips.add("no_caption_after_cleaning")
    return None
  caption = captions[0] if rng is None else transforms.choose_caption(captions, rng)
  tokens = tok.encode(caption, preprocess.max_len)
  if "features" in record:  # the same caption as from the image: the rng is drawn alike
    return {"features": record["features"], "tokens": tokens}
  image = transforms.to_square(record["image"], preprocess.image_size, preprocess.resize, rng)
  return {"image": image, "tokens": tokens}


@dataclasses.dataclass
class ToTrainExample(grain.transforms.RandomMap):
  """grain's per-example seeded `make_example`; pickles for worker processes."""
  tokenizer_path: str
  preprocess: Preprocess
  skips: images.SkipCounter
  _tokenizer: tokenizer_lib.Tokenizer | None = None

  def random_map(self, record, rng: np.random.Generator):
    if record is None:
      return None
    if self._tokenizer is None:  # loaded lazily so the transform pickles without it
      self._tokenizer = tokenizer_lib.Tokenizer(self.tokenizer_path)
    return make_example(record, self._tokenizer, self.preprocess, rng, self.skips)

  def __getstate__(self):
    return {**self.__dict__, "_tokenizer": None}


def per_process_batch_size(global_batch_size: int, process_count: int) -> int:
  if global_batch_size % process_count:
    raise config_lib.ConfigError(
        f"train.batch_size={global_batch_size} is not divisible by {process_count} processes.")
  return global_batch_size // process_count


def skips_of(source) -> images.SkipCounter:
  """The source's skip counter (index-time skips logged once), or a new one."""
  skips = getattr(source, "skips", None)
  if skips is None:
    return images.SkipCounter()
  counts = skips.as_dict()
  if counts:
    logging.warning("data: %d items or captions skipped while indexing the %s data: %s",
                    sum(counts.values()), type(source).__name__, counts)
  return skips


def _allow_worker_processes():
  # grain's worker processes read absl flags; a program without absl (train.py
  # uses argparse) has not parsed them.
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def train_dataset(config: ml_collections.ConfigDict, tokenizer_path: str,
                  process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
  """Endless shuffled batches of this process's slice; `.skips` counts what was dropped."""
  preprocess = Preprocess.from_config(config)
  batch_size = per_process_batch_size(config.train.batch_size, process_count)
  source = (features.FeatureSource(config.data.features, "train") if config.data.get("features")
            else registry.get_source(config.data, "train"))
  skips = skips_of(source)
  ds = grain.MapDataset.source(source)[process_index::process_count]
  ds = ds.seed(config.seed).shuffle().repeat()
  ds = ds.random_map(ToTrainExample(tokenizer_path, preprocess, skips))
  ds = ds.to_iter_dataset(grain.ReadOptions(
      num_threads=config.data.get("num_threads", 2),
      prefetch_buffer_size=config.data.get("prefetch", 8)))
  ds = ds.batch(batch_size, drop_remainder=True)
  num_workers = config.data.get("num_workers", 0)
  if num_workers:
    _allow_worker_processes()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  ds.skips = skips
  return ds


def skip_metrics(dataset) -> dict[str, int]:
  """{"data/skipped": total, "data/skipped_<reason>": count} of a `train_dataset`."""
  counts = dataset.skips.as_dict()
  return {"data/skipped": sum(counts.values()),
          **{f"data/skipped_{reason}": n for reason, n in counts.items()}}


def eval_batches(config: ml_collections.ConfigDict, tokenizer: tokenizer_lib.Tokenizer,
                 split: str, num_examples: int, batch_size: int):
  """Deterministic batches of the first `num_examples` of a split, first caption each.

  Yields dicts with "image", "tokens", and "records" (the raw records, for scoring).
  Skipped items are logged (a warning with the counts by reason).
  """
  preprocess = Preprocess.from_config(config)
  source = registry.get_source(config.data, split)
  skips = getattr(source, "skips", None) or images.SkipCounter()
  pairs = []
  for i in range(min(num_examples, len(source))):
    record = source[i]
    example = None if record is None else make_example(record, tokenizer, preprocess, None, skips)
    if example is not None:
      pairs.append((record, example))
  counts = skips.as_dict()
  if counts:
    logging.warning("data: evaluating on %d items of the %s split; skipped: %s", len(pairs),
                    split, counts)
  for start in range(0, len(pairs), batch_size):
    chunk = pairs[start:start + batch_size]
    yield {"image": np.stack([e["image"] for _, e in chunk]),
           "tokens": np.stack([e["tokens"] for _, e in chunk]),
           "records": [r for r, _ in chunk]}


def training_captions(config: ml_collections.ConfigDict, max_images: int = 5_000):
  """Cleaned captions of (up to) the first `max_images` training images, for the tokenizer."""
  preprocess = Preprocess.from_config(config)
  source = registry.get_source(config.data, "train")
  n = min(max_images, len(source))
  logging.info("collecting captions of %d training images for the tokenizer", n)
  read_captions = getattr(source, "captions", None)  # no image decoding, where offered
  for i in range(n):
    if read_captions is not None:
      yield from preprocess.clean(read_captions(i))
    else:
      record = source[i]
      if record is not None:
        yield from preprocess.clean(record["captions"])
