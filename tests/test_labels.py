"""Label sets for the classification evals, read from the built-in shapes data."""

import numpy as np
import pytest

from capjax.data import synthetic
from capjax.evals import labels
from tests import helpers


class _NoTokens:
  def encode(self, caption, max_len):
    return np.zeros(max_len + 1, np.int32)


def test_shapes_label_sets_match_the_scenes():
  config = helpers.tiny_config()
  sets = labels.labelled_images(config, _NoTokens(), "test", 48, batch_size=16)
  assert set(sets) == {"shape", "colour", "size", "count"}
  assert len(sets["count"].labels) == 48 and sets["count"].classes == ("one", "two", "three")
  source = synthetic.ShapesSource("test", 48, image_size=config.data.image_size,
                                  seed=config.data.get("seed", 0))
  singles = [i for i in range(48) if source[i]["attributes"]["count"] == 1]
  assert 5 <= len(singles) < 48 and len(sets["shape"].labels) == len(singles)
  for row, index in enumerate(singles):
    obj = source[index]["attributes"]["objects"][0]
    assert sets["shape"].classes[sets["shape"].labels[row]] == obj["shape"]
    assert sets["colour"].classes[sets["colour"].labels[row]] == obj["colour"]
    np.testing.assert_array_equal(sets["shape"].images_uint8[row], source[index]["image"])


def test_a_source_without_labels_is_a_one_line_error():
  config = helpers.tiny_config(**{"data.name": "flickr8k"})
  with pytest.raises(ValueError, match="has no class labels"):
    labels.label_classes(config, [{"image": None, "captions": ["a"]}])
