"""Image-caption pairs as ArrayRecord shards: written once, read with grain.

Record: a msgpack map `{"image": <encoded image bytes as given>, "captions":
[str, ...], "key": str}` (no pickle; images keep their original encoding).

Two on-disk forms, both ArrayRecord:
  array_record: plain files `<dir>/<split>.array_record-00000-of-00004`, ...,
    one record per example (group_size:1, for random access), examples dealt
    round-robin to shards. Read with grain's `ArrayRecordDataSource`.
  tfds: the TFDS dataset "caption_shards" (a GeneratorBasedBuilder with
    `file_format="array_record"`) with `<dir>` as its data_dir; features
    `image` (tfds Image, stored from bytes, so TensorFlow is not needed),
    `captions` (Sequence of Text) and `key` (Text). Read with
    `tfds.data_source(...)`; images are decoded by `images.py`, not by TFDS.

Inputs (`iter_examples`, `tools/make_shards.py --input=`): a `.csv` file with
the header `image,caption` (one row per caption, rows of one image are
merged), a `.jsonl` file of `{"image": path, "caption": str}` or
`{"image": path, "captions": [str]}` lines (image paths are relative to the
file's folder), a webdataset-style `.tar` (consecutive members `KEY.jpg` (or
.jpeg/.png/.webp/.bmp/.gif) and `KEY.txt`), or a folder holding any of these.
Bad inputs are skipped and counted: "missing_file", "no_valid_caption",
"empty_caption", "non_utf8_caption", "malformed_line", "corrupt_tar" and,
with verification on (the default), the image reasons of `images.py`.

Config keys read by the "shards" source (`data.*`):
  dir: folder of shards (array_record) or TFDS data_dir (tfds) (required).
  shards_format: "array_record" (default) or "tfds".
  max_image_pixels: images with more pixels are skipped as "too_large"
    (default 89_478_485, PIL's own limit).
"""

import functools
import glob
import json
import os
import tarfile
from typing import Iterator

import ml_collections
import msgpack

from capjax.data import flickr8k
from capjax.data import images
from capjax.data import registry

# (key, encoded image bytes, captions)
Example = tuple[str, bytes, list[str]]

TFDS_NAME = "caption_shards"
FORMATS = ("array_record", "tfds")
INPUT_EXTENSIONS = (".csv", ".jsonl", ".tar")
TAR_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif")


def encode_record(key: str, image: bytes, captions: list[str]) -> bytes:
  return msgpack.packb({"image": image, "captions": list(captions), "key": key},
                       use_bin_type=True)


def decode_record(record: bytes) -> dict:
  return msgpack.unpackb(record, raw=False)


def shard_paths(output_dir: str, split: str, num_shards: int) -> list[str]:
  return [os.path.join(output_dir, f"{split}.array_record-{i:05d}-of-"
                       f"{num_shards:05d}") for i in range(num_shards)]


def find_shards(shard_dir: str, split: str) -> list[str]:
  return sorted(glob.glob(os.path.join(glob.escape(shard_dir),
                                       f"{split}.array_record-*-of-*")))


# ---------------------------------------------------------------- inputs ----


def input_files(input_path: str) -> list[str]:
  """The convertible files at `input_path` (a file or a folder of them)."""
  if os.path.isfile(input_path) and input_path.endswith(INPUT_EXTENSIONS):
    return [input_path]
  if os.path.isdir(input_path):
    files = sorted(os.path.join(input_path, name)
                   for name in os.listdir(input_path)
                   if name.endswith(INPUT_EXTENSIONS))
    if files:
      return files
  raise images.DataNotFoundError(
      f"No input at {input_path!r}: expected a .csv (header image,caption), a "
      ".jsonl ({\"image\": ..., \"caption\": ...} lines), a webdataset .tar "
      "(KEY.jpg + KEY.txt members), or a folder holding such files.")


def _jsonl_captions(lines, skips: images.SkipCounter) -> dict[str, list]:
  captions = {}
  for line in lines:
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except ValueError:
      row = None
    image = row.get("image") if isinstance(row, dict) else None
    raw = row.get("captions", row.get("caption")) if image else None
    if not isinstance(image, str) or not image or raw is None:
      skips.add("malformed_line")
      continue
    raw = raw if isinstance(raw, list) else [raw]
    captions.setdefault(image, []).extend(
        c if isinstance(c, (str, bytes)) else "" for c in raw)
  return captions


def _iter_table(path: str, skips: images.SkipCounter) -> Iterator[Example]:
  """Examples of a CSV or JSONL file, one per distinct image."""
  lines = flickr8k.read_lines(path)
  if path.endswith(".csv"):
    raw = flickr8k.parse_caption_csv_lines(lines, skips)
  else:
    raw = _jsonl_captions(lines, skips)
  folder = os.path.dirname(path)
  for image, raw_captions in raw.items():
    captions = images.clean_captions(raw_captions, skips)
    if not captions:
      skips.add("no_valid_caption")
      continue
    try:
      with open(os.path.join(folder, image), "rb") as f:
        data = f.read()
    except OSError:
      skips.add("missing_file")
      continue
    yield image, data, captions


def _tar_groups(path: str, skips: images.SkipCounter):
  """(key, {extension: bytes}) for consecutive members sharing a key."""
  key, group = None, {}
  try:
    with tarfile.open(path, "r|*") as tar:
      for member in tar:
        if not member.isfile():
          continue
        folder, base = os.path.split(member.name)
        stem, _, extension = base.partition(".")
        member_key = os.path.join(folder, stem)
        if member_key != key and key is not None:
          yield key, group
          group = {}
        key = member_key
        group[extension.lower()] = tar.extractfile(member).read()
  except (tarfile.TarError, OSError, EOFError):
    skips.add("corrupt_tar")
  if group:
    yield key, group


def _iter_tar(path: str, skips: images.SkipCounter) -> Iterator[Example]:
  for key, group in _tar_groups(path, skips):
    image = next((group[e] for e in TAR_IMAGE_EXTENSIONS if e in group), None)
    if "txt" not in group:
      skips.add("no_valid_caption")
      continue
    captions = images.clean_captions([group["txt"]], skips)
    if not captions:
      skips.add("no_valid_caption")
    elif image is None:
      skips.add("missing_file")
    else:
      yield key, image, captions


def iter_examples(input_path: str, skips: images.SkipCounter,
                  verify: bool = True,
                  max_pixels: int = images.DEFAULT_MAX_PIXELS
                  ) -> Iterator[Example]:
  """All good examples under `input_path`; bad ones go to `skips`.

  With `verify`, each image is fully decoded once, so shards hold no image
  that would be skipped at training time.
  """
  for path in input_files(input_path):
    examples = (_iter_tar(path, skips) if path.endswith(".tar")
                else _iter_table(path, skips))
    for key, data, captions in examples:
      if verify:
        reason = images.decode_image(data, max_pixels).reason
        if reason is not None:
          skips.add(reason)
          continue
      yield key, data, captions


# --------------------------------------------------------------- writers ----


def write_array_record(examples, output_dir: str, num_shards: int,
                       split: str = "train") -> int:
  """Writes examples round-robin into `num_shards` files; returns the count."""
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  if num_shards < 1:
    raise ValueError(f"num_shards must be >= 1, got {num_shards}.")
  if find_shards(output_dir, split):
    raise FileExistsError(f"{output_dir} already has {split!r} shards; remove "
                          "them or choose another output folder.")
  os.makedirs(output_dir, exist_ok=True)
  final = shard_paths(output_dir, split, num_shards)
  # Hidden temporary names: a crash never leaves a shard that `find_shards` sees.
  temporary = [os.path.join(output_dir, "." + os.path.basename(p) + ".tmp")
               for p in final]
  writers = [array_record_module.ArrayRecordWriter(p, "group_size:1")
             for p in temporary]
  count = 0
  try:
    for count, (key, image, captions) in enumerate(examples, start=1):
      writers[(count - 1) % num_shards].write(
          encode_record(key, image, captions))
  finally:
    for writer in writers:
      writer.close()
  for src, dst in zip(temporary, final):
    os.replace(src, dst)
  return count


@functools.cache
def tfds_builder_class():
  """The "caption_shards" TFDS builder (made on first use: TFDS is slow to import)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  class CaptionShards(tfds.core.GeneratorBasedBuilder):
    """Image-caption pairs from `iter_examples` inputs, one input per split."""

    VERSION = tfds.core.Version("1.0.0")
    # No checksums file to look for. TFDS 4.9 would look next to this module
    # through `importlib_resources`, which it does not install on Python
    # >= 3.9 (tensorflow/datasets#11212).
    code_path = None

    def __init__(self, *, split_inputs: dict[str, str] | None = None,
                 skips: images.SkipCounter | None = None, verify: bool = True,
                 max_pixels: int = images.DEFAULT_MAX_PIXELS, **kwargs):
      self._split_inputs = split_inputs or {}
      self._skips = skips or images.SkipCounter()
      self._verify = verify
      self._max_pixels = max_pixels
      super().__init__(**kwargs)

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self,
          description="Image-caption pairs converted by tools/make_shards.py.",
          features=tfds.features.FeaturesDict({
              "image": tfds.features.Image(),
              "captions": tfds.features.Sequence(tfds.features.Text()),
              "key": tfds.features.Text(),
          }))

    def _split_generators(self, dl_manager):
      del dl_manager  # Nothing is downloaded.
      if not self._split_inputs:
        raise images.DataNotFoundError(
            f"{TFDS_NAME} is not prepared in {self.data_dir!r}; build it with "
            "tools/make_shards.py --format=tfds.")
      return {split: self._generate_examples(path)
              for split, path in self._split_inputs.items()}

    def _generate_examples(self, input_path):
      examples = iter_examples(input_path, self._skips, self._verify,
                               self._max_pixels)
      for index, (key, image, captions) in enumerate(examples):
        yield index, {"image": image, "captions": captions, "key": key}

  CaptionShards.__qualname__ = "CaptionShards"  # See `__getattr__` below.
  return CaptionShards


def __getattr__(name: str):
  # Lazy module attribute, so that pickles of TFDS sources (which refer to
  # `capjax.data.shards.CaptionShards`) load in grain worker processes.
  if name == "CaptionShards":
    return tfds_builder_class()
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def write_tfds(input_path: str, output_dir: str, num_shards: int,
               split: str, skips: images.SkipCounter, verify: bool = True,
               max_pixels: int = images.DEFAULT_MAX_PIXELS) -> int:
  """Prepares "caption_shards" in data_dir `output_dir`; returns the count."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = tfds_builder_class()(
      split_inputs={split: input_path}, skips=skips, verify=verify,
      max_pixels=max_pixels, data_dir=output_dir, file_format="array_record")
  if builder.is_prepared():  # TFDS would silently keep the old one.
    raise FileExistsError(f"{builder.data_dir} already exists; remove it or "
                          "choose another output folder.")
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(num_shards=num_shards))
  return builder.info.splits[split].num_examples


# --------------------------------------------------------------- readers ----


def _open_array_record(shard_dir: str, split: str):
  from grain import python as grain  # pylint: disable=g-import-not-at-top
  paths = find_shards(shard_dir, split)
  if not paths:
    present = sorted({os.path.basename(p).split(".array_record-")[0]
                      for p in find_shards(shard_dir, "*")})
    raise images.DataNotFoundError(
        f"No shards for split {split!r} in data.dir={shard_dir!r}: expected "
        f"{os.path.join(shard_dir, split + '.array_record-NNNNN-of-NNNNN')} "
        f"(splits found: {present or 'none'}). Make them with "
        "tools/make_shards.py; nothing is downloaded at run time.")
  return grain.ArrayRecordDataSource(paths)


def _open_tfds(data_dir: str, split: str):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  tfds_builder_class()  # Registers the name with TFDS.
  found = glob.glob(os.path.join(glob.escape(data_dir), TFDS_NAME, "*",
                                 "dataset_info.json"))
  if not found:
    raise images.DataNotFoundError(
        f"No TFDS dataset {TFDS_NAME!r} in data.dir={data_dir!r}: expected "
        f"{os.path.join(data_dir, TFDS_NAME, '<version>', 'dataset_info.json')}"
        ". Make it with tools/make_shards.py --format=tfds; nothing is "
        "downloaded at run time.")
  try:
    return tfds.data_source(
        TFDS_NAME, split=split, data_dir=data_dir, download=False,
        decoders={"image": tfds.decode.SkipDecoding()})
  except (ValueError, KeyError) as e:
    raise ValueError(f"{TFDS_NAME} in {data_dir!r} has no split {split!r} "
                     f"({e}).") from e


def _as_text(value) -> str | bytes:
  return value.decode("utf-8") if isinstance(value, bytes) else value


class ShardsSource:
  """Random-access records of shards; None (and a counted reason) if unreadable."""

  def __init__(self, records, shards_format: str, skips: images.SkipCounter,
               max_pixels: int = images.DEFAULT_MAX_PIXELS):
    self._records = records
    self._format = shards_format
    self.skips = skips
    self._max_pixels = max_pixels

  def __len__(self) -> int:
    return len(self._records)

  def _fields(self, index: int) -> tuple[str, bytes, list]:
    record = self._records[index]
    if self._format == "array_record":
      record = decode_record(record)
    return (_as_text(record["key"]), record["image"], list(record["captions"]))

  def __getitem__(self, index: int) -> dict | None:
    try:
      key, data, raw_captions = self._fields(index)
    except (ValueError, KeyError, TypeError, UnicodeDecodeError,
            msgpack.UnpackException):
      self.skips.add("corrupt_record")
      return None
    captions = images.clean_captions(raw_captions, self.skips)
    if not captions:
      self.skips.add("no_valid_caption")
      return None
    image, reason = images.decode_image(data, self._max_pixels)
    if reason is not None:
      self.skips.add(reason)
      return None
    return {"image": image, "captions": captions, "key": key}


@registry.register("shards")
def make_source(data_config: ml_collections.ConfigDict,
                split: str) -> ShardsSource:
  shard_dir = data_config.get("dir", None) or ""
  shards_format = data_config.get("shards_format", "array_record")
  if shards_format not in FORMATS:
    raise ValueError(f"Unknown data.shards_format={shards_format!r}; "
                     f"expected one of {FORMATS}.")
  if not os.path.isdir(shard_dir):
    raise images.DataNotFoundError(
        f"data.dir={shard_dir!r} is not a folder; expected shards made by "
        "tools/make_shards.py (nothing is downloaded at run time).")
  opener = _open_array_record if shards_format == "array_record" else _open_tfds
  return ShardsSource(
      opener(shard_dir, split), shards_format, images.SkipCounter(),
      data_config.get("max_image_pixels", images.DEFAULT_MAX_PIXELS))
