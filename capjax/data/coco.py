"""COCO captions with the Karpathy split, from a local folder.

Nothing is downloaded at run time: the files must already be under `data.dir`.

Config keys read (`data.*`):
  dir: folder with `dataset_coco.json` (Karpathy's file) and the image folders
    it names, usually `train2014/` and `val2014/` (required).
  karpathy_json: path of the split file (default `<dir>/dataset_coco.json`).
  restval_to_train: put Karpathy's "restval" images into train (default True,
    as in most captioning papers: 113,287 train images).
  max_image_pixels: images with more pixels are skipped as "too_large"
    (default 89_478_485, PIL's own limit).

The split file is `{"images": [{"filepath", "filename", "split", "sentences":
[{"raw", "tokens"}], "cocoid"}]}`; split is one of train | restval | val |
test. The image is read from `<dir>/<filepath>/<filename>`; the captions are
the "raw" sentences (or the joined "tokens" when "raw" is absent). Skips are
counted as in `flickr8k.py`: bad captions and missing files at index time, for
the requested split only; undecodable images at read time.
"""

import json
import os

import ml_collections

from capjax.data import images
from capjax.data import registry

KARPATHY_FILE = "dataset_coco.json"
IMAGE_DIRS = ("train2014", "val2014")
SPLITS = ("train", "val", "test")


def expected_layout_message(root: str) -> str:
  j = lambda *p: os.path.join(root, *p)
  return (
      f"Expected {j(KARPATHY_FILE)} (Karpathy's split file) and the image "
      f"folders {j(IMAGE_DIRS[0], '*.jpg')}, {j(IMAGE_DIRS[1], '*.jpg')}. Put "
      "them there by hand (nothing is downloaded at run time).")


def karpathy_splits(split: str, restval_to_train: bool) -> set[str]:
  """The Karpathy split names that make up one of our splits."""
  if split not in SPLITS:
    raise ValueError(f"Unknown split {split!r}; expected one of {SPLITS}.")
  if split == "train" and restval_to_train:
    return {"train", "restval"}
  return {split}


def _raw_sentences(entry: dict) -> list:
  raw = []
  for sentence in entry.get("sentences") or ():
    if not isinstance(sentence, dict):
      raw.append("")  # Counted as an empty caption.
    elif isinstance(sentence.get("raw"), str):
      raw.append(sentence["raw"])
    else:
      raw.append(" ".join(str(t) for t in sentence.get("tokens") or ()))
  return raw


def build_items(entries: list, root: str, wanted: set[str],
                skips: images.SkipCounter) -> list[tuple[str, str, list[str]]]:
  """Items `(filepath/filename, path, captions)` of the wanted Karpathy splits."""
  listings = {}
  items = []
  for entry in entries:
    if not isinstance(entry, dict) or entry.get("split") not in wanted:
      continue
    folder = str(entry.get("filepath", ""))
    name = str(entry.get("filename", ""))
    captions = images.clean_captions(_raw_sentences(entry), skips)
    if not captions:
      skips.add("no_valid_caption")
      continue
    if folder not in listings:
      try:
        listings[folder] = set(os.listdir(os.path.join(root, folder)))
      except OSError:
        listings[folder] = set()
    if not name or name not in listings[folder]:
      skips.add("missing_file")
      continue
    items.append((f"{folder}/{name}", os.path.join(root, folder, name),
                  captions))
  return items


def load_entries(json_path: str, root: str) -> list:
  if not root or not os.path.isdir(root) or not os.path.isfile(json_path):
    raise images.DataNotFoundError(
        f"COCO (Karpathy split): {json_path!r} not found (data.dir={root!r}). "
        + expected_layout_message(root or "<data.dir>"))
  with open(json_path, encoding="utf-8") as f:
    try:
      data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise ValueError(f"COCO: {json_path} is not valid JSON ({e}).") from e
  if not isinstance(data, dict) or not isinstance(data.get("images"), list):
    raise ValueError(f"COCO: {json_path} has no 'images' list; "
                     "expected Karpathy's dataset_coco.json.")
  return data["images"]


@registry.register("coco")
def make_source(data_config: ml_collections.ConfigDict,
                split: str) -> images.ImageFileSource:
  root = data_config.get("dir", None) or ""
  wanted = karpathy_splits(split, data_config.get("restval_to_train", True))
  json_path = data_config.get("karpathy_json", None) or os.path.join(
      root, KARPATHY_FILE)
  skips = images.SkipCounter()
  items = build_items(load_entries(json_path, root), root, wanted, skips)
  if not items:
    raise images.DataNotFoundError(
        f"COCO split {split!r} in {root!r} has no usable images "
        f"(skipped: {skips.as_dict()}). " + expected_layout_message(root))
  return images.ImageFileSource(
      items, skips,
      data_config.get("max_image_pixels", images.DEFAULT_MAX_PIXELS))
