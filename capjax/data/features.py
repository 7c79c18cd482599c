"""Frozen-tower features stored once, read by training instead of the images (seed 002's
practice: ClipCap extracts the CLIP embeddings of the dataset before training the mapper).

`tools/precompute_features.py` runs a task's frozen tower (`predict_fns()["encode_images"]`) over
a split, images preprocessed as for evaluation (`data.resize`'s deterministic crop), and writes
  DIR/features.json                              {"format", "shape", "dtype", "tower", "splits"}
  DIR/<split>.array_record-00000-of-0000N ...   one record per source index, in order
A record is a msgpack map {"features": raw bytes, "captions": [str, ...]} (the source's raw
captions: the pipeline cleans and picks one as it does for images), or {"skipped": reason} for
an item the source could not read, so indices match the image source's and a shuffled epoch
visits the same examples in the same order. Shard k holds a contiguous range of indices.

`data.features=DIR` makes `pipeline.train_dataset` read `FeatureSource` (records
{"features", "captions"}) and the task's batches carry "features" instead of "image". `tower`
describes what computed them (`tower_description`); a run whose tower differs is refused.
"""

import json
import os

import msgpack
import numpy as np

from capjax import config as config_lib
from capjax.data import images, shards

FORMAT = "capjax-features-v1"
INFO = "features.json"


def tower_description(config) -> dict:
  """What decides a run's frozen-tower features: the tower's config, its source (a model
  directory, or the random init of `seed`), the input size and crop, the compute dtype."""
  init = config.init.vision
  return {"task": config.task, "vision": json.loads(config.model.vision.to_json()),
          "init.vision": init, "seed": None if init else config.seed, "dtype": config.dtype,
          "image_size": config.data.image_size, "resize": config.data.resize,
          "matmul_policy": config.model.matmul_policy}


def read_info(directory: str) -> dict:
  path = os.path.join(directory, INFO)
  if not os.path.exists(path):
    raise images.DataNotFoundError(
        f"data.features={directory!r} has no {INFO}; write the features with "
        "tools/precompute_features.py.")
  info = json.loads(open(path, encoding="utf-8").read())
  if info.get("format") != FORMAT:
    raise images.DataNotFoundError(f"{path} holds format {info.get('format')!r}; expected "
                                   f"{FORMAT!r}.")
  return info


def check_fits(directory: str, config, shape: tuple[int, ...]):
  """A one-line `ConfigError` when the stored features are not this run's tower's."""
  info = read_info(directory)
  if tuple(info["shape"]) != tuple(shape):
    raise config_lib.ConfigError(f"data.features={directory} holds features of shape "
                                 f"{tuple(info['shape'])}; this run's tower gives {shape}.")
  stored, wanted = info["tower"], json.loads(json.dumps(tower_description(config)))
  for key in sorted(set(stored) | set(wanted)):
    if stored.get(key) != wanted.get(key):
      raise config_lib.ConfigError(
          f"data.features={directory} was computed with {key}={stored.get(key)!r}; this run "
          f"has {wanted.get(key)!r}: run tools/precompute_features.py for this config.")


def write_split(directory: str, split: str, examples, count: int, shape: tuple[int, ...],
                tower: dict, num_shards: int = 1) -> int:
  """Writes `count` records (`examples` yields (features float32 array, captions) or
  (None, reason)) of `split`; adds the split to DIR/features.json. Returns the count."""
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  if shards.find_shards(directory, split):
    raise FileExistsError(f"{directory} already has {split!r} features; remove them or choose "
                          "another --output.")
  os.makedirs(directory, exist_ok=True)
  info_path = os.path.join(directory, INFO)
  info = {"format": FORMAT, "shape": list(shape), "dtype": "float32", "tower": tower,
          "splits": {}}
  if os.path.exists(info_path):
    info = read_info(directory)
    if info["tower"] != json.loads(json.dumps(tower)) or tuple(info["shape"]) != tuple(shape):
      raise FileExistsError(f"{info_path} describes another tower's features; choose another "
                            "--output.")
  num_shards = max(1, min(num_shards, count))
  final = shards.shard_paths(directory, split, num_shards)
  temporary = [os.path.join(directory, "." + os.path.basename(p) + ".tmp") for p in final]
  bounds = [count * k // num_shards for k in range(num_shards + 1)]
  writers = [array_record_module.ArrayRecordWriter(p, "group_size:1") for p in temporary]
  written = 0
  try:
    for written, (features, captions) in enumerate(examples, start=1):
      if features is None:
        record = {"skipped": captions}
      else:
        array = np.ascontiguousarray(features, np.float32)
        assert array.shape == tuple(shape), (array.shape, shape)
        record = {"features": array.tobytes(), "captions": list(captions)}
      shard = next(k for k in range(num_shards) if written - 1 < bounds[k + 1])
      writers[shard].write(msgpack.packb(record, use_bin_type=True))
  finally:
    for writer in writers:
      writer.close()
  if written != count:
    raise ValueError(f"wrote {written} features of {split!r}; expected {count}.")
  for src, dst in zip(temporary, final):
    os.replace(src, dst)
  info["splits"][split] = count
  with open(info_path + ".tmp", "w", encoding="utf-8") as f:
    json.dump(info, f, indent=2)
  os.replace(info_path + ".tmp", info_path)
  return count


class FeatureSource:
  """Random-access {"features": float32 array, "captions": [str]} records; None (counted in
  `skips`) where the image source could not read the item."""

  def __init__(self, directory: str, split: str):
    from grain import python as grain  # pylint: disable=g-import-not-at-top
    info = read_info(directory)
    paths = shards.find_shards(directory, split)
    if not paths or split not in info["splits"]:
      raise images.DataNotFoundError(
          f"data.features={directory!r} has no {split!r} features (it has "
          f"{sorted(info['splits'])}); write them with tools/precompute_features.py "
          f"--split={split}.")
    self._records = grain.ArrayRecordDataSource(paths)
    self.shape = tuple(info["shape"])
    self.skips = images.SkipCounter()

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, index: int) -> dict | None:
    record = msgpack.unpackb(self._records[index], raw=False)
    if "skipped" in record:
      self.skips.add(record["skipped"])
      return None
    features = np.frombuffer(record["features"], np.float32).reshape(self.shape)
    return {"features": features, "captions": record["captions"]}
