"""SigLiT evaluation: zero-shot classification with class-name prompts, and image<->text
retrieval, from a two-tower model's `encode_images` / `encode_texts` predict functions.

Zero-shot (big_vision `evaluators/proj/image_text/discriminative_classifier.py`): each class's
prompts are embedded, averaged in embedding space and re-normalised; an image takes the class
whose averaged embedding is most similar. Prompts: `templates` ("|"-separated, `{}` the class
name) for every label set, or by default the data's own language: on `shapes` every caption
the data could write of a scene with that class (a shape with each size and colour in each
single-object paraphrase; a count with sampled scenes of that many objects), elsewhere
`DEFAULT_TEMPLATES`. Label sets: `capjax.evals.labels`; chance is 1 / number of classes.

Retrieval (as COCO's): over the split's first `num_examples` images and all their captions,
image->text Recall@k counts an image when any of its captions is among the k most similar
texts; text->image queries one caption per image (its first) against all images. Ties count in
the query's favour (rank = how many candidates score strictly higher).
"""

import itertools

import numpy as np

from capjax import evals
from capjax.data import pipeline, synthetic
from capjax.evals import labels as labels_lib

DEFAULT_TEMPLATES = "a photo of a {}|a picture of a {}|a {}"
RECALL_AT = (1, 5, 10)
SCENES_PER_COUNT = 16  # sampled scenes whose captions prompt a `count` class


def encode_batched(fn, params, rows: np.ndarray, batch_size: int) -> np.ndarray:
  """`fn(params, batch)` over `rows` in batches of one shape (the last one padded), so the
  jitted function compiles once."""
  out = []
  for start in range(0, len(rows), batch_size):
    chunk = rows[start:start + batch_size]
    padded = np.concatenate([chunk, np.zeros((batch_size - len(chunk),) + chunk.shape[1:],
                                             chunk.dtype)])
    out.append(np.asarray(fn(params, padded))[:len(chunk)])
  return np.concatenate(out)


def class_embeddings(text_embeddings_PxE: np.ndarray, prompt_class_P: np.ndarray,
                     num_classes: int) -> np.ndarray:
  """float32[C, E]: the mean of each class's prompt embeddings, re-normalised."""
  sums_CxE = np.zeros((num_classes, text_embeddings_PxE.shape[1]), np.float64)
  np.add.at(sums_CxE, prompt_class_P, text_embeddings_PxE)
  counts_C = np.bincount(prompt_class_P, minlength=num_classes)
  if np.any(counts_C == 0):
    raise ValueError(f"classes {np.flatnonzero(counts_C == 0).tolist()} have no prompts.")
  means_CxE = sums_CxE / counts_C[:, None]
  return (means_CxE / (np.linalg.norm(means_CxE, axis=1, keepdims=True) + 1e-12)).astype(
      np.float32)


def rank_of_best(scores_QxN: np.ndarray, correct_QxN: np.ndarray) -> np.ndarray:
  """int[Q]: for each query, how many candidates score strictly higher than its best-scoring
  correct candidate (0: a correct one is first)."""
  best_Q = np.max(np.where(correct_QxN, scores_QxN, -np.inf), axis=1)
  return np.sum(scores_QxN > best_Q[:, None], axis=1)


def recalls(ranks_Q: np.ndarray, ks=RECALL_AT) -> dict[int, float]:
  return {k: float(np.mean(ranks_Q < k)) for k in ks}


def _scene(nps: list[tuple[str, str, str]], relation: str | None = None) -> dict:
  """A scene for `synthetic.captions_for`: objects left to right; two objects placed so that
  the first is `relation` of the second."""
  offsets = {"left of": (-1, 0), "right of": (1, 0), "above": (0, -1), "below": (0, 1)}
  centres = [np.array([10.0 + 20 * i, 32.0]) for i in range(len(nps))]
  if relation is not None:
    dx, dy = offsets[relation]
    centres = [np.array([32.0 + 20 * dx, 32.0 + 20 * dy]), np.array([32.0, 32.0])]
  return {"objects": [{"size": s, "colour": c, "shape": sh, "centre": xy}
                      for (s, c, sh), xy in zip(nps, centres)]}


def shapes_prompts(label_set: str, classes, seed: int = 0) -> list[list[str]]:
  """Per class, the captions the shapes data writes of scenes with that class."""
  sizes, colours, shapes = list(synthetic.SIZES), list(synthetic.COLOURS), synthetic.SHAPES
  if label_set in ("shape", "colour", "size"):
    slot = {"size": 0, "colour": 1, "shape": 2}[label_set]
    prompts = []
    for cls in classes:
      nps = [np_ for np_ in itertools.product(sizes, colours, shapes) if np_[slot] == cls]
      prompts.append([c for np_ in nps for c in synthetic.captions_for(_scene([np_]))])
    return prompts
  if label_set == "count":
    rng = np.random.default_rng(seed)
    all_nps = list(itertools.product(sizes, colours, shapes))
    prompts = []
    for n in range(1, len(classes) + 1):
      scenes = []
      for _ in range(SCENES_PER_COUNT):
        nps = [all_nps[i] for i in rng.integers(len(all_nps), size=n)]
        relation = list(synthetic.RELATIONS)[rng.integers(4)] if n == 2 else None
        scenes.append(_scene(nps, relation))
      prompts.append([c for s in scenes for c in synthetic.captions_for(s)])
    return prompts
  raise ValueError(f"No shapes prompts for label set {label_set!r}.")


def template_prompts(classes, templates: str) -> list[list[str]]:
  parts = [t for t in templates.split("|") if t]
  if not parts or any("{}" not in t for t in parts):
    raise ValueError(f"--templates={templates!r}: expected '|'-separated templates with {{}}.")
  return [[t.format(cls.replace("_", " ")) for t in parts] for cls in classes]


def _tokens(trained, captions: list[str]) -> np.ndarray:
  preprocess = pipeline.Preprocess.from_config(trained.config)
  cleaned = [(preprocess.clean([c]) or [c])[0] for c in captions]
  return np.stack([trained.tokenizer.encode(c, trained.config.model.max_len) for c in cleaned])


def zero_shot(trained, label_set, prompts, batch_size: int) -> float:
  fns = trained.predict_fns()
  flat = [p for ps in prompts for p in ps]
  prompt_class = np.repeat(np.arange(len(prompts)), [len(ps) for ps in prompts])
  ztxt = encode_batched(fns["encode_texts"], trained.params, _tokens(trained, flat), batch_size)
  zcls_CxE = class_embeddings(ztxt, prompt_class, len(prompts))
  zimg_NxE = encode_batched(fns["encode_images"], trained.params, label_set.images_uint8,
                            batch_size)
  return float(np.mean(np.argmax(zimg_NxE @ zcls_CxE.T, axis=1) == label_set.labels))


def retrieval(trained, split: str, num_examples: int, batch_size: int) -> dict:
  fns = trained.predict_fns()
  preprocess = pipeline.Preprocess.from_config(trained.config)
  images, captions, owner, first = [], [], [], []
  for batch in pipeline.eval_batches(trained.config, trained.tokenizer, split, num_examples,
                                     batch_size):
    for image, record in zip(batch["image"], batch["records"]):
      first.append(len(captions))
      cleaned = preprocess.clean(record["captions"])
      captions += cleaned
      owner += [len(images)] * len(cleaned)
      images.append(image)
  zimg_NxE = encode_batched(fns["encode_images"], trained.params, np.stack(images), batch_size)
  ztxt_TxE = encode_batched(fns["encode_texts"], trained.params, _tokens(trained, captions),
                            batch_size)
  sim_NxT = zimg_NxE @ ztxt_TxE.T
  owner_T, n = np.asarray(owner), len(images)
  i2t = recalls(rank_of_best(sim_NxT, owner_T[None, :] == np.arange(n)[:, None]))
  t2i = recalls(rank_of_best(sim_NxT[:, first].T, np.eye(n, dtype=bool)))
  return {"retrieval_images": n, "retrieval_texts": len(captions),
          **{f"image_to_text_R@{k}": v for k, v in i2t.items()},
          **{f"text_to_image_R@{k}": v for k, v in t2i.items()}}


@evals.register("siglit")
def siglit_eval(trained, split: str = "test", num_examples: int = 512, batch_size: int = 128,
                templates: str = "", retrieval_examples: int = 512) -> dict:
  """`templates`: '|'-separated prompt templates ('{}': the class name); empty: the data's
  own language (see the module doc). `retrieval_examples`: images in the retrieval gallery
  (0: no retrieval)."""
  if "encode_texts" not in trained.predict_fns():
    raise ValueError(f"--eval=siglit needs a two-tower model (task=siglit); this one is "
                     f"task={trained.config.task!r}.")
  metrics = {"eval": "siglit", "split": split, "step": trained.step}
  label_sets = labels_lib.labelled_images(trained.config, trained.tokenizer, split,
                                          num_examples, batch_size)
  for name, label_set in label_sets.items():
    if templates:
      prompts = template_prompts(label_set.classes, templates)
    elif trained.config.data.name == "shapes":
      prompts = shapes_prompts(name, label_set.classes)
    else:
      prompts = template_prompts(label_set.classes, DEFAULT_TEMPLATES)
    accuracy = zero_shot(trained, label_set, prompts, batch_size)
    chance = 1.0 / len(label_set.classes)
    metrics.update({f"zeroshot_{name}": accuracy, f"zeroshot_{name}_chance": chance,
                    f"zeroshot_{name}_images": int(len(label_set.labels))})
    evals.say(f"  zero-shot {name:<8} {accuracy:.3f}  (chance {chance:.3f}, "
              f"{len(label_set.labels)} images, {len(label_set.classes)} classes)")
  if retrieval_examples:
    found = retrieval(trained, split, retrieval_examples, batch_size)
    metrics.update(found)
    evals.say("  retrieval over {} images, {} captions: ".format(
        found["retrieval_images"], found["retrieval_texts"]) + "  ".join(
            f"{key} {found[key]:.3f}" for key in found if "R@" in key))
  return metrics
