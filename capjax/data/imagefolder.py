"""Class-labelled images in folders, the layout ImageNet users already have.

Config keys read (`data.*`):
  dir: the dataset folder (required), holding `train/<class>/*`, `test/<class>/*` and optionally
    `val/<class>/*`.
  max_image_pixels: images with more pixels are skipped as "too_large".

Class names are the sorted names of the class folders of every split present, so a label means
the same class in every split even when a split lacks a class. Each record is
`{"image", "captions", "label", "classes", "key"}`: the caption is made from the class name
(`CAPTION_TEMPLATE`, underscores as spaces), so the source also feeds the captioning pipeline;
`label` indexes `classes`. Items are ordered round-robin over the classes (the first file of
every class, then the second, ...; files in name order), so the first N items of a split, which
the evals read, cover the classes evenly. Hidden files (a leading dot) are ignored; any other
file that does not decode is skipped and counted by reason (`images.py`) when it is read.
"""

import os

import ml_collections

from capjax.data import images
from capjax.data import registry

SPLITS = ("train", "val", "test")
CAPTION_TEMPLATE = "a photo of a {}"


def expected_layout(root: str) -> str:
  j = lambda *p: os.path.join(root, *p)
  return (f"expected {j('train', '<class>', '*')} and {j('test', '<class>', '*')} (and "
          f"optionally {j('val', '<class>', '*')}), one folder per class")


def _folders(path: str) -> list[str]:
  return sorted(n for n in os.listdir(path)
                if not n.startswith(".") and os.path.isdir(os.path.join(path, n)))


def class_names(root: str) -> tuple[str, ...]:
  """Sorted class folder names over every split present in `root`."""
  names = set()
  for split in SPLITS:
    if os.path.isdir(os.path.join(root, split)):
      names.update(_folders(os.path.join(root, split)))
  return tuple(sorted(names))


def caption_for(class_name: str) -> str:
  return CAPTION_TEMPLATE.format(class_name.replace("_", " ").strip())


def round_robin(files_per_class: list[list[str]]) -> list[tuple[int, str]]:
  """[(class index, file)]: the first file of every class, then the second, ..."""
  order = []
  for rank in range(max(map(len, files_per_class), default=0)):
    order += [(label, files[rank]) for label, files in enumerate(files_per_class)
              if rank < len(files)]
  return order


def load_items(root: str, split: str) -> tuple[list[tuple[str, str, list[str]]], list[int],
                                               tuple[str, ...]]:
  """(items `(key, path, captions)`, labels, classes) of a split; one-line errors when the
  folder is missing or holds no files."""
  if split not in SPLITS:
    raise ValueError(f"Unknown split {split!r}; expected one of {SPLITS}.")
  if not root or not os.path.isdir(root):
    raise images.DataNotFoundError(
        f"imagefolder: data.dir={root!r} is not a folder (set data.dir); "
        f"{expected_layout(root or '<data.dir>')}.")
  split_dir = os.path.join(root, split)
  if not os.path.isdir(split_dir):
    raise images.DataNotFoundError(
        f"imagefolder: no {split} split at {split_dir}; {expected_layout(root)}.")
  classes = class_names(root)
  files_per_class = []
  for name in classes:
    folder = os.path.join(split_dir, name)
    files = sorted(f for f in os.listdir(folder) if not f.startswith(".")
                   and os.path.isfile(os.path.join(folder, f))) if os.path.isdir(folder) else []
    files_per_class.append(files)
  order = round_robin(files_per_class)
  if not order:
    raise images.DataNotFoundError(
        f"imagefolder: the {split} split at {split_dir} holds no image files; "
        f"{expected_layout(root)}.")
  items = [(f"{classes[label]}/{name}", os.path.join(split_dir, classes[label], name),
            [caption_for(classes[label])]) for label, name in order]
  return items, [label for label, _ in order], classes


class ImageFolderSource(images.ImageFileSource):
  """`ImageFileSource` whose records also carry `label` and `classes`."""

  def __init__(self, items, labels: list[int], classes: tuple[str, ...],
               skips: images.SkipCounter, max_pixels: int = images.DEFAULT_MAX_PIXELS):
    super().__init__(items, skips, max_pixels)
    self.labels, self.classes = labels, classes

  def __getitem__(self, index: int) -> dict | None:
    record = super().__getitem__(index)
    if record is not None:
      record.update(label=self.labels[index], classes=self.classes)
    return record

  def __repr__(self) -> str:
    return (f"ImageFolderSource(len={len(self)}, classes={len(self.classes)}, "
            f"skips={self.skips.as_dict()})")


@registry.register("imagefolder")
def make_source(data_config: ml_collections.ConfigDict, split: str) -> ImageFolderSource:
  items, labels, classes = load_items(data_config.get("dir", ""), split)
  return ImageFolderSource(items, labels, classes, images.SkipCounter(),
                           data_config.get("max_image_pixels", images.DEFAULT_MAX_PIXELS))
