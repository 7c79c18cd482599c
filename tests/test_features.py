"""Stored frozen-tower features (capjax/data/features.py, tools/precompute_features.py): records
in index order with skip markers, the run's tower checked, the same batches as from the images,
and (slow) the same loss curve as running the tower every step."""

import json

import numpy as np
import pytest

from capjax import config as config_lib, train
from capjax.data import features, pipeline, registry, synthetic
from tests import helpers
from tools import precompute_features

TINY = """
from capjax import config as config_lib


def get_config():
  c = config_lib.load_preset("clip_prefix_small")
  c.data.split_sizes = {"train": 48, "val": 16, "test": 16}
  c.model.vision.update(width=32, depth=1, num_heads=2, mlp_dim=64, projection_dim=16)
  c.model.lm.update(width=32, depth=1, num_heads=2, mlp_dim=64)
  c.model.mapper.update(prefix_len=3, noise_std=0.1)  # noise from the step's rng, both ways
  c.data.update(image_size=32, num_threads=1)
  c.dtype = "float32"
  c.train.update(num_steps=8, batch_size=8, log_every=1)
  c.eval.every = 0
  c.checkpoint.every = 0
  c.schedule.warmup_steps = 2
  c.wandb.mode = "disabled"
  return c
"""


@pytest.fixture
def tiny_config_file(tmp_path):
  path = tmp_path / "tiny_clip_prefix.py"
  path.write_text(TINY)
  return str(path)


def test_records_keep_the_source_order_and_mark_skipped_items(tmp_path):
  config = helpers.prefix_config("clip_prefix_small")
  items = [(np.full((4,), i, np.float32), [f"caption {i}"]) for i in range(7)]
  items[3] = (None, "truncated_image")
  tower = features.tower_description(config)
  assert features.write_split(str(tmp_path), "train", iter(items), 7, (4,), tower, 3) == 7
  assert len(list(tmp_path.glob("train.array_record-*-of-00003"))) == 3
  source = features.FeatureSource(str(tmp_path), "train")
  assert len(source) == 7 and source[3] is None and source.skips.as_dict() == {
      "truncated_image": 1}
  for i in (0, 2, 4, 6):
    np.testing.assert_array_equal(source[i]["features"], np.full((4,), i))
    assert source[i]["captions"] == [f"caption {i}"]
  info = json.loads((tmp_path / "features.json").read_text())
  assert info["splits"] == {"train": 7} and info["shape"] == [4]
  with pytest.raises(FileExistsError, match="already has 'train' features"):
    features.write_split(str(tmp_path), "train", iter(items), 7, (4,), tower)


def test_a_run_with_another_tower_is_refused_in_one_line(tmp_path):
  config = helpers.prefix_config("clip_prefix_small")
  features.write_split(str(tmp_path), "train", iter([(np.zeros(16), ["a"])]), 1, (16,),
                       features.tower_description(config))
  features.check_fits(str(tmp_path), config, (16,))
  for key, value, match in (("seed", 3, "computed with seed=0; this run has 3"),
                            ("model.vision.depth", 2, "computed with vision=")):
    other = helpers.prefix_config("clip_prefix_small", **{key: value})
    with pytest.raises(config_lib.ConfigError, match=match) as e:
      features.check_fits(str(tmp_path), other, (16,))
    assert "\n" not in str(e.value)
  with pytest.raises(config_lib.ConfigError, match=r"shape \(16,\); this run's tower gives"):
    features.check_fits(str(tmp_path), config, (8,))
  with pytest.raises(pipeline.DataNotFoundError, match="has no features.json"):
    features.check_fits(str(tmp_path / "none"), config, (16,))


def test_training_batches_pick_the_same_captions_as_from_the_images(tmp_path, tiny_config_file):
  config = config_lib.load(tiny_config_file)
  source = registry.get_source(config.data, "train")
  assert isinstance(source, synthetic.ShapesSource) and len(source) == 48
  features.write_split(str(tmp_path / "f"), "train",
                       ((np.full((16,), i, np.float32), source[i]["captions"])
                        for i in range(48)), 48, (16,), features.tower_description(config))
  with_features = config_lib.load(tiny_config_file, [f"--config.data.features={tmp_path / 'f'}"])
  tok = helpers.untrained(config, tmp_path / "tok.model").tokenizer
  images = iter(pipeline.train_dataset(config, tok.path))
  stored = iter(pipeline.train_dataset(with_features, tok.path))
  for _ in range(8):  # over an epoch boundary (48 = 6 batches)
    a, b = next(images), next(stored)
    assert set(a) == {"image", "tokens"} and set(b) == {"features", "tokens"}
    np.testing.assert_array_equal(a["tokens"], b["tokens"])
    assert b["features"].shape == (8, 16)


@pytest.mark.slow
def test_training_from_stored_features_follows_the_same_loss_curve(tmp_path, tiny_config_file):
  precompute_features.main([f"--config={tiny_config_file}", f"--workdir={tmp_path / 'b'}",
                            f"--output={tmp_path / 'features'}", "--batch_size=16"])
  train.train(config_lib.load(tiny_config_file), str(tmp_path / "a"))
  train.train(config_lib.load(tiny_config_file,
                              [f"--config.data.features={tmp_path / 'features'}"]),
              str(tmp_path / "b"))
  curves = []
  for run in ("a", "b"):
    rows = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text()
            .splitlines()]
    curves.append([r["train/loss"] for r in rows if "train/loss" in r])
  assert len(curves[0]) == 8
  np.testing.assert_allclose(curves[1], curves[0], atol=1e-5, rtol=0)
  assert curves[0][-1] < curves[0][0]


def test_a_task_without_stored_features_refuses_data_features(tmp_path):
  from capjax import setup as setup_lib  # pylint: disable=g-import-not-at-top
  from capjax.data import tokenizer  # pylint: disable=g-import-not-at-top
  config = helpers.tiny_config(**{"data.features": str(tmp_path)})
  with pytest.raises(config_lib.ConfigError, match="task=cappa trains on images"):
    setup_lib.assemble(config, tokenizer.SENTENCEPIECE_IDS)
