"""Checkpoint integrity: checksums written at save and verified at restore, damage told apart
from mismatches and transient errors, the data-iterator state required for an exact resume,
and the verified fallback in export and `trained.load`."""

import errno
import logging
import os
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from capjax import checkpoint, train, trained, workdir as workdir_lib
from capjax.data import pipeline
from tests.test_checkpoint import ROOT, Setup, bitwise_equal, save_steps


@pytest.fixture(scope="module")
def setup():
  return Setup()


def largest_state_file(step_dir) -> str:
  files = [os.path.join(root, name) for root, _, names in os.walk(os.path.join(step_dir, "state"))
           for name in names]
  return max(files, key=os.path.getsize)


def flip_a_byte(path, offset: int = 100):
  """A bit rot: one byte changes, the size does not."""
  with open(path, "r+b") as f:
    f.seek(offset)
    byte = f.read(1)[0]
    f.seek(offset)
    f.write(bytes([byte ^ 0x5A]))


def truncate(path):
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


def other_state(setup):
  """A state that differs from `setup.state` in every param."""
  return setup.state.replace(params=jax.tree.map(lambda x: x + 1, setup.state.params))


def test_every_committed_checkpoint_has_a_manifest_that_verifies(tmp_path, setup):
  save_steps(tmp_path, setup.state, [1, 2])
  for step in (1, 2):
    step_dir = workdir_lib.path(tmp_path / str(step))
    manifest = checkpoint.read_manifest(step_dir)
    assert any(name.startswith("state/") for name in manifest)
    assert checkpoint.verify_files(step_dir) is True


def test_a_flipped_byte_is_damage_and_the_previous_checkpoint_is_restored(tmp_path, setup,
                                                                          caplog):
  save_steps(tmp_path, setup.state, [1])
  save_steps(tmp_path, other_state(setup), [2])
  flip_a_byte(largest_state_file(tmp_path / "2"))
  with caplog.at_level(logging.WARNING):
    state, step, _ = setup.restore(tmp_path)
  assert step == 1 and bitwise_equal(state, setup.state)
  assert "differs from its checksum" in caplog.text
  assert (tmp_path / "2.corrupt").is_dir() and not (tmp_path / "2").exists()


def test_a_state_with_non_finite_values_is_damage(tmp_path, setup, caplog):
  save_steps(tmp_path, setup.state, [1])
  nan_params = jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(np.nan), setup.state.params)
  save_steps(tmp_path, setup.state.replace(params=nan_params), [2])
  with caplog.at_level(logging.WARNING):
    state, step, _ = setup.restore(tmp_path)
  assert step == 1 and bitwise_equal(state, setup.state)
  assert "non-finite values in params/" in caplog.text
  assert (tmp_path / "2.corrupt").is_dir()


def test_truncated_files_fall_back_without_a_flood_of_event_loop_errors(tmp_path, setup, capfd,
                                                                       monkeypatch):
  # Before checksums, orbax failed mid-read on these, leaving tensorstore reads that later
  # called back into a closed asyncio loop: "RuntimeError: Event loop is closed" tracebacks
  # (timing-dependent, so the test also checks the cause: orbax never reads a damaged step).
  read_by_orbax = []
  orbax_restore = ocp.CheckpointManager.restore

  def spy(manager, step, *args, **kwargs):
    read_by_orbax.append(step)
    return orbax_restore(manager, step, *args, **kwargs)

  monkeypatch.setattr(ocp.CheckpointManager, "restore", spy)
  for name in ("meta/metadata", "state/_sharding", "state/manifest.ocdbt"):
    directory = tmp_path / name.replace("/", "_")
    save_steps(directory, setup.state, [1, 2])
    truncate(directory / "2" / name)
    read_by_orbax.clear()
    assert setup.restore(directory)[1] == 1
    assert sorted(os.listdir(directory)) == ["1", "2.corrupt"]
    assert 2 not in read_by_orbax and 1 in read_by_orbax, (name, read_by_orbax)
  err = capfd.readouterr().err
  assert "Event loop is closed" not in err and "Traceback" not in err


def test_a_transient_error_is_raised_as_it_is_and_nothing_is_renamed(tmp_path, setup):
  save_steps(tmp_path, setup.state, [1, 2])
  ckpt = checkpoint.Checkpointer(tmp_path)

  def unreachable(*args, **kwargs):
    raise ConnectionResetError(errno.ECONNRESET, "connection reset by peer")

  ckpt.manager.restore = unreachable
  with setup.run.context(), pytest.raises(ConnectionResetError):
    ckpt.restore(setup.abstract())
  assert sorted(os.listdir(tmp_path)) == ["1", "2"]


def data_iterator(config, tok, position: int = 0):
  it = iter(pipeline.train_dataset(config, tok.path))
  for _ in range(position):
    next(it)
  return it


@pytest.fixture(scope="module")
def tokenizer(setup, tmp_path_factory):
  return train.ensure_tokenizer(setup.config, str(tmp_path_factory.mktemp("tok")))


def test_a_data_pipeline_that_does_not_fit_is_a_one_line_refusal(tmp_path, setup, tokenizer):
  ckpt = checkpoint.Checkpointer(tmp_path)
  ckpt.save(3, setup.state, data_iterator(setup.config, tokenizer, 3), setup.config)
  ckpt.close()
  workers = Setup(init=False, **{"data.num_workers": 2})
  it = data_iterator(workers.config, tokenizer)
  with pytest.raises(checkpoint.CheckpointMismatchError) as info:
    workers.restore(tmp_path, it)
  message = str(info.value)
  assert "\n" not in message and "data.num_workers" in message and f"{tmp_path}/3" in message
  assert sorted(os.listdir(tmp_path)) == ["3"]  # a mismatch is not damage: nothing moved


def test_a_checkpoint_without_data_state_is_refused_naming_the_key(tmp_path, setup, tokenizer,
                                                                   caplog):
  save_steps(tmp_path, setup.state, [4])  # saved without a data iterator
  with pytest.raises(checkpoint.DataStateError) as info:
    setup.restore(tmp_path, data_iterator(setup.config, tokenizer))
  message = str(info.value)
  assert "\n" not in message and "checkpoint.allow_data_restart=True" in message
  assert sorted(os.listdir(tmp_path)) == ["4"]

  with setup.run.context(), caplog.at_level(logging.WARNING):
    state, step, _ = checkpoint.Checkpointer(tmp_path).restore(
        setup.abstract(), data_iterator(setup.config, tokenizer), allow_data_restart=True)
  assert step == 4 and bitwise_equal(state, setup.state)
  assert "input pipeline starts from its beginning" in caplog.text


def test_a_lost_data_state_file_falls_back_to_a_checkpoint_that_has_it(tmp_path, setup,
                                                                        tokenizer):
  ckpt = checkpoint.Checkpointer(tmp_path)
  it = data_iterator(setup.config, tokenizer, 2)
  ckpt.save(2, setup.state, it, setup.config)
  ckpt.wait()
  expected = next(it)
  ckpt.save(3, other_state(setup), it, setup.config)
  ckpt.close()
  os.remove(tmp_path / "3" / "data" / "process_0-of-1.json")

  fresh = data_iterator(setup.config, tokenizer)
  state, step, _ = setup.restore(tmp_path, fresh)
  assert step == 2 and bitwise_equal(state, setup.state)
  np.testing.assert_array_equal(next(fresh)["tokens"], expected["tokens"])  # exact position
  assert (tmp_path / "3.corrupt").is_dir()


@pytest.fixture
def run_with_two_checkpoints(tmp_path, setup):
  """A workdir with a tokenizer and checkpoints 1 (`setup.state`) and 2 (another state)."""
  workdir = tmp_path / "run"
  train.ensure_tokenizer(setup.config, str(workdir))
  ckpt = checkpoint.Checkpointer(workdir_lib.checkpoints(workdir))
  ckpt.save(1, setup.state, config=setup.config)
  ckpt.save(2, other_state(setup), config=setup.config)
  ckpt.close()
  return workdir


def test_load_and_export_fall_back_from_a_damaged_checkpoint(run_with_two_checkpoints, setup,
                                                             tmp_path, caplog):
  workdir = run_with_two_checkpoints
  flip_a_byte(largest_state_file(workdir_lib.checkpoints(workdir) / "2"))
  with caplog.at_level(logging.WARNING):
    loaded = trained.load(str(workdir))
  assert loaded.step == 1 and bitwise_equal(loaded.params, setup.state.params)
  assert "is damaged" in caplog.text and "using checkpoint" in caplog.text
  assert trained.export(str(workdir), str(tmp_path / "out")) == 1
  assert bitwise_equal(trained.load(str(tmp_path / "out")).params, setup.state.params)
  with pytest.raises(checkpoint.CheckpointDamagedError, match="differs from its checksum"):
    trained.load(str(workdir), step=2)
  assert sorted(os.listdir(workdir_lib.checkpoints(workdir))) == ["1", "2"]  # read-only


def test_export_with_no_intact_checkpoint_is_a_one_line_error(run_with_two_checkpoints,
                                                              tmp_path):
  ckpt_dir = workdir_lib.checkpoints(run_with_two_checkpoints)
  truncate(largest_state_file(ckpt_dir / "1"))
  flip_a_byte(largest_state_file(ckpt_dir / "2"))
  proc = subprocess.run(
      [sys.executable, "tools/export.py", f"--workdir={run_with_two_checkpoints}",
       f"--output={tmp_path / 'out'}"], cwd=ROOT, capture_output=True, text=True, timeout=300,
      env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr and "Event loop is closed" not in proc.stderr
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: No intact checkpoint in ") and "[2, 1]" in last, last
  assert not (tmp_path / "out").exists()
