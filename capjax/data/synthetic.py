"""The built-in `shapes` dataset: procedurally drawn scenes with paraphrased captions.

Each scene has 1-3 objects, each a (size, colour, shape) on a dark background.
Two-object scenes are captioned with their spatial relation; three-object scenes
list the objects from left to right. Everything is a pure function of
(seed, split, index), so no files are needed and any split is reproducible.
Attribute labels are kept for evaluation (`attribute_accuracy`).
"""

import itertools
import os
import re

import numpy as np
from PIL import Image, ImageDraw

from capjax.data import registry

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {
    "red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 90, 235),
    "yellow": (235, 215, 40), "purple": (150, 50, 200), "white": (235, 235, 235),
}
SIZES = {"small": 0.12, "large": 0.2}  # half-extent as a fraction of the image side
RELATIONS = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
SPLIT_IDS = {"train": 0, "val": 1, "test": 2}
DEFAULT_SIZES = {"train": 50_000, "val": 512, "test": 512}


def _object_rng(seed: int, split: str, index: int) -> np.random.Generator:
  return np.random.default_rng([seed, SPLIT_IDS[split], index])


def _place_objects(rng, num_objects: int, image_size: int, half_sizes, tries: int = 200):
  """Rejection-samples non-overlapping centres with unambiguous relations/orders.

  All `tries` candidate placements are drawn at once and the first acceptable one is kept
  (vectorized: per-try Python loops were most of the data pipeline's CPU time).
  """
  half = np.asarray(half_sizes, np.float64)
  lo, hi = half + 1, image_size - half - 1
  centres = lo[None, :, None] + (hi - lo)[None, :, None] * rng.random((tries, num_objects, 2))
  ok = np.ones(tries, bool)
  for i, j in itertools.combinations(range(num_objects), 2):
    gap = np.abs(centres[:, i] - centres[:, j])  # [tries, 2]
    ok &= ~np.all(gap < half[i] + half[j] + 2, axis=1)  # overlapping boxes
    if num_objects == 2:  # relation would be ambiguous (diagonal)
      ok &= gap.max(axis=1) >= 1.6 * gap.min(axis=1) + 4
    if num_objects == 3:  # left-to-right order would be ambiguous
      ok &= gap[:, 0] >= 0.5 * (half[i] + half[j])
  return centres[np.argmax(ok)] if ok.any() else None


def relation(centre_a, centre_b) -> str:
  """Relation of a to b, by the dominant axis of their displacement (y grows downwards)."""
  dx, dy = centre_a - centre_b
  if abs(dx) >= abs(dy):
    return "left of" if dx < 0 else "right of"
  return "above" if dy < 0 else "below"


def sample_scene(rng, image_size: int) -> dict:
  """Draws objects until a placement exists (some large triples do not fit)."""
  num = int(rng.integers(1, 4))
  for _ in range(100):
    scene = _try_scene(rng, num, image_size)
    if scene is not None:
      return scene
  raise RuntimeError(f"Could not place {num} objects in a {image_size}px image.")


def _try_scene(rng, num: int, image_size: int) -> dict | None:
  objects = [
      {"shape": SHAPES[rng.integers(len(SHAPES))],
       "colour": list(COLOURS)[rng.integers(len(COLOURS))],
       "size": list(SIZES)[rng.integers(len(SIZES))]}
      for _ in range(num)]
  half_sizes = [SIZES[o["size"]] * image_size for o in objects]
  centres = _place_objects(rng, num, image_size, half_sizes)
  if centres is None:
    return None
  order = np.argsort(centres[:, 0])  # left to right
  objects = [dict(objects[i], centre=centres[i], half=half_sizes[i]) for i in order]
  return {"objects": objects}


def draw_scene(scene: dict, image_size: int, rng) -> np.ndarray:
  background = tuple(int(v) for v in rng.integers(0, 40, size=3))
  image = Image.new("RGB", (image_size, image_size), background)
  draw = ImageDraw.Draw(image)
  for o in scene["objects"]:
    colour = tuple(int(np.clip(c + rng.integers(-20, 21), 0, 255)) for c in COLOURS[o["colour"]])
    (x, y), h = o["centre"], o["half"]
    if o["shape"] == "circle":
      draw.ellipse([x - h, y - h, x + h, y + h], fill=colour)
    elif o["shape"] == "square":
      draw.rectangle([x - h, y - h, x + h, y + h], fill=colour)
    elif o["shape"] == "triangle":
      draw.polygon([(x, y - h), (x - h, y + h), (x + h, y + h)], fill=colour)
    else:  # cross
      t = h / 3
      draw.rectangle([x - h, y - t, x + h, y + t], fill=colour)
      draw.rectangle([x - t, y - h, x + t, y + h], fill=colour)
  return np.asarray(image, dtype=np.uint8)


def noun_phrase(o: dict) -> str:
  return f"{o['size']} {o['colour']} {o['shape']}"


def captions_for(scene: dict) -> list[str]:
  """Paraphrases; all state every attribute, so any of them is a correct answer."""
  objs = scene["objects"]
  nps = [noun_phrase(o) for o in objs]
  if len(objs) == 1:
    return [f"a {nps[0]}", f"a single {nps[0]}", f"there is a {nps[0]}",
            f"a picture of one {nps[0]}"]
  if len(objs) == 2:
    rel = relation(objs[0]["centre"], objs[1]["centre"])
    inv = RELATIONS[rel]
    return [f"a {nps[0]} {rel} a {nps[1]}", f"a {nps[1]} {inv} a {nps[0]}",
            f"two shapes a {nps[0]} {rel} a {nps[1]}",
            f"there is a {nps[1]} {inv} a {nps[0]}"]
  listing = f"a {nps[0]} a {nps[1]} and a {nps[2]}"
  return [listing, f"three shapes {listing}", f"{listing} from left to right",
          f"there are three shapes {listing}"]


def attributes_of(scene: dict) -> dict:
  objs = scene["objects"]
  attrs = {"count": len(objs),
           "objects": [{k: o[k] for k in ("shape", "colour", "size")} for o in objs]}
  if len(objs) == 2:
    attrs["relation"] = relation(objs[0]["centre"], objs[1]["centre"])
  return attrs


_OBJECT_RE = re.compile(
    rf"\b({'|'.join(SIZES)}) ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})\b")
_RELATION_RE = re.compile(rf"\b({'|'.join(RELATIONS)})\b")


def parse_caption(caption: str) -> dict:
  """Reads the attributes a caption states (for scoring generated captions)."""
  objects = [{"size": s, "colour": c, "shape": sh} for s, c, sh in _OBJECT_RE.findall(caption)]
  rel = _RELATION_RE.search(caption)
  return {"count": len(objects), "objects": objects, "relation": rel.group(1) if rel else None}


def score_caption(caption: str, attrs: dict) -> tuple[int, int]:
  """(correct, total) attributes: shape/colour/size per object, count, and relation.

  Predicted objects are matched to true ones by the assignment with most agreeing
  attributes. The relation (two-object scenes) is right if the caption's relation
  holds between the true objects its two phrases were matched to.
  """
  pred = parse_caption(caption)
  true_objs = attrs["objects"]
  total = 3 * len(true_objs) + 1 + (1 if "relation" in attrs else 0)
  pred_objs = pred["objects"][:len(true_objs)]
  agreements = {
      perm: sum(p[k] == true_objs[t][k]
                for p, t in zip(pred_objs, perm) for k in ("shape", "colour", "size"))
      for perm in itertools.permutations(range(len(true_objs)), len(pred_objs))}
  best = max(agreements.values())
  correct = best + int(pred["count"] == attrs["count"])
  if "relation" in attrs and pred["relation"] and len(pred_objs) == 2:
    # Identical objects admit several best assignments; any of them may justify the relation.
    stated = {attrs["relation"] if perm[0] == 0 else RELATIONS[attrs["relation"]]
              for perm, agree in agreements.items() if agree == best}
    correct += int(pred["relation"] in stated)
  return correct, total


def attribute_accuracy(captions: list[str], attributes: list[dict]) -> float:
  """Share of all attributes of the images that the captions state correctly."""
  scores = [score_caption(c, a) for c, a in zip(captions, attributes)]
  return sum(c for c, _ in scores) / max(sum(t for _, t in scores), 1)


class ShapesSource:
  """Random-access source of shapes scenes (grain's RandomAccessDataSource protocol)."""

  def __init__(self, split: str, size: int, image_size: int = 64, seed: int = 0):
    if split not in SPLIT_IDS:
      raise ValueError(f"Unknown split {split!r}; expected one of {sorted(SPLIT_IDS)}.")
    self.split, self.size, self.image_size, self.seed = split, size, image_size, seed

  def __len__(self) -> int:
    return self.size

  def __getitem__(self, index: int) -> dict:
    if not 0 <= index < self.size:
      raise IndexError(index)
    rng = _object_rng(self.seed, self.split, int(index))
    scene = sample_scene(rng, self.image_size)
    return {"image": draw_scene(scene, self.image_size, rng),
            "captions": captions_for(scene), "attributes": attributes_of(scene)}

  def __repr__(self):
    return f"ShapesSource(split={self.split}, size={self.size}, image_size={self.image_size})"


@registry.register("shapes")
def make_source(data_config, split: str) -> ShapesSource:
  sizes = {**DEFAULT_SIZES, **dict(data_config.get("split_sizes", {}))}
  return ShapesSource(split, sizes[split], data_config.image_size, data_config.get("seed", 0))


def write_class_folders(out: str, split: str, per_class: int, image_size: int = 64,
                        label: str = "shape", seed: int = 0) -> dict[str, int]:
  """Writes single-object scenes of a split as PNGs in `out/split/<class>/` (an image folder,
  `data.name=imagefolder`) with `label` ("shape", "colour" or "size") as the class; returns the
  number written per class (`per_class` each, unless the split runs out)."""
  classes = {"shape": SHAPES, "colour": tuple(COLOURS), "size": tuple(SIZES)}[label]
  source = ShapesSource(split, 100 * per_class * len(classes) + 1000, image_size, seed)
  written = dict.fromkeys(classes, 0)
  for index in range(len(source)):
    if min(written.values()) >= per_class:
      break
    record = source[index]
    if record["attributes"]["count"] != 1:
      continue
    name = record["attributes"]["objects"][0][label]
    if written[name] < per_class:
      folder = os.path.join(out, split, name)
      os.makedirs(folder, exist_ok=True)
      Image.fromarray(record["image"]).save(os.path.join(folder, f"{index:06d}.png"))
      written[name] += 1
  return written
