"""`captioning.score` against pycocoevalcap's own pipeline, and the Python PTB tokenizer against
the Java one. Java runs are few: one tokenizer call per fixture, METEOR (~10 s or more to start)
only in the slow test."""

import logging
import random
import shutil
import sys

import numpy as np
import pytest

pytest.importorskip("pycocoevalcap")
from pycocoevalcap.bleu import bleu  # noqa: E402
from pycocoevalcap.cider import cider  # noqa: E402
from pycocoevalcap.meteor import meteor  # noqa: E402
from pycocoevalcap.rouge import rouge  # noqa: E402
from pycocoevalcap.tokenizer import ptbtokenizer  # noqa: E402

from capjax.data import synthetic  # noqa: E402
from capjax.evals import captioning, ptb_tokenizer  # noqa: E402

JAVA = shutil.which("java") is not None
needs_java = pytest.mark.skipif(not JAVA, reason="java is not installed: no reference to compare")

# (candidate, references): the edge cases the PTB tokenizer and the scorers meet in captions.
CASES = [
    ("a man riding a horse", ["A man riding a horse.", "A person rides a brown horse."]),
    ("", ["a dog runs on the grass", "a dog in a field"]),  # empty candidate
    ("A DOG, RUNNING; FAST!!!", ["a dog is running fast", "The dog runs quickly!"]),
    ("un café près de la fenêtre", ["Un café près de la fenêtre.", "a naïve man in a café"]),
    ("a sign with 中文 and an emoji 😀", ["A sign in Chinese: 中文.", "a sign with an emoji"]),
    ("dog", ["dog", "a dog"]),  # single word, equal to a reference
    ("it's a dog's life, isn't it?", ["It's a dog's life.", "the dog isn't happy", "can't stop"]),
    ('a sign that says "stop" (red)', ['A red sign saying "STOP".', "a (red) stop sign"]),
    ("3 dogs and 1,000 sheep at 10:30", ["three dogs and many sheep", "1,000 sheep at 10:30 am"]),
    ("a well-known x-ray machine", ["an X-ray machine", "a well known machine for x-rays"]),
    ("  a   dog \t runs  ", ["a dog runs", "a dog  is running"]),
    ("...", ["a cat sleeping on a couch", "a cat on a sofa"]),  # punctuation only
    ("a dog running", ["a dog\nrunning on a beach", "a dog on the beach"]),  # newline inside
    ("Mr. Smith visits the U.S. etc.", ["Mr. Smith in the U.S.", "a man visiting the US"]),
    ("a a a a a a a a", ["a man and a woman", "a couple"]),  # repetition
    ("a group of people standing around a large table covered with food and drinks at a party",
     ["People gather around a table of food.", "A party with food on a table.",
      "a group of friends at a dinner party", "several people near a buffet table",
      "a crowd at a party eating food"]),  # long candidate, five references
    ("a red double decker bus", ["a red double decker bus", "a red double decker bus"]),
    ("purple elephants juggling", ["a train at the station", "a locomotive"]),  # no overlap
    ("[a] {b} <c>", ["[a] {b} <c>", "a b c"]),  # brackets, lower-cased to -lsb- ... and kept
    ("a dog... running -- fast - ok", ["a dog running fast", "a dog--running"]),
    ("‘curly’ “quotes” — dashes", ["'curly' \"quotes\" - dashes", "quotes"]),
    ("I'm gonna see the cannot", ["I am going to see it", "we'll see, they've seen, he'd see"]),
    ("£5 for ½ a cake", ["$5 for half a cake", "a cake for five pounds"]),
    ("A", ["a", "A A"]),
]


def _as_coco(captions_for_id: dict) -> dict:
  return {i: [{"caption": c} for c in caps] for i, caps in captions_for_id.items()}


@pytest.fixture(scope="module")
def corpus():
  candidates = {i: c for i, (c, _) in enumerate(CASES)}
  references = {i: refs for i, (_, refs) in enumerate(CASES)}
  return candidates, references


@pytest.fixture(scope="module")
def java_tokenized(corpus):
  """pycocoevalcap's tokenizer on the references and the candidates, as COCOEvalCap calls it."""
  candidates, references = corpus
  tokenizer = ptbtokenizer.PTBTokenizer()
  return (tokenizer.tokenize(_as_coco(references)),
          tokenizer.tokenize(_as_coco({i: [c] for i, c in candidates.items()})))


def _coco_scores(gts, res, with_meteor: bool) -> dict:
  """COCOEvalCap.evaluate's scorers on tokenized captions."""
  scores = dict(zip(["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4"],
                    bleu.Bleu(4).compute_score(gts, res, verbose=0)[0]))
  if with_meteor:
    scores["METEOR"] = meteor.Meteor().compute_score(gts, res)[0]
  scores["ROUGE_L"] = rouge.Rouge().compute_score(gts, res)[0]
  scores["CIDEr"] = cider.Cider().compute_score(gts, res)[0]
  return scores


def _assert_scores_equal(got: dict, want: dict):
  assert set(got) == {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"}
  for key, value in want.items():
    tolerance = 1e-3 if key == "METEOR" else 1e-6
    assert got[key] == pytest.approx(value, abs=tolerance), key


def test_there_are_enough_cases_and_the_punctuation_list_is_pycocoevalcaps():
  assert len(CASES) >= 20
  assert list(ptb_tokenizer.PUNCTUATIONS) == ptbtokenizer.PUNCTUATIONS


@needs_java
def test_python_ptb_tokenizer_gives_the_java_tokens(corpus, java_tokenized):
  candidates, references = corpus
  gts, res = java_tokenized
  assert ptb_tokenizer.tokenize(_as_coco(references)) == gts
  assert ptb_tokenizer.tokenize(_as_coco({i: [c] for i, c in candidates.items()})) == res
  assert res[5] == ["dog"] and res[1] == [""] and res[11] == [""]
  assert res[3] == ["un café près de la fenêtre"]
  assert res[2] == ["a dog running fast !!!"]  # "!!!" is one token, not in PUNCTUATIONS


def _realistic_captions(n: int) -> list[str]:
  """Shapes captions and COCO-style ones with the punctuation, numbers, hyphens, possessives,
  quotes and abbreviations human captions have."""
  rng, np_rng = random.Random(0), np.random.default_rng(0)
  subjects = ["a man", "A woman", "two dogs", "a young girl", "An elderly couple", "Three zebras",
              "a group of people", "a black-and-white cat", "The chef", "a baseball player",
              "a well-dressed man", "a toddler", "Mr. Smith", "a U.S. soldier", "the team's coach"]
  verbs = ["riding", "holding", "sitting on", "standing next to", "eating", "looking at",
           "playing with", "walking past", "leaning against", "carrying", "is riding", "are eating"]
  objects = ["a surfboard", "a slice of pizza", "his cell phone", "a red frisbee", "the U.S. flag",
             "the kitchen counter", "a two-story building", "an x-ray machine", "a T-shirt",
             "her dog's leash", "the bus stop", "a 10-speed bike", "a hot dog", "a stop sign"]
  extras = [" at 10:30 am", " in the U.S.", " on St. Patrick's Day", " near Dr. Smith's office",
            ", it's sunny", " that isn't moving", " (on the left)", ' with a sign that says "STOP"',
            " with the word 'Welcome'", " for $5", " with 1,000 balloons", " in 3.5 seconds",
            " -- very fast", "...", " on a 50% off sale", " w/ cheese", " & a friend",
            " while they're waiting", " and can't stop", " on Main Ave.", " etc.", " in the '90s",
            " at the dogs' park", " with 2 kids", "; two people watch", ": a red sign",
            " , looking happy", " - a nice view", " at 5 p.m.", " on a sunny day. It looks fun",
            " [blurry]", " that cannot be seen", " who's gonna win", " with a 'No Parking' sign",
            "", "", "", "", "", ""]
  endings = ["", "", ".", " .", "!", "!!", "?", ". "]
  captions = []
  for i in range(n):
    if i % 2:
      caption = rng.choice(synthetic.captions_for(synthetic.sample_scene(np_rng, 64)))
      caption = caption.replace(" a ", ", a ", 1) if rng.random() < 0.3 else caption
    else:
      caption = " ".join(rng.choice(words) for words in (subjects, verbs, objects))
      caption += rng.choice(extras)
    caption = caption[0].upper() + caption[1:] if rng.random() < 0.5 else caption
    captions.append(caption + rng.choice(endings))
  return captions


@needs_java
def test_python_ptb_tokenizer_gives_the_java_tokens_on_realistic_captions():
  """All 400 equal (measured; also 3,000 of 3,000). A caption's tokens may depend on the next
  caption's (a single letter before "The"), so they are tokenized together, as COCO does."""
  data = {i: [{"caption": c}] for i, c in enumerate(_realistic_captions(400))}
  got, want = ptb_tokenizer.tokenize(data), ptbtokenizer.PTBTokenizer().tokenize(data)
  differ = [(data[i][0]["caption"], got[i], want[i]) for i in data if got[i] != want[i]]
  assert not differ, f"{len(differ)} of {len(data)} differ, e.g. {differ[:3]}"


@needs_java
def test_without_java_meteor_is_none_and_the_rest_equal_pycocoevalcap(
    corpus, java_tokenized, monkeypatch, tmp_path, caplog):
  monkeypatch.setenv("PATH", str(tmp_path))  # no java on it
  with caplog.at_level(logging.WARNING):
    got = captioning.score(*corpus)
  assert got["METEOR"] is None
  assert [r.getMessage() for r in caplog.records if "java" in r.getMessage()] == [
      "no `java` on PATH: METEOR is not computed; captions are tokenized by capjax's Python "
      "PTB tokenizer"]
  _assert_scores_equal(got, _coco_scores(*java_tokenized, with_meteor=False))
  assert 0.1 < got["Bleu_1"] < 1 and got["CIDEr"] > 0.5


@pytest.mark.slow
@needs_java
def test_with_java_score_equals_pycocoevalcap_with_meteor(corpus, java_tokenized):
  got = captioning.score(*corpus)
  _assert_scores_equal(got, _coco_scores(*java_tokenized, with_meteor=True))
  assert 0.1 < got["METEOR"] < 1


def test_a_missing_pycocoevalcap_is_a_one_line_error(corpus, monkeypatch):
  monkeypatch.setitem(sys.modules, "pycocoevalcap.bleu", None)
  with pytest.raises(ImportError, match=r"^.*pip install 'capjax\[eval\]'$"):
    captioning.score(*corpus)


@pytest.mark.parametrize("candidates, references, message", [
    ({}, {}, "one candidate per id"), ({1: "a"}, {2: ["a"]}, "one candidate per id"),
    ({1: "a"}, {1: []}, "at least one reference")])
def test_mismatched_ids_are_one_line_errors(candidates, references, message):
  with pytest.raises(ValueError, match=message):
    captioning.score(candidates, references)
