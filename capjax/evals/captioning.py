"""Caption metrics as the COCO caption evaluation computes them, and the `captioning` evaluator.

`score` runs `pycocoevalcap`'s own scorers (BLEU-1..4, METEOR 1.5, ROUGE-L, CIDEr-D) on captions
tokenized by its PTB tokenizer, as its `COCOEvalCap.evaluate` does (SPICE is left out: it
downloads Stanford models on first use). The tokenizer and METEOR run `java`; without it the
captions are tokenized by `capjax.evals.ptb_tokenizer` (NLTK's Penn Treebank tokenizer made to
give the Java tokens on the tests' captions) and METEOR is None.
"""

import contextlib
import functools
import logging
import shutil
import sys

from capjax import evals
from capjax.data import pipeline
from capjax.evals import attributes

INSTALL_HINT = "pip install 'capjax[eval]'"


def _pycocoevalcap():
  try:
    from pycocoevalcap.bleu import bleu  # pylint: disable=g-import-not-at-top
    from pycocoevalcap.cider import cider  # pylint: disable=g-import-not-at-top
    from pycocoevalcap.rouge import rouge  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImportError(f"Caption metrics need the pycocoevalcap package: {INSTALL_HINT}") from None
  return bleu.Bleu, rouge.Rouge, cider.Cider


@functools.cache
def _meteor():
  """One METEOR server (a Java process; ~10 s to start) for the whole run."""
  from pycocoevalcap.meteor import meteor  # pylint: disable=g-import-not-at-top
  return meteor.Meteor()


def _tokenize(captions_for_id: dict, java: bool) -> dict:
  if java:
    from pycocoevalcap.tokenizer import ptbtokenizer  # pylint: disable=g-import-not-at-top
    return ptbtokenizer.PTBTokenizer().tokenize(captions_for_id)
  try:
    from capjax.evals import ptb_tokenizer  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(f"Caption metrics without java need the {e.name} package: "
                      f"{INSTALL_HINT}") from None
  return ptb_tokenizer.tokenize(captions_for_id)


def score(candidates: dict, references: dict[object, list[str]]) -> dict:
  """{"Bleu_1".."Bleu_4", "METEOR", "ROUGE_L", "CIDEr"} of one candidate caption per id against
  that id's reference captions, corpus-level as in COCOEvalCap; METEOR is None without Java."""
  bleu, rouge, cider = _pycocoevalcap()
  if not candidates or set(candidates) != set(references):
    raise ValueError(f"score needs one candidate per id and references for the same ids; got "
                     f"{len(candidates)} candidates and {len(references)} reference lists.")
  if not all(references.values()):
    raise ValueError("score needs at least one reference caption for every id.")
  java = shutil.which("java") is not None
  if not java:
    logging.warning("no `java` on PATH: METEOR is not computed; captions are tokenized by "
                    "capjax's Python PTB tokenizer")
  ids = list(references)
  gts = _tokenize({i: [{"caption": c} for c in references[i]] for i in ids}, java)
  res = _tokenize({i: [{"caption": candidates[i]}] for i in ids}, java)
  with contextlib.redirect_stdout(sys.stderr):  # the scorers print as they go
    bleu_1to4, _ = bleu(4).compute_score(gts, res, verbose=0)
    meteor = _meteor().compute_score(gts, res)[0] if java else None
    rouge_l, _ = rouge().compute_score(gts, res)
    cider_d, _ = cider().compute_score(gts, res)
  metrics = {f"Bleu_{n}": float(b) for n, b in enumerate(bleu_1to4, start=1)}
  return {**metrics, "METEOR": None if meteor is None else float(meteor),
          "ROUGE_L": float(rouge_l), "CIDEr": float(cider_d)}


@evals.register("captioning", requires=("pycocoevalcap", "nltk"))
def caption_metrics(trained, split: str = "test", num_examples: int = 256, batch_size: int = 128,
                    show: int = 4) -> dict:
  """One generated caption per image of a split, scored against all its reference captions."""
  _pycocoevalcap()  # before generating: a missing package is a one-line error at once
  candidates, references = {}, {}
  for batch in pipeline.eval_batches(trained.config, trained.tokenizer, split, num_examples,
                                     batch_size):
    generated = attributes.generated_captions(trained, batch["image"])
    for caption, record in zip(generated, batch["records"]):
      candidates[len(candidates)] = caption
      references[len(references)] = [c for c in record["captions"] if c.strip()]
  if not candidates:
    raise ValueError(f"No readable images in the {split} split of "
                     f"data.name={trained.config.data.name}.")
  if show:
    evals.say(*(f"  generated: {candidates[i]:<60} reference: {references[i][0]}"
                for i in list(candidates)[:show]))
  return {"eval": "captioning", "split": split, "num_images": len(candidates),
          **score(candidates, references), "step": trained.step}
