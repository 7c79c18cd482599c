"""Compositional hard negatives: the built-in set's ground truth, SugarCrepe's files, scoring."""

import dataclasses
import json
import os

import numpy as np
from PIL import Image
import pytest

from capjax.data import synthetic
from capjax.evals import compositional, hard_negatives as hn
from tests import helpers


def test_every_builtin_negative_is_false_for_its_scene_and_every_positive_true():
  source = synthetic.ShapesSource("test", 300, image_size=32)
  made = {c: 0 for c in hn.CATEGORIES}
  for index in range(300):
    attrs = source[index]["attributes"]
    for category in hn.CATEGORIES:
      pair = hn.hard_negative(category, attrs, np.random.default_rng([1, index]))
      if pair is None:
        continue
      made[category] += 1
      positive, negative = pair
      assert positive != negative and hn.caption_holds(positive, attrs)
      assert not hn.caption_holds(negative, attrs), (category, attrs, negative)
      if category != "add_att":  # add_att's positive leaves one attribute out
        assert positive == source[index]["captions"][0]
      if len(synthetic.parse_caption(negative)["objects"]) == len(hn.stated_objects(negative)):
        # Every phrase complete: synthetic.score_caption agrees it is not fully right, except
        # for a wrong left-to-right order of three objects, which score_caption ignores.
        correct, total = synthetic.score_caption(negative, attrs)
        assert correct < total or attrs["count"] == 3, (category, attrs, negative)
  assert min(made.values()) > 50, made  # every category is made from many scenes


def test_builtin_triples_are_the_generators_pairs_in_scene_order():
  images, triples = hn.builtin_set(32, 6, seed=2)
  source = synthetic.ShapesSource("test", 20_000, image_size=32)
  scene_of_image, index = [], 0
  while len(scene_of_image) < len(images):  # images are the scenes that gave a triple, in order
    if np.array_equal(source[index]["image"], images[len(scene_of_image)]):
      scene_of_image.append(index)
    index += 1
  for items in triples.values():
    for image_index, positive, negative in items:
      attrs = source[scene_of_image[image_index]]["attributes"]
      assert hn.caption_holds(positive, attrs) and not hn.caption_holds(negative, attrs)


def test_caption_holds_on_hand_made_scenes():
  red = {"size": "small", "colour": "red", "shape": "circle"}
  blue = {"size": "large", "colour": "blue", "shape": "square"}
  pair = {"count": 2, "objects": [red, blue], "relation": "left of"}
  assert hn.caption_holds("a small red circle left of a large blue square", pair)
  assert hn.caption_holds("a large blue square right of a small red circle", pair)
  assert not hn.caption_holds("a large blue square left of a small red circle", pair)
  assert hn.caption_holds("a red circle left of a large blue square", pair)  # size left out
  assert not hn.caption_holds("a small red circle", pair)  # one object of two
  twins = {"count": 2, "objects": [red, red], "relation": "above"}
  assert hn.caption_holds("a small red circle below a small red circle", twins)
  three = {"count": 3, "objects": [red, blue, red]}
  assert hn.caption_holds("a small red circle a large blue square and a small red circle", three)
  assert not hn.caption_holds("a large blue square a small red circle and a small red circle",
                              three)  # the listing is left to right


def test_pairwise_accuracy_counts_ties_as_half():
  assert compositional.pairwise_accuracy([3.0, 1.0, 2.0, 0.0], [1.0, 2.0, 2.0, -1.0]) == 0.625


def write_sugarcrepe(root):
  """A tiny SugarCrepe-format dir: two category files, three images (one truncated, one
  missing)."""
  os.makedirs(root / "images")
  for name, colour in (("a.jpg", (200, 30, 30)), ("b.png", (30, 30, 200))):
    Image.new("RGB", (48, 40), colour).save(root / "images" / name)
  (root / "images" / "c.jpg").write_bytes((root / "images" / "a.jpg").read_bytes()[:100])
  (root / "ann").mkdir()
  (root / "ann" / "replace_att.json").write_text(json.dumps({
      "0": {"filename": "a.jpg", "caption": "a small red circle",
            "negative_caption": "a small blue circle"},
      "1": {"filename": "b.png", "caption": "a small blue circle",
            "negative_caption": "a small red circle"},
      "2": {"filename": "c.jpg", "caption": "a small red circle",
            "negative_caption": "a small green circle"}}))
  (root / "ann" / "swap_att.json").write_text(json.dumps({
      "10": {"filename": "missing.jpg", "caption": "x", "negative_caption": "y"},
      "2": {"filename": "b.png", "caption": "a large blue square left of a small red circle",
            "negative_caption": "a large red square left of a small blue circle"}}))


def test_sugarcrepe_files_load_with_images_resized_and_bad_ones_counted(tmp_path):
  write_sugarcrepe(tmp_path)
  images, triples, skipped = compositional.load_sugarcrepe(
      str(tmp_path / "ann"), str(tmp_path / "images"), 32, "center_crop")
  assert images.shape == (2, 32, 32, 3)
  np.testing.assert_allclose(images[0, 0, 0], [200, 30, 30], atol=4)  # JPEG
  assert list(triples) == ["replace_att", "swap_att"]
  assert triples["replace_att"] == [(0, "a small red circle", "a small blue circle"),
                                    (1, "a small blue circle", "a small red circle")]
  assert triples["swap_att"] == [(1, "a large blue square left of a small red circle",
                                  "a large red square left of a small blue circle")]
  assert skipped == {"corrupt_image": 1, "missing_file": 1}
  with pytest.raises(FileNotFoundError, match="No SugarCrepe file in"):
    compositional.load_sugarcrepe(str(tmp_path / "images"), str(tmp_path / "images"), 32,
                                  "center_crop")
  with pytest.raises(FileNotFoundError, match="--images_dir='' is not a folder"):
    compositional.load_sugarcrepe(str(tmp_path / "ann"), "", 32, "center_crop")


@pytest.fixture(scope="module")
def zero_model(tmp_path_factory):
  """All params zero: every token is uniform, so a caption's likelihood is −length·log V
  whatever the image: the language-bias case the prior removes."""
  config = helpers.tiny_config()
  model = helpers.untrained(config, tmp_path_factory.mktemp("tok") / "tok.model")
  return dataclasses.replace(model, params=helpers.filled_params(config, np.zeros))


def test_prior_removes_the_length_bias_of_an_image_blind_model(zero_model, tmp_path, capsys):
  metrics = compositional.compositional(zero_model, num_per_category=8, prior_images=2,
                                        baseline=False, batch_size=64,
                                        plot=str(tmp_path / "bars.png"))
  trained = metrics["trained"]
  assert list(trained) == list(hn.CATEGORIES) and metrics["num_triples"]["swap_att"] == 8
  _, triples = hn.builtin_set(32, 8)
  length = lambda c: int(np.sum(zero_model.tokenizer.encode(c, 24) != 0))
  for category, row in trained.items():
    assert row["normalized"] == 0.5, (category, row)  # every pair ties
    # On likelihood alone the shorter caption wins ("left of" is two tokens, "above" one).
    expected = compositional.pairwise_accuracy([-length(p) for _, p, _ in triples[category]],
                                               [-length(q) for _, _, q in triples[category]])
    assert row["likelihood"] == expected, (category, row)
    if category.startswith("add"):
      assert expected == 1.0
  err = capsys.readouterr().err
  assert "compositional trained normalized" in err and "replace_rel" in err
  assert Image.open(tmp_path / "bars.png").size[0] > 100


def test_evaluator_reads_a_sugarcrepe_dir(zero_model, tmp_path):
  write_sugarcrepe(tmp_path)
  metrics = compositional.compositional(
      zero_model, sugarcrepe_dir=str(tmp_path / "ann"), images_dir=str(tmp_path / "images"),
      prior_images=2, baseline=False, batch_size=64)
  assert metrics["set"] == "sugarcrepe" and metrics["num_triples"] == {"replace_att": 2,
                                                                       "swap_att": 1}
  assert metrics["skipped"] == {"corrupt_image": 1, "missing_file": 1}
  assert metrics["trained"]["replace_att"] == {"likelihood": 0.5, "normalized": 0.5}
  json.dumps(metrics)
