"""Never lose a run, the loop's side: nothing non-finite committed, a workdir lock, honest
refusals (validated configs, no silent restart, a bad tokenizer file), a data pipeline that
yields nothing, a stop honoured within two steps, and an exit code that tells a stop from done."""

import csv
import errno
import json
import os
import signal
import socket
import subprocess
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from capjax import config as config_lib, setup as setup_lib, sharding, train
from capjax import workdir as workdir_lib
from capjax.data import tokenizer as tokenizer_lib
from tests import helpers, train_cli


def tiny(**overrides):
  return helpers.tiny_config(**{"train.num_steps": 2, "train.log_every": 1, "eval.every": 0,
                                **overrides})


def finite(tree) -> bool:
  return all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(tree)
             if np.issubdtype(np.asarray(x).dtype, np.floating))


# ---------------------------------------------------------------- 3: non-finite updates


@pytest.mark.slow
def test_an_overflowing_update_is_never_committed(tmp_path):
  config = tiny(**{"schedule.name": "constant", "schedule.peak_lr": 1e39,
                   "train.max_consecutive_skips": 0})
  initial = setup_lib.assemble(config, helpers.task(config).special).init_state()
  state, _ = train.train(config, str(tmp_path / "run"))
  assert finite(state.params) and finite(state.opt_state)
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(state.params),
                                                  jax.tree.leaves(initial.params)))
  rows = [json.loads(r) for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  assert [r["train/skipped_steps"] for r in rows if "train/loss" in r] == [1, 2]
  assert all(np.isfinite(r["train/loss"]) for r in rows if "train/loss" in r)


# ---------------------------------------------------------------- 4: the workdir lock


def write_lock(workdir, pid: int, host: str | None = None):
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, workdir_lib.LOCK), "w") as f:
    json.dump({"host": host or socket.gethostname(), "pid": pid, "started": time.time(),
               "token": "other"}, f)


def test_a_second_trainer_on_a_workdir_exits_2_naming_the_holder(tmp_path, capsys):
  workdir = str(tmp_path / "run")
  holder = subprocess.Popen(["sleep", "60"])
  try:
    write_lock(workdir, holder.pid)
    with pytest.raises(SystemExit) as exit_info:
      train.main(["--config=shapes_tiny", f"--workdir={workdir}", "--config.train.num_steps=1",
                  "--config.wandb.mode=disabled"])
  finally:
    holder.kill()
  assert exit_info.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and f"in use by pid {holder.pid} on {socket.gethostname()}" in err[0], err
  assert os.listdir(workdir) == [workdir_lib.LOCK]  # nothing else written


@pytest.mark.slow
def test_a_lock_left_by_a_dead_process_is_taken_over_and_released(tmp_path):
  workdir = str(tmp_path / "run")
  gone = subprocess.Popen(["true"])
  gone.wait()
  write_lock(workdir, gone.pid)
  state, _ = train.train(tiny(**{"train.num_steps": 1}), workdir)
  assert int(state.step) == 1
  assert not os.path.exists(os.path.join(workdir, workdir_lib.LOCK))  # released at the end


def test_a_lock_from_another_host_is_reported_not_broken(tmp_path):
  workdir = str(tmp_path / "run")
  write_lock(workdir, 1, host="some-other-host")
  with pytest.raises(workdir_lib.WorkdirLockedError, match="pid 1 on some-other-host"):
    train.train(tiny(), workdir)


# ---------------------------------------------------------------- 8, 9: validated configs


@pytest.mark.parametrize("override,message", [
    ("train.log_every=0", "train.log_every=0 is out of range: expected >= 1"),
    ("train.num_steps=-5", "train.num_steps=-5 is out of range: expected >= 1"),
    ("objective.masked_pred_prob=1.5", "objective.masked_pred_prob=1.5 is out of range"),
    ("data.image_size=60", "data.image_size=60 is not divisible by model.patch_size=8"),
    ("train.batch_size=0", "train.batch_size=0 is out of range"),
    ("checkpoint.keep=-1", "checkpoint.keep=-1 is out of range: expected >= 0"),
    ("mesh.fsdp=0", "mesh.fsdp=0 is out of range"),
    ("model.width=130", "model.width=130 is not divisible by model.num_heads=4"),
])
def test_out_of_range_values_are_refused_at_load(override, message):
  with pytest.raises(config_lib.ConfigError, match=message.replace("[", r"\[")):
    config_lib.load("shapes_tiny", [f"--config.{override}"])


def test_a_bad_value_exits_2_in_one_line_before_the_workdir_exists(tmp_path, capsys):
  with pytest.raises(SystemExit) as exit_info:
    train.main(["--config=shapes_tiny", f"--workdir={tmp_path / 'run'}",
                "--config.train.log_every=0"])
  assert exit_info.value.code == 2
  assert len(capsys.readouterr().err.strip().splitlines()) == 1
  assert not (tmp_path / "run").exists()


def test_mesh_and_batch_must_fit_the_devices(tmp_path):
  with pytest.raises(config_lib.ConfigError, match="needs 2 devices, found 1"):
    train.train(tiny(**{"mesh.data": 2}), str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()
  config = tiny(**{"mesh.data": 8, "train.batch_size": 12})
  with pytest.raises(config_lib.ConfigError, match="batch_size=12 does not split over the 8"):
    sharding.check_devices(config, 8)
  sharding.check_devices(tiny(**{"mesh.data": 4, "train.batch_size": 12}), 8 // 2)


def test_a_tokenizer_larger_than_the_model_vocabulary_is_a_config_error(tmp_path):
  with pytest.raises(config_lib.ConfigError, match="raise model.vocab_size"):
    train.train(tiny(**{"model.vocab_size": 16}), str(tmp_path / "run"))


def test_a_workdir_named_like_a_preset_is_not_taken_for_the_config(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  (tmp_path / "shapes_tiny").mkdir()  # the workdir of an earlier `--workdir=shapes_tiny` run
  assert config_lib.load("shapes_tiny").model.width == 128


# ---------------------------------------------------------------- 7: the tokenizer file


@pytest.mark.parametrize("content", [b"", b"half a sentencepiece mod"])
def test_an_empty_or_corrupt_tokenizer_is_one_line_naming_the_file(tmp_path, capsys, content):
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "tokenizer.model").write_bytes(content)
  with pytest.raises(SystemExit) as exit_info:
    train.main(["--config=shapes_tiny", f"--workdir={workdir}", "--config.wandb.mode=disabled"])
  assert exit_info.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and str(workdir / "tokenizer.model") in err[0], err
  assert "is not a sentencepiece model" in err[0]


def test_the_tokenizer_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
  captions = ["a red circle", "a blue square above a green cross"] * 20

  def fail(self, target):
    raise OSError("disk full")

  monkeypatch.setattr(type(workdir_lib.path(tmp_path)), "rename", fail)
  with pytest.raises(OSError, match="disk full"):
    tokenizer_lib.train(captions, str(tmp_path / "tokenizer.model"), 32, "word")
  assert not (tmp_path / "tokenizer.model").exists()


def test_a_tokenizer_write_cut_short_leaves_no_half_file(tmp_path, monkeypatch):
  """A full disk halfway through writing the tokenizer: `tokenizer.model` is then absent, never
  half-written (which every rerun would fail to load)."""
  captions = ["a red circle", "a blue square above a green cross"] * 20
  path_type = type(workdir_lib.path(tmp_path))
  write_bytes = path_type.write_bytes

  def cut_short(self, data):
    write_bytes(self, data[:len(data) // 2])
    raise OSError(errno.ENOSPC, "No space left on device", str(self))

  monkeypatch.setattr(path_type, "write_bytes", cut_short)
  with pytest.raises(OSError, match="No space left on device"):
    tokenizer_lib.train(captions, str(tmp_path / "tokenizer.model"), 32, "word")
  assert not (tmp_path / "tokenizer.model").exists()


# ---------------------------------------------------------------- 2: no silent restart


@pytest.mark.slow
def test_no_silent_restart_over_an_earlier_runs_metrics(tmp_path):
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "metrics.jsonl").write_text('{"step": 40, "train/loss": 1.0}\n')
  with pytest.raises(config_lib.ConfigError, match="no checkpoint to resume from.*allow_restart"):
    train.train(tiny(), str(workdir))
  assert "step" in (workdir / "metrics.jsonl").read_text()  # untouched
  state, _ = train.train(tiny(**{"train.allow_restart": True}), str(workdir))
  assert int(state.step) == 2


# ---------------------------------------------------------------- 11: bounded run-ahead


BURN_ITERS = 2000  # 128x128 matmuls: ~0.2 s of device time a step, far above a dispatch


def slowed(fast, markers: list):
  """`fast` followed by ~0.2 s of device work that the next step's state and this step's
  `train/nonfinite` wait for; appends one small non-donated array a step, ready when the device
  has finished that step. Device work, not a host callback: on CPU a computation holding a
  callback runs synchronously at dispatch, which would hide the run-ahead under test."""

  @jax.jit
  def burn(step, flag):
    m0 = jnp.full((128, 128), 0.01, jnp.float32) * (1 + step.astype(jnp.float32))
    m = jax.lax.fori_loop(0, BURN_ITERS, lambda i, m: jnp.tanh(m @ m), m0)
    marker = (jnp.abs(m).sum() > 1e30).astype(jnp.int32)  # always 0; XLA cannot know it
    return step + marker, flag + marker.astype(flag.dtype), marker

  def step_fn(state, batch):
    state, metrics = fast(state, batch)
    step, flag, marker = burn(state.step, metrics["train/nonfinite"])
    markers.append(marker)
    return state.replace(step=step), {**metrics, "train/nonfinite": flag}

  return step_fn


def sigterm_when_the_device_has_done(count: int, markers: list, seen: dict):
  """SIGTERM to this process once the device has finished `count` steps; `seen` records the
  steps finished and dispatched at that moment."""

  def watch():
    while not (len(markers) >= count and markers[count - 1].is_ready()):
      time.sleep(0.002)
    dispatched = list(markers)
    seen["done"] = sum(m.is_ready() for m in dispatched)
    seen["dispatched"] = len(dispatched)
    os.kill(os.getpid(), signal.SIGTERM)

  threading.Thread(target=watch, daemon=True).start()


@pytest.mark.slow
def test_a_stop_is_saved_within_two_steps_of_the_step_on_the_device(tmp_path, monkeypatch):
  # On the code before #14 the host had dispatched 21 steps when the device finished step 5,
  # and the stop was saved at step 22.
  markers, seen = [], {}
  assemble = setup_lib.assemble

  def assemble_slowed(*args, **kwargs):
    run = assemble(*args, **kwargs)
    run.train_step = slowed(run.train_step, markers)
    return run

  monkeypatch.setattr(train.setup_lib, "assemble", assemble_slowed)
  sigterm_when_the_device_has_done(5, markers, seen)
  config = tiny(**{"train.num_steps": 50, "train.log_every": 50})
  state, stopped_by = train.train(config, str(tmp_path / "run"))
  assert stopped_by == "SIGTERM"
  on_device = seen["done"] + 1  # the step the device was running when the signal came
  assert seen["done"] <= int(state.step) <= on_device + train.MAX_STEPS_IN_FLIGHT, (
      int(state.step), seen)
  assert train_cli.steps(str(tmp_path / "run")) == [int(state.step)]


# ---------------------------------------------------------------- 5: data that never comes


def make_unreadable_flickr(root, count: int = 24):
  (root / "Images").mkdir(parents=True)
  with open(root / "captions.txt", "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["image", "caption"])
    for i in range(count):
      (root / "Images" / f"img_{i}.jpg").write_bytes(b"not a jpeg at all " * 8)
      writer.writerow([f"img_{i}.jpg", f"a dog number {i} runs on the grass"])


DATA = {"data.name": "flickr8k", "data.image_size": 32, "tokenizer.vocab_size": 64,
        "checkpoint.every": 0, "train.num_steps": 5}


@pytest.mark.slow
def test_a_pipeline_that_yields_nothing_fails_in_bounded_time(tmp_path):
  make_unreadable_flickr(tmp_path / "data")
  start = time.monotonic()
  out = train_cli.run(str(tmp_path / "run"), timeout=300,
                      **{**DATA, "data.dir": str(tmp_path / "data"), "data.timeout_s": 3})
  assert out.returncode == 2, out.stderr[-3000:]
  last = out.stderr.strip().splitlines()[-1]
  assert "no training batch came out of the input pipeline in 3 s" in last, last
  assert "data/skipped_" in last, last
  assert time.monotonic() - start < 120


@pytest.mark.slow
def test_a_stop_signal_is_honoured_while_waiting_for_data(tmp_path):
  make_unreadable_flickr(tmp_path / "data")
  log = tmp_path / "run.log"
  proc = train_cli.start(str(tmp_path / "run"), log,
                         **{**DATA, "data.dir": str(tmp_path / "data")})
  train_cli.wait_until(lambda: "devices, mesh" in log.read_text(), proc)
  time.sleep(2)
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=30) == train.EXIT_STOPPED, log.read_text()[-3000:]
  assert "received SIGTERM while waiting for data" in log.read_text()
