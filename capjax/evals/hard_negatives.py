"""A built-in compositional hard-negative set from `shapes` scenes, in SugarCrepe's categories.

Every triple is (scene image, a true caption, a false caption), both in the captions' own
language (`data/synthetic.py`): "a P" for one object, "a P REL a Q" for two, "a P a Q and a R"
(left to right) for three, where a phrase P is "size colour shape". The positive is the scene's
first caption; the negative is made from the scene's attributes:

  replace_obj  one object's shape replaced        replace_att  one object's colour or size
  replace_rel  the relation replaced (2 objects)  swap_obj     two objects trade places
  swap_att     two objects trade a colour or size add_obj      an object added (1-2 objects)
  add_att      the positive leaves out one object's size or colour; the negative states a
               wrong one (SugarCrepe's negatives add an attribute; every phrase of this
               language already has all three, so the positive drops one instead)

Candidates that would still be true of the scene (e.g. swapping two identical objects, or a
relation that also holds between identical objects) are dropped by `caption_holds`, so the
ground truth is known by construction; one candidate per scene and category is drawn at random.
"""

import itertools
import re

import numpy as np

from capjax.data import synthetic

CATEGORIES = ("add_obj", "add_att", "replace_obj", "replace_att", "replace_rel", "swap_obj",
              "swap_att")
KEYS = ("size", "colour", "shape")
VALUES = {"size": tuple(synthetic.SIZES), "colour": tuple(synthetic.COLOURS),
          "shape": synthetic.SHAPES}
_PHRASE_RE = re.compile(rf"\b(?:({'|'.join(VALUES['size'])}) )?"
                        rf"(?:({'|'.join(VALUES['colour'])}) )?({'|'.join(VALUES['shape'])})\b")


def describe(objects: list[dict], relation: str | None = None, omit: dict | None = None) -> str:
  """A caption in the shapes language; `omit` {object index: key} leaves an attribute out."""
  omit = omit or {}
  nps = [" ".join(o[k] for k in KEYS if omit.get(i) != k) for i, o in enumerate(objects)]
  if len(objects) == 1:
    return f"a {nps[0]}"
  if len(objects) == 2:
    return f"a {nps[0]} {relation} a {nps[1]}"
  return f"a {nps[0]} a {nps[1]} and a {nps[2]}"


def stated_objects(caption: str) -> list[dict]:
  """The object phrases of a caption in order; an attribute left out is None."""
  return [dict(zip(KEYS, (s or None, c or None, sh))) for s, c, sh in
          _PHRASE_RE.findall(caption)]


def _fits(stated: dict, obj: dict) -> bool:
  return all(v is None or obj[k] == v for k, v in stated.items())


def caption_holds(caption: str, attributes: dict) -> bool:
  """Whether the caption is true of the scene: as many objects as the scene; one object: its
  stated attributes; two: some assignment of the phrases to the objects fits and the stated
  relation holds between them; three: the phrases fit the objects left to right."""
  stated, objects = stated_objects(caption), attributes["objects"]
  if len(stated) != len(objects):
    return False
  if len(objects) != 2:
    return all(_fits(s, o) for s, o in zip(stated, objects))
  relation = synthetic.parse_caption(caption)["relation"]
  true_relation = {(0, 1): attributes["relation"],
                   (1, 0): synthetic.RELATIONS[attributes["relation"]]}
  return any(_fits(stated[0], objects[a]) and _fits(stated[1], objects[b])
             and relation == true_relation[(a, b)] for a, b in true_relation)


def _with(objects, index, **values):
  return [dict(o, **values) if i == index else o for i, o in enumerate(objects)]


def candidates(category: str, attributes: dict) -> list[tuple[str, str]]:
  """Every (positive, negative) pair of a category for a scene, before the truth filter."""
  objects, rel = attributes["objects"], attributes.get("relation")
  n, pos = len(objects), describe(attributes["objects"], attributes.get("relation"))
  pairs = list(itertools.combinations(range(n), 2))
  if category == "replace_obj":
    return [(pos, describe(_with(objects, i, shape=v), rel))
            for i in range(n) for v in VALUES["shape"]]
  if category == "replace_att":
    return [(pos, describe(_with(objects, i, **{k: v}), rel))
            for i in range(n) for k in ("colour", "size") for v in VALUES[k]]
  if category == "replace_rel":
    return [(pos, describe(objects, r)) for r in synthetic.RELATIONS] if n == 2 else []
  if category == "swap_obj":
    out = []
    for i, j in pairs:
      swapped = list(objects)
      swapped[i], swapped[j] = objects[j], objects[i]
      out.append((pos, describe(swapped, rel)))
    return out
  if category == "swap_att":
    return [(pos, describe(_with(_with(objects, i, **{k: objects[j][k]}), j,
                                 **{k: objects[i][k]}), rel))
            for i, j in pairs for k in ("colour", "size")]
  if category == "add_obj":
    new = [dict(zip(KEYS, v)) for v in itertools.product(*(VALUES[k] for k in KEYS))]
    if n == 1:
      return [(pos, describe([objects[0], o], r)) for o in new for r in synthetic.RELATIONS]
    if n == 2:
      return [(pos, describe(objects[:p] + [o] + objects[p:])) for o in new for p in range(3)]
    return []
  if category == "add_att":
    return [(describe(objects, rel, omit={i: k}), describe(_with(objects, i, **{k: v}), rel))
            for i in range(n) for k in ("colour", "size") for v in VALUES[k]]
  raise ValueError(f"Unknown category {category!r}; expected one of {CATEGORIES}.")


def hard_negative(category: str, attributes: dict, rng: np.random.Generator):
  """A random (positive, negative) pair with a true positive and a false negative, or None."""
  valid = [(p, q) for p, q in candidates(category, attributes)
           if p != q and caption_holds(p, attributes) and not caption_holds(q, attributes)]
  return valid[int(rng.integers(len(valid)))] if valid else None


def builtin_set(image_size: int, num_per_category: int, seed: int = 0, data_seed: int = 0,
                max_scenes: int = 20_000):
  """(uint8 images [N, S, S, 3], {category: [(image index, positive, negative)]}) from the
  shapes test split: scenes are read in order, each giving at most one triple a category,
  until every category has `num_per_category`."""
  source = synthetic.ShapesSource("test", max_scenes, image_size=image_size, seed=data_seed)
  triples = {c: [] for c in CATEGORIES}
  images = []
  for index in range(max_scenes):
    if min(len(t) for t in triples.values()) >= num_per_category:
      break
    record = source[index]
    rng = np.random.default_rng([seed, index])
    for category in CATEGORIES:
      if len(triples[category]) < num_per_category:
        pair = hard_negative(category, record["attributes"], rng)
        if pair is not None:
          if not images or images[-1][0] != index:
            images.append((index, record["image"]))
          triples[category].append((len(images) - 1, *pair))
  return np.stack([image for _, image in images]), triples
