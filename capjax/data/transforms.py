"""Pure image and caption transforms on numpy arrays (no tokenization here).

Images are uint8[H, W, 3] in, uint8[size, size, 3] out (scaling to floats happens on
device, in the task: `capjax.tasks.base.normalize_images`). Random transforms take an explicit `np.random.Generator`
so that a pipeline can seed them per example and stay reproducible.
No horizontal flip: captions say "left" and "right".
"""

import math
import string
import unicodedata
from typing import Sequence

import numpy as np
from PIL import Image


_RESAMPLE = Image.Resampling.BICUBIC


def resize(image_HxWx3: np.ndarray, height: int, width: int) -> np.ndarray:
  """Resizes to exactly (height, width) with antialiased bicubic resampling."""
  if image_HxWx3.shape[:2] == (height, width):
    return image_HxWx3
  resized = Image.fromarray(image_HxWx3).resize((width, height), _RESAMPLE)
  return np.asarray(resized, dtype=np.uint8)


def _scaled_size(height: int, width: int, scale: float) -> tuple[int, int]:
  return max(1, round(height * scale)), max(1, round(width * scale))


def resize_center_crop(image_HxWx3: np.ndarray, size: int) -> np.ndarray:
  """The central square (side: the shorter side) resized to size x size.

  The same as resizing the shorter side to `size` and cropping the centre, but
  only the kept square is resampled: cheaper, and bounded for any aspect ratio
  (a 1 x 10^6 strip does not become a 128 x 10^8 intermediate).
  """
  height, width = image_HxWx3.shape[:2]
  if (height, width) == (size, size):
    return image_HxWx3
  side = min(height, width)
  top, left = (height - side) / 2, (width - side) / 2
  # PIL reads pixels just outside `box` for the filter, as a crop after a resize would.
  resized = Image.fromarray(image_HxWx3).resize(
      (size, size), _RESAMPLE, box=(left, top, left + side, top + side))
  return np.asarray(resized, dtype=np.uint8)


def letterbox(image_HxWx3: np.ndarray, size: int, fill: int = 0) -> np.ndarray:
  """Resizes the longer side to `size` and pads (centred) to a square with `fill`.

  Keeps the whole image visible, at the price of padding bars; use it when a
  caption may mention something near the border.
  """
  height, width = image_HxWx3.shape[:2]
  if (height, width) == (size, size):
    return image_HxWx3
  new_h, new_w = _scaled_size(height, width, size / max(height, width))
  new_h, new_w = min(new_h, size), min(new_w, size)
  resized = resize(image_HxWx3, new_h, new_w)
  out = np.full((size, size, 3), fill, dtype=np.uint8)
  top, left = (size - new_h) // 2, (size - new_w) // 2
  out[top:top + new_h, left:left + new_w] = resized
  return out


def random_crop_box(
    height: int, width: int, rng: np.random.Generator,
    scale: tuple[float, float], ratio: tuple[float, float],
    attempts: int = 10) -> tuple[int, int, int, int]:
  """Inception-style crop box `(top, left, h, w)`; falls back to a central crop."""
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(attempts):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(*log_ratio))
    w = round(math.sqrt(target_area * aspect))
    h = round(math.sqrt(target_area / aspect))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  # Fallback: the largest central crop whose aspect ratio is within `ratio`.
  aspect = width / height
  if aspect < ratio[0]:
    w, h = width, round(width / ratio[0])
  elif aspect > ratio[1]:
    h, w = height, round(height * ratio[1])
  else:
    h, w = height, width
  h, w = max(1, min(h, height)), max(1, min(w, width))
  return (height - h) // 2, (width - w) // 2, h, w


def random_resized_crop(
    image_HxWx3: np.ndarray, size: int, rng: np.random.Generator,
    scale: tuple[float, float] = (0.5, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> np.ndarray:
  """Crops a random box (area fraction in `scale`, aspect in `ratio`), resizes.

  The default minimum area is 0.5, not ImageNet's 0.08: a caption describes
  the whole image, and a tiny crop would often drop the objects it names.
  """
  height, width = image_HxWx3.shape[:2]
  top, left, h, w = random_crop_box(height, width, rng, scale, ratio)
  return resize(image_HxWx3[top:top + h, left:left + w], size, size)


RESIZE_MODES = ("center_crop", "letterbox", "random_resized_crop")


def to_square(image_HxWx3: np.ndarray, size: int, mode: str = "center_crop",
              rng: np.random.Generator | None = None) -> np.ndarray:
  """uint8[size, size, 3] by one of `RESIZE_MODES`.

  "random_resized_crop" needs `rng`; without one (evaluation) it is a
  center crop. An image already size x size comes back as it is, except under
  a random crop.
  """
  if mode not in RESIZE_MODES:
    raise ValueError(f"Unknown resize mode {mode!r}; expected one of {RESIZE_MODES}.")
  if mode == "random_resized_crop" and rng is not None:
    return random_resized_crop(image_HxWx3, size, rng)
  if mode == "letterbox":
    return letterbox(image_HxWx3, size)
  return resize_center_crop(image_HxWx3, size)


def choose_caption(captions: Sequence[str], rng: np.random.Generator) -> str:
  """One caption, uniformly at random (the usual 1-of-N caption sampling)."""
  if not captions:
    raise ValueError("choose_caption needs at least one caption.")
  return captions[int(rng.integers(len(captions)))]


def _is_punctuation(char: str) -> bool:
  return char in string.punctuation or unicodedata.category(char).startswith("P")


def clean_caption(text: str, lowercase: bool = True,
                  strip_punctuation: bool = False) -> str:
  """Lower-cases, optionally replaces punctuation by spaces, collapses whitespace.

  Punctuation becomes a space (not nothing) so that "dog,cat" stays two words;
  the apostrophe is dropped instead so that "dog's" stays one word ("dogs").
  """
  if lowercase:
    text = text.lower()
  if strip_punctuation:
    text = "".join(
        ("" if c in "'\u2019" else " ") if _is_punctuation(c) else c
        for c in text)
  return " ".join(text.split())
