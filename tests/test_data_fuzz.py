"""Fuzz: hundreds of corrupt images and captions mixed with good ones.

No crash, every bad item counted by reason, every good item delivered; exact
counts. The mix is drawn from a fixed seed, so it is the same every run.
"""

import collections
import io
import os
import struct
import tarfile
import zlib

import ml_collections
import numpy as np
from PIL import Image
import pytest

from capjax.data import flickr8k
from capjax.data import images
from capjax.data import registry
from capjax.data import shards

NUM_ITEMS = 300
MAX_PIXELS = 10_000  # data.max_image_pixels for the test: "over_limit" exceeds it.
SPLITS = ("train", "val", "test")


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
  buffer = io.BytesIO()
  image.save(buffer, format=fmt, **kwargs)
  return buffer.getvalue()


def _noise(rng, height, width, mode="RGB") -> Image.Image:
  channels = {"RGB": 3, "RGBA": 4, "LA": 2}.get(mode, 1)
  array = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
  return Image.fromarray(array.squeeze(-1) if channels == 1 else array, mode)


def _bomb_png(width: int, height: int) -> bytes:
  """A tiny PNG whose header claims width x height pixels."""
  def chunk(kind, data):
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)
  header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
          + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))


def _exif_rotated_jpeg(rng) -> bytes:
  image = _noise(rng, 8, 12)
  exif = image.getexif()
  exif[0x0112] = 6  # Viewer rotates 90 degrees: 8x12 becomes 12x8.
  return _encode(image, "JPEG", exif=exif)


def _palette_png(rng, transparent: bool) -> bytes:
  image = _noise(rng, 10, 10).convert("P", palette=Image.Palette.ADAPTIVE)
  return _encode(image, "PNG", **({"transparency": 0} if transparent else {}))


def _gray16_png(rng) -> bytes:
  array = rng.integers(0, 65536, (9, 7), dtype=np.uint16)
  return _encode(Image.fromarray(array), "PNG")


# kind -> (make bytes from rng, decoded (H, W) or the skip reason)
IMAGE_KINDS = {
    "rgb_png": (lambda r: _encode(_noise(r, 12, 10), "PNG"), (12, 10)),
    "rgb_jpeg": (lambda r: _encode(_noise(r, 16, 16), "JPEG"), (16, 16)),
    "gray_png": (lambda r: _encode(_noise(r, 6, 9, "L"), "PNG"), (6, 9)),
    "gray_jpeg": (lambda r: _encode(_noise(r, 8, 8, "L"), "JPEG"), (8, 8)),
    "palette_png": (lambda r: _palette_png(r, False), (10, 10)),
    "palette_transparent_png": (lambda r: _palette_png(r, True), (10, 10)),
    "cmyk_jpeg": (lambda r: _encode(_noise(r, 8, 8).convert("CMYK"), "JPEG"),
                  (8, 8)),
    "rgba_png": (lambda r: _encode(_noise(r, 5, 7, "RGBA"), "PNG"), (5, 7)),
    "la_png": (lambda r: _encode(_noise(r, 5, 5, "LA"), "PNG"), (5, 5)),
    "gray16_png": (_gray16_png, (9, 7)),
    "exif_rotated_jpeg": (_exif_rotated_jpeg, (12, 8)),
    "truncated_jpeg": (lambda r: _encode(_noise(r, 48, 48), "JPEG")[:900],
                       "corrupt_image"),
    "truncated_png": (lambda r: _encode(_noise(r, 48, 48), "PNG")[:3000],
                      "corrupt_image"),
    "zero_bytes": (lambda r: b"", "empty_file"),
    "random_bytes": (lambda r: b"RANDOM" + r.bytes(300), "not_an_image"),
    "text_as_jpg": (lambda r: b"this is a caption file, not a JPEG\n",
                    "not_an_image"),
    "bomb_png": (lambda r: _bomb_png(100_000, 100_000), "too_large"),
    "over_limit": (lambda r: _encode(_noise(r, 120, 100), "PNG"), "too_large"),
}

# kind -> raw caption bytes for one image ("missing_file": no image file).
CAPTION_KINDS = {
    "ok": lambda i: [f"a good caption {i}".encode(), f"another one {i}".encode()],
    "one_empty": lambda i: [f"kept caption {i}".encode(), b""],
    "one_blank": lambda i: [b"   ", f"kept caption {i}".encode()],
    "one_non_utf8": lambda i: [b"bad \xff\xfe bytes", f"kept {i} caf\xc3\xa9".encode()],
    "all_bad": lambda i: [b"", b"\xc3\x28 invalid", b"  "],
    "missing_file": lambda i: [f"orphan caption {i}".encode()],
}
MALFORMED_LINES = 4


def make_plan(seed: int = 0):
  """[(name, image kind, caption kind)], with every kind present."""
  rng = np.random.default_rng(seed)
  image_kinds, caption_kinds = list(IMAGE_KINDS), list(CAPTION_KINDS)
  plan = []
  for i in range(NUM_ITEMS):
    image_kind = image_kinds[i] if i < len(image_kinds) else rng.choice(image_kinds)
    caption_kind = (caption_kinds[i] if i < len(caption_kinds)
                    else rng.choice(caption_kinds, p=[.5, .1, .1, .1, .1, .1]))
    plan.append((f"img_{i:04d}.jpg", str(image_kind), str(caption_kind)))
  return plan


def expected_outcome(plan):
  """(skip counts by reason, {name: (H, W, captions)} delivered)."""
  counts = collections.Counter()
  delivered = {}
  for index, (name, image_kind, caption_kind) in enumerate(plan):
    kept = []
    for raw in CAPTION_KINDS[caption_kind](index):
      text, reason = images.validate_caption(raw)  # Unit-tested below.
      if reason:
        counts[reason] += 1
      else:
        kept.append(text)
    outcome = IMAGE_KINDS[image_kind][1]
    if not kept:
      counts["no_valid_caption"] += 1
    elif caption_kind == "missing_file":
      counts["missing_file"] += 1
    elif isinstance(outcome, str):
      counts[outcome] += 1
    else:
      delivered[name] = (*outcome, kept)
  return counts, delivered


def write_images(image_dir, plan, seed: int = 1):
  rng = np.random.default_rng(seed)
  os.makedirs(image_dir, exist_ok=True)
  for name, image_kind, caption_kind in plan:
    data = IMAGE_KINDS[image_kind][0](rng)
    if caption_kind != "missing_file":
      with open(os.path.join(image_dir, name), "wb") as f:
        f.write(data)


def caption_lines(plan, layout: str) -> list[bytes]:
  lines = [b"image,caption"] if layout == "kaggle" else []
  for index, (name, _, caption_kind) in enumerate(plan):
    for k, raw in enumerate(CAPTION_KINDS[caption_kind](index)):
      if layout == "kaggle":
        lines.append(name.encode() + b',"' + raw + b'"')
      else:
        lines.append(name.encode() + f"#{k}\t".encode() + raw)
  for k in range(MALFORMED_LINES):  # No separator: names no image.
    lines.insert(1 + 37 * k, b"no separator on this line at all")
  return lines


def make_flickr(root, plan, layout: str) -> None:
  image_dir = "Images" if layout == "kaggle" else "Flicker8k_Dataset"
  write_images(os.path.join(root, image_dir), plan)
  text_file = "captions.txt" if layout == "kaggle" else "Flickr8k.token.txt"
  with open(os.path.join(root, text_file), "wb") as f:
    f.write(b"\n".join(caption_lines(plan, layout)) + b"\n")
  if layout == "original":
    names = [name for name, _, _ in plan]
    for split, part in zip(SPLITS, (names[0::3], names[1::3], names[2::3])):
      with open(os.path.join(root, flickr8k.SPLIT_FILES[split]), "w") as f:
        f.write("\n".join(part) + "\n")


def drain(source):
  return [r for r in (source[i] for i in range(len(source))) if r is not None]


def check_delivered(records, delivered):
  assert sorted(r["key"] for r in records) == sorted(delivered)
  for record in records:
    height, width, captions = delivered[record["key"]]
    assert record["image"].shape == (height, width, 3)
    assert record["image"].dtype == np.uint8
    assert record["captions"] == captions


def test_plan_covers_every_kind():
  plan = make_plan()
  assert {k for _, k, _ in plan} == set(IMAGE_KINDS)
  assert {k for _, _, k in plan} == set(CAPTION_KINDS)
  assert images.validate_caption(b"\xff") == (None, "non_utf8_caption")
  assert images.validate_caption(" \t") == (None, "empty_caption")
  assert images.validate_caption("\udcff x") == (None, "non_utf8_caption")
  assert images.validate_caption(b" ok ") == ("ok", None)


@pytest.mark.parametrize("layout", ["kaggle", "original"])
def test_flickr8k_fuzz(tmp_path, layout):
  plan = make_plan()
  make_flickr(str(tmp_path), plan, layout)
  config = ml_collections.ConfigDict(dict(
      name="flickr8k", dir=str(tmp_path), image_size=16,
      max_image_pixels=MAX_PIXELS))
  counts, records = collections.Counter(), []
  for split in SPLITS:
    source = registry.get_source(config, split)
    records += drain(source)
    counts.update(source.skips.as_dict())
  expected_counts, delivered = expected_outcome(plan)
  # Malformed lines belong to no split, so each split's counter has them.
  expected_counts["malformed_line"] = MALFORMED_LINES * len(SPLITS)
  assert dict(counts) == dict(expected_counts)
  check_delivered(records, delivered)
  assert len(records) + sum(
      v for k, v in counts.items()
      if k not in ("empty_caption", "non_utf8_caption", "malformed_line")
  ) == NUM_ITEMS


@pytest.mark.parametrize("verify", [True, False])
def test_shards_fuzz(tmp_path, verify):
  plan = make_plan(seed=2)
  input_dir = tmp_path / "in"
  make_flickr(str(input_dir), plan, "kaggle")
  os.rename(input_dir / "captions.txt", input_dir / "pairs.csv")
  # CSV image paths are relative to the CSV's folder.
  for name in os.listdir(input_dir / "Images"):
    os.rename(input_dir / "Images" / name, input_dir / name)
  write_skips = images.SkipCounter()
  count = shards.write_array_record(
      shards.iter_examples(str(input_dir), write_skips, verify, MAX_PIXELS),
      str(tmp_path / "out"), num_shards=4)
  config = ml_collections.ConfigDict(dict(
      name="shards", dir=str(tmp_path / "out"), image_size=16,
      max_image_pixels=MAX_PIXELS))
  source = registry.get_source(config, "train")
  assert len(source) == count
  records = drain(source)
  expected_counts, delivered = expected_outcome(plan)
  expected_counts["malformed_line"] = MALFORMED_LINES
  counts = collections.Counter(write_skips.as_dict())
  counts.update(source.skips.as_dict())
  assert dict(counts) == dict(expected_counts)
  check_delivered(records, delivered)
  image_reasons = {o for _, o in IMAGE_KINDS.values() if isinstance(o, str)}
  read_time = set(source.skips.as_dict())
  assert read_time == (set() if verify else image_reasons)


def test_corrupt_tar_and_records(tmp_path):
  good = _encode(_noise(np.random.default_rng(0), 4, 4), "PNG")
  tar_bytes = io.BytesIO()
  with tarfile.open(fileobj=tar_bytes, mode="w") as tar:
    for name, payload in (("a.png", good), ("a.txt", b"first"),
                          ("b.png", good),  # No caption.
                          ("c.txt", b"no image"),
                          ("d.png", b""), ("d.txt", b"empty image"),
                          ("e.png", good), ("e.txt", b"last")):
      info = tarfile.TarInfo(name)
      info.size = len(payload)
      tar.addfile(info, io.BytesIO(payload))
  data = tar_bytes.getvalue()
  (tmp_path / "whole.tar").write_bytes(data)
  # 512-byte headers and blocks: "b.png"'s data starts at byte 2560.
  (tmp_path / "cut.tar").write_bytes(data[:2600])
  skips = images.SkipCounter()
  keys = [key for key, _, _ in shards.iter_examples(str(tmp_path), skips)]
  assert keys == ["a", "a", "e"]  # cut.tar's "a", then whole.tar's.
  assert skips.as_dict() == {"corrupt_tar": 1, "empty_file": 1,
                             "missing_file": 1, "no_valid_caption": 1}
  # A corrupt record inside a shard is skipped and counted, not raised.
  source = shards.ShardsSource([b"\xc1 not msgpack", shards.encode_record(
      "k", good, ["fine"])], "array_record", images.SkipCounter())
  assert source[0] is None and source[1]["captions"] == ["fine"]
  assert source.skips.as_dict() == {"corrupt_record": 1}


def test_skip_counter_counts_across_grain_worker_processes(tmp_path):
  from absl import flags  # pylint: disable=g-import-not-at-top
  from grain import python as grain  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():  # grain's workers read absl flags.
    flags.FLAGS.mark_as_parsed()
  plan = make_plan()[:40]
  make_flickr(str(tmp_path), plan, "original")
  config = ml_collections.ConfigDict(dict(
      name="flickr8k", dir=str(tmp_path), image_size=16,
      max_image_pixels=MAX_PIXELS))
  source = registry.get_source(config, "train")
  index_time = source.skips.total
  dataset = (grain.MapDataset.source(source).filter(lambda r: r is not None)
             .to_iter_dataset()
             .mp_prefetch(grain.MultiprocessingOptions(num_workers=2)))
  records = list(dataset)
  read_time = len(source) - len(records)
  assert read_time > 0
  assert source.skips.total == index_time + read_time
