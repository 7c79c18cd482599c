"""Robust reading of images and captions from local files.

Every function here turns bad input into a reason string instead of an
exception, so that sources can skip the item and count it (design.md: bad input
is skipped and counted, never crashes a run, never silently disappears).

Decoding rules (`decode_image`):
  * empty bytes -> "empty_file"; not an image -> "not_an_image"; truncated or
    corrupt pixel data -> "corrupt_image"; more than `max_pixels` pixels (the
    declared size, checked before decoding) or PIL's own decompression-bomb
    error -> "too_large"; a mode that cannot be turned into RGB ->
    "unsupported_mode".
  * EXIF orientation is applied, so the array is the image as a viewer shows it.
  * Grayscale, palette, CMYK, YCbCr, ... are converted to RGB.
  * Transparency (RGBA, LA, palette with a transparent colour) is composited on
    white: pixels under a fully transparent alpha often hold black or garbage,
    and transparent images (logos, product shots) are meant to be seen on a
    light page.
  * 16-bit grayscale (I;16, as in 16-bit PNGs) is scaled to 8 bits by /257
    (65535 -> 255) with rounding; 32-bit integer "I" is clipped to 16 bits first.

Captions (`clean_captions`): a caption that is not valid UTF-8 (bytes that do
not decode, or a str with lone surrogates from `errors="surrogateescape"`) is
dropped as "non_utf8_caption"; an empty or whitespace-only one as
"empty_caption". Sources skip an item with no caption left as
"no_valid_caption".
"""

import collections
import io
import os
import shutil
import tempfile
import threading
import weakref
from typing import Iterable, NamedTuple

import numpy as np
from PIL import Image
from PIL import ImageOps

# PIL's own default limit (about 9459 x 9459); images above it are skipped.
DEFAULT_MAX_PIXELS = 89_478_485

_WHITE = (255, 255, 255)
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_UINT16_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


class DataNotFoundError(FileNotFoundError):
  """A dataset folder is missing or incomplete (files must be put there by hand)."""


class Decoded(NamedTuple):
  """`image` (uint8[H, W, 3]) when decoding worked, else `reason` says why not."""
  image: np.ndarray | None
  reason: str | None


def _remove_owned_dir(directory: str, owner_pid: int) -> None:
  # A forked child inherits the finalizer; only the creator may remove.
  if os.getpid() == owner_pid:
    shutil.rmtree(directory, ignore_errors=True)


class SkipCounter:
  """Counts skipped items by reason, across threads and processes.

  Each process appends one line per skip to its own file in a shared directory,
  so a copy of the counter pickled into a grain worker process adds to the same
  totals that the main process reads with `as_dict()`. Skips are rare, so the
  file I/O costs nothing measurable. The directory is a fresh temporary one
  (removed when the creating counter is garbage-collected) unless given, e.g. a
  folder in the workdir.
  """

  def __init__(self, directory: str | None = None):
    if directory is None:
      directory = tempfile.mkdtemp(prefix="capjax-skips-")
      weakref.finalize(self, _remove_owned_dir, directory, os.getpid())
    else:
      os.makedirs(directory, exist_ok=True)
    self._dir = directory
    self._lock = threading.Lock()
    # Only used if the directory became unwritable (never lose a count).
    self._fallback = collections.Counter()
    # file name -> (bytes read so far, counts in them): `as_dict` reads only
    # what was appended since its last call, so logging it often stays cheap.
    self._read: dict[str, tuple[int, collections.Counter]] = {}

  def add(self, reason: str, count: int = 1) -> None:
    if count <= 0:
      return
    path = os.path.join(self._dir, f"{os.getpid()}.txt")
    with self._lock:
      try:
        with open(path, "a", encoding="utf-8") as f:
          f.write((reason + "\n") * count)
      except OSError:
        self._fallback[reason] += count

  def as_dict(self) -> dict[str, int]:
    with self._lock:
      try:
        names = sorted(os.listdir(self._dir))
      except OSError:
        names = []
      for name in names:
        self._read_appended(name)
      counts = collections.Counter(self._fallback)
      for _, file_counts in self._read.values():
        counts.update(file_counts)
    return dict(sorted(counts.items()))

  def _read_appended(self, name: str) -> None:
    offset, counts = self._read.get(name, (0, collections.Counter()))
    try:
      with open(os.path.join(self._dir, name), "rb") as f:
        f.seek(offset)
        data = f.read()
    except OSError:
      return
    complete = data.rfind(b"\n") + 1  # A line still being written counts next time.
    text = data[:complete].decode("utf-8", errors="replace")
    counts.update(line for line in text.split("\n") if line.strip())
    self._read[name] = (offset + complete, counts)

  @property
  def total(self) -> int:
    return sum(self.as_dict().values())

  def __getstate__(self):
    # The copy shares the directory but not ownership (no finalizer) or lock.
    return {"dir": self._dir, "fallback": dict(self._fallback)}

  def __setstate__(self, state):
    self._dir = state["dir"]
    self._lock = threading.Lock()
    self._fallback = collections.Counter(state["fallback"])
    self._read = {}


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Decoded:
  """Encoded image bytes -> `Decoded(uint8[H, W, 3] RGB, None)` or `(None, reason)`."""
  if not data:
    return Decoded(None, "empty_file")
  try:
    with Image.open(io.BytesIO(data)) as img:
      if img.width * img.height > max_pixels:
        return Decoded(None, "too_large")
      img.load()
      return _to_rgb_array(_apply_exif_orientation(img))
  except Image.DecompressionBombError:
    return Decoded(None, "too_large")
  except Image.UnidentifiedImageError:
    return Decoded(None, "not_an_image")
  except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError,
          MemoryError):
    # PIL reports truncated and malformed data with any of these.
    return Decoded(None, "corrupt_image")


def load_image(path: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Decoded:
  """Like `decode_image` for a file; a missing or unreadable file is a reason too."""
  try:
    with open(path, "rb") as f:
      data = f.read()
  except FileNotFoundError:
    return Decoded(None, "missing_file")
  except OSError:
    return Decoded(None, "unreadable_file")
  return decode_image(data, max_pixels)


def from_pil(img: Image.Image) -> Decoded:
  """A PIL image (opened by the caller) by the same rules as `decode_image`."""
  try:
    img.load()
    return _to_rgb_array(_apply_exif_orientation(img))
  except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, MemoryError):
    return Decoded(None, "corrupt_image")


def _apply_exif_orientation(img: Image.Image) -> Image.Image:
  try:
    return ImageOps.exif_transpose(img)
  except Exception:  # pylint: disable=broad-except
    # A malformed EXIF block should not cost us an otherwise good image.
    return img


def _to_rgb_array(img: Image.Image) -> Decoded:
  """Any PIL mode -> RGB uint8 array (see the module docstring for the rules)."""
  if img.mode == "P" and "transparency" in img.info:
    img = img.convert("RGBA")
  if img.mode in _ALPHA_MODES:
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, _WHITE + (255,))
    img = Image.alpha_composite(background, rgba).convert("RGB")
  elif img.mode in _UINT16_MODES:
    wide = np.clip(np.asarray(img, dtype=np.int64), 0, 65535)
    gray = np.round(wide / 257.0).astype(np.uint8)
    return Decoded(np.ascontiguousarray(np.stack([gray] * 3, axis=-1)), None)
  elif img.mode == "F":
    gray = np.clip(np.nan_to_num(np.asarray(img)), 0, 255).round().astype(np.uint8)
    return Decoded(np.ascontiguousarray(np.stack([gray] * 3, axis=-1)), None)
  elif img.mode != "RGB":
    try:
      img = img.convert("RGB")
    except (ValueError, OSError):
      return Decoded(None, "unsupported_mode")
  array = np.asarray(img, dtype=np.uint8)
  if array.ndim != 3 or array.shape[-1] != 3:
    return Decoded(None, "unsupported_mode")
  return Decoded(np.ascontiguousarray(array), None)


def validate_caption(caption: str | bytes) -> tuple[str | None, str | None]:
  """Returns `(caption stripped, None)` or `(None, reason)`."""
  if isinstance(caption, bytes):
    try:
      caption = caption.decode("utf-8")
    except UnicodeDecodeError:
      return None, "non_utf8_caption"
  try:
    caption.encode("utf-8")
  except UnicodeEncodeError:  # Lone surrogates from errors="surrogateescape".
    return None, "non_utf8_caption"
  caption = caption.strip()
  if not caption:
    return None, "empty_caption"
  return caption, None


def clean_captions(captions: Iterable[str | bytes],
                   counter: SkipCounter | None = None) -> list[str]:
  """Keeps the valid captions (stripped); counts the dropped ones by reason."""
  kept = []
  for caption in captions:
    text, reason = validate_caption(caption)
    if reason is None:
      kept.append(text)
    elif counter is not None:
      counter.add(reason)
  return kept


class ImageFileSource:
  """Random-access source over `(key, image path, captions)` items.

  Captions are assumed already validated (sources do that at index time).
  `__getitem__` returns `{"image", "captions", "key"}` or None when the file
  cannot be decoded; the reason goes to `self.skips`.
  """

  def __init__(self, items: list[tuple[str, str, list[str]]],
               skips: SkipCounter, max_pixels: int = DEFAULT_MAX_PIXELS):
    self._items = items
    self.skips = skips
    self._max_pixels = max_pixels

  def __len__(self) -> int:
    return len(self._items)

  def captions(self, index: int) -> list[str]:
    """The item's captions without reading its image (for tokenizer training)."""
    return list(self._items[index][2])

  def __getitem__(self, index: int) -> dict | None:
    key, path, captions = self._items[index]
    image, reason = load_image(path, self._max_pixels)
    if reason is not None:
      self.skips.add(reason)
      return None
    return {"image": image, "captions": list(captions), "key": key}

  def __repr__(self) -> str:
    return f"ImageFileSource(len={len(self)}, skips={self.skips.as_dict()})"
