"""Real on-disk layouts (Flickr8k original and Kaggle, COCO Karpathy, shards).

Every dataset is built here, tiny, with PIL; nothing is downloaded.
"""

import csv
import glob
import importlib.util
import io
import json
import os
import pickle
import subprocess
import sys
import tarfile

import ml_collections
import numpy as np
from PIL import Image
import pytest

from capjax.data import flickr8k
from capjax.data import images
from capjax.data import registry
from capjax.data import shards
from capjax.data import transforms

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pixels(index: int, size=(6, 8)) -> np.ndarray:
  """A distinct small RGB image per index."""
  rng = np.random.default_rng(index)
  return rng.integers(0, 256, size + (3,), dtype=np.uint8)


def smooth(index: int, size=(32, 40)) -> np.ndarray:
  """A distinct smooth image per index (JPEG keeps it close)."""
  y, x = np.mgrid[:size[0], :size[1]]
  channels = [x * 3 + index * 5, y * 4 + index * 3, np.full(size, index * 9)]
  return np.stack(channels, axis=-1).astype(np.uint8)


def write_png(path: str, index: int) -> None:
  # PNG content even under a .jpg name: PIL goes by content, and we can
  # compare pixels exactly.
  Image.fromarray(pixels(index)).save(path, format="PNG")


def data_config(**kwargs) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(image_size=32, **kwargs))


def read_all(source) -> list[dict]:
  records = [source[i] for i in range(len(source))]
  assert all(r is not None for r in records)
  return records


def captions_for(name: str) -> list[str]:
  return [f"a photo of {name} number {k}" for k in range(3)]


# ----------------------------------------------------------- Flickr8k ----


def make_flickr_original(root, names, splits, text_subdir=False):
  image_dir = root / "Flicker8k_Dataset"
  image_dir.mkdir(parents=True)
  text_dir = root / "Flickr8k_text" if text_subdir else root
  text_dir.mkdir(exist_ok=True)
  for index, name in enumerate(names):
    write_png(image_dir / name, index)
  lines = [f"{name}#{k}\t{c}" for name in names
           for k, c in enumerate(captions_for(name))]
  (text_dir / "Flickr8k.token.txt").write_text("\n".join(lines) + "\n")
  for split, file_name in flickr8k.SPLIT_FILES.items():
    (text_dir / file_name).write_text("\n".join(splits[split]) + "\n")


@pytest.mark.parametrize("text_subdir", [False, True])
def test_flickr8k_original_layout(tmp_path, text_subdir):
  names = [f"{1000 + i}_abc.jpg" for i in range(7)]
  splits = {"train": names[:4], "val": names[4:5], "test": names[5:7]}
  make_flickr_original(tmp_path, names, splits, text_subdir)
  config = data_config(name="flickr8k", dir=str(tmp_path))
  assert flickr8k.detect_layout(str(tmp_path)) == "original"
  for split, expected in splits.items():
    source = registry.get_source(config, split)
    records = read_all(source)
    assert [r["key"] for r in records] == expected
    for record in records:
      index = names.index(record["key"])
      np.testing.assert_array_equal(record["image"], pixels(index))
      assert record["captions"] == captions_for(record["key"])
    assert source.skips.as_dict() == {}


def make_flickr_kaggle(root, names, jpeg=False):
  (root / "Images").mkdir(parents=True)
  for index, name in enumerate(names):
    if jpeg:
      Image.fromarray(smooth(index)).save(
          root / "Images" / name, format="JPEG", quality=95)
    else:
      write_png(root / "Images" / name, index)
  with open(root / "captions.txt", "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["image", "caption"])
    for name in names:
      for caption in captions_for(name):
        writer.writerow([name, caption + ", with a comma"])


def test_flickr8k_kaggle_layout_seeded_split(tmp_path):
  names = [f"img_{i:02d}.jpg" for i in range(24)]
  make_flickr_kaggle(tmp_path, names, jpeg=True)
  config = data_config(name="flickr8k", dir=str(tmp_path))
  assert flickr8k.detect_layout(str(tmp_path)) == "kaggle"
  # The rule as the module docstring states it.
  shuffled = [sorted(names)[i] for i in np.random.default_rng(0).permutation(24)]
  expected = {"train": shuffled[:18], "val": shuffled[18:21],
              "test": shuffled[21:]}
  for split in ("train", "val", "test"):
    records = read_all(registry.get_source(config, split))
    assert [r["key"] for r in records] == expected[split]
    for record in records:
      original = smooth(names.index(record["key"]))
      assert record["image"].shape == (32, 40, 3)
      assert record["image"].dtype == np.uint8
      error = np.abs(record["image"].astype(int) - original).mean()
      assert error < 3
      assert record["captions"] == [
          c + ", with a comma" for c in captions_for(record["key"])]


def test_kaggle_split_rule_full_size():
  names = [f"{i:05d}.jpg" for i in range(8091)]
  sizes = [len(flickr8k.kaggle_split_names(names, s))
           for s in ("train", "val", "test")]
  assert sizes == [6000, 1000, 1091]
  parts = [set(flickr8k.kaggle_split_names(names, s))
           for s in ("train", "val", "test")]
  assert set.union(*parts) == set(names)


def test_flickr8k_kaggle_uses_official_split_files_when_present(tmp_path):
  names = [f"img_{i}.jpg" for i in range(5)]
  make_flickr_kaggle(tmp_path, names)
  (tmp_path / "Flickr_8k.trainImages.txt").write_text("img_3.jpg\nimg_0.jpg\n")
  (tmp_path / "Flickr_8k.devImages.txt").write_text("img_1.jpg\n")
  (tmp_path / "Flickr_8k.testImages.txt").write_text("img_2.jpg\nimg_4.jpg\n")
  source = registry.get_source(
      data_config(name="flickr8k", dir=str(tmp_path)), "train")
  records = read_all(source)
  assert [r["key"] for r in records] == ["img_3.jpg", "img_0.jpg"]
  np.testing.assert_array_equal(records[0]["image"], pixels(3))


@pytest.mark.parametrize("setup", ["missing", "empty", "images_only"])
def test_flickr8k_missing_data_is_one_clear_error(tmp_path, setup):
  root = tmp_path / "flickr"
  if setup != "missing":
    root.mkdir()
  if setup == "images_only":
    (root / "Images").mkdir()
  with pytest.raises(images.DataNotFoundError) as info:
    registry.get_source(data_config(name="flickr8k", dir=str(root)), "train")
  message = str(info.value)
  for expected in ("Flicker8k_Dataset", "Flickr8k.token.txt",
                   "Flickr_8k.trainImages.txt", "Flickr_8k.devImages.txt",
                   "Flickr_8k.testImages.txt", "Images", "captions.txt",
                   "nothing is downloaded", str(root)):
    assert expected in message
  if setup == "images_only":
    assert "Kaggle layout lacks captions.txt" in message
  assert isinstance(info.value, FileNotFoundError)


# --------------------------------------------------------------- COCO ----


def make_coco(root):
  entries = []
  layout = [("train2014", "train"), ("val2014", "restval"), ("val2014", "val"),
            ("val2014", "test"), ("train2014", "train"), ("val2014", "test")]
  for index, (folder, split) in enumerate(layout):
    (root / folder).mkdir(exist_ok=True)
    name = f"COCO_{folder}_{index:012d}.jpg"
    write_png(root / folder / name, index)
    sentences = [{"raw": f"coco {index} caption {k}",
                  "tokens": ["ignored"]} for k in range(2)]
    if index == 4:  # Only tokens: joined.
      sentences = [{"tokens": ["a", "tokenized", "caption"]}]
    entries.append({"filepath": folder, "filename": name, "split": split,
                    "cocoid": index, "sentences": sentences})
  (root / "dataset_coco.json").write_text(
      json.dumps({"images": entries, "dataset": "coco"}))
  return entries


def test_coco_karpathy_splits(tmp_path):
  entries = make_coco(tmp_path)
  config = data_config(name="coco", dir=str(tmp_path))
  expected = {"train": [0, 1, 4], "val": [2], "test": [3, 5]}
  for split, indices in expected.items():
    records = read_all(registry.get_source(config, split))
    assert [r["key"] for r in records] == [
        f"{entries[i]['filepath']}/{entries[i]['filename']}" for i in indices]
    for record, index in zip(records, indices):
      np.testing.assert_array_equal(record["image"], pixels(index))
    if split == "val":
      assert records[0]["captions"] == ["coco 2 caption 0", "coco 2 caption 1"]
    if split == "train":
      assert records[2]["captions"] == ["a tokenized caption"]
  config.restval_to_train = False
  records = read_all(registry.get_source(config, "train"))
  assert [r["captions"][0] for r in records][:1] == ["coco 0 caption 0"]
  assert len(records) == 2


def test_coco_missing_is_clear_error(tmp_path):
  with pytest.raises(images.DataNotFoundError) as info:
    registry.get_source(data_config(name="coco", dir=str(tmp_path)), "train")
  for expected in ("dataset_coco.json", "train2014", "val2014",
                   "nothing is downloaded"):
    assert expected in str(info.value)


# ------------------------------------------------------------- shards ----


def load_make_shards_tool():
  spec = importlib.util.spec_from_file_location(
      "make_shards", os.path.join(REPO, "tools", "make_shards.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def make_pair_inputs(root) -> dict[str, tuple[int, list[str]]]:
  """CSV + JSONL + webdataset tar inputs; returns key -> (pixel index, captions)."""
  root.mkdir()
  expected = {}
  with open(root / "pairs.csv", "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["image", "caption"])
    for i in range(4):
      write_png(root / f"c{i}.png", i)
      for caption in (f"csv {i} a", f"csv {i} b"):
        writer.writerow([f"c{i}.png", caption])
      expected[f"c{i}.png"] = (i, [f"csv {i} a", f"csv {i} b"])
  with open(root / "pairs.jsonl", "w") as f:
    for i in range(4, 7):
      write_png(root / f"j{i}.png", i)
      f.write(json.dumps({"image": f"j{i}.png", "caption": f"json {i}"}) + "\n")
      expected[f"j{i}.png"] = (i, [f"json {i}"])
  with tarfile.open(root / "part-000.tar", "w") as tar:
    for i in range(7, 10):
      buffer = io.BytesIO()
      Image.fromarray(pixels(i)).save(buffer, format="PNG")
      for suffix, payload in (("png", buffer.getvalue()),
                              ("txt", f"tar {i}".encode())):
        info = tarfile.TarInfo(f"{i:03d}.{suffix}")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
      expected[f"{i:03d}"] = (i, [f"tar {i}"])
  return expected


def check_records(records, expected):
  assert sorted(r["key"] for r in records) == sorted(expected)
  for record in records:
    index, captions = expected[record["key"]]
    np.testing.assert_array_equal(record["image"], pixels(index))
    assert record["captions"] == captions


def test_array_record_shards_both_read_paths(tmp_path, capsys):
  expected = make_pair_inputs(tmp_path / "in")
  out = tmp_path / "shards"
  load_make_shards_tool().main(
      [f"--input={tmp_path / 'in'}", f"--output={out}", "--num_shards=3"])
  assert "wrote 10 examples" in capsys.readouterr().out
  with pytest.raises(FileExistsError):  # Never mixes old and new shards.
    shards.write_array_record(iter([]), str(out), 2)
  paths = shards.find_shards(str(out), "train")
  assert [os.path.basename(p) for p in paths] == [
      f"train.array_record-0000{i}-of-00003" for i in range(3)]
  # (a) directly: grain's ArrayRecordDataSource over the files.
  from grain import python as grain  # pylint: disable=g-import-not-at-top
  raw = grain.ArrayRecordDataSource(paths)
  assert len(raw) == 10
  direct = [shards.decode_record(raw[i]) for i in range(len(raw))]
  check_records([{"key": r["key"], "captions": r["captions"],
                  "image": images.decode_image(r["image"]).image}
                 for r in direct], expected)
  # Through the registered source.
  config = data_config(name="shards", dir=str(out))
  check_records(read_all(registry.get_source(config, "train")), expected)
  with pytest.raises(images.DataNotFoundError, match="splits found: \\['train'\\]"):
    registry.get_source(config, "val")


def test_tfds_shards_both_read_paths(tmp_path, capsys):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  expected = make_pair_inputs(tmp_path / "in")
  out = tmp_path / "tfds"
  load_make_shards_tool().main(
      [f"--input={tmp_path / 'in'}", f"--output={out}", "--num_shards=2",
       "--format=tfds"])
  assert "wrote 10 examples" in capsys.readouterr().out
  assert len(glob.glob(str(out / "caption_shards" / "1.0.0" / "*.array_record-*"))) == 2
  # (b) TFDS: tfds.data_source with its own image decoding.
  shards.tfds_builder_class()
  source = tfds.data_source(shards.TFDS_NAME, split="train", data_dir=str(out),
                            download=False)
  assert len(source) == 10
  decoded = [{"key": r["key"].decode(), "image": r["image"],
              "captions": [c.decode() for c in r["captions"]]}
             for r in (source[i] for i in range(len(source)))]
  check_records(decoded, expected)
  config = data_config(name="shards", dir=str(out), shards_format="tfds")
  source = registry.get_source(config, "train")
  check_records(read_all(source), expected)
  # grain workers unpickle the source in a fresh process.
  (tmp_path / "source.pkl").write_bytes(pickle.dumps(source))
  script = ("import pickle, sys; s = pickle.load(open(sys.argv[1], 'rb')); "
            "print(len(s), sorted(s[i]['key'] for i in range(len(s)))[0])")
  result = subprocess.run([sys.executable, "-c", script,
                           str(tmp_path / "source.pkl")],
                          capture_output=True, text=True, check=True)
  assert result.stdout.split() == ["10", "007"]


def test_shards_missing_dir_is_clear_error(tmp_path):
  for shards_format in shards.FORMATS:
    config = data_config(name="shards", dir=str(tmp_path),
                         shards_format=shards_format)
    with pytest.raises(images.DataNotFoundError, match="make_shards.py"):
      registry.get_source(config, "train")


# ----------------------------------------------------- decode + transforms ----


def encode(array, fmt, **kwargs) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format=fmt, **kwargs)
  return buffer.getvalue()


def test_decode_modes_and_orientation():
  rgba = np.zeros((1, 2, 4), np.uint8)
  rgba[0, 0] = (10, 20, 30, 255)  # Opaque: kept; transparent: white.
  np.testing.assert_array_equal(
      images.decode_image(encode(rgba, "PNG")).image,
      [[[10, 20, 30], [255, 255, 255]]])
  gray16 = np.array([[0, 257, 65535]], np.uint16)
  np.testing.assert_array_equal(
      images.decode_image(encode(gray16, "PNG")).image[..., 0], [[0, 1, 255]])
  gray = np.array([[0, 128]], np.uint8)
  assert images.decode_image(encode(gray, "PNG")).image.shape == (1, 2, 3)
  image = Image.fromarray(pixels(0, (4, 6)))
  exif = image.getexif()
  exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to view.
  buffer = io.BytesIO()
  image.save(buffer, format="PNG", exif=exif)
  decoded = images.decode_image(buffer.getvalue()).image
  np.testing.assert_array_equal(decoded, np.rot90(pixels(0, (4, 6)), k=-1))


def test_transforms():
  image = pixels(0, (40, 60))
  assert transforms.resize_center_crop(image, 16).shape == (16, 16, 3)
  boxed = transforms.letterbox(image, 30, fill=7)
  assert boxed.shape == (30, 30, 3)
  assert (boxed[:5] == 7).all() and (boxed[-5:] == 7).all()
  rng = np.random.default_rng(0)
  crops = [transforms.random_resized_crop(image, 12, rng) for _ in range(5)]
  assert all(c.shape == (12, 12, 3) and c.dtype == np.uint8 for c in crops)
  again = transforms.random_resized_crop(image, 12, np.random.default_rng(0))
  np.testing.assert_array_equal(crops[0], again)
  picks = {transforms.choose_caption(["a", "b", "c"], rng) for _ in range(50)}
  assert picks == {"a", "b", "c"}
  assert transforms.clean_caption("  A Dog's  ball,red.\n") == "a dog's ball,red."
  assert transforms.clean_caption("A Dog's ball,red.",
                                  strip_punctuation=True) == "a dogs ball red"
