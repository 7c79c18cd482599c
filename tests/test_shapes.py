"""The built-in shapes data: deterministic, split-separated, captions that state every attribute."""

import numpy as np

from capjax.data import synthetic, tokenizer


def test_deterministic_and_splits_differ():
  a, b = synthetic.ShapesSource("train", 100), synthetic.ShapesSource("train", 100)
  np.testing.assert_array_equal(a[7]["image"], b[7]["image"])
  assert a[7]["captions"] == b[7]["captions"]
  test = synthetic.ShapesSource("test", 100)
  assert not np.array_equal(a[7]["image"], test[7]["image"])


def test_every_paraphrase_scores_perfectly_and_wrong_ones_do_not():
  src = synthetic.ShapesSource("val", 300)
  counts = set()
  for i in range(300):
    r = src[i]
    counts.add(r["attributes"]["count"])
    assert len(r["captions"]) == 4
    for c in r["captions"]:
      correct, total = synthetic.score_caption(c, r["attributes"])
      assert correct == total
  assert counts == {1, 2, 3}
  r = next(src[i] for i in range(300) if src[i]["attributes"]["count"] == 2)
  rel = r["attributes"]["relation"]
  wrong = r["captions"][0].replace(rel, synthetic.RELATIONS[rel])
  correct, total = synthetic.score_caption(wrong, r["attributes"])
  assert correct == total - 1
  assert synthetic.score_caption("", r["attributes"])[0] == 0


def test_relation_follows_geometry():
  assert synthetic.relation(np.array([10., 30.]), np.array([40., 32.])) == "left of"
  assert synthetic.relation(np.array([30., 5.]), np.array([32., 40.])) == "above"


def test_tokenizer_roundtrip_and_special_ids(tmp_path):
  src = synthetic.ShapesSource("train", 500)
  captions = [c for i in range(500) for c in src[i]["captions"]]
  tok = tokenizer.train(captions, str(tmp_path / "tok.model"), 64, "word")
  assert tok.vocab_size <= 64
  special = tok.special
  assert special == tokenizer.SENTENCEPIECE_IDS  # what abstract runs (plan_pod, bench) assume
  assert len({special.pad, special.bos, special.eos, special.mask}) == 4
  ids = tok.encode(captions[0], max_len=24)
  assert ids.shape == (25,) and ids[0] == special.bos and special.eos in ids
  assert tok.decode(ids[1:]) == captions[0]
  truncated = tok.encode(captions[0], max_len=4)
  assert truncated[-1] == special.eos or special.eos in truncated
