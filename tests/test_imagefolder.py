"""The `imagefolder` source: class folders of real PNG/JPEG files, labels, skips, errors."""

import os

import numpy as np
from PIL import Image
import pytest

from capjax.data import imagefolder, images, registry
from capjax.evals import labels
from tests import helpers


def colour_image(label: int, index: int, size=(20, 28)) -> np.ndarray:
  rng = np.random.default_rng([label, index])
  base = np.asarray([[200, 30, 30], [30, 200, 30], [30, 30, 200]])[label % 3]
  return np.clip(base + rng.integers(-20, 21, (*size, 3)), 0, 255).astype(np.uint8)


def make_folder(root, counts: dict[str, dict[str, int]], corrupt: str | None = None) -> None:
  """`root/<split>/<class>/<i>.png|.jpg`; `corrupt` names one more, truncated, file."""
  for split, per_class in counts.items():
    for label, (name, n) in enumerate(sorted(per_class.items())):
      folder = os.path.join(root, split, name)
      os.makedirs(folder, exist_ok=True)
      for i in range(n):
        ext = "png" if i % 2 == 0 else "jpg"
        Image.fromarray(colour_image(label, i)).save(os.path.join(folder, f"{i:03d}.{ext}"))
  if corrupt:  # a real PNG cut in half
    Image.fromarray(colour_image(0, 99)).save(os.path.join(root, corrupt), format="PNG")
    with open(os.path.join(root, corrupt), "r+b") as f:
      f.truncate(os.path.getsize(os.path.join(root, corrupt)) // 2)


def source(root, split="train"):
  return registry.get_source(helpers.tiny_config(**{"data.dir": str(root),
                                                    "data.name": "imagefolder"}).data, split)


def test_records_carry_labels_class_captions_and_round_robin_order(tmp_path):
  make_folder(tmp_path, {"train": {"tabby_cat": 3, "dog": 2, "zebra": 0},
                         "test": {"dog": 1, "tabby_cat": 1}})
  with open(tmp_path / "train" / "dog" / ".DS_Store", "wb") as f:
    f.write(b"junk")
  src = source(tmp_path)
  assert src.classes == ("dog", "tabby_cat", "zebra") and len(src) == 5
  records = [src[i] for i in range(len(src))]
  assert [r["label"] for r in records] == [0, 1, 0, 1, 1]
  assert [r["key"] for r in records] == ["dog/000.png", "tabby_cat/000.png", "dog/001.jpg",
                                         "tabby_cat/001.jpg", "tabby_cat/002.png"]
  assert records[1]["captions"] == ["a photo of a tabby cat"]
  assert all(r["classes"] == src.classes for r in records)
  np.testing.assert_array_equal(records[0]["image"], colour_image(0, 0))  # PNG: lossless
  assert records[2]["image"].shape == (20, 28, 3)  # JPEG decoded to RGB
  # The test split lacks zebra yet keeps the same label indices.
  test = source(tmp_path, "test")
  assert test.classes == src.classes and [test[i]["label"] for i in range(2)] == [0, 1]


def test_a_corrupt_file_is_skipped_and_counted(tmp_path):
  make_folder(tmp_path, {"train": {"a": 2, "b": 2}}, corrupt="train/b/broken.png")
  src = source(tmp_path)
  assert len(src) == 5
  records = [src[i] for i in range(len(src))]
  assert sum(r is None for r in records) == 1
  assert src.skips.as_dict() == {"corrupt_image": 1}


@pytest.mark.parametrize("counts, split, message", [
    (None, "train", "is not a folder"),
    ({"train": {"a": 1}}, "test", "no test split at .*test; expected .*train/<class>/\\*"),
    ({"train": {"a": 0}}, "train", "the train split at .* holds no image files"),
])
def test_missing_or_empty_folders_are_one_line_errors(tmp_path, counts, split, message):
  root = tmp_path / "data"
  if counts is not None:
    make_folder(root, counts)
  with pytest.raises(images.DataNotFoundError, match=message) as error:
    source(root, split)
  assert "\n" not in str(error.value)


def test_labelled_images_reads_the_class_label_set(tmp_path):
  make_folder(tmp_path, {"train": {"a": 4, "b": 4, "c": 4}}, corrupt="train/c/zz.jpg")
  config = helpers.tiny_config(**{"data.dir": str(tmp_path), "data.name": "imagefolder"})

  class NoTokens:
    def encode(self, caption, max_len):
      return np.zeros(max_len + 1, np.int32)

  sets = labels.labelled_images(config, NoTokens(), "train", 100, batch_size=5)
  assert list(sets) == ["class"] and sets["class"].classes == ("a", "b", "c")
  assert sets["class"].labels.tolist() == [0, 1, 2] * 4  # the corrupt one skipped
  assert sets["class"].images_uint8.shape == (12, 32, 32, 3)  # resized to data.image_size


def test_round_robin_interleaves_uneven_classes():
  assert imagefolder.round_robin([["x1", "x2", "x3"], [], ["z1"]]) == [
      (0, "x1"), (2, "z1"), (0, "x2"), (0, "x3")]
