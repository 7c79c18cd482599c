"""Presets load by name or path; overrides are typed; unknown keys are one-line errors."""

import pytest

from capjax import config as config_lib

PRESETS = ["shapes_tiny", "flickr_small", "cappa_b16", "cappa_l16_datacomp"]


@pytest.mark.parametrize("name", PRESETS)
def test_presets_have_the_shared_keys(name):
  c = config_lib.load(name)
  for key in ("seed", "dtype", "data.name", "data.dir", "data.image_size", "train.num_steps",
              "train.batch_size", "train.log_every", "eval.every", "checkpoint.every",
              "checkpoint.keep", "optimizer.name", "schedule.name", "mesh.data", "mesh.fsdp",
              "mesh.tensor", "wandb.mode", "objective.masked_pred_prob"):
    node = c
    for part in key.split("."):
      node = node[part]


def test_load_by_path_and_typed_overrides():
  c = config_lib.load(str(config_lib.CONFIG_DIR / "shapes_tiny.py"), [
      "--config.train.num_steps=7", "--config.schedule.peak_lr=1", "--config.dtype=float32",
      "--config.wandb.mode=disabled", "--config.mesh.fsdp=-1", "--config.data.num_workers=0"])
  assert c.train.num_steps == 7 and isinstance(c.train.num_steps, int)
  assert c.schedule.peak_lr == 1.0 and isinstance(c.schedule.peak_lr, float)
  assert c.dtype == "float32" and c.mesh.fsdp == -1


@pytest.mark.parametrize("arg,fragment", [
    ("--config.foo=1", "'foo'"),
    ("--config.train.nope=1", "'train.nope'"),
    ("--config.train.num_steps=abc", "train.num_steps"),
    ("--bogus", "--bogus"),
])
def test_bad_overrides_are_one_line_errors(arg, fragment):
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.load("shapes_tiny", [arg])
  assert fragment in str(e.value) and "\n" not in str(e.value)


def test_unknown_preset_lists_known_ones():
  with pytest.raises(config_lib.ConfigError, match="shapes_tiny"):
    config_lib.load("no_such_preset")
