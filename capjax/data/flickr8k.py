"""Flickr8k from a local folder, in the original or the Kaggle layout.

Nothing is downloaded at run time: the files must already be under `data.dir`.

Config keys read (`data.*`):
  dir: the dataset folder (required).
  max_image_pixels: images with more pixels are skipped as "too_large"
    (default 89_478_485, PIL's own limit).
`data.image_size` is not read here; resizing is the pipeline's job.

Layouts (auto-detected; the original one wins if both are present):
  original: `Flicker8k_Dataset/*.jpg` (sic; `Flickr8k_Dataset/` also works),
    `Flickr8k.token.txt` with lines `<image>#<k>\\t<caption>`, and the split
    lists `Flickr_8k.trainImages.txt`, `Flickr_8k.devImages.txt`,
    `Flickr_8k.testImages.txt` (the text files either in `data.dir` or in
    `data.dir/Flickr8k_text/`). Split "val" is the dev list.
  Kaggle: `Images/*.jpg` and `captions.txt`, a CSV with the header
    `image,caption` and one row per caption.

Kaggle split rule: if the three official split lists above are also in
`data.dir`, they are used. Otherwise, take every distinct image name in
captions.txt (including names whose captions or files turn out to be bad),
sort them, and shuffle them with
`np.random.default_rng(0).permutation(len(names))`. With N names: if
N >= 8000, the first 6000 are train, the next 1000 val and the rest test;
if N < 8000, the first N - 2 * (N // 8) are train, the next N // 8 val and
the last N // 8 test. The full Kaggle set (8091 images) thus gives
6000 / 1000 / 1091 images.

Skips (counted in `source.skips`, see `images.SkipCounter`): at index time, for
the requested split only, "empty_caption" / "non_utf8_caption" per dropped
caption, "no_valid_caption" for an image left without captions (or absent
from the captions file), "missing_file" for an image whose file is not in the
image folder; "malformed_line" for caption-file lines that name no image (these
belong to no split, so every split's counter includes them). At read time,
undecodable images return None and count by reason (see `images.py`).
"""

import csv
import os

import ml_collections
import numpy as np

from capjax.data import images
from capjax.data import registry

ORIGINAL_IMAGE_DIRS = ("Flicker8k_Dataset", "Flickr8k_Dataset")
TOKEN_FILE = "Flickr8k.token.txt"
SPLIT_FILES = {
    "train": "Flickr_8k.trainImages.txt",
    "val": "Flickr_8k.devImages.txt",
    "test": "Flickr_8k.testImages.txt",
}
TEXT_SUBDIR = "Flickr8k_text"
KAGGLE_IMAGE_DIR = "Images"
KAGGLE_CAPTIONS = "captions.txt"
SPLITS = ("train", "val", "test")


def expected_layouts_message(root: str) -> str:
  """The two accepted layouts, with full paths under `root`, on one line."""
  j = lambda *p: os.path.join(root, *p)
  original = ", ".join([j(ORIGINAL_IMAGE_DIRS[0], "*.jpg"), j(TOKEN_FILE)]
                       + [j(f) for f in SPLIT_FILES.values()])
  return (
      f"expected the original layout ({original}; the text files may also be "
      f"in {j(TEXT_SUBDIR)}) or the Kaggle layout ({j(KAGGLE_IMAGE_DIR, '*.jpg')}, "
      f"{j(KAGGLE_CAPTIONS)} as a CSV with header image,caption); put the files "
      "there by hand, nothing is downloaded at run time.")


def _find_text_file(root: str, name: str) -> str | None:
  for folder in (root, os.path.join(root, TEXT_SUBDIR)):
    path = os.path.join(folder, name)
    if os.path.isfile(path):
      return path
  return None


def _find_original_image_dir(root: str) -> str | None:
  for name in ORIGINAL_IMAGE_DIRS:
    if os.path.isdir(os.path.join(root, name)):
      return os.path.join(root, name)
  return None


def detect_layout(root: str) -> str:
  """Returns "original" or "kaggle"; raises `DataNotFoundError` otherwise."""
  if not root or not os.path.isdir(root):
    raise images.DataNotFoundError(
        f"Flickr8k: data.dir={root!r} is not a folder (set --config.data.dir); "
        + expected_layouts_message(root or "<data.dir>"))
  original_missing = [] if _find_original_image_dir(root) else [
      ORIGINAL_IMAGE_DIRS[0] + "/"]
  original_missing += [name for name in (TOKEN_FILE, *SPLIT_FILES.values())
                       if _find_text_file(root, name) is None]
  kaggle_missing = [
      name for name, ok in (
          (KAGGLE_IMAGE_DIR + "/",
           os.path.isdir(os.path.join(root, KAGGLE_IMAGE_DIR))),
          (KAGGLE_CAPTIONS,
           os.path.isfile(os.path.join(root, KAGGLE_CAPTIONS))))
      if not ok]
  if not original_missing:
    return "original"
  if not kaggle_missing:
    return "kaggle"
  raise images.DataNotFoundError(
      f"Flickr8k: incomplete or missing dataset in data.dir={root!r}: the "
      f"original layout lacks {', '.join(original_missing)}; the Kaggle "
      f"layout lacks {', '.join(kaggle_missing)}; "
      + expected_layouts_message(root))


def parse_token_lines(lines, skips: images.SkipCounter) -> dict[str, list[str]]:
  """`<image>#<k>\\t<caption>` lines -> {image: [raw captions]} in file order."""
  captions = {}
  for line in lines:
    line = line.rstrip("\r\n")
    if not line.strip():
      continue
    left, tab, caption = line.partition("\t")
    name = left.split("#", 1)[0].strip()
    if not tab or not name:
      skips.add("malformed_line")
      continue
    captions.setdefault(name, []).append(caption)
  return captions


def parse_caption_csv_lines(lines, skips: images.SkipCounter) -> dict[str, list[str]]:
  """`image,caption` CSV lines (header optional) -> {image: [raw captions]}."""
  captions = {}
  for number, line in enumerate(lines):
    line = line.rstrip("\r\n")
    if number == 0:
      line = line.lstrip("\ufeff")
      if line.replace(" ", "").lower() == "image,caption":
        continue
    if not line.strip():
      continue
    try:
      # One physical line at a time, so one bad line cannot stop the parse.
      row = next(csv.reader([line]))
    except (csv.Error, StopIteration):
      row = []
    name = row[0].strip() if row else ""
    if len(row) < 2 or not name:
      skips.add("malformed_line")
      continue
    # Unquoted commas inside a caption split it into more fields.
    captions.setdefault(name, []).append(",".join(row[1:]))
  return captions


def read_lines(path: str) -> list[str]:
  # surrogateescape keeps undecodable bytes so that each caption is judged alone.
  with open(path, encoding="utf-8", errors="surrogateescape", newline="") as f:
    return f.read().splitlines()


def read_split_list(path: str) -> list[str]:
  """Image names, one a line, blank lines and duplicates dropped."""
  names = [line.strip() for line in read_lines(path)]
  return list(dict.fromkeys(name for name in names if name))


def kaggle_split_names(names, split: str) -> list[str]:
  """The fixed seeded split of the module docstring."""
  names = sorted(set(names))
  order = np.random.default_rng(0).permutation(len(names))
  shuffled = [names[i] for i in order]
  n = len(shuffled)
  if n >= 8000:
    n_train, n_val = 6000, 1000
  else:
    n_val = n // 8
    n_train = n - 2 * n_val
  bounds = {"train": (0, n_train), "val": (n_train, n_train + n_val),
            "test": (n_train + n_val, n)}
  start, stop = bounds[split]
  return shuffled[start:stop]


def build_items(names, raw_captions: dict[str, list[str]], image_dir: str,
                skips: images.SkipCounter) -> list[tuple[str, str, list[str]]]:
  """Items `(name, path, captions)` of the split; counts what is dropped."""
  try:
    present = set(os.listdir(image_dir))
  except OSError:
    present = set()
  items = []
  for name in names:
    captions = images.clean_captions(raw_captions.get(name, ()), skips)
    if not captions:
      skips.add("no_valid_caption")
    elif name not in present:
      skips.add("missing_file")
    else:
      items.append((name, os.path.join(image_dir, name), captions))
  return items


def check_split(split: str) -> None:
  if split not in SPLITS:
    raise ValueError(f"Unknown split {split!r}; expected one of {SPLITS}.")


def load_items(root: str, split: str, skips: images.SkipCounter):
  """Detects the layout and returns the split's items."""
  check_split(split)
  layout = detect_layout(root)
  split_list = _find_text_file(root, SPLIT_FILES[split])
  if layout == "original":
    image_dir = _find_original_image_dir(root)
    raw = parse_token_lines(read_lines(_find_text_file(root, TOKEN_FILE)),
                            skips)
    names = read_split_list(split_list)
  else:
    image_dir = os.path.join(root, KAGGLE_IMAGE_DIR)
    raw = parse_caption_csv_lines(
        read_lines(os.path.join(root, KAGGLE_CAPTIONS)), skips)
    has_official = all(_find_text_file(root, f) for f in SPLIT_FILES.values())
    names = (read_split_list(split_list) if has_official
             else kaggle_split_names(raw, split))
  return build_items(names, raw, image_dir, skips)


@registry.register("flickr8k")
def make_source(data_config: ml_collections.ConfigDict,
                split: str) -> images.ImageFileSource:
  skips = images.SkipCounter()
  root = data_config.get("dir", None)
  items = load_items(root, split, skips)
  if not items:
    raise images.DataNotFoundError(
        f"Flickr8k split {split!r} in {root!r} has no usable images "
        f"(skipped: {skips.as_dict()}).")
  return images.ImageFileSource(
      items, skips,
      data_config.get("max_image_pixels", images.DEFAULT_MAX_PIXELS))
