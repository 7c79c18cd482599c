"""Zero-shot classification by caption likelihood, as big_vision's CapPa `scoring_classifier`.

Each class is scored by the summed (not length-normalised) log-likelihood the captioner gives
its prompts, and the image gets the class with the highest score; top-1 and top-k accuracy per
label set of `capjax.evals.labels` (top-5 is capped at the number of classes).

Prompts are captions in the training captions' own language. For an image folder, the class
name through each template (default `"{class}"`, big_vision's plain class names). For `shapes`,
whose captions state every attribute of an object, a template is a one-object caption of
`synthetic.captions_for` with slots `{size} {colour} {shape}`, and a class of one attribute is
scored by the logsumexp over every filling of the other slots: the probability that the caption
states that class, whatever it says of the rest. Measured on the shapes_tiny demo checkpoint
(step 1500; 512 test images, 177 of one object), top-1 accuracy of shape / colour / size:
  "a {size} {colour} {shape}", other slots marginalised (48 captions):   0.983 / 1.000 / 1.000
  all 4 paraphrases of captions_for, marginalised (192 captions, 4x as many): 0.989 / 1 / 1
  the other attributes left out ("a {shape}", "a {colour}", "a {size}"): 0.367 / 0.237 / 0.661
A caption that leaves attributes out is one the model never saw, and scores near chance; the
paraphrase is drawn at random in training, independently of the image, so adding the others
changes little: the default is the first paraphrase (`--templates` takes any).
`count` (every image) is scored by the openings of the captions that state it and no other
count ("a single", "a picture of one" / "two shapes a" / "three shapes a", "there are three
shapes a"), each scored as a caption prefix: the probability that the caption begins so
(0.936 top-1 on that checkpoint, chance 0.333).
"""

import itertools
import string

import numpy as np

from capjax import evals
from capjax.data import synthetic
from capjax.evals import labels

_SLOT = "\x00"  # an object attribute no caption contains, to find where the objects begin


def caption_log_likelihoods(trained, images_uint8, captions: list[str],
                            prefix: bool = False) -> np.ndarray:
  """float32[B, C]: summed log-likelihood of each caption's tokens given each image, EOS
  included (with `prefix`: left out, so a caption's beginning is scored)."""
  score = trained.predict_fns()["score_captions"]
  special_ids, b = trained.tokenizer.special, len(images_uint8)
  out = np.empty((b, len(captions)), np.float32)
  for j, caption in enumerate(captions):
    tokens = trained.tokenizer.encode(caption, trained.config.model.max_len)
    if prefix:
      tokens[tokens == special_ids.eos] = special_ids.pad
    out[:, j] = np.asarray(score(trained.params, images_uint8, np.tile(tokens, (b, 1))))
  return out


def shapes_templates() -> tuple[str, ...]:
  """`synthetic.captions_for`'s one-object captions with `{size} {colour} {shape}` slots."""
  slots = {"size": "{size}", "colour": "{colour}", "shape": "{shape}"}
  return tuple(synthetic.captions_for({"objects": [slots]}))


def shapes_count_openings() -> dict[str, tuple[str, ...]]:
  """{count word: the words `captions_for` puts before the first object in captions of that many
  objects, and in no caption of another count}."""
  openings = {}
  for count, word in synthetic.COUNT_WORDS.items():
    objects = [{"size": _SLOT, "colour": _SLOT, "shape": _SLOT, "centre": np.array([10.0 * i, 0])}
               for i in range(count)]
    openings[word] = {c.split(_SLOT)[0].strip() for c in synthetic.captions_for({"objects": objects})}
  return {word: tuple(sorted(mine - set().union(*(o for w, o in openings.items() if w != word))))
          for word, mine in openings.items()}


def class_prompts(name: str, classes, templates, slot_values: dict) -> list[list[str]]:
  """Per class, every prompt: each template naming `{name}`, its other slots filled every way."""
  prompts = [[] for _ in classes]
  for template in templates:
    slots = [f for _, f, _, _ in string.Formatter().parse(template) if f]
    if name not in slots:
      continue
    unknown = sorted(set(slots) - set(slot_values))
    if unknown:
      raise ValueError(f"--templates: {template!r} names {{{unknown[0]}}}, not a label set of "
                       f"this data; expected slots from {sorted(slot_values)}.")
    others = [s for s in dict.fromkeys(slots) if s != name]
    for i, cls in enumerate(classes):
      for values in itertools.product(*(slot_values[s] for s in others)):
        prompts[i].append(template.format(**{name: cls, **dict(zip(others, values))}))
  return prompts


class _Scores:
  """Caption scores of image sets, each caption scored once per set of images."""

  def __init__(self, trained, batch_size: int):
    self.trained, self.batch_size, self.tables = trained, batch_size, []

  def __call__(self, images_uint8, captions: list[str], prefix: bool) -> np.ndarray:
    table = next((t for imgs, t in self.tables
                  if imgs.shape == images_uint8.shape and np.array_equal(imgs, images_uint8)), None)
    if table is None:
      table = {}
      self.tables.append((images_uint8, table))
    missing = [c for c in dict.fromkeys(captions) if (c, prefix) not in table]
    if missing:
      scores = np.concatenate([
          caption_log_likelihoods(self.trained, images_uint8[i:i + self.batch_size], missing,
                                  prefix) for i in range(0, len(images_uint8), self.batch_size)])
      table.update({(c, prefix): scores[:, j] for j, c in enumerate(missing)})
    return np.stack([table[(c, prefix)] for c in captions], axis=1)


def top_k_accuracy(scores_NxC: np.ndarray, labels_N: np.ndarray, k: int) -> float:
  top_NxK = np.argsort(-scores_NxC, axis=1, kind="stable")[:, :min(k, scores_NxC.shape[1])]
  return float(np.mean(np.any(top_NxK == labels_N[:, None], axis=1)))


@evals.register("zeroshot")
def zeroshot_accuracy(trained, split: str = "test", num_examples: int = 512,
                      batch_size: int = 128, label_sets: tuple = (), templates: tuple = ()) -> dict:
  """Top-1 / top-5 accuracy per label set (`label_sets`: default all the data has)."""
  sets = labels.labelled_images(trained.config, trained.tokenizer, split, num_examples)
  unknown = sorted(set(label_sets) - set(sets))
  if unknown:
    raise ValueError(f"--label_sets: {unknown[0]!r} is not a label set of data.name="
                     f"{trained.config.data.name}; expected some of {sorted(sets)}.")
  shapes = trained.config.data.name == "shapes"
  templates = tuple(templates) or (shapes_templates()[:1] if shapes else ("{class}",))
  slot_values = {name: s.classes for name, s in sets.items()}
  scores = _Scores(trained, batch_size)
  names = label_sets or tuple(sets)
  metrics = {"eval": "zeroshot", "split": split,
             "num_images": max(len(sets[name].labels) for name in names)}
  for name in names:
    label_set, k = sets[name], min(5, len(sets[name].classes))
    prompts, prefix = class_prompts(name, label_set.classes, templates, slot_values), False
    if shapes and name == "count" and not any(prompts):
      openings = shapes_count_openings()
      prompts, prefix = [list(openings[c]) for c in label_set.classes], True
    if not all(prompts):
      raise ValueError(f"--templates: none names {{{name}}}; give one that does, or leave "
                       f"{name} out of --label_sets.")
    flat = [p for class_prompts_ in prompts for p in class_prompts_]
    caption_scores = scores(label_set.images_uint8, flat, prefix)
    bounds = np.cumsum([0] + [len(p) for p in prompts])
    class_scores = np.stack([np.logaddexp.reduce(caption_scores[:, a:b], axis=1)
                             for a, b in zip(bounds[:-1], bounds[1:])], axis=1)
    top1 = top_k_accuracy(class_scores, label_set.labels, 1)
    topk = top_k_accuracy(class_scores, label_set.labels, k)
    n_classes = len(label_set.classes)
    evals.say(f"  {name}: top-1 {top1:.3f} (chance {1 / n_classes:.3f}), top-{k} {topk:.3f} "
              f"(chance {k / n_classes:.3f}); {len(label_set.labels)} images, {n_classes} "
              f"classes, {len(flat)} prompts")
    metrics.update({f"{name}/top1": top1, f"{name}/top5": topk,
                    f"{name}/chance_top1": 1 / n_classes, f"{name}/chance_top5": k / n_classes,
                    f"{name}/num_images": len(label_set.labels)})
  return {**metrics, "step": trained.step}
