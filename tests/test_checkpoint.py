"""Checkpointer: retention, exact data position, incomplete / corrupt / mismatched
checkpoints, restoring onto other meshes, and the params-only export."""

import json
import logging
import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

from capjax import checkpoint, setup as setup_lib, sharding, train, trained, workdir as workdir_lib
from capjax.data import pipeline, tokenizer as tokenizer_lib
from tests.helpers import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Setup:
  """A tiny model's train state on one device, with what it takes to rebuild it."""

  def __init__(self, init: bool = True, **overrides):
    self.config = tiny_config(**overrides)
    self.mesh = sharding.make_mesh(
        ml_collections.ConfigDict({"data": 1, "fsdp": 1, "tensor": 1}), jax.devices()[:1])
    self.run = setup_lib.assemble(self.config, tokenizer_lib.SENTENCEPIECE_IDS, self.mesh)
    self.model = self.run.task.model
    if init:
      self.state = self.run.init_state()

  def abstract(self):
    with self.run.context():
      return self.run.abstract_state()

  def restore(self, directory, data_iter=None):
    with self.run.context():
      return checkpoint.Checkpointer(directory).restore(self.abstract(), data_iter)


@pytest.fixture(scope="module")
def setup():
  return Setup()


def bitwise_equal(a, b) -> bool:
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  return len(leaves_a) == len(leaves_b) and all(
      np.asarray(x).tobytes() == np.asarray(y).tobytes() for x, y in zip(leaves_a, leaves_b))


def save_steps(directory, state, steps, **kwargs):
  ckpt = checkpoint.Checkpointer(directory, **kwargs)
  for step in steps:
    ckpt.save(step, state)
  ckpt.close()


def corrupt(step_dir):
  """Overwrites every file of a saved state with garbage (a bad disk, a partial copy)."""
  for root, _, files in os.walk(os.path.join(step_dir, "state")):
    for name in files:
      with open(os.path.join(root, name), "wb") as f:
        f.write(b"\x00garbage")


def test_keeps_last_n_and_every_kth(tmp_path):
  state = {"w": np.arange(3.0)}
  save_steps(tmp_path, state, range(1, 11), keep=2, keep_period=4)
  assert checkpoint.Checkpointer(tmp_path).all_steps() == [4, 8, 9, 10]


def test_restore_is_exact_including_the_data_position(tmp_path, setup):
  config = setup.config
  tok = train.ensure_tokenizer(config, str(tmp_path))
  it = iter(pipeline.train_dataset(config, tok.path))
  for _ in range(3):
    next(it)
  ckpt = checkpoint.Checkpointer(tmp_path / "ckpt")
  ckpt.save(3, setup.state, it, config, {"skipped_steps": 2})
  ckpt.close()
  expected = [next(it) for _ in range(2)]

  fresh = iter(pipeline.train_dataset(config, tok.path))
  state, step, meta = setup.restore(tmp_path / "ckpt", fresh)
  assert (step, meta) == (3, {"skipped_steps": 2})
  assert bitwise_equal(state, setup.state)
  for want in expected:
    got = next(fresh)
    np.testing.assert_array_equal(got["image"], want["image"])
    np.testing.assert_array_equal(got["tokens"], want["tokens"])
  assert checkpoint.saved_config(tmp_path / "ckpt").model.width == config.model.width


def test_incomplete_checkpoint_is_ignored_with_a_warning(tmp_path, setup, caplog):
  save_steps(tmp_path, setup.state, [1])
  # What a crash mid-save leaves: orbax's temporary directory, never renamed to "2".
  (tmp_path / "2.orbax-checkpoint-tmp-1700000000").mkdir()
  with caplog.at_level(logging.WARNING):
    ckpt = checkpoint.Checkpointer(tmp_path)
  assert ckpt.latest_step() == 1
  assert "ignoring incomplete checkpoint" in caplog.text and "2.orbax" in caplog.text
  assert setup.restore(tmp_path)[1] == 1


def test_corrupt_latest_falls_back_to_the_previous_one(tmp_path, setup, caplog):
  save_steps(tmp_path, setup.state, [1, 2])
  corrupt(tmp_path / "2")
  with caplog.at_level(logging.WARNING):
    state, step, _ = setup.restore(tmp_path)
  assert step == 1 and bitwise_equal(state, setup.state)
  assert "checkpoint" in caplog.text and "could not be restored" in caplog.text
  assert (tmp_path / "2.corrupt").is_dir() and not (tmp_path / "2").exists()
  save_steps(tmp_path, setup.state, [2])  # the step can be written again
  assert checkpoint.Checkpointer(tmp_path).all_steps() == [1, 2]


def test_no_restorable_checkpoint_is_an_error(tmp_path, setup):
  save_steps(tmp_path, setup.state, [1])
  corrupt(tmp_path / "1")
  with pytest.raises(checkpoint.NoUsableCheckpointError, match="could be restored"):
    setup.restore(tmp_path)


def test_model_size_mismatch_names_the_first_parameter(tmp_path, setup):
  save_steps(tmp_path, setup.state, [5])
  bigger = Setup(init=False, **{"model.width": 48})
  with pytest.raises(checkpoint.CheckpointMismatchError) as info:
    bigger.restore(tmp_path)
  message = str(info.value)
  assert "\n" not in message
  first = next(name for name, shape in checkpoint.flat_shapes(bigger.abstract()).items()
               if checkpoint.flat_shapes(setup.state)[name] != shape)
  assert f"{first} is " in message and message.startswith("Checkpoint")
  assert str(checkpoint.flat_shapes(setup.state)[first]) in message
  assert str(checkpoint.flat_shapes(bigger.abstract())[first]) in message
  assert (tmp_path / "5").is_dir()  # a mismatch is not corruption: nothing was moved


@pytest.mark.slow
def test_restores_onto_other_meshes(tmp_path):
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
         "JAX_PLATFORMS": "cpu"}
  out = subprocess.run([sys.executable, "-m", "tests.checkpoint_worker", str(tmp_path)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  report = json.loads(out.stdout.strip().splitlines()[-1])
  assert report["saved_sharded_leaves"] > 0
  for mesh, devices in (("2,4,1", 8), ("1,1,1", 1)):
    assert report[mesh]["step"] == 7
    assert report[mesh]["bitwise_equal"], report
    assert report[mesh]["in_target_layout"], report
    assert report[mesh]["num_devices"] == devices
  assert report["2,4,1"]["sharded_leaves"] > 0


def test_export_gives_the_same_logits_as_the_training_state(tmp_path, setup):
  workdir, out = tmp_path / "run", tmp_path / "export"
  train.ensure_tokenizer(setup.config, str(workdir))
  ckpt = checkpoint.Checkpointer(workdir_lib.checkpoints(workdir))
  ckpt.save(9, setup.state, config=setup.config)
  ckpt.close()
  proc = subprocess.run(
      [sys.executable, "tools/export.py", f"--workdir={workdir}", f"--output={out}"],
      cwd=ROOT, capture_output=True, text=True, timeout=300,
      env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert sorted(os.listdir(out)) == ["config.json", "export.json", "params", "tokenizer.model"]
  assert not any("opt_state" in name for _, dirs, files in os.walk(out) for name in dirs + files)

  exported = trained.load_exported(str(out))
  assert exported.step == 9 and exported.tokenizer.vocab_size > 0
  assert bitwise_equal(trained.load(str(out)).params, exported.params)
  assert exported.config.model.to_dict() == setup.config.model.to_dict()
  images, tokens, mask = setup.run.task.init_inputs()
  images = images + np.linspace(-1, 1, images.size, dtype=np.float32).reshape(images.shape)
  tokens = tokens + np.arange(tokens.shape[1], dtype=np.int32) % 7 + 3
  logits = jax.jit(lambda params: setup.model.apply({"params": params}, images, tokens, mask))
  want = np.asarray(logits(setup.state.params))
  np.testing.assert_array_equal(np.asarray(logits(exported.params)), want)
  np.testing.assert_array_equal(np.asarray(logits(trained.load(str(workdir)).params)), want)
