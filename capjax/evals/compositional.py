"""Compositional hard negatives: does the captioner prefer the true caption of an image?

A triple (image, positive caption, negative caption) is right when the positive scores higher
(a tie counts a half). Two scores, both from `predict_fns()["score_captions"]` (the summed token
log-likelihood of the caption given the image, EOS included):

  likelihood  log p(caption | image).
  normalized  log p(caption | image) − log p̂(caption), the caption's text-only prior removed,
              which a generative scorer needs: otherwise a shorter or more common caption wins
              whatever the image shows (SugarCrepe's "add" negatives are longer than their
              positives). p̂(caption) is the geometric mean of the caption's likelihood over
              `prior_images` reference images (the mean of the log-likelihoods; the same images
              for every caption): a low-variance stand-in for the marginal p(c) = E_x p(c|x),
              whose K-image Monte-Carlo estimate is dominated by whichever reference image
              happens to fit the caption best.

Data: the built-in set (`hard_negatives.py`, from `shapes` scenes; reference images from the
shapes val split) or SugarCrepe (`sugarcrepe_dir` holding any of `<category>.json`, each
`{"0": {"filename", "caption", "negative_caption"}, ...}`, images read from `images_dir`, e.g.
COCO val2017; unreadable images are skipped and counted; reference images: `prior_images` of the
set's images, evenly spaced, rarely the triple's own). Both run on the trained model and on a randomly initialised one
of the same config (the baseline, near 50% when the prior is removed).
"""

import json
import os

import numpy as np

from capjax import evals, trained as trained_lib
from capjax.data import images as images_lib, synthetic, transforms
from capjax.evals import hard_negatives

CATEGORIES = hard_negatives.CATEGORIES


def caption_log_likelihoods(trained, images_uint8, captions, batch_size: int = 256) -> np.ndarray:
  """float32[N]: summed log-likelihood of captions[i] given images_uint8[i] (uint8
  [N, S, S, 3] at the model's image size); captions cleaned as in training."""
  data, max_len = trained.config.data, trained.config.model.max_len
  tokens = np.stack([trained.tokenizer.encode(transforms.clean_caption(
      c, data.get("lowercase", False), data.get("strip_punctuation", False)), max_len)
      for c in captions])
  score = trained.predict_fns()["score_captions"]
  out = []
  for start in range(0, len(tokens), batch_size):
    n = min(batch_size, len(tokens) - start)
    pad = lambda a: np.concatenate([a[start:start + n], np.repeat(a[start:start + 1],
                                                                  batch_size - n, axis=0)])
    out.append(np.asarray(score(trained.params, pad(images_uint8), pad(tokens)))[:n])
  return np.concatenate(out).astype(np.float32)


def pairwise_accuracy(positive_N, negative_N) -> float:
  """Share of pairs where the positive scores higher, ties counting a half."""
  positive_N, negative_N = np.asarray(positive_N), np.asarray(negative_N)
  return float(np.mean((positive_N > negative_N) + 0.5 * (positive_N == negative_N)))


def load_sugarcrepe(sugarcrepe_dir: str, images_dir: str, image_size: int, resize: str,
                    num_per_category: int = 0):
  """(uint8 images [N, S, S, 3], {category: [(image index, positive, negative)]}, skips)."""
  for path, what in ((sugarcrepe_dir, "--sugarcrepe_dir"), (images_dir, "--images_dir")):
    if not path or not os.path.isdir(path):
      raise FileNotFoundError(f"{what}={path!r} is not a folder; SugarCrepe needs "
                              f"<category>.json files ({', '.join(CATEGORIES)}) in "
                              "--sugarcrepe_dir and their images in --images_dir.")
  present = [c for c in CATEGORIES if os.path.isfile(os.path.join(sugarcrepe_dir, f"{c}.json"))]
  if not present:
    raise FileNotFoundError(f"No SugarCrepe file in {sugarcrepe_dir}; expected any of "
                            f"{', '.join(c + '.json' for c in CATEGORIES)}.")
  skips, index, images, triples = images_lib.SkipCounter(), {}, [], {}
  for category in present:
    with open(os.path.join(sugarcrepe_dir, f"{category}.json"), encoding="utf-8") as f:
      entries = json.load(f)
    keys = sorted(entries, key=lambda k: (not k.isdigit(), int(k) if k.isdigit() else 0, k))
    triples[category] = []
    for key in keys[:num_per_category or None]:
      entry = entries[key]
      name = entry.get("filename", "")
      if name not in index:
        image, reason = images_lib.load_image(os.path.join(images_dir, name))
        if reason is not None:
          skips.add(reason)
          index[name] = None
          continue
        index[name] = len(images)
        images.append(transforms.to_square(image, image_size, resize))
      if index[name] is not None:
        triples[category].append((index[name], entry["caption"], entry["negative_caption"]))
  if not images:
    raise FileNotFoundError(f"None of the SugarCrepe images were readable in {images_dir} "
                            f"(skipped: {skips.as_dict()}).")
  return np.stack(images), triples, skips.as_dict()


def triple_accuracies(trained, images_uint8, triples: dict, reference_uint8,
                      batch_size: int, chunk: int = 1024) -> dict:
  """{category: {"likelihood": accuracy, "normalized": accuracy}} ("normalized" only with
  reference images)."""
  rows = [(i, c) for t in triples.values() for i, p, q in t for c in (p, q)]
  conditional = np.concatenate([caption_log_likelihoods(
      trained, images_uint8[[i for i, _ in rows[s:s + chunk]]], [c for _, c in rows[s:s + chunk]],
      batch_size) for s in range(0, len(rows), chunk)])
  captions = sorted({c for _, c in rows})
  prior = {}
  if len(reference_uint8):
    ll_KxN = np.stack([caption_log_likelihoods(
        trained, np.broadcast_to(image, (len(captions), *image.shape)), captions, batch_size)
        for image in reference_uint8])
    prior = dict(zip(captions, ll_KxN.mean(axis=0)))
  out, at = {}, 0
  for category, items in triples.items():
    scores_Nx2 = conditional[at:at + 2 * len(items)].reshape(-1, 2)
    at += 2 * len(items)
    out[category] = {"likelihood": pairwise_accuracy(scores_Nx2[:, 0], scores_Nx2[:, 1])}
    if prior:
      normalized_Nx2 = scores_Nx2 - np.asarray([[prior[p], prior[q]] for _, p, q in items])
      out[category]["normalized"] = pairwise_accuracy(normalized_Nx2[:, 0], normalized_Nx2[:, 1])
  return out


@evals.register("compositional")
def compositional(trained, *, sugarcrepe_dir: str = "", images_dir: str = "",
                  num_per_category: int = 200, prior_images: int = 16, baseline: bool = True,
                  random_seed: int = 0, seed: int = 0, show: int = 1, plot: str = "",
                  batch_size: int = 256) -> dict:
  """Accuracy per category (likelihood and prior-normalized), trained vs random."""
  if prior_images < 0 or num_per_category < 0:
    raise ValueError(f"--prior_images={prior_images} and --num_per_category={num_per_category} "
                     "must be >= 0.")
  config, skipped = trained.config, {}
  size = config.data.image_size
  if sugarcrepe_dir or images_dir:
    images, triples, skipped = load_sugarcrepe(sugarcrepe_dir, images_dir, size,
                                               config.data.get("resize", "center_crop"),
                                               num_per_category)
    reference = images[np.linspace(0, len(images) - 1, min(prior_images, len(images))).astype(int)]
  else:
    if num_per_category == 0:
      raise ValueError("--num_per_category=0 (every triple) is for SugarCrepe's files; the "
                       "built-in set needs a number.")
    if config.data.name != "shapes":
      raise ValueError("--eval=compositional's built-in set is made of shapes scenes; for a "
                       f"model trained on data.name={config.data.name} pass --sugarcrepe_dir "
                       "and --images_dir.")
    images, triples = hard_negatives.builtin_set(size, num_per_category, seed,
                                                 config.data.get("seed", 0))
    val = synthetic.ShapesSource("val", prior_images, size, config.data.get("seed", 0))
    reference = np.asarray([val[i]["image"] for i in range(prior_images)], np.uint8).reshape(
        prior_images, size, size, 3)
  triples = {c: t for c, t in triples.items() if t}
  if show:
    evals.say(*(f"  {category:<12} + {p:<52} - {q}"
                for category, items in triples.items() for _, p, q in items[:show]))
  encoders = {"trained": trained}
  if baseline:
    encoders["random"] = trained_lib.randomly_initialised(trained, random_seed)
  results = {name: triple_accuracies(model, images, triples, reference, batch_size)
             for name, model in encoders.items()}
  for name, per_category in results.items():
    for score in ("likelihood", "normalized"):
      if score in next(iter(per_category.values())):
        row = "  ".join(f"{c} {per_category[c][score]:.3f}" for c in per_category)
        evals.say(f"compositional {name:<7} {score:<10} {row}")
  if plot:
    from capjax.evals import plots  # pylint: disable=g-import-not-at-top  # matplotlib is slow
    plots.category_accuracy(results, plot)
  out = {"eval": "compositional", "set": "sugarcrepe" if sugarcrepe_dir else "builtin_shapes",
         "step": trained.step, "num_triples": {c: len(t) for c, t in triples.items()},
         "prior_images": len(reference), **results}
  return {**out, "skipped": skipped} if skipped else out
